"""Disk the test suite uses in its temporary folder: the peak while it runs, and what is left at the end.

    .venv/bin/python bench/test_disk.py                                   # the whole suite
    .venv/bin/python bench/test_disk.py -- -o tmp_path_retention_policy=all   # keeping every test's folder

Runs pytest (with the arguments after `--`) on a fresh `--basetemp` and sums the sizes of the files under
it every `--every` seconds. With `--basetemp` given, pytest keeps the base folder at the end, so what is
left is what the module-scoped fixtures wrote; a plain run deletes that too when every test passes.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def size_mb(folder: str) -> float:
  """The files under `folder`, in MB; files that vanish while it is read are skipped."""
  total = 0
  for parent, _, files in os.walk(folder):
    for name in files:
      try:
        total += os.lstat(os.path.join(parent, name)).st_size
      except FileNotFoundError:
        pass
  return total / 1e6


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--every", type=float, default=2.0, help="seconds between samples")
  parser.add_argument("pytest_args", nargs="*", help="arguments for pytest (after --)")
  args = parser.parse_args()
  with tempfile.TemporaryDirectory(prefix="test_disk_") as scratch:
    basetemp = os.path.join(scratch, "basetemp")
    command = [sys.executable, "-m", "pytest", "-q", f"--basetemp={basetemp}", *args.pytest_args]
    start, peak = time.perf_counter(), 0.0
    with subprocess.Popen(command, cwd=ROOT) as run:
      while run.poll() is None:
        peak = max(peak, size_mb(basetemp))
        time.sleep(args.every)
    left = size_mb(basetemp)
    print(f"pytest exit {run.returncode} after {time.perf_counter() - start:.0f} s")
    print(f"temporary folder: peak {peak:.0f} MB (sampled every {args.every:g} s), left at the end {left:.0f} MB")
  sys.exit(run.returncode)


if __name__ == "__main__":
  main()
