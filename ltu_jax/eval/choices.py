"""Multiple-choice benchmarks: MMAU's and AIR-Bench Foundation's JSON read as LTU records, and an answer
mapped to a choice.

MMAU (test-mini): a JSON list of `{"id", "audio_id" (a path), "question", "choices": [...], "answer" (the
right choice's text), "task" (sound, music or speech), ...}`. AIR-Bench Foundation: `{"uniq_id", "path",
"question", "choice_a", ..., "choice_d", "answer_gt", "task_name", "dataset_name"}`, its audio in
`{task_name}_{dataset_name}/{path}`. Relative paths are looked up in the audio folder, then by file name
alone in it. Accuracy is reported per `task` (AIR-Bench: `task_name`), as MMAU's table does.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Sequence

import numpy as np

from ltu_jax.eval.embedding import Embedder
from ltu_jax.eval.keywords import named_classes

LETTERS = "ABCDEFGHIJ"
AIR_BENCH_CHOICES = ("choice_a", "choice_b", "choice_c", "choice_d")
# "B", "(B)", "B)", "B." or "B:" alone or starting the answer; "A female voice" does not pick A
LETTER = re.compile(r"^\s*(?:\(([A-J])\)|([A-J])(?:[).:]|\s*$))")


def is_choices_file(items: Any) -> bool:
  """Whether a parsed JSON file holds multiple-choice items rather than LTU records."""
  return (
    isinstance(items, list) and bool(items) and isinstance(items[0], dict) and "question" in items[0]
    and ("choices" in items[0] or "choice_a" in items[0])
  )


def prompt(question: str, choices: Sequence[str]) -> str:
  """The instruction: the question, then its choices lettered."""
  listed = " ".join(f"({letter}) {choice}" for letter, choice in zip(LETTERS, choices))
  return f"{question} Choose one: {listed}."


def _audio_path(path: str, audio_dir: str | None) -> str:
  if os.path.isabs(path) or audio_dir is None:
    return path
  joined = os.path.normpath(os.path.join(audio_dir, path))
  by_name = os.path.join(audio_dir, os.path.basename(path))
  return joined if os.path.exists(joined) or not os.path.exists(by_name) else by_name


def _item_problem(item: Any) -> str | None:
  if not isinstance(item, dict):
    return f"expected an object, got {type(item).__name__}"
  if "choices" in item:
    wanted = {"question": str, "choices": list, "answer": str, "audio_id": str}
  else:
    wanted = {"question": str, "answer_gt": str, "path": str, **{key: str for key in AIR_BENCH_CHOICES}}
  for key, kind in wanted.items():
    if not isinstance(item.get(key), kind):
      return f"field {key!r} is missing or not a {kind.__name__}"
  choices = item["choices"] if "choices" in item else [item[key] for key in AIR_BENCH_CHOICES]
  if not 2 <= len(choices) <= len(LETTERS) or not all(isinstance(c, str) for c in choices):
    return f"field 'choices' must be 2-{len(LETTERS)} strings, got {choices!r}"
  answer = item.get("answer", item.get("answer_gt"))
  if answer not in choices:
    return f"the answer {answer!r} is not one of the choices {choices}"
  return None


def records(
  path: str, items: list[Any], audio_dir: str | None, skip_bad: bool = False
) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
  """The items as LTU records (`instruction` = `prompt`, `output` = the right choice, `choices` kept;
  `input` the item's transcript, None without one: `run.fill_transcripts`), and (item, why) for each bad
  one; a bad item raises `ValueError` naming it unless `skip_bad`."""
  converted, bad = [], []
  for index, item in enumerate(items):
    problem = _item_problem(item)
    if problem is not None:
      where = f"{path}: item {index}"
      if not skip_bad:
        raise ValueError(f"{where}: {problem}")
      bad.append((where, problem))
      continue
    if "choices" in item:
      choices, answer, task = item["choices"], item["answer"], item.get("task", "multiple choice")
      audio_id = _audio_path(item["audio_id"], audio_dir)
    else:
      choices, answer, task = [item[key] for key in AIR_BENCH_CHOICES], item["answer_gt"], item.get("task_name", "multiple choice")
      audio_id = _audio_path(os.path.join(f"{task}_{item.get('dataset_name', '')}", item["path"]), audio_dir)
    converted.append({
      "instruction": prompt(item["question"], choices), "input": item.get("input"), "output": answer,
      "audio_id": audio_id, "task": task, "choices": choices, "id": item.get("id", item.get("uniq_id", index)),
    })
  return converted, bad


def read(path: str) -> Any:
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def exact_choice(answer: str, choices: Sequence[str]) -> int | None:
  """The choice an answer names by its letter, or else by containing exactly one choice's text (whole
  words, any case); None when neither settles it."""
  letter = LETTER.match(answer)
  if letter is not None:
    index = LETTERS.index(letter.group(1) or letter.group(2))
    if index < len(choices):
      return index
  named = named_classes(answer, {i: (choice.lower(),) for i, choice in enumerate(choices)})
  if len(named) > 1:  # choices "hum" and "engine hum" both named by "an engine hum": the longer one
    longest = max(named, key=lambda i: len(choices[i]))
    named = {longest} if all(choices[i].lower() in choices[longest].lower() for i in named) else named
  return next(iter(named)) if len(named) == 1 else None


def choose(answers: Sequence[str], choices: Sequence[Sequence[str]], embedder: Embedder) -> tuple[list[int], list[bool]]:
  """Each answer's choice (`exact_choice`, else the choice most similar in embedding) and whether the
  exact match settled it."""
  picked = [exact_choice(a, c) for a, c in zip(answers, choices, strict=True)]
  exact = [index is not None for index in picked]
  unsettled = [i for i, index in enumerate(picked) if index is None]
  if unsettled:  # one embedding call for all answers and one for all choice texts
    answer_vectors = embedder([answers[i] for i in unsettled])
    texts = list(dict.fromkeys(c for i in unsettled for c in choices[i]))
    choice_vectors = dict(zip(texts, embedder(texts)))
    for i, vector in zip(unsettled, answer_vectors):
      picked[i] = int(np.argmax([vector @ choice_vectors[c] for c in choices[i]]))
  return picked, exact
