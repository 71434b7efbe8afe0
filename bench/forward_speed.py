"""LLM forward-pass speed on CPU: our jitted model against the PyTorch reference, on the same weights.

    .venv/bin/python bench/forward_speed.py [--llm smollm2-135m] [--tokens 256] [--repeats 5]

(The Whisper encoder has its own, `bench/encoder_speed.py`.)

Prints, per workload, our compile time, our and PyTorch's median time per forward, and the ratio
PyTorch / ours (above 1: we are faster). Weights are random (speed does not depend on their values)
but identical on both sides: our model is converted from the PyTorch one. Ours runs as a jitted pure
function of the model state (`nnx.split` once, `jax.jit` on the state), as the trainer and inference do.
Run it on an idle machine: two cores are easily disturbed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from flax import nnx  # noqa: E402

from conversion import hf_llama  # noqa: E402
from tests.helpers import numpy_state_dict  # noqa: E402

LLM_SIZES = {
  "smollm2-135m": dict(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
    num_key_value_heads=3, rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True,
  ),
  "llama-7b": dict(
    vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=32, rms_norm_eps=1e-6, tie_word_embeddings=False,
  ),
}


def timed(fn, repeats: int) -> tuple[float, float]:
  """(first call's seconds, median of `repeats` further calls)."""
  start = time.perf_counter()
  fn()
  first = time.perf_counter() - start
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return first, statistics.median(times)


def llm_rows(size: str, tokens: int, repeats: int):
  config = transformers.LlamaConfig(**LLM_SIZES[size], attn_implementation="sdpa")
  reference = transformers.LlamaForCausalLM(config).eval()
  graphdef, state = nnx.split(hf_llama.load_llama(hf_llama.config_from_hf(config), numpy_state_dict(reference)))
  ids = np.random.default_rng(0).integers(0, config.vocab_size, (1, tokens))
  forward = jax.jit(lambda state, ids: nnx.merge(graphdef, state)(ids)[0])
  compile_s, ours_s = timed(lambda: jax.block_until_ready(forward(state, ids)), repeats)
  with torch.no_grad():
    ids_t = torch.from_numpy(ids)
    _, torch_s = timed(lambda: reference(ids_t).logits, repeats)
  yield f"{size} logits, {tokens}-token prompt", compile_s, ours_s, torch_s


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--llm", default="smollm2-135m", choices=sorted(LLM_SIZES))
  parser.add_argument("--tokens", type=int, default=256)
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}, torch {torch.__version__} with {torch.get_num_threads()} threads, fp32")
  print(f"{'workload':42s} {'compile s':>10s} {'ours s':>9s} {'torch s':>9s} {'torch/ours':>11s}")
  rows = llm_rows(args.llm, args.tokens, args.repeats)
  for name, compile_s, ours_s, torch_s in rows:
    print(f"{name:42s} {compile_s:10.2f} {ours_s:9.3f} {torch_s:9.3f} {torch_s / ours_s:11.2f}")


if __name__ == "__main__":
  main()
