"""The keyword reading of an answer, the report's second reading beside the embedding one: which label
names (or their synonyms) it contains as whole words. Exact on answers that name a label, and needs no model."""

from __future__ import annotations

import re
from typing import Iterable

# class → the words that name it in an answer (lowercase, whole words)
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
  "male": ("man",),
  "female": ("woman",),
}


def vocabulary(labels: Iterable[str]) -> Vocabulary:
  """Each label named by itself (lowercased) and its `SYNONYMS`."""
  return {label: (label.lower(), *SYNONYMS.get(label.lower(), ())) for label in labels}


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
