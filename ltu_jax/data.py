"""The question-answer data of LTU-AS: records, prompts, tokens, the audio feature cache, and the grain
pipeline that turns them into padded training batches. It imports no model: what encodes audio is given
to the `FeatureStore` (`ltu_jax.features`).

A record (facts §4.1) is `{"instruction", "input" (the Whisper transcript, "" without speech), "output",
"audio_id" (the audio file), optional "dataset", "task", ...}`; a file holds a JSON list of them or one per
line (`.jsonl`). What could otherwise fail during an epoch (bad JSON, missing fields, missing audio or
features) is checked when reading (`read_records(..., features=store)`), so a run does not stop halfway.

The pipeline is a grain `MapDataset` indexed by global step: step → epoch → that epoch's seeded,
length-grouped plan of global batches → this process's contiguous slice → tokens and features, padded.
Its iterator state is a step count, so a restored iterator yields exactly the batches that the
uninterrupted one would have.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import logging
import os
import sys
import threading
import zipfile
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, NamedTuple, Protocol

import grain
import jax
import numpy as np
from absl import flags

log = logging.getLogger(__name__)

REQUIRED_FIELDS = ("instruction", "input", "output", "audio_id")
# HF `get_length_grouped_indices`: lengths are sorted within mega-batches of this many batches
MEGA_BATCHES = 50
# records tokenized per tokenizer call: the fast tokenizer works on a list in parallel
TOKENIZE_CHUNK = 4096
# numpy parses each .npy header with `ast.literal_eval`, and CPython 3.11's parser is not thread-safe
# ("SystemError: AST constructor recursion depth mismatch" when threads parse at once, seen in CI): feature
# files are read one at a time, also by the loader's threads.
_READ_LOCK = threading.Lock()


class DataError(ValueError):
  """A record, audio file or feature file that cannot be used, named with its file and place."""


# ---------------------------------------------------------------------------------------------------
# Records


def read_records(
  path: str | os.PathLike, *, skip_bad: bool = False, features: FeatureStore | None = None
) -> tuple[list[dict[str, Any]], int]:
  """Reads and checks an LTU JSON list or JSON-lines (`.jsonl`) file.

  Every record needs string fields `instruction`, `input`, `output` and `audio_id`; other fields are kept.
  With `features`, each record's audio must also be usable: a cached feature file that `FeatureStore.problem`
  accepts (read once: shape, dtype, finite values, no other clip sharing it), or an audio file the store's
  Whisper can encode. A bad record raises `DataError` naming the file, the record (and line) and the
  problem, or with `skip_bad` is logged and skipped.

  Returns:
    (the good records in file order, the number skipped).
  """
  path = os.fspath(path)
  parsed = [(where, record, problem or _record_problem(record)) for where, record, problem in _parsed_records(path)]
  if not skip_bad:  # before the feature files are read: a bad record stops the run at once
    for where, _, problem in parsed:
      if problem is not None:
        raise DataError(f"{path}: {where}: {problem}")
  audio_problems: dict[str, str | None] = {}  # clips are shared by many questions: check each once
  if features is not None:
    audio_ids = list(dict.fromkeys(record["audio_id"] for _, record, problem in parsed if problem is None))
    features.claim(audio_ids)  # all before any check, so a file that two clips would share fails both
    audio_problems = {audio_id: features.problem(audio_id) for audio_id in audio_ids}
  records, skipped = [], 0
  for where, record, problem in parsed:
    if problem is None and audio_problems.get(record["audio_id"]) is not None:
      problem = f"field 'audio_id': {audio_problems[record['audio_id']]}"
    if problem is None:
      records.append(record)
    elif skip_bad:
      log.warning("skipping %s: %s: %s", path, where, problem)
      skipped += 1
    else:
      raise DataError(f"{path}: {where}: {problem}")
  return records, skipped


def _parsed_records(path: str) -> Iterator[tuple[str, Any, str | None]]:
  """`(where, record, why it is not valid JSON or None)` for each record of a JSON or JSONL file."""
  if not os.path.isfile(path):
    raise DataError(f"data file not found: {path}")
  with open(path, encoding="utf-8") as f:
    if path.endswith(".jsonl"):
      index = 0
      for line_number, line in enumerate(f, start=1):
        if not line.strip():
          continue
        where = f"record {index} (line {line_number})"
        index += 1
        try:
          yield where, json.loads(line), None
        except json.JSONDecodeError as error:
          yield where, None, f"not valid JSON: {error.msg} at column {error.colno}"
      return
    try:
      data = json.load(f)
    except json.JSONDecodeError as error:
      raise DataError(f"{path}: not valid JSON: {error.msg} at line {error.lineno} column {error.colno}") from error
  if not isinstance(data, list):
    raise DataError(
      f"{path}: expected a JSON list of records, found a {type(data).__name__} (use .jsonl for one record per line)"
    )
  for index, record in enumerate(data):
    yield f"record {index}", record, None


def _record_problem(record: Any) -> str | None:
  if not isinstance(record, dict):
    return f"expected a JSON object, found a {type(record).__name__}"
  for field in REQUIRED_FIELDS:
    if field not in record:
      return f"field '{field}' is missing"
    if not isinstance(record[field], str):
      return f"field '{field}' should be a string, found a {type(record[field]).__name__}"
  return None


# ---------------------------------------------------------------------------------------------------
# Prompt and tokens


def prompt(instruction: str, transcript: str | None) -> str:
  """The `alpaca_short` prompt (facts §1.5); the Input section only with a non-empty transcript."""
  if transcript:
    return f"### Instruction:\n{instruction}\n\n### Input:\n{transcript}\n\n### Response:\n"
  return f"### Instruction:\n{instruction}\n\n### Response:\n"


class Tokenized(NamedTuple):
  input_ids: np.ndarray  # [len] int32: BOS, prompt, answer, EOS if it fits
  prompt_len: int  # tokens of BOS + prompt (at most len): the targets start here without train_on_inputs


def tokenize(record: dict[str, Any], tokenizer: Any, **options: Any) -> Tokenized:
  """One record's training tokens, as the original's `generate_and_tokenize_prompt` (facts §3.1)."""
  return tokenize_many([record], tokenizer, **options)[0]


def tokenize_many(
  records: Sequence[dict[str, Any]],
  tokenizer: Any,
  *,
  cutoff_len: int,
  bos_id: int,
  eos_id: int,
  use_input: bool = True,
) -> list[Tokenized]:
  """`tokenize` for many records, in batched tokenizer calls.

  `[bos] + tokens(prompt + output)` cut to `cutoff_len` text tokens, then EOS if still shorter. The text
  is tokenized without special tokens and BOS added here, so tokenizers that add none behave the same.
  As in the original, the prompt is tokenized on its own to count its tokens. Without `use_input` (a model
  that reads no transcript) the records' `input` is left out of the prompt.
  """
  results = []
  for start in range(0, len(records), TOKENIZE_CHUNK):
    chunk = records[start : start + TOKENIZE_CHUNK]
    prompts = [prompt(r["instruction"], r["input"] if use_input else None) for r in chunk]
    texts = tokenizer([p + r["output"] for p, r in zip(prompts, chunk)], add_special_tokens=False)["input_ids"]
    prompt_tokens = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    for text, prompt_part in zip(texts, prompt_tokens):
      ids = [bos_id, *text][:cutoff_len]
      if len(ids) < cutoff_len and ids[-1] != eos_id:
        ids.append(eos_id)
      results.append(Tokenized(np.asarray(ids, np.int32), min(1 + len(prompt_part), cutoff_len)))
  return results


# ---------------------------------------------------------------------------------------------------
# Audio features


# bytes of an audio path kept readable in its cache name (file names may have 255)
READABLE_NAME_BYTES = 160


def feature_filename(audio_id: str) -> str:
  """The cache name of a clip's features, one per audio path: the original's readable part (the audio's 3
  parent folders and its file name, joined by `_`, here keeping the extension) and a hash of the whole
  path, e.g. `audioset_train_balanced_Y0a1b2c.wav-<16 hex digits>.npz`.

  The original's name (`original_feature_filename`) drops the extension and every folder above those 3,
  so `a.wav` beside `a.flac`, clips without an extension, and clips of two roots shared one file and one
  clip trained on another's features. `FeatureStore` still reads caches named that way.
  """
  parts = audio_id.split("/")
  readable = "_".join(parts[-4:]).encode()[:READABLE_NAME_BYTES].decode(errors="ignore")
  return f"{readable}-{hashlib.sha256(audio_id.encode()).hexdigest()[:16]}.npz"


def original_feature_filename(audio_id: str) -> str:
  """The original's cache name, which caches it filled use: 3 parent folders and the name without its
  extension, joined by `_` (ltu `src/ltu_as/extract_whisper_feature.py` `gen_filename`, the training
  collator), bug for bug (without an extension the name is lost: `a/b/c/clip` → `a_b_c_.npz`)."""
  extension = audio_id.split(".")[-1]
  return "_".join(audio_id.split("/")[-4:-1]) + "_" + audio_id.split("/")[-1][: -len(extension) - 1] + ".npz"


class AudioEncoder(Protocol):
  """What computes a clip's features when the cache has none (`ltu_jax.features.WhisperFeatures`):
  `shape` is one window's `(layers, tokens, dim)`; `load(audio_path)` → `[layers, windows * tokens, dim]`."""

  shape: tuple[int, ...]

  def load(self, audio_path: str) -> np.ndarray: ...


