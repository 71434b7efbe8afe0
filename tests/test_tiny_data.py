"""The tiny dataset: LTU records, real audio whose labels can be heard, disjoint splits, determinism."""

from __future__ import annotations

import json
import os
import types

import librosa
import numpy as np
import pytest
import soundfile as sf

from ltu_jax import tiny_data

LTU_FIELDS = ("instruction", "input", "output", "audio_id", "dataset", "task")
SEED, TRAIN, TEST = 3, 12, 4
# a woman's low voice against a man's high one: their median F0 must differ by more than this ratio
MIN_GENDER_F0_RATIO = 1.15
# the slowest "fast" rate against the fastest "slow" one: 120 vs 215 words per minute, less fixed pauses
MIN_SLOW_TO_FAST_DURATION = 1.4


def read_split(out_dir, name: str) -> list[dict]:
  with open(os.path.join(out_dir, f"{name}.json")) as file:
    return json.load(file)


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory):
  out_dir = tmp_path_factory.mktemp("tiny")
  tiny_data.main([str(out_dir), "--seed", str(SEED), "--train", str(TRAIN), "--test", str(TEST)])
  return out_dir


def median_f0(waveform: np.ndarray) -> float:
  f0, voiced, _ = librosa.pyin(waveform, fmin=50, fmax=400, sr=tiny_data.SAMPLE_RATE)
  assert voiced.mean() > 0.3, "espeak-ng speech should be mostly voiced"
  return float(np.nanmedian(f0))


def test_records_have_the_ltu_fields(out_dir):
  for name in ("train", "test", "classification"):
    for record in read_split(out_dir, name):
      assert all(isinstance(record[field], str) for field in LTU_FIELDS), record
      assert record["dataset"] == tiny_data.DATASET
      assert record["task"] in tiny_data.TASKS
      assert os.path.isabs(record["audio_id"]) and os.path.dirname(record["audio_id"]) == str(out_dir / "audio")
      labels = record["labels"]
      assert (record["input"] == "") == (not labels["speech"]) == (record["input_source"] == "none")
      assert labels["sound"] in (*tiny_data.SOUNDS, "speech")
      if labels["speech"]:
        assert record["input"] == labels["text"] and record["input_source"] == "reference"
        assert labels["gender"] in tiny_data.VOICES and labels["speed"] in tiny_data.SPEEDS
        assert labels["pitch"] in ("low", "high")


def test_audio_is_16khz_mono_audible_and_at_most_30s_with_some_long_sounds(out_dir):
  paths = {record["audio_id"] for name in ("train", "test") for record in read_split(out_dir, name)}
  assert len(paths) == TRAIN + TEST
  durations = []
  for path in paths:
    info = sf.info(path)
    assert (info.samplerate, info.channels) == (16000, 1)
    assert info.duration <= tiny_data.MAX_SECONDS
    durations.append(info.duration)
  # LTU-AS's long audio is exercised: some clips fill two or three 10 s windows
  assert any(duration > 10 for duration in durations)
  planned = tiny_data.plan_clips(0, tiny_data.DEFAULT_TRAIN, tiny_data.DEFAULT_TEST)
  long = [clip for clip in planned if clip.sound_seconds and clip.sound_seconds > 10]
  assert 10 <= len(long) <= 20 and all(12 <= clip.sound_seconds <= 28 for clip in long)
  for path in paths:
    waveform, _ = sf.read(path)
    assert 0.3 <= np.abs(waveform).max() <= 0.9
    assert np.sqrt(np.mean(waveform**2)) > 0.01


