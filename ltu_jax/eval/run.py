"""`python -m ltu_jax.eval --model DIR --data FILE --features CACHE_DIR --out OUT_DIR [--audio-dir DIR]
[--labels FILE] [--batch-size 16] [--limit N] [--greedy] [--mode joint|audio_only|asr_only] [--skip-bad]`:
answers every question of a data file and scores the answers per task.

The data is LTU records (a JSON list or JSON lines) or a multiple-choice benchmark in MMAU's or AIR-Bench
Foundation's format (`choices.py`; relative audio paths are looked up in `--audio-dir`). Features come from
the cache (`data.FeatureStore`; a clip without a cached file is encoded with the folder's Whisper) and the
record's `input` is the transcript, as in training. Tasks, protocols and metrics: `tasks.py`.

OUT_DIR gets:
  predictions.jsonl   one `{"prompt" (the instruction), "pred", "ref", "audio_id", "task"}` line per question,
                      as the original writes them (ltu `src/ltu_as/inference_batch.py`), appended batch by batch
  summary.md          the table of scores per task (also printed)
  summary.json        the same, with the run's settings and the items left out
  scores.png          a bar chart of each task's headline score
  run.json            the model, data and decoding settings that the predictions belong to
  transcripts.json    Whisper's transcripts of the clips whose items carry none (MMAU's, AIR-Bench's), for
                      the prompt of a model that takes one (LTU-AS, unless --mode audio_only)
A rerun with the same OUT_DIR answers only the questions that predictions.jsonl lacks (sampled answers use
the key of their new batch); a different model, data file or decoding setting there is refused.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import sys
from typing import Any, Callable, Sequence

import jax
from tqdm import tqdm

from ltu_jax import audio, data, infer, kinds, model_folder, transcribe
from ltu_jax import features as audio_features
from ltu_jax.eval import choices, embedding, report, tasks
from ltu_jax.eval.embedding import Embedder
from ltu_jax.generate import SamplingConfig
from ltu_jax.model_folder import Loaded

PREDICTIONS, RUN, TRANSCRIPTS = "predictions.jsonl", "run.json", "transcripts.json"
TRANSCRIBE_BATCH = 8  # clips per Whisper call


def feature_store(
  loaded: Loaded, records: Sequence[dict[str, Any]], cache_dir: str | os.PathLike, max_windows: int | None = None
) -> data.FeatureStore:
  """The cache of `loaded`'s feature shape; with the folder's Whisper only if some clip is not cached."""
  store = audio_features.store(loaded, cache_dir, max_windows=max_windows)
  if all(os.path.isfile(store.path(record["audio_id"])) for record in records):
    return store
  return audio_features.store(loaded, cache_dir, audio_features.for_model(loaded, max_windows), max_windows)


def predict(
  loaded: Loaded,
  records: Sequence[dict[str, Any]],
  store: data.FeatureStore | None,
  *,
  sampling: SamplingConfig | None = None,
  mode: str = "joint",
  key: jax.Array | None = None,
  batch_size: int = 16,
  progress: bool = True,
  skip_bad: bool = False,
  bad: list[tuple[str, str]] | None = None,
  on_batch: Callable[[list[dict[str, Any]], list[str]], None] | None = None,
) -> list[str | None]:
  """The model's answer to each record, in batches of `batch_size` (the engine pads the last one into its
  bucket). `store` gives the features (None in asr_only mode); batch b samples with `fold_in(key, b)`. A
  clip whose features cannot be had raises `DataError`, or with `skip_bad` gets None answers and a line in
  `bad` (audio id, why). `on_batch(records, answers)` sees each batch's answered records."""
  predictions: list[str | None] = []
  with tqdm(total=len(records), unit=" questions", file=sys.stderr, disable=not progress) as bar:
    for batch, start in enumerate(range(0, len(records), batch_size)):
      chunk = list(records[start : start + batch_size])
      audio_in, clips = None, {}
      if mode != "asr_only":
        for audio_id in dict.fromkeys(r["audio_id"] for r in chunk):  # questions share clips: load each once
          try:
            clips[audio_id] = store.load(audio_id)
          except data.DataError as error:
            if not skip_bad:
              raise
            bad.append((audio_id, str(error)))
        chunk = [r for r in chunk if r["audio_id"] in clips]
        if chunk:
          audio_in = data.pad_audio([clips[r["audio_id"]] for r in chunk], store.max_tokens)
      answers = infer.respond(
        loaded, [r["instruction"] for r in chunk], [r["input"] for r in chunk], audio_in,
        mode=mode, sampling=sampling, key=None if key is None else jax.random.fold_in(key, batch),
      ) if chunk else []
      if on_batch is not None and chunk:
        on_batch(chunk, answers)
      answered = iter(answers)
      real = records[start : start + batch_size]
      predictions += [next(answered) if mode == "asr_only" or r["audio_id"] in clips else None for r in real]
      bar.update(len(real))
  return predictions


