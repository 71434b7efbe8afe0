"""`python -m ltu_jax.eval --model DIR --data test.json --features CACHE_DIR [--out preds.jsonl]
[--batch-size 16] [--limit N] [--greedy] [--mode joint|audio_only|asr_only]`: answers every question of an
LTU data file and scores the answers per task.

Features come from the cache (`data.FeatureStore`; a clip without a cached file is encoded with the folder's
Whisper) and the record's `input` is the transcript, as in training. Predictions are written as the original
does (ltu `src/ltu_as/inference_batch.py`): one `{"prompt" (the instruction), "pred", "ref", "audio_id",
"task"}` JSON line per record.

Scoring parses the answers (the original embeds them with OpenAI's ada-002 instead, facts §6.1; keyword rules
need no network and are exact on answers that name a label):
- gender: "female" in the lowercased answer → female, else "male" → male, else unparsed (the original's rule,
  except that it reads an unparsed answer as male).
- speed, pitch: the one class of the vocabulary the answer names (its name or a synonym, as a whole word);
  none or several → unparsed.
- sound: the set of sound classes the answer names must equal the clip's (its sound, plus "speech" when
  someone speaks): naming an extra sound is wrong.
- asr: corpus word error rate, sum of word edit distances / reference words, after lowercasing, dropping a
  "spoken text:" prefix and punctuation (ltu `src/ltu_as/eval/eval_librispeech.py`).
- open-ended question: the fraction of answers that get both the speaker's gender (or name none when no one
  speaks) and the set of non-speech sounds right.
The truth is the record's `labels` (tiny_data's ground truth) when it has them, else the same parse of `ref`.
Chance is the score of always giving the most common truth (for WER: of an empty answer, 100%). Records of
other tasks are counted but not scored.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import sys
import unicodedata
from typing import Any, NamedTuple, Sequence

import jax
import numpy as np
from tqdm import tqdm

from ltu_jax import data, infer, tiny_data
from ltu_jax import features as audio_features
from ltu_jax.generate import SamplingConfig
from ltu_jax.model_folder import Loaded

# A label field's vocabulary: class → the words that name it in an answer (lowercase, whole words).
Vocabulary = dict[str, tuple[str, ...]]
# Words besides a class's own name that name it; classes without an entry are named by their name alone.
SYNONYMS: dict[str, tuple[str, ...]] = {
  "siren": ("sirens",),
  "beeping": ("beep", "beeps"),
  "white noise": ("static", "hiss", "hissing"),
  "bell": ("bells", "chime", "chimes"),
  "engine hum": ("engine", "motor"),
  "whistle": ("whistles", "whistling"),
  "tapping": ("tap", "taps", "knock", "knocks", "knocking"),
  "speech": ("speaking", "speaker", "talking"),
  "slow": ("slowly",),
  "normal": ("moderate", "average"),
  "fast": ("quickly", "quick", "rapidly"),
  "low": ("deep",),
}
SPEECH = "speech"
# tiny_data's classes, in every vocabulary that `vocabularies` derives.
DEFAULT_CLASSES = {
  "speed": tuple(tiny_data.SPEED_WORDS),
  "pitch": tuple(sorted({pitch for _, pitch in tiny_data.PITCHES})),
  "sound": (*tiny_data.SOUNDS, SPEECH),
}
ASR, OPEN_ENDED = "asr", "open-ended question"
CLASSIFICATION = ("gender", "speed", "pitch", "sound")


class Score(NamedTuple):
  """One task's result: `metric` "accuracy" or "WER" (both in %), `value` None where the task has no metric."""

  metric: str
  value: float | None
  n: int
  chance: float | None


# ---------------------------------------------------------------------------------------------------
# Answer parsing


def parse_gender(text: str) -> str | None:
  """"female" if the answer contains it (so before "male", which it contains), else "male", else None."""
  text = text.lower()
  return "female" if "female" in text else "male" if "male" in text else None


def named_classes(text: str, vocabulary: Vocabulary) -> frozenset[str]:
  """The classes whose name or synonym appears in `text` as whole words."""
  text = text.lower()
  return frozenset(
    label for label, words in vocabulary.items()
    if any(re.search(rf"\b{re.escape(word)}\b", text) for word in words)
  )


def parse_class(text: str, vocabulary: Vocabulary) -> str | None:
  """The one class the answer names; None when it names none or several."""
  named = named_classes(text, vocabulary)
  return next(iter(named)) if len(named) == 1 else None


def normalize_transcript(text: str) -> list[str]:
  """Words for WER: lowercase, the original's "spoken text:" prefix dropped, punctuation removed."""
  text = text.lower().split("spoken text:")[-1]
  return "".join(c for c in text if not unicodedata.category(c).startswith("P")).split()


def word_errors(hypothesis: Sequence[str], reference: Sequence[str]) -> int:
  """Levenshtein distance between word sequences: substitutions + deletions + insertions."""
  previous = list(range(len(hypothesis) + 1))
  for i, ref_word in enumerate(reference, start=1):
    current = [i]
    for j, hyp_word in enumerate(hypothesis, start=1):
      current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ref_word != hyp_word)))
    previous = current
  return previous[-1]


