"""LTU-AS: TLTR audio tokens placed before the prompt of a LLaMA-family LLM with LoRA.

The sequence is `[audio tokens] <s> prompt with transcript … answer`: the N audio tokens take rotary
positions 0..N-1 and the text continues from N. A clip longer than 10 s fills several windows of 25 tokens,
in order (`ltu_jax.frontend.LtuAsWindows`); TLTR reads each window alone. Padding (left or right, text or
unused audio windows) is masked and skipped by the positions, so a padded row gives the same logits on its
real tokens as the row alone. Logits and loss cover the text positions only, as in the original.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from ltu_jax.models import layers
from ltu_jax.models.layers import KVCache
from ltu_jax.models.llama import Decoding, Llama, LlamaConfig, continued_positions
from ltu_jax.models.tltr import TLTR, TLTRConfig


@dataclasses.dataclass(frozen=True)
class LtuAsConfig:
  llm: LlamaConfig
  tltr: TLTRConfig
  feature_layers: int = 32  # Whisper encoder blocks whose outputs TLTR reads
  audio_tokens: int = 25  # time steps of one window's pooled features, one audio token each
  max_windows: int = 1  # 10 s windows a clip may fill (what the model was trained with; the release: 1)
  n_mels: int = 80  # mel bins of the Whisper whose features it reads

  @property
  def feature_shape(self) -> tuple[int, int, int]:
    """One window's cached features `(layers, time, dim)` (`data.FeatureStore`)."""
    return (self.feature_layers, self.audio_tokens, self.tltr.dim)


