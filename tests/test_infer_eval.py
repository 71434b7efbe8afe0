"""Answer parsing and scoring on crafted answers; `eval` and `infer` end to end on a tiny random LTU-AS."""

from __future__ import annotations

import collections
import itertools
import dataclasses
import json
import os
import re

import jax
import numpy as np
import pytest
import soundfile as sf

from ltu_jax import audio, data, generate, infer, model_folder, tiny_data, train, transcribe
from ltu_jax import eval as ltu_eval
from ltu_jax.generate import LTU_AS_SAMPLING, SamplingConfig
from tests import train_setup

NEW_TOKENS = 6
GREEDY = SamplingConfig(max_new_tokens=NEW_TOKENS, repetition_penalty=1.1)
SAMPLED = dataclasses.replace(LTU_AS_SAMPLING, max_new_tokens=NEW_TOKENS, temperature=1.0)  # T=1: seeds matter
TEST_CLIPS = 8  # tiny_data clips: kinds cycle speech, mixed, speech, sound
BATCH = 4
WER_TOL = 1e-9
QUESTION = "what was said"
ROW_KEYS = {"prompt", "pred", "ref", "audio_id", "task"}


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
  return train_setup.build_answering(str(tmp_path_factory.mktemp("infer_eval")), records=12)


@pytest.fixture(scope="module")
def loaded(parts):
  return infer.load_model(parts["ltu_as"])


@pytest.fixture(scope="module")
def wavs(parts):
  return train_setup.speech_and_tone(parts["root"])


@pytest.fixture(scope="module")
def test_records(parts, wavs):
  """tiny_data's records of TEST_CLIPS planned clips, on the cached features; the last clip is the espeak
  wav, which has no cached feature (so eval computes it)."""
  cached = sorted(
    record["audio_id"] for record in json.load(open(parts["train"]))
  )
  clips = tiny_data.plan_clips(0, 0, TEST_CLIPS)
  audio_ids = cached[: TEST_CLIPS - 1] + [wavs[0]]
  records = [r for clip, audio_id in zip(clips, audio_ids) for r in tiny_data.records(clip, audio_id, None, None)]
  path = os.path.join(parts["root"], "test.json")
  with open(path, "w") as f:
    json.dump(records, f)
  return path, records


# ---------------------------------------------------------------------------------------------------
# Parsing and scoring


def test_gender_rule_reads_female_before_male():
  assert ltu_eval.parse_gender("The speaker is female.") == "female"  # contains "male" too
  assert ltu_eval.parse_gender("A MALE voice.") == "male"
  assert ltu_eval.parse_gender("Not male: female.") == "female"  # the original's rule: "female" wins
  assert ltu_eval.parse_gender("A woman speaks.") is None  # unparsed, so wrong


def test_classes_are_whole_words_and_synonyms():
  vocabulary = ltu_eval.vocabularies([])  # tiny_data's classes
  sounds = vocabulary["sound"]
  assert set(sounds) == {*tiny_data.SOUNDS, "speech"}
  assert ltu_eval.named_classes("The sound of a bell.", sounds) == {"bell"}
  assert ltu_eval.named_classes("The sound of speech and a siren.", sounds) == {"speech", "siren"}
  assert ltu_eval.named_classes("Sirens and an engine.", sounds) == {"siren", "engine hum"}
  assert ltu_eval.named_classes("A bellow, a tapestry.", sounds) == set()  # not "bell", not "tap"
  assert ltu_eval.named_classes("White noise.", sounds) == {"white noise"}
  assert ltu_eval.parse_class("The speaker talks quickly.", vocabulary["speed"]) == "fast"
  assert ltu_eval.parse_class("Neither slow nor fast.", vocabulary["speed"]) is None  # two classes
  assert ltu_eval.parse_class("It is speech.", vocabulary["speed"]) is None
  assert ltu_eval.parse_class("A high-pitched voice.", vocabulary["pitch"]) == "high"


def test_vocabularies_come_from_the_labels():
  records = [{"labels": {"speech": False, "sound": "dog bark", "speed": None, "pitch": None}}]
  vocabulary = ltu_eval.vocabularies(records)
  assert set(vocabulary["sound"]) == {*tiny_data.SOUNDS, "speech", "dog bark"}
  assert vocabulary["sound"]["dog bark"] == ("dog bark",)
  assert set(vocabulary["speed"]) == set(tiny_data.SPEED_WORDS)


