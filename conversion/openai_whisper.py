"""OpenAI Whisper names (`blocks.N.attn.query`, `mlp.0`, ...): openai-whisper `.pt` checkpoints, and TLTR's
blocks in the LTU-AS release and Whisper-AT, which use the same residual block.

An openai-whisper `.pt` is `{"dims": {...}, "model_state_dict": {...}}`; it loads with `weights_only=True`.
"""

from __future__ import annotations

import os
from typing import Any, Iterator

from conversion import sources
from conversion.hf_whisper import conv_kernel
from conversion.rules import Rule, layer_norm_rules, linear_rules
from ltu_jax.models.whisper import WhisperConfig


def attention_rules(source: str, target: str) -> Iterator[Rule]:
  """An OpenAI `MultiHeadAttention` onto our `whisper.Attention` (the key projection has no bias)."""
  for name, ours in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj"), ("out", "out_proj")):
    yield from linear_rules(f"{source}.{name}", f"{target}.{ours}", bias=name != "key")


def residual_block_rules(source: str, target: str) -> Iterator[Rule]:
  """An OpenAI `ResidualAttentionBlock` (self-attention only) onto our `whisper.EncoderLayer`."""
  yield from attention_rules(f"{source}.attn", f"{target}.self_attn")
  yield from layer_norm_rules(f"{source}.attn_ln", f"{target}.self_attn_layer_norm")
  yield from linear_rules(f"{source}.mlp.0", f"{target}.fc1")
  yield from linear_rules(f"{source}.mlp.2", f"{target}.fc2")
  yield from layer_norm_rules(f"{source}.mlp_ln", f"{target}.final_layer_norm")


def whisper_rules() -> tuple[Rule, ...]:
  """The table for openai-whisper's `Whisper.state_dict()` onto `ltu_jax.models.whisper.Whisper`."""
  table = [
    Rule("encoder.positional_embedding", "encoder.embed_positions"),
    Rule("decoder.positional_embedding", "decoder.embed_positions"),
    Rule("decoder.token_embedding.weight", "decoder.embed_tokens.embedding"),
    *residual_block_rules("encoder.blocks.{layer}", "encoder.layers"),
    *layer_norm_rules("encoder.ln_post", "encoder.layer_norm"),
    *residual_block_rules("decoder.blocks.{layer}", "decoder.layers"),
    *attention_rules("decoder.blocks.{layer}.cross_attn", "decoder.layers.encoder_attn"),
    *layer_norm_rules("decoder.blocks.{layer}.cross_attn_ln", "decoder.layers.encoder_attn_layer_norm"),
    *layer_norm_rules("decoder.ln", "decoder.layer_norm"),
  ]
  for conv in ("conv1", "conv2"):
    table += [
      Rule(f"encoder.{conv}.weight", f"encoder.{conv}.kernel", conv_kernel),
      Rule(f"encoder.{conv}.bias", f"encoder.{conv}.bias"),
    ]
  return tuple(table)


RULES = whisper_rules()


def config_from_dims(dims: dict[str, int]) -> WhisperConfig:
  """Our config from openai-whisper's `ModelDimensions` (as stored: a dict). Its MLPs are 4 × width."""
  if dims["n_audio_state"] != dims["n_text_state"]:
    raise ValueError(f"encoder width {dims['n_audio_state']} != decoder width {dims['n_text_state']}: not a Whisper")
  width = dims["n_audio_state"]
  return WhisperConfig(
    num_mel_bins=dims["n_mels"],
    d_model=width,
    encoder_layers=dims["n_audio_layer"],
    encoder_attention_heads=dims["n_audio_head"],
    encoder_ffn_dim=4 * width,
    decoder_layers=dims["n_text_layer"],
    decoder_attention_heads=dims["n_text_head"],
    decoder_ffn_dim=4 * width,
    vocab_size=dims["n_vocab"],
    max_source_positions=dims["n_audio_ctx"],
    max_target_positions=dims["n_text_ctx"],
  )


def read_checkpoint(path: str | os.PathLike) -> tuple[WhisperConfig, sources.Tensors]:
  """The config and tensors of an openai-whisper `.pt` (tensors memory-mapped, converted one at a time)."""
  checkpoint: Any = sources.read_torch_file(path)
  if not isinstance(checkpoint, dict) or not {"dims", "model_state_dict"} <= checkpoint.keys():
    found = sorted(checkpoint)[:10] if isinstance(checkpoint, dict) else type(checkpoint).__name__
    raise ValueError(
      f"{os.fspath(path)} is not an openai-whisper checkpoint: expected 'dims' and 'model_state_dict', found {found}"
    )
  return config_from_dims(checkpoint["dims"]), sources.iter_state_dict(checkpoint["model_state_dict"], path)