def prediction_row(record: dict[str, Any], prediction: str) -> dict[str, Any]:
  """The original's output record, with the task: `{prompt (the instruction), pred, ref, audio_id, task}`."""
  return {
    "prompt": record["instruction"], "pred": prediction, "ref": record["output"], "audio_id": record["audio_id"],
    "task": record.get("task", ""),
  }


def fill_transcripts(
  loaded: Loaded, records: Sequence[dict[str, Any]], mode: str, out: str | None, bad: list[tuple[str, str]] | None
) -> None:
  """Sets the `input` of records without one (multiple-choice items carry no transcript) to the clip's
  transcript by the folder's Whisper, as `infer` does, where the model's prompt has one (else to "").
  Transcripts are kept in `out`/transcripts.json for a rerun. A clip that cannot be read raises
  `AudioError`, or with `bad` given is added to it (audio id, why) and its records keep None."""
  need = [r for r in records if r["input"] is None]
  if not need or mode == "audio_only" or not kinds.get(loaded.kind).uses_transcript:
    for record in need:
      record["input"] = ""
    return
  cache_file = None if out is None else os.path.join(out, TRANSCRIPTS)
  cache = {}
  if cache_file is not None and os.path.isfile(cache_file):
    with open(cache_file, encoding="utf-8") as f:
      cache = json.load(f)
  clips = [a for a in dict.fromkeys(r["audio_id"] for r in need) if a not in cache]
  whisper = audio_features.load_whisper(audio_features.whisper_folder(loaded)) if clips else None
  for start in tqdm(range(0, len(clips), TRANSCRIBE_BATCH), desc="transcribing", file=sys.stderr, disable=not clips):
    waveforms = {}
    for audio_id in clips[start : start + TRANSCRIBE_BATCH]:
      try:
        waveforms[audio_id] = audio.load_audio(audio_id)
      except (audio.AudioError, FileNotFoundError) as error:
        if bad is None:
          raise
        bad.append((audio_id, str(error)))
    texts = transcribe.transcribe_batch(whisper, list(waveforms.values())) if waveforms else []
    cache.update((audio_id, infer.clean_transcript(text)) for audio_id, text in zip(waveforms, texts))
    if cache_file is not None:
      with open(cache_file, "w", encoding="utf-8") as f:
        json.dump(cache, f, indent=1, ensure_ascii=False)
  for record in need:
    record["input"] = cache.get(record["audio_id"])


def read_data(
  path: str | os.PathLike, audio_dir: str | None, skip_bad: bool
) -> tuple[list[dict[str, Any]], int, list[tuple[str, str]]]:
  """(records, bad LTU records skipped (logged), bad multiple-choice items (item, why))."""
  path = os.fspath(path)
  if path.endswith(".json") and os.path.isfile(path):
    items = choices.read(path)
    if choices.is_choices_file(items):
      records, bad = choices.records(path, items, audio_dir, skip_bad)
      return records, 0, bad
  records, skipped = data.read_records(path, skip_bad=skip_bad)
  return records, skipped, []


