"""Helpers for parity tests."""

from __future__ import annotations

import numpy as np
import torch


def numpy_state_dict(module: torch.nn.Module):
  """`(key, fp32 numpy array)` pairs of a PyTorch module's state dict, for `conversion.rules.load`."""
  for key, tensor in module.state_dict().items():
    yield key, tensor.detach().to(torch.float32).numpy()


def max_abs_diff(ours, reference) -> float:
  reference = reference.detach().numpy() if isinstance(reference, torch.Tensor) else reference
  return float(np.max(np.abs(np.asarray(ours, np.float64) - np.asarray(reference, np.float64))))
