"""`python -m ltu_jax.infer --model DIR [--question Q] [--mode joint|audio_only|asr_only] [--greedy]
[--max-new-tokens N] [--max-windows W] [--dtype bfloat16] [--seed S] [--jsonl] [--batch-size B] AUDIO...`:
an audio-language model (LTU-AS) answers about audio files.

Each clip takes the original demo's two paths (ltu `src/ltu_as/inference_gradio.py`, facts §1.1):
- the folder's Whisper (`DIR/<extra["whisper"]>`) transcribes it whole (`ltu_jax.transcribe`, long-form past
  30 s), and "thanks for watching"-style hallucinations are removed;
- the front end cuts it into 10 s windows (`ltu_jax.frontend`; up to `--max-windows`, by default what the
  model was trained with, 1 for the release: longer audio is dropped with a warning naming the clip), and
  the same Whisper's encoder turns each into 25 audio tokens' features (`ltu_jax.features`).
The question (and, for a kind that reads it, the transcript) make the kind's prompt (`ltu_jax.kinds`), BOS
first; the audio tokens go before it, and the decoding engine (`ltu_jax.generate`) answers with the kind's
sampling settings unless `--greedy`. Modes (ltu `src/ltu_as/inference_batch.py`): `joint` (audio and
transcript), `audio_only` (no `### Input:` section; no transcription), `asr_only` (the transcript without
audio tokens). `--dtype bfloat16` casts the weights and the compute at load (logits stay fp32): what
accelerators use; on CPU fp32 is faster.

Output: one answer per file, in order, or with `--jsonl` one `{"audio", "question", "transcript", "answer"}`
line per file. A file that cannot be read does not stop the others: its error goes to stderr (with
`--jsonl` an `{"audio", "error"}` line takes its place) and the command exits with status 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
from typing import Iterator, NamedTuple, Sequence

import jax
import numpy as np

from ltu_jax import audio, data, features, kinds, model_folder, transcribe
from ltu_jax.generate import Generated, SamplingConfig, generate, left_pad, stream
from ltu_jax.model_folder import Loaded

MODES = ("joint", "audio_only", "asr_only")
DTYPES = ("float32", "bfloat16")
DEFAULT_QUESTION = "What can be inferred from the spoken text and sounds? Why?"  # the demo's
# Whisper's usual hallucination on silence or non-speech, which the demo deletes from its transcripts.
HALLUCINATION = re.compile(r"thank(?:s| you) for watching[.!]?", re.IGNORECASE)


def load_model(folder: str | os.PathLike, command: str = "infer", dtype: str | None = None, **options) -> Loaded:
  """An audio-language model folder, its kind checked before any weight is read; `dtype` ("bfloat16")
  casts the weights and the compute."""
  model_folder.require(folder, command, kinds.AUDIO_LLM)
  return require_audio_llm(model_folder.load(folder, **options, **model_folder.cast_to(dtype)), command)


def require_audio_llm(loaded: Loaded, command: str = "infer") -> Loaded:
  kinds.require(loaded.kind, command, kinds.AUDIO_LLM, loaded.folder)
  if loaded.tokenizer is None:
    raise ValueError(f"{loaded.folder} has no tokenizer; `{command}` needs one to write its prompts")
  return loaded


def clean_transcript(text: str) -> str:
  """Whisper's text with "thanks for watching"-style phrases removed (the demo's clean-up), stripped."""
  return HALLUCINATION.sub("", text).strip()


class Heard(NamedTuple):
  """What the model takes from a batch of clips: transcripts (None in audio_only mode), features
  `[batch, layers, max_windows * 25, dim]` float32 and the audio mask `[batch, max_windows * 25]` (None in
  asr_only mode)."""

  transcripts: list[str] | None
  features: np.ndarray | None
  audio_mask: np.ndarray | None

  @property
  def audio(self) -> tuple[np.ndarray, np.ndarray] | None:
    """The decoding engine's context: `(features, audio_mask)`, or None without audio."""
    return None if self.features is None else (self.features, self.audio_mask)


def hear(
  loaded: Loaded,
  waveforms: Sequence[np.ndarray],
  mode: str = "joint",
  *,
  names: Sequence[str] | None = None,
  max_windows: int | None = None,
  dtype: str | None = None,
) -> Heard:
  """Transcribes and encodes 16 kHz waveforms `[samples]` with the folder's Whisper, as `mode` needs;
  `names` (file names) go into the warning about audio beyond `max_windows` windows."""
  check_mode(mode)
  require_audio_llm(loaded)
  kind = kinds.get(loaded.kind)
  whisper = features.load_whisper(features.whisper_folder(loaded), dtype)
  transcripts = audio_features = audio_mask = None
  if mode != "audio_only" and kind.uses_transcript:
    if whisper.tokenizer is None:
      raise ValueError(f"{whisper.folder} has no tokenizer to transcribe with; use --mode audio_only")
    transcripts = [clean_transcript(text) for text in transcribe.transcribe_batch(whisper, waveforms)]
  if mode != "asr_only":
    extractor = features.for_model(loaded, max_windows, dtype)
    names = names or [f"clip {i}" for i in range(len(waveforms))]
    clips = extractor.clips([extractor.windows(w, name) for w, name in zip(waveforms, names)])
    # float16 then float32, as a cached feature reaches the model (`FeatureStore`)
    audio_features, audio_mask = data.pad_audio(clips, extractor.frontend.tokens(extractor.frontend.max_windows))
    audio_features = audio_features.astype(np.float32)
  return Heard(transcripts, audio_features, audio_mask)


