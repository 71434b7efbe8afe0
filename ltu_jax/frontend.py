"""The audio front end: what a 16 kHz waveform of any length becomes at an encoder's input, and how many
audio tokens it yields. One object per recipe; the recipe's numbers are written here once.

- `WhisperLogMel`: standard Whisper (and `transformers.WhisperFeatureExtractor`): the waveform padded or
  trimmed to 30 s, then log-mel → 3000 frames (1500 encoder frames). Longer speech is windowed by
  `ltu_jax.transcribe` (long-form).
- `LtuAsWindows`: LTU-AS (ltu `src/ltu_as/whisper/whisper/transcribe.py`): the log-mel of the whole waveform,
  so the -80 dB floor is set by the loudest bin of the whole file, cut into consecutive 10 s windows of 1000
  frames (the last one 0-padded), 25 audio tokens each, up to `max_windows` (1 for the release: its first
  10 s, exactly the original's). Audio beyond the limit is dropped with a warning naming the clip.
- `LtuFbankWindows`: LTU (ltu `src/ltu/.../data_collator.py`, facts §2): the waveform's mean removed, Kaldi's
  log-mel filterbank (`torchaudio.compliance.kaldi.fbank` with the original's options: 128 HTK mel bins,
  25 ms symmetric Hann window, 10 ms shift, no dither) of the whole clip, cut into 10.24 s windows of 1024
  frames (the last one 0-padded) and normalized `(x + 5.081) / 4.4849`; 32 audio tokens each, the same
  windowing policy as LTU-AS.

This runs in data-loading workers, so it is numpy. The STFT is computed in float64: the fp32 `torch.stft` of
the references is off by up to ~5e-5 (normalized units) near the floor on tonal audio, where a bin is
~80 dB below its frame's peak; float64 agrees with `WhisperFeatureExtractor`'s numpy path to one fp32 ulp.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Protocol

import librosa
import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from ltu_jax.audio import SAMPLE_RATE

log = logging.getLogger(__name__)

N_FFT = 400
HOP_LENGTH = 160
WHISPER_SECONDS = 30
WHISPER_SAMPLES = WHISPER_SECONDS * SAMPLE_RATE
WHISPER_FRAMES = WHISPER_SAMPLES // HOP_LENGTH
LTU_AS_WINDOW_FRAMES = 1000  # 10 s of log-mel
LTU_AS_POOL = 20  # encoder frames (after Whisper's stride-2 conv) averaged into one audio token: 0.4 s
LTU_AS_TOKENS = LTU_AS_WINDOW_FRAMES // 2 // LTU_AS_POOL  # 25 per window

# LTU's Kaldi filterbank (torchaudio.compliance.kaldi.fbank as the original calls it; Kaldi's defaults
# for the options it does not pass).
FBANK_BINS = 128
FBANK_FRAME = 400  # 25 ms
FBANK_SHIFT = 160  # 10 ms
FBANK_FFT = 512  # the frame zero-padded to a power of two
FBANK_LOW_HZ = 20.0
FBANK_PREEMPHASIS = 0.97
FBANK_FLOOR = float(np.finfo(np.float32).eps)  # the log's floor on mel energies
LTU_WINDOW_FRAMES = 1024  # 10.24 s
LTU_NORM_SHIFT, LTU_NORM_SCALE = 5.081, 4.4849  # the release's normalization: (x + 5.081) / 4.4849
LTU_TOKENS = 32  # per window: 8 × 64 patches, frequency averaged, time pooled by 2


class Frontend(Protocol):
  """A recipe: `windows(waveform, name)` → the encoder inputs `[windows, ...]` of one clip; `tokens(windows)`
  → the audio tokens they make."""

  def windows(self, waveform: np.ndarray, name: str = "") -> np.ndarray: ...

  def tokens(self, windows: int) -> int: ...


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


@functools.lru_cache(maxsize=None)
def fbank_filters(num_bins: int = FBANK_BINS) -> np.ndarray:
  """Kaldi's triangular mel filters `[num_bins, FBANK_FFT // 2 + 1]` float32, read-only: equally spaced on
  the HTK mel scale (`1127 ln(1 + f / 700)`) from 20 Hz to Nyquist, over the FFT bins' frequencies, the
  Nyquist bin 0.

  Computed in float32 as Kaldi (BaseFloat) and torchaudio do: the filters are part of the definition, and
  float64 ones move a log energy by up to ~4e-4. At 128 bins and a 512-point FFT the narrowest filter
  (bin 3) falls between FFT bins and is all zero; Kaldi refuses such settings, torchaudio (and so the
  original) keeps the bin, whose log energy is then the floor.
  """
  f32 = np.float32

  def mel(hz):
    # the float32 log correctly rounded (as glibc's logf and torch's), which numpy's float32 log is not
    return f32(1127.0) * np.log((f32(1.0) + hz / f32(700.0)).astype(np.float64)).astype(f32)

  # the band edges in double (Python floats), as torchaudio; everything per bin in float32
  low, high = 1127.0 * np.log1p(FBANK_LOW_HZ / 700.0), 1127.0 * np.log1p(SAMPLE_RATE / 2 / 700.0)
  delta = f32((high - low) / (num_bins + 1))
  index = np.arange(num_bins, dtype=f32)[:, None]
  left, center, right = (f32(low) + (index + f32(k)) * delta for k in (0, 1, 2))
  bin_mel = mel(f32(SAMPLE_RATE / FBANK_FFT) * np.arange(FBANK_FFT // 2, dtype=f32))[None, :]
  filters = np.maximum(f32(0.0), np.minimum((bin_mel - left) / (center - left), (right - bin_mel) / (right - center)))
  filters = np.pad(filters, ((0, 0), (0, 1)))
  filters.setflags(write=False)
  return filters


def kaldi_fbank(waveform: np.ndarray, num_bins: int = FBANK_BINS) -> np.ndarray:
  """Kaldi's log mel filterbank of a 16 kHz `waveform` `[samples]` as the original computes it
  (`torchaudio.compliance.kaldi.fbank(htk_compat=True, use_energy=False, window_type="hanning",
  num_mel_bins=128, dither=0.0, frame_shift=10)`), after removing the waveform's mean.

  Frames of 25 ms every 10 ms that fit in the clip (`snip_edges`); each frame loses its mean, is
  pre-emphasised (0.97, its first sample repeated before it), windowed by a symmetric Hann and
  zero-padded to 512 samples; log of the mel energies of its power spectrum, floored at float32's eps.
  The spectrum is float64: torchaudio's float32 one is off by up to ~1e-3 in bins near the floor (the
  silence between words), which float64 does not share.
  Returns `[frames, num_bins]` float32 (no frames for a clip under 25 ms).
  """
  waveform = np.asarray(waveform, np.float64)
  waveform = waveform - waveform.mean() if waveform.size else waveform
  if waveform.shape[-1] < FBANK_FRAME:
    return np.zeros((0, num_bins), np.float32)
  frames = sliding_window_view(waveform, FBANK_FRAME)[::FBANK_SHIFT]
  frames = frames - frames.mean(axis=-1, keepdims=True)
  previous = np.concatenate([frames[:, :1], frames[:, :-1]], axis=-1)
  frames = (frames - FBANK_PREEMPHASIS * previous) * np.hanning(FBANK_FRAME)
  spectrum = np.fft.rfft(frames, n=FBANK_FFT, axis=-1)
  power = spectrum.real**2 + spectrum.imag**2
  return np.log(np.maximum(power @ fbank_filters(num_bins).T, FBANK_FLOOR)).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class WhisperLogMel:
  """Whisper's own input: one window, the first 30 s as `[n_mels, 3000]`."""

  n_mels: int = 80

  def __call__(self, waveforms: np.ndarray) -> np.ndarray:
    """`[..., samples]` → `[..., n_mels, 3000]`: padded or trimmed to 30 s, then log-mel."""
    return log_mel_spectrogram(pad_or_trim(waveforms, WHISPER_SAMPLES), self.n_mels)

  def windows(self, waveform: np.ndarray, name: str = "") -> np.ndarray:
    del name
    return self(np.asarray(waveform, np.float32))[None]

  def tokens(self, windows: int) -> int:
    return windows * WHISPER_FRAMES // 2