def test_splits_are_disjoint_and_classification_is_the_closed_ended_part_of_train(out_dir):
  train, test = read_split(out_dir, "train"), read_split(out_dir, "test")
  assert not {r["audio_id"] for r in train} & {r["audio_id"] for r in test}
  held_out = set(tiny_data.SENTENCES[-tiny_data.HELD_OUT_SENTENCES :])
  assert not {r["labels"]["text"] for r in train} & held_out
  assert read_split(out_dir, "classification") == [r for r in train if r["task"] in tiny_data.CLASSIFICATION_TASKS]
  assert {r["task"] for r in train} == {r["task"] for r in test} == set(tiny_data.TASKS)
  # test asks the canonical (evaluation) wording; train draws from all paraphrases
  assert all(r["instruction"] == tiny_data.QUESTIONS[r["task"]][0] for r in test)
  assert len({r["instruction"] for r in train}) > len(tiny_data.TASKS)


def test_closed_ended_records_carry_their_label_and_the_label_file_lists_every_class(out_dir):
  names = json.load(open(out_dir / "labels.json"))
  assert names == tiny_data.class_names() and set(names) == set(tiny_data.CLASSIFICATION_TASKS)
  for record in read_split(out_dir, "train") + read_split(out_dir, "test"):
    task, labels = record["task"], record["labels"]
    if task not in tiny_data.CLASSIFICATION_TASKS:
      assert "label" not in record
      continue
    if task == "sound":
      assert record["label"] == ["speech"] * labels["speech"] + [labels["sound"]] * (labels["sound"] != "speech")
    else:
      assert record["label"] == labels[task]
    assert set(record["label"] if task == "sound" else [record["label"]]) <= set(names[task])


def test_choice_split_asks_about_the_test_clips_in_mmau_format(out_dir):
  items, test = read_split(out_dir, "test_choices"), read_split(out_dir, "test")
  labels = {r["audio_id"]: r["labels"] for r in test}
  inputs = {r["audio_id"]: r["input"] for r in test}
  assert {item["audio_id"] for item in items} == set(labels)
  asked = {(item["audio_id"], item["sub-category"]) for item in items}
  assert len(asked) == len(items)
  for audio_id, truth in labels.items():  # speech: gender, speed, pitch; a sound besides: sound
    expected = ({"gender", "speed", "pitch"} if truth["speech"] else set()) | ({"sound"} if truth["sound"] != "speech" else set())
    assert {task for clip, task in asked if clip == audio_id} == expected
  for item in items:
    task = item["sub-category"]
    assert item["answer"] == labels[item["audio_id"]][task] and item["answer"] in item["choices"]
    assert sorted(item["choices"]) == sorted(set(item["choices"]))
    assert len(item["choices"]) == (tiny_data.MC_SOUND_CHOICES if task == "sound" else len(tiny_data.class_names()[task]))
    assert item["task"] == ("sound" if task == "sound" else "speech") and item["input"] == inputs[item["audio_id"]]
    assert item["question"] == tiny_data.CHOICE_QUESTIONS[task]
  assert len({item["choices"].index(item["answer"]) for item in items}) > 1  # the right choice is not always first


def test_answers_name_their_labels(out_dir):
  for record in read_split(out_dir, "train") + read_split(out_dir, "test"):
    labels, output, task = record["labels"], record["output"], record["task"]
    if task == "asr":
      assert output == labels["text"]
    elif task == "gender":
      assert ("female" in output) == (labels["gender"] == "female") and "male" in output
    elif task == "speed":
      assert tiny_data.SPEED_WORDS[labels["speed"]] in output
    elif task == "pitch":
      assert f"{labels['pitch']}-pitched" in output
    elif task == "sound":
      heard = [name for name in tiny_data.SOUNDS if tiny_data.SOUNDS[name].phrase in output]
      assert heard == ([] if labels["sound"] == "speech" else [labels["sound"]])
      assert ("speech" in output) == labels["speech"]
    else:
      assert (labels["speech"] and labels["text"] in output and labels["gender"] in output) or (
        not labels["speech"] and "No one speaks" in output
      )
      if labels["sound"] != "speech":
        assert tiny_data.SOUNDS[labels["sound"]].evidence in output


