"""The curriculum trainer: `python -m ltu_jax.train --config stage3 [--set optim.lr=2e-4 ...]`.

A short loop around a pure, jitted `train_step(state, frozen, batch, key) -> (state, metrics)`:
trainable parameters (a stage's filter) and their AdamW state are donated and sharded by the logical
rules; the frozen LLM is a separate, non-donated argument stored in bf16. Gradients are accumulated over
micro-batches inside the step. Checkpoints (orbax) hold the trainable parameters, the optimizer state,
the step and the data iterator, so a resumed run continues the same run bit for bit on CPU.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib.util
import json
import math
import os
import re
import shutil
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx, struct
from jax.experimental import multihost_utils

from ltu_jax import data, features, kinds, model_folder, sharding
from ltu_jax.models.lora import LoRAConfig
from ltu_jax.models.ltu_as import lm_loss

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def load_config(name: str, overrides: list[str] = ()) -> ml_collections.ConfigDict:
  """`name` is a config in configs/ ("stage3") or a path to one; overrides are `key.sub=value`."""
  path = name if name.endswith(".py") else os.path.join(CONFIG_DIR, f"{name}.py")
  if not os.path.isfile(path):
    known = sorted(f[:-3] for f in os.listdir(CONFIG_DIR) if f.endswith(".py") and not f.startswith("_"))
    raise FileNotFoundError(f"config {name!r} not found at {path}; known configs: {known}")
  spec = importlib.util.spec_from_file_location(f"ltu_jax_config_{os.path.basename(path)[:-3]}", path)
  module = importlib.util.module_from_spec(spec)
  sys.path.insert(0, os.path.dirname(CONFIG_DIR))  # configs import configs.common
  try:
    spec.loader.exec_module(module)
  finally:
    sys.path.pop(0)
  config = module.get_config()
  config.lock()  # an override of a field the config does not have is an error, not a new field
  for item in overrides:
    key, sep, value = item.partition("=")
    if not sep:
      raise ValueError(f"override {item!r} is not key=value")
    try:
      config.update_from_flattened_dict({key: parse_value(value)})
    except (KeyError, AttributeError) as error:
      raise KeyError(f"override {item!r}: the config has no field {key!r}") from error
  if not config.output_dir:
    config.output_dir = os.path.join("runs", config.name)
  return config


def parse_value(text: str) -> Any:
  """A Python literal (`2e-4`, `8`, `'a'`), `true`/`false`/`none` in any case, or else the text itself."""
  words = {"true": True, "false": False, "none": None}
  if text.lower() in words:
    return words[text.lower()]
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def path_name(path: tuple[Any, ...]) -> str:
  """A parameter's path as the kinds' group expressions read it: "llm/layers/self_attn/q_proj/lora_a" (an
  nnx graph path, or a pytree path into an `nnx.State`, less its variables' trailing `.value`)."""
  names = [str(getattr(key, "key", getattr(key, "name", key))) for key in path]
  if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and names[-1] == "value":
    names.pop()
  return "/".join(names)


def group_names(kind: kinds.Kind, names: Any, setting: str) -> tuple[str, ...]:
  """The groups a setting names (a tuple, or one comma-separated string), each checked against the kind's."""
  names = tuple(names.split(",")) if isinstance(names, str) else tuple(names)
  known = tuple(name for name, _ in kind.groups)
  if unknown := sorted(set(names) - set(known)):
    raise KeyError(f"{setting}: unknown parameter groups {unknown}; a {kind.name} model's groups are {known}")
  return names


def trainable_filter(kind: kinds.Kind, groups: Any) -> Any:
  """An nnx filter: the parameters of the named groups (stage 1: the projection; later stages TLTR, the
  projection and the LoRA adapters)."""
  chosen = set(group_names(kind, groups, "trainable"))
  return lambda path, _: kind.group_of(path_name(path)) in chosen


def lr_schedule(peak: float, warmup: int, total: int) -> optax.Schedule:
  """Hugging Face's default: linear warm-up to `peak`, then linear decay to 0 at `total`."""
  warmup = min(warmup, total)
  return optax.join_schedules(
    [optax.linear_schedule(0.0, peak, warmup), optax.linear_schedule(peak, 0.0, max(total - warmup, 1))], [warmup]
  )


@struct.dataclass
class TrainState:
  step: jax.Array
  params: Any  # trainable parameters, fp32 masters
  opt_state: Any


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, schedule: optax.Schedule):
  """The pure step. `batch` arrays have a leading accumulation axis: `[accum, micro, ...]`.

  The loss is the mean over every target token of the effective batch (summed over micro-batches, then
  divided by the token count), so it does not depend on how the batch is split into micro-batches and
  devices. (Hugging Face averages the micro-batches' own means, which weights short micro-batches more.)
  """

  def micro_loss(params, frozen, micro, key):
    model = nnx.merge(graphdef, params, frozen)
    logits, _ = model(
      micro["features"], micro["input_ids"], micro["attention_mask"], dropout_key=key, audio_mask=micro["audio_mask"]
    )
    loss, tokens = lm_loss(logits, micro["input_ids"], micro["loss_mask"])
    return loss * tokens, tokens

  def train_step(state: TrainState, frozen, batch, key):
    key = jax.random.fold_in(key, state.step)
    accum = batch["input_ids"].shape[0]

    def accumulate(carry, scanned):
      grads, loss_sum, tokens = carry
      micro, index = scanned
      (micro_sum, micro_tokens), micro_grads = jax.value_and_grad(micro_loss, has_aux=True)(
        state.params, frozen, micro, jax.random.fold_in(key, index)
      )
      return (jax.tree.map(jnp.add, grads, micro_grads), loss_sum + micro_sum, tokens + micro_tokens), None

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    (grads, loss_sum, tokens), _ = jax.lax.scan(accumulate, (zeros, 0.0, 0.0), (batch, jnp.arange(accum)))
    tokens = jnp.maximum(tokens, 1.0)
    grads = jax.tree.map(lambda g: g / tokens, grads)
    loss = loss_sum / tokens
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    grad_norm = optax.tree.norm(grads)
    # What is saved must be finite too: the updated parameters' norm (it overflows to inf on parameters
    # blown up by a huge learning rate, before they become NaN) costs one pass over the trainable ones.
    param_norm = optax.tree.norm(params)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(param_norm)
    # A non-finite step leaves the state as it was; the loop stops on it.
    new = TrainState(state.step + 1, params, opt_state)
    new = jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, state)
    metrics = dict(
      loss=loss, grad_norm=grad_norm, param_norm=param_norm, lr=schedule(state.step), tokens=tokens, finite=finite
    )
    return new, metrics

  return train_step


