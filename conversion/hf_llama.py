"""Hugging Face LLaMA-family checkpoints (Vicuna, LLaMA-2/3, SmolLM2) and peft LoRA adapters."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Iterable

import jax
import numpy as np
from flax import nnx

from conversion import rules, sources
from conversion.rules import Rule, transpose
from ltu_jax.models.llama import Llama, LlamaConfig, RopeScaling
from ltu_jax.models.lora import LoRAConfig, LoRAParam

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
SPECIAL_TOKENS = ("bos_token_id", "eos_token_id", "pad_token_id")
SENTENCEPIECE_MODEL = "tokenizer.model"  # LLaMA-1 / Vicuna-era folders ship only this
FAST_TOKENIZER = "tokenizer.json"
# Text that a tokenizer converted from sentencepiece must split exactly as sentencepiece does: LTU-AS's
# prompt layout (newlines, "###"), a leading and repeated spaces, digits, punctuation and accented letters.
SENTENCEPIECE_PROBE = (
  " ### Instruction:\nWhat can be inferred from the spoken text and sounds? Why?\n\n### Input:\n"
  "the  dog barked 3 times at 10:45, didn't it?\n\n### Response:\nA café—naïve, isn't it."
)


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
    Rule(layer + "self_attn.rotary_emb.inv_freq", None),  # a buffer that older transformers saved (Vicuna)
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
  allocate: Callable[[str, tuple[int, ...], np.dtype], np.ndarray] | None = None,
) -> Llama:
  """Builds our model from Hugging Face (or peft) `(key, array)` pairs; see `build_llama`."""
  tensors = ((normalize_peft_key(k), v) for k, v in tensors)
  return build_llama(config, tensors, llama_rules(config, prefix), source=source, fresh_lora=fresh_lora, seed=seed)


def build_llama(
  config: LlamaConfig,
  tensors: Iterable[tuple[str, np.ndarray]],
  table: Iterable[Rule],
  *,
  source: str = "checkpoint",
  strict: bool = True,
  fresh_lora: bool = False,
  seed: int = 0,
  allocate: Callable[[str, tuple[int, ...], np.dtype], np.ndarray] | None = None,
) -> Llama:
  """Builds our model from `(key, array)` pairs named as `table` says (any format).

  Weights are cast to `config.param_dtype` as they arrive; `fresh_lora` keeps newly initialised adapters
  (B = 0) for the LoRA targets of `config`; `strict=False` ignores keys that no rule maps; `allocate`
  makes the target arrays (see `rules.load`).
  """
  graphdef, state = nnx.split(nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(seed))))
  keep = lambda path: False
  if fresh_lora:
    # Jitted so that only the adapters are computed: the base weights come from the checkpoint.
    adapters = jax.jit(lambda: nnx.state(Llama(config, rngs=nnx.Rngs(seed)), LoRAParam))()
    state = nnx.merge_state(state, adapters)
    keep = {rules.path_str(path) for path, _ in nnx.to_flat_state(adapters)}.__contains__
  return nnx.merge(graphdef, rules.load(tensors, table, state, source=source, strict=strict, keep=keep, allocate=allocate))


@dataclasses.dataclass
class LlamaCheckpoint:
  """A LLaMA-family checkpoint opened for streaming, whatever its format.

  `tensors` yields `(key, array)` once, named as `table` expects; `count` is their number when known
  (for progress); `special_tokens` are the model folder's `extra`; `tokenizer_args` go to
  `transformers.AutoTokenizer.from_pretrained`.
  """

  config: LlamaConfig
  table: tuple[Rule, ...]
  tensors: Iterable[tuple[str, np.ndarray]]
  count: int | None
  special_tokens: dict[str, Any]
  tokenizer_args: dict[str, Any]
  source: str

  def load_tokenizer(self) -> Any:
    """The checkpoint's tokenizer as a fast (`tokenizers`) one, which the model folder saves as tokenizer.json.

    A folder with only sentencepiece's tokenizer.model (LLaMA-1, Vicuna v1.1) is read with the
    `sentencepiece` package (`sentencepiece_tokenizer`).
    """
    import transformers  # slow to import; only the tokenizer needs it

    folder = self.tokenizer_args["pretrained_model_name_or_path"]
    if (
      "gguf_file" not in self.tokenizer_args
      and os.path.isfile(os.path.join(folder, SENTENCEPIECE_MODEL))
      and not os.path.isfile(os.path.join(folder, FAST_TOKENIZER))
    ):
      return sentencepiece_tokenizer(folder)
    return transformers.AutoTokenizer.from_pretrained(**self.tokenizer_args)


def sentencepiece_tokenizer(folder: str) -> Any:
  """A fast tokenizer equal to the sentencepiece model `folder/tokenizer.model`, checked on `SENTENCEPIECE_PROBE`.

  transformers converts the model, but its LLaMA pipeline (a Metaspace pre-tokenizer) adds no "▁" before
  text that starts with a space, where sentencepiece (and the slow tokenizer that LTU-AS trained with)
  always adds one: the conversion's splitting is replaced by sentencepiece's own (prepend "▁", spaces to
  "▁"), and the tokenizer is saved as a plain fast tokenizer so that loading it keeps that pipeline.
  """
  try:
    import sentencepiece
  except ImportError as error:
    raise ImportError(
      f"{folder} has only a sentencepiece tokenizer ({SENTENCEPIECE_MODEL}, no {FAST_TOKENIZER}); reading it "
      "needs the sentencepiece package, pinned in requirements.txt (bash scripts/setup.sh installs it)"
    ) from error
  import transformers
  from tokenizers import normalizers, pre_tokenizers

  converted = transformers.AutoTokenizer.from_pretrained(folder)
  backend = converted.backend_tokenizer
  if isinstance(backend.pre_tokenizer, pre_tokenizers.Metaspace):
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.pre_tokenizer = None
  tokenizer = transformers.PreTrainedTokenizerFast(
    tokenizer_object=backend, model_max_length=converted.model_max_length, padding_side=converted.padding_side,
    **converted.special_tokens_map,
  )
  model = sentencepiece.SentencePieceProcessor(model_file=os.path.join(folder, SENTENCEPIECE_MODEL))
  expected = model.encode(SENTENCEPIECE_PROBE)
  ids = tokenizer(SENTENCEPIECE_PROBE, add_special_tokens=False)["input_ids"]
  if ids != expected or tokenizer.decode(ids) != model.decode(expected):
    raise ValueError(
      f"{folder}/{SENTENCEPIECE_MODEL}: the fast tokenizer converted from it splits {SENTENCEPIECE_PROBE!r} "
      f"into {ids} (decoded {tokenizer.decode(ids)!r}), sentencepiece into {expected} (decoded "
      f"{model.decode(expected)!r}); not converting a model whose text would be tokenized unlike its training"
    )
  return tokenizer


def special_tokens_from_hf(folder: str) -> dict[str, Any]:
  """bos/pad ids and the list of eos ids from `config.json`, overridden by `generation_config.json`."""
  found: dict[str, Any] = {}
  for name in ("config.json", "generation_config.json"):
    path = os.path.join(folder, name)
    if os.path.isfile(path):
      with open(path) as f:
        found.update({k: v for k, v in json.load(f).items() if k in SPECIAL_TOKENS and v is not None})
  eos = found.get("eos_token_id", [])
  return {
    "bos_token_id": found.get("bos_token_id"),
    "eos_token_ids": eos if isinstance(eos, list) else [eos],
    "pad_token_id": found.get("pad_token_id"),
  }


def open_hf_folder(folder: str | os.PathLike, lora: LoRAConfig | None = None, **overrides: Any) -> LlamaCheckpoint:
  """A `save_pretrained` folder (config.json, single or sharded safetensors or `.bin`, tokenizer files)."""
  folder = os.path.abspath(folder)
  path = os.path.join(folder, "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{folder} is not a Hugging Face model folder: config.json is missing")
  with open(path) as f:
    hf = json.load(f)
  if hf.get("model_type") != "llama":
    raise ValueError(f"{path}: model_type is {hf.get('model_type')!r}; only 'llama' models are supported")
  config = config_from_hf(hf, lora, **overrides)
  return LlamaCheckpoint(
    config=config,
    table=llama_rules(config),
    tensors=sources.iter_hf_folder(folder),
    count=None,
    special_tokens=special_tokens_from_hf(folder),
    tokenizer_args={"pretrained_model_name_or_path": folder},
    source=folder,
  )