def respond(
  loaded: Loaded,
  questions: Sequence[str],
  transcripts: Sequence[str] | None,
  audio_in: tuple[np.ndarray, np.ndarray] | np.ndarray | None,
  *,
  mode: str = "joint",
  sampling: SamplingConfig | None = None,
  key: jax.Array | None = None,
) -> list[str]:
  """The model's answers for one batch of clips.

  Args:
    loaded: an audio-language model folder.
    questions: one instruction per clip.
    transcripts: one per clip ("" without speech), the `### Input:`; unused in audio_only mode.
    audio_in: `(features [batch, layers, tokens, dim], audio_mask [batch, tokens])` or features alone
      (`Heard.audio`); unused in asr_only mode.
    mode: "joint", "audio_only" or "asr_only".
    sampling: how tokens are chosen (default: the kind's); `key` is needed when it samples.
  Returns:
    The decoded new tokens of each clip, special tokens skipped, stripped.
  """
  ids, mask, engine = _prompts(loaded, questions, transcripts, audio_in, mode, sampling)
  return _texts(loaded, generate(loaded.model, ids, mask, key=key, **engine))


def respond_stream(
  loaded: Loaded,
  questions: Sequence[str],
  transcripts: Sequence[str] | None,
  audio_in: tuple[np.ndarray, np.ndarray] | np.ndarray | None,
  *,
  mode: str = "joint",
  sampling: SamplingConfig | None = None,
  key: jax.Array | None = None,
) -> Iterator[list[str]]:
  """`respond` token by token (the demo's streamed answer): takes its arguments and yields, after each new
  token, the answers so far; the last are `respond`'s."""
  ids, mask, engine = _prompts(loaded, questions, transcripts, audio_in, mode, sampling)
  for so_far in stream(loaded.model, ids, mask, key=key, **engine):
    yield _texts(loaded, so_far)


def _prompts(loaded, questions, transcripts, audio_in, mode, sampling) -> tuple[np.ndarray, np.ndarray, dict]:
  """`respond`'s arguments checked and made into the engine's request: (ids, mask, the other arguments)."""
  check_mode(mode)
  kind = kinds.get(require_audio_llm(loaded).kind)
  reads_transcript = mode != "audio_only" and kind.uses_transcript
  if reads_transcript and (transcripts is None or len(transcripts) != len(questions)):
    raise ValueError(f"{mode} mode needs one transcript per question")
  clip_features = audio_in[0] if isinstance(audio_in, tuple) else audio_in
  if mode != "asr_only" and (clip_features is None or len(clip_features) != len(questions)):
    raise ValueError(f"{mode} mode needs features for each question")
  extra = loaded.extra
  inputs = transcripts if reads_transcript else [None] * len(questions)
  prompts = [kind.prompt(question, text) for question, text in zip(questions, inputs)]
  token_lists = loaded.tokenizer(prompts, add_special_tokens=False)["input_ids"]
  pad_id = extra.get("pad_token_id") or 0
  ids, mask = left_pad([[extra["bos_token_id"], *tokens] for tokens in token_lists], pad_id)
  engine = dict(
    context=None if mode == "asr_only" else audio_in, sampling=sampling or kind.sampling,
    eos_ids=extra["eos_token_ids"], pad_id=pad_id,
  )
  return ids, mask, engine


def _texts(loaded: Loaded, out: Generated) -> list[str]:
  """Each row's new tokens decoded, special tokens skipped, stripped."""
  tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
  return [
    loaded.tokenizer.decode(row[:length], skip_special_tokens=True).strip() for row, length in zip(tokens, lengths)
  ]


