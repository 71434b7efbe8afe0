"""CAV-MAE's audio branch as LTU releases it (facts §2): an AST-like ViT-B over the Kaldi filterbank.

`[batch, 1024, 128]` fbank → 16×16 patches (8 along frequency × 64 along time, frequency-major) → + learned
positions (`pos_embed_a`) and the audio modality embedding (`modality_a`) → the audio-only blocks
(`blocks_a`, 11 in the release) → the joint blocks (`blocks_u`, 1; in the original these choose their
audio LayerNorms `norm1_a`/`norm2_a` when fed audio, which are the ones held here) → `norm_a`.

The blocks are timm's ViT blocks (pre-LN; fused q/k/v with biases; exact-GELU MLP), every LayerNorm
eps 1e-5. Attribute names follow the original (`patch_embed`, `blocks_a`, `attn.qkv`, `mlp.fc1`, ...),
so that the conversion table stays one-to-one; both block groups are stacked and scanned.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ltu_jax import sharding
from ltu_jax.models import layers
from ltu_jax.models.layers import Dtype


@dataclasses.dataclass(frozen=True)
class CavMaeConfig:
  """Sizes of the audio branch (the release: ViT-B, 768 wide, 12 heads, 11 + 1 blocks, 128 × 1024 input)."""

  dim: int = 768
  heads: int = 12
  mlp_dim: int = 3072
  audio_layers: int = 11  # `blocks_a`
  joint_layers: int = 1  # `blocks_u`
  patch: int = 16
  mel_bins: int = 128
  frames: int = 1024  # one window
  eps: float = 1e-5
  dtype: str = "float32"
  param_dtype: str = "float32"
  remat: bool = False

  @property
  def freq_patches(self) -> int:
    return self.mel_bins // self.patch

  @property
  def time_patches(self) -> int:
    return self.frames // self.patch


def sincos_positions(freq: int, time: int, dim: int) -> np.ndarray:
  """MAE's fixed 2-D sine-cosine table `[freq * time, dim]` (frequency-major), CAV-MAE's initial
  `pos_embed_a`: half the channels encode the time index, half the frequency index."""

  def one_axis(positions: np.ndarray, channels: int) -> np.ndarray:
    omega = 1.0 / 10000 ** (np.arange(channels // 2) / (channels / 2))
    angles = positions.reshape(-1, 1) * omega
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

  grid_time, grid_freq = np.meshgrid(np.arange(time, dtype=np.float64), np.arange(freq, dtype=np.float64))
  return np.concatenate([one_axis(grid_time, dim // 2), one_axis(grid_freq, dim // 2)], axis=1)


class Attention(nnx.Module):
  """timm's attention: one Linear makes q, k and v (with biases), scaled dot product, `proj` out."""

  def __init__(self, dim: int, num_heads: int, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
    self.num_heads = num_heads
    kwargs = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    # The fused output [3 * dim] is not sharded: a tensor-parallel split of it would not follow heads.
    self.qkv = layers.linear(dim, 3 * dim, "embed", None, bias=True, **kwargs)
    self.proj = layers.linear(dim, dim, "heads", "embed", bias=True, **kwargs)

  def __call__(self, x: jax.Array) -> jax.Array:
    """`[batch, len, dim]` → `[batch, len, dim]`, unmasked."""
    batch, length, dim = x.shape
    qkv = self.qkv(x).reshape(batch, length, 3, self.num_heads, dim // self.num_heads)
    return self.proj(layers.attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]))


