"""Prints the measured max abs errors behind the parity tests (the tests assert the bars; this shows the
figures), fp32 with full-precision matmuls, on the tests' random-weight models.

    .venv/bin/python bench/parity_report.py
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from flax import nnx  # noqa: E402

from ltu_jax.models.lora import LoRAConfig  # noqa: E402
from tests import test_llama, test_ltu_as  # noqa: E402
from tests.helpers import max_abs_diff  # noqa: E402


def rows():
  for name in sorted(test_llama.HF_CONFIGS):
    reference = test_llama.hf_model(name)
    ids = test_llama.token_batch(reference.config.vocab_size)
    mask = np.ones_like(ids)
    ours = test_llama.forward(test_llama.ours(reference), ids, mask)
    yield f"LLaMA logits vs transformers ({name})", max_abs_diff(ours, test_llama.reference_logits(reference, ids, mask))
  lora = LoRAConfig(8, 16.0, 0.05, ("q_proj", "v_proj"))
  reference = test_llama.peft_model("mha_untied", lora.targets, lora.rank, lora.alpha)
  ids = test_llama.token_batch(reference.config.vocab_size)
  mask = np.ones_like(ids)
  ours = test_llama.forward(test_llama.ours(reference, lora), ids, mask)
  yield "LoRA logits vs peft (r8, α16, q/v)", max_abs_diff(ours, test_llama.reference_logits(reference, ids, mask))
  for name in sorted(test_ltu_as.SETUPS):
    reference, model = test_ltu_as.build(name)
    features, ids = test_ltu_as.batch(name)
    mask = np.ones_like(ids)
    with torch.no_grad():
      expected = reference.get_base_model().model.audio_encoder(torch.as_tensor(features))
    yield f"TLTR vs reference ({name})", max_abs_diff(nnx.jit(lambda m, f: m(f))(model.audio_encoder, features), expected)
    logits, _ = test_ltu_as.reference_outputs(reference, features, ids, mask)
    yield f"LTU-AS logits vs reference ({name})", max_abs_diff(test_ltu_as.forward(model, features, ids, mask), logits)


def main() -> None:
  with jax.default_matmul_precision("highest"):
    for name, error in rows():
      print(f"{name:48s} {error:.2e}")


if __name__ == "__main__":
  main()
