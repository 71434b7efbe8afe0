"""Hugging Face LLaMA-family checkpoints (Vicuna, LLaMA-2/3, SmolLM2) and peft LoRA adapters."""

from __future__ import annotations

from typing import Any, Iterable

import jax
import numpy as np
from flax import nnx

from conversion import rules
from conversion.rules import Rule, transpose
from ltu_jax.models.llama import Llama, LlamaConfig, RopeScaling
from ltu_jax.models.lora import LoRAConfig, LoRAParam

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


def config_from_hf(hf: Any, lora: LoRAConfig | None = None, **overrides: Any) -> LlamaConfig:
  """Our config from a transformers `LlamaConfig` (or its dict), transformers 4 or 5 layout."""
  hf = hf if isinstance(hf, dict) else hf.to_dict()
  rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
  theta = hf.get("rope_theta") or rope.get("rope_theta") or 10000.0
  kind = rope.get("rope_type", rope.get("type", "default"))
  scaling = None
  if kind != "default":
    scaling = RopeScaling(
      kind=kind,
      factor=rope["factor"],
      **{k: rope[k] for k in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings") if k in rope},
    )
  for flag in ("attention_bias", "mlp_bias"):
    if hf.get(flag):
      raise ValueError(f"LLaMA config has {flag}=True, which ltu-jax does not support")
  return LlamaConfig(
    vocab_size=hf["vocab_size"],
    hidden_size=hf["hidden_size"],
    intermediate_size=hf["intermediate_size"],
    num_layers=hf["num_hidden_layers"],
    num_heads=hf["num_attention_heads"],
    num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
    head_dim=hf.get("head_dim"),
    rms_norm_eps=hf["rms_norm_eps"],
    rope_theta=float(theta),
    rope_scaling=scaling,
    max_position_embeddings=hf.get("max_position_embeddings", 2048),
    tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
    lora=lora,
    **overrides,
  )


def llama_rules(config: LlamaConfig, prefix: str = "", lora_prefix: str | None = None) -> tuple[Rule, ...]:
  """Rules for a `LlamaForCausalLM` state dict whose keys start with `prefix` (peft: "base_model.model.").

  Adapters are looked up under `lora_prefix` (default `prefix`): LTU-AS keeps them in its release
  file while the base weights come from a Hugging Face folder.
  LoRA adapters use peft's names (`q_proj.lora_A.weight`, `[rank, in]`); peft's
  `base_layer.` segment and adapter name `.default.` are removed by `normalize_peft_key` first.
  """
  layer = f"{prefix}model.layers.{{layer}}."
  lora_layer = f"{prefix if lora_prefix is None else lora_prefix}model.layers.{{layer}}."
  table = [
    Rule(f"{prefix}model.embed_tokens.weight", "embed_tokens.embedding"),
    Rule(f"{prefix}model.norm.weight", "norm.scale"),
    Rule(layer + "input_layernorm.weight", "layers.input_layernorm.scale"),
    Rule(layer + "post_attention_layernorm.weight", "layers.post_attention_layernorm.scale"),
    Rule(f"{prefix}lm_head.weight", None if config.tie_word_embeddings else "lm_head.kernel", transpose),
  ]
  for block, names in (("self_attn", ATTENTION), ("mlp", MLP)):
    for name in names:
      table.append(Rule(f"{layer}{block}.{name}.weight", f"layers.{block}.{name}.base.kernel", transpose))
      if config.lora is not None and name in config.lora.targets:
        table.append(Rule(f"{lora_layer}{block}.{name}.lora_A.weight", f"layers.{block}.{name}.lora_a", transpose))
        table.append(Rule(f"{lora_layer}{block}.{name}.lora_B.weight", f"layers.{block}.{name}.lora_b", transpose))
  return tuple(table)


def normalize_peft_key(key: str) -> str:
  """peft ≥ 0.4 wraps targeted layers (`q_proj.base_layer.weight`) and names adapters (`lora_A.default.`)."""
  return key.replace(".base_layer.", ".").replace(".default.", ".")


def load_llama(
  config: LlamaConfig,
  tensors: Iterable[tuple[str, np.ndarray]],
  *,
  prefix: str = "",
  source: str = "checkpoint",
  fresh_lora: bool = False,
  seed: int = 0,
) -> Llama:
  """Builds our model from `(key, array)` pairs; `fresh_lora` keeps newly initialised adapters."""
  graphdef, state = nnx.split(nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(seed))))
  keep = lambda path: False
  if fresh_lora:
    # Jitted so that only the adapters are computed: the base weights come from the checkpoint.
    adapters = jax.jit(lambda: nnx.state(Llama(config, rngs=nnx.Rngs(seed)), LoRAParam))()
    state = nnx.merge_state(state, adapters)
    keep = {rules.path_str(path) for path, _ in nnx.to_flat_state(adapters)}.__contains__
  tensors = ((normalize_peft_key(k), v) for k, v in tensors)
  return nnx.merge(graphdef, rules.load(tensors, llama_rules(config, prefix), state, source=source, keep=keep))
