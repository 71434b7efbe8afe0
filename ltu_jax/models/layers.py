"""Building blocks shared by every model: annotated layers, stacked (scanned) layers, attention.

Every parameter carries logical axis names ("embed", "mlp", "heads", "vocab", "layers", ...) in its
`out_sharding` metadata; `ltu_jax.sharding` maps them onto a device mesh with one rules table. Sharding
is applied by the caller (jit out_shardings), never eagerly, so building a model needs no mesh.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx, struct

Dtype = Any


def axes(*names: str | None) -> dict[str, Any]:
  """Variable metadata naming the logical axes of a parameter, one name per dimension."""
  return {"out_sharding": tuple(names), "eager_sharding": False}


def linear(
  in_features: int,
  out_features: int,
  in_axis: str | None,
  out_axis: str | None,
  *,
  bias: bool,
  dtype: Dtype,
  param_dtype: Dtype,
  rngs: nnx.Rngs,
) -> nnx.Linear:
  """`nnx.Linear` with logical axes on its kernel `[in, out]` and bias `[out]`."""
  return nnx.Linear(
    in_features,
    out_features,
    use_bias=bias,
    dtype=dtype,
    param_dtype=param_dtype,
    kernel_init=nnx.initializers.normal(0.02),
    kernel_metadata=axes(in_axis, out_axis),
    bias_metadata=axes(out_axis),
    rngs=rngs,
  )


def layer_norm(
  dim: int, *, eps: float, affine: bool = True, param_dtype: Dtype, rngs: nnx.Rngs
) -> nnx.LayerNorm:
  """LayerNorm computed in float32 (as Whisper and TLTR do), cast back by the caller's next op."""
  return nnx.LayerNorm(
    dim,
    epsilon=eps,
    use_bias=affine,
    use_scale=affine,
    use_fast_variance=False,
    dtype=jnp.float32,
    param_dtype=param_dtype,
    scale_metadata=axes("norm"),
    bias_metadata=axes("norm"),
    rngs=rngs,
  )


def stack(num_layers: int, make_layer: Callable[[nnx.Rngs], nnx.Module], rngs: nnx.Rngs) -> nnx.Module:
  """Builds `num_layers` copies of a layer as one module whose parameters have a leading "layers" axis."""

  @nnx.split_rngs(splits=num_layers)
  @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
  def make(rngs: nnx.Rngs) -> nnx.Module:
    return make_layer(rngs)

  return make(rngs)


def scan(
  layers: nnx.Module,
  body: Callable[[nnx.Module, Any, Any], tuple[Any, Any]],
  carry: Any,
  xs: Any = None,
  *,
  remat: bool = False,
) -> tuple[Any, Any]:
  """Runs `body(layer, carry, x) -> (carry, y)` over stacked layers with `jax.lax.scan`.

  One traced layer serves all of them, so compile time does not grow with depth. `xs` and the
  stacked outputs `ys` carry a leading layer axis (per-layer KV caches, per-layer hidden states).
  """
  graphdef, state = nnx.split(layers)

  def step(carry, scanned):
    layer_state, x = scanned
    return body(nnx.merge(graphdef, layer_state), carry, x)

  if remat:
    step = jax.checkpoint(step, prevent_cse=False)
  return jax.lax.scan(step, carry, (state, xs))


# Logits above this size are computed over blocks of queries. glibc maps any temporary above its 32 MiB
# mmap threshold afresh on every call (~90,000 page faults per Whisper encoder call at 30 s), and blocks
# that fit the caches run faster anyway (measured: 8 MiB blocks are about as fast as any size).
ATTENTION_BLOCK_BYTES = 8 * 2**20


