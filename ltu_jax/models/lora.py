"""Linear layers with optional LoRA adapters (Hu et al. 2021), as peft applies them.

`y = x W + b + dropout(x) A B · alpha / rank`, with A `[in, rank]` (Kaiming-uniform, as peft) and B
`[rank, out]` initialised to zero, so a fresh adapter leaves the base model unchanged. Adapter weights
are `LoRAParam`s: the filter `LoRAParam` selects exactly them, apart from the frozen base weights.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from ltu_jax.models import layers


class LoRAParam(nnx.Param):
  """A trainable LoRA adapter weight (distinct from the frozen base `nnx.Param`s)."""


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
  """LoRA hyper-parameters; LTU-AS uses rank 8, alpha 16, dropout 0.05 on q_proj and v_proj."""

  rank: int = 8
  alpha: float = 16.0
  dropout: float = 0.05
  targets: tuple[str, ...] = ("q_proj", "v_proj")

  @property
  def scale(self) -> float:
    return self.alpha / self.rank


class Linear(nnx.Module):
  """A dense layer, kernel `[in, out]`, with a LoRA adapter when `lora` is given."""

  def __init__(
    self,
    in_features: int,
    out_features: int,
    in_axis: str | None,
    out_axis: str | None,
    *,
    bias: bool,
    lora: LoRAConfig | None,
    dtype,
    param_dtype,
    rngs: nnx.Rngs,
  ):
    self.dtype = dtype
    self.base = layers.linear(
      in_features, out_features, in_axis, out_axis, bias=bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs
    )
    self.lora = lora
    if lora is not None:
      # peft's A init: kaiming_uniform(a=sqrt(5)) on [rank, in] = U(-1/sqrt(in), 1/sqrt(in)).
      bound = 1.0 / math.sqrt(in_features)
      a = jax.random.uniform(rngs.params(), (in_features, lora.rank), param_dtype, -bound, bound)
      self.lora_a = LoRAParam(a, **layers.axes(in_axis, "lora_rank"))
      self.lora_b = LoRAParam(jnp.zeros((lora.rank, out_features), param_dtype), **layers.axes("lora_rank", out_axis))

  def __call__(self, x: jax.Array, dropout_key: jax.Array | None = None) -> jax.Array:
    """`[..., in]` → `[..., out]`; adapter dropout only when a key is given (training)."""
    y = self.base(x)
    if self.lora is None:
      return y
    h = x.astype(self.dtype)
    if dropout_key is not None and self.lora.dropout > 0:
      keep = bernoulli(dropout_key, 1.0 - self.lora.dropout, h.shape)
      h = jnp.where(keep, h / (1.0 - self.lora.dropout), 0).astype(self.dtype)
    delta = h @ self.lora_a[...].astype(self.dtype) @ self.lora_b[...].astype(self.dtype)
    return y + delta * self.lora.scale


def bernoulli(key: jax.Array, p: float, shape: tuple[int, ...]) -> jax.Array:
  """Independent booleans of `shape`, each True with probability `p` (to within 2⁻³²): `jax.random.bernoulli`'s
  draw from a counter-based integer hash seeded by two words of `key`, for dropout masks.

  On CPU JAX lowers its threefry generator as rolled loops that pass over the whole array every round: about
  7 ns an element, 1.4 ms for one `[4, 89, 576]` mask, so some 90 ms of a tiny training step's 1.3 s (LoRA
  dropout on q and v in 30 layers); the hash is one fused elementwise pass, about 0.2 ms (issue #15).
  """
  seeds = jax.random.bits(key, (2,), jnp.uint32)
  counter = jax.lax.iota(jnp.uint32, math.prod(shape)).reshape(shape)
  # Two rounds of a 32-bit bijective mixer (lowbias32: xor-shift, multiply by an odd constant), keyed before
  # each, so that streams of different keys are not shifted copies of each other.
  bits = mix32(mix32(counter ^ seeds[0]) + seeds[1])
  return bits < jnp.uint32(min(round(p * 2**32), 2**32 - 1))


def mix32(x: jax.Array) -> jax.Array:
  """Chris Wellons' lowbias32 integer hash of uint32 `x`: each output bit depends on every input bit."""
  x = (x ^ (x >> 16)) * jnp.uint32(0x7FEB352D)
  x = (x ^ (x >> 15)) * jnp.uint32(0x846CA68B)
  return x ^ (x >> 16)
