"""Logical axis names on every parameter, and the rules table applied on an 8-device CPU mesh."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
from flax import nnx

from ltu_jax import sharding
from ltu_jax.models.cav_mae import CavMaeConfig
from ltu_jax.models.llama import LlamaConfig
from ltu_jax.models.lora import LoRAConfig
from ltu_jax.models.ltu import Ltu, LtuConfig
from ltu_jax.models.ltu_as import LtuAs, LtuAsConfig
from ltu_jax.models.tltr import TLTRConfig
from ltu_jax.models.whisper import Whisper, WhisperConfig

SHARDED_TOL = 1e-5  # the same forward, sharded or not (only reduction order differs)

LLM = LlamaConfig(
  vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2, lora=LoRAConfig()
)
WHISPER = WhisperConfig(
  num_mel_bins=80, d_model=32, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=64,
  decoder_layers=2, decoder_attention_heads=4, decoder_ffn_dim=64, vocab_size=50, max_source_positions=20,
  max_target_positions=16,
)
MODELS = {
  "whisper": lambda: Whisper(WHISPER, rngs=nnx.Rngs(0)),
  "ltu_as": lambda: LtuAs(
    LtuAsConfig(llm=LLM, tltr=TLTRConfig(dim=32, mlp_dim=64), feature_layers=2, audio_tokens=3), rngs=nnx.Rngs(0)
  ),
  "ltu": lambda: Ltu(
    LtuConfig(llm=LLM, encoder=CavMaeConfig(dim=32, heads=2, mlp_dim=64, audio_layers=2, mel_bins=32, frames=64)),
    rngs=nnx.Rngs(0),
  ),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_parameter_names_its_axes(name):
  state = nnx.state(nnx.eval_shape(MODELS[name]), nnx.Param)
  known = {logical for logical, _ in sharding.DEFAULT_RULES}
  for path, var in nnx.to_flat_state(state):
    names = var.get_metadata().get("out_sharding")
    assert names is not None and len(names) == len(var.shape), f"{path}: axes {names} for shape {var.shape}"
    assert set(names) - {None} <= known, f"{path}: {names} not all in the rules table"


def test_rules_replicate_what_does_not_divide():
  mesh = sharding.make_mesh(data=1, fsdp=1, tensor=1)
  assert sharding.logical_to_spec(("embed", "q_heads"), (32, 36), mesh) == sharding.PartitionSpec(None, None)
  with pytest.raises(KeyError, match="'nonsense' has no sharding rule"):
    sharding.logical_to_spec(("nonsense",), (4,), mesh)


SCRIPT = textwrap.dedent(
  """
  import jax, numpy as np
  from flax import nnx
  from ltu_jax import sharding
  from tests.test_sharding import LLM
  from ltu_jax.models.llama import Llama

  model = Llama(LLM, rngs=nnx.Rngs(0))
  ids = np.random.default_rng(0).integers(0, LLM.vocab_size, (8, 6))
  graphdef, state = nnx.split(model)
  forward = lambda state, ids: nnx.merge(graphdef, state)(ids)[0]
  with jax.default_matmul_precision("highest"):
    expected = np.asarray(jax.jit(forward)(state, ids))
    for data, fsdp, tensor in ((1, 8, 1), (2, 2, 2), (1, 2, 4)):
      mesh = sharding.make_mesh(data, fsdp, tensor)
      shardings = sharding.state_shardings(state, mesh)
      placed = jax.device_put(state, shardings)
      spec = placed["layers"]["mlp"]["up_proj"]["base"]["kernel"].get_value().sharding.spec
      batch = jax.sharding.NamedSharding(mesh, sharding.logical_to_spec(("batch", None), ids.shape, mesh))
      logits = jax.jit(forward)(placed, jax.device_put(ids, batch))
      print(data, fsdp, tensor, tuple(spec), float(np.max(np.abs(np.asarray(logits) - expected))))
  """
)


def test_sharded_forward_equals_single_device():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  result = subprocess.run(
    [sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, cwd=os.path.dirname(os.path.dirname(__file__))
  )
  assert result.returncode == 0, result.stderr[-3000:]
  rows = [line.split(" ", 3) for line in result.stdout.strip().splitlines()]
  assert len(rows) == 3
  for data, fsdp, tensor, rest in rows:
    spec, error = rest.rsplit(" ", 1)
    assert float(error) <= SHARDED_TOL, (data, fsdp, tensor, error)
    expected_spec = (None, "fsdp" if int(fsdp) > 1 else None, "tensor" if int(tensor) > 1 else None)
    assert spec == repr(expected_spec), (data, fsdp, tensor, spec)