class FeatureStore:
  """The feature cache: `cache_dir/<feature_filename(audio_id)>`, each an `.npz` with `arr_0`
  `[layers, windows * tokens, dim]` float16 (float32 is accepted), as the original's
  `extract_whisper_feature.py` writes them (one 10 s window: `[layers, 25, dim]`). A clip without a file of
  that name is read from one of `original_feature_filename` (a cache the original filled) unless another
  clip claims that file too (`claim`, `path`).

  With `encoder`, a clip without a cached file is encoded from its audio (not written back). `shape` is the
  expected `(layers, tokens, dim)` of one window: by default the encoder's, or else that of a file already
  in the cache; pass the model's to check the cache against it. A clip may fill up to `max_windows`
  windows; a cached clip with more is cut to them, with a warning.
  """

  def __init__(
    self,
    cache_dir: str | os.PathLike,
    *,
    shape: Sequence[int] | None = None,
    encoder: AudioEncoder | None = None,
    max_windows: int = 1,
    dtype: Any = np.float32,
  ):
    self.cache_dir = os.fspath(cache_dir)
    self.encoder = encoder
    if shape is not None:
      self.shape = tuple(shape)
    else:
      self.shape = self.encoder.shape if self.encoder is not None else _cached_shape(self.cache_dir)
    if self.encoder is not None and tuple(self.encoder.shape) != self.shape:
      raise ValueError(f"the audio encoder makes features of shape {self.encoder.shape}, not the expected {self.shape}")
    self.max_windows = max_windows
    self.dtype = np.dtype(dtype)
    self._trimmed: set[str] = set()  # files already warned about
    self._claims: dict[str, set[str]] = collections.defaultdict(set)  # cache file → the clips that read it

  @property
  def max_tokens(self) -> int:
    """Audio tokens of a clip that fills every window: the time axis batches are padded to."""
    return self.shape[1] * self.max_windows

  def _resolve(self, audio_id: str) -> str:
    own = os.path.join(self.cache_dir, feature_filename(audio_id))
    original = os.path.join(self.cache_dir, original_feature_filename(audio_id))
    return original if not os.path.isfile(own) and os.path.isfile(original) else own

  def claim(self, audio_ids: Iterable[str]) -> None:
    """Notes clips that will be read, so that `path` refuses a file that two of them would share, for both."""
    for audio_id in audio_ids:
      self._claims[self._resolve(audio_id)].add(audio_id)

  def path(self, audio_id: str) -> str:
    """The file of `audio_id`'s features: its own name if the cache has it, else the original's name if the
    cache has that, else its own name (where `extract_features` writes). A file that another clip has
    claimed too is a `DataError` naming both: it holds at most one of them."""
    path = self._resolve(audio_id)
    claims = self._claims[path]
    claims.add(audio_id)
    if len(claims) > 1:
      clips = ", ".join(sorted(claims))
      if os.path.basename(path) == feature_filename(audio_id):
        raise DataError(f"audio {clips} have the same feature file name {path} (their paths' hashes collide); rename one")
      raise DataError(
        f"feature file {path} has the original's name (3 parent folders and the name without extension), which "
        f"audio {clips} all map to: it holds at most one of them; extract their features again (python -m "
        "ltu_jax.extract_features names each file after the whole audio path)"
      )
    return path

  def problem(self, audio_id: str) -> str | None:
    """Why `load(audio_id)` would fail, or None; a cached file is read and checked whole (`_checked`)."""
    try:
      path = self.path(audio_id)
      if os.path.isfile(path):
        self._checked(path, audio_id, _read_feature(path))
        return None
    except DataError as error:
      return str(error)
    if self.encoder is None:
      return f"no cached feature {path} for audio {audio_id} (fill the cache with python -m ltu_jax.extract_features)"
    if not os.path.isfile(audio_id):
      return f"audio file {audio_id} not found, and no cached feature {path}"
    return None

  def load(self, audio_id: str) -> np.ndarray:
    """`[layers, windows * tokens, dim]` in the store's dtype, from the cache or, without a cached file,
    from the audio."""
    path = self.path(audio_id)
    if os.path.isfile(path):
      features = self._checked(path, audio_id, _read_feature(path))
      if features.shape[1] > self.max_tokens:
        if path not in self._trimmed:
          self._trimmed.add(path)
          windows = features.shape[1] // self.shape[1]
          log.warning("%s: features of %d windows, the first %d kept (max_windows)", path, windows, self.max_windows)
        features = features[:, : self.max_tokens]
    elif self.encoder is not None:
      try:
        features = self.encoder.load(audio_id)
      except (OSError, ValueError) as error:
        raise DataError(f"cannot compute features of audio {audio_id}: {error}") from error
    else:
      raise DataError(self.problem(audio_id))
    return features.astype(self.dtype)

  def _checked(self, path: str, audio_id: str, features: np.ndarray) -> np.ndarray:
    """`features` if they are what the model reads: the store's shape, float16 or float32, all finite."""
    where = f"feature file {path} (audio {audio_id})"
    if self.shape is not None:
      layers, tokens, dim = self.shape
      if features.ndim != 3 or (features.shape[0], features.shape[2]) != (layers, dim) or features.shape[1] % tokens:
        raise DataError(f"{where} has shape {features.shape}, expected ({layers}, a multiple of {tokens}, {dim})")
    if features.dtype not in (np.float16, np.float32):
      raise DataError(f"{where} holds {features.dtype} values, expected float16 (as extracted) or float32")
    bad = features.size - int(np.count_nonzero(np.isfinite(features)))
    if bad:
      raise DataError(f"{where} has {bad} NaN or infinite values of {features.size}")
    return features


