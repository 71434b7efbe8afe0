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
from ltu_jax.eval import run as eval_run
from ltu_jax.eval import tasks as eval_tasks
from ltu_jax.generate import LTU_AS_SAMPLING, SamplingConfig
from tests import train_setup

NEW_TOKENS = 6
GREEDY = SamplingConfig(max_new_tokens=NEW_TOKENS, repetition_penalty=1.1)
SAMPLED = dataclasses.replace(LTU_AS_SAMPLING, max_new_tokens=NEW_TOKENS, temperature=1.0)  # T=1: seeds matter
TEST_CLIPS = 8  # tiny_data clips: kinds cycle speech, mixed, speech, sound
BATCH = 4
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
  # the protocols tiny_data has no task for: age, captions, multiple choice given as LTU records
  more = [
    ("age", "How old is the speaker?", "The speaker is about 30 years old.", {"label": 30}),
    ("age", "How old is the speaker?", "Between 40 and 50.", {}),
    ("audio caption", "Write an audio caption.", "A bell rings twice.", {"references": ["A bell rings twice.", "Bells ring."]}),
    ("audio caption", "Write an audio caption.", "A man speaks.", {}),
    ("quiz", "Which? Choose one: (A) bell (B) siren.", "bell", {"choices": ["bell", "siren"]}),
  ]
  records += [
    {"instruction": question, "input": "", "output": output, "audio_id": cached[i], "task": task, **extra}
    for i, (task, question, output, extra) in enumerate(more)
  ]
  path = os.path.join(parts["root"], "test.json")
  with open(path, "w") as f:
    json.dump(records, f)
  return path, records


# ---------------------------------------------------------------------------------------------------
# eval end to end (the metrics themselves: tests/test_eval_metrics.py)


def read_rows(out) -> list[dict]:
  return [json.loads(line) for line in open(os.path.join(out, "predictions.jsonl"))]


def assert_reports(out, tasks_expected):
  """summary.md and summary.json name every task; scores.png is a PNG of nonzero size."""
  summary = json.load(open(os.path.join(out, "summary.json")))
  assert list(summary["tasks"]) == tasks_expected
  markdown = open(os.path.join(out, "summary.md")).read()
  assert all(f"| {task} " in markdown for task in tasks_expected)
  png = open(os.path.join(out, "scores.png"), "rb").read()
  assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 1000
  return summary


def test_eval_writes_the_original_format(loaded, parts, test_records, tmp_path, embedder):
  path, records = test_records
  scores = ltu_eval.evaluate(
    loaded, path, parts["features"], out=tmp_path, batch_size=BATCH, sampling=GREEDY, progress=False, embedder=embedder
  )
  rows = read_rows(tmp_path)
  assert len(rows) == len(records) and all(set(row) == ROW_KEYS for row in rows)
  assert [(r["prompt"], r["ref"], r["audio_id"], r["task"]) for r in rows] == [
    (r["instruction"], r["output"], r["audio_id"], r["task"]) for r in records
  ]
  assert all(isinstance(row["pred"], str) for row in rows)
  assert {t: s.n for t, s in scores.items()} == collections.Counter(r["task"] for r in records)
  assert all(0.0 <= v <= 100.0 for s in scores.values() for m, v in s.metrics.items() if "accuracy" in m)
  assert scores["asr"].metrics["WER %"] >= 0.0
  summary = assert_reports(tmp_path, list(scores))
  assert summary["tasks"]["speed"]["metrics"] == scores["speed"].metrics
  # The same answers again, greedy: the written predictions score as `evaluate` reported.
  assert ltu_eval.score(records, [row["pred"] for row in rows], embedder) == scores
  assert {s.protocol for s in scores.values()} == set(eval_tasks.PROTOCOLS)  # every protocol, end to end


def test_eval_scores_reference_answers_perfectly(loaded, parts, test_records, monkeypatch, embedder):
  path, records = test_records
  monkeypatch.setattr(eval_run, "predict", lambda loaded, records, *args, **kwargs: [r["output"] for r in records])
  scores = ltu_eval.evaluate(loaded, path, parts["features"], progress=False, embedder=embedder)
  assert scores["asr"].metrics["WER %"] == 0.0
  assert all(s.metrics[m] == 100.0 for s in scores.values() for m in s.metrics if "keywords" in m or "rule" in m)


