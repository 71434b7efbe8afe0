"""`python -m ltu_jax.extract_features` on generated audio with a tiny random Whisper: the original's file
names and layout, resuming, bad audio, atomic writes, and equality with features computed on the fly."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import soundfile as sf
from flax import nnx

import ltu_jax
from ltu_jax import data, extract_features, model_folder
from ltu_jax.data import DataError, FeatureStore
from ltu_jax.features import WhisperFeatures
from ltu_jax.models.whisper import Whisper, WhisperConfig

# 500 source positions: LTU-AS's 1000 mel frames; 2 blocks of width 32 → features [2, 25, 32]
WHISPER = WhisperConfig(
  num_mel_bins=80, d_model=32, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=64,
  decoder_layers=1, decoder_attention_heads=4, decoder_ffn_dim=64, vocab_size=50, max_source_positions=500,
  max_target_positions=16,
)
FEATURE_SHAPE = (2, 25, 32)
CLIPS = {  # relative path: (seconds, sample rate, kind)
  "audioset/train/speech/a.wav": (0.5, 16000, "sine"),
  "audioset/train/speech/b.flac": (12.0, 16000, "noise"),  # longer than 10 s: trimmed
  "vggsound/test/dog/c.wav": (2.0, 8000, "sine"),  # resampled to 16 kHz
  "vggsound/test/dog/d.e.wav": (1.0, 16000, "noise"),
}


@pytest.fixture(scope="module")
def whisper_folder(tmp_path_factory) -> str:
  folder = tmp_path_factory.mktemp("models") / "whisper"
  model_folder.save(folder, Whisper(WHISPER, rngs=nnx.Rngs(0)), "whisper")
  return str(folder)


def write_clips(root) -> list[str]:
  rng = np.random.default_rng(0)
  paths = []
  for name, (seconds, rate, kind) in CLIPS.items():
    time = np.arange(int(seconds * rate)) / rate
    samples = 0.5 * np.sin(2 * np.pi * 440 * time) if kind == "sine" else 0.1 * rng.normal(size=time.shape)
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, samples, rate)
    paths.append(str(path))
  return paths


def write_data(path, audio_ids) -> str:
  # two questions per clip, as in OpenASQA: each clip is encoded once
  records = [{"instruction": q, "input": "", "output": "x", "audio_id": a} for a in audio_ids for q in ("what?", "why?")]
  path.write_text(json.dumps(records))
  return str(path)


def run(whisper_folder, data_file, out, *extra) -> int:
  return extract_features.main(
    ["--whisper", whisper_folder, "--data", data_file, "--out", str(out), "--batch-size", "3", "--dtype", "float32", *extra]
  )


def test_writes_the_original_layout_resumes_and_matches_features_on_the_fly(tmp_path, whisper_folder):
  audio_ids = write_clips(tmp_path / "audio")
  data_file = write_data(tmp_path / "d.json", audio_ids)
  out = tmp_path / "features"
  assert run(whisper_folder, data_file, out) == 0
  expected = {a: data.feature_filename(a) for a in audio_ids}
  assert expected[audio_ids[3]].startswith("vggsound_test_dog_d.e.wav-")
  assert sorted(os.listdir(out)) == sorted(expected.values())
  on_the_fly = FeatureStore(tmp_path / "empty", encoder=WhisperFeatures(ltu_jax.load(whisper_folder)), dtype=np.float16)
  assert on_the_fly.shape == FEATURE_SHAPE
  for audio_id, name in expected.items():
    with np.load(out / name) as stored:
      cached = stored["arr_0"]
    assert cached.dtype == np.float16 and cached.shape == FEATURE_SHAPE
    assert np.abs(cached).max() > 0
    # batch 3 against batch 1: the fp32 values may differ in the last bits, so a float16 rounding
    # boundary may fall between them; at most one float16 step apart
    step = np.spacing(np.abs(cached))
    assert np.all(np.abs(on_the_fly.load(audio_id).astype(np.float32) - cached) <= step), audio_id

  times = {name: os.stat(out / name).st_mtime_ns for name in expected.values()}
  assert run(whisper_folder, data_file, out) == 0
  assert {name: os.stat(out / name).st_mtime_ns for name in expected.values()} == times
  os.remove(out / expected[audio_ids[1]])
  encoder = WhisperFeatures(ltu_jax.load(whisper_folder))
  assert extract_features.extract(audio_ids, encoder, str(out), batch_size=3, progress=False) == (1, 3, 0)


def test_long_clips_keep_their_windows_in_order(tmp_path, whisper_folder):
  audio_ids = write_clips(tmp_path / "audio")
  data_file = write_data(tmp_path / "d.json", audio_ids)
  assert run(whisper_folder, data_file, tmp_path / "one") == 0
  assert run(whisper_folder, data_file, tmp_path / "two", "--max-windows", "2") == 0
  for audio_id, (seconds, _, _) in zip(audio_ids, CLIPS.values()):
    name = data.feature_filename(audio_id)
    with np.load(tmp_path / "one" / name) as one, np.load(tmp_path / "two" / name) as two:
      first, both = one["arr_0"], two["arr_0"]
    windows = 2 if seconds > 10 else 1
    assert both.shape == (2, 25 * windows, 32)
    # the first window is the same 10 s either way (one log-mel of the whole clip, then cut)
    assert np.all(np.abs(both[:, :25].astype(np.float32) - first) <= np.spacing(np.abs(first))), audio_id
    if windows == 2:
      assert np.abs(both[:, 25:].astype(np.float32) - first).max() > 0.01
  store = FeatureStore(tmp_path / "two", max_windows=2)
  assert store.shape == FEATURE_SHAPE and store.load(audio_ids[1]).shape == (2, 50, 32)


def test_bad_audio_stops_the_run_or_is_skipped(tmp_path, whisper_folder, caplog):
  audio_ids = write_clips(tmp_path / "audio")
  corrupt = tmp_path / "audio" / "audioset" / "train" / "speech" / "corrupt.wav"
  corrupt.write_bytes(b"RIFF not really a wave file")
  missing = str(tmp_path / "audio" / "gone" / "x" / "y" / "missing.wav")
  data_file = write_data(tmp_path / "d.json", [audio_ids[0], str(corrupt), missing])
  encoder = WhisperFeatures(ltu_jax.load(whisper_folder))
  with pytest.raises(DataError, match=rf"audio {corrupt}: cannot decode audio file"):
    extract_features.extract([audio_ids[0], str(corrupt)], encoder, str(tmp_path / "f1"), progress=False)
  assert run(whisper_folder, data_file, tmp_path / "f2") == 1
  assert "corrupt.wav" in caplog.text
  assert run(whisper_folder, data_file, tmp_path / "f3", "--skip-bad") == 0
  assert os.listdir(tmp_path / "f3") == [data.feature_filename(audio_ids[0])]
  assert f"skipping audio {missing}: audio file not found" in caplog.text


def test_on_the_fly_records_need_their_audio(tmp_path, whisper_folder):
  audio_ids = write_clips(tmp_path / "audio")
  missing = str(tmp_path / "audio" / "gone" / "x" / "y" / "missing.wav")
  store = FeatureStore(tmp_path / "empty", encoder=WhisperFeatures(ltu_jax.load(whisper_folder)))
  data_file = write_data(tmp_path / "d.json", [audio_ids[0], missing])
  with pytest.raises(DataError, match=rf"record 2: field 'audio_id': audio file {missing} not found, and no cached feature"):
    data.read_records(data_file, features=store)
  assert data.read_records(data_file, features=store, skip_bad=True)[1] == 2


def test_clips_sharing_a_feature_name_are_an_error(tmp_path, monkeypatch):
  # the original's naming gave these one file; ours does not, but a name shared anyhow is still caught
  data_file = write_data(tmp_path / "d.json", ["/r/one/a/b/c/x.wav", "/r/two/a/b/c/x.wav"])
  assert len(extract_features.unique_audio_ids([data_file], skip_bad=False)) == 2
  monkeypatch.setattr(extract_features, "feature_filename", lambda audio_id: "a_b_c_x.npz")
  with pytest.raises(DataError, match="audio /r/one/a/b/c/x.wav and /r/two/a/b/c/x.wav share the feature file name a_b_c_x.npz"):
    extract_features.unique_audio_ids([data_file], skip_bad=False)


def test_an_interrupted_write_leaves_no_file(tmp_path, monkeypatch):
  path = str(tmp_path / "a_b_c_x.npz")
  values = np.ones(FEATURE_SHAPE)

  def killed(file, *arrays):
    file.write(b"PK\x03\x04 half a zip")
    raise KeyboardInterrupt

  monkeypatch.setattr(np, "savez_compressed", killed)
  with pytest.raises(KeyboardInterrupt):
    extract_features.write_feature(path, values)
  assert os.listdir(tmp_path) == []
  monkeypatch.undo()
  extract_features.write_feature(path, values)
  assert os.listdir(tmp_path) == ["a_b_c_x.npz"]
  with np.load(path) as stored:
    np.testing.assert_array_equal(stored["arr_0"], values.astype(np.float16))
