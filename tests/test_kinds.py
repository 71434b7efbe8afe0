"""The registry of model kinds: the one place that knows kinds, its messages, and the trainable groups."""

from __future__ import annotations

import pathlib
import re

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from ltu_jax import kinds, train
from ltu_jax.models.llama import Llama, LlamaConfig
from ltu_jax.models.lora import LoRAConfig, LoRAParam

ROOT = pathlib.Path(__file__).resolve().parent.parent
# Comparing a kind's name to a literal is the registry's business alone.
KIND_DISPATCH = re.compile(r"""kind\s*[!=]=\s*["'](?:%s)["']|isinstance\([^)]*\b(?:Llama|LtuAs|Ltu|Whisper)\b""" % "|".join(kinds.KINDS))


def test_no_kind_dispatch_outside_the_registry():
  offenders = []
  for path in [*ROOT.glob("ltu_jax/**/*.py"), *ROOT.glob("conversion/*.py")]:
    if path.name == "kinds.py":
      continue
    for number, line in enumerate(path.read_text().splitlines(), 1):
      if KIND_DISPATCH.search(line):
        offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
  assert not offenders, offenders


def test_a_command_names_what_the_folder_holds_and_how_to_make_what_it_needs():
  with pytest.raises(ValueError) as error:
    kinds.require("llama", "train", kinds.AUDIO_LLM, "runs/llm")
  assert str(error.value) == (
    "`train` needs a model with audio; runs/llm holds an LLM (LLaMA family) (kind 'llama'): "
    "convert one with python -m conversion.ltu_as"
  )
  with pytest.raises(ValueError, match="`transcribe` needs a Whisper model; .* convert one with python -m conversion.whisper"):
    kinds.require("ltu_as", "transcribe", kinds.TRANSCRIBES)
  with pytest.raises(ValueError, match=r"unknown model kind 'ltu_x'; expected one of \['llama', 'ltu', 'ltu_as', 'whisper'\]"):
    kinds.get("ltu_x")
  assert kinds.require("ltu_as", "infer", kinds.AUDIO_LLM) is kinds.KINDS["ltu_as"]


@pytest.mark.parametrize("path, group", [
  ("audio_encoder/time_tr/fc1/kernel", "audio_encoder"),
  ("audio_proj/kernel", "audio_proj"),
  ("llm/layers/self_attn/q_proj/lora_a", "lora"),
  ("llm/layers/self_attn/q_proj/base/kernel", None),
  ("audio_norm/scale", None),
])
def test_ltu_as_groups_are_path_expressions(path, group):
  assert kinds.get("ltu_as").group_of(path) == group


@pytest.mark.parametrize("path, group", [
  ("audio_encoder/blocks_a/attn/qkv/kernel", "audio_encoder"),
  ("audio_encoder/pos_embed", "audio_encoder"),
  ("audio_proj/bias", "audio_proj"),
  ("llm/layers/self_attn/v_proj/lora_b", "lora"),
])
def test_ltu_has_the_same_groups(path, group):
  assert kinds.get("ltu").group_of(path) == group


def test_settings_that_name_unknown_groups_are_refused():
  with pytest.raises(KeyError, match=r"trainable: unknown parameter groups \['proj'\]; a ltu_as model's groups are"):
    train.trainable_filter(kinds.get("ltu_as"), "proj")
  with pytest.raises(KeyError, match=r"optim.lr_scale: unknown parameter groups \['tltr'\]"):
    train.optimizer(_with_scale("tltr"), 10, kinds.get("ltu_as"))


def _with_scale(group: str):
  c = train.load_config("stage3")
  c.unlock()
  c.optim.lr_scale[group] = 0.5
  return c


def test_group_scales_reach_the_parameters_of_an_nnx_state():
  # The optimizer sees an nnx.State, whose leaves' paths end in the variables' `.value`.
  config = LlamaConfig(vocab_size=11, hidden_size=8, intermediate_size=12, num_layers=2, num_heads=2, num_kv_heads=1,
                       lora=LoRAConfig(rank=2))
  _, params, _ = nnx.split(Llama(config, rngs=nnx.Rngs(0)), LoRAParam, ...)
  tx = train.scale_by_group(kinds.get("llama"), {"lora": 0.25})
  scaled, _ = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params))
  leaves = jax.tree.leaves(scaled)
  assert len(leaves) == 4 and all(bool(jnp.all(leaf == 0.25)) for leaf in leaves)
