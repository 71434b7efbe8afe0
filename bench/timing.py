"""Timing helpers of the bench scripts, importing nothing heavy (each framework's worker process imports it)."""

from __future__ import annotations

import os
import statistics
import time
from typing import Any, Callable, Sequence


def timed(fn: Callable[[], Any], repeats: int, warm_up: bool = False) -> list[float]:
  """Seconds of each of `repeats` calls of `fn`; with `warm_up`, after one untimed call (compilation,
  first touch of memory), else the caller has warmed it up."""
  if warm_up:
    fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return times


def spread(values: Sequence[float], digits: int = 3) -> str:
  """"median (min–max)" of `values`."""
  return f"{statistics.median(values):.{digits}g} ({min(values):.{digits}g}–{max(values):.{digits}g})"


def pin_cores(count: int) -> None:
  """Pins this process to its first `count` allowed cores; call it before a framework starts its thread pool,
  which it sizes to them (a bench worker's `--cores`)."""
  os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:count])
