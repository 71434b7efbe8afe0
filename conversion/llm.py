"""`python -m conversion.llm SRC OUT`: a LLaMA-family LLM into a model folder (kind "llama").

SRC is a Hugging Face folder (config.json with safetensors or `.bin` weights, single or sharded, and its
tokenizer) or a llama.cpp `.gguf` file (dequantised). Tensors stream one at a time into the model, so
reading holds about one copy of the model plus the largest tensor. `--lora-rank` adds fresh LoRA adapters
(B = 0: the model is unchanged until trained).

    python -m conversion.llm SmolLM2-135M-Instruct.Q4_1.gguf cache/smollm2
    python -m conversion.llm vicuna-7b/ cache/vicuna --dtype bfloat16 --lora-rank 8 --lora-targets q_proj,v_proj
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from typing import Sequence

import numpy as np
from tqdm import tqdm

from conversion import gguf_llama, hf_llama, rules
from conversion.hf_llama import LlamaCheckpoint, build_llama
from ltu_jax import model_folder
from ltu_jax.models.lora import LoRAConfig

DTYPES = ("float32", "bfloat16", "float16")


def open_checkpoint(source: str, lora: LoRAConfig | None = None, **overrides) -> LlamaCheckpoint:
  """A `.gguf` file or a Hugging Face folder, by the path's form."""
  if source.endswith(".gguf"):
    return gguf_llama.open_gguf(source, lora, **overrides)
  return hf_llama.open_hf_folder(source, lora, **overrides)


def convert(
  source: str,
  out: str,
  *,
  param_dtype: str = "float32",
  lora: LoRAConfig | None = None,
  strict: bool = True,
  force: bool = False,
) -> None:
  """Writes the model folder `out` from `source`; see the module docstring. `force` allows a non-empty
  `out` (`rules.check_output`)."""
  rules.check_output(out, [source], force=force)  # before the long part, not after it
  checkpoint = open_checkpoint(source, lora, param_dtype=param_dtype)
  tokenizer = checkpoint.load_tokenizer()
  tensors = tqdm(checkpoint.tensors, total=checkpoint.count, desc=os.path.basename(source), unit="tensor")
  # Beside OUT rather than in /tmp: the same disk as the result, and /tmp may be RAM (tmpfs).
  parent = os.path.dirname(os.path.abspath(out))
  os.makedirs(parent, exist_ok=True)
  scratch = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(out))}-", dir=parent)

  def allocate(path: str, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    return np.lib.format.open_memmap(os.path.join(scratch, f"{path}.npy"), mode="w+", dtype=dtype, shape=shape)

  try:
    model = build_llama(
      checkpoint.config, tensors, checkpoint.table, source=checkpoint.source, strict=strict,
      fresh_lora=lora is not None, allocate=allocate,
    )
    model_folder.save(out, model, "llama", extra=checkpoint.special_tokens, tokenizer=tokenizer)
  finally:
    shutil.rmtree(scratch, ignore_errors=True)


def parser() -> argparse.ArgumentParser:
  """The command line; options may come before, between or after the positionals (`parse_intermixed_args`)."""
  parser = argparse.ArgumentParser(
    prog="python -m conversion.llm", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument("source", help="a Hugging Face LLaMA-family folder or a llama.cpp .gguf file")
  parser.add_argument("out", help="the model folder to write: new or empty (see --force)")
  parser.add_argument("--force", action="store_true", help="write into a non-empty OUT, keeping its files")
  parser.add_argument("--dtype", choices=DTYPES, default="float32", help="dtype of the stored weights")
  parser.add_argument(
    "--no-strict", dest="strict", action="store_false",
    help="ignore checkpoint keys that no rule maps (every parameter must still be present)",
  )
  defaults = LoRAConfig()
  parser.add_argument("--lora-rank", type=int, help="add fresh LoRA adapters of this rank")
  parser.add_argument("--lora-alpha", type=float, default=defaults.alpha, help="the adapters' scale is alpha / rank")
  parser.add_argument("--lora-dropout", type=float, default=defaults.dropout, help="adapter input dropout in training")
  parser.add_argument("--lora-targets", default=",".join(defaults.targets), help="comma-separated projections")
  return parser


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  command = parser()
  args = command.parse_intermixed_args(argv)
  targets = tuple(args.lora_targets.split(","))
  unknown = sorted(set(targets) - set(hf_llama.ATTENTION + hf_llama.MLP))
  if unknown:
    command.error(f"unknown --lora-targets {unknown}; expected some of {hf_llama.ATTENTION + hf_llama.MLP}")
  args.lora = None
  if args.lora_rank is not None:
    args.lora = LoRAConfig(rank=args.lora_rank, alpha=args.lora_alpha, dropout=args.lora_dropout, targets=targets)
  return args


def main(argv: Sequence[str] | None = None) -> None:
  args = parse_args(argv)
  convert(args.source, args.out, param_dtype=args.dtype, lora=args.lora, strict=args.strict, force=args.force)
  print(f"wrote {os.path.abspath(args.out)}")


if __name__ == "__main__":
  main()