@pytest.mark.parametrize(
  "hypothesis, reference, errors",
  [("a b c", "a b c", 0), ("a x c", "a b c", 1), ("a c", "a b c", 1), ("a b c d e", "a b c", 2), ("", "a b", 2),
   ("b c d", "a b c", 2), ("c b a", "a b c", 2)],
)
def test_word_errors(hypothesis, reference, errors):
  assert ltu_eval.word_errors(hypothesis.split(), reference.split()) == errors


def test_wer_normalises_and_pools_the_corpus():
  assert ltu_eval.word_error_rate(["Spoken text: The cat, sat!"], ["the cat sat"]) == 0.0
  # 1 error in 2 words + 2 errors in 6 words: 3 / 8 over the corpus (not the mean of 50% and 33%)
  wer = ltu_eval.word_error_rate(["hello", "a b c d e x y"], ["hello world", "a b c d e f"])
  assert abs(wer - 100 * 3 / 8) < WER_TOL


def test_score_rules_on_crafted_answers(test_records):
  _, records = test_records
  perfect = ltu_eval.score(records, [r["output"] for r in records])
  tasks = collections.Counter(r["task"] for r in records)
  assert set(perfect) == set(tiny_data.TASKS) and {t: s.n for t, s in perfect.items()} == tasks
  assert perfect["asr"] == ("WER", 0.0, tasks["asr"], 100.0)
  for task in set(tiny_data.TASKS) - {"asr"}:
    assert perfect[task].value == 100.0 and perfect[task].chance < 100.0, task

  def answers(rewrite):
    return [rewrite(r) if rewrite(r) is not None else r["output"] for r in records]

  # Every gender answer says "female": right exactly on the female speakers.
  said_female = ltu_eval.score(records, answers(lambda r: "female" if r["task"] == "gender" else None))
  genders = [r["labels"]["gender"] for r in records if r["task"] == "gender"]
  assert said_female["gender"].value == 100 * genders.count("female") / len(genders)
  # A mixed clip's answer naming its sound but not the speech, or a sound clip's naming a second sound: wrong.
  sounds = [r for r in records if r["task"] == "sound"]
  extra = ltu_eval.score(records, answers(lambda r: r["output"] + " And a whistle." if r["task"] == "sound" else None))
  assert extra["sound"].value == 100 * sum(r["labels"]["sound"] == "whistle" for r in sounds) / len(sounds)
  missing_speech = answers(lambda r: f"The sound of {r['labels']['sound']}." if r["task"] == "sound" else None)
  mixed = sum(r["labels"]["speech"] and r["labels"]["sound"] != "speech" for r in sounds)
  assert ltu_eval.score(records, missing_speech)["sound"].value == 100 * (len(sounds) - mixed) / len(sounds)
  # Empty answers: accuracy 0 everywhere, WER 100 (all deletions).
  empty = ltu_eval.score(records, [""] * len(records))
  assert empty["asr"].value == 100.0
  assert all(empty[t].value == 0.0 for t in ("gender", "speed", "pitch", "sound"))


def test_compare_has_both_columns():
  before = {"gender": ltu_eval.Score("accuracy", 50.0, 10, 60.0), "asr": ltu_eval.Score("WER", 120.0, 10, 100.0)}
  after = {"gender": ltu_eval.Score("accuracy", 90.0, 10, 60.0), "asr": ltu_eval.Score("WER", 5.0, 10, 100.0)}
  text = ltu_eval.compare(before, after)
  header, _, gender, asr = text.splitlines()
  assert header.split() == ["task", "metric", "n", "before", "after", "chance"]
  assert gender.split() == ["gender", "accuracy", "%", "10", "50.0", "90.0", "60.0"]
  assert asr.split() == ["asr", "WER", "%", "10", "120.0", "5.0", "100.0"]


# ---------------------------------------------------------------------------------------------------
# eval end to end


def test_eval_writes_the_original_format(loaded, parts, test_records, tmp_path):
  path, records = test_records
  out = tmp_path / "preds.jsonl"
  scores = ltu_eval.evaluate(
    loaded, path, parts["features"], out=out, batch_size=BATCH, sampling=GREEDY, progress=False
  )
  rows = [json.loads(line) for line in out.read_text().splitlines()]
  assert len(rows) == len(records) and all(set(row) == ROW_KEYS for row in rows)
  assert [(r["prompt"], r["ref"], r["audio_id"], r["task"]) for r in rows] == [
    (r["instruction"], r["output"], r["audio_id"], r["task"]) for r in records
  ]
  assert all(isinstance(row["pred"], str) for row in rows)
  assert {t: s.n for t, s in scores.items()} == collections.Counter(r["task"] for r in records)
  assert all(0.0 <= s.value <= 100.0 for t, s in scores.items() if s.metric == "accuracy")
  assert scores["asr"].value >= 0.0
  # The same answers again, greedy: the written predictions score as `evaluate` reported.
  assert ltu_eval.score(records, [row["pred"] for row in rows]) == scores


