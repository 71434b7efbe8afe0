"""Issue #14 for the feature cache: every cached file is checked when the data is read, named in the error,
and each audio path has a feature file of its own (with the original's names still read where unambiguous).
Nothing the user had is touched: the checks only read."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from ltu_jax import data, extract_features
from ltu_jax.data import DataError, FeatureStore
from ltu_jax.extract_features import write_feature

FEATURE_SHAPE = (2, 3, 4)  # (layers, audio tokens, dim): tiny, any sizes work


def write_records(path, audio_ids) -> str:
  records = [{"instruction": "what?", "input": "", "output": "x", "audio_id": a} for a in audio_ids]
  path.write_text(json.dumps(records))
  return str(path)


def write_npz(path: str, array: np.ndarray) -> None:
  """A cache file as any tool might have written it: `arr_0` kept in its own dtype."""
  with open(path, "wb") as f:
    np.savez(f, array)


def snapshot(folder) -> dict[str, bytes]:
  return {name: open(os.path.join(folder, name), "rb").read() for name in sorted(os.listdir(folder))}


# ---------------------------------------------------------------------------------------------------
# Class 5: every cached file is checked when the records are read


BAD_FILES = {  # clip → (what its cached file holds, the message that must name it)
  "/d/a/b/int8.wav": (np.ones(FEATURE_SHAPE, np.int8), r"holds int8 values, expected float16 \(as extracted\) or float32"),
  "/d/a/b/double.wav": (np.ones(FEATURE_SHAPE, np.float64), r"holds float64 values, expected float16"),
  "/d/a/b/nan.wav": (
    np.where(np.eye(4, dtype=bool)[:3], np.nan, 1.0).astype(np.float16)[None].repeat(2, 0),
    r"has 6 NaN or infinite values of 24",
  ),
  "/d/a/b/inf.wav": (np.full(FEATURE_SHAPE, np.inf, np.float32), r"has 24 NaN or infinite values of 24"),
  "/d/a/b/wide.wav": (np.ones((2, 3, 5), np.float16), r"has shape \(2, 3, 5\), expected \(2, a multiple of 3, 4\)"),
  "/d/a/b/flat.wav": (np.ones(24, np.float16), r"has shape \(24,\), expected \(2, a multiple of 3, 4\)"),
}


@pytest.mark.parametrize("bad", sorted(BAD_FILES))
def test_a_bad_cached_file_stops_reading_naming_data_record_file_and_problem(tmp_path, bad):
  cache = tmp_path / "cache"
  cache.mkdir()
  store = FeatureStore(cache, shape=FEATURE_SHAPE)
  good = "/d/a/b/good.wav"
  write_feature(store.path(good), np.ones(FEATURE_SHAPE))
  array, problem = BAD_FILES[bad]
  write_npz(store.path(bad), array)
  before = snapshot(cache)
  data_file = write_records(tmp_path / "train.json", [good, bad])
  feature_file = os.path.join(cache, data.feature_filename(bad))
  message = rf"{data_file}: record 1: field 'audio_id': feature file {feature_file} \(audio {bad}\) {problem}"
  with pytest.raises(DataError, match=message):
    data.read_records(data_file, features=FeatureStore(cache, shape=FEATURE_SHAPE))
  records, skipped = data.read_records(data_file, features=FeatureStore(cache, shape=FEATURE_SHAPE), skip_bad=True)
  assert [r["audio_id"] for r in records] == [good] and skipped == 1
  assert snapshot(cache) == before  # read, never rewritten or removed


def test_float16_and_float32_files_are_read():
  store = FeatureStore("/nowhere", shape=FEATURE_SHAPE)
  for dtype in (np.float16, np.float32):
    values = np.full(FEATURE_SHAPE, 0.5, dtype)
    np.testing.assert_array_equal(store._checked("f.npz", "a.wav", values), values)


def test_the_check_reads_each_clip_once_however_many_questions_it_has(tmp_path, monkeypatch):
  store = FeatureStore(tmp_path, shape=FEATURE_SHAPE)
  clips = [f"/d/a/b/{i}.wav" for i in range(3)]
  for clip in clips:
    write_feature(store.path(clip), np.ones(FEATURE_SHAPE))
  reads = []
  read = data._read_feature
  monkeypatch.setattr(data, "_read_feature", lambda path: reads.append(path) or read(path))
  records, _ = data.read_records(write_records(tmp_path / "d.json", clips * 4), features=store)
  assert len(records) == 12 and sorted(reads) == sorted(store.path(c) for c in clips)


# ---------------------------------------------------------------------------------------------------
# Class 6: one feature file per audio path


COLLIDING = [  # groups of clips that the original's naming gave one file
  ["/d/x/y/z/a.wav", "/d/x/y/z/a.flac"],
  ["/d/x/y/z/clip1", "/d/x/y/z/clip2"],  # no extension: the original's name loses the whole name
  ["/one/x/y/z/b.wav", "/two/x/y/z/b.wav"],  # only the last 3 folders counted
]


@pytest.mark.parametrize("clips", COLLIDING)
def test_clips_the_original_named_alike_get_their_own_files_and_features(tmp_path, clips):
  assert len({data.original_feature_filename(c) for c in clips}) == 1
  assert len({data.feature_filename(c) for c in clips}) == len(clips)
  store = FeatureStore(tmp_path, shape=FEATURE_SHAPE)
  for index, clip in enumerate(clips):
    write_feature(store.path(clip), np.full(FEATURE_SHAPE, index))
  records, _ = data.read_records(write_records(tmp_path / "d.json", clips), features=store)
  assert len(records) == len(clips)
  assert [int(store.load(clip)[0, 0, 0]) for clip in clips] == list(range(len(clips)))


def test_a_cache_the_original_filled_is_still_read(tmp_path):
  clips = ["/d/sls/audioset/train/a.wav", "/d/sls/vggsound/test/b.flac"]
  for index, clip in enumerate(clips):
    write_feature(str(tmp_path / data.original_feature_filename(clip)), np.full(FEATURE_SHAPE, index))
  store = FeatureStore(tmp_path, shape=FEATURE_SHAPE)
  assert data.read_records(write_records(tmp_path.parent / "d.json", clips), features=store)[1] == 0
  assert [int(store.load(clip)[0, 0, 0]) for clip in clips] == [0, 1]
  assert store.path(clips[0]) == str(tmp_path / "sls_audioset_train_a.npz")


def test_an_original_file_that_two_clips_map_to_is_refused_for_both(tmp_path):
  cache = tmp_path / "cache"
  cache.mkdir()
  clips = COLLIDING[0]
  write_feature(str(cache / "x_y_z_a.npz"), np.ones(FEATURE_SHAPE))  # the original's file: whose is it?
  before = snapshot(cache)
  data_file = write_records(tmp_path / "d.json", clips)
  shared = rf"feature file {cache}/x_y_z_a\.npz has the original's name \(3 parent folders and the name without extension\), "
  message = rf"{data_file}: record 0: field 'audio_id': {shared}which audio {clips[1]}, {clips[0]} all map to"
  with pytest.raises(DataError, match=message):
    data.read_records(data_file, features=FeatureStore(cache, shape=FEATURE_SHAPE))
  assert data.read_records(data_file, features=FeatureStore(cache, shape=FEATURE_SHAPE), skip_bad=True) == ([], 2)
  # a store that meets the clips one at a time refuses the second, whenever it comes
  store = FeatureStore(cache, shape=FEATURE_SHAPE)
  store.load(clips[0])
  with pytest.raises(DataError, match=shared):
    store.load(clips[1])
  assert snapshot(cache) == before


class StubEncoder:
  """What `extract_features.extract` needs of `WhisperFeatures`: clip i's features are all i + 1."""

  shape = FEATURE_SHAPE
  storage_dtype = np.float16

  def __init__(self, clips):
    self.index = {clip: i for i, clip in enumerate(clips)}

  def mel(self, audio_id: str) -> np.ndarray:
    """One window."""
    return np.full((1, 1, 1), self.index[audio_id] + 1, np.float32)

  def clips(self, windows: list[np.ndarray]) -> list[np.ndarray]:
    return [(w[0, 0, 0] * np.ones(FEATURE_SHAPE)).astype(np.float16) for w in windows]