def training_config(config: Any, c: ml_collections.ConfigDict) -> Any:
  """The model config as the run trains it: its adapters with the run's dropout (the folder keeps the rest)
  and, when `audio.max_windows` is set, that many windows a clip."""
  config = model_folder.map_lora(config, lambda lora: lora and dataclasses.replace(lora, dropout=c.lora.dropout))
  if c.audio.max_windows is not None:
    config = dataclasses.replace(config, max_windows=c.audio.max_windows)
  return config


def lora_config(c: ml_collections.ConfigDict) -> LoRAConfig:
  return LoRAConfig(rank=c.lora.rank, alpha=c.lora.alpha, dropout=c.lora.dropout, targets=tuple(c.lora.targets))


def optimizer(
  c: ml_collections.ConfigDict, total_steps: int, kind: kinds.Kind
) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW (Hugging Face's `adamw_torch` defaults) on the warm-up-then-linear-decay schedule, after the
  Hugging Face Trainer's clipping of the accumulated gradient to a global norm (`max_grad_norm`, 1.0)."""
  schedule = lr_schedule(c.optim.lr, c.optim.warmup_steps, total_steps)
  adamw = optax.adamw(schedule, b1=c.optim.b1, b2=c.optim.b2, eps=c.optim.eps, weight_decay=c.optim.weight_decay)
  chain = [adamw]
  if c.optim.max_grad_norm is not None:
    chain.insert(0, optax.clip_by_global_norm(c.optim.max_grad_norm))
  scales = dict(c.optim.lr_scale)
  group_names(kind, tuple(scales), "optim.lr_scale")
  if any(scale != 1.0 for scale in scales.values()):
    chain.append(scale_by_group(kind, scales))
  return (chain[0] if len(chain) == 1 else optax.chain(*chain)), schedule


def scale_by_group(kind: kinds.Kind, scales: dict[str, float]) -> optax.GradientTransformation:
  """Multiplies each group's update (so its learning rate, weight decay included) by `scales[group]`."""

  def update(updates, state, params=None):
    del params
    return jax.tree.map_with_path(lambda path, u: u * scales.get(kind.group_of(path_name(path)), 1.0), updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


@dataclasses.dataclass
class TrainShardings:
  """Where everything of a train step lives on the mesh."""

  state: TrainState  # of NamedShardings
  frozen: Any
  mesh: jax.sharding.Mesh

  @classmethod
  def of(cls, params, frozen, tx: optax.GradientTransformation, mesh: jax.sharding.Mesh) -> "TrainShardings":
    """From the logical axes of (abstract or concrete) trainable and frozen parameters."""
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    param_shardings = sharding.state_shardings(params, mesh)
    # Optimizer moments take their parameters' shardings; scalars such as Adam's count are replicated.
    opt_shardings = optax.tree_map_params(
      tx, lambda _, s: s, jax.eval_shape(tx.init, params), param_shardings, transform_non_params=lambda _: replicated
    )
    return cls(TrainState(replicated, param_shardings, opt_shardings), sharding.state_shardings(frozen, mesh), mesh)

  def batch(self, ndim: int) -> jax.sharding.NamedSharding:
    """Batch arrays `[accum, batch, ...]`: the batch axis over the data-parallel mesh axes."""
    spec = jax.sharding.PartitionSpec(None, ("data", "fsdp"), *([None] * (ndim - 2)))
    return jax.sharding.NamedSharding(self.mesh, spec)


def jit_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, schedule: optax.Schedule, shardings: TrainShardings):
  """The train step jitted with explicit shardings, the state donated, traced under the mesh so that
  the model's activation constraints (`sharding.constrain`) apply."""
  step = make_train_step(graphdef, tx, schedule)

  def step_on_mesh(*args):
    with jax.sharding.use_abstract_mesh(shardings.mesh.abstract_mesh):
      return step(*args)

  return jax.jit(
    step_on_mesh,
    in_shardings=(shardings.state, shardings.frozen, None, None),
    out_shardings=(shardings.state, None),
    donate_argnums=(0,),
  )


def place(tree: Any, shardings: Any) -> Any:
  """Host arrays (the same on every process) onto their shardings, each process filling its own devices."""
  return jax.tree.map(
    lambda x, s: jax.make_array_from_callback(np.shape(x), s, lambda index: np.asarray(x[index])), tree, shardings
  )


def cast_floats(tree: Any, dtype: str) -> Any:
  """Floating arrays (or abstract `ShapeDtypeStruct`s) of `tree` as `dtype`."""

  def cast(x: Any) -> Any:
    if not jnp.issubdtype(x.dtype, jnp.floating):
      return x
    if isinstance(x, jax.ShapeDtypeStruct):
      return jax.ShapeDtypeStruct(x.shape, jnp.dtype(dtype))
    return x.astype(dtype)

  return jax.tree.map(cast, tree)


def split_for_training(
  model: nnx.Module, c: ml_collections.ConfigDict, kind: kinds.Kind
) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
  """(graphdef, trainable parameters as fp32 masters, frozen parameters in `precision.frozen`) by the
  config's trainable groups; the model may be abstract (`nnx.eval_shape`). The masters are fp32 whatever
  dtype the model folder stores."""
  graphdef, params, frozen = nnx.split(model, trainable_filter(kind, c.trainable), ...)
  return graphdef, cast_floats(params, "float32"), cast_floats(frozen, c.precision.frozen)


RUN_CONFIG = "config.json"
# What a run's settings may be: checked when it starts, each named.
DTYPES = ("float32", "bfloat16", "float16")


def check_config(c: ml_collections.ConfigDict) -> None:
  """Refuses settings a run cannot use, naming the setting and what it takes."""
  problems = []

  def need(ok: bool, setting: str, expected: str) -> None:
    if not ok:
      problems.append(f"{setting} is {_get(c, setting)!r}; expected {expected}")

  for setting in ("optim.batch_size", "optim.micro_batch_size", "data.cutoff_len", "data.pad_to_multiple_of",
                  "log_every", "checkpoint_every", "keep_checkpoints"):
    need(isinstance(_get(c, setting), int) and _get(c, setting) >= 1, setting, "a whole number ≥ 1")
  need(isinstance(c.optim.epochs, (int, float)) and c.optim.epochs > 0, "optim.epochs", "a number > 0")
  need(isinstance(c.optim.lr, (int, float)) and c.optim.lr >= 0, "optim.lr", "a number ≥ 0")
  need(isinstance(c.optim.warmup_steps, int) and c.optim.warmup_steps >= 0, "optim.warmup_steps", "a whole number ≥ 0")
  for setting in ("precision.compute", "precision.frozen"):
    need(_get(c, setting) in DTYPES, setting, f"one of {DTYPES}")
  need(c.data.padding_side in ("left", "right"), "data.padding_side", "'left' or 'right'")
  need(c.audio.max_windows is None or c.audio.max_windows >= 1, "audio.max_windows", "None or a whole number ≥ 1")
  need(isinstance(c.lora.rank, int) and c.lora.rank >= 1, "lora.rank", "a whole number ≥ 1")
  need(0 <= c.lora.dropout < 1, "lora.dropout", "a number in [0, 1)")
  for axis in ("data", "fsdp", "tensor"):
    need(isinstance(c.mesh[axis], int) and (c.mesh[axis] >= 1 or c.mesh[axis] == -1), f"mesh.{axis}", "≥ 1, or -1 (the rest)")
  for setting in ("model", "data.train", "output_dir"):
    need(bool(_get(c, setting)), setting, "a path")
  if problems:
    raise ValueError(f"config {c.name or '(unnamed)'}: " + "; ".join(problems))


def _get(c: ml_collections.ConfigDict, dotted: str) -> Any:
  for part in dotted.split("."):
    c = c[part]
  return c


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(tree, dict):
    return {k: v for key, value in tree.items() for k, v in _flat(value, f"{prefix}{key}.").items()}
  return {prefix[:-1]: tree}


def changed_settings(c: ml_collections.ConfigDict, resume: bool) -> list[str]:
  """The settings that differ from those of the run already in `output_dir` ("key: old → new"); empty for
  a new run. Continuing a run under other settings needs `resume` (`--resume`): otherwise it is refused."""
  saved_path = os.path.join(c.output_dir, RUN_CONFIG)
  checkpoints = os.path.join(c.output_dir, "checkpoints")
  started = os.path.isdir(checkpoints) and any(name.isdigit() for name in os.listdir(checkpoints))
  if not started or not os.path.isfile(saved_path):
    return []
  with open(saved_path) as f:
    saved = _flat(json.load(f))
  now = _flat(json.loads(c.to_json_best_effort()))
  changed = [f"{key}: {saved.get(key)!r} → {now.get(key)!r}" for key in sorted(saved.keys() | now.keys()) if saved.get(key) != now.get(key)]
  if changed and not resume:
    raise ValueError(
      f"{c.output_dir} holds a run with other settings ({'; '.join(changed)}); nothing was changed. Run it with "
      "its own settings to resume it, add --resume to continue it with these, or choose a new output_dir"
    )
  return changed


def keep_config(c: ml_collections.ConfigDict, changed: list[str]) -> None:
  """Writes the run's `config.json`; a resumed run's earlier settings are kept beside as `config.N.json`."""
  path = os.path.join(c.output_dir, RUN_CONFIG)
  if changed:
    earlier = len([name for name in os.listdir(c.output_dir) if re.fullmatch(r"config\.\d+\.json", name)])
    os.replace(path, os.path.join(c.output_dir, f"config.{earlier}.json"))
    print(f"resuming {c.output_dir} with changed settings: {'; '.join(changed)}", file=sys.stderr)
  with open(path, "w") as f:
    f.write(c.to_json_best_effort(indent=2))


class Trainer:
  """Builds everything a run needs from its config; `run()` trains and writes `output_dir/model`.

  A run in an `output_dir` that holds checkpoints resumes it, under the same settings or, with `resume`,
  under changed ones (they are printed and the earlier config kept)."""

  def __init__(self, config: ml_collections.ConfigDict, resume: bool = False):
    self.config = c = config
    check_config(c)
    self.kind = model_folder.require(c.model, "train", kinds.AUDIO_LLM)
    self.changed = changed_settings(c, resume)
    self.mesh = sharding.make_mesh(c.mesh.data, c.mesh.fsdp, c.mesh.tensor)
    self.loaded = model_folder.load(
      c.model, dtype=c.precision.compute, remat=c.precision.remat, lora=lora_config(c), seed=c.seed,
      configure=lambda m: training_config(m, c),
    )
    model = self.loaded.model
    self.graphdef, params, frozen = split_for_training(model, c, self.kind)

    dp = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
    if c.optim.batch_size % (c.optim.micro_batch_size * dp):
      raise ValueError(
        f"optim.batch_size {c.optim.batch_size} is not a multiple of micro_batch_size {c.optim.micro_batch_size} "
        f"× {dp} data-parallel devices"
      )
    self.accum = c.optim.batch_size // (c.optim.micro_batch_size * dp)
    encoder = features.for_model(self.loaded) if c.data.features_on_the_fly else None
    store = features.store(self.loaded, c.data.features, encoder)
    # Every record (and its features or audio) is checked here, so no bad record stops an epoch midway.
    records, skipped = data.read_records(c.data.train, skip_bad=c.data.skip_bad_records, features=store)
    if skipped:
      print(f"skipped {skipped} bad records of {c.data.train}", file=sys.stderr)
    extra = self.loaded.extra
    self.loader = data.make_loader(
      records,
      self.loaded.tokenizer,
      store,
      batch_size=c.optim.batch_size // jax.process_count(),
      cutoff_len=c.data.cutoff_len,
      train_on_inputs=c.data.train_on_inputs,
      padding_side=c.data.padding_side,
      pad_to_multiple_of=c.data.pad_to_multiple_of,
      group_by_length=c.data.group_by_length,
      bos_id=extra["bos_token_id"],
      eos_id=extra["eos_token_ids"][0],
      pad_id=extra.get("pad_token_id") or 0,
      seed=c.seed,
      workers=c.data.workers,
      use_input=self.kind.uses_transcript,
    )
    self.total_steps = max(1, math.ceil(c.optim.epochs * self.loader.steps_per_epoch))
    self.last_step = self.total_steps if c.optim.max_steps <= 0 else min(self.total_steps, c.optim.max_steps)
    tx, schedule = optimizer(c, self.total_steps, self.kind)
    shardings = TrainShardings.of(params, frozen, tx, self.mesh)
    self.frozen = place(frozen, shardings.frozen)
    params = place(params, shardings.state.params)
    opt_state = jax.jit(tx.init, out_shardings=shardings.state.opt_state)(params)
    self.state = TrainState(place(np.zeros((), np.int32), shardings.state.step), params, opt_state)
    self.batch_sharding = shardings.batch
    self.step_fn = jit_train_step(self.graphdef, tx, schedule, shardings)
    self.key = jax.random.key(c.seed)
    self.checkpoints = ocp.CheckpointManager(
      os.path.abspath(os.path.join(c.output_dir, "checkpoints")),
      item_names=("state", "data"),
      options=ocp.CheckpointManagerOptions(max_to_keep=c.keep_checkpoints, save_interval_steps=c.checkpoint_every),
    )

  def device_batch(self, host_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """`[accum * micro, ...]` per process → global `[accum, micro * processes, ...]` sharded on the batch axis."""
    out = {}
    for name, array in host_batch.items():
      array = array.reshape(self.accum, -1, *array.shape[1:])
      out[name] = jax.make_array_from_process_local_data(self.batch_sharding(array.ndim), array)
    return out

  def restore(self) -> int:
    step = self.checkpoints.latest_step()
    if step is None:
      return 0
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), self.state)
    restored = self.checkpoints.restore(
      step,
      args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), data=data.checkpoint_restore(self.loader)),
    )
    self.state = restored["state"]
    print(f"resumed from step {step} ({self.checkpoints.directory})", file=sys.stderr)
    return step

  def save(self, step: int, force: bool = False) -> None:
    self.checkpoints.save(
      step,
      args=ocp.args.Composite(state=ocp.args.StandardSave(self.state), data=data.checkpoint_save(self.loader)),
      force=force,
    )

  def run(self) -> str:
    """Trains to the last step and writes the trained model folder; returns its path."""
    c = self.config
    os.makedirs(c.output_dir, exist_ok=True)
    if jax.process_index() == 0:
      keep_config(c, self.changed)
    start = self.restore()
    log = metrics_writers(c.output_dir)
    from tqdm import tqdm

    bar = tqdm(total=self.last_step, initial=start, desc=c.name, unit="step", disable=jax.process_index() != 0)
    window_start, window_samples = time.perf_counter(), 0
    try:
      for step in range(start, self.last_step):
        batch = self.device_batch(next(self.loader))
        self.state, metrics = self.step_fn(self.state, self.frozen, batch, self.key)
        window_samples += c.optim.batch_size
        if not bool(metrics["finite"]):
          latest = self.checkpoints.latest_step()
          raise FloatingPointError(
            f"step {step}: loss is {float(metrics['loss'])}, grad norm {float(metrics['grad_norm'])}, updated "
            f"parameters' norm {float(metrics['param_norm'])}: not finite; training stopped, the step is not saved. "
            + (f"The last good checkpoint is step {latest} in {self.checkpoints.directory}" if latest is not None
               else f"No checkpoint was saved before it ({self.checkpoints.directory})")
          )
        self.save(step + 1)
        bar.update(1)
        if (step + 1) % c.log_every == 0 or step + 1 == self.last_step:
          elapsed = time.perf_counter() - window_start
          row = {k: float(v) for k, v in metrics.items() if k != "finite"}
          row.update(step=step + 1, samples_per_s=window_samples / elapsed)
          log(row)
          bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}", samples_s=f"{row['samples_per_s']:.1f}")
          window_start, window_samples = time.perf_counter(), 0
      if self.checkpoints.latest_step() != self.last_step:
        self.save(self.last_step, force=True)
    finally:
      bar.close()
      self.checkpoints.close()  # waits for saves in flight, also when a step fails
    return self.write_model()

  def write_model(self) -> str:
    """The trained model as a model folder (what the next stage takes as `model`), with the adapters and the
    number of windows it was trained with."""
    c = self.config
    out = os.path.join(c.output_dir, "model")
    # Every process takes part in gathering the parameters; process 0 writes them.
    params = multihost_utils.process_allgather(self.state.params, tiled=True)
    if jax.process_index() == 0:
      parent = model_folder.load(c.model, lora=lora_config(c), seed=c.seed, configure=lambda m: training_config(m, c))
      nnx.update(parent.model, params)
      # Written beside, then swapped in: `model` may be (inside) this very folder, which is read until now.
      fresh, old = f"{out}.writing", f"{out}.old"
      for leftover in (fresh, old):
        if os.path.exists(leftover):
          shutil.rmtree(leftover)
      model_folder.save_like(fresh, parent.model, parent)
      if os.path.exists(out):
        os.replace(out, old)
      os.replace(fresh, out)
      if os.path.exists(old):
        shutil.rmtree(old)
    multihost_utils.sync_global_devices("model written")
    return out


