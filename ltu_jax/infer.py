"""`python -m ltu_jax.infer --model LTU_AS_DIR [--question Q] [--mode joint|audio_only|asr_only] [--greedy]
[--max-new-tokens N] [--seed S] [--jsonl] [--batch-size B] AUDIO...`: LTU-AS answers about audio files.

Each clip takes the original demo's two paths (ltu `src/ltu_as/inference_gradio.py`, facts §1.1):
- the folder's Whisper (`LTU_AS_DIR/<extra["whisper"]>`) transcribes it (first 30 s, greedy; see
  `ltu_jax.transcribe`), and "thanks for watching"-style hallucinations are removed;
- the same Whisper's encoder turns its first 10 s into features `[layers, 25, dim]` (`data.WhisperFeatures`).
The question and transcript make the `alpaca_short` prompt (`data.prompt`), BOS first; the audio tokens go
before it, and `generate` answers with LTU-AS's sampling settings (`LTU_AS_SAMPLING`) unless `--greedy`.
Modes (ltu `src/ltu_as/inference_batch.py`): `joint` (audio and transcript), `audio_only` (no `### Input:`
section; no transcription), `asr_only` (the transcript without audio tokens).

Output: one answer per file, in order, or with `--jsonl` one `{"audio", "question", "transcript", "answer"}`
line per file. A file that cannot be read does not stop the others: its error goes to stderr (with
`--jsonl` an `{"audio", "error"}` line takes its place) and the command exits with status 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import re
import sys
from typing import NamedTuple, Sequence

import jax
import numpy as np

from ltu_jax import audio, data, model_folder, transcribe
from ltu_jax.generate import LTU_AS_SAMPLING, SamplingConfig, generate, left_pad
from ltu_jax.model_folder import Loaded

MODES = ("joint", "audio_only", "asr_only")
DEFAULT_QUESTION = "What can be inferred from the spoken text and sounds? Why?"  # the demo's
# Prompts are padded on the left to a multiple of this, so batches of similar prompts share one compiled decode.
PROMPT_MULTIPLE = 32
# Whisper's usual hallucination on silence or non-speech, which the demo deletes from its transcripts.
HALLUCINATION = re.compile(r"thank(?:s| you) for watching[.!]?", re.IGNORECASE)


def load_ltu_as(folder: str | os.PathLike, **options) -> Loaded:
  """`model_folder.load` for an LTU-AS folder; any other folder fails before its weights are read."""
  kind = model_folder.read_manifest(folder)["kind"]
  if kind != "ltu_as":
    raise ValueError(f"{folder} holds a {kind!r} model, not LTU-AS (make one with python -m conversion.ltu_as)")
  return require_ltu_as(model_folder.load(folder, **options))


def require_ltu_as(loaded: Loaded) -> Loaded:
  if loaded.kind != "ltu_as" or loaded.tokenizer is None:
    raise ValueError(f"{loaded.folder} holds a {loaded.kind!r} model; answering needs an LTU-AS folder with a tokenizer")
  return loaded


def whisper_folder(loaded: Loaded) -> str:
  """The Whisper model folder inside an LTU-AS folder (features and transcripts come from it)."""
  folder = os.path.join(loaded.folder, loaded.extra.get("whisper", ""))
  if "whisper" not in loaded.extra or not os.path.isfile(os.path.join(folder, model_folder.CONFIG_FILE)):
    raise ValueError(
      f"{loaded.folder} has no Whisper model folder (extra['whisper']); convert it with python -m conversion.ltu_as"
    )
  return folder


def load_whisper(loaded: Loaded) -> tuple[Loaded, data.WhisperFeatures]:
  """The Whisper of an LTU-AS folder and its feature extractor, loaded once per process."""
  return _load_whisper(whisper_folder(loaded))


@functools.lru_cache(maxsize=2)  # a large-v1 is 1.5 B parameters: not reloaded for every batch
def _load_whisper(folder: str) -> tuple[Loaded, data.WhisperFeatures]:
  whisper = model_folder.load(folder)
  return whisper, data.WhisperFeatures(whisper)


def clean_transcript(text: str) -> str:
  """Whisper's text with "thanks for watching"-style phrases removed (the demo's clean-up), stripped."""
  return HALLUCINATION.sub("", text).strip()


class Heard(NamedTuple):
  """What LTU-AS takes from a batch of clips: transcripts (None in audio_only mode) and Whisper features
  `[batch, layers, 25, dim]` float32 (None in asr_only mode)."""

  transcripts: list[str] | None
  features: np.ndarray | None


def hear(loaded: Loaded, waveforms: Sequence[np.ndarray], mode: str = "joint") -> Heard:
  """Transcribes and encodes 16 kHz waveforms `[samples]` with the folder's Whisper, as `mode` needs."""
  check_mode(mode)
  whisper, encoder = load_whisper(require_ltu_as(loaded))
  transcripts = features = None
  if mode != "audio_only":
    if whisper.tokenizer is None:
      raise ValueError(f"{whisper.folder} has no tokenizer to transcribe with; use --mode audio_only")
    transcripts = [clean_transcript(text) for text in transcribe.transcribe_batch(whisper, waveforms)]
  if mode != "asr_only":
    mels = np.stack([audio.ltu_as_mel(waveform, encoder.n_mels) for waveform in waveforms])
    # float16 then float32, as a cached feature reaches the model (`FeatureStore`)
    features = encoder(mels).astype(np.float32)
  return Heard(transcripts, features)