def test_eval_cli_passes_its_options_and_prints_the_table(parts, test_records, tmp_path, capsys, monkeypatch):
  path, records = test_records
  seen = {}

  def predict(loaded, records, store, **options):
    seen.update(options)
    return [r["output"] for r in records]

  monkeypatch.setattr(eval_run, "predict", predict)
  argv = ["--model", parts["ltu_as"], "--data", path, "--features", parts["features"],
          "--limit", str(BATCH), "--batch-size", str(BATCH), "--max-new-tokens", str(NEW_TOKENS), "--greedy"]
  assert ltu_eval.main(argv) == 0
  assert seen["batch_size"] == BATCH and seen["mode"] == "joint"
  assert seen["sampling"] == dataclasses.replace(LTU_AS_SAMPLING, max_new_tokens=NEW_TOKENS, do_sample=False)
  rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in capsys.readouterr().out.strip().splitlines()]
  tasks = list(dict.fromkeys(r["task"] for r in records[:BATCH]))
  assert [row[0] for row in rows[2:] if row[0]] == tasks
  assert all(row[4] in ("100.0", "0.0") for row in rows[2:] if "keywords" in row[3] or "WER" in row[3])


def test_eval_names_a_clip_without_features_or_audio(loaded, parts, tmp_path):
  record = {"instruction": "q", "input": "", "output": "a", "audio_id": "/nowhere/clip.wav", "task": "sound"}
  path = tmp_path / "bad.json"
  path.write_text(json.dumps([record]))
  with pytest.raises(ValueError, match="/nowhere/clip.wav"):
    ltu_eval.evaluate(loaded, path, parts["features"], progress=False)


def test_eval_skip_bad_leaves_out_bad_records_and_clips_and_lists_them(loaded, parts, test_records, tmp_path, capsys, embedder):
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
  out = tmp_path / "out"
  scores = ltu_eval.evaluate(
    loaded, data_file, parts["features"], out=out, sampling=GREEDY, progress=False, skip_bad=True, embedder=embedder
  )
  assert sum(s.n for s in scores.values()) == 2
  assert [row["audio_id"] for row in read_rows(out)] == [records[0]["audio_id"], records[1]["audio_id"]]
  err = capsys.readouterr().err
  assert "left out 1 bad records" in err and "questions about 2 clips" in err
  assert f"  {corrupt}: cannot compute features of audio {corrupt}" in err and "  /nowhere/clip.wav: audio file" in err
  assert {item for item, _ in json.load(open(out / "summary.json"))["left_out"]} == {str(corrupt), "/nowhere/clip.wav"}


@pytest.fixture
def mmau_file(parts, tmp_path):
  """An MMAU-format file: tiny_data's multiple-choice items about the cached clips, their audio paths
  relative to the clips' folder, and one more item about a corrupt clip (given by its absolute path)."""
  cached = sorted({r["audio_id"] for r in json.load(open(parts["train"]))})[:4]
  audio_dir = os.path.commonpath(cached)
  rng = np.random.default_rng(0)
  items = [
    {**item, "audio_id": "./" + os.path.relpath(audio_id, audio_dir)}
    for clip, audio_id in zip(tiny_data.plan_clips(0, 0, len(cached)), cached)
    for item in tiny_data.choice_items(clip, audio_id, "", rng)
  ]
  corrupt = tmp_path / "corrupt.wav"
  corrupt.write_bytes(b"RIFF not really a wave file")
  items.append({**items[0], "id": "bad", "audio_id": str(corrupt)})
  path = tmp_path / "mmau.json"
  path.write_text(json.dumps(items))
  return str(path), audio_dir, items, str(corrupt)