def metrics_writers(output_dir: str):
  """A function that logs one row of metrics to `metrics.jsonl` and TensorBoard (process 0 only)."""
  if jax.process_index() != 0:
    return lambda row: None
  from tensorboardX import SummaryWriter

  board = SummaryWriter(os.path.join(output_dir, "tensorboard"))
  path = os.path.join(output_dir, "metrics.jsonl")

  def log(row: dict[str, float]) -> None:
    with open(path, "a") as f:
      f.write(json.dumps(row) + "\n")
    for name, value in row.items():
      if name != "step":
        board.add_scalar(f"train/{name}", value, row["step"])
    board.flush()

  return log


def parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
    prog="python -m ltu_jax.train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument("--config", required=True, help="a config name in configs/ (stage1, tiny_stage3, ...) or a path")
  parser.add_argument(
    "--set", action="extend", nargs="+", default=[], metavar="KEY=VALUE", help="override config fields (repeatable)"
  )
  parser.add_argument("--coordinator", help="host:port of process 0, for multi-process runs (jax.distributed)")
  parser.add_argument("--num-processes", type=int, default=1)
  parser.add_argument("--process-id", type=int, default=0)
  parser.add_argument(
    "--resume", action="store_true",
    help="continue the run in output_dir under changed settings (they are printed; the earlier config is kept)",
  )
  return parser


def main(argv: list[str] | None = None) -> None:
  args = parser().parse_intermixed_args(argv)
  if args.coordinator:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU processes; accelerators use their own
    jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
  config = load_config(args.config, args.set)
  print(f"trained model: {Trainer(config, resume=args.resume).run()}", file=sys.stderr)


if __name__ == "__main__":
  main()
