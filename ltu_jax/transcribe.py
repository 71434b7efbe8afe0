"""`python -m ltu_jax.transcribe --model DIR [--jsonl] [--batch-size N] AUDIO...`: English speech to text
with a converted Whisper folder (`python -m conversion.whisper`).

Decoding is Whisper's untimed greedy search over the standard 30 s window (longer audio is cut at 30 s):
- prompt `<|startoftranscript|> <|notimestamps|>`; a multilingual model (a vocabulary of 51865 ids or more,
  openai-whisper's own test) gets `<|en|> <|transcribe|>` after the start token;
- masked logits: the folder's `suppress_tokens` at every step, its `begin_suppress_tokens` at the first
  generated step, and every id from `text_vocab_size` on (timestamps);
- stop at `<|endoftext|>` or when `max_target_positions` tokens fill the decoder.
The decoding engine (`ltu_jax.generate`) runs the encoder and the cross-attention keys once per batch, then
the cached decoder steps, all in one compiled call per batch and prompt bucket.

Output: one line of text per file, or with `--jsonl` one `{"audio": PATH, "text": TEXT}` per file, in order.
A file that cannot be read does not stop the others: its error goes to stderr (and with `--jsonl` a
`{"audio": PATH, "error": MESSAGE}` line takes its place) and the command exits with status 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Sequence

import numpy as np

from ltu_jax import audio, generate, kinds, model_folder

MULTILINGUAL_VOCAB = 51865


def prompt_ids(loaded: model_folder.Loaded) -> list[int]:
  """The decoder prompt for untimed English transcription (see the module docstring)."""
  extra = loaded.extra
  task = []
  if loaded.config.vocab_size >= MULTILINGUAL_VOCAB:
    vocab = loaded.tokenizer.get_vocab()
    task = [vocab["<|en|>"], vocab["<|transcribe|>"]]
  return [extra["decoder_start_token_id"], *task, extra["no_timestamps_token_id"]]


def suppress_masks(loaded: model_folder.Loaded) -> tuple[np.ndarray, np.ndarray]:
  """Boolean `[vocab]` masks of the ids never generated: at the first generated step, and after it."""
  extra = loaded.extra
  later = np.zeros(loaded.config.vocab_size, bool)
  later[extra["suppress_tokens"]] = True
  later[extra["text_vocab_size"] :] = True
  first = later.copy()
  first[extra["begin_suppress_tokens"]] = True
  return first, later


def greedy_tokens(loaded: model_folder.Loaded, waveforms: Sequence[np.ndarray]) -> list[list[int]]:
  """Generated ids (prompt and `<|endoftext|>` excluded) of each 16 kHz waveform `[samples]` (its first
  30 s), decoded together by the engine."""
  if not waveforms:
    return []
  kind = kinds.require(loaded.kind, "transcribe", kinds.TRANSCRIBES, loaded.folder)
  config, eos = loaded.config, loaded.extra["eos_token_id"]
  frontend = kind.frontend(config, 1)
  mel = np.concatenate([frontend.windows(waveform) for waveform in waveforms])
  prompt = prompt_ids(loaded)
  # as many tokens as the decoder's positions hold after the prompt
  sampling = dataclasses.replace(kind.sampling, max_new_tokens=config.max_target_positions - len(prompt))
  out = generate.generate(
    loaded.model, np.tile(np.asarray(prompt, np.int32), (len(waveforms), 1)), context=mel, sampling=sampling,
    eos_ids=[eos], pad_id=eos, suppress=suppress_masks(loaded),
  )
  tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
  return [[int(t) for t in row[:length] if t != eos] for row, length in zip(tokens, lengths)]


def transcribe_batch(loaded: model_folder.Loaded, waveforms: Sequence[np.ndarray]) -> list[str]:
  """The text of each 16 kHz waveform `[samples]`, decoded as Whisper does (special tokens skipped, stripped)."""
  return [loaded.tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in greedy_tokens(loaded, waveforms)]


def transcribe(loaded: model_folder.Loaded, waveform: np.ndarray) -> str:
  """The text of one 16 kHz waveform `[samples]`."""
  return transcribe_batch(loaded, [waveform])[0]


def parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="python -m ltu_jax.transcribe", description=__doc__.split("\n\n")[0])
  parser.add_argument("--model", required=True, help="a Whisper model folder (python -m conversion.whisper)")
  parser.add_argument("--jsonl", action="store_true", help='print {"audio": PATH, "text": TEXT} lines')
  parser.add_argument("--batch-size", type=int, default=8, help="files transcribed together")
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), help="cast weights and compute at load (default: as stored)")
  parser.add_argument("audio", nargs="+", help="audio files (any format libsndfile reads)")
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  cli = parser()
  args = cli.parse_intermixed_args(argv)
  if args.batch_size < 1:
    cli.error("--batch-size must be at least 1")
  try:
    model_folder.require(args.model, "transcribe", kinds.TRANSCRIBES)
  except (FileNotFoundError, ValueError) as error:
    cli.error(str(error))
  options = {} if args.dtype is None else {"param_dtype": args.dtype, "dtype": args.dtype}
  loaded = model_folder.load(args.model, **options)

  def respond(waveforms: dict[int, np.ndarray], batch: int) -> dict[int, tuple[dict, str]]:
    texts = transcribe_batch(loaded, list(waveforms.values()))
    return {index: ({"text": text}, text) for index, text in zip(waveforms, texts)}

  return audio.answer_files(args.audio, args.batch_size, respond, args.jsonl)


if __name__ == "__main__":
  sys.exit(main())
