"""LTU: CAV-MAE audio tokens placed before the prompt of a LLaMA-family LLM with LoRA (facts §2).

A window of fbank `[1024, 128]` → CAV-MAE's audio branch `[8 × 64 patches, dim]` → the mean over the 8
frequency patches → time pooled by 2 → divided by 50 (the original's "hard norm") → LayerNorm without
parameters → Linear to the LLM width: 32 audio tokens, at rotary positions 0..31 before BOS, as LTU-AS's
(`ltu_jax.models.ltu_as.AudioPrefixLlm`: sequence, masks, logits on text only, the engine's protocol).
A clip longer than 10.24 s fills several windows (`ltu_jax.frontend.LtuFbankWindows`), 32 tokens each,
in order; the encoder reads each window alone.
"""

from __future__ import annotations

import dataclasses

import jax
from flax import nnx

from ltu_jax.models.cav_mae import CavMaeAudio, CavMaeConfig
from ltu_jax.models.llama import LlamaConfig
from ltu_jax.models.ltu_as import AudioPrefixLlm

TIME_POOL = 2  # encoder time patches averaged into one audio token
HARD_NORM = 50.0  # the original divides the pooled patches by this before the projection


@dataclasses.dataclass(frozen=True)
class LtuConfig:
  llm: LlamaConfig
  encoder: CavMaeConfig
  max_windows: int = 1  # 10.24 s windows a clip may fill (what the model was trained with; the release: 1)

  @property
  def audio_tokens(self) -> int:
    """Audio tokens of one window (the release: 64 time patches / 2 = 32)."""
    return self.encoder.time_patches // TIME_POOL

  @property
  def feature_shape(self) -> tuple[int, int, int]:
    """One window's cached input `(1, frames, mel_bins)`: the fbank, as `data.FeatureStore` holds features."""
    return (1, self.encoder.frames, self.encoder.mel_bins)


class Ltu(AudioPrefixLlm):
  def __init__(self, config: LtuConfig, *, rngs: nnx.Rngs):
    self.config = config
    self.audio_encoder = CavMaeAudio(config.encoder, rngs=rngs)
    self.init_projection_and_llm(config.encoder.dim, config.encoder.param_dtype, config.llm, rngs)

  def encoder_tokens(self, fbank: jax.Array) -> jax.Array:
    """Windows of fbank `[n, 1024, 128]` → pooled, scaled encoder outputs `[n, audio_tokens, dim]` (what the
    projection reads)."""
    e = self.config.encoder
    encoded = self.audio_encoder(fbank)
    per_freq = encoded.reshape(encoded.shape[0], e.freq_patches, e.time_patches, e.dim).mean(axis=1)
    pooled = per_freq.reshape(encoded.shape[0], self.config.audio_tokens, TIME_POOL, e.dim).mean(axis=2)
    return pooled / HARD_NORM

  def audio_embeddings(self, features: jax.Array) -> jax.Array:
    """fbank `[batch, 1, windows * 1024, 128]` (or `[batch, windows * 1024, 128]`) → audio tokens
    `[batch, windows * 32, embed]`."""
    e = self.config.encoder
    fbank = features.reshape(features.shape[0], -1, features.shape[-1]) if features.ndim == 4 else features
    batch, time, bins = fbank.shape
    if (features.ndim == 4 and features.shape[1] != 1) or bins != e.mel_bins or time % e.frames or not time:
      raise ValueError(
        f"audio input has shape {features.shape[1:]} per clip, expected (1, a multiple of {e.frames}, {e.mel_bins})"
      )
    windows = time // e.frames
    tokens = self.encoder_tokens(fbank.reshape(batch * windows, e.frames, bins))
    return self.audio_proj(self.audio_norm(tokens.reshape(batch, windows * self.config.audio_tokens, e.dim)))

  def audio_token_mask(self, audio_mask: jax.Array) -> jax.Array:
    """A mask over fbank frames `[batch, windows * 1024]` (whole windows) → over tokens `[batch, windows * 32]`."""
    return audio_mask[:, :: self.config.encoder.frames // self.config.audio_tokens]

  def audio_token_count(self, time: int) -> int:
    return time // self.config.encoder.frames * self.config.audio_tokens
