"""`python -m conversion.whisper SRC OUT [--dtype float32|bfloat16|float16] [--tokenizer DIR]`: a Whisper
checkpoint → an ltu-jax model folder (`ltu_jax.load(OUT)`, `python -m ltu_jax.transcribe --model OUT`).

SRC is one of:
- a Hugging Face folder (`save_pretrained`: `config.json`, `model.safetensors` or `pytorch_model.bin`, sharded
  or not, `generation_config.json` and the tokenizer);
- a CTranslate2 / faster-whisper folder (`model.bin`, `config.json`, `tokenizer.json`);
- an openai-whisper `.pt` (`dims` + `model_state_dict`). It holds no tokenizer and no suppress lists: pass
  `--tokenizer DIR`, a Hugging Face or CTranslate2 folder of the same Whisper, whose text side is used.

Conversion is strict: a checkpoint that does not fit the model fails with every missing, unexpected and
mis-shaped key listed at once. Tensors stream one at a time; `--dtype` is the stored parameter dtype.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Any, Sequence

from tqdm import tqdm

from conversion import ctranslate2, hf_whisper, openai_whisper, rules, sources
from conversion.rules import Rule
from ltu_jax import model_folder
from ltu_jax.models.whisper import WhisperConfig

DTYPES = ("float32", "bfloat16", "float16")
# Every Whisper vocabulary ends with timestamp tokens <|0.00|> … <|30.00|> right after <|notimestamps|>.
TIMESTAMP_TOKENS = 1501


def read_checkpoint(src: str | os.PathLike) -> tuple[WhisperConfig, sources.Tensors, tuple[Rule, ...]]:
  """The config, the tensor stream and the name table of any supported Whisper checkpoint."""
  src = os.fspath(src)
  if os.path.isfile(src):
    return (*openai_whisper.read_checkpoint(src), openai_whisper.RULES)
  if ctranslate2.is_folder(src):
    return (*ctranslate2.iter_folder(src), ctranslate2.RULES)
  if os.path.isdir(src):
    return hf_whisper.read_folder(src)
  raise FileNotFoundError(f"Whisper checkpoint not found: {src}")


def _special_id(tokenizer: Any, token: str, folder: str) -> int:
  vocab = tokenizer.get_vocab()
  if token not in vocab:
    raise ValueError(f"the tokenizer in {folder} has no {token}: not a Whisper tokenizer; pass --tokenizer DIR")
  return vocab[token]


def read_text_side(folder: str | os.PathLike, config: WhisperConfig) -> tuple[Any, dict[str, Any]]:
  """The tokenizer of a Hugging Face or CTranslate2 Whisper folder, and the `extra` that transcription needs.

  extra: `decoder_start_token_id` (<|startoftranscript|>), `eos_token_id` (<|endoftext|>),
  `no_timestamps_token_id`, `suppress_tokens` (masked at every step), `begin_suppress_tokens` (masked at
  the first generated step) and `text_vocab_size`: ids from it on are timestamps, which some tokenizers
  lack (tiny.en's has 50363 tokens) and which untimed transcription never generates.
  """
  import transformers  # slow to import: only where text is needed

  folder = os.fspath(folder)
  if ctranslate2.is_folder(folder):
    path = sources.require_file(os.path.join(folder, ctranslate2.TOKENIZER_FILE), "tokenizer")
    tokenizer = transformers.WhisperTokenizer(tokenizer_file=path)
    settings = ctranslate2.read_settings(folder)
    names = ("suppress_ids", "suppress_ids_begin")
  else:
    try:
      tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as error:
      raise ValueError(f"no Whisper tokenizer in {folder} ({error}); pass --tokenizer DIR") from error
    settings = hf_whisper.read_settings(folder)
    names = ("suppress_tokens", "begin_suppress_tokens")
  no_timestamps = _special_id(tokenizer, "<|notimestamps|>", folder)
  absent = [name for name in names if settings.get(name) is None]
  if absent:
    raise ValueError(f"{folder} does not give {absent}; pass --tokenizer DIR of a folder that has them")
  if config.vocab_size != no_timestamps + 1 + TIMESTAMP_TOKENS:
    raise ValueError(
      f"the tokenizer in {folder} does not fit the model: <|notimestamps|> is {no_timestamps}, so the "
      f"vocabulary should have {no_timestamps + 1 + TIMESTAMP_TOKENS} ids, but the model has {config.vocab_size}"
    )
  extra = {
    "decoder_start_token_id": _special_id(tokenizer, "<|startoftranscript|>", folder),
    "eos_token_id": _special_id(tokenizer, "<|endoftext|>", folder),
    "no_timestamps_token_id": no_timestamps,
    "suppress_tokens": [int(i) for i in settings[names[0]]],
    "begin_suppress_tokens": [int(i) for i in settings[names[1]]],
    "text_vocab_size": no_timestamps + 1,
  }
  return tokenizer, extra


def convert(
  src: str | os.PathLike,
  out: str | os.PathLike,
  *,
  dtype: str = "float32",
  tokenizer: str | os.PathLike | None = None,
  progress: bool = True,
  force: bool = False,
) -> None:
  """Converts the Whisper checkpoint `src` into the model folder `out` (see the module docstring); `force`
  allows a non-empty `out` (`rules.check_output`)."""
  if dtype not in DTYPES:
    raise ValueError(f"dtype {dtype!r} is not one of {DTYPES}")
  rules.check_output(out, [src, tokenizer], force=force)
  config, tensors, table = read_checkpoint(src)
  text_folder = tokenizer if tokenizer is not None else src
  if not os.path.isdir(text_folder):
    raise ValueError(
      f"{src} holds no tokenizer (an openai-whisper .pt): pass --tokenizer DIR, a Hugging Face or "
      "CTranslate2 folder of the same Whisper"
    )
  text, extra = read_text_side(text_folder, config)
  config = dataclasses.replace(config, param_dtype=dtype)
  tensors = tqdm(tensors, desc=f"converting {os.fspath(src)}", unit=" tensors", file=sys.stderr, disable=not progress)
  model = hf_whisper.load_whisper(tensors, config, table, source=os.fspath(src))
  model_folder.save(out, model, "whisper", extra=extra, tokenizer=text)


def parser() -> argparse.ArgumentParser:
  """The command line; options may come before, between or after the positionals (`parse_intermixed_args`)."""
  parser = argparse.ArgumentParser(prog="python -m conversion.whisper", description=__doc__.split("\n\n")[0])
  parser.add_argument("src", help="Hugging Face folder, CTranslate2 folder or openai-whisper .pt")
  parser.add_argument("out", help="the model folder to write: new or empty (see --force)")
  parser.add_argument("--dtype", choices=DTYPES, default="float32", help="stored parameter dtype")
  parser.add_argument("--tokenizer", help="Hugging Face or CTranslate2 folder giving the tokenizer and suppress lists")
  parser.add_argument("--force", action="store_true", help="write into a non-empty OUT, keeping its files")
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  args = parser().parse_intermixed_args(argv)
  convert(args.src, args.out, dtype=args.dtype, tokenizer=args.tokenizer, force=args.force)
  print(f"wrote {os.path.abspath(args.out)}", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
