"""LTU's front end: Kaldi's filterbank against a PyTorch reference written from Kaldi's definition
(tests/torch_reference.py; torchaudio, which the original ran, cannot be pinned beside our torch) and against
kaldi-native-fbank, an independent implementation, where that one applies; then the 10.24 s windows."""

from __future__ import annotations

import logging

import kaldi_native_fbank as knf
import numpy as np
import pytest
import torch

from ltu_jax import frontend, tiny_data
from ltu_jax.audio import SAMPLE_RATE
from tests import torch_reference
from tests.helpers import LONG_SPEECH, espeak_speech, max_abs_diff, recording

FBANK_TOL = 1e-5  # ours vs the reference, raw log energies and normalized windows
# The reference runs in float64 but for its filters (float32 by definition, as Kaldi's and torchaudio's):
# torchaudio's float32 arithmetic (the mean removal, the FFT) is itself off by up to ~1e-3 in near-silent
# frames, where a bin's energy is within a few ulps of the waveform's rounding; measured 8e-4 on the speech
# clip below.
# kaldi-native-fbank computes in float32 with its own FFT and filters, and refuses 128 bins at this FFT size
# (bin 3 gets no FFT bin), so it is checked at bin counts it accepts (Kaldi's default 23, and 80), on the
# bins within KNF_RANGE (natural log units, ~65 dB) of their frame's loudest, where the two agree to
# KNF_TOL (measured: 7e-4 at most). Bins further down, near the floor, are left out: there float32
# rounding dominates, and they differ by up to ~8e-3 (a beeping sound's silent gaps).
KNF_TOL = 1e-3
KNF_RANGE = 15.0
KNF_BINS = (23, 80)


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, np.ndarray]:
  """Real speech (espeak-ng sentences), each synthesised sound of the tiny set, silence and a tiny clip."""
  rng = np.random.default_rng(0)
  speech = espeak_speech(LONG_SPEECH[:3], tmp_path_factory.mktemp("speech"))
  out = {"speech": recording(speech), "speech_short": speech[0][: SAMPLE_RATE]}
  out.update({name: sound.synthesise(3 * SAMPLE_RATE, rng).astype(np.float32) for name, sound in tiny_data.SOUNDS.items()})
  out["silence"] = np.zeros(SAMPLE_RATE, np.float32)
  out["under_a_frame"] = rng.normal(size=300).astype(np.float32)
  return out


def test_fbank_matches_kaldi_reference(clips):
  for name, waveform in clips.items():
    ours = frontend.kaldi_fbank(waveform)
    centred = torch.as_tensor(waveform).double() - torch.as_tensor(waveform).double().mean()
    expected = torch_reference.kaldi_fbank(centred) if len(waveform) >= 400 else torch.zeros(0, 128)
    assert ours.shape == tuple(expected.shape), name
    assert ours.size == 0 or max_abs_diff(ours, expected) <= FBANK_TOL, name


def test_window_matches_the_original_collator(clips):
  """One window: padded (short clips) or cut (the speech recording is ~10 s, below and above 1024 frames)."""
  ltu = frontend.LtuFbankWindows()
  for name, waveform in clips.items():
    if len(waveform) < 400:
      continue
    windows = ltu.windows(waveform, name)
    assert windows.shape == (1, 1024, 128) and windows.dtype == np.float32
    expected = torch_reference.ltu_fbank_window(torch.as_tensor(waveform).double())
    assert max_abs_diff(windows[0], expected) <= FBANK_TOL, name


def test_empty_bin_is_the_floor():
  """At 128 bins the narrowest filter covers no FFT bin: its log energy is log(eps) on any audio."""
  empty = np.flatnonzero(frontend.fbank_filters().sum(axis=1) == 0)
  assert list(empty) == [3]
  noise = np.random.default_rng(1).normal(size=SAMPLE_RATE).astype(np.float32)
  assert np.all(frontend.kaldi_fbank(noise)[:, 3] == np.float32(np.log(np.finfo(np.float32).eps)))


@pytest.mark.parametrize("bins", KNF_BINS)
def test_fbank_agrees_with_kaldi_native_fbank(clips, bins):
  options = knf.FbankOptions()
  options.frame_opts.dither = 0.0
  options.frame_opts.window_type = "hanning"
  options.mel_opts.num_bins = bins
  options.mel_opts.high_freq = 0.0
  options.use_energy = False
  options.htk_compat = True
  for name, waveform in clips.items():
    if len(waveform) < 400:
      continue
    centred = waveform - waveform.mean()
    fbank = knf.OnlineFbank(options)
    fbank.accept_waveform(SAMPLE_RATE, centred.tolist())
    fbank.input_finished()
    theirs = np.stack([fbank.get_frame(i) for i in range(fbank.num_frames_ready)])
    ours = frontend.kaldi_fbank(waveform, bins)
    assert ours.shape == theirs.shape, name
    loud = ours > ours.max(axis=1, keepdims=True) - KNF_RANGE
    assert loud.mean() > 0.25, name  # a tone leaves the fewest: ~40% of its bins
    assert max_abs_diff(ours[loud], theirs[loud]) <= KNF_TOL, name


def test_long_clip_fills_windows_in_order(caplog):
  """25 s → 3 windows of 1024 frames: the fbank of the whole clip cut in order, the last one padded with the
  normalized 0; with max_windows 2 the third is dropped with a warning naming the clip."""
  waveform = np.random.default_rng(2).normal(scale=0.1, size=25 * SAMPLE_RATE).astype(np.float32)
  whole = (frontend.kaldi_fbank(waveform) + frontend.LTU_NORM_SHIFT) / frontend.LTU_NORM_SCALE
  windows = frontend.LtuFbankWindows(max_windows=4).windows(waveform)
  assert windows.shape == (3, 1024, 128)
  np.testing.assert_array_equal(windows.reshape(-1, 128)[: len(whole)], whole)
  np.testing.assert_array_equal(windows.reshape(-1, 128)[len(whole) :], frontend.LTU_NORM_SHIFT / np.float32(frontend.LTU_NORM_SCALE))
  assert frontend.LtuFbankWindows(max_windows=4).tokens(3) == 96
  with caplog.at_level(logging.WARNING):
    two = frontend.LtuFbankWindows(max_windows=2).windows(waveform, "long.wav")
  np.testing.assert_array_equal(two, windows[:2])
  assert "long.wav" in caplog.text