def test_eval_scores_reference_answers_perfectly(loaded, parts, test_records, monkeypatch):
  path, records = test_records
  monkeypatch.setattr(ltu_eval, "predict", lambda loaded, records, *args, **kwargs: [r["output"] for r in records])
  scores = ltu_eval.evaluate(loaded, path, parts["features"], progress=False)
  assert scores["asr"].value == 0.0
  assert all(s.value == 100.0 for t, s in scores.items() if s.metric == "accuracy")


def test_eval_cli_passes_its_options_and_prints_the_table(parts, test_records, tmp_path, capsys, monkeypatch):
  path, records = test_records
  seen = {}

  def predict(loaded, records, store, **options):
    seen.update(options)
    return [r["output"] for r in records]

  monkeypatch.setattr(ltu_eval, "predict", predict)
  out = tmp_path / "preds.jsonl"
  argv = ["--model", parts["ltu_as"], "--data", path, "--features", parts["features"], "--out", str(out),
          "--limit", str(BATCH), "--batch-size", str(BATCH), "--max-new-tokens", str(NEW_TOKENS), "--greedy"]
  assert ltu_eval.main(argv) == 0
  assert seen["batch_size"] == BATCH and seen["mode"] == "joint"
  assert seen["sampling"] == dataclasses.replace(LTU_AS_SAMPLING, max_new_tokens=NEW_TOKENS, do_sample=False)
  assert len(out.read_text().splitlines()) == BATCH
  lines = capsys.readouterr().out.strip().splitlines()
  tasks = list(dict.fromkeys(r["task"] for r in records[:BATCH]))
  assert [line.split()[0] for line in lines[2:]] == [t.split()[0] for t in tasks]
  assert all(line.split()[-2] in ("100.0", "0.0") for line in lines[2:])  # accuracy 100, WER 0


def test_eval_names_a_clip_without_features_or_audio(loaded, parts, tmp_path):
  record = {"instruction": "q", "input": "", "output": "a", "audio_id": "/nowhere/clip.wav", "task": "sound"}
  path = tmp_path / "bad.json"
  path.write_text(json.dumps([record]))
  with pytest.raises(ValueError, match="/nowhere/clip.wav"):
    ltu_eval.evaluate(loaded, path, parts["features"], progress=False)


def test_eval_skip_bad_leaves_out_bad_records_and_clips_and_lists_them(loaded, parts, test_records, tmp_path, capsys):
  path, records = test_records
  corrupt = tmp_path / "corrupt.wav"
  corrupt.write_bytes(b"RIFF not really a wave file")
  bad_clip = {**records[0], "audio_id": str(corrupt)}  # no cached feature: its audio is read, and fails
  missing = {**records[0], "audio_id": "/nowhere/clip.wav"}
  rows = [records[0], {"instruction": "no output"}, bad_clip, records[1], missing]
  data_file = tmp_path / "mixed.json"
  data_file.write_text(json.dumps(rows))
  with pytest.raises(ValueError, match="record 1: field 'input' is missing"):
    ltu_eval.evaluate(loaded, data_file, parts["features"], sampling=GREEDY, progress=False)
  out = tmp_path / "preds.jsonl"
  scores = ltu_eval.evaluate(loaded, data_file, parts["features"], out=out, sampling=GREEDY, progress=False, skip_bad=True)
  assert sum(s.n for s in scores.values()) == 2
  assert [json.loads(line)["audio_id"] for line in open(out)] == [records[0]["audio_id"], records[1]["audio_id"]]
  err = capsys.readouterr().err
  assert "left out 1 bad records" in err and "questions about 2 clips" in err
  assert f"  {corrupt}: cannot compute features of audio {corrupt}" in err and "  /nowhere/clip.wav: audio file" in err


# ---------------------------------------------------------------------------------------------------
# infer


