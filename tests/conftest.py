"""Shared test set-up: fp32 matmuls at full precision, seeded PyTorch, torch → numpy helpers."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True)
def highest_precision():
  """Parity is judged in fp32 with full-precision matmuls (TF32 would hide real bugs on GPUs)."""
  torch.manual_seed(0)
  with jax.default_matmul_precision("highest"):
    yield


def numpy_state_dict(module: torch.nn.Module):
  """`(key, fp32 numpy array)` pairs of a PyTorch module's state dict, for `conversion.rules.load`."""
  for key, tensor in module.state_dict().items():
    yield key, tensor.detach().to(torch.float32).numpy()


def max_abs_diff(ours, reference) -> float:
  reference = reference.detach().numpy() if isinstance(reference, torch.Tensor) else reference
  return float(np.max(np.abs(np.asarray(ours, np.float64) - np.asarray(reference, np.float64))))
