"""The papers' metrics (facts §6.1), each a pure function of answers and truths; percentages are 0-100."""

from __future__ import annotations

import functools
import re
import string
from typing import Sequence

import numpy as np

# The original's LibriSpeech script strips this prefix that LTU-AS puts before a transcript.
SPOKEN_TEXT = re.compile(r"^\s*spoken text\s*:", re.IGNORECASE)
# VoxCeleb2 age: the first integer, or the mean of a range such as "20-30" or "20 to 30".
AGE = re.compile(r"(\d+(?:\.\d+)?)(?:\s*(?:-|–|to)\s*(\d+(?:\.\d+)?))?")


@functools.cache
def _whisper_normalizer():
  # Whisper's English normaliser (numbers, contractions, titles, symbols). Its British → American spelling
  # table is a JSON that the Hub's Whisper repos carry and no installed package does, so it is left empty.
  from transformers.models.whisper.english_normalizer import EnglishTextNormalizer

  return EnglishTextNormalizer({})


def transcript_words(text: str) -> list[str]:
  """Words for WER: the "spoken text:" prefix dropped, then Whisper's English normaliser."""
  return _whisper_normalizer()(SPOKEN_TEXT.sub("", text)).split()


def word_error_rate(predictions: Sequence[str], references: Sequence[str]) -> float | None:
  """Corpus WER in % (jiwer): all edits over all reference words, after `transcript_words`; None when the
  references have no words."""
  import jiwer

  hypotheses = [" ".join(transcript_words(p)) for p in predictions]
  truths = [" ".join(transcript_words(r)) for r in references]
  if len(hypotheses) != len(truths):
    raise ValueError(f"{len(hypotheses)} predictions for {len(truths)} references")
  if not any(truths):
    return None
  words = jiwer.process_words(truths, hypotheses)
  errors = words.substitutions + words.deletions + words.insertions
  return 100.0 * errors / (words.substitutions + words.deletions + words.hits)


def gender_rule(text: str) -> str:
  """The original's VoxCeleb2 rule: "female" when the lowercased answer contains it, else "male"."""
  return "female" if "female" in text.lower() else "male"


def accuracy(right: Sequence[bool]) -> float:
  return 100.0 * float(np.mean(right)) if len(right) else 0.0


def macro_f1(truths: Sequence[str], predictions: Sequence[str]) -> float:
  """Mean over the truths' classes of F1, in %."""
  truths, predictions = np.asarray(truths), np.asarray(predictions)
  scores = []
  for label in np.unique(truths):
    hits = np.sum((predictions == label) & (truths == label))
    predicted, actual = np.sum(predictions == label), np.sum(truths == label)
    scores.append(2 * hits / (predicted + actual))
  return 100.0 * float(np.mean(scores))


def chance_accuracy(truths: Sequence) -> float:
  """The accuracy of always giving the most common truth, in %."""
  counts = {}
  for truth in truths:
    counts[truth] = counts.get(truth, 0) + 1
  return 100.0 * max(counts.values()) / len(truths)


def first_number(text: str) -> float | None:
  """The age an answer gives: its first number, or the middle of its first range; None without one."""
  match = AGE.search(text)
  if match is None:
    return None
  low, high = match.group(1), match.group(2)
  return float(low) if high is None else (float(low) + float(high)) / 2


def mean_absolute_error(predictions: Sequence[float], truths: Sequence[float]) -> float:
  return float(np.mean(np.abs(np.asarray(predictions, float) - np.asarray(truths, float))))


def average_precision(scores: np.ndarray, positives: np.ndarray) -> float:
  """AP of one class: the mean, over its positives, of the precision at each positive's rank.

  scores: [items] (higher = more likely); positives: [items] bool, at least one True. Tied scores count
  as one threshold, as in scikit-learn's `average_precision_score`."""
  order = np.argsort(-scores, kind="stable")
  scores, positives = scores[order], positives[order]
  # the last item of each run of equal scores: a threshold admits the whole run at once
  last = np.r_[scores[1:] != scores[:-1], True]
  hits = np.cumsum(positives)[last]
  seen = np.arange(1, len(scores) + 1)[last]
  recall_steps = np.diff(np.r_[0, hits]) / hits[-1]
  return float(np.sum(recall_steps * hits / seen))


def mean_average_precision(scores: np.ndarray, truth: np.ndarray) -> float:
  """mAP in %: the mean AP over the classes with at least one positive.

  scores: [items, classes] (e.g. cosine similarities); truth: [items, classes] bool."""
  present = [c for c in range(truth.shape[1]) if truth[:, c].any()]
  return 100.0 * float(np.mean([average_precision(scores[:, c], truth[:, c]) for c in present]))


def chance_map(truth: np.ndarray) -> float:
  """The expected mAP of random scores: each present class's share of positives, averaged, in %."""
  present = truth[:, truth.any(axis=0)]
  return 100.0 * float(np.mean(present.mean(axis=0)))


def caption_tokens(text: str) -> str:
  """A caption as the metrics read it: lowercase, punctuation removed, single spaces. This stands in for
  coco-caption's PTBTokenizer, which needs Java."""
  return " ".join(text.lower().translate(str.maketrans("", "", string.punctuation)).split())


def caption_scores(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
  """CIDEr-D, BLEU-4 and ROUGE-L (pycocoevalcap, pure Python), each ×100 as the papers report them.

  references: per prediction, its reference captions (AudioCaps and Clotho have 5)."""
  from pycocoevalcap.bleu.bleu import Bleu
  from pycocoevalcap.cider.cider import Cider
  from pycocoevalcap.rouge.rouge import Rouge

  if len(predictions) != len(references):
    raise ValueError(f"{len(predictions)} predictions for {len(references)} reference sets")
  results = {i: [caption_tokens(p)] for i, p in enumerate(predictions)}
  truths = {i: [caption_tokens(r) for r in refs] for i, refs in enumerate(references)}
  cider, _ = Cider().compute_score(truths, results)
  bleu, _ = Bleu(4).compute_score(truths, results, verbose=0)
  rouge, _ = Rouge().compute_score(truths, results)
  return {"CIDEr-D": 100.0 * float(cider), "BLEU-4": 100.0 * float(bleu[3]), "ROUGE-L": 100.0 * float(rouge)}
