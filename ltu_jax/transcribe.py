"""`python -m ltu_jax.transcribe --model DIR [--jsonl] [--batch-size N] AUDIO...`: English speech to text
with a converted Whisper folder (`python -m conversion.whisper`), for audio of any length.

Decoding is Whisper's untimed greedy search over its standard 30 s window:
- prompt `<|startoftranscript|> <|notimestamps|>`; a multilingual model (a vocabulary of 51865 ids or more,
  openai-whisper's own test) gets `<|en|> <|transcribe|>` after the start token;
- masked logits: the folder's `suppress_tokens` at every step, its `begin_suppress_tokens` at the first
  generated step, and every id from `text_vocab_size` on (timestamps);
- stop at `<|endoftext|>` or when `max_target_positions` tokens fill the decoder.
The decoding engine (`ltu_jax.generate`) runs the encoder and the cross-attention keys once per batch, then
the cached decoder steps, all in one compiled call per batch and prompt bucket.

Audio longer than 30 s is read much as transformers' chunked ASR pipeline reads it (`chunk_length_s=30`,
its default stride): windows of up to 30 s that start about every 20 s, so that each shares some 10 s with
the next; unlike the pipeline, every cut moves back (up to 2 s) to the quietest point, a pause, rather than
cutting a word (`window_bounds`). All windows of all clips of a call are decoded together, in batches, and
each clip's windows are joined where consecutive token lists agree longest (`merge_windows`). A clip of
30 s or less is one window, decoded exactly as before.

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

from ltu_jax import audio, frontend, generate, kinds, model_folder

MULTILINGUAL_VOCAB = 51865
# transformers' pipeline default: a stride of chunk_length_s / 6 on each side of a window.
STRIDE_SAMPLES = frontend.WHISPER_SAMPLES // 6
# A cut moves up to 2 s back to the quietest 20 ms there (a pause between words, or between sentences).
QUIET_SEARCH_SAMPLES = 2 * audio.SAMPLE_RATE
QUIET_FRAME = audio.SAMPLE_RATE // 50
# The fewest agreeing tokens that join two windows: one shared token (" the", ".") is as likely chance.
MIN_OVERLAP_TOKENS = 2


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


def quietest(waveform: np.ndarray, start: int, stop: int) -> int:
  """The sample at the middle of the quietest `QUIET_FRAME` of `waveform[start:stop]` (its lowest mean square)."""
  start, stop = max(start, 0), min(stop, len(waveform))
  frames = max((stop - start) // QUIET_FRAME, 1)
  energy = np.square(waveform[start : start + frames * QUIET_FRAME]).reshape(frames, -1).mean(axis=1)
  return start + int(np.argmin(energy)) * QUIET_FRAME + QUIET_FRAME // 2


def window_bounds(
  waveform: np.ndarray,
  window: int = frontend.WHISPER_SAMPLES,
  stride: int = STRIDE_SAMPLES,
  search: int = QUIET_SEARCH_SAMPLES,
) -> list[tuple[int, int]]:
  """`(start, stop)` sample bounds of overlapping windows of at most `window` samples covering `waveform`
  `[samples]`; a waveform of at most `window` samples is its own one window.

  As in transformers' pipeline, window k + 1 starts `window - 2 * stride` samples after window k, but each cut
  moves to the quietest point up to `search` samples before it: a window that starts or ends inside a word
  makes Whisper drop or invent words there, and tiny.en often drops the whole sentence that was cut (on
  `bench/long_form_wer.py`'s recording, hard cuts lost several sentences: 43% word errors, against 8%).
  """
  bounds, start = [], 0
  while start + window < len(waveform):
    bounds.append((start, quietest(waveform, start + window - search, start + window)))
    step = window - 2 * stride
    start = quietest(waveform, start + step - search, start + step)
  return [*bounds, (start, len(waveform))]


def join_overlapping(left: Sequence[int], right: Sequence[int], min_overlap: int = MIN_OVERLAP_TOKENS) -> list[int]:
  """Two consecutive windows' ids as one list, joined at the longest run of ids that both hold; both
  concatenated when no run of `min_overlap` ids agrees.

  Only alignments where `left`'s end overlaps `right`'s start count (the windows share the end of one and the
  start of the other), each without insertions, so a word that one window hears differently only splits the
  run. Before the run `left` is kept, since `right` starts there; after it, the longer of the two
  continuations, normally `right`'s: a window whose transcript stops early (Whisper's failure near a cut,
  or a last window that holds little beyond the overlap) gives the shorter.
  """
  left, right = list(left), list(right)
  best, cut_left, cut_right = 0, len(left), 0
  for shift in range(len(left)):  # left[shift + j] faces right[j]
    run = 0
    for j in range(min(len(left) - shift, len(right))):
      run = run + 1 if left[shift + j] == right[j] else 0
      # `>=`: of equally long runs, the one nearest left's end, where the windows really overlap.
      if run >= max(best, 1):
        best, cut_left, cut_right = run, shift + j - run + 1, j - run + 1
  if best < min_overlap:
    return left + right
  continuation = max(left[cut_left:], right[cut_right:], key=len)
  return left[:cut_left] + continuation


def merge_windows(sequences: Sequence[Sequence[int]]) -> list[int]:
  """One clip's ids from its consecutive windows' ids (see `join_overlapping`)."""
  merged: list[int] = []
  for sequence in sequences:
    merged = join_overlapping(merged, sequence)
  return merged


def long_form_tokens(
  loaded: model_folder.Loaded, waveforms: Sequence[np.ndarray], batch_size: int | None = None
) -> list[list[int]]:
  """Generated ids of each 16 kHz waveform `[samples]` of any length: every window of every clip decoded by
  `greedy_tokens` in batches of `batch_size` (None: all at once), then merged per clip."""
  per_clip = [
    [waveform[start:stop] for start, stop in window_bounds(waveform)]
    for waveform in (np.asarray(w, np.float32) for w in waveforms)
  ]
  pieces = [piece for clip in per_clip for piece in clip]
  size = batch_size or max(len(pieces), 1)
  decoded = [ids for start in range(0, len(pieces), size) for ids in greedy_tokens(loaded, pieces[start : start + size])]
  merged, start = [], 0
  for clip in per_clip:
    merged.append(merge_windows(decoded[start : start + len(clip)]))
    start += len(clip)
  return merged


def transcribe_batch(
  loaded: model_folder.Loaded, waveforms: Sequence[np.ndarray], batch_size: int | None = None
) -> list[str]:
  """The text of each 16 kHz waveform `[samples]` of any length, decoded as Whisper does (special tokens
  skipped, stripped); at most `batch_size` 30 s windows are decoded at once (None: all of them)."""
  return [
    loaded.tokenizer.decode(ids, skip_special_tokens=True).strip()
    for ids in long_form_tokens(loaded, waveforms, batch_size)
  ]


def transcribe(loaded: model_folder.Loaded, waveform: np.ndarray) -> str:
  """The text of one 16 kHz waveform `[samples]` of any length."""
  return transcribe_batch(loaded, [waveform])[0]


def parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="python -m ltu_jax.transcribe", description=__doc__.split("\n\n")[0])
  parser.add_argument("--model", required=True, help="a Whisper model folder (python -m conversion.whisper)")
  parser.add_argument("--jsonl", action="store_true", help='print {"audio": PATH, "text": TEXT} lines')
  parser.add_argument("--batch-size", type=int, default=8, help="files read, and 30 s windows decoded, together")
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
  loaded = model_folder.load(args.model, **model_folder.cast_to(args.dtype))

  def respond(waveforms: dict[int, np.ndarray], batch: int) -> dict[int, tuple[dict, str]]:
    texts = transcribe_batch(loaded, list(waveforms.values()), args.batch_size)
    return {index: ({"text": text}, text) for index, text in zip(waveforms, texts)}

  return audio.answer_files(args.audio, args.batch_size, respond, args.jsonl)


if __name__ == "__main__":
  sys.exit(main())
