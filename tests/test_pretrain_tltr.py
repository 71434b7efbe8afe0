"""TLTR tagging pretraining: learns labels the features carry, changes TLTR alone, names bad records."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

from ltu_jax import data, model_folder, pretrain_tltr
from tests import train_setup

GENDERS = ("male", "female")
SOUNDS = ("bell", "siren", "speech")


def labelled_split(paths: dict[str, str], name: str, clips: int, seed: int) -> str:
  """`clips` records whose cached features carry their labels in a few dimensions (plus noise), two
  questions per clip, as tiny_data writes them."""
  rng = np.random.default_rng(seed)
  rows = []
  for i in range(clips):
    gender, sound = GENDERS[i % 2], SOUNDS[(i // 2) % 3]
    audio_id = f"/data/{name}/clip{i}.wav"
    features = rng.normal(size=(2, 25, 16))
    features[:, :, 0] += 1.5 if gender == "female" else -1.5
    features[:, :, 1 + SOUNDS.index(sound)] += 2.0
    np.savez_compressed(os.path.join(paths["features"], data.feature_filename(audio_id)), features.astype(np.float16))
    labels = {"speech": True, "text": "hello", "gender": gender, "sound": sound}
    for question in ("who is the speaker", "sound of what"):
      rows.append(dict(instruction=question, input="", output="the speaker is " + gender, audio_id=audio_id, labels=labels))
  path = os.path.join(os.path.dirname(paths["train"]), f"{name}.json")
  with open(path, "w") as f:
    json.dump(rows, f)
  return path


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  paths = train_setup.build(str(tmp_path_factory.mktemp("pretrain_tltr")))
  paths["labelled"] = labelled_split(paths, "labelled", 64, seed=1)
  paths["held_out"] = labelled_split(paths, "held_out", 24, seed=2)
  return paths


def test_tagging_learns_the_labels_and_changes_only_tltr(built, tmp_path):
  out = str(tmp_path / "pretrained")
  scores = pretrain_tltr.pretrain(
    built["ltu_as"], built["labelled"], built["features"], out, eval_data=built["held_out"],
    keys=("gender", "sound"), epochs=30, batch_size=16, lr=3e-3,
  )
  assert scores["after"]["gender"] >= 0.95 and scores["after"]["sound"] >= 0.95, scores
  assert scores["before"]["gender"] < 0.95 or scores["before"]["sound"] < 0.95, scores

  before, after = model_folder.load(built["ltu_as"]), model_folder.load(out)
  assert after.kind == "ltu_as"
  changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), nnx.to_pure_dict(nnx.state(before.model)),
                         nnx.to_pure_dict(nnx.state(after.model)))
  assert all(jax.tree.leaves(changed["audio_encoder"]))
  del changed["audio_encoder"]
  assert not any(jax.tree.leaves(changed))
  # The LTU-AS folder's Whisper comes along.
  assert os.path.isfile(os.path.join(out, after.extra["whisper"], model_folder.CONFIG_FILE))


def test_a_record_without_labels_is_named(built, tmp_path):
  with pytest.raises(data.DataError, match=r"train\.json: record 0: no 'labels'"):
    pretrain_tltr.pretrain(built["ltu_as"], built["train"], built["features"], str(tmp_path / "out"))


def test_an_existing_output_folder_is_refused(built, tmp_path):
  out = tmp_path / "taken"
  os.makedirs(out)
  (out / model_folder.CONFIG_FILE).write_text("{}")
  with pytest.raises(FileExistsError, match="already holds a model"):
    pretrain_tltr.pretrain(built["ltu_as"], built["labelled"], built["features"], str(out))