class Mlp(nnx.Module):
  def __init__(self, dim: int, mlp_dim: int, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
    kwargs = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.fc1 = layers.linear(dim, mlp_dim, "embed", "mlp", bias=True, **kwargs)
    self.fc2 = layers.linear(mlp_dim, dim, "mlp", "embed", bias=True, **kwargs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


class Block(nnx.Module):
  """timm's pre-LN ViT block: `x + attn(norm1(x))`, then `x + mlp(norm2(x))`."""

  def __init__(self, config: CavMaeConfig, rngs: nnx.Rngs):
    kwargs = dict(dtype=jnp.dtype(config.dtype), param_dtype=jnp.dtype(config.param_dtype), rngs=rngs)
    norm = dict(eps=config.eps, param_dtype=jnp.dtype(config.param_dtype), rngs=rngs)
    self.norm1 = layers.layer_norm(config.dim, **norm)
    self.attn = Attention(config.dim, config.heads, **kwargs)
    self.norm2 = layers.layer_norm(config.dim, **norm)
    self.mlp = Mlp(config.dim, config.mlp_dim, **kwargs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x + self.attn(self.norm1(x)).astype(x.dtype)
    return x + self.mlp(self.norm2(x)).astype(x.dtype)


class CavMaeAudio(nnx.Module):
  def __init__(self, config: CavMaeConfig, *, rngs: nnx.Rngs):
    self.config = config
    dtype, param_dtype = jnp.dtype(config.dtype), jnp.dtype(config.param_dtype)
    # Conv2d(1 → dim, 16×16, stride 16) over [batch, freq, time, 1]
    self.patch_embed = nnx.Conv(
      1, config.dim, kernel_size=(config.patch, config.patch), strides=(config.patch, config.patch),
      padding="VALID", dtype=dtype, param_dtype=param_dtype,
      kernel_metadata=layers.axes(None, None, "conv_in", "embed"), bias_metadata=layers.axes("embed"), rngs=rngs,
    )
    patches = config.freq_patches * config.time_patches
    positions = sincos_positions(config.freq_patches, config.time_patches, config.dim)
    self.pos_embed = nnx.Param(
      jnp.asarray(positions, param_dtype).reshape(1, patches, config.dim), **layers.axes(None, "length", "embed")
    )
    self.modality = nnx.Param(jnp.zeros((1, 1, config.dim), param_dtype), **layers.axes(None, None, "embed"))
    self.blocks_a = layers.stack(config.audio_layers, lambda r: Block(config, r), rngs)
    self.blocks_u = layers.stack(config.joint_layers, lambda r: Block(config, r), rngs)
    self.norm = layers.layer_norm(config.dim, eps=config.eps, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, fbank: jax.Array) -> jax.Array:
    """`[batch, frames, mel_bins]` normalized fbank (one window) → `[batch, freq_patches * time_patches, dim]`,
    patches frequency-major."""
    return self.encode(fbank)[0]

  def encode(self, fbank: jax.Array, hidden_states: bool = False) -> tuple[jax.Array, jax.Array | None]:
    """The encoded patches and, with `hidden_states`, every block's output
    `[audio_layers + joint_layers, batch, patches, dim]` (before `norm_a`)."""
    c = self.config
    if fbank.shape[1:] != (c.frames, c.mel_bins):
      raise ValueError(f"fbank has shape {fbank.shape[1:]} per window, expected ({c.frames}, {c.mel_bins})")
    x = self.patch_embed(fbank.swapaxes(1, 2)[..., None].astype(jnp.dtype(c.dtype)))
    x = x.reshape(x.shape[0], -1, c.dim) + self.pos_embed.get_value() + self.modality.get_value()
    x = x.astype(jnp.dtype(c.dtype))

    def body(block: Block, x: jax.Array, _) -> tuple[jax.Array, jax.Array | None]:
      # batch-sharded: else XLA gives the patches `pos_embed`'s fsdp sharding of "embed", and every device
      # encodes every example (LTU-7B stage 4 on 8 devices: 27.5 GB of temporaries per device, not 10.7)
      x = sharding.constrain(x, ("batch", "length", None))
      x = block(x)
      return x, x if hidden_states else None

    x, audio_hidden = layers.scan(self.blocks_a, body, x, remat=c.remat)
    x, joint_hidden = layers.scan(self.blocks_u, body, x, remat=c.remat)
    hidden = jnp.concatenate([audio_hidden, joint_hidden]) if hidden_states else None
    return self.norm(x).astype(x.dtype), hidden