def answer(
  loaded: Loaded,
  clips: Sequence[np.ndarray | str | os.PathLike],
  questions: str | Sequence[str] = DEFAULT_QUESTION,
  *,
  sampling: SamplingConfig | None = None,
  mode: str = "joint",
  key: jax.Array | None = None,
  max_windows: int | None = None,
) -> list[str]:
  """Answers about each clip, in one batch.

  Args:
    loaded: an audio-language model folder (`load_model`).
    clips: audio file paths, or 16 kHz mono waveforms `[samples]`.
    questions: one question for every clip, or one per clip.
    sampling: the kind's (LTU-AS: the original's) by default; sampling needs `key`.
    mode: "joint", "audio_only" or "asr_only".
    max_windows: 10 s windows a clip may fill (default: what the model was trained with).
  Returns:
    One answer per clip. A missing or undecodable file raises `FileNotFoundError` / `audio.AudioError`
    naming it.
  """
  waveforms = [
    audio.load_audio(clip) if isinstance(clip, (str, os.PathLike)) else np.asarray(clip, np.float32) for clip in clips
  ]
  names = [os.fspath(clip) if isinstance(clip, (str, os.PathLike)) else f"clip {i}" for i, clip in enumerate(clips)]
  questions = [questions] * len(waveforms) if isinstance(questions, str) else list(questions)
  if len(questions) != len(waveforms):
    raise ValueError(f"{len(questions)} questions for {len(waveforms)} clips")
  heard = hear(loaded, waveforms, mode, names=names, max_windows=max_windows, dtype=_dtype_of(loaded))
  return respond(loaded, questions, heard.transcripts, heard.audio, mode=mode, sampling=sampling, key=key)


def _dtype_of(loaded: Loaded) -> str | None:
  """The compute dtype a loaded model was given, for its Whisper too (None: as stored)."""
  dtype = getattr(loaded.config.llm, "dtype", None) if hasattr(loaded.config, "llm") else None
  return None if dtype in (None, "float32") else dtype


def check_mode(mode: str) -> None:
  if mode not in MODES:
    raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")


def add_generation_arguments(parser: argparse.ArgumentParser, batch_size: int | None) -> None:
  """The options shared by `infer`, `eval` and `demo`: mode, sampling, length, windows, dtype, seed and (unless
  `batch_size` is None: the demo answers one clip at a time) batch size."""
  parser.add_argument("--mode", choices=MODES, default="joint", help="inputs given to the model (default: joint)")
  parser.add_argument(
    "--greedy", action="store_true",
    help="greedy decoding (keeping the repetition penalty) instead of the kind's sampling (LTU-AS: T=0.1, top-p 0.95, top-k 500)",
  )
  parser.add_argument("--max-new-tokens", type=int, help="default: the kind's (LTU-AS: 400)")
  parser.add_argument("--max-windows", type=int, help="10 s windows a clip may fill (default: the model's)")
  parser.add_argument("--dtype", choices=DTYPES, help="cast weights and compute at load (default: as stored)")
  parser.add_argument("--seed", type=int, default=0, help="random seed of the sampling")
  if batch_size is None:
    return
  parser.add_argument(
    "--batch-size", type=int, default=batch_size, help=f"questions answered together (default: {batch_size})"
  )


def sampling_from_args(args: argparse.Namespace, loaded: Loaded) -> SamplingConfig:
  """The kind's sampling with the command line's changes."""
  sampling = dataclasses.replace(kinds.get(loaded.kind).sampling, do_sample=not args.greedy)
  if args.max_new_tokens is not None:
    sampling = dataclasses.replace(sampling, max_new_tokens=args.max_new_tokens)
  return sampling


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
  for name in ("batch_size", "max_new_tokens", "max_windows"):
    value = getattr(args, name, None)
    if value is not None and value < 1:
      parser.error(f"--{name.replace('_', '-')} must be at least 1, got {value}")


def parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="python -m ltu_jax.infer", description=__doc__.split("\n\n")[0])
  parser.add_argument("--model", required=True, help="an LTU-AS model folder (python -m conversion.ltu_as)")
  parser.add_argument("--question", default=DEFAULT_QUESTION, help=f"asked about every file (default: {DEFAULT_QUESTION!r})")
  parser.add_argument("--jsonl", action="store_true", help='print {"audio", "question", "transcript", "answer"} lines')
  add_generation_arguments(parser, batch_size=8)
  parser.add_argument("audio", nargs="+", help="audio files (any format libsndfile reads)")
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  cli = parser()
  args = cli.parse_intermixed_args(argv)
  check_arguments(cli, args)
  try:
    loaded = load_model(args.model, dtype=args.dtype)
    features.whisper_folder(loaded)
  except (FileNotFoundError, ValueError) as error:
    cli.error(str(error))
  sampling, key = sampling_from_args(args, loaded), jax.random.key(args.seed)

  def respond_batch(waveforms: dict[int, np.ndarray], batch: int) -> dict[int, tuple[dict, str]]:
    names = [args.audio[batch * args.batch_size + index] for index in waveforms]
    heard = hear(loaded, list(waveforms.values()), args.mode, names=names, max_windows=args.max_windows, dtype=args.dtype)
    answers = respond(
      loaded, [args.question] * len(waveforms), heard.transcripts, heard.audio,
      mode=args.mode, sampling=sampling, key=jax.random.fold_in(key, batch),
    )
    transcripts = heard.transcripts or [None] * len(waveforms)
    return {
      index: ({"question": args.question, "transcript": transcript, "answer": text}, text)
      for index, transcript, text in zip(waveforms, transcripts, answers)
    }

  return audio.answer_files(args.audio, args.batch_size, respond_batch, args.jsonl)


if __name__ == "__main__":
  sys.exit(main())
