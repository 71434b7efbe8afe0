"""Audio front end: log-mel parity with transformers and with OpenAI Whisper's torch code, and loading."""

from __future__ import annotations

import math
import re

import librosa
import numpy as np
import pytest
import soundfile as sf
import torch
from transformers import WhisperFeatureExtractor
from transformers.models.whisper import feature_extraction_whisper

from ltu_jax import audio, frontend
from tests.helpers import max_abs_diff

# Normalized log-mel units ((log10 + 4) / 4).
MEL_ATOL = 1e-5
# Peak of a resampled sine: 16-bit PCM and soxr's passband ripple stay well below this ...
LOSSLESS_AMPLITUDE_ATOL = 1e-4
# ... but Vorbis is lossy (measured 1e-2 on a 0.6 sine).
VORBIS_AMPLITUDE_ATOL = 2e-2

SR = audio.SAMPLE_RATE


def tones(seconds: float, amplitude: float = 0.5) -> np.ndarray:
  """A linear 100→1700 Hz chirp plus a 440 Hz sine `[samples]` float32.

  Narrow-band, so many bins sit near the 80 dB floor, where STFT precision shows.
  """
  t = np.arange(round(seconds * SR)) / SR
  chirp = np.sin(2 * np.pi * (100 * t + 1600 * t**2 / (2 * seconds)))
  return (amplitude * (0.7 * chirp + 0.3 * np.sin(2 * np.pi * 440 * t))).astype(np.float32)


def noise(seconds: float, scale: float, seed: int = 0) -> np.ndarray:
  return (scale * np.random.default_rng(seed).standard_normal(round(seconds * SR))).astype(np.float32)


WAVEFORMS = {
  "noise_30s_exact": noise(30, 0.1),
  "tones_7s_short": tones(7.3),
  "silence_ish_20s": noise(20, 1e-5, seed=1),
  "digital_silence_5s": np.zeros(5 * SR, np.float32),
  "tones_in_noise_37s_long": tones(37) + noise(37, 0.01, seed=2),
}


@pytest.mark.parametrize("n_mels", [80, 128])
@pytest.mark.parametrize("name", list(WAVEFORMS))
def test_whisper_mel_matches_transformers(name, n_mels, monkeypatch):
  # With torch installed the extractor runs torch.stft in fp32, whose own error near the floor is up to
  # ~5e-5 on tones (measured against float64); its numpy path is float64 and is the exact reference.
  monkeypatch.setattr(feature_extraction_whisper, "is_torch_available", lambda: False)
  waveform = WAVEFORMS[name]
  extractor = WhisperFeatureExtractor(feature_size=n_mels)
  reference = extractor(waveform, sampling_rate=SR, return_tensors="np").input_features[0]
  ours = frontend.WhisperLogMel(n_mels)(waveform)
  assert ours.shape == reference.shape == (n_mels, 3000)
  assert ours.dtype == np.float32
  assert max_abs_diff(ours, reference) <= MEL_ATOL


def openai_log_mel(waveform: np.ndarray, n_mels: int) -> np.ndarray:
  """OpenAI Whisper's `log_mel_spectrogram` (ltu `src/ltu_as/whisper/whisper/audio.py`): `[n_mels, frames]`.

  Run in float64: in fp32 the reference's own STFT error near the floor exceeds MEL_ATOL on tones.
  """
  stft = torch.stft(
    torch.from_numpy(waveform).double(),
    frontend.N_FFT,
    frontend.HOP_LENGTH,
    window=torch.hann_window(frontend.N_FFT, dtype=torch.float64),
    center=True,
    pad_mode="reflect",
    return_complex=True,
  )
  magnitudes = stft[..., :-1].abs() ** 2
  filters = torch.from_numpy(librosa.filters.mel(sr=SR, n_fft=frontend.N_FFT, n_mels=n_mels)).double()
  log_spec = torch.clamp(filters @ magnitudes, min=1e-10).log10()
  log_spec = torch.maximum(log_spec, log_spec.max() - 8.0)
  return ((log_spec + 4.0) / 4.0).numpy()


def openai_ltu_as_mel(waveform: np.ndarray, n_mels: int) -> np.ndarray:
  """The LTU-AS recipe on top: `pad_or_trim(mel, 1000)` in the normalized domain → `[n_mels, 1000]`."""
  mel = openai_log_mel(waveform, n_mels)
  kept = min(mel.shape[-1], frontend.LTU_AS_WINDOW_FRAMES)
  padded = np.zeros((n_mels, frontend.LTU_AS_WINDOW_FRAMES))
  padded[:, :kept] = mel[:, :kept]
  return padded


@pytest.mark.parametrize("n_mels", [80, 128])
def test_ltu_as_mel_pads_a_short_clip(n_mels):
  waveform = tones(4) + noise(4, 0.01)
  ours = frontend.LtuAsWindows(n_mels).windows(waveform)[0]
  assert ours.shape == (n_mels, 1000)
  assert max_abs_diff(ours, openai_ltu_as_mel(waveform, n_mels)) <= MEL_ATOL
  assert np.all(ours[:, 400:] == 0.0)


