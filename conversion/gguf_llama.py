"""llama.cpp `.gguf` files of the LLaMA family (SmolLM2, LLaMA-2/3, Vicuna quantisations), dequantised.

Tensors are read one at a time from the memory-mapped file and dequantised to float32 in the Hugging Face
`[out, in]` layout; llama.cpp's interleaved rotary row order of Q and K is undone by the rule transforms.
The config and special tokens come from the file's metadata, the tokenizer from transformers' GGUF reader.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Iterator

import gguf
import numpy as np

from conversion.hf_llama import ATTENTION, MLP, LlamaCheckpoint
from conversion.rules import Rule, transpose
from ltu_jax.models.llama import LlamaConfig, RopeScaling
from ltu_jax.models.lora import LoRAConfig

ARCHITECTURE = "llama"
GGUF_NAMES = {  # our projection → llama.cpp's tensor name in block N
  "q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
  "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down",
}


def metadata(reader: gguf.GGUFReader, key: str, default: Any = None) -> Any:
  """A metadata value (a number, a string, or a list for arrays), or `default` when the file lacks it."""
  field = reader.fields.get(key)
  return default if field is None else field.contents()


def config_from_gguf(reader: gguf.GGUFReader, lora: LoRAConfig | None = None, **overrides: Any) -> LlamaConfig:
  """Our config from the `llama.*` metadata; the output layer is tied iff the file has no `output.weight`."""
  architecture = metadata(reader, "general.architecture")
  if architecture != ARCHITECTURE:
    raise ValueError(f"GGUF architecture is {architecture!r}; only {ARCHITECTURE!r} files are supported")

  def value(key: str, default: Any = None) -> Any:
    found = metadata(reader, f"{ARCHITECTURE}.{key}", default)
    if found is None:
      raise ValueError(f"GGUF metadata {ARCHITECTURE}.{key} is missing")
    return found

  names = {t.name: t for t in reader.tensors}
  if "rope_freqs.weight" in names:
    raise ValueError("GGUF file holds rope_freqs.weight (LLaMA 3.1 by-band RoPE factors), which is not supported")
  hidden, heads = value("embedding_length"), value("attention.head_count")
  head_dim = value("attention.key_length", value("rope.dimension_count", hidden // heads))
  if value("rope.dimension_count", head_dim) != head_dim:
    raise ValueError("GGUF rope.dimension_count differs from the head size: partial rotary is not supported")
  tokens = reader.fields.get("tokenizer.ggml.tokens")
  vocab = value("vocab_size", len(tokens.data) if tokens is not None else int(names["token_embd.weight"].shape[1]))
  return LlamaConfig(
    vocab_size=vocab,
    hidden_size=hidden,
    intermediate_size=value("feed_forward_length"),
    num_layers=value("block_count"),
    num_heads=heads,
    num_kv_heads=value("attention.head_count_kv", heads),
    head_dim=head_dim,
    rms_norm_eps=value("attention.layer_norm_rms_epsilon"),
    rope_theta=float(value("rope.freq_base", 10000.0)),
    rope_scaling=rope_scaling(reader),
    max_position_embeddings=value("context_length", 2048),
    tie_word_embeddings="output.weight" not in names,
    lora=lora,
    **overrides,
  )


def rope_scaling(reader: gguf.GGUFReader) -> RopeScaling | None:
  kind = metadata(reader, f"{ARCHITECTURE}.rope.scaling.type", "none")
  if kind == "none":
    return None
  if kind != "linear":
    raise ValueError(f"GGUF rope scaling {kind!r} is not supported; expected 'linear' or none")
  return RopeScaling(kind="linear", factor=float(metadata(reader, f"{ARCHITECTURE}.rope.scaling.factor")))


def special_tokens(reader: gguf.GGUFReader) -> dict[str, Any]:
  """`extra` entries of the model folder: bos/pad ids and the list of eos ids."""
  eos = metadata(reader, "tokenizer.ggml.eos_token_id")
  return {
    "bos_token_id": metadata(reader, "tokenizer.ggml.bos_token_id"),
    "eos_token_ids": [] if eos is None else [eos],
    "pad_token_id": metadata(reader, "tokenizer.ggml.padding_token_id"),
  }


def unpermute_rotary(num_heads: int) -> Callable[[np.ndarray], np.ndarray]:
  """llama.cpp's Q/K rows (the two halves of each head's rotary pairs interleaved) → HF order, then transposed."""

  def transform(weight: np.ndarray) -> np.ndarray:
    rows, cols = weight.shape
    if rows % (2 * num_heads):  # not this model's shape: left as is, so `rules.load` lists it as mis-shaped
      return transpose(weight)
    heads = weight.reshape(num_heads, rows // num_heads // 2, 2, cols)
    return transpose(heads.swapaxes(1, 2).reshape(rows, cols))

  return transform


def gguf_rules(config: LlamaConfig) -> tuple[Rule, ...]:
  """Rules from llama.cpp names (`token_embd.weight`, `blk.{layer}.attn_q.weight`, ...) onto our Llama."""
  block = "blk.{layer}."
  table = [
    Rule("token_embd.weight", "embed_tokens.embedding"),
    Rule("output_norm.weight", "norm.scale"),
    Rule(block + "attn_norm.weight", "layers.input_layernorm.scale"),
    Rule(block + "ffn_norm.weight", "layers.post_attention_layernorm.scale"),
    Rule("output.weight", None if config.tie_word_embeddings else "lm_head.kernel", transpose),
  ]
  rotary = {"q_proj": unpermute_rotary(config.num_heads), "k_proj": unpermute_rotary(config.num_kv_heads)}
  for module, names in (("self_attn", ATTENTION), ("mlp", MLP)):
    for name in names:
      transform = rotary.get(name, transpose)
      table.append(Rule(f"{block}{GGUF_NAMES[name]}.weight", f"layers.{module}.{name}.base.kernel", transform))
  return tuple(table)


def iter_gguf(reader: gguf.GGUFReader) -> Iterator[tuple[str, np.ndarray]]:
  """`(name, float32 array)` one tensor at a time, in the HF layout (GGUF shapes list the fastest axis first)."""
  for tensor in reader.tensors:
    shape = tuple(int(n) for n in reversed(tensor.shape))
    yield tensor.name, gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(shape)


def open_gguf(path: str | os.PathLike, lora: LoRAConfig | None = None, **overrides: Any) -> LlamaCheckpoint:
  """A `.gguf` file ready for `build_llama`; `overrides` set config fields (e.g. `param_dtype`)."""
  path = os.path.abspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"GGUF file not found: {path}")
  reader = gguf.GGUFReader(path)
  config = config_from_gguf(reader, lora, **overrides)
  return LlamaCheckpoint(
    config=config,
    table=gguf_rules(config),
    tensors=iter_gguf(reader),
    count=len(reader.tensors),
    special_tokens=special_tokens(reader),
    tokenizer_args={"pretrained_model_name_or_path": os.path.dirname(path), "gguf_file": os.path.basename(path)},
    source=path,
  )
