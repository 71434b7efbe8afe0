"""`python -m ltu_jax.extract_features`: fills the feature cache for every clip of some datasets.

    python -m ltu_jax.extract_features --whisper WHISPER_FOLDER --data train.json [more.jsonl ...] \\
      --out CACHE_DIR [--batch-size 8] [--dtype float32] [--skip-bad]
    python -m ltu_jax.extract_features --model MODEL_FOLDER --data ... --out CACHE_DIR

`--model` caches what that model folder reads: LTU-AS's Whisper features (those of its own Whisper), or
LTU's fbank windows `[1, w * 1024, 128]` float32 (its encoder trains in every stage but the first, so the
input before it is what is cached).

Each unique `audio_id` becomes `CACHE_DIR/<feature_filename(audio_id)>`, an `.npz` with `arr_0`
`[layers, 25, dim]` float16, as the original's `extract_whisper_feature.py` writes (with `--max-windows W`, a
clip longer than 10 s gives `[layers, w * 25, dim]`, its first w ≤ W windows in order), named after the
whole audio path (the original's names could give two clips one file). Files are written under a temporary
name and renamed, so a killed run leaves no truncated file, and a re-run skips the clips already done,
also those of a cache that the original filled (`data.FeatureStore` reads its names).

`--dtype` is the encoder's compute dtype: float32 gives the features of the paper's `ltuas_ori_paper`
("old GPU"), float16 those of the released `*_a6` checkpoints ("new GPU") (facts §1.2); float16 needs a
GPU (XLA on CPU has no fp16 matmul with fp32 accumulation).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np
from tqdm import tqdm

import ltu_jax
from ltu_jax import features
from ltu_jax.data import DataError, FeatureStore, feature_filename, read_records
from ltu_jax.features import FrontendFeatures, WhisperFeatures

log = logging.getLogger(__name__)


def write_feature(path: str, features: np.ndarray, dtype: Any = np.float16) -> None:
  """Writes `features` as `arr_0` in `dtype` (float16 as the original's; LTU's fbank: float32) to `path`
  atomically: readers see the whole file or none."""
  temporary = f"{path}.{os.getpid()}.tmp"  # a file object, so numpy adds no `.npz` to this name
  try:
    with open(temporary, "wb") as f:
      np.savez_compressed(f, features.astype(dtype))
    os.replace(temporary, path)
  except BaseException:
    if os.path.exists(temporary):
      os.remove(temporary)
    raise


def unique_audio_ids(data_files: Sequence[str], *, skip_bad: bool) -> list[str]:
  """Every distinct `audio_id` of the data files, in first-seen order; two clips that share a cache
  name (which `feature_filename` makes unique per path) are an error, as one would get the other's
  features."""
  owners: dict[str, str] = {}
  for path in data_files:
    records, skipped = read_records(path, skip_bad=skip_bad)
    if skipped:
      log.warning("%s: skipped %d bad records", path, skipped)
    for record in records:
      audio_id = record["audio_id"]
      owner = owners.setdefault(feature_filename(audio_id), audio_id)
      if owner != audio_id:
        raise DataError(f"audio {owner} and {audio_id} share the feature file name {feature_filename(audio_id)}")
  return list(owners.values())


def _mel_or_error(encoder: WhisperFeatures | FrontendFeatures, audio_id: str) -> tuple[str, np.ndarray | None, str | None]:
  """`(audio_id, mel, None)`, or `(audio_id, None, why)` for an audio file that is missing or unusable."""
  try:
    return audio_id, encoder.mel(audio_id), None
  except (OSError, ValueError) as error:
    return audio_id, None, str(error)


def extract(
  audio_ids: Sequence[str],
  encoder: WhisperFeatures | FrontendFeatures,
  out: str,
  *,
  batch_size: int = 8,
  skip_bad: bool = False,
  threads: int = 2,
  progress: bool = True,
) -> tuple[int, int, int]:
  """Writes the features of every clip without a cache file, `batch_size` clips per encoder call.

  Audio is decoded in `threads` threads while the encoder runs. Returns (written, already cached, bad).
  """
  os.makedirs(out, exist_ok=True)
  cache = FeatureStore(out, shape=encoder.shape)
  cache.claim(audio_ids)

  def cached(audio_id: str) -> bool:
    try:
      return os.path.isfile(cache.path(audio_id))
    except DataError:  # an original-named file that several clips map to: each gets a file of its own
      return False

  todo = [a for a in audio_ids if not cached(a)]
  batches = (
    grain.MapDataset.source(todo)
    .map(lambda audio_id: _mel_or_error(encoder, audio_id))
    .batch(batch_size, batch_fn=list)
    .to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=2 * batch_size))
  )
  written = bad = 0
  with tqdm(total=len(todo), unit="clip", desc="audio features", disable=not progress) as bar:
    for batch in batches:
      for audio_id, _, problem in batch:
        if problem is None:
          continue
        if not skip_bad:
          raise DataError(f"audio {audio_id}: {problem}")
        log.warning("skipping audio %s: %s", audio_id, problem)
        bad += 1
      good = [(audio_id, mel) for audio_id, mel, problem in batch if problem is None]
      if good:
        # the encoder pads its batches of windows into a few fixed sizes, so it compiles a few times at most
        for (audio_id, _), features in zip(good, encoder.clips([mel for _, mel in good])):
          write_feature(os.path.join(out, feature_filename(audio_id)), features, encoder.storage_dtype)
        written += len(good)
      bar.update(len(batch))
  return written, len(audio_ids) - len(todo), bad


def parser() -> argparse.ArgumentParser:
  """The command line; options may come before, between or after the positionals (`parse_intermixed_args`)."""
  parser = argparse.ArgumentParser(prog="python -m ltu_jax.extract_features", description=__doc__.split("\n\n")[0])
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument("--whisper", help="a Whisper model folder (python -m conversion.whisper): LTU-AS's features")
  source.add_argument("--model", help="an audio-language model folder: the features it reads (LTU: its fbank windows)")
  parser.add_argument("--data", required=True, nargs="+", help="LTU JSON or JSONL files")
  parser.add_argument("--out", required=True, help="the feature cache folder")
  parser.add_argument("--batch-size", type=int, default=8, help="clips per encoder call")
  parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32", help="encoder compute dtype")
  parser.add_argument(
    "--max-windows", type=int, default=1,
    help="windows kept per clip (LTU-AS: 10 s, 25 audio tokens each; LTU: 10.24 s, 32) (default 1: the releases' first "
    "window); longer audio is dropped with a warning",
  )
  parser.add_argument("--skip-bad", action="store_true", help="log and skip bad records and audio instead of stopping")
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  args = parser().parse_intermixed_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
  try:
    audio_ids = unique_audio_ids(args.data, skip_bad=args.skip_bad)
    if args.whisper:
      encoder = WhisperFeatures(ltu_jax.load(args.whisper, dtype=args.dtype, tokenizer=False), args.max_windows)
    else:
      encoder = features.for_folder(args.model, args.max_windows, args.dtype)
    written, cached, bad = extract(audio_ids, encoder, args.out, batch_size=args.batch_size, skip_bad=args.skip_bad)
  except DataError as error:
    log.error("%s", error)
    return 1
  log.info("%d clips: %d written, %d already cached, %d bad audio skipped", len(audio_ids), written, cached, bad)
  return 0


if __name__ == "__main__":
  sys.exit(main())