def test_transcript_clean_up():
  assert infer.clean_transcript(" Hello there. Thanks for watching!") == "Hello there."
  assert infer.clean_transcript("THANK YOU FOR WATCHING.") == ""
  assert infer.clean_transcript("We were watching birds.") == "We were watching birds."


def test_hear_gives_what_each_mode_needs(loaded, wavs):
  waveforms = [audio.load_audio(path) for path in wavs]
  joint = infer.hear(loaded, waveforms, "joint")
  assert len(joint.transcripts) == 2 and all(isinstance(t, str) for t in joint.transcripts)
  config = loaded.config
  assert joint.features.shape == (2, config.feature_layers, config.audio_tokens, config.tltr.dim)
  assert joint.features.dtype == np.float32
  assert infer.hear(loaded, waveforms, "audio_only").transcripts is None
  assert infer.hear(loaded, waveforms, "asr_only").features is None


def test_answers_are_one_per_file_and_seeded(loaded, wavs):
  first = infer.answer(loaded, wavs, QUESTION, sampling=SAMPLED, key=jax.random.key(0))
  assert len(first) == 2 and all(isinstance(a, str) for a in first)
  assert infer.answer(loaded, wavs, QUESTION, sampling=SAMPLED, key=jax.random.key(0)) == first
  greedy = infer.answer(loaded, wavs, QUESTION, sampling=GREEDY)
  assert infer.answer(loaded, wavs, QUESTION, sampling=GREEDY) == greedy
  # Left padding changes nothing: each clip alone gets its batched answer.
  heard = infer.hear(loaded, [audio.load_audio(path) for path in wavs])
  alone = [
    infer.respond(
      loaded, [QUESTION], heard.transcripts[i : i + 1], (heard.features[i : i + 1], heard.audio_mask[i : i + 1]),
      sampling=GREEDY,
    )[0]
    for i in range(len(wavs))
  ]
  assert alone == greedy
  for mode in ("audio_only", "asr_only"):
    assert len(infer.answer(loaded, wavs, QUESTION, sampling=GREEDY, mode=mode)) == 2


def test_cli_answers_and_reports_bad_files(parts, loaded, wavs, tmp_path, capsys):
  missing = str(tmp_path / "missing.wav")
  argv = ["--model", parts["ltu_as"], "--greedy", "--max-new-tokens", str(NEW_TOKENS), "--question", QUESTION,
          "--jsonl", wavs[0], missing, wavs[1]]
  assert infer.main(argv) == 1
  captured = capsys.readouterr()
  lines = [json.loads(line) for line in captured.out.splitlines()]
  assert [line["audio"] for line in lines] == [wavs[0], missing, wavs[1]]
  assert missing in lines[1]["error"] and missing in captured.err
  expected = infer.answer(loaded, wavs, QUESTION, sampling=GREEDY)
  assert [lines[0]["answer"], lines[2]["answer"]] == expected
  assert all(isinstance(line["transcript"], str) and line["question"] == QUESTION for line in (lines[0], lines[2]))
  # the text mode: one line per file, each naming it, the failed one in its place
  assert infer.main([a for a in argv if a != "--jsonl"]) == 1
  captured = capsys.readouterr()
  text = captured.out.splitlines()
  assert text[0] == f"{wavs[0]}\t{' '.join(expected[0].splitlines())}" and text[2].startswith(f"{wavs[1]}\t")
  assert text[1].startswith(f"{missing}\terror: audio file not found: {missing}")
  assert "1 of 3 files failed" in captured.err


def test_bad_audio_is_named(loaded, tmp_path):
  missing = str(tmp_path / "missing.wav")
  with pytest.raises(FileNotFoundError, match=missing):
    infer.answer(loaded, [missing], QUESTION, sampling=GREEDY)
  corrupt = tmp_path / "corrupt.wav"
  corrupt.write_bytes(b"RIFF not really a wave file")
  with pytest.raises(audio.AudioError, match=str(corrupt)):
    infer.answer(loaded, [str(corrupt)], QUESTION, sampling=GREEDY)