@pytest.mark.parametrize("n_mels", [80, 128])
def test_ltu_as_mel_trims_after_taking_the_whole_files_max(n_mels):
  # Quiet first 10 s, loud burst at 11-13 s: only a whole-file max puts the floor 80 dB below the burst.
  waveform = tones(14, amplitude=1e-3) + noise(14, 1e-6)
  waveform[11 * SR : 13 * SR] += noise(2, 0.5, seed=3)
  ours = frontend.LtuAsWindows(n_mels).windows(waveform)[0]
  assert ours.shape == (n_mels, 1000)
  assert max_abs_diff(ours, openai_ltu_as_mel(waveform, n_mels)) <= MEL_ATOL
  whole_file_max = frontend.log_mel_spectrogram(waveform, n_mels).max()
  assert ours.min() == pytest.approx(whole_file_max - 2.0, abs=MEL_ATOL)
  first_10s_max = frontend.log_mel_spectrogram(waveform[: 10 * SR], n_mels).max()
  assert whole_file_max - first_10s_max > 0.5


def test_long_clips_fill_consecutive_windows_in_order_up_to_the_limit(caplog):
  # 25 s: three 10 s windows of one whole-clip log-mel, the last 0-padded; 35 s with a limit of 3 drops 5 s.
  waveform = tones(25) + noise(25, 0.01)
  whole = frontend.log_mel_spectrogram(waveform)
  recipe = frontend.LtuAsWindows(max_windows=3)
  windows = recipe.windows(waveform, "speech.wav")
  assert windows.shape == (3, 80, 1000) and recipe.tokens(len(windows)) == 75
  for index in range(3):
    part = whole[:, index * 1000 : (index + 1) * 1000]
    assert max_abs_diff(windows[index, :, : part.shape[1]], part) <= MEL_ATOL
  assert np.all(windows[2, :, 500:] == 0.0)
  assert not caplog.records
  longer = tones(35)
  assert recipe.windows(longer, "long.wav").shape == (3, 80, 1000)
  assert "long.wav: 5.0 s of audio beyond 3 window(s)" in caplog.text
  assert recipe.count(len(tones(4))) == 1 and recipe.count(len(tones(10.5))) == 2


def test_batched_log_mel_floors_each_example_at_its_own_max():
  loud, quiet = tones(3), tones(3, amplitude=1e-4) + noise(3, 1e-7)
  batched = frontend.log_mel_spectrogram(np.stack([loud, quiet]))
  assert batched.shape == (2, 80, 300)
  assert max_abs_diff(batched[0], frontend.log_mel_spectrogram(loud)) <= MEL_ATOL
  assert max_abs_diff(batched[1], frontend.log_mel_spectrogram(quiet)) <= MEL_ATOL


def test_log_mel_rejects_a_waveform_too_short_to_reflect_pad():
  with pytest.raises(ValueError, match="200 samples"):
    frontend.log_mel_spectrogram(np.zeros(200, np.float32))


def sine(frequency: float, seconds: float, rate: int, amplitude: float) -> np.ndarray:
  return amplitude * np.sin(2 * np.pi * frequency * np.arange(round(seconds * rate)) / rate)


def peak_frequency(waveform: np.ndarray) -> float:
  return float(np.argmax(np.abs(np.fft.rfft(waveform)))) * SR / len(waveform)


@pytest.mark.parametrize(
  "name, rate, subtype, frequency, channels, amplitude_atol",
  [
    ("stereo.wav", 44100, "PCM_16", 1000.0, 2, LOSSLESS_AMPLITUDE_ATOL),
    ("mono.flac", 8000, "PCM_16", 440.0, 1, LOSSLESS_AMPLITUDE_ATOL),
    ("mono.ogg", 48000, "VORBIS", 2500.0, 1, VORBIS_AMPLITUDE_ATOL),
  ],
)
def test_load_audio_gives_16khz_mono_float32(
  tmp_path, name, rate, subtype, frequency, channels, amplitude_atol
):
  tone = sine(frequency, seconds=1.5, rate=rate, amplitude=0.6)
  # a silent second channel halves the amplitude only if the channels are averaged
  samples = np.stack([tone, np.zeros_like(tone)], axis=1) if channels == 2 else tone
  sf.write(tmp_path / name, samples, rate, subtype=subtype)
  waveform = audio.load_audio(tmp_path / name)
  assert waveform.dtype == np.float32 and waveform.ndim == 1
  assert len(waveform) == math.ceil(len(tone) * SR / rate)
  assert abs(peak_frequency(waveform) - frequency) <= SR / len(waveform)
  # the middle quarter-seconds avoid the resampler's edge transients
  middle = waveform[SR // 4 : -SR // 4]
  assert np.max(np.abs(middle)) == pytest.approx(0.6 / channels, abs=amplitude_atol)


def test_load_audio_keeps_16khz_pcm_exact(tmp_path):
  pcm = np.random.default_rng(0).integers(-32768, 32767, SR, dtype=np.int16)
  sf.write(tmp_path / "clip.wav", pcm, SR)
  np.testing.assert_array_equal(audio.load_audio(tmp_path / "clip.wav"), pcm / np.float32(32768))


def test_load_audio_missing_file_names_the_path(tmp_path):
  path = tmp_path / "missing.wav"
  with pytest.raises(FileNotFoundError, match=re.escape(str(path))):
    audio.load_audio(path)


def test_load_audio_corrupt_file_names_the_path(tmp_path):
  path = tmp_path / "corrupt.wav"
  path.write_bytes(np.random.default_rng(0).bytes(4096))
  with pytest.raises(audio.AudioError, match=re.escape(str(path))) as error:
    audio.load_audio(path)
  assert isinstance(error.value, ValueError)
  assert isinstance(error.value.__cause__, sf.LibsndfileError)


def test_load_audio_empty_file_is_a_clear_error(tmp_path):
  path = tmp_path / "empty.wav"
  sf.write(path, np.zeros(0), SR)
  with pytest.raises(audio.AudioError, match=re.escape(f"{path} holds no samples")):
    audio.load_audio(path)
