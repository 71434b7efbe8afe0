"""Whisper encoder speed on CPU, ours (jitted) against PyTorch, as shares of what the machine can do.

    .venv/bin/python bench/encoder_speed.py [--sizes tiny base] [--seconds 10 30] [--rounds 3] [--repeats 5] [--cores N]

Each round runs one JAX process, then one PyTorch process (never both frameworks in one process: each
brings its own thread pools), so a slow spell of a shared machine falls on both. Each process measures,
in this order: memory bandwidth (a sum over 1 GiB of float32), matmul peak (a 4096² fp32 GEMM), then
the encoder (all block outputs, as LTU-AS reads them) on 10 s and 30 s of mel for each size, `--repeats`
calls after a warm-up (compile) call. The figures are medians over every call of every round, with the
spread (min–max). The compute bound of an encoder is its matmul FLOPs (convolutions, projections, MLP,
attention) at the better of the two GEMM peaks; "% bound" is that time over the measured one.
`--cores N` pins both processes to the first N cores (each framework sizes its thread pool to them), to
compare the frameworks' kernels on one core apart from how each spreads work over several.
Weights are random on both sides (speed does not depend on their values); PyTorch runs transformers'
`WhisperEncoder` as users get it (SDPA attention, default threads).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import timing  # noqa: E402
SIZES = {  # OpenAI's encoder sizes: d_model, layers, heads
  "tiny": (384, 4, 6),
  "base": (512, 6, 8),
  "small": (768, 12, 12),
  "medium": (1024, 24, 16),
  "large-v1": (1280, 32, 20),
}
MEL_BINS = 80
GEMM = 4096
BANDWIDTH_BYTES = 2**30


def encoder_flops(size: str, seconds: int) -> float:
  """Matmul FLOPs (2 per multiply-add) of one encoder call on `seconds` of mel (100 frames/s)."""
  dim, num_layers, _ = SIZES[size]
  mel_frames = 100 * seconds
  frames = mel_frames // 2
  convs = 2 * 3 * dim * (MEL_BINS * mel_frames + dim * frames)
  projections = 2 * 4 * frames * dim * dim
  mlp = 2 * 2 * frames * dim * 4 * dim
  attention = 2 * 2 * frames * frames * dim
  return convs + num_layers * (projections + mlp + attention)


def timed(fn, repeats: int) -> list[float]:
  """Seconds of each of `repeats` calls, after one untimed call (compilation, first-touch of memory)."""
  return timing.timed(fn, repeats, warm_up=True)


def jax_worker(sizes: list[str], seconds: list[int], repeats: int) -> dict:
  sys.path.insert(0, ROOT)
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  from ltu_jax.models import whisper

  ones = jnp.ones(BANDWIDTH_BYTES // 4, jnp.float32)
  total = jax.jit(jnp.sum)
  matrix = jax.random.normal(jax.random.key(0), (GEMM, GEMM), jnp.float32)
  matmul = jax.jit(jnp.matmul)
  result = {
    "version": f"jax {jax.__version__}",
    "bandwidth": timed(lambda: total(ones).block_until_ready(), repeats),
    "gemm": timed(lambda: matmul(matrix, matrix).block_until_ready(), repeats),
  }
  del ones
  for size in sizes:
    dim, num_layers, heads = SIZES[size]
    config = whisper.WhisperConfig(
      num_mel_bins=MEL_BINS, d_model=dim, encoder_layers=num_layers, encoder_attention_heads=heads,
      encoder_ffn_dim=4 * dim, decoder_layers=1, decoder_attention_heads=heads, decoder_ffn_dim=4 * dim,
      vocab_size=8, max_source_positions=1500, max_target_positions=8,
    )
    graphdef, state = nnx.split(whisper.WhisperEncoder(config, nnx.Rngs(0)))
    # A pure function of the state, jitted, as the trainer and inference run it.
    encode = jax.jit(lambda state, mel: nnx.merge(graphdef, state)(mel))
    for secs in seconds:
      mel = jnp.asarray(np.random.default_rng(0).normal(size=(1, MEL_BINS, 100 * secs)), jnp.float32)
      result[f"{size} {secs}"] = timed(lambda: jax.block_until_ready(encode(state, mel)), repeats)
  return result


def torch_worker(sizes: list[str], seconds: list[int], repeats: int) -> dict:
  import numpy as np
  import torch
  import transformers

  torch.manual_seed(0)
  ones = torch.ones(BANDWIDTH_BYTES // 4)
  matrix = torch.randn(GEMM, GEMM)
  result = {
    "version": f"torch {torch.__version__}, {torch.get_num_threads()} threads",
    "bandwidth": timed(lambda: ones.sum(), repeats),
    "gemm": timed(lambda: matrix @ matrix, repeats),
  }
  del ones
  for size in sizes:
    dim, num_layers, heads = SIZES[size]
    for secs in seconds:
      # HF's encoder takes exactly 2 * max_source_positions mel frames: one model per length.
      config = transformers.WhisperConfig(
        num_mel_bins=MEL_BINS, d_model=dim, encoder_layers=num_layers, encoder_attention_heads=heads,
        encoder_ffn_dim=4 * dim, decoder_layers=1, decoder_attention_heads=heads, decoder_ffn_dim=4 * dim,
        max_source_positions=50 * secs,
      )
      encoder = transformers.WhisperModel(config).eval().encoder
      mel = torch.from_numpy(np.random.default_rng(0).normal(size=(1, MEL_BINS, 100 * secs)).astype(np.float32))
      with torch.inference_mode():
        result[f"{size} {secs}"] = timed(lambda: encoder(mel, output_hidden_states=True), repeats)
  return result


def cpu_model() -> str:
  with open("/proc/cpuinfo") as cpuinfo:
    for line in cpuinfo:
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  return platform.processor()


def spread(times: list[float], scale: float = 1.0) -> str:
  """'median (min–max)' of `times` multiplied by `scale`."""
  return f"{statistics.median(times) * scale:.0f} ({min(times) * scale:.0f}–{max(times) * scale:.0f})"


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--sizes", nargs="+", default=["tiny", "base"], choices=sorted(SIZES))
  parser.add_argument("--seconds", nargs="+", type=int, default=[10, 30], choices=[10, 20, 30])
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--cores", type=int, help="pin both frameworks to the first N cores (default: all)")
  parser.add_argument("--worker", choices=["jax", "torch"], help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    if args.cores:  # before either framework starts its thread pools
      timing.pin_cores(args.cores)
    worker = jax_worker if args.worker == "jax" else torch_worker
    print(json.dumps(worker(args.sizes, args.seconds, args.repeats)))
    return

  load_before = os.getloadavg()
  runs = {"jax": [], "torch": []}
  for _ in range(args.rounds):
    for framework in runs:
      command = [sys.executable, os.path.abspath(__file__), "--worker", framework, "--repeats", str(args.repeats)]
      command += ["--cores", str(args.cores)] if args.cores else []
      command += ["--sizes", *args.sizes, "--seconds", *map(str, args.seconds)]
      output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
      runs[framework].append(json.loads(output.splitlines()[-1]))
  # Every call of every round, per framework and measurement.
  calls = {fw: {name: [t for run in rs for t in run[name]] for name in rs[0] if name != "version"} for fw, rs in runs.items()}
  load_after = os.getloadavg()

  cores = f"pinned to {args.cores} of {os.cpu_count()} cores" if args.cores else f"{os.cpu_count()} cores"
  print(f"{cpu_model()}, {cores}; {runs['jax'][0]['version']}; {runs['torch'][0]['version']}; fp32")
  print(f"load average (1 min) {load_before[0]:.1f} before, {load_after[0]:.1f} after; {args.rounds} rounds × {args.repeats} calls")
  print("median (min–max) over all calls")
  for fw, measured in calls.items():
    bandwidth = spread([BANDWIDTH_BYTES / t for t in measured["bandwidth"]], 1e-9)
    gemm = spread([2 * GEMM**3 / t for t in measured["gemm"]], 1e-9)
    print(f"  {fw:5s}  memory bandwidth {bandwidth} GB/s, matmul peak {gemm} GFLOP/s")
  peak = max(statistics.median([2 * GEMM**3 / t for t in calls[fw]["gemm"]]) for fw in calls)
  print(f"compute bound: matmul FLOPs at {peak * 1e-9:.0f} GFLOP/s (the better median peak)")
  header = f"{'encoder':10s} {'GFLOP':>6s} {'bound ms':>9s} {'ours ms':>16s} {'PyTorch ms':>16s} {'PyTorch/ours':>13s} {'ours % bound':>13s} {'PyTorch % bound':>16s}"
  print(header)
  for size in args.sizes:
    for secs in args.seconds:
      name = f"{size} {secs}"
      flops = encoder_flops(size, secs)
      ours, reference = calls["jax"][name], calls["torch"][name]
      bound = flops / peak
      print(
        f"{size + f' {secs} s':10s} {flops * 1e-9:6.1f} {bound * 1e3:9.0f} {spread(ours, 1e3):>16s} {spread(reference, 1e3):>16s}"
        f" {statistics.median(reference) / statistics.median(ours):13.2f}"
        f" {100 * bound / statistics.median(ours):12.0f}% {100 * bound / statistics.median(reference):15.0f}%"
      )


if __name__ == "__main__":
  main()
