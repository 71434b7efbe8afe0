"""TLTR, LTU-AS's time-and-layer transformer over every Whisper encoder layer.

A time transformer (1 head) attends over the time steps of each layer, then a layer transformer
(8 heads) attends over the layers at each time step, and the layers are averaged. Both are Whisper's
pre-LN residual blocks (key without bias), without positional encoding. All time steps are kept.
"""

from __future__ import annotations

import dataclasses

import jax
from flax import nnx

from ltu_jax.models.whisper import EncoderLayer


@dataclasses.dataclass(frozen=True)
class TLTRConfig:
  dim: int = 1280  # the Whisper encoder width
  time_heads: int = 1
  layer_heads: int = 8
  mlp_dim: int = 5120
  eps: float = 1e-5
  dtype: str = "float32"
  param_dtype: str = "float32"


class TLTR(nnx.Module):
  def __init__(self, config: TLTRConfig, *, rngs: nnx.Rngs):
    self.config = config

    def block(heads: int) -> EncoderLayer:
      return EncoderLayer(
        config.dim, heads, config.mlp_dim, eps=config.eps, dtype=config.dtype, param_dtype=config.param_dtype, rngs=rngs
      )

    self.time_tr = block(config.time_heads)
    self.layer_tr = block(config.layer_heads)

  def __call__(self, features: jax.Array) -> jax.Array:
    """`[batch, layers, time, dim]` Whisper features → `[batch, time, dim]`."""
    batch, num_layers, time, dim = features.shape
    x = self.time_tr(features.reshape(batch * num_layers, time, dim))
    x = x.reshape(batch, num_layers, time, dim).transpose(0, 2, 1, 3).reshape(batch * time, num_layers, dim)
    x = self.layer_tr(x)
    return x.mean(axis=1).reshape(batch, time, dim)
