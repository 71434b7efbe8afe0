"""Hugging Face Whisper (`WhisperForConditionalGeneration` / `WhisperModel`) → `ltu_jax.models.whisper.Whisper`.

Our attribute names mirror HF's, so each rule maps a key onto the same dotted path without the `model.`
prefix; Linear weights are transposed, Conv1d weights `[out, in, k]` become Flax kernels `[k, in, out]`.
"""

from __future__ import annotations

import itertools
import json
import os
from typing import Any, Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from conversion import sources
from conversion.rules import Rule, layer_norm_rules, linear_rules, load
from ltu_jax.models.whisper import Whisper, WhisperConfig


def conv_kernel(array: np.ndarray) -> np.ndarray:
  """PyTorch Conv1d `[out, in, k]` → Flax Conv kernel `[k, in, out]`."""
  return np.ascontiguousarray(array.transpose(2, 1, 0))


# Fields that HF's WhisperConfig names as we do (its LayerNorms use PyTorch's default eps 1e-5).
_HF_FIELDS = (
  "num_mel_bins",
  "d_model",
  "encoder_layers",
  "encoder_attention_heads",
  "encoder_ffn_dim",
  "decoder_layers",
  "decoder_attention_heads",
  "decoder_ffn_dim",
  "vocab_size",
  "max_source_positions",
  "max_target_positions",
)


def config_from_hf(hf_config: Any) -> WhisperConfig:
  """Our config from a transformers `WhisperConfig` or its `to_dict()`."""
  c = hf_config if isinstance(hf_config, dict) else hf_config.to_dict()
  # Every released Whisper uses exact GELU and unscaled embeddings; anything else would load silently wrong.
  if c.get("activation_function", "gelu") != "gelu" or c.get("scale_embedding", False):
    raise ValueError("only activation_function='gelu' and scale_embedding=False are supported")
  return WhisperConfig(**{name: c[name] for name in _HF_FIELDS})


def _attention(source: str, target: str) -> Iterator[Rule]:
  for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
    # Whisper's key projection has no bias.
    yield from linear_rules(f"{source}.{proj}", f"{target}.{proj}", bias=proj != "k_proj")


def rules(prefix: str = "model.") -> tuple[Rule, ...]:
  """The table for a state dict whose encoder/decoder keys start with `prefix` ("" for a bare `WhisperModel`)."""
  table: list[Rule] = []
  for side in ("encoder", "decoder"):
    src, block = f"{prefix}{side}", f"{prefix}{side}.layers.{{layer}}"
    table.append(Rule(f"{src}.embed_positions.weight", f"{side}.embed_positions"))
    table += layer_norm_rules(f"{src}.layer_norm", f"{side}.layer_norm")
    attentions = ("self_attn",) if side == "encoder" else ("self_attn", "encoder_attn")
    for name in attentions:
      table += _attention(f"{block}.{name}", f"{side}.layers.{name}")
      table += layer_norm_rules(f"{block}.{name}_layer_norm", f"{side}.layers.{name}_layer_norm")
    for name in ("fc1", "fc2"):
      table += linear_rules(f"{block}.{name}", f"{side}.layers.{name}")
    table += layer_norm_rules(f"{block}.final_layer_norm", f"{side}.layers.final_layer_norm")
  for name in ("conv1", "conv2"):
    table += [
      Rule(f"{prefix}encoder.{name}.weight", f"encoder.{name}.kernel", conv_kernel),
      Rule(f"{prefix}encoder.{name}.bias", f"encoder.{name}.bias"),
    ]
  table.append(Rule(f"{prefix}decoder.embed_tokens.weight", "decoder.embed_tokens.embedding"))
  return tuple(table)


# `proj_out` is tied to the token embedding: our logits use `embed_tokens.attend`.
RULES: tuple[Rule, ...] = rules("model.") + (Rule("proj_out.weight", None),)


def load_whisper(
  tensors: Iterable[tuple[str, np.ndarray]],
  config: WhisperConfig,
  table: Iterable[Rule] = RULES,
  *,
  source: str = "checkpoint",
) -> Whisper:
  """A `Whisper` filled from `(key, array)` pairs, without ever materialising random weights."""
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Whisper(config, nnx.Rngs(0))))
  state = load(tensors, table, abstract, source=source)
  return nnx.merge(graphdef, jax.tree.map(jnp.asarray, state))


def from_torch(hf_model: Any) -> Whisper:
  """Converts a transformers `WhisperForConditionalGeneration` or bare `WhisperModel` (PyTorch)."""
  table = RULES if hasattr(hf_model, "proj_out") else rules("")
  tensors = ((key, tensor.detach().float().numpy()) for key, tensor in hf_model.state_dict().items())
  return load_whisper(tensors, config_from_hf(hf_model.config), table, source=type(hf_model).__name__)


def read_folder(folder: str | os.PathLike) -> tuple[WhisperConfig, sources.Tensors, tuple[Rule, ...]]:
  """The config, tensors and table of a `save_pretrained` folder of a `WhisperForConditionalGeneration`
  or bare `WhisperModel` (told apart by the first key's `model.` prefix)."""
  import transformers  # slow to import: only where a Hugging Face folder is read

  tensors = sources.iter_hf_folder(folder)
  config = config_from_hf(transformers.WhisperConfig.from_pretrained(folder))
  first = next(tensors, None)
  if first is None:
    raise ValueError(f"{folder} holds no tensors")
  table = RULES if first[0].startswith("model.") else rules("")
  return config, itertools.chain([first], tensors), table


def read_settings(folder: str | os.PathLike) -> dict[str, Any]:
  """Generation settings (`suppress_tokens`, `begin_suppress_tokens`, ...): `config.json` overridden by
  `generation_config.json`, where older and newer transformers keep them."""
  settings: dict[str, Any] = {}
  for name in ("config.json", "generation_config.json"):
    path = os.path.join(folder, name)
    if os.path.isfile(path):
      with open(path) as f:
        settings.update(json.load(f))
  return settings
