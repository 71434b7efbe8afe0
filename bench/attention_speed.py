"""The attention core alone (Whisper's encoder self-attention, no projections), ours against PyTorch's fused SDPA.

    .venv/bin/python bench/attention_speed.py [--positions 500 1500] [--heads 6 8] [--cores 1 2] [--repeats 7]

Ours is `layers.attention` jitted (float32, head-major, long attention over blocks of queries); PyTorch's is
`torch.nn.functional.scaled_dot_product_attention` as transformers' Whisper calls it. Each framework runs in
its own process per core count (`--cores N`: pinned to the first N cores before it starts its thread pool),
so one core compares the kernels and two show how each spreads its work. Figures: median (min–max) ms over
`--repeats` calls after a warm-up call, GFLOP/s of the two matmuls (4 × positions² × heads × 64), and the
speed-up from the extra cores. This is where the Whisper encoder's time goes at 30 s (1500 positions).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import timing  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEAD_DIM = 64


def jax_worker(shapes: list[tuple[int, int]], repeats: int) -> dict[str, list[float]]:
  sys.path.insert(0, ROOT)
  import jax
  import numpy as np

  from ltu_jax.models import layers

  attend = jax.jit(lambda q, k, v: layers.attention(q, k, v))
  result = {}
  for positions, heads in shapes:
    q, k, v = (np.random.default_rng(i).normal(size=(1, positions, heads, HEAD_DIM)).astype(np.float32) for i in range(3))
    q, k, v = map(jax.numpy.asarray, (q, k, v))
    result[f"{positions} {heads}"] = timing.timed(lambda: attend(q, k, v).block_until_ready(), repeats, warm_up=True)
  return result


def torch_worker(shapes: list[tuple[int, int]], repeats: int) -> dict[str, list[float]]:
  import torch
  import torch.nn.functional as F

  result = {}
  with torch.inference_mode():
    for positions, heads in shapes:
      q, k, v = (torch.randn(1, heads, positions, HEAD_DIM) for _ in range(3))
      result[f"{positions} {heads}"] = timing.timed(lambda: F.scaled_dot_product_attention(q, k, v), repeats, warm_up=True)
  return result


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--positions", nargs="+", type=int, default=[500, 1500])
  parser.add_argument("--heads", nargs="+", type=int, default=[6, 8], help="6: Whisper tiny, 8: base")
  parser.add_argument("--cores", nargs="+", type=int, default=[1, 2])
  parser.add_argument("--repeats", type=int, default=7)
  parser.add_argument("--worker", choices=["jax", "torch"], help=argparse.SUPPRESS)
  parser.add_argument("--pin", type=int, help=argparse.SUPPRESS)
  args = parser.parse_args()
  shapes = [(p, h) for p in args.positions for h in args.heads]
  if args.worker:
    timing.pin_cores(args.pin)  # before either framework's thread pool
    worker = jax_worker if args.worker == "jax" else torch_worker
    print(json.dumps(worker(shapes, args.repeats)))
    return

  runs = {}
  for cores in args.cores:
    for framework in ("jax", "torch"):
      command = [sys.executable, os.path.abspath(__file__), "--worker", framework, "--pin", str(cores), "--repeats", str(args.repeats)]
      command += ["--positions", *map(str, args.positions), "--heads", *map(str, args.heads)]
      output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
      runs[framework, cores] = json.loads(output.splitlines()[-1])
  print(f"attention core, float32, batch 1, head_dim {HEAD_DIM}; median (min–max) ms over {args.repeats} calls; "
        f"load average (1 min) {os.getloadavg()[0]:.1f}")
  print(f"{'positions':>9s} {'heads':>5s} {'cores':>5s} {'ours ms':>18s} {'SDPA ms':>18s} {'SDPA/ours':>9s} {'ours GFLOP/s':>12s} {'SDPA GFLOP/s':>12s}")
  for positions, heads in shapes:
    name = f"{positions} {heads}"
    flops = 4 * positions**2 * heads * HEAD_DIM
    for cores in args.cores:
      ours, sdpa = runs["jax", cores][name], runs["torch", cores][name]
      med_ours, med_sdpa = statistics.median(ours), statistics.median(sdpa)
      print(f"{positions:9d} {heads:5d} {cores:5d} {timing.spread([1e3 * t for t in ours]):>18s} {timing.spread([1e3 * t for t in sdpa]):>18s}"
            f" {med_sdpa / med_ours:9.2f} {flops / med_ours * 1e-9:12.0f} {flops / med_sdpa * 1e-9:12.0f}")
  if len(args.cores) > 1:
    low, high = min(args.cores), max(args.cores)
    for positions, heads in shapes:
      name = f"{positions} {heads}"
      gain = {fw: statistics.median(runs[fw, low][name]) / statistics.median(runs[fw, high][name]) for fw in ("jax", "torch")}
      print(f"{positions} positions, {heads} heads: {high} cores over {low}: ours {gain['jax']:.2f}×, SDPA {gain['torch']:.2f}×")


if __name__ == "__main__":
  main()
