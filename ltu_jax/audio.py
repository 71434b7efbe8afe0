"""Audio files: decoding any format at any rate to 16 kHz mono, and the per-file loop of the commands.

What a waveform becomes for an encoder (log-mel, windows, audio-token counts) is `ltu_jax.frontend`'s.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Callable

import librosa
import numpy as np
import soundfile as sf

SAMPLE_RATE = 16000
# soxr's high-quality preset (librosa's default): 20-bit precision, a steep anti-aliasing filter
RESAMPLER = "soxr_hq"


class AudioError(ValueError):
  """An audio file that exists but cannot be used: undecodable, or without samples."""


def load_audio(path: str | os.PathLike, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
  """Decodes any format libsndfile reads (wav, flac, ogg, mp3, ...) to mono at `sample_rate`.

  Channels are averaged (as ffmpeg's `-ac 1` does for stereo); PCM is scaled to [-1, 1) as Whisper's
  `s16le / 32768` is. Returns `[samples]` float32.
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"audio file not found: {path}")
  try:
    samples, file_rate = sf.read(path, dtype="float32", always_2d=True)
  except sf.LibsndfileError as error:
    raise AudioError(f"cannot decode audio file {path}: {error.error_string}") from error
  if samples.shape[0] == 0:
    raise AudioError(f"audio file {path} holds no samples; expected a non-empty clip")
  waveform = samples.mean(axis=1)
  if file_rate != sample_rate:
    waveform = librosa.resample(waveform, orig_sr=file_rate, target_sr=sample_rate, res_type=RESAMPLER)
  return waveform.astype(np.float32, copy=False)


def load_each(paths: list[str], sample_rate: int = SAMPLE_RATE) -> tuple[dict[int, np.ndarray], dict[int, str]]:
  """Loads every file of a batch, going on past bad ones: (waveforms, errors), keyed by position in `paths`
  (a path may be given twice)."""
  waveforms, errors = {}, {}
  for index, path in enumerate(paths):
    try:
      waveforms[index] = load_audio(path, sample_rate)
    except (OSError, AudioError) as error:
      errors[index] = str(error)
  return waveforms, errors


def answer_files(
  paths: list[str],
  batch_size: int,
  respond: Callable[[dict[int, np.ndarray], int], dict[int, tuple[dict[str, Any], str]]],
  jsonl: bool,
) -> int:
  """The command-line loop of transcribe and infer: audio files in batches, one output line per file, in order.

  `respond(waveforms, batch_index)` gets a batch's loaded clips by position and returns, by the same
  positions, `(fields, text)`. Every line names its file: `PATH<TAB>text` (newlines in the text become
  spaces, so one file is one line), or with `jsonl` `{"audio": PATH, **fields}`. A file that cannot be loaded
  gets its line in its place, `PATH<TAB>error: ...` (an `{"audio", "error"}` line with `jsonl`), its error
  goes to stderr, and the others go on; stderr ends with a count of the failures. Returns the exit status:
  1 if any file failed.
  """
  from tqdm import tqdm

  failed = 0
  with tqdm(total=len(paths), unit=" files", file=sys.stderr, disable=len(paths) < 2) as bar:
    for batch, start in enumerate(range(0, len(paths), batch_size)):
      chunk = paths[start : start + batch_size]
      waveforms, errors = load_each(chunk)
      results = respond(waveforms, batch) if waveforms else {}
      for index, path in enumerate(chunk):
        if index in errors:
          failed += 1
          bar.write(f"error: {errors[index]}", file=sys.stderr)
          fields, text = {"error": errors[index]}, f"error: {errors[index]}"
        else:
          fields, text = results[index]
        line = json.dumps({"audio": path, **fields}, ensure_ascii=False) if jsonl else f"{path}\t{' '.join(text.splitlines())}"
        print(line, flush=True)
      bar.update(len(chunk))
  if failed:
    print(f"{failed} of {len(paths)} files failed (their lines say why)", file=sys.stderr)
  return 1 if failed else 0
