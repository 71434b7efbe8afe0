"""Tasks and their protocols (facts §6.1): which metric a task gets, its labels, and its scores.

A task is the records' `task` field. Its protocol is, in this order:
1. the label file's `protocol` for it (`--labels`: `{task: [label, ...]}` or `{task: {"protocol": ...,
   "labels": [...]}}`);
2. "multiple choice" when its records carry `choices` (see `choices.py`);
3. by its name: "asr", "gender", "age", "open-ended question", or any name containing "caption";
4. "classification" when the label file lists its labels or its records carry a `label` (a list of labels
   in some record: "multi-label");
5. else "open-ended".
A record's truth is its `label` (a class name, a list of them, or an age), else its `output`. A task's
label names are the label file's, else every truth of its records.

Each protocol's metrics (percentages 0-100; the first is the task's headline, plotted and given a chance
level: the score of always giving the most common truth, of random scores for mAP, of an empty answer for
WER, of always saying the mean age for MAE):
- classification: the answer and every label name are embedded (`embedding.py`); the most similar label
  is the answer's: accuracy (embedding). Beside it the keyword reading: the one label the answer names.
- multi-label: the cosine similarities are the class scores: mAP (embedding); accuracy (embedding) counts
  the most similar label right when it is one of the truths; the keyword reading must name exactly the
  truths.
- gender: the original's rule ("female" in the answer, else male): accuracy and macro-F1; and the
  embedding reading over {female, male}.
- age: MAE of the first number (or range's middle) of the answer, over the answers that give one.
- asr: WER (jiwer) after Whisper's English normaliser.
- caption: CIDEr-D, BLEU-4 and ROUGE-L (pycocoevalcap; `metrics.caption_tokens` instead of Java's PTB
  tokeniser); references: the record's `references` list, else its `output`.
- multiple choice: the answer's choice by letter or text, else by embedding similarity: accuracy; and the
  accuracy of exact matches alone. With several multiple-choice tasks, "all (multiple choice)" pools them.
- open-ended: the embedding similarity of answer and reference; and whether the answer names the same
  labels of the data's closed-ended tasks as the reference (keywords).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
from typing import Any, Sequence

import numpy as np

from ltu_jax.eval import choices as multiple_choice
from ltu_jax.eval import keywords, metrics
from ltu_jax.eval.embedding import Embedder, similarities

PROTOCOLS = ("classification", "multi-label", "gender", "age", "asr", "caption", "multiple choice", "open-ended")
NAMED = {"asr": "asr", "gender": "gender", "age": "age", "open-ended question": "open-ended"}
CLOSED = ("classification", "multi-label", "gender")
GENDERS = ("female", "male")
ALL_CHOICES = "all (multiple choice)"


@dataclasses.dataclass(frozen=True)
class TaskScore:
  """One task's result: `metrics` maps a metric's name (with its unit) to its value (None: nothing to
  score); the first is the headline, and `chance` is that metric's chance level."""

  protocol: str
  n: int
  metrics: dict[str, float | None]
  chance: float | None = None

  @property
  def headline(self) -> tuple[str, float | None]:
    return next(iter(self.metrics.items()))


@dataclasses.dataclass(frozen=True)
class TaskLabels:
  protocol: str | None = None
  labels: tuple[str, ...] | None = None


def read_labels(path: str | os.PathLike) -> dict[str, TaskLabels]:
  """A label file: `{task: [label, ...]}` or `{task: {"protocol": ..., "labels": [...]}}`."""
  with open(path, encoding="utf-8") as f:
    table = json.load(f)
  if not isinstance(table, dict):
    raise ValueError(f"{path}: expected an object of task → labels, got {type(table).__name__}")
  read = {}
  for task, entry in table.items():
    if isinstance(entry, list):
      entry = {"labels": entry}
    if not isinstance(entry, dict) or set(entry) - {"protocol", "labels"}:
      raise ValueError(f"{path}: task {task!r}: expected a list of labels or {{'protocol', 'labels'}}, got {entry!r}")
    labels = entry.get("labels")
    if labels is not None and not (isinstance(labels, list) and all(isinstance(x, str) for x in labels)):
      raise ValueError(f"{path}: task {task!r}: 'labels' must be a list of strings, got {labels!r}")
    if entry.get("protocol") not in (None, *PROTOCOLS):
      raise ValueError(f"{path}: task {task!r}: unknown protocol {entry['protocol']!r}; expected one of {PROTOCOLS}")
    read[task] = TaskLabels(entry.get("protocol"), None if labels is None else tuple(labels))
  return read