def test_extraction_completes_an_original_cache_giving_shared_names_files_of_their_own(tmp_path):
  cache = tmp_path / "cache"
  cache.mkdir()
  clips = ["/d/x/y/z/a.wav", "/d/x/y/z/a.flac", "/d/x/y/z/c.wav"]
  write_feature(str(cache / "x_y_z_a.npz"), np.full(FEATURE_SHAPE, 9))  # ambiguous: a.wav's or a.flac's
  write_feature(str(cache / "x_y_z_c.npz"), np.full(FEATURE_SHAPE, 9))  # c.wav's alone: kept and used
  written = extract_features.extract(clips, StubEncoder(clips), str(cache), batch_size=2, threads=1, progress=False)
  assert written == (2, 1, 0)
  assert {"x_y_z_a.npz", "x_y_z_c.npz"} <= set(os.listdir(cache))  # the user's files stay
  store = FeatureStore(cache, shape=FEATURE_SHAPE)
  assert data.read_records(write_records(tmp_path / "d.json", clips), features=store)[1] == 0
  assert [int(store.load(clip)[0, 0, 0]) for clip in clips] == [1, 2, 9]


def test_a_name_shared_anyhow_is_caught(tmp_path, monkeypatch):
  monkeypatch.setattr(data, "feature_filename", lambda audio_id: "same.npz")
  clips = ["/d/a.wav", "/d/b.wav"]
  write_feature(str(tmp_path / "same.npz"), np.ones(FEATURE_SHAPE))
  message = rf"audio /d/a\.wav, /d/b\.wav have the same feature file name {tmp_path}/same\.npz"
  with pytest.raises(DataError, match=message):
    data.read_records(write_records(tmp_path / "d.json", clips), features=FeatureStore(tmp_path, shape=FEATURE_SHAPE))