def word_error_rate(predictions: Sequence[str], references: Sequence[str]) -> float:
  """Corpus WER in %: all edits over all reference words (after `normalize_transcript`)."""
  pairs = [(normalize_transcript(p), normalize_transcript(r)) for p, r in zip(predictions, references, strict=True)]
  words = sum(len(ref) for _, ref in pairs)
  return 100.0 * sum(word_errors(hyp, ref) for hyp, ref in pairs) / max(words, 1)


# ---------------------------------------------------------------------------------------------------
# Scoring


def vocabularies(records: Sequence[dict[str, Any]]) -> dict[str, Vocabulary]:
  """Per label field (speed, pitch, sound): tiny_data's classes and any other class in the records'
  `labels`, each named by itself and its `SYNONYMS`. All of tiny_data's count even where a test set lacks
  some, so that naming one of those is still a recognised (wrong) answer; pass your own vocabulary to
  `score` for data whose class names clash with them."""
  classes = {field: set(default) for field, default in DEFAULT_CLASSES.items()}
  for record in records:
    labels = record.get("labels") or {}
    for field in classes:
      if labels.get(field) is not None:
        classes[field].add(labels[field])
  return {field: {c: (c, *SYNONYMS.get(c, ())) for c in sorted(found)} for field, found in classes.items()}


def truth(record: dict[str, Any], task: str, vocabulary: dict[str, Vocabulary]) -> Any:
  """What a right answer to `record` reads as: from its `labels`, or else its `output` parsed as answers are."""
  labels = record.get("labels")
  if labels is None:
    return reading(record["output"], task, vocabulary)
  sounds = frozenset({labels.get("sound"), SPEECH if labels.get("speech") else None} - {None})
  if task == "sound":
    return sounds
  if task == OPEN_ENDED:
    return labels.get("gender"), sounds - {SPEECH}
  return labels.get(task)


def reading(text: str, task: str, vocabulary: dict[str, Vocabulary]) -> Any:
  """What an answer to a `task` question says, in `truth`'s terms (None: nothing recognised)."""
  if task == "gender":
    return parse_gender(text)
  if task == "sound":
    return named_classes(text, vocabulary["sound"])
  if task == OPEN_ENDED:
    return parse_gender(text), named_classes(text, vocabulary["sound"]) - {SPEECH}
  return parse_class(text, vocabulary[task])


def score(
  records: Sequence[dict[str, Any]], predictions: Sequence[str], vocabulary: dict[str, Vocabulary] | None = None
) -> dict[str, Score]:
  """Scores per task (in the records' order of first appearance); see the module docstring for the rules.

  Args:
    records: LTU records with `task`, `output` and optionally `labels`.
    predictions: one answer per record.
    vocabulary: label field → class → words; by default `vocabularies(records)`.
  """
  if len(records) != len(predictions):
    raise ValueError(f"{len(predictions)} predictions for {len(records)} records")
  vocabulary = vocabulary or vocabularies(records)
  by_task: dict[str, list[int]] = collections.defaultdict(list)
  for index, record in enumerate(records):
    by_task[record.get("task", "")].append(index)
  scores = {}
  for task, indices in by_task.items():
    if task == ASR:
      wer = word_error_rate([predictions[i] for i in indices], [records[i]["output"] for i in indices])
      scores[task] = Score("WER", wer, len(indices), 100.0)
    elif task in CLASSIFICATION or task == OPEN_ENDED:
      truths = [truth(records[i], task, vocabulary) for i in indices]
      right = sum(reading(predictions[i], task, vocabulary) == t for i, t in zip(indices, truths))
      most_common = collections.Counter(truths).most_common(1)[0][1]
      scores[task] = Score("accuracy", 100.0 * right / len(indices), len(indices), 100.0 * most_common / len(indices))
    else:
      scores[task] = Score("-", None, len(indices), None)
  return scores


def _number(value: float | None) -> str:
  return "-" if value is None else f"{value:.1f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
  """Text columns (task, metric) left-aligned, numbers right-aligned."""
  widths = [max(len(row[c]) for row in [header, *rows]) for c in range(len(header))]
  lines = [header, ["-" * w for w in widths], *rows]
  return "\n".join(
    "  ".join(cell.ljust(w) if c < 2 else cell.rjust(w) for c, (cell, w) in enumerate(zip(line, widths)))
    for line in lines
  )


def _row_start(task: str, score: Score) -> list[str]:
  return [task or "(no task)", score.metric if score.value is None else f"{score.metric} %", str(score.n)]


def table(scores: dict[str, Score]) -> str:
  """Rows = tasks; columns metric, n, score, chance."""
  rows = [[*_row_start(task, s), _number(s.value), _number(s.chance)] for task, s in scores.items()]
  return _table(["task", "metric", "n", "score", "chance"], rows)