def test_eval_on_an_mmau_file_reports_per_category_resumes_and_skips_bad_clips(parts, mmau_file, tmp_path, capsys, monkeypatch):
  path, audio_dir, items, corrupt = mmau_file
  asked = []
  predict = eval_run.predict
  monkeypatch.setattr(eval_run, "predict", lambda loaded, records, *a, **k: asked.append(len(records)) or predict(loaded, records, *a, **k))
  out = str(tmp_path / "out")
  argv = ["--model", parts["ltu_as"], "--data", path, "--audio-dir", audio_dir, "--features", parts["features"],
          "--out", out, "--greedy", "--max-new-tokens", str(NEW_TOKENS), "--batch-size", str(BATCH)]
  with pytest.raises(ValueError, match=f"{re.escape(path)}: .*{re.escape(corrupt)}"):
    ltu_eval.main(argv)
  # the corrupt clip is in the third batch: the two batches before it are kept, and a rerun resumes from them
  assert asked == [len(items)] and len(read_rows(out)) == 2 * BATCH
  assert ltu_eval.main([*argv, "--skip-bad"]) == 0
  good = len(items) - 1
  rows = read_rows(out)
  assert asked[1:] == [len(items) - 2 * BATCH] and len(rows) == good and all(set(row) == ROW_KEYS for row in rows)
  assert [row["ref"] for row in rows] == [item["answer"] for item in items[:-1]]
  assert all("Choose one: (A) " in row["prompt"] for row in rows)
  captured = capsys.readouterr()
  assert captured.err.rstrip().splitlines()[-1].startswith(f"  {corrupt}: cannot compute features of audio")
  categories = list(dict.fromkeys(item["task"] for item in items))
  summary = assert_reports(out, [*categories, "all (multiple choice)"])
  assert summary["tasks"]["all (multiple choice)"]["n"] == good
  assert all(t["protocol"] == "multiple choice" for t in summary["tasks"].values())
  # Rerun: only the bad clip is tried again, the table is the same; a lost tail of answers is answered again.
  assert ltu_eval.main([*argv, "--skip-bad"]) == 0
  assert asked[2:] == [1] and read_rows(out) == rows and capsys.readouterr().out == captured.out
  with open(os.path.join(out, "predictions.jsonl"), "w") as f:
    f.writelines(json.dumps(row) + "\n" for row in rows[:-3])
  assert ltu_eval.main([*argv, "--skip-bad"]) == 0
  assert asked[3:] == [3 + 1] and read_rows(out) == rows and capsys.readouterr().out == captured.out
  with pytest.raises(ValueError, match="holds predictions made with other settings"):
    ltu_eval.main([*argv, "--skip-bad", "--max-new-tokens", str(NEW_TOKENS + 1)])


def test_eval_transcribes_the_clips_of_items_without_a_transcript_once(loaded, parts, wavs, tmp_path, monkeypatch, embedder):
  items = [
    {"id": i, "audio_id": os.path.basename(wav), "question": "Which?", "choices": ["speech", "tone"], "answer": answer, "task": "sound"}
    for i, (wav, answer) in enumerate(zip(wavs, ["speech", "tone"]))
  ]
  path = tmp_path / "mmau.json"
  path.write_text(json.dumps(items + [{**items[0], "id": 2, "question": "Again?"}]))
  heard = []
  transcribe_batch = transcribe.transcribe_batch
  monkeypatch.setattr(transcribe, "transcribe_batch", lambda whisper, waveforms: heard.append(len(waveforms)) or transcribe_batch(whisper, waveforms))
  out = tmp_path / "out"
  options = dict(out=out, audio_dir=parts["root"], sampling=GREEDY, progress=False, embedder=embedder)
  scores = ltu_eval.evaluate(loaded, path, parts["features"], **options)
  assert heard == [2] and scores["sound"].n == 3  # the two clips in one batch, each once
  transcripts = json.load(open(out / "transcripts.json"))
  assert set(transcripts) == set(wavs) and all(isinstance(t, str) for t in transcripts.values())
  (out / "predictions.jsonl").write_text("")  # answered anew, from the kept transcripts
  assert ltu_eval.evaluate(loaded, path, parts["features"], **options) == scores and heard == [2]
  ltu_eval.evaluate(loaded, path, parts["features"], **{**options, "out": tmp_path / "audio_only"}, mode="audio_only")
  assert heard == [2]  # audio_only: no prompt transcript, no transcription


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
