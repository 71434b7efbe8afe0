"""What the machine can do, measured in the very process that then measures a model, so that the model's
figures are printed as shares of it: memory bandwidth (a jitted sum over 1 GiB of float32) and matmul peak
(a large square GEMM). Each framework measures its own (JAX and PyTorch run in separate processes).
"""

from __future__ import annotations

import statistics
from typing import Any

import timing

BANDWIDTH_BYTES = 2**30
GEMM = 4096


def jax_bounds(repeats: int, bandwidth_bytes: int = BANDWIDTH_BYTES, gemm: int = GEMM, dtype: str = "float32") -> dict[str, Any]:
  """Seconds of `repeats` sums over `bandwidth_bytes` of float32 and of `repeats` `[gemm, gemm]` matmuls in
  `dtype` (float32 on CPU; bfloat16 on accelerators, whose peak is bf16), on JAX's default device."""
  import jax
  import jax.numpy as jnp

  ones = jnp.ones(bandwidth_bytes // 4, jnp.float32)
  total = jax.jit(jnp.sum)
  bandwidth = timing.timed(lambda: total(ones).block_until_ready(), repeats, warm_up=True)
  del ones
  matrix = jax.random.normal(jax.random.key(0), (gemm, gemm), dtype)
  matmul = jax.jit(jnp.matmul)
  flops = timing.timed(lambda: matmul(matrix, matrix).block_until_ready(), repeats, warm_up=True)
  return dict(bandwidth_bytes=bandwidth_bytes, bandwidth_s=bandwidth, gemm=gemm, gemm_dtype=dtype, gemm_s=flops)


def torch_bounds(repeats: int, bandwidth_bytes: int = BANDWIDTH_BYTES, gemm: int = GEMM) -> dict[str, Any]:
  """`jax_bounds` on PyTorch's CPU (its own thread pool, its own GEMM)."""
  import torch

  ones = torch.ones(bandwidth_bytes // 4)
  bandwidth = timing.timed(lambda: ones.sum(), repeats, warm_up=True)
  del ones
  matrix = torch.randn(gemm, gemm, generator=torch.Generator().manual_seed(0))
  flops = timing.timed(lambda: matrix @ matrix, repeats, warm_up=True)
  return dict(bandwidth_bytes=bandwidth_bytes, bandwidth_s=bandwidth, gemm=gemm, gemm_dtype="float32", gemm_s=flops)


def bandwidth(bounds: dict[str, Any]) -> float:
  """Bytes per second read (median)."""
  return bounds["bandwidth_bytes"] / statistics.median(bounds["bandwidth_s"])


def peak_flops(bounds: dict[str, Any]) -> float:
  """Matmul FLOP/s (2 per multiply-add, median)."""
  return 2 * bounds["gemm"] ** 3 / statistics.median(bounds["gemm_s"])


def describe(bounds: dict[str, Any]) -> str:
  return (f"memory bandwidth {bandwidth(bounds) / 1e9:.1f} GB/s (sum over {bounds['bandwidth_bytes'] / 2**30:g} GiB), "
          f"matmul peak {peak_flops(bounds) / 1e9:.0f} GFLOP/s ({bounds['gemm']}² {bounds['gemm_dtype']})")