def compare(before: dict[str, Score], after: dict[str, Score]) -> str:
  """A before/after table (e.g. the untrained and the trained model on one test set)."""
  rows = []
  for task in dict.fromkeys([*before, *after]):
    first, second = before.get(task), after.get(task)
    known = first or second
    values = [first and first.value, second and second.value, known.chance]
    rows.append([*_row_start(task, known), *map(_number, values)])
  return _table(["task", "metric", "n", "before", "after", "chance"], rows)


# ---------------------------------------------------------------------------------------------------
# Prediction


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
) -> list[str | None]:
  """The model's answer to each record, in batches of `batch_size` (the engine pads the last one into its
  bucket). `store` gives the features (None in asr_only mode); batch b samples with `fold_in(key, b)`. A
  clip whose features cannot be had raises `DataError`, or with `skip_bad` gets None answers and a line in
  `bad` (audio id, why)."""
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
      answers = iter(infer.respond(
        loaded, [r["instruction"] for r in chunk], [r["input"] for r in chunk], audio_in,
        mode=mode, sampling=sampling, key=None if key is None else jax.random.fold_in(key, batch),
      ) if chunk else [])
      real = records[start : start + batch_size]
      predictions += [next(answers) if mode == "asr_only" or r["audio_id"] in clips else None for r in real]
      bar.update(len(real))
  return predictions


def prediction_rows(records: Sequence[dict[str, Any]], predictions: Sequence[str]) -> list[dict[str, Any]]:
  """The original's output records, with the task: `{prompt (the instruction), pred, ref, audio_id, task}`."""
  return [
    {"prompt": r["instruction"], "pred": p, "ref": r["output"], "audio_id": r["audio_id"], "task": r.get("task", "")}
    for r, p in zip(records, predictions, strict=True)
  ]


def evaluate(
  model: Loaded | str | os.PathLike,
  data_path: str | os.PathLike,
  features: str | os.PathLike,
  *,
  out: str | os.PathLike | None = None,
  batch_size: int = 16,
  limit: int | None = None,
  sampling: SamplingConfig | None = None,
  mode: str = "joint",
  key: jax.Array | None = None,
  vocabulary: dict[str, Vocabulary] | None = None,
  progress: bool = True,
  max_windows: int | None = None,
  skip_bad: bool = False,
) -> dict[str, Score]:
  """Answers the records of `data_path` (the first `limit`), writes the predictions to `out` (JSON lines)
  and returns the scores per task. `model` is an audio-language model folder or a loaded one; `features` the
  cache dir; `max_windows` the 10 s windows a clip may fill (default: the model's). A bad record or clip
  (malformed, no features, unreadable audio) stops the run naming it, or with `skip_bad` is left out, and
  the items left out are listed on stderr at the end."""
  if isinstance(model, (str, os.PathLike)):
    loaded = infer.load_model(model, "eval")
  else:
    loaded = infer.require_audio_llm(model, "eval")
  infer.check_mode(mode)
  records, skipped = data.read_records(data_path, skip_bad=skip_bad)
  records = records[:limit]
  store, bad = None, []
  if mode != "asr_only":
    store = feature_store(loaded, records, features, max_windows)
    for audio_id in dict.fromkeys(r["audio_id"] for r in records):
      if (problem := store.problem(audio_id)) is None:
        continue
      if not skip_bad:
        raise data.DataError(f"{data_path}: {problem}")
      bad.append((audio_id, problem))
    left_out = {audio_id for audio_id, _ in bad}
    records = [r for r in records if r["audio_id"] not in left_out]
  predictions = predict(
    loaded, records, store, sampling=sampling, mode=mode, key=key, batch_size=batch_size, progress=progress,
    skip_bad=skip_bad, bad=bad,
  )
  answered = [(r, p) for r, p in zip(records, predictions) if p is not None]
  records, predictions = [r for r, _ in answered], [p for _, p in answered]
  if skipped or bad:
    print(f"left out {skipped} bad records of {data_path} (named above) and the questions about {len(bad)} clips:", file=sys.stderr)
    for audio_id, why in bad:
      print(f"  {audio_id}: {why}", file=sys.stderr)
  if out is not None:
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
      f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in prediction_rows(records, predictions))
  return score(records, predictions, vocabulary)


def parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="python -m ltu_jax.eval", description=__doc__.split("\n\n")[0])
  parser.add_argument("--model", required=True, help="an LTU-AS model folder")
  parser.add_argument("--data", required=True, help="LTU records (.json list or .jsonl)")
  parser.add_argument("--features", required=True, help="the Whisper feature cache (python -m ltu_jax.extract_features)")
  parser.add_argument("--out", help="write the predictions here as JSON lines")
  parser.add_argument("--limit", type=int, help="answer only the first N records")
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
    loaded, args.data, args.features, out=args.out, batch_size=args.batch_size, limit=args.limit,
    sampling=infer.sampling_from_args(args, loaded), mode=args.mode, key=jax.random.key(args.seed),
    max_windows=args.max_windows, skip_bad=args.skip_bad,
  )
  print(table(scores))
  return 0


if __name__ == "__main__":
  sys.exit(main())