def _read_feature(path: str) -> np.ndarray:
  try:
    with _READ_LOCK, np.load(path) as stored:
      return stored["arr_0"]
  except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:
    raise DataError(f"feature file {path} cannot be read: {error!r}") from error


def _cached_shape(cache_dir: str) -> tuple[int, ...] | None:
  """The shape of some feature file in `cache_dir`, or None when there is none."""
  if os.path.isdir(cache_dir):
    for entry in os.scandir(cache_dir):
      if entry.name.endswith(".npz"):
        return _read_feature(entry.path).shape
  return None


# ---------------------------------------------------------------------------------------------------
# Batches


def epoch_batches(
  lengths: np.ndarray, *, batch_size: int, seed: int, epoch: int, group_by_length: bool
) -> np.ndarray:
  """One epoch's global batches of record indices `[steps, batch_size]`; the remainder is dropped.

  A seeded permutation per (seed, epoch). With `group_by_length`, as HF's `group_by_length`: the
  permutation is cut into mega-batches of up to 50 batches, each sorted by length (longest first) and cut
  into batches, and the batches are shuffled, so each batch holds records of similar length.
  """
  rng = np.random.default_rng([seed, epoch])
  steps = len(lengths) // batch_size
  order = rng.permutation(len(lengths))[: steps * batch_size]
  if group_by_length:
    # HF shrinks mega-batches on small data so that there are at least 4 per epoch
    mega = batch_size * max(1, min(steps // 4, MEGA_BATCHES))
    order = np.concatenate([
      chunk[np.argsort(-lengths[chunk], kind="stable")] for chunk in np.split(order, range(mega, len(order), mega))
    ])
  batches = order.reshape(steps, batch_size)
  return batches[rng.permutation(steps)] if group_by_length else batches


def padded_length(length: int, multiple: int) -> int:
  return -(-length // multiple) * multiple


def pad_audio(clips: Sequence[np.ndarray], length: int) -> tuple[np.ndarray, np.ndarray]:
  """Clips' features `[layers, tokens_i, dim]` → `[B, layers, length, dim]` zero-padded on the time axis, and
  the audio mask `[B, length]` int32 (1 on each clip's own tokens)."""
  num_layers, _, dim = clips[0].shape
  features = np.zeros((len(clips), num_layers, length, dim), clips[0].dtype)
  mask = np.zeros((len(clips), length), np.int32)
  for row, clip in enumerate(clips):
    features[row, :, : clip.shape[1]] = clip
    mask[row, : clip.shape[1]] = 1
  return features, mask


def collate(
  rows: Sequence[Tokenized],
  clips: Sequence[np.ndarray],
  *,
  audio_length: int,
  length: int,
  pad_id: int,
  padding_side: str,
  train_on_inputs: bool,
) -> dict[str, np.ndarray]:
  """Pads token rows to `length` and builds the masks.

  Args:
    rows: B tokenized records, each at most `length` tokens.
    clips: B clips' features `[layers, tokens, dim]` (tokens ≤ audio_length: 25 per 10 s window).
    audio_length: the audio tokens every row is padded to (see `pad_audio`).
    padding_side: "left" (the original) or "right".
    train_on_inputs: targets are every real token; otherwise only tokens from each row's prompt_len on
      (`ltu_as.text_loss_mask` semantics).
  Returns:
    `features` `[B, layers, audio_length, dim]`, `audio_mask` `[B, audio_length]` int32, `input_ids`
    `[B, length]` int32 (pad_id on padding), `attention_mask` `[B, length]` int32, `loss_mask` `[B, length]` bool.
  """
  input_ids = np.full((len(rows), length), pad_id, np.int32)
  attention_mask = np.zeros((len(rows), length), np.int32)
  loss_mask = np.zeros((len(rows), length), bool)
  for row, (ids, prompt_len) in enumerate(rows):
    start = length - len(ids) if padding_side == "left" else 0
    input_ids[row, start : start + len(ids)] = ids
    attention_mask[row, start : start + len(ids)] = 1
    loss_mask[row, start + (0 if train_on_inputs else prompt_len) : start + len(ids)] = True
  features, audio_mask = pad_audio(clips, audio_length)
  return {
    "features": features, "audio_mask": audio_mask, "input_ids": input_ids, "attention_mask": attention_mask,
    "loss_mask": loss_mask,
  }


@dataclasses.dataclass(frozen=True)
class BatchOptions:
  """How records become batches (the defaults are the original's, facts §3.1)."""

  batch_size: int  # per process, over its devices and accumulation steps; × process count = the global batch
  cutoff_len: int  # text tokens per record, BOS and EOS included
  bos_id: int
  eos_id: int
  pad_id: int = 0
  seed: int = 42
  num_epochs: int | None = None  # None: epochs without end (the trainer stops at its last step)
  train_on_inputs: bool = True
  padding_side: str = "left"
  pad_to_multiple_of: int = 8
  group_by_length: bool = True
  use_input: bool = True  # the transcript (`input`) goes in the prompt

  def __post_init__(self):
    if self.padding_side not in ("left", "right"):
      raise ValueError(f"padding_side is {self.padding_side!r}; expected 'left' or 'right'")


class TrainData:
  """Training batches by global step, for this process: a random-access source for grain.

  `data[step]` is a dict of numpy arrays for this process's contiguous slice of that step's global batch:
  `features` `[B, layers, A, dim]` (the store's dtype, A its `max_tokens`), `audio_mask` `[B, A]`, `input_ids` `[B, S]` int32, `attention_mask`
  `[B, S]` int32, `loss_mask` `[B, S]` bool, with B = batch_size and S the longest record of the global
  batch rounded up to `pad_to_multiple_of`, so every process has the same shapes. Rows are sorted longest
  first when grouping by length, so consecutive micro-batches have similar lengths. Records are
  tokenized once here and kept as one flat token array.
  """

  def __init__(
    self,
    records: Sequence[dict[str, Any]],
    tokenizer: Any,
    features: FeatureStore,
    options: BatchOptions,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
  ):
    self.options = options
    self.features = features
    self.process_index = jax.process_index() if process_index is None else process_index
    self.global_batch = options.batch_size * (jax.process_count() if process_count is None else process_count)
    self.steps_per_epoch = len(records) // self.global_batch
    if self.steps_per_epoch == 0:
      raise ValueError(f"{len(records)} records make no full global batch of {self.global_batch}")
    # grain needs a length: without an epoch count, more steps than any run takes
    self.num_steps = sys.maxsize if options.num_epochs is None else self.steps_per_epoch * options.num_epochs
    tokenized = tokenize_many(
      records, tokenizer, cutoff_len=options.cutoff_len, bos_id=options.bos_id, eos_id=options.eos_id,
      use_input=options.use_input,
    )
    self.lengths = np.array([len(t.input_ids) for t in tokenized], np.int32)
    self.prompt_lens = np.array([t.prompt_len for t in tokenized], np.int32)
    self.offsets = np.concatenate([[0], np.cumsum(self.lengths)])
    tokens = np.concatenate([t.input_ids for t in tokenized])
    self.tokens = tokens.astype(np.min_scalar_type(tokens.max()))  # uint16 for LLaMA's vocabulary
    clip_index: dict[str, int] = {}  # ~10 questions per clip: keep each audio id once
    self.clip_of = np.array([clip_index.setdefault(r["audio_id"], len(clip_index)) for r in records], np.int32)
    self.clips = list(clip_index)
    self._plan: tuple[int, np.ndarray] | None = None

  def __len__(self) -> int:
    return self.num_steps

  def epoch_batches(self, epoch: int) -> np.ndarray:
    """Global batches of record indices `[steps_per_epoch, global batch]` (cached for the current epoch)."""
    if self._plan is None or self._plan[0] != epoch:
      batches = epoch_batches(
        self.lengths,
        batch_size=self.global_batch,
        seed=self.options.seed,
        epoch=epoch,
        group_by_length=self.options.group_by_length,
      )
      self._plan = (epoch, batches)
    return self._plan[1]
  def __getitem__(self, step: int) -> dict[str, np.ndarray]:
    if not 0 <= step < self.num_steps:
      raise IndexError(f"step {step} is outside the {self.num_steps} steps of {self.options.num_epochs} epochs")
    options = self.options
    global_batch = self.epoch_batches(step // self.steps_per_epoch)[step % self.steps_per_epoch]
    length = padded_length(int(self.lengths[global_batch].max()), options.pad_to_multiple_of)
    mine = global_batch[self.process_index * options.batch_size :][: options.batch_size]
    rows = [Tokenized(self.tokens[self.offsets[i] : self.offsets[i + 1]], int(self.prompt_lens[i])) for i in mine]
    clips = [self.features.load(self.clips[self.clip_of[i]]) for i in mine]
    return collate(
      rows,
      clips,
      audio_length=self.features.max_tokens,
      length=length,
      pad_id=options.pad_id,
      padding_side=options.padding_side,
      train_on_inputs=options.train_on_inputs,
    )


@dataclasses.dataclass
class Loader:
  """The batch iterator the trainer reads: `next(loader)` is the next step's batch (see `TrainData`).

  Its state is the grain iterator's (`get_state`, a small JSON-able dict); a fresh loader given a saved
  state yields exactly the batches that the saved one would have. With orbax, put
  `checkpoint_save(loader)` / `checkpoint_restore(loader)` in the checkpoint's `Composite`.
  """

  data: TrainData
  iterator: grain.DatasetIterator

  @property
  def steps_per_epoch(self) -> int:
    return self.data.steps_per_epoch

  def __iter__(self) -> Loader:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    return next(self.iterator)

  def get_state(self) -> dict[str, Any]:
    return self.iterator.get_state()

  def set_state(self, state: dict[str, Any]) -> None:
    self.iterator.set_state(state)

  def close(self) -> None:
    """Stops the worker processes (also done when the loader is garbage-collected)."""
    self.iterator.close()


def make_loader(
  records: Sequence[dict[str, Any]],
  tokenizer: Any,
  features: FeatureStore,
  *,
  workers: int = 0,
  threads: int = 2,
  prefetch: int = 2,
  process_index: int | None = None,
  process_count: int | None = None,
  **options: Any,
) -> Loader:
  """Batches of `records` for training, from step 0 on.

  Args:
    records: from `read_records`.
    tokenizer: the LLM's Hugging Face tokenizer.
    features: where the clips' Whisper features come from.
    workers: grain worker processes (spawned: each re-imports JAX and unpickles the data; on 2 cores
      they are slower than none). The saved state's form depends on it: resume with the same count.
    threads: threads per process loading batches concurrently (feature files are read one at a time, see
      `_READ_LOCK`; collation overlaps).
    prefetch: batches buffered per process; each holds B full feature tensors, so keep it small.
    process_index, process_count: this process's place; default JAX's.
    options: the fields of `BatchOptions` (batch_size, cutoff_len, bos_id, eos_id, ...).
  """
  if workers and features.encoder is not None:
    raise ValueError(
      "features computed on the fly run the Whisper encoder, which cannot run in grain worker processes: "
      "fill the cache with python -m ltu_jax.extract_features, or use workers=0"
    )
  data = TrainData(
    records, tokenizer, features, BatchOptions(**options), process_index=process_index, process_count=process_count
  )
  dataset = grain.MapDataset.source(data).to_iter_dataset(
    grain.ReadOptions(num_threads=threads, prefetch_buffer_size=prefetch)
  )
  if workers:
    if not flags.FLAGS.is_parsed():
      # grain 0.2.18 reads an absl flag when starting workers (google/grain#1355, fixed after 0.2.18)
      flags.FLAGS.mark_as_parsed()
    dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=prefetch))
  return Loader(data, iter(dataset))


def checkpoint_save(loader: Loader) -> grain.checkpoint.CheckpointSave:
  """The orbax argument that saves `loader`'s position (one JSON file per process)."""
  return grain.checkpoint.CheckpointSave(loader.iterator)


def checkpoint_restore(loader: Loader) -> grain.checkpoint.CheckpointRestore:
  """The orbax argument that moves `loader` to a saved position."""
  return grain.checkpoint.CheckpointRestore(loader.iterator)