@dataclasses.dataclass(frozen=True)
class LtuAsWindows:
  """LTU-AS's recipe: consecutive 10 s windows of one log-mel of the whole clip, 25 tokens each."""

  n_mels: int = 80
  max_windows: int = 1
  tokens_per_window: int = LTU_AS_TOKENS
  window_frames: int = LTU_AS_WINDOW_FRAMES

  def __post_init__(self):
    if self.max_windows < 1:
      raise ValueError(f"max_windows must be at least 1, got {self.max_windows}")

  @property
  def window_seconds(self) -> float:
    return self.window_frames * HOP_LENGTH / SAMPLE_RATE

  def count(self, samples: int) -> int:
    """How many windows a clip of `samples` fills, at most `max_windows` (a clip shorter than 10 s: 1)."""
    frames = samples // HOP_LENGTH
    return max(1, min(self.max_windows, -(-frames // self.window_frames)))

  def cut(self, spectrogram: np.ndarray, samples: int, name: str) -> np.ndarray:
    """A clip's `[bins, frames]` → `[windows, bins, window_frames]`: consecutive windows, the last one
    0-padded, up to `max_windows` (what lies beyond is dropped with a warning naming the clip)."""
    count = self.count(samples)
    kept = count * self.window_frames
    if spectrogram.shape[-1] > kept:
      dropped = (samples - kept * HOP_LENGTH) / SAMPLE_RATE
      log.warning(
        "%s: %.1f s of audio beyond %d window(s) of %g s are dropped (raise max_windows to keep them)",
        name or "clip", dropped, count, self.window_seconds,
      )
    bins = spectrogram.shape[0]
    return pad_or_trim(spectrogram, kept).reshape(bins, count, self.window_frames).swapaxes(0, 1)

  def windows(self, waveform: np.ndarray, name: str = "") -> np.ndarray:
    """`[samples]` → `[windows, n_mels, 1000]` float32; the floor is set by the whole clip, also any part
    beyond the last window, as the original's (which takes the log-mel of the whole file, then trims)."""
    mel = log_mel_spectrogram(np.asarray(waveform, np.float32), self.n_mels)
    return self.cut(mel, mel.shape[-1] * HOP_LENGTH, name)

  def tokens(self, windows: int) -> int:
    return windows * self.tokens_per_window


@dataclasses.dataclass(frozen=True)
class LtuFbankWindows(LtuAsWindows):
  """LTU's recipe: the Kaldi filterbank of the whole clip (`kaldi_fbank`) in consecutive 10.24 s windows of
  1024 frames, time-major as the original's `[1024, 128]`, normalized after padding (padded frames hold
  the normalized 0), 32 tokens each."""

  n_mels: int = FBANK_BINS
  tokens_per_window: int = LTU_TOKENS
  window_frames: int = LTU_WINDOW_FRAMES

  def windows(self, waveform: np.ndarray, name: str = "") -> np.ndarray:
    """`[samples]` → `[windows, 1024, n_mels]` float32."""
    waveform = np.asarray(waveform, np.float32)
    fbank = kaldi_fbank(waveform, self.n_mels).T
    windows = self.cut(fbank, len(waveform), name).swapaxes(1, 2)
    return ((windows + LTU_NORM_SHIFT) / LTU_NORM_SCALE).astype(np.float32)
