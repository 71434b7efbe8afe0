"""How many greedy answers of a model in bf16 are identical to its fp32 answers, on an LTU data file.

    .venv/bin/python bench/bf16_agreement.py [--model runs/tiny_stage3/model] [--data cache/tiny_data/test.json]
        [--features cache/tiny_data/features] [--limit N]

Both runs use `ltu_jax.eval` with greedy decoding (the repetition penalty kept) and 40 new tokens, as the
demo's report does; each dtype runs in its own process (the weights are cast at load). Prints the count of
identical answers, per task and in all, and the seconds each run took (bf16 matmuls are slow on CPU: that
figure is for the record, not a goal).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_eval(args: argparse.Namespace, dtype: str, out: str) -> float:
  command = [
    sys.executable, "-m", "ltu_jax.eval", "--model", args.model, "--data", args.data, "--features", args.features,
    "--out", out, "--greedy", "--max-new-tokens", "40", "--dtype", dtype,
  ]
  if args.limit:
    command += ["--limit", str(args.limit)]
  start = time.perf_counter()
  subprocess.run(command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
  return time.perf_counter() - start


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--model", default="runs/tiny_stage3/model")
  parser.add_argument("--data", default="cache/tiny_data/test.json")
  parser.add_argument("--features", default="cache/tiny_data/features")
  parser.add_argument("--limit", type=int)
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    seconds, answers = {}, {}
    for dtype in ("float32", "bfloat16"):
      out = os.path.join(tmp, dtype)
      seconds[dtype] = run_eval(args, dtype, out)
      with open(os.path.join(out, "predictions.jsonl")) as f:
        answers[dtype] = [json.loads(line) for line in f]
  same, total = collections.Counter(), collections.Counter()
  for fp32, bf16 in zip(answers["float32"], answers["bfloat16"], strict=True):
    total[fp32["task"]] += 1
    same[fp32["task"]] += fp32["pred"] == bf16["pred"]
  print(f"model {args.model}, data {args.data}: greedy answers identical in bf16 and fp32")
  for task in sorted(total):
    print(f"  {task:22s} {same[task]:4d} / {total[task]:4d}")
  print(f"  {'all':22s} {sum(same.values()):4d} / {sum(total.values()):4d}")
  print(f"seconds: fp32 {seconds['float32']:.0f}, bf16 {seconds['bfloat16']:.0f}")


if __name__ == "__main__":
  main()