def test_same_seed_gives_the_same_dataset_and_a_rebuild_skips_existing_audio(out_dir, tmp_path):
  train = read_split(out_dir, "train")
  modified = {r["audio_id"]: os.stat(r["audio_id"]).st_mtime_ns for r in train}
  tiny_data.build(out_dir, SEED, TRAIN, TEST, progress=False)
  assert read_split(out_dir, "train") == train
  assert {path: os.stat(path).st_mtime_ns for path in modified} == modified

  other = tiny_data.build(tmp_path, SEED, TRAIN, TEST, progress=False)
  relocated = json.loads(json.dumps(train).replace(str(out_dir), str(tmp_path)))
  assert other["train"] == relocated
  for record in train[:: len(tiny_data.TASKS)]:
    twin = record["audio_id"].replace(str(out_dir), str(tmp_path))
    with open(record["audio_id"], "rb") as ours, open(twin, "rb") as theirs:
      assert ours.read() == theirs.read()
  assert tiny_data.build(tmp_path / "seed4", SEED + 1, TRAIN, TEST, progress=False)["train"] != train


def test_gender_is_heard_in_the_voice():
  """Every male voice at its highest pitch stays below every female voice at its lowest."""
  sentence = tiny_data.SENTENCES[0]
  male = [
    median_f0(tiny_data.speak(sentence, voice, 160, tiny_data.PITCHES["male", "high"][1]))
    for voice in tiny_data.VOICES["male"]
  ]
  female = [
    median_f0(tiny_data.speak(sentence, voice, 160, tiny_data.PITCHES["female", "low"][0]))
    for voice in tiny_data.VOICES["female"]
  ]
  assert min(female) > MIN_GENDER_F0_RATIO * max(male), (male, female)


def test_speed_is_heard_in_the_duration():
  sentence, voice = tiny_data.SENTENCES[0], tiny_data.VOICES["female"][0]
  slow = tiny_data.speak(sentence, voice, tiny_data.SPEEDS["slow"][1], 50)
  fast = tiny_data.speak(sentence, voice, tiny_data.SPEEDS["fast"][0], 50)
  assert len(slow) > MIN_SLOW_TO_FAST_DURATION * len(fast)


def test_the_longest_sentence_read_slowly_fits_ten_seconds():
  longest = max(tiny_data.SENTENCES, key=len)
  for gender, voices in tiny_data.VOICES.items():
    for voice in voices:
      clip = tiny_data.Clip(
        split="train", index=0, kind="mixed", seed=0, text=longest, voice=voice, gender=gender, speed="slow",
        words_per_minute=tiny_data.SPEEDS["slow"][0], pitch="low", espeak_pitch=tiny_data.PITCHES[gender, "low"][0],
        sound="siren",
      )
      assert len(tiny_data.render(clip)) <= tiny_data.MAX_SECONDS * tiny_data.SAMPLE_RATE


def test_transcriber_fills_input_once_per_clip(tmp_path, monkeypatch):
  heard = []

  def transcribe_batch(loaded, waveforms):
    heard.extend(waveforms)
    return [f"whisper heard {len(w)} samples" for w in waveforms]

  monkeypatch.setattr(tiny_data.model_folder, "load", lambda folder: types.SimpleNamespace(kind="whisper"))
  monkeypatch.setattr(tiny_data.transcribe, "transcribe_batch", transcribe_batch)
  splits = tiny_data.build(tmp_path, SEED, 4, 0, transcriber="whisper-folder", progress=False)
  for record in splits["train"]:
    if record["labels"]["speech"]:
      samples = sf.info(record["audio_id"]).frames
      assert (record["input"], record["input_source"]) == (f"whisper heard {samples} samples", "whisper")
    else:
      assert (record["input"], record["input_source"]) == ("", "none")
  speech_clips = len(heard)
  assert speech_clips == 3
  # the cache answers a rebuild with the same model folder
  assert tiny_data.build(tmp_path, SEED, 4, 0, transcriber="whisper-folder", progress=False) == splits
  assert len(heard) == speech_clips