def attention(
  query: jax.Array,
  key: jax.Array,
  value: jax.Array,
  mask: jax.Array | None = None,
) -> jax.Array:
  """Scaled dot-product attention, softmax in float32; grouped-query when key heads < query heads.

  Computed head-major (`[batch, kv_heads, group, len, head_dim]`), so that each head's logits and
  probabilities are contiguous and the probabilities feed the second matmul without a copy. Long
  attention (float32 logits above `ATTENTION_BLOCK_BYTES`) runs over blocks of queries; each query's
  row is computed on its own, so blocks change nothing but the matmuls' rounding.

  Args:
    query: `[batch, q_len, heads, head_dim]`.
    key, value: `[batch, kv_len, kv_heads, head_dim]`.
    mask: boolean, broadcastable to `[batch, heads, q_len, kv_len]`; True attends.
  Returns:
    `[batch, q_len, heads * head_dim]`.
  """
  batch, q_len, heads, head_dim = query.shape
  kv_len, kv_heads = key.shape[1:3]
  group = heads // kv_heads
  scale = head_dim**-0.5
  # [batch, kv_heads, group, q_len, head_dim], keys [batch, kv_heads, head_dim, kv_len] (the layout the
  # matmul reads, transposed once rather than once per block), values [batch, kv_heads, kv_len, head_dim].
  query = query.reshape(batch, q_len, kv_heads, group, head_dim).transpose(0, 2, 3, 1, 4)
  key, value = key.transpose(0, 2, 3, 1), value.transpose(0, 2, 1, 3)
  if mask is not None:
    mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
    # [batch or 1, kv_heads or 1, group or 1, q_len or 1, kv_len or 1]
    mask = mask.reshape(mask.shape[0], *((kv_heads, group) if mask.shape[1] == heads else (1, 1)), *mask.shape[2:])

  def attend(query: jax.Array, mask: jax.Array | None) -> jax.Array:
    """Queries `[batch, kv_heads, group, rows, head_dim]` → `[batch, kv_heads, group, rows, head_dim]`."""
    rows = query.shape[3]
    # Three dimensions, none of size 1: degenerate dimensions led XLA to copy the logits between layouts.
    logits = jnp.einsum(
      "ntd,nds->nts",
      query.reshape(batch * kv_heads, group * rows, head_dim),
      key.reshape(batch * kv_heads, head_dim, kv_len),
      preferred_element_type=jnp.float32,
    )
    if mask is not None:
      mask = jnp.broadcast_to(mask, (batch, kv_heads, group, rows, kv_len)).reshape(logits.shape)
      logits = jnp.where(mask, logits, -0.7 * jnp.finfo(jnp.float32).max)
    # softmax(scale * logits) with the scale on the exponent's pass (max commutes with scale > 0), not a
    # pass of its own; normalised after the second matmul, on [rows, head_dim] rather than [rows, kv_len].
    weights = jnp.exp((logits - logits.max(axis=-1, keepdims=True)) * scale)
    out = jnp.einsum(
      "nts,nsd->ntd",
      weights.astype(value.dtype),
      value.reshape(batch * kv_heads, kv_len, head_dim),
      preferred_element_type=jnp.float32,
    )
    out = (out / weights.sum(axis=-1, keepdims=True)).astype(value.dtype)
    return out.reshape(query.shape)

  rows = max(1, ATTENTION_BLOCK_BYTES // (4 * batch * heads * kv_len))
  if q_len <= rows:
    out = attend(query, mask)
  else:
    num_blocks = -(-q_len // rows)
    rows = -(-q_len // num_blocks)
    pad = num_blocks * rows - q_len

    def blocks(x: jax.Array, fill) -> jax.Array:
      """`[..., q_len, last]` → `[num_blocks, ..., rows, last]`, padded with `fill`."""
      x = jnp.pad(x, [(0, 0)] * (x.ndim - 2) + [(0, pad), (0, 0)], constant_values=fill)
      return jnp.moveaxis(x.reshape(*x.shape[:-2], num_blocks, rows, x.shape[-1]), -3, 0)

    per_query_mask = mask is not None and mask.shape[3] == q_len > 1
    out = jax.lax.map(
      lambda xs: attend(xs[0], xs[1] if per_query_mask else mask),
      (blocks(query, 0), blocks(mask, True) if per_query_mask else None),
    )
    # [num_blocks, batch, kv_heads, group, rows, head_dim] → [batch, kv_heads, group, q_len, head_dim]
    out = jnp.moveaxis(out, 0, 3).reshape(batch, kv_heads, group, num_blocks * rows, head_dim)[..., :q_len, :]
  return out.transpose(0, 3, 1, 2, 4).reshape(batch, q_len, heads * head_dim)


def causal_mask(q_positions: jax.Array, kv_positions: jax.Array, kv_valid: jax.Array | None) -> jax.Array:
  """Boolean mask `[batch, 1, q_len, kv_len]`: a query sees keys at positions at or before its own.

  Args:
    q_positions: `[batch, q_len]` positions of the queries in the sequence.
    kv_positions: `[batch, kv_len]` positions of the keys (a KV cache's slots).
    kv_valid: `[batch, kv_len]` True where a key is a real token (not padding, not an empty cache slot).
  """
  mask = kv_positions[:, None, :] <= q_positions[:, :, None]
  if kv_valid is not None:
    mask = mask & kv_valid[:, None, :]
  return mask[:, None]


def split_heads(x: jax.Array, num_heads: int) -> jax.Array:
  """`[batch, len, heads * head_dim]` → `[batch, len, heads, head_dim]`."""
  return x.reshape(*x.shape[:-1], num_heads, -1)


def sequence_positions(attention_mask: jax.Array) -> jax.Array:
  """Positions that skip padding: `[batch, len]` mask → `[batch, len]` positions (0 at the first real token).

  With left padding the first real token still gets position 0, so padded and unpadded rows of a batch
  see the same rotary phases.
  """
  return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


@struct.dataclass
class KVCache:
  """Keys and values of every layer for incremental decoding; slot i holds the i-th token fed in.

  key, value: `[layers, batch, max_len, kv_heads, head_dim]`, or lists of per-layer `[batch, max_len, kv_heads,
    head_dim]` (the decoding layout, `llama.Decoding`).
  valid: `[batch, max_len]`, True where a slot holds a real (non-padding) token.
  index: `[]` int32, the next slot to write; all rows of a batch advance together.
  """

  key: jax.Array
  value: jax.Array
  valid: jax.Array
  index: jax.Array

  @classmethod
  def zeros(cls, num_layers: int, batch: int, max_len: int, kv_heads: int, head_dim: int, dtype: Dtype) -> "KVCache":
    shape = (num_layers, batch, max_len, kv_heads, head_dim)
    return cls(
      key=jnp.zeros(shape, dtype),
      value=jnp.zeros(shape, dtype),
      valid=jnp.zeros((batch, max_len), bool),
      index=jnp.zeros((), jnp.int32),
    )

  @property
  def max_len(self) -> int:
    return self.valid.shape[1]

  def advance(self, attention_mask: jax.Array) -> tuple["KVCache", jax.Array, jax.Array]:
    """Marks `attention_mask` `[batch, new]` as the next slots.

    Returns the cache with `valid`/`index` advanced (keys and values are written per layer by
    `write`), the slots of the new tokens `[batch, new]` and of all keys `[batch, max_len]`.
    """
    batch, new = attention_mask.shape
    valid = jax.lax.dynamic_update_slice(self.valid, attention_mask.astype(bool), (0, self.index))
    q_slots = jnp.broadcast_to(self.index + jnp.arange(new), (batch, new))
    kv_slots = jnp.broadcast_to(jnp.arange(self.max_len), (batch, self.max_len))
    return self.replace(valid=valid, index=self.index + new), q_slots, kv_slots


def write(cache: jax.Array, new: jax.Array, index: jax.Array) -> jax.Array:
  """Writes `new` `[batch, new_len, ...]` into one layer's cache `[batch, max_len, ...]` at slot `index`."""
  return jax.lax.dynamic_update_slice(cache, new.astype(cache.dtype), (0, index) + (0,) * (cache.ndim - 2))
