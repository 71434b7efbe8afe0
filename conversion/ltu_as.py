"""LTU-AS checkpoints: the release `.bin` (LoRA + TLTR + audio projection under peft names) over a
LLaMA-family base model, and the way back."""

from __future__ import annotations

from typing import Iterable

import jax
import numpy as np
from flax import nnx

from conversion import rules
from conversion.hf_llama import llama_rules, normalize_peft_key
from conversion.openai_whisper import residual_block_rules
from conversion.rules import Rule, linear_rules
from ltu_jax.models.ltu_as import LtuAs, LtuAsConfig

RELEASE_PREFIX = "base_model.model."  # PeftModelForCausalLM → LoraModel → LlamaForCausalLM


def audio_rules(prefix: str = RELEASE_PREFIX) -> tuple[Rule, ...]:
  """TLTR (`model.audio_encoder.{time_tr,layer_tr}`) and `model.audio_proj.1` (index 0 has no parameters)."""
  table: list[Rule] = []
  for block in ("time_tr", "layer_tr"):
    table += residual_block_rules(f"{prefix}model.audio_encoder.{block}", f"audio_encoder.{block}")
  table += linear_rules(f"{prefix}model.audio_proj.1", "audio_proj")
  return tuple(table)


def ltu_as_rules(config: LtuAsConfig, prefix: str = RELEASE_PREFIX, llm_prefix: str = RELEASE_PREFIX) -> tuple[Rule, ...]:
  """The whole composite: LLM keys under `llm_prefix` ("" for a plain HF folder), the rest under `prefix`."""
  llm = llama_rules(config.llm, llm_prefix, lora_prefix=prefix)
  return rules.nested(llm, "llm.") + audio_rules(prefix)


def load_ltu_as(
  config: LtuAsConfig,
  tensors: Iterable[tuple[str, np.ndarray]],
  *,
  prefix: str = RELEASE_PREFIX,
  llm_prefix: str = RELEASE_PREFIX,
  source: str = "checkpoint",
) -> LtuAs:
  """Builds LTU-AS from `(key, array)` pairs holding every parameter (base LLM, LoRA, TLTR, projection)."""
  graphdef, state = nnx.split(nnx.eval_shape(lambda: LtuAs(config, rngs=nnx.Rngs(0))))
  tensors = ((normalize_peft_key(k), v) for k, v in tensors)
  return nnx.merge(graphdef, rules.load(tensors, ltu_as_rules(config, prefix, llm_prefix), state, source=source))
