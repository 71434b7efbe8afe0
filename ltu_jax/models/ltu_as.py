"""LTU-AS: TLTR audio tokens placed before the prompt of a LLaMA-family LLM with LoRA.

The sequence is `[audio tokens] <s> prompt with transcript … answer`: the N audio tokens take rotary
positions 0..N-1 and the text continues from N. Padding (left or right) is masked and skipped by the
positions, so a padded row gives the same logits on its real tokens as the row alone. Logits and loss
cover the text positions only, as in the original.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from ltu_jax.models import layers
from ltu_jax.models.layers import KVCache
from ltu_jax.models.llama import Llama, LlamaConfig
from ltu_jax.models.tltr import TLTR, TLTRConfig


@dataclasses.dataclass(frozen=True)
class LtuAsConfig:
  llm: LlamaConfig
  tltr: TLTRConfig
  feature_layers: int = 32  # Whisper encoder blocks whose outputs TLTR reads
  audio_tokens: int = 25  # time steps of the pooled features, one audio token each


class LtuAs(nnx.Module):
  def __init__(self, config: LtuAsConfig, *, rngs: nnx.Rngs):
    self.config = config
    self.audio_encoder = TLTR(config.tltr, rngs=rngs)
    # LayerNorm without parameters, then Linear(whisper width → LLM width): `audio_proj.1` in the release.
    self.audio_norm = layers.layer_norm(
      config.tltr.dim, eps=1e-5, affine=False, param_dtype=config.tltr.param_dtype, rngs=rngs
    )
    self.audio_proj = layers.linear(
      config.tltr.dim, config.llm.hidden_size, "audio_embed", "embed", bias=True,
      dtype=config.llm.dtype, param_dtype=config.llm.param_dtype, rngs=rngs,
    )
    self.llm = Llama(config.llm, rngs=rngs)

  def audio_embeddings(self, features: jax.Array) -> jax.Array:
    """Whisper features `[batch, layers, time, whisper_dim]` → audio tokens `[batch, time, embed]`."""
    expected = (self.config.feature_layers, self.config.audio_tokens, self.config.tltr.dim)
    if features.shape[1:] != expected:
      raise ValueError(f"audio features have shape {features.shape[1:]} per clip, expected {expected}")
    return self.audio_proj(self.audio_norm(self.audio_encoder(features)))

  def __call__(
    self,
    features: jax.Array | None,
    input_ids: jax.Array,
    attention_mask: jax.Array | None = None,
    cache: KVCache | None = None,
    dropout_key: jax.Array | None = None,
  ) -> tuple[jax.Array, KVCache | None]:
    """Text logits for audio features and token ids.

    Args:
      features: `[batch, layers, time, whisper_dim]`, or None for text only (the original's
        `asr_only` mode, and every decoding step after the first, when the audio is in the cache).
      input_ids: `[batch, len]` text tokens (BOS first).
      attention_mask: `[batch, len]`, 0 on padding.
      cache: earlier keys and values; new audio and text are appended to it.
      dropout_key: enables LoRA dropout (training).
    Returns:
      (float32 logits `[batch, len, vocab]` for the text positions, the updated cache or None).
    """
    if attention_mask is None:
      attention_mask = jnp.ones(input_ids.shape, jnp.int32)
    embeds = self.llm.embed_tokens(input_ids)
    mask = attention_mask
    num_audio = 0
    if features is not None:
      audio = self.audio_embeddings(features).astype(embeds.dtype)
      num_audio = audio.shape[1]
      embeds = jnp.concatenate([audio, embeds], axis=1)
      mask = jnp.concatenate([jnp.ones(audio.shape[:2], attention_mask.dtype), attention_mask], axis=1)
    past = 0 if cache is None else jnp.sum(cache.valid, axis=-1, keepdims=True)
    positions = past + layers.sequence_positions(mask)
    hidden, cache = self.llm.hidden(embeds, mask, positions, cache, dropout_key)
    return self.llm.logits(hidden[:, num_audio:]), cache


def text_loss_mask(attention_mask: jax.Array, prompt_lengths: jax.Array | None, train_on_inputs: bool) -> jax.Array:
  """Which text tokens are loss targets `[batch, len]`.

  Every real token, as the original trains (`train_on_inputs=True`); or only the answer: tokens whose
  index among the row's real tokens is at least its prompt length (BOS and prompt excluded).
  """
  if train_on_inputs:
    return attention_mask.astype(bool)
  index = jnp.cumsum(attention_mask, axis=-1) - 1
  return attention_mask.astype(bool) & (index >= prompt_lengths[:, None])


def lm_loss(logits: jax.Array, input_ids: jax.Array, loss_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Mean next-token cross entropy over the masked targets.

  Args:
    logits: `[batch, len, vocab]` text logits.
    input_ids: `[batch, len]`.
    loss_mask: `[batch, len]`, True where a token is a target (see `text_loss_mask`).
  Returns:
    (mean loss, number of target tokens).
  """
  targets = input_ids[:, 1:]
  weights = loss_mask[:, 1:].astype(jnp.float32)
  losses = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1].astype(jnp.float32), targets)
  count = weights.sum()
  return (losses * weights).sum() / jnp.maximum(count, 1.0), count