class AudioPrefixLlm(nnx.Module):
  """An LLM (`self.llm`) whose text follows a clip's audio tokens: LTU-AS and LTU. A subclass makes the
  tokens (`audio_embeddings`) and says which are real (`audio_token_mask`); the sequence, positions,
  masking, text-only logits and the decoding engine's protocol are this class's."""

  llm: Llama

  def init_projection_and_llm(self, audio_dim: int, audio_param_dtype: str, llm: LlamaConfig, rngs: nnx.Rngs) -> None:
    """`audio_proj` of the releases: a LayerNorm without parameters (index 0), then Linear(audio_dim → LLM
    width) (index 1); and the LLM."""
    self.audio_norm = layers.layer_norm(audio_dim, eps=1e-5, affine=False, param_dtype=audio_param_dtype, rngs=rngs)
    self.audio_proj = layers.linear(
      audio_dim, llm.hidden_size, "audio_embed", "embed", bias=True, dtype=llm.dtype, param_dtype=llm.param_dtype,
      rngs=rngs,
    )
    self.llm = Llama(llm, rngs=rngs)

  def audio_embeddings(self, features: jax.Array) -> jax.Array:
    """A batch's audio input → audio tokens `[batch, tokens, embed]`."""
    raise NotImplementedError

  def audio_token_mask(self, audio_mask: jax.Array) -> jax.Array:
    """The mask over the audio input's time steps (what batching pads) → the mask over its tokens."""
    return audio_mask

  def __call__(
    self,
    features: jax.Array | None,
    input_ids: jax.Array,
    attention_mask: jax.Array | None = None,
    cache: KVCache | None = None,
    dropout_key: jax.Array | None = None,
    audio_mask: jax.Array | None = None,
  ) -> tuple[jax.Array, KVCache | None]:
    """Text logits for audio features and token ids.

    Args:
      features: the audio input (LTU-AS: Whisper features `[batch, layers, windows * 25, whisper_dim]`;
        LTU: fbank `[batch, 1, windows * 1024, 128]`), or None for text only (the original's `asr_only`
        mode, and every decoding step after the first, when the audio is in the cache).
      input_ids: `[batch, len]` text tokens (BOS first).
      attention_mask: `[batch, len]`, 0 on padding.
      cache: earlier keys and values; new audio and text are appended to it.
      dropout_key: enables LoRA dropout (training).
      audio_mask: `[batch, time]` over the features' time axis, 0 on the windows a shorter clip does not
        fill; all ones when None.
    Returns:
      (float32 logits `[batch, len, vocab]` for the text positions, the updated cache or None).
    """
    if attention_mask is None:
      attention_mask = jnp.ones(input_ids.shape, jnp.int32)
    embeds, mask = self.prompt_embeddings((features, audio_mask), input_ids, attention_mask)
    hidden, cache = self.llm.hidden(embeds, mask, continued_positions(mask, cache), cache, dropout_key)
    return self.llm.logits(hidden[:, embeds.shape[1] - input_ids.shape[1]:]), cache

  def prompt_embeddings(self, audio, input_ids: jax.Array, attention_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The LLM's input: (the audio tokens then the text's embeddings `[batch, audio tokens + len, embed]`, their
    mask `[batch, audio tokens + len]`). `audio`: features, `(features, audio_mask)` or None (text only)."""
    features, audio_mask = audio if isinstance(audio, tuple) else (audio, None)
    embeds = self.llm.embed_tokens(input_ids)
    if features is None:
      return embeds, attention_mask
    audio = self.audio_embeddings(features).astype(embeds.dtype)
    token_mask = jnp.ones(audio.shape[:2], attention_mask.dtype)
    if audio_mask is not None:
      token_mask = self.audio_token_mask(audio_mask).astype(attention_mask.dtype)
    return jnp.concatenate([audio, embeds], axis=1), jnp.concatenate([token_mask, attention_mask], axis=1)

  # The decoding engine's protocol (`ltu_jax.generate`): the audio goes in with the prompt, then text only.
  def init_cache(self, batch: int, max_len: int) -> KVCache:
    return self.llm.init_cache(batch, max_len)

  def context_tokens(self, audio) -> int:
    """Cache slots the audio takes: its tokens."""
    features = audio[0] if isinstance(audio, tuple) else audio
    return self.audio_token_count(features.shape[2])

  def audio_token_count(self, time: int) -> int:
    """Audio tokens of features with `time` steps."""
    return time

  def prefill(self, audio, input_ids, attention_mask, cache):
    """`audio`: features, `(features, audio_mask)` or None (text only); returns (logits, cache, None)."""
    features, audio_mask = audio if isinstance(audio, tuple) else (audio, None)
    logits, cache = self(features, input_ids, attention_mask, cache, audio_mask=audio_mask)
    return logits, cache, None

  def decode_step(self, context, input_ids, cache):
    del context
    return self(None, input_ids, jnp.ones_like(input_ids), cache)

  def for_decoding(self) -> Decoding:
    """This model with its LLM in the decoding layout: the audio tokens and the prompt, then each step, run
    through it."""
    return Decoding(self, self.llm)


class LtuAs(AudioPrefixLlm):
  def __init__(self, config: LtuAsConfig, *, rngs: nnx.Rngs):
    self.config = config
    self.audio_encoder = TLTR(config.tltr, rngs=rngs)
    self.init_projection_and_llm(config.tltr.dim, config.tltr.param_dtype, config.llm, rngs)

  def audio_embeddings(self, features: jax.Array) -> jax.Array:
    """Whisper features `[batch, layers, windows * audio_tokens, whisper_dim]` → audio tokens
    `[batch, windows * audio_tokens, embed]`; TLTR runs on each window alone."""
    c = self.config
    batch, num_layers, time, dim = features.shape
    if (num_layers, dim) != (c.feature_layers, c.tltr.dim) or time % c.audio_tokens or not time:
      raise ValueError(
        f"audio features have shape {features.shape[1:]} per clip, expected "
        f"({c.feature_layers}, a multiple of {c.audio_tokens}, {c.tltr.dim})"
      )
    windows = time // c.audio_tokens
    per_window = features.reshape(batch, num_layers, windows, c.audio_tokens, dim).swapaxes(1, 2)
    encoded = self.audio_encoder(per_window.reshape(batch * windows, num_layers, c.audio_tokens, dim))
    return self.audio_proj(self.audio_norm(encoded.reshape(batch, time, dim)))


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
  # Position t predicts token t + 1. The last position has no target: it gets weight 0 (and a stand-in
  # label) rather than being sliced off, since `logits[:, :-1]` copies the whole `[batch, len - 1, vocab]`
  # (50 MB for a tiny training micro-batch) while the loss reads the logits where they are.
  targets = jnp.concatenate([input_ids[:, 1:], input_ids[:, -1:]], axis=1)
  weights = jnp.concatenate([loss_mask[:, 1:], jnp.zeros_like(loss_mask[:, :1])], axis=1).astype(jnp.float32)
  losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
  count = weights.sum()
  return (losses * weights).sum() / jnp.maximum(count, 1.0), count