def respond(
  loaded: Loaded,
  questions: Sequence[str],
  transcripts: Sequence[str] | None,
  features: np.ndarray | None,
  *,
  mode: str = "joint",
  sampling: SamplingConfig = LTU_AS_SAMPLING,
  key: jax.Array | None = None,
) -> list[str]:
  """LTU-AS's answers for one batch of clips.

  Args:
    loaded: an LTU-AS model folder.
    questions: one instruction per clip.
    transcripts: one per clip ("" without speech), the `### Input:`; unused in audio_only mode.
    features: `[batch, layers, 25, dim]` Whisper features; unused in asr_only mode.
    mode: "joint", "audio_only" or "asr_only".
    sampling: how tokens are chosen; `key` is needed when it samples.
  Returns:
    The decoded new tokens of each clip, special tokens skipped, stripped.
  """
  check_mode(mode)
  require_ltu_as(loaded)
  if mode != "audio_only" and (transcripts is None or len(transcripts) != len(questions)):
    raise ValueError(f"{mode} mode needs one transcript per question")
  if mode != "asr_only" and (features is None or len(features) != len(questions)):
    raise ValueError(f"{mode} mode needs features for each question")
  extra = loaded.extra
  inputs = [None] * len(questions) if mode == "audio_only" else transcripts
  prompts = [data.prompt(question, text) for question, text in zip(questions, inputs)]
  token_lists = loaded.tokenizer(prompts, add_special_tokens=False)["input_ids"]
  pad_id = extra.get("pad_token_id") or 0
  ids, mask = left_pad([[extra["bos_token_id"], *tokens] for tokens in token_lists], pad_id)
  extra_columns = -ids.shape[1] % PROMPT_MULTIPLE
  ids = np.pad(ids, ((0, 0), (extra_columns, 0)), constant_values=pad_id)
  mask = np.pad(mask, ((0, 0), (extra_columns, 0)))
  out = generate(
    loaded.model, ids, mask,
    features=None if mode == "asr_only" else features,
    sampling=sampling, eos_ids=extra["eos_token_ids"], pad_id=pad_id, key=key,
  )
  tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
  return [
    loaded.tokenizer.decode(row[:length], skip_special_tokens=True).strip() for row, length in zip(tokens, lengths)
  ]


def answer(
  loaded: Loaded,
  clips: Sequence[np.ndarray | str | os.PathLike],
  questions: str | Sequence[str] = DEFAULT_QUESTION,
  *,
  sampling: SamplingConfig = LTU_AS_SAMPLING,
  mode: str = "joint",
  key: jax.Array | None = None,
) -> list[str]:
  """Answers about each clip, in one batch.

  Args:
    loaded: an LTU-AS model folder (`load_ltu_as`).
    clips: audio file paths, or 16 kHz mono waveforms `[samples]`.
    questions: one question for every clip, or one per clip.
    sampling: `LTU_AS_SAMPLING` (the original's) by default; sampling needs `key`.
    mode: "joint", "audio_only" or "asr_only".
  Returns:
    One answer per clip. A missing or undecodable file raises `FileNotFoundError` / `audio.AudioError`
    naming it.
  """
  waveforms = [
    audio.load_audio(clip) if isinstance(clip, (str, os.PathLike)) else np.asarray(clip, np.float32) for clip in clips
  ]
  questions = [questions] * len(waveforms) if isinstance(questions, str) else list(questions)
  if len(questions) != len(waveforms):
    raise ValueError(f"{len(questions)} questions for {len(waveforms)} clips")
  heard = hear(loaded, waveforms, mode)
  return respond(loaded, questions, heard.transcripts, heard.features, mode=mode, sampling=sampling, key=key)


def check_mode(mode: str) -> None:
  if mode not in MODES:
    raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")


def add_generation_arguments(parser: argparse.ArgumentParser, batch_size: int) -> None:
  """The options shared by `infer` and `eval`: mode, sampling, length, seed and batch size."""
  parser.add_argument("--mode", choices=MODES, default="joint", help="inputs given to the model (default: joint)")
  parser.add_argument(
    "--greedy", action="store_true",
    help="greedy decoding (keeping the repetition penalty) instead of LTU-AS's sampling (T=0.1, top-p 0.95, top-k 500)",
  )
  parser.add_argument("--max-new-tokens", type=int, default=LTU_AS_SAMPLING.max_new_tokens)
  parser.add_argument("--seed", type=int, default=0, help="random seed of the sampling")
  parser.add_argument(
    "--batch-size", type=int, default=batch_size, help=f"questions answered together (default: {batch_size})"
  )


def sampling_from_args(args: argparse.Namespace) -> SamplingConfig:
  return dataclasses.replace(LTU_AS_SAMPLING, max_new_tokens=args.max_new_tokens, do_sample=not args.greedy)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m ltu_jax.infer", description=__doc__.split("\n\n")[0])
  parser.add_argument("--model", required=True, help="an LTU-AS model folder (python -m conversion.ltu_as)")
  parser.add_argument("--question", default=DEFAULT_QUESTION, help=f"asked about every file (default: {DEFAULT_QUESTION!r})")
  parser.add_argument("--jsonl", action="store_true", help='print {"audio", "question", "transcript", "answer"} lines')
  add_generation_arguments(parser, batch_size=8)
  parser.add_argument("audio", nargs="+", help="audio files (any format libsndfile reads)")
  args = parser.parse_args(argv)
  if args.batch_size < 1 or args.max_new_tokens < 1:
    parser.error("--batch-size and --max-new-tokens must be at least 1")
  try:
    loaded = load_ltu_as(args.model)
    whisper_folder(loaded)
  except (FileNotFoundError, ValueError) as error:
    parser.error(str(error))
  sampling, key = sampling_from_args(args), jax.random.key(args.seed)

  def respond_batch(waveforms: dict[int, np.ndarray], batch: int) -> dict[int, tuple[dict, str]]:
    heard = hear(loaded, list(waveforms.values()), args.mode)
    answers = respond(
      loaded, [args.question] * len(waveforms), heard.transcripts, heard.features,
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
