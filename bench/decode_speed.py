"""Decoding speed of the real SmolLM2-135M: our engine (`ltu_jax.generate.generate`) against transformers'
`generate` (greedy, sdpa attention) on the same fp32 weights, at batch 1, 8 and 32, on CPU.

    .venv/bin/python bench/decode_speed.py [--new-tokens 32] [--repeats 3] [--batches 1 8 32]

Every row makes exactly `--new-tokens` tokens (eos ignored on both sides) from the same left-padded chat
prompts. Per batch: tokens/s (new tokens of all rows over the wall time of the whole call, prefill included),
the time to the first token (a call that makes one token), as median (min-max) over the repeats, and the first
call's time (ours: compilation and one decode; excluded from the other figures). A compile time taken as first
call minus median came out negative on a busy machine, so the first call is printed whole. Each side runs in
its own process, which first measures what the machine can do (`bounds`: memory bandwidth, matmul peak).
A decode step's time is (full call - first-token call) / (new tokens - 1), the prefill left out; a step
reads every weight once, so the bandwidth bound is bandwidth / weight bytes steps/s, and "% bw" is the
steps/s as a share of it ("% mm": the step's matmul FLOPs, 2 per weight and row, as a share of the matmul
peak; it grows with the batch). The last line gives the ratios ours / transformers in tokens/s at batch 1
and 8 (above 1: ours is faster).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bounds  # noqa: E402
import common  # noqa: E402
import numpy as np  # noqa: E402

QUESTIONS = (
  "What is the capital of France?",
  "Write a short poem about the sea.",
  "Explain why the sky is blue in two sentences.",
  "Give me three tips for learning a new language.",
  "What is the difference between a virus and a bacterium?",
  "Summarise the plot of Romeo and Juliet.",
  "How do I boil an egg?",
  "Name five animals that live in the ocean.",
)


def prompts(tokenizer, batch: int) -> list[list[int]]:
  """`batch` chat prompts' ids, cycling through `QUESTIONS`."""
  ids = []
  for row in range(batch):
    message = [{"role": "user", "content": QUESTIONS[row % len(QUESTIONS)]}]
    text = tokenizer.apply_chat_template(message, add_generation_prompt=True, tokenize=False)
    ids.append(tokenizer(text, add_special_tokens=False)["input_ids"])
  return ids


def jax_decoder(pad_id: int):
  """(tokenizer, decode(prompts, new_tokens) -> `[batch, new_tokens]` ids, number of weights) on our engine."""
  import jax
  from flax import nnx

  import ltu_jax
  from ltu_jax import generate

  loaded = ltu_jax.load(common.smollm2_folder())

  def decode(sequences, new_tokens):
    ids, mask = generate.left_pad(sequences, pad_id)
    sampling = generate.SamplingConfig(max_new_tokens=new_tokens)
    out = generate.generate(loaded.model, ids, mask, sampling=sampling, eos_ids=(), pad_id=pad_id)
    return np.asarray(jax.block_until_ready(out.tokens))

  weights = sum(x.size for x in jax.tree.leaves(nnx.state(loaded.model, nnx.Param)))
  return loaded.tokenizer, decode, weights


def torch_decoder(pad_id: int):
  """(tokenizer, decode, number of weights) on transformers' `generate`, eos switched off so that every row
  runs to the end."""
  import torch
  import transformers

  folder = common.smollm2_hf_folder()
  model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa")
  model.eval().generation_config.eos_token_id = None
  tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
  weights = sum(p.numel() for p in model.parameters())

  def decode(sequences, new_tokens):
    longest = max(map(len, sequences))
    ids = torch.tensor([[pad_id] * (longest - len(s)) + s for s in sequences])
    mask = torch.tensor([[0] * (longest - len(s)) + [1] * len(s) for s in sequences])
    with torch.no_grad():
      out = model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, pad_token_id=pad_id
      )
    return out[:, longest:].numpy()

  return tokenizer, decode, weights


def child(framework: str, batches: list[int], new_tokens: int, repeats: int) -> None:
  pad_id = 2  # SmolLM2's eos = pad
  measured = (bounds.jax_bounds if framework == "jax" else bounds.torch_bounds)(repeats)
  tokenizer, decode, weights = (jax_decoder if framework == "jax" else torch_decoder)(pad_id)
  result = {"bounds": measured, "weights": weights}
  for batch in batches:
    sequences = prompts(tokenizer, batch)
    row = {}
    for name, count in (("first_token", 1), ("full", new_tokens)):
      start = time.perf_counter()
      tokens = decode(sequences, count)  # warm-up: compilation on our side
      row[f"{name}_warmup_s"] = time.perf_counter() - start
      row[f"{name}_s"] = common.timed(lambda: decode(sequences, count), repeats)
    row["tokens"] = tokens[0].tolist()
    result[batch] = row
  common.report(result)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--new-tokens", type=int, default=32)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
  parser.add_argument("--framework", choices=("jax", "torch"), help="(internal) run one side and print JSON")
  args = parser.parse_args()
  if args.framework:
    return child(args.framework, args.batches, args.new_tokens, args.repeats)
  common.smollm2_hf_folder()  # converted once, before the children time anything
  flags = ["--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats), "--batches", *map(str, args.batches)]
  ours, theirs = (common.in_child(__file__, name, flags) for name in ("jax", "torch"))
  import jax
  import torch

  print(f"SmolLM2-135M fp32, {args.new_tokens} new tokens per row, {args.repeats} repeats, median (min-max); "
        f"jax {jax.__version__}, torch {torch.__version__}, {os.cpu_count()} CPUs")
  for name, side in (("ours", ours), ("torch", theirs)):
    print(f"{name}: {bounds.describe(side['bounds'])}; bound at batch 1: "
          f"{bounds.bandwidth(side['bounds']) / (4 * side['weights']):.1f} steps/s ({4 * side['weights'] / 1e6:.0f} MB a step)")
  print(f"{'batch':>5s} {'side':6s} {'tokens/s':>22s} {'first token s':>24s} {'first call s':>11s} "
        f"{'steps/s':>8s} {'% bw':>5s} {'% mm':>5s}")
  ratios = {}
  for batch in map(str, args.batches):
    for name, side in (("ours", ours), ("torch", theirs)):
      row = side[batch]
      rates = [int(batch) * args.new_tokens / seconds for seconds in row["full_s"]]
      step = (statistics.median(row["full_s"]) - statistics.median(row["first_token_s"])) / max(args.new_tokens - 1, 1)
      bandwidth_share = 4 * side["weights"] / bounds.bandwidth(side["bounds"]) / step
      matmul_share = 2 * side["weights"] * int(batch) / bounds.peak_flops(side["bounds"]) / step
      print(f"{batch:>5s} {name:6s} {common.spread(rates):>22s} {common.spread(row['first_token_s']):>24s} "
            f"{row['full_warmup_s']:11.1f} {1 / step:8.1f} {100 * bandwidth_share:5.0f} {100 * matmul_share:5.0f}")
    ratios[batch] = statistics.median(theirs[batch]["full_s"]) / statistics.median(ours[batch]["full_s"])
    same = "same" if ours[batch]["tokens"] == theirs[batch]["tokens"] else "DIFFERENT"
    print(f"{batch:>5s} ratio ours/torch tokens/s {ratios[batch]:.2f}; first row's tokens {same} on both sides")
  print("tokens/s ratio ours/torch: " + ", ".join(f"batch {b} {ratios[b]:.2f}" for b in ("1", "8") if b in ratios))


if __name__ == "__main__":
  main()