def test_other_folders_are_refused(parts, wavs, tmp_path, capsys):
  llm = "`infer` needs a model with audio; {} holds an LLM (LLaMA family) (kind 'llama'): convert one with python -m conversion.ltu_as"
  with pytest.raises(ValueError, match=re.escape(llm.format(parts["llm"]))):
    infer.load_model(parts["llm"])
  with pytest.raises(ValueError, match="holds an LLM"):
    infer.answer(model_folder.load(parts["llm"]), wavs, QUESTION, sampling=GREEDY)
  with pytest.raises(ValueError, match=r"`train` needs a model with audio; .* holds an LLM"):
    train.Trainer(train.load_config("tiny_stage1", [f"model={parts['llm']}", f"output_dir={tmp_path / 'run'}"]))
  for folder, message in ((parts["whisper"], "holds a Whisper speech recogniser"), (str(tmp_path), "ltu_jax.json is missing")):
    with pytest.raises(SystemExit) as exit_info:
      infer.main(["--model", folder, wavs[0]])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_fifty_requests_compile_once_per_bucket_and_batching_changes_no_answer(parts, loaded, tmp_path):
  # 50 clips of 0.5-14 s with questions of 1-12 words, through infer and transcribe in batches of 1-8.
  rng = np.random.default_rng(0)
  waveforms = [0.1 * rng.normal(size=int(s * audio.SAMPLE_RATE)).astype(np.float32) for s in rng.uniform(0.5, 14, 50)]
  words = "what is heard here and who speaks or sings how loud".split()
  questions = [" ".join(rng.choice(words, rng.integers(1, 13))) for _ in waveforms]
  whisper = model_folder.load(os.path.join(parts["ltu_as"], "whisper"))
  before = generate.compilations()
  buckets, answers, start = set(), [], 0
  for size in itertools.cycle([8, 3, 1, 5, 8, 2]):
    chunk = slice(start, start + size)
    heard = infer.hear(loaded, waveforms[chunk])
    answers += infer.respond(loaded, questions[chunk], heard.transcripts, heard.audio, sampling=GREEDY)
    batch = len(waveforms[chunk])
    prompts = [len(t) + 1 for t in loaded.tokenizer([data.prompt(q, t) for q, t in zip(questions[chunk], heard.transcripts)], add_special_tokens=False)["input_ids"]]
    buckets.add(("llm", generate.batch_bucket(batch), generate.prompt_bucket(max(prompts))))
    buckets.add(("whisper", generate.batch_bucket(batch), generate.prompt_bucket(len(transcribe.prompt_ids(whisper)))))
    start += size
    if start >= len(waveforms):
      break
  assert generate.compilations() - before <= len(buckets)
  # the same answers one by one (batch 1, their own prompt lengths)
  for index in rng.choice(len(waveforms), 6, replace=False):
    heard = infer.hear(loaded, waveforms[index : index + 1])
    assert infer.respond(loaded, questions[index : index + 1], heard.transcripts, heard.audio, sampling=GREEDY) == [answers[index]]


def test_bfloat16_answers_from_the_same_folder(parts, wavs):
  bf16 = infer.load_model(parts["ltu_as"], dtype="bfloat16")
  assert bf16.config.llm.param_dtype == "bfloat16" and bf16.config.llm.dtype == "bfloat16"
  answers = infer.answer(bf16, wavs, QUESTION, sampling=GREEDY)
  assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
  logits, _ = bf16.model(None, np.ones((1, 3), np.int32))
  assert logits.dtype == np.float32


def test_a_long_clip_fills_its_windows_and_audio_beyond_them_is_named(loaded, tmp_path, caplog):
  rng = np.random.default_rng(1)
  path = str(tmp_path / "long.wav")
  sf.write(path, 0.1 * rng.normal(size=25 * audio.SAMPLE_RATE), audio.SAMPLE_RATE)
  waveform = audio.load_audio(path)
  tokens = loaded.config.audio_tokens
  one = infer.hear(loaded, [waveform], "audio_only", names=[path])  # the folder's 1 window: 15 s dropped
  assert one.features.shape[2] == tokens and f"{path}: 15.0 s of audio beyond 1 window(s) of 10 s" in caplog.text
  three = infer.hear(loaded, [waveform], "audio_only", names=[path], max_windows=3)
  assert three.features.shape[2] == 3 * tokens and three.audio_mask.tolist() == [[1] * 3 * tokens]
  np.testing.assert_array_equal(three.features[:, :, :tokens], one.features)  # the same first window
  four = infer.hear(loaded, [waveform], "audio_only", max_windows=4)  # 3 filled, the 4th masked
  assert four.audio_mask.tolist() == [[1] * 3 * tokens + [0] * tokens]
  answers = [infer.respond(loaded, [QUESTION], None, h.audio, mode="audio_only", sampling=GREEDY) for h in (three, four)]
  assert answers[0] == answers[1]
