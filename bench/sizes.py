"""The model sizes the benches build with random weights: the released LTU-AS (Vicuna-7B, TLTR at Whisper
large's width over its 32 layers, LoRA r8 on q and v), the released LTU (the same LLM, CAV-MAE's ViT-B audio branch), Whisper large-v1's encoder, and tiny stand-ins of the
same shapes' kinds that compile in seconds on a CPU (`--tiny`)."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from ltu_jax.models.llama import LlamaConfig
from ltu_jax.models.cav_mae import CavMaeConfig
from ltu_jax.models.lora import LoRAConfig
from ltu_jax.models.ltu import LtuConfig
from ltu_jax.models.ltu_as import LtuAsConfig
from ltu_jax.models.tltr import TLTRConfig
from ltu_jax.models.whisper import WhisperConfig

VICUNA_7B = LlamaConfig(
  vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32, num_kv_heads=32,
  rms_norm_eps=1e-6, tie_word_embeddings=False, lora=LoRAConfig(rank=8, alpha=16.0, dropout=0.05, targets=("q_proj", "v_proj")),
)
TINY_LLM = dataclasses.replace(VICUNA_7B, vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=4)

TINY_TLTR = TLTRConfig(dim=32, layer_heads=4, mlp_dim=64)

WHISPER_LARGE_V1 = WhisperConfig(
  num_mel_bins=80, d_model=1280, encoder_layers=32, encoder_attention_heads=20, encoder_ffn_dim=5120,
  decoder_layers=32, decoder_attention_heads=20, decoder_ffn_dim=5120, vocab_size=51865,
  max_source_positions=1500, max_target_positions=448,
)
TINY_WHISPER = dataclasses.replace(
  WHISPER_LARGE_V1, d_model=64, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=128, decoder_layers=1,
  decoder_attention_heads=4, decoder_ffn_dim=128, vocab_size=64, max_source_positions=100, max_target_positions=16,
)


def ltu_as(compute: str, remat: bool, tiny: bool = False, llm_param_dtype: str = "float32") -> LtuAsConfig:
  """LTU-AS 7B (or its tiny stand-in) computing in `compute`; the LLM stored in `llm_param_dtype` (the
  trainer keeps trainable weights as fp32 masters and casts the frozen ones to its `precision.frozen`)."""
  llm = TINY_LLM if tiny else VICUNA_7B
  return LtuAsConfig(
    llm=dataclasses.replace(llm, dtype=compute, remat=remat, param_dtype=llm_param_dtype),
    tltr=dataclasses.replace(TINY_TLTR if tiny else TLTRConfig(dim=1280, mlp_dim=5120), dtype=compute),
    feature_layers=3 if tiny else 32,
    audio_tokens=25,
  )


def ltu(compute: str, remat: bool, llm_param_dtype: str = "float32") -> LtuConfig:
  """LTU 7B (Vicuna-7B with LoRA, CAV-MAE's audio branch over one 10.24 s window); as `ltu_as`."""
  return LtuConfig(
    llm=dataclasses.replace(VICUNA_7B, dtype=compute, remat=remat, param_dtype=llm_param_dtype),
    encoder=CavMaeConfig(dtype=compute, remat=remat),
  )


def audio_batch(config: LtuAsConfig | LtuConfig, batch: int, text_len: int) -> dict[str, tuple[tuple[int, ...], jnp.dtype]]:
  """(shape, dtype) of each array of one accumulation step `[1, batch, ...]`, as `Trainer.device_batch` shapes it:
  the model's cached audio input (`feature_shape`, one window) for each of its windows."""
  layers, time, dim = config.feature_shape
  time *= config.max_windows
  return {
    "features": ((1, batch, layers, time, dim), jnp.float32),
    "audio_mask": ((1, batch, time), jnp.int32),
    "input_ids": ((1, batch, text_len), jnp.int32),
    "attention_mask": ((1, batch, text_len), jnp.int32),
    "loss_mask": ((1, batch, text_len), jnp.bool_),
  }