def earlier_answers(out_dir: str, settings: dict[str, Any], records: Sequence[dict[str, Any]]) -> list[str | None]:
  """Each record's answer in `out_dir`'s predictions (None: not answered yet). The n-th record of a
  (clip, instruction) pair takes the n-th such line. Refuses predictions made with other settings."""
  run_file = os.path.join(out_dir, RUN)
  if os.path.isfile(run_file):
    with open(run_file) as f:
      earlier = json.load(f)
    if earlier != settings:
      changed = sorted(k for k in {*earlier, *settings} if earlier.get(k) != settings.get(k))
      raise ValueError(
        f"{out_dir} holds predictions made with other settings ({', '.join(changed)} differ: "
        f"{ {k: earlier.get(k) for k in changed} }); pass another --out or delete it"
      )
  found: dict[tuple[str, str], collections.deque] = collections.defaultdict(collections.deque)
  path = os.path.join(out_dir, PREDICTIONS)
  if os.path.isfile(path):
    with open(path, encoding="utf-8") as f:
      for number, line in enumerate(f, start=1):
        try:
          row = json.loads(line)
          found[row["audio_id"], row["prompt"]].append(row["pred"])
        except (json.JSONDecodeError, KeyError, TypeError) as error:
          raise ValueError(f"{path}: line {number}: not a prediction line ({error}); delete the file to start over") from error
  pending = [found[r["audio_id"], r["instruction"]] for r in records]
  return [answers.popleft() if answers else None for answers in pending]


def _saved(folder: str) -> float | None:
  """When the model folder was last written: a retrained model in the same folder answers anew."""
  config = os.path.join(folder, model_folder.CONFIG_FILE)
  return os.path.getmtime(config) if os.path.isfile(config) else None


def evaluate(
  model: Loaded | str | os.PathLike,
  data_path: str | os.PathLike,
  features: str | os.PathLike,
  *,
  out: str | os.PathLike | None = None,
  audio_dir: str | os.PathLike | None = None,
  labels: str | os.PathLike | dict[str, tasks.TaskLabels] | None = None,
  batch_size: int = 16,
  limit: int | None = None,
  sampling: SamplingConfig | None = None,
  mode: str = "joint",
  key: jax.Array | None = None,
  embedder: Embedder | None = None,
  progress: bool = True,
  max_windows: int | None = None,
  skip_bad: bool = False,
) -> dict[str, tasks.TaskScore]:
  """Answers the questions of `data_path` (the first `limit`) that `out` has no answer to yet, writes the
  predictions and the reports to the folder `out` (see the module docstring), and returns the scores per
  task.

  `model` is an audio-language model folder or a loaded one; `features` the cache dir; `labels` a label
  file (`tasks.read_labels`); `embedder` the sentence embedder (default: `embedding.default()`, loaded on
  first use); `max_windows` the 10 s windows a clip may fill (default: the model's). A bad record, item or
  clip (malformed, no features, unreadable audio) stops the run naming it, or with `skip_bad` is left out,
  and the items left out are listed on stderr at the end."""
  if isinstance(model, (str, os.PathLike)):
    loaded = infer.load_model(model, "eval")
  else:
    loaded = infer.require_audio_llm(model, "eval")
  infer.check_mode(mode)
  if isinstance(labels, (str, os.PathLike)):
    labels = tasks.read_labels(labels)
  records, skipped, bad = read_data(data_path, None if audio_dir is None else os.fspath(audio_dir), skip_bad)
  records = records[:limit]
  settings = {
    "model": os.path.abspath(loaded.folder), "model_saved": _saved(loaded.folder), "data": os.path.abspath(data_path), "mode": mode,
    "sampling": None if sampling is None else dataclasses.asdict(sampling), "max_windows": max_windows,
  }
  answers: list[str | None] = [None] * len(records)
  if out is not None:
    out = os.fspath(out)
    os.makedirs(out, exist_ok=True)
    answers = earlier_answers(out, settings, records)
    with open(os.path.join(out, RUN), "w") as f:
      json.dump(settings, f, indent=1)
  missing = [r for r, a in zip(records, answers) if a is None]
  if progress:
    resumed = f" ({len(records) - len(missing)} already in {out})" if out is not None else ""
    print(f"answering {len(missing)} of {len(records)} questions{resumed}", file=sys.stderr)
  store, bad_clips = None, []
  if mode != "asr_only" and missing:
    store = feature_store(loaded, missing, features, max_windows)
    for audio_id in dict.fromkeys(r["audio_id"] for r in missing):
      if (problem := store.problem(audio_id)) is None:
        continue
      if not skip_bad:
        raise data.DataError(f"{data_path}: {problem}")
      bad_clips.append((audio_id, problem))
    left_out = {audio_id for audio_id, _ in bad_clips}
    missing = [r for r in missing if r["audio_id"] not in left_out]
  try:
    fill_transcripts(loaded, missing, mode, out, bad_clips if skip_bad else None)
  except (audio.AudioError, FileNotFoundError) as error:
    raise data.DataError(f"{data_path}: {error}") from error
  missing = [r for r in missing if r["input"] is not None]

  def append(chunk: list[dict[str, Any]], chunk_answers: list[str]) -> None:
    with open(os.path.join(out, PREDICTIONS), "a", encoding="utf-8") as f:
      f.writelines(json.dumps(prediction_row(r, a), ensure_ascii=False) + "\n" for r, a in zip(chunk, chunk_answers))

  try:
    new = predict(
      loaded, missing, store, sampling=sampling, mode=mode, key=key, batch_size=batch_size, progress=progress,
      skip_bad=skip_bad, bad=bad_clips, on_batch=None if out is None else append,
    )
  except data.DataError as error:  # the answers so far are kept: a rerun after fixing the clip resumes
    raise data.DataError(f"{data_path}: {error}") from error
  by_record = {id(r): a for r, a in zip(missing, new)}
  answers = [a if a is not None else by_record.get(id(r)) for r, a in zip(records, answers)]
  answered = [(r, a) for r, a in zip(records, answers) if a is not None]
  left_out = [*bad, *bad_clips]
  scores = tasks.score([r for r, _ in answered], [a for _, a in answered], embedder or embedding.default(), labels)
  if out is not None:
    title = f"{os.path.basename(os.path.normpath(loaded.folder))} on {os.path.basename(os.fspath(data_path))}"
    report.write(out, scores, title, **settings, bad_records=skipped, left_out=left_out)
  if skipped or left_out:
    print(
      f"left out {skipped} bad records of {data_path} (named above) and the questions about {len(bad_clips)} clips"
      + (f" and {len(bad)} bad items" if bad else "") + ":",
      file=sys.stderr,
    )
    for item, why in left_out:
      print(f"  {item}: {why}", file=sys.stderr)
  return scores


def parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
    prog="python -m ltu_jax.eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument("--model", required=True, help="an LTU-AS model folder")
  parser.add_argument("--data", required=True, help="LTU records (.json list or .jsonl), or an MMAU / AIR-Bench JSON")
  parser.add_argument("--features", required=True, help="the Whisper feature cache (python -m ltu_jax.extract_features)")
  parser.add_argument("--out", help="the folder for predictions and reports; rerun with it to resume")
  parser.add_argument("--audio-dir", help="where relative audio paths of a multiple-choice file are")
  parser.add_argument("--labels", help="a label file: {task: [labels]} or {task: {protocol, labels}}")
  parser.add_argument("--limit", type=int, help="answer only the first N questions")
  parser.add_argument("--skip-bad", action="store_true", help="leave out bad records and clips, listed at the end")
  infer.add_generation_arguments(parser, batch_size=16)
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  cli = parser()
  args = cli.parse_intermixed_args(argv)
  infer.check_arguments(cli, args)
  try:
    loaded = infer.load_model(args.model, "eval", dtype=args.dtype)
  except (FileNotFoundError, ValueError) as error:
    cli.error(str(error))
  scores = evaluate(
    loaded, args.data, args.features, out=args.out, audio_dir=args.audio_dir, labels=args.labels,
    batch_size=args.batch_size, limit=args.limit, sampling=infer.sampling_from_args(args, loaded), mode=args.mode,
    key=jax.random.key(args.seed), max_windows=args.max_windows, skip_bad=args.skip_bad,
  )
  print(report.table(scores))
  return 0
