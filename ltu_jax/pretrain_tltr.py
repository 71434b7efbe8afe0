"""Audio-tagging pretraining of TLTR, Whisper-AT's recipe in small: `python -m ltu_jax.pretrain_tltr`.

    python -m ltu_jax.pretrain_tltr --model LTU_AS_DIR --data train.json --features CACHE OUT
        [--eval test.json] [--keys sound gender speed pitch] [--epochs 40] [--lr 1e-3]

The release's stage 1 trains only the projection and keeps TLTR frozen, because its TLTR starts from
Whisper-AT's TL-TR, pretrained to tag AudioSet clips (facts §1.3); `python -m conversion.ltu_as` loads
such a `.pth`. A model composed fresh has a random TLTR, which stage 1 cannot change. This command
gives it the pretrained start on a dataset whose records carry their clip's labels (`labels`, as
`python -m ltu_jax.tiny_data` writes): every `key: value` of the chosen label keys is a tag, and TLTR
plus a tagging head (LayerNorm + Linear, Whisper-AT's `mlp_layer`) learns them with a binary cross
entropy per tag, as Whisper-AT does. Whisper-AT pools time before its layer transformer; here the
pooled output is LTU-AS's own (every time step through both transformers, then the mean over time), so
the weights learn the computation LTU-AS runs. Each clip is one example however many questions it has.

OUT is the LTU-AS model folder with the pretrained TLTR (projection, LoRA and LLM unchanged); the head
is dropped, as LTU-AS drops Whisper-AT's. Held-out accuracy per key (the best-scored tag among the key's
values) is printed before and after when `--eval` is given.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import sys
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

from ltu_jax import data, kinds, model_folder
from ltu_jax import features as audio_features
from ltu_jax.models import layers
from ltu_jax.models.tltr import TLTR

DEFAULT_KEYS = ("sound", "gender", "speed", "pitch")


class Tagger(nnx.Module):
  """TLTR, the mean over time, and a tagging head: Whisper features → one logit per tag."""

  def __init__(self, tltr: TLTR, num_tags: int, *, rngs: nnx.Rngs):
    dim = tltr.config.dim
    self.tltr = tltr
    self.norm = layers.layer_norm(dim, eps=tltr.config.eps, param_dtype="float32", rngs=rngs)
    self.head = layers.linear(dim, num_tags, "embed", None, bias=True, dtype="float32", param_dtype="float32", rngs=rngs)

  def __call__(self, features: jax.Array) -> jax.Array:
    return self.head(self.norm(self.tltr(features).mean(axis=1)))


@dataclasses.dataclass
class Clips:
  """One row per distinct clip: its features `[clips, layers, time, dim]` and tag targets `[clips, tags]`
  (`known[clip, key]` says whether the clip has a value for each key: a sound has no gender)."""

  features: np.ndarray
  targets: np.ndarray
  known: np.ndarray


def labelled_records(path: str, store: data.FeatureStore) -> list[dict[str, Any]]:
  """The checked records of an LTU data file (`data.read_records`); an error names one without labels."""
  records, _ = data.read_records(path, features=store)
  for index, record in enumerate(records):
    if not isinstance(record.get("labels"), dict):
      raise data.DataError(
        f"{path}: record {index}: no 'labels' object; tagging needs each clip's labels (as tiny_data writes them)"
      )
  return records


def tag_names(records: Sequence[dict[str, Any]], keys: Sequence[str], path: str) -> list[str]:
  """Every `key: value` the records' labels hold, sorted."""
  tags = {f"{key}: {r['labels'][key]}" for r in records for key in keys if isinstance(r["labels"].get(key), str)}
  if not tags:
    raise data.DataError(f"{path}: no record has a string label under any of the keys {list(keys)}")
  return sorted(tags)


def read_clips(
  records: Sequence[dict[str, Any]], path: str, store: data.FeatureStore, tags: Sequence[str], keys: Sequence[str]
) -> Clips:
  """The distinct clips of `records` (from `path`), their features and targets over `tags`."""
  clips: dict[str, dict[str, Any]] = {}
  for record in records:
    clips.setdefault(record["audio_id"], record["labels"])
  index = {tag: i for i, tag in enumerate(tags)}
  targets = np.zeros((len(clips), len(tags)), np.float32)
  known = np.zeros((len(clips), len(keys)), bool)
  for row, labels in enumerate(clips.values()):
    for k, key in enumerate(keys):
      tag = f"{key}: {labels.get(key)}"
      if tag in index:  # a held-out value never seen in training is not scored
        targets[row, index[tag]] = 1.0
        known[row, k] = True
  features = np.stack([store.load(audio_id) for audio_id in tqdm(clips, desc=f"features of {os.path.basename(path)}", unit="clip")])
  return Clips(features, targets, known)


def accuracy(logits: np.ndarray, clips: Clips, tags: Sequence[str], keys: Sequence[str]) -> dict[str, float]:
  """Per key: how often the best-scored of the key's tags is the clip's, over clips with that key."""
  out = {}
  for k, key in enumerate(keys):
    columns = [i for i, tag in enumerate(tags) if tag.startswith(f"{key}: ")]
    rows = clips.known[:, k]
    if columns and rows.any():
      predicted = np.asarray(columns)[logits[rows][:, columns].argmax(axis=1)]
      out[key] = float((clips.targets[rows, predicted] == 1.0).mean())
  return out


@functools.partial(jax.jit, static_argnums=0)
def _logits(graphdef: nnx.GraphDef, state: nnx.State, features: jax.Array) -> jax.Array:
  return nnx.merge(graphdef, state)(features)


