"""What an audio-language model reads of a clip, computed before it: the feature cache's contents
(`python -m ltu_jax.extract_features`), and what `infer` and the trainer compute when a clip is not cached.

- LTU-AS (`WhisperFeatures`): a waveform's windows (`ltu_jax.frontend`) through the frozen Whisper encoder,
  every block's output mean-pooled to 25 steps a window (facts §1.2). A clip of W windows gives
  `[layers, W * 25, dim]`, its windows in order.
- LTU (`FrontendFeatures`): its encoder trains, so what comes before the model is the front end alone,
  the fbank windows: `[1, W * 1024, 128]`.

The kind's registry entry says which (`whisper_features`).
"""

from __future__ import annotations

import functools
import os
from typing import Sequence

import jax
import numpy as np
from flax import nnx

from ltu_jax import data, kinds, model_folder
from ltu_jax.audio import load_audio
from ltu_jax.frontend import LTU_AS_POOL, Frontend, LtuAsWindows
from ltu_jax.generate import batch_bucket
from ltu_jax.model_folder import Loaded
from ltu_jax.models.whisper import ltu_as_features


class WhisperFeatures:
  """A Whisper encoder as LTU-AS's feature extractor, jitted once per batch bucket.

  `windows(waveform, name)` → `[windows, n_mels, 1000]`; `self(mel [n, n_mels, 1000])` → `[n, layers, 25, dim]`
  float16 (the original's storage dtype, whatever the encoder's compute dtype); `clips(waveforms)` and
  `load(audio_path)` → one `[layers, windows * 25, dim]` per clip. `shape` is one window's `(layers, 25, dim)`.
  """

  storage_dtype = np.float16  # what the cache holds, as the original's files

  def __init__(self, whisper: Loaded, max_windows: int = 1):
    kinds.require(whisper.kind, "LTU-AS features", kinds.TRANSCRIBES, whisper.folder)
    self.frontend = LtuAsWindows(n_mels=whisper.config.num_mel_bins, max_windows=max_windows)
    graphdef, state = nnx.split(whisper.model.encoder)
    self._state = state
    self._encode = jax.jit(functools.partial(_encode_features, graphdef))
    mel = jax.ShapeDtypeStruct((1, self.frontend.n_mels, self.frontend.window_frames), np.float32)
    self.shape = tuple(jax.eval_shape(self._encode, state, mel).shape[1:])

  def windows(self, waveform: np.ndarray, name: str = "") -> np.ndarray:
    return self.frontend.windows(waveform, name)

  def mel(self, audio_path: str) -> np.ndarray:
    """The windows of an audio file `[windows, n_mels, 1000]`."""
    return self.windows(load_audio(audio_path), audio_path)

  def __call__(self, mel: np.ndarray) -> np.ndarray:
    """`[n, n_mels, 1000]` windows → `[n, layers, 25, dim]` float16, encoded in padded bucket-sized batches."""
    out = []
    for start in range(0, len(mel), batch_bucket(len(mel))):
      chunk = mel[start : start + batch_bucket(len(mel))]
      padded = np.zeros((batch_bucket(len(chunk)), *chunk.shape[1:]), np.float32)
      padded[: len(chunk)] = chunk
      out.append(np.asarray(self._encode(self._state, padded))[: len(chunk)].astype(np.float16))
    return np.concatenate(out)

  def clips(self, windows: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Each clip's windows `[w, n_mels, 1000]` → its features `[layers, w * 25, dim]`, encoded together."""
    encoded = self(np.concatenate(windows))
    bounds = np.cumsum([0, *(len(w) for w in windows)])
    return [_join_windows(encoded[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]

  def load(self, audio_path: str) -> np.ndarray:
    """One audio file's features `[layers, windows * 25, dim]` float16."""
    return _join_windows(self(self.mel(audio_path)))


class FrontendFeatures:
  """A front end's windows as the features (LTU's fbank): `windows`/`mel` → `[windows, frames, bins]`,
  `self(windows)` → `[windows, 1, frames, bins]`, `clips` and `load` → `[1, windows * frames, bins]` per
  clip, float32 (float16 would move the fbank by ~1e-3). `shape` is one window's `(1, frames, bins)`."""

  storage_dtype = np.float32

  def __init__(self, recipe: Frontend):
    self.frontend = recipe
    self.shape = (1, recipe.window_frames, recipe.n_mels)

  def windows(self, waveform: np.ndarray, name: str = "") -> np.ndarray:
    return self.frontend.windows(waveform, name)

  def mel(self, audio_path: str) -> np.ndarray:
    return self.windows(load_audio(audio_path), audio_path)

  def __call__(self, windows: np.ndarray) -> np.ndarray:
    return np.asarray(windows, np.float32)[:, None]

  def clips(self, windows: Sequence[np.ndarray]) -> list[np.ndarray]:
    return [_join_windows(self(w)) for w in windows]

  def load(self, audio_path: str) -> np.ndarray:
    return _join_windows(self(self.mel(audio_path)))


def _join_windows(per_window: np.ndarray) -> np.ndarray:
  """`[windows, layers, 25, dim]` → `[layers, windows * 25, dim]`, the windows in order."""
  windows, num_layers, tokens, dim = per_window.shape
  return per_window.swapaxes(0, 1).reshape(num_layers, windows * tokens, dim)


def _encode_features(graphdef: nnx.GraphDef, state: nnx.State, mel: jax.Array) -> jax.Array:
  _, hidden_states = nnx.merge(graphdef, state)(mel)
  return ltu_as_features(hidden_states, LTU_AS_POOL)


def whisper_folder(loaded: Loaded) -> str:
  """The Whisper model folder inside an LTU-AS folder (features and transcripts come from it)."""
  folder = os.path.join(loaded.folder, loaded.extra.get("whisper", ""))
  if "whisper" not in loaded.extra or not os.path.isfile(os.path.join(folder, model_folder.CONFIG_FILE)):
    raise ValueError(
      f"{loaded.folder} has no Whisper model folder (extra['whisper']); convert it with python -m conversion.ltu_as"
    )
  return folder


def check_folder(loaded: Loaded) -> None:
  """Raises what `for_model` would (a missing Whisper folder) before any audio is read."""
  if kinds.get(loaded.kind).whisper_features:
    whisper_folder(loaded)


@functools.lru_cache(maxsize=2)  # a large-v1 is 1.5 B parameters: not reloaded for every batch
def load_whisper(folder: str, dtype: str | None = None) -> Loaded:
  """A Whisper folder, loaded once per process (and compute dtype: `dtype` casts weights and compute)."""
  return model_folder.load(folder, **model_folder.cast_to(dtype))


@functools.lru_cache(maxsize=4)
def _extractor(folder: str, dtype: str | None, max_windows: int) -> WhisperFeatures:
  return WhisperFeatures(load_whisper(folder, dtype), max_windows)


def for_model(loaded: Loaded, max_windows: int | None = None, dtype: str | None = None) -> WhisperFeatures | FrontendFeatures:
  """What computes the model's audio input, for up to `max_windows` windows a clip (default: what the model
  was trained with): its own Whisper's features (LTU-AS), or its front end's windows (LTU)."""
  kind = kinds.get(loaded.kind)
  windows = loaded.config.max_windows if max_windows is None else max_windows
  if kind.whisper_features:
    return _extractor(whisper_folder(loaded), dtype, windows)
  return FrontendFeatures(kind.frontend(loaded.config, windows))


def for_folder(folder: str, max_windows: int, dtype: str | None = None) -> WhisperFeatures | FrontendFeatures:
  """`for_model` of a model folder, read without its weights (only its Whisper's, for LTU-AS)."""
  manifest = model_folder.read_manifest(folder)
  kinds.require(manifest["kind"], "extract_features --model", kinds.AUDIO_LLM, folder)
  kind = kinds.get(manifest["kind"])
  if kind.whisper_features:
    return _extractor(os.path.join(folder, manifest["extra"].get("whisper", "")), dtype, max_windows)
  config = model_folder.config_from_dict(kind.config, manifest["config"], f"{folder}/{model_folder.CONFIG_FILE}")
  return FrontendFeatures(kind.frontend(config, max_windows))


def store(
  loaded: Loaded,
  cache_dir: str | os.PathLike,
  encoder: WhisperFeatures | FrontendFeatures | None = None,
  max_windows: int | None = None,
) -> data.FeatureStore:
  """The feature cache checked against the model's input shape (LTU-AS: `[layers, windows * 25, dim]`), up
  to `max_windows` windows (default: the model's); with `encoder`, clips without a cached file are encoded."""
  config = loaded.config
  return data.FeatureStore(
    cache_dir,
    shape=config.feature_shape,
    encoder=encoder,
    max_windows=config.max_windows if max_windows is None else max_windows,
  )
