"""Whisper (encoder and decoder), with the LTU-AS feature path: every encoder block's output, time-pooled.

The attribute names mirror Hugging Face's `WhisperForConditionalGeneration` (`self_attn.q_proj`, `fc1`,
`final_layer_norm`, ...) so that conversion tables stay one-to-one. Encoder and decoder blocks are
stacked and scanned; the encoder's per-block outputs are the scan's stacked outputs.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from ltu_jax.models import layers
from ltu_jax.models.layers import Dtype, KVCache


@dataclasses.dataclass(frozen=True)
class WhisperConfig:
  """Sizes of one Whisper checkpoint (tiny.en: d_model 384, 6 heads; large-v1: 1280, 20 heads).

  max_source_positions counts encoder frames after the stride-2 conv (1500 for 30 s of audio), so the
  encoder accepts up to `2 * max_source_positions` mel frames.
  """

  num_mel_bins: int
  d_model: int
  encoder_layers: int
  encoder_attention_heads: int
  encoder_ffn_dim: int
  decoder_layers: int
  decoder_attention_heads: int
  decoder_ffn_dim: int
  vocab_size: int
  max_source_positions: int
  max_target_positions: int
  layer_norm_eps: float = 1e-5
  dtype: str = "float32"
  param_dtype: str = "float32"
  remat: bool = False


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> jax.Array:
  """Whisper's fixed encoder positions `[length, channels]`: sines then cosines."""
  inv_timescales = jnp.exp(-math.log(max_timescale) / (channels // 2 - 1) * jnp.arange(channels // 2))
  scaled_time = jnp.arange(length)[:, None] * inv_timescales[None, :]
  return jnp.concatenate([jnp.sin(scaled_time), jnp.cos(scaled_time)], axis=1)


class Attention(nnx.Module):
  """Multi-head attention with Whisper's projections: the key projection has no bias."""

  def __init__(self, dim: int, num_heads: int, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
    self.num_heads = num_heads
    kwargs = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.q_proj = layers.linear(dim, dim, "embed", "heads", bias=True, **kwargs)
    self.k_proj = layers.linear(dim, dim, "embed", "heads", bias=False, **kwargs)
    self.v_proj = layers.linear(dim, dim, "embed", "heads", bias=True, **kwargs)
    self.out_proj = layers.linear(dim, dim, "heads", "embed", bias=True, **kwargs)

  def keys_values(self, source: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`[batch, len, dim]` → key and value, each `[batch, len, heads, head_dim]`."""
    return (
      layers.split_heads(self.k_proj(source), self.num_heads),
      layers.split_heads(self.v_proj(source), self.num_heads),
    )

  def attend(self, x: jax.Array, key: jax.Array, value: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Queries from `x` `[batch, len, dim]` over given keys and values → `[batch, len, dim]`."""
    query = layers.split_heads(self.q_proj(x), self.num_heads)
    return self.out_proj(layers.attention(query, key, value, mask))

  def __call__(self, x: jax.Array) -> jax.Array:
    """Unmasked self-attention, `[batch, len, dim]` → `[batch, len, dim]`."""
    return self.attend(x, *self.keys_values(x))


class EncoderLayer(nnx.Module):
  """Whisper's pre-LN residual block (also TLTR's): self-attention, then an exact-GELU MLP; no mask."""

  def __init__(
    self,
    dim: int,
    num_heads: int,
    mlp_dim: int,
    *,
    eps: float,
    dtype: Dtype,
    param_dtype: Dtype,
    rngs: nnx.Rngs,
  ):
    kwargs = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.self_attn = Attention(dim, num_heads, **kwargs)
    self.self_attn_layer_norm = layers.layer_norm(dim, eps=eps, param_dtype=param_dtype, rngs=rngs)
    self.fc1 = layers.linear(dim, mlp_dim, "embed", "mlp", bias=True, **kwargs)
    self.fc2 = layers.linear(mlp_dim, dim, "mlp", "embed", bias=True, **kwargs)
    self.final_layer_norm = layers.layer_norm(dim, eps=eps, param_dtype=param_dtype, rngs=rngs)

  def feed_forward(self, x: jax.Array) -> jax.Array:
    """The MLP branch of the residual `[batch, len, dim]` → `[batch, len, dim]`."""
    return self.fc2(jax.nn.gelu(self.fc1(self.final_layer_norm(x)), approximate=False))

  def __call__(self, x: jax.Array) -> jax.Array:
    """`[batch, time, dim]` → `[batch, time, dim]`."""
    x = x + self.self_attn(self.self_attn_layer_norm(x))
    return x + self.feed_forward(x)


class DecoderLayer(EncoderLayer):
  """An encoder block with causal, cacheable self-attention and cross-attention between its two halves."""

  def __init__(
    self,
    dim: int,
    num_heads: int,
    mlp_dim: int,
    *,
    eps: float,
    dtype: Dtype,
    param_dtype: Dtype,
    rngs: nnx.Rngs,
  ):
    super().__init__(dim, num_heads, mlp_dim, eps=eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.encoder_attn = Attention(dim, num_heads, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.encoder_attn_layer_norm = layers.layer_norm(dim, eps=eps, param_dtype=param_dtype, rngs=rngs)

  def __call__(
    self,
    x: jax.Array,
    mask: jax.Array,
    cross_kv: tuple[jax.Array, jax.Array],
    cached_kv: tuple[jax.Array, jax.Array] | None = None,
    index: jax.Array | None = None,
  ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
    """One decoder block.

    Args:
      x: `[batch, len, dim]`.
      mask: boolean `[batch, 1, len, kv_len]` for self-attention (kv_len = len, or the cache's max_len).
      cross_kv: this layer's encoder keys and values, each `[batch, enc_frames, heads, head_dim]`.
      cached_kv: this layer's self-attention cache, each `[batch, max_len, heads, head_dim]`, or None.
      index: the cache slot of `x`'s first token.
    Returns:
      `[batch, len, dim]` and the updated `cached_kv` (None without a cache).
    """
    h = self.self_attn_layer_norm(x)
    key, value = self.self_attn.keys_values(h)
    if cached_kv is not None:
      cached_kv = tuple(layers.write(cached, new, index) for cached, new in zip(cached_kv, (key, value)))
      key, value = cached_kv
    x = x + self.self_attn.attend(h, key, value, mask)
    x = x + self.encoder_attn.attend(self.encoder_attn_layer_norm(x), *cross_kv)
    return x + self.feed_forward(x), cached_kv


class WhisperEncoder(nnx.Module):
  """Log-mel → two GELU convs (the second strides 2) → positions → scanned blocks → LayerNorm."""

  def __init__(self, config: WhisperConfig, rngs: nnx.Rngs):
    self.config = config
    dim, dtype, param_dtype = config.d_model, jnp.dtype(config.dtype), jnp.dtype(config.param_dtype)
    conv = dict(
      kernel_size=3,
      padding=((1, 1),),
      dtype=dtype,
      param_dtype=param_dtype,
      kernel_metadata=layers.axes(None, "conv_in", "embed"),
      bias_metadata=layers.axes("embed"),
      rngs=rngs,
    )
    self.conv1 = nnx.Conv(config.num_mel_bins, dim, **conv)
    self.conv2 = nnx.Conv(dim, dim, strides=2, **conv)
    self.embed_positions = nnx.Param(
      sinusoids(config.max_source_positions, dim).astype(param_dtype), **layers.axes("length", "embed")
    )
    self.layers = layers.stack(
      config.encoder_layers,
      lambda r: EncoderLayer(
        dim,
        config.encoder_attention_heads,
        config.encoder_ffn_dim,
        eps=config.layer_norm_eps,
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=r,
      ),
      rngs,
    )
    self.layer_norm = layers.layer_norm(dim, eps=config.layer_norm_eps, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, mel: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Encodes a log-mel spectrogram.

    Args:
      mel: `[batch, n_mels, mel_frames]` (the HF/OpenAI layout), at most `2 * max_source_positions`
        frames; a shorter input uses the first rows of the positional table (LTU-AS: 1000 frames).
    Returns:
      last_hidden_state: `[batch, frames, dim]`, frames = ceil(mel_frames / 2), after the final LayerNorm.
      hidden_states: `[layers, batch, frames, dim]`, the raw output of every block (no LayerNorm).
    """
    max_frames = 2 * self.config.max_source_positions
    if mel.shape[-1] > max_frames:
      raise ValueError(
        f"mel has {mel.shape[-1]} frames; this Whisper encoder takes at most {max_frames} "
        f"(2 * max_source_positions = 2 * {self.config.max_source_positions})"
      )
    x = jax.nn.gelu(self.conv1(mel.swapaxes(1, 2)), approximate=False)
    x = jax.nn.gelu(self.conv2(x), approximate=False)
    # Add in the wider dtype and cast once, as OpenAI's fp16 path does.
    x = (x + self.embed_positions[: x.shape[1]]).astype(self.config.dtype)

    def block(layer: EncoderLayer, x: jax.Array, _) -> tuple[jax.Array, jax.Array]:
      x = layer(x)
      return x, x

    x, hidden_states = layers.scan(self.layers, block, x, remat=self.config.remat)
    return self.layer_norm(x), hidden_states


def ltu_as_features(hidden_states: jax.Array, pool: int) -> jax.Array:
  """LTU-AS audio features: every block's output, mean-pooled over non-overlapping windows of `pool` frames.

  Args:
    hidden_states: `[layers, batch, frames, dim]` from `WhisperEncoder` (large-v1 on 10 s: `[32, B, 500, 1280]`).
    pool: window and stride in encoder frames (20 frames = 0.4 s).
  Returns:
    `[batch, layers, frames // pool, dim]` (large-v1 on 10 s: `[B, 32, 25, 1280]`), in the input dtype;
    trailing frames that do not fill a window are dropped (LTU-AS's 500 frames divide exactly).
  """
  num_layers, batch, frames, dim = hidden_states.shape
  steps = frames // pool
  windows = hidden_states[:, :, : steps * pool].reshape(num_layers, batch, steps, pool, dim)
  # Mean in float32 even for fp16 states, as numpy does for LTU-AS's stored features.
  pooled = windows.astype(jnp.float32).mean(axis=3).astype(hidden_states.dtype)
  return pooled.swapaxes(0, 1)


class WhisperDecoder(nnx.Module):
  """Token decoder with tied output embedding; self-attention cached in a `KVCache`, cross-attention keys
  and values computed once per audio by `cross_kv`.

  Full forward: `decoder(ids, decoder.cross_kv(encoded))`. Incremental decoding:
  `cache = decoder.init_cache(batch)`, then `logits, cache = decoder(ids, kv, cache)` on a prompt chunk and
  then on one token at a time; the positions of the fed tokens are their cache slots.
  """

  def __init__(self, config: WhisperConfig, rngs: nnx.Rngs):
    self.config = config
    dim, dtype, param_dtype = config.d_model, jnp.dtype(config.dtype), jnp.dtype(config.param_dtype)
    self.embed_tokens = nnx.Embed(
      config.vocab_size,
      dim,
      dtype=dtype,
      param_dtype=param_dtype,
      embedding_init=nnx.initializers.normal(0.02),
      embedding_metadata=layers.axes("vocab", "embed"),
      rngs=rngs,
    )
    self.embed_positions = nnx.Param(
      nnx.initializers.normal(0.02)(rngs.params(), (config.max_target_positions, dim), param_dtype),
      **layers.axes("length", "embed"),
    )
    self.layers = layers.stack(
      config.decoder_layers,
      lambda r: DecoderLayer(
        dim,
        config.decoder_attention_heads,
        config.decoder_ffn_dim,
        eps=config.layer_norm_eps,
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=r,
      ),
      rngs,
    )
    self.layer_norm = layers.layer_norm(dim, eps=config.layer_norm_eps, param_dtype=param_dtype, rngs=rngs)

  def init_cache(self, batch: int, max_len: int | None = None) -> KVCache:
    """An empty self-attention cache for `max_len` tokens (default and limit: max_target_positions)."""
    config = self.config
    max_len = config.max_target_positions if max_len is None else max_len
    if max_len > config.max_target_positions:
      raise ValueError(f"max_len {max_len} exceeds max_target_positions {config.max_target_positions}")
    heads = config.decoder_attention_heads
    return KVCache.zeros(config.decoder_layers, batch, max_len, heads, config.d_model // heads, config.dtype)

  def cross_kv(self, encoder_hidden: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Cross-attention keys and values of every layer, computed once per audio.

    Args:
      encoder_hidden: `[batch, enc_frames, dim]`, the encoder's last_hidden_state.
    Returns:
      key, value: each `[layers, batch, enc_frames, heads, head_dim]`.
    """

    def project(layer: DecoderLayer, carry: None, _) -> tuple[None, tuple[jax.Array, jax.Array]]:
      return carry, layer.encoder_attn.keys_values(encoder_hidden)

    return layers.scan(self.layers, project, None)[1]

  def __call__(
    self,
    input_ids: jax.Array,
    cross_kv: tuple[jax.Array, jax.Array],
    cache: KVCache | None = None,
    attention_mask: jax.Array | None = None,
  ) -> tuple[jax.Array, KVCache | None]:
    """Logits for `input_ids` `[batch, len]`.

    Args:
      input_ids: `[batch, len]` token ids; with a cache, the tokens that follow those already in it.
      cross_kv: from `cross_kv`, each `[layers, batch, enc_frames, heads, head_dim]`.
      cache: None for a plain causal forward, or the cache to extend.
      attention_mask: `[batch, len]`, 0 on (left) padding, which the positions skip; all ones when None.
    Returns:
      logits `[batch, len, vocab]` in float32, and the extended cache (None without one).
    """
    batch, length = input_ids.shape
    if attention_mask is None:
      attention_mask = jnp.ones((batch, length), jnp.int32)
    positions = layers.sequence_positions(attention_mask)
    if cache is None:
      if length > self.config.max_target_positions:
        raise ValueError(f"{length} tokens exceed max_target_positions {self.config.max_target_positions}")
      slots = jnp.broadcast_to(jnp.arange(length), (batch, length))
      mask = layers.causal_mask(slots, slots, attention_mask.astype(bool))
      index, cached_kv = None, None
    else:
      positions = positions + jnp.sum(cache.valid, axis=-1, keepdims=True)
      index, cached_kv = cache.index, (cache.key, cache.value)
      cache, slots, kv_slots = cache.advance(attention_mask)
      mask = layers.causal_mask(slots, kv_slots, cache.valid)
    x = (self.embed_tokens(input_ids) + self.embed_positions[positions]).astype(self.config.dtype)

    def block(layer: DecoderLayer, x: jax.Array, per_layer) -> tuple[jax.Array, tuple | None]:
      layer_cross_kv, layer_cached_kv = per_layer
      return layer(x, mask, layer_cross_kv, layer_cached_kv, index)

    x, cached_kv = layers.scan(self.layers, block, x, (cross_kv, cached_kv), remat=self.config.remat)
    if cache is not None:
      cache = cache.replace(key=cached_kv[0], value=cached_kv[1])
    return self.embed_tokens.attend(self.layer_norm(x)).astype(jnp.float32), cache


class Whisper(nnx.Module):
  """Whisper encoder-decoder: `encode` for features, `__call__` for teacher-forced logits."""

  def __init__(self, config: WhisperConfig, rngs: nnx.Rngs):
    self.config = config
    self.encoder = WhisperEncoder(config, rngs)
    self.decoder = WhisperDecoder(config, rngs)

  def encode(self, mel: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`[batch, n_mels, mel_frames]` → last_hidden_state `[batch, frames, dim]`, hidden_states
    `[layers, batch, frames, dim]` (see `WhisperEncoder`)."""
    return self.encoder(mel)

  def __call__(self, mel: jax.Array, input_ids: jax.Array) -> jax.Array:
    """Logits `[batch, len, vocab]` for `input_ids` `[batch, len]` given `mel` `[batch, n_mels, mel_frames]`."""
    encoded, _ = self.encoder(mel)
    return self.decoder(input_ids, self.decoder.cross_kv(encoded))[0]

  def init_cache(self, batch: int, max_len: int | None = None) -> KVCache:
    """An empty decoder cache; see `WhisperDecoder.init_cache`."""
    return self.decoder.init_cache(batch, max_len)

  # The decoding engine's protocol (`ltu_jax.generate`): the encoder runs once, in the prefill.
  def prefill(self, mel, input_ids, attention_mask, cache):
    """`mel` `[batch, n_mels, frames]`; returns (logits, cache, the cross-attention keys and values)."""
    cross_kv = self.decoder.cross_kv(self.encoder(mel)[0])
    logits, cache = self.decoder(input_ids, cross_kv, cache, attention_mask)
    return logits, cache, cross_kv

  def decode_step(self, cross_kv, input_ids, cache):
    return self.decoder(input_ids, cross_kv, cache)