def predict(graphdef: nnx.GraphDef, state: nnx.State, features: np.ndarray, batch_size: int) -> np.ndarray:
  return np.concatenate(
    [np.asarray(_logits(graphdef, state, features[i : i + batch_size])) for i in range(0, len(features), batch_size)]
  )


def make_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation):
  @jax.jit
  def step(state: nnx.State, opt_state: optax.OptState, features: jax.Array, targets: jax.Array):
    def loss_fn(state):
      logits = nnx.merge(graphdef, state)(features)
      return optax.sigmoid_binary_cross_entropy(logits, targets).mean()

    loss, grads = jax.value_and_grad(loss_fn)(state)
    updates, opt_state = tx.update(grads, opt_state, state)
    return optax.apply_updates(state, updates), opt_state, loss

  return step


def pretrain(
  model: str,
  train: str,
  features: str,
  out: str,
  *,
  eval_data: str | None = None,
  keys: Sequence[str] = DEFAULT_KEYS,
  epochs: int = 40,
  batch_size: int = 32,
  lr: float = 1e-3,
  weight_decay: float = 0.01,
  seed: int = 0,
) -> dict[str, dict[str, float]]:
  """Pretrains `model`'s TLTR on `train`'s labels and writes the LTU-AS folder `out`.

  Returns:
    Held-out accuracy per key `{"before": ..., "after": ...}` (empty without `eval_data`).
  """
  if os.path.exists(os.path.join(out, model_folder.CONFIG_FILE)):
    raise FileExistsError(f"{out} already holds a model; choose a new output folder")
  model_folder.require(model, "pretrain_tltr", kinds.AUDIO_LLM)
  loaded = model_folder.load(model)
  mc = loaded.model.config
  store = audio_features.store(loaded, features, max_windows=1)  # tags are learnt on each clip's first window
  records = labelled_records(train, store)
  tags = tag_names(records, keys, train)
  train_clips = read_clips(records, train, store, tags, keys)
  held_out = read_clips(labelled_records(eval_data, store), eval_data, store, tags, keys) if eval_data else None

  tltr_config = dataclasses.replace(mc.tltr, dtype="float32", param_dtype="float32")
  tagger = Tagger(TLTR(tltr_config, rngs=nnx.Rngs(seed)), len(tags), rngs=nnx.Rngs(seed + 1))
  nnx.update(tagger.tltr, jax.tree.map(lambda x: x.astype(jnp.float32), nnx.state(loaded.model.audio_encoder)))
  graphdef, state = nnx.split(tagger)
  steps_per_epoch = max(1, len(train_clips.targets) // batch_size)
  total = epochs * steps_per_epoch
  schedule = optax.warmup_cosine_decay_schedule(0.0, lr, min(100, total // 10), total)
  tx = optax.adamw(schedule, weight_decay=weight_decay)
  opt_state = tx.init(state)
  step = make_step(graphdef, tx)

  scores: dict[str, dict[str, float]] = {}
  if held_out is not None:
    scores["before"] = accuracy(predict(graphdef, state, held_out.features, batch_size), held_out, tags, keys)
  rng = np.random.default_rng(seed)
  bar = tqdm(total=total, desc="TLTR tagging", unit="step")
  for _ in range(epochs):
    order = rng.permutation(len(train_clips.targets))
    for i in range(steps_per_epoch):
      rows = order[i * batch_size : (i + 1) * batch_size]
      state, opt_state, loss = step(state, opt_state, train_clips.features[rows], train_clips.targets[rows])
      bar.update()
      if bar.n % 20 == 0 or bar.n == total:
        loss = float(loss)
        if not np.isfinite(loss):
          raise FloatingPointError(f"TLTR tagging loss is {loss} at step {bar.n}; nothing was written")
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{float(schedule(bar.n)):.2e}")
  bar.close()
  if held_out is not None:
    scores["after"] = accuracy(predict(graphdef, state, held_out.features, batch_size), held_out, tags, keys)

  nnx.update(tagger, state)
  nnx.update(loaded.model.audio_encoder, nnx.state(tagger.tltr))
  model_folder.save_like(out, loaded.model, loaded)
  return scores


def parser() -> argparse.ArgumentParser:
  """The command line; options may come before, between or after the positionals (`parse_intermixed_args`)."""
  parser = argparse.ArgumentParser(
    prog="python -m ltu_jax.pretrain_tltr", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument("out", help="the new LTU-AS model folder")
  parser.add_argument("--model", required=True, help="the LTU-AS model folder whose TLTR is pretrained")
  parser.add_argument("--data", required=True, help="LTU JSON/JSONL whose records carry `labels`")
  parser.add_argument("--features", required=True, help="the feature cache (python -m ltu_jax.extract_features)")
  parser.add_argument("--eval", help="held-out LTU JSON/JSONL: accuracy per key before and after")
  parser.add_argument("--keys", nargs="+", default=list(DEFAULT_KEYS), help="label keys that make the tags")
  parser.add_argument("--epochs", type=int, default=40)
  parser.add_argument("--batch-size", type=int, default=32)
  parser.add_argument("--lr", type=float, default=1e-3)
  parser.add_argument("--seed", type=int, default=0)
  return parser


def main(argv: Sequence[str] | None = None) -> None:
  args = parser().parse_intermixed_args(argv)
  scores = pretrain(
    args.model, args.data, args.features, args.out, eval_data=args.eval, keys=args.keys, epochs=args.epochs,
    batch_size=args.batch_size, lr=args.lr, seed=args.seed,
  )
  for when, accuracies in scores.items():
    print(f"held-out accuracy {when}: " + ", ".join(f"{key} {value:.1%}" for key, value in accuracies.items()), file=sys.stderr)


if __name__ == "__main__":
  main()