def protocol(task: str, records: Sequence[dict[str, Any]], given: TaskLabels | None = None) -> str:
  """The task's protocol (see the module docstring)."""
  given = given or TaskLabels()
  if given.protocol is not None:
    return given.protocol
  if any("choices" in r for r in records):
    return "multiple choice"
  if task in NAMED:
    return NAMED[task]
  if "caption" in task.lower():
    return "caption"
  if any(isinstance(r.get("label"), list) for r in records):
    return "multi-label"
  if given.labels is not None or any("label" in r for r in records):
    return "classification"
  return "open-ended"


def truth(record: dict[str, Any]) -> Any:
  return record.get("label", record["output"])


def _label_set(value: Any) -> frozenset[str]:
  return frozenset(value) if isinstance(value, list) else frozenset([value])


def class_names(task: str, truths: Sequence[Any], given: TaskLabels | None) -> list[str]:
  """The label file's names for the task (every truth must be one), else all the truths' names."""
  found = sorted({label for t in truths for label in _label_set(t)})
  if given is None or given.labels is None:
    return found
  unknown = sorted(set(found) - set(given.labels))
  if unknown:
    raise ValueError(f"task {task!r}: labels {unknown} are not in the label file's {list(given.labels)}")
  return list(given.labels)


def _classification(truths, predictions, classes, embedder) -> TaskScore:
  best = np.argmax(similarities(embedder, predictions, classes), axis=1)
  vocabulary = keywords.vocabulary(classes)
  return TaskScore("classification", len(truths), {
    "accuracy (embedding) %": metrics.accuracy([classes[b] == t for b, t in zip(best, truths)]),
    "accuracy (keywords) %": metrics.accuracy([keywords.parse_class(p, vocabulary) == t for p, t in zip(predictions, truths)]),
  }, metrics.chance_accuracy(truths))


def _multi_label(truths, predictions, classes, embedder) -> TaskScore:
  sets = [_label_set(t) for t in truths]
  scores = similarities(embedder, predictions, classes)
  truth = np.array([[c in s for c in classes] for s in sets])
  vocabulary = keywords.vocabulary(classes)
  return TaskScore("multi-label", len(truths), {
    "mAP (embedding) %": metrics.mean_average_precision(scores, truth),
    "accuracy (embedding) %": metrics.accuracy([classes[b] in s for b, s in zip(np.argmax(scores, axis=1), sets)]),
    "accuracy (keywords) %": metrics.accuracy([keywords.named_classes(p, vocabulary) == s for p, s in zip(predictions, sets)]),
  }, metrics.chance_map(truth))


def _gender(truths, predictions, embedder) -> TaskScore:
  ruled = [metrics.gender_rule(p) for p in predictions]
  best = np.argmax(similarities(embedder, predictions, GENDERS), axis=1)
  return TaskScore("gender", len(truths), {
    "accuracy (rule) %": metrics.accuracy([r == t for r, t in zip(ruled, truths)]),
    "F1 (rule) %": metrics.macro_f1(truths, ruled),
    "accuracy (embedding) %": metrics.accuracy([GENDERS[b] == t for b, t in zip(best, truths)]),
  }, metrics.chance_accuracy(truths))


def _age(records, predictions) -> TaskScore:
  truths = [r["label"] if isinstance(r.get("label"), (int, float)) else metrics.first_number(r["output"]) for r in records]
  pairs = [(metrics.first_number(p), t) for p, t in zip(predictions, truths) if t is not None]
  answered = [(p, t) for p, t in pairs if p is not None]
  known = [t for _, t in pairs]
  return TaskScore("age", len(records), {
    "MAE (years)": metrics.mean_absolute_error(*zip(*answered)) if answered else None,
    "answers with an age %": metrics.accuracy([p is not None for p, _ in pairs]),
  }, metrics.mean_absolute_error([np.mean(known)] * len(known), known) if known else None)


