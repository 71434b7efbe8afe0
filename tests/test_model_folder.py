"""The model folder: save and load give back the same config and parameters, casts on request."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from flax import nnx

import ltu_jax
from ltu_jax import model_folder
from tests.test_sharding import MODELS


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_round_trip_is_exact(tmp_path, kind):
  model = MODELS[kind]()
  model_folder.save(tmp_path / "m", model, kind, extra={"eos": 2})
  loaded = ltu_jax.load(tmp_path / "m", tokenizer=False)
  assert loaded.kind == kind and loaded.config == model.config and loaded.extra == {"eos": 2}
  for ours, theirs in zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(loaded.model)), strict=True):
    np.testing.assert_array_equal(ours, theirs)
  cast = ltu_jax.load(tmp_path / "m", tokenizer=False, param_dtype="bfloat16", dtype="bfloat16")
  assert {leaf.dtype for leaf in jax.tree.leaves(nnx.state(cast.model))} == {np.dtype("bfloat16")}


def test_bad_folders_say_what_is_wrong(tmp_path):
  with pytest.raises(FileNotFoundError, match="ltu_jax.json is missing"):
    ltu_jax.load(tmp_path)
  model_folder.save(tmp_path / "m", MODELS["whisper"](), "whisper")
  manifest = json.loads((tmp_path / "m" / "ltu_jax.json").read_text())
  manifest["config"]["d_modle"] = 3
  (tmp_path / "m" / "ltu_jax.json").write_text(json.dumps(manifest))
  with pytest.raises(ValueError, match=r"unknown keys \['d_modle'\]"):
    ltu_jax.load(tmp_path / "m", tokenizer=False)
  with pytest.raises(FileExistsError):
    model_folder.save(tmp_path / "m", MODELS["whisper"](), "whisper")
