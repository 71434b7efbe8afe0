"""Audio front end: waveform loading and resampling, and Whisper's normalized log-mel spectrogram.

Two recipes share one log-mel function:
- `whisper_mel`: standard Whisper (and `transformers.WhisperFeatureExtractor`): pad or trim the waveform
  to 30 s, then log-mel → 3000 frames.
- `ltu_as_mel`: LTU-AS (ltu `src/ltu_as/whisper/whisper/transcribe.py`): log-mel of the whole waveform, so
  the -80 dB floor is set by the loudest bin of the whole file, then pad (with 0) or trim to 1000 frames
  (10 s).

This runs in data-loading workers, so it is numpy. The STFT is computed in float64: the fp32 `torch.stft` of
the references is off by up to ~5e-5 (normalized units) near the floor on tonal audio, where a bin is
~80 dB below its frame's peak; float64 agrees with `WhisperFeatureExtractor`'s numpy path to one fp32 ulp.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from typing import Any, Callable

import librosa
import numpy as np
import soundfile as sf
from numpy.lib.stride_tricks import sliding_window_view

SAMPLE_RATE = 16000
N_FFT = 400
HOP_LENGTH = 160
WHISPER_SAMPLES = 30 * SAMPLE_RATE
LTU_AS_FRAMES = 1000
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
  positions, `(fields, text)`: `text` is printed, or with `jsonl` the line `{"audio": PATH, **fields}`. A file
  that cannot be loaded is reported in its place (stderr; an `{"audio", "error"}` line with `jsonl`) and the
  others go on. Returns the exit status: 1 if any file failed.
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
          line = {"audio": path, "error": errors[index]} if jsonl else None
        else:
          fields, text = results[index]
          line = {"audio": path, **fields} if jsonl else text
        if line is not None:
          print(json.dumps(line, ensure_ascii=False) if jsonl else line, flush=True)
      bar.update(len(chunk))
  return 1 if failed else 0


@functools.lru_cache(maxsize=None)
def mel_filters(n_mels: int) -> np.ndarray:
  """Slaney-scale, slaney-normalized mel filters `[n_mels, N_FFT // 2 + 1]` float32, read-only.

  These are the values of Whisper's `mel_filters.npz`, which was made with this librosa call.
  """
  filters = librosa.filters.mel(sr=SAMPLE_RATE, n_fft=N_FFT, n_mels=n_mels)
  filters.setflags(write=False)
  return filters


def pad_or_trim(array: np.ndarray, length: int) -> np.ndarray:
  """`array` `[..., time]` cut, or zero-padded at the end, to `[..., length]`."""
  array = np.asarray(array)
  if array.shape[-1] >= length:
    return array[..., :length]
  padding = [(0, 0)] * (array.ndim - 1) + [(0, length - array.shape[-1])]
  return np.pad(array, padding)


def log_mel_spectrogram(waveform: np.ndarray, n_mels: int = 80) -> np.ndarray:
  """Whisper's normalized log-mel of a 16 kHz `waveform` `[..., samples]`.

  Returns `[..., n_mels, samples // HOP_LENGTH]` float32. Each example is floored at 8 (i.e. 80 dB) below
  its own maximum over all its mels and frames, then mapped by `(x + 4) / 4`.
  """
  waveform = np.asarray(waveform, np.float64)
  samples = waveform.shape[-1]
  if samples <= N_FFT // 2:
    raise ValueError(
      f"waveform has {samples} samples; the centered STFT needs more than {N_FFT // 2} to reflect-pad"
    )
  # centered STFT, as torch.stft(center=True, pad_mode="reflect")
  padding = [(0, 0)] * (waveform.ndim - 1) + [(N_FFT // 2, N_FFT // 2)]
  padded = np.pad(waveform, padding, mode="reflect")
  # the STFT has samples // hop + 1 frames; Whisper drops the last one
  frames = sliding_window_view(padded, N_FFT, axis=-1)[..., ::HOP_LENGTH, :]
  frames = frames[..., : samples // HOP_LENGTH, :]
  # periodic Hann, as torch.hann_window
  window = np.hanning(N_FFT + 1)[:-1]
  spectrum = np.fft.rfft(frames * window, axis=-1)
  power = spectrum.real**2 + spectrum.imag**2
  mel = mel_filters(n_mels) @ np.swapaxes(power, -1, -2)
  log_mel = np.log10(np.maximum(mel, 1e-10))
  log_mel = np.maximum(log_mel, log_mel.max(axis=(-2, -1), keepdims=True) - 8.0)
  return ((log_mel + 4.0) / 4.0).astype(np.float32)


def whisper_mel(waveform: np.ndarray, n_mels: int = 80) -> np.ndarray:
  """Standard Whisper input: `waveform` `[..., samples]` padded or trimmed to 30 s, `[..., n_mels, 3000]`."""
  return log_mel_spectrogram(pad_or_trim(waveform, WHISPER_SAMPLES), n_mels)


def ltu_as_mel(waveform: np.ndarray, n_mels: int = 80, frames: int = LTU_AS_FRAMES) -> np.ndarray:
  """LTU-AS input: log-mel of the whole `waveform` `[..., samples]`, then 0-padded or trimmed.

  Returns `[..., n_mels, frames]`; the floor is set by the whole file, including any part trimmed away.
  """
  return pad_or_trim(log_mel_spectrogram(waveform, n_mels), frames)