def _multiple_choice(records, predictions, embedder) -> TaskScore:
  options = [r["choices"] for r in records]
  picked, exact = multiple_choice.choose(predictions, options, embedder)
  right = [o[p] == r["output"] for o, p, r in zip(options, picked, records)]
  return TaskScore("multiple choice", len(records), {
    "accuracy %": metrics.accuracy(right),
    "accuracy (exact match) %": metrics.accuracy([r and e for r, e in zip(right, exact)]),
  }, float(np.mean([100.0 / len(o) for o in options])))


def _open_ended(records, predictions, embedder, mentionable: keywords.Vocabulary) -> TaskScore:
  references = [r["output"] for r in records]
  similarity = np.sum(embedder(predictions) * embedder(references), axis=1)
  agreement = None
  if mentionable:
    agreement = metrics.accuracy([
      keywords.named_classes(p, mentionable) == keywords.named_classes(r, mentionable) for p, r in zip(predictions, references)
    ])
  return TaskScore("open-ended", len(records), {
    "similarity (embedding) %": 100.0 * float(np.mean(similarity)), "agreement (keywords) %": agreement,
  })


def score(
  records: Sequence[dict[str, Any]],
  predictions: Sequence[str],
  embedder: Embedder,
  labels: dict[str, TaskLabels] | None = None,
) -> dict[str, TaskScore]:
  """Scores per task, in the order tasks first appear (see the module docstring).

  Args:
    records: LTU records with `task`, `output`, and optionally `label`, `choices`, `references`.
    predictions: one answer per record.
    embedder: texts → unit vectors (`embedding.default()` for the real model).
    labels: the label file (`read_labels`): protocols and label names per task.
  """
  if len(records) != len(predictions):
    raise ValueError(f"{len(predictions)} predictions for {len(records)} records")
  labels = labels or {}
  by_task: dict[str, list[int]] = collections.defaultdict(list)
  for index, record in enumerate(records):
    by_task[record.get("task", "")].append(index)
  protocols = {task: protocol(task, [records[i] for i in indices], labels.get(task)) for task, indices in by_task.items()}
  classes = {
    task: class_names(task, [truth(records[i]) for i in by_task[task]], labels.get(task))
    for task, name in protocols.items() if name in CLOSED
  }
  # what an open-ended answer may name: the closed-ended tasks' labels, told apart by task
  mentionable = {(task, label): words for task, names in classes.items() for label, words in keywords.vocabulary(names).items()}
  scores = {}
  for task, indices in by_task.items():
    chosen = [records[i] for i in indices]
    answers = [predictions[i] for i in indices]
    name = protocols[task]
    if name == "classification":
      scores[task] = _classification([truth(r) for r in chosen], answers, classes[task], embedder)
    elif name == "multi-label":
      scores[task] = _multi_label([truth(r) for r in chosen], answers, classes[task], embedder)
    elif name == "gender":
      truths = [r["label"] if "label" in r else metrics.gender_rule(r["output"]) for r in chosen]
      scores[task] = _gender(truths, answers, embedder)
    elif name == "age":
      scores[task] = _age(chosen, answers)
    elif name == "asr":
      scores[task] = TaskScore("asr", len(chosen), {"WER %": metrics.word_error_rate(answers, [r["output"] for r in chosen])}, 100.0)
    elif name == "caption":
      references = [r.get("references") or [r["output"]] for r in chosen]
      scores[task] = TaskScore("caption", len(chosen), metrics.caption_scores(answers, references))
    elif name == "multiple choice":
      scores[task] = _multiple_choice(chosen, answers, embedder)
    else:
      scores[task] = _open_ended(chosen, answers, embedder, mentionable)
  choice_tasks = [task for task, name in protocols.items() if name == "multiple choice"]
  if len(choice_tasks) > 1:
    pooled = [i for task in choice_tasks for i in by_task[task]]
    scores[ALL_CHOICES] = _multiple_choice([records[i] for i in pooled], [predictions[i] for i in pooled], embedder)
  return scores
