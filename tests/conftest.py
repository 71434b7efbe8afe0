"""Shared test set-up: fp32 matmuls at full precision, seeded PyTorch."""

from __future__ import annotations

import jax
import pytest
import torch


@pytest.fixture(autouse=True)
def highest_precision():
  """Parity is judged in fp32 with full-precision matmuls (TF32 would hide real bugs on GPUs)."""
  torch.manual_seed(0)
  with jax.default_matmul_precision("highest"):
    yield
