"""The model folder: what every conversion writes and every command takes as `--model`.

    FOLDER/
      ltu_jax.json   {"kind": a name of `ltu_jax.kinds`, "config": {...}, "extra": {...}}
      params/        the parameters, an orbax checkpoint of the model's state
      tokenizer.json, tokenizer_config.json, ...   a Hugging Face tokenizer (AutoTokenizer loads it)

`extra` holds what the model's users need beside its weights (special token ids, suppress lists).
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
import shutil
import typing
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from ltu_jax import kinds
from ltu_jax.models.lora import LoRAConfig, LoRAParam

CONFIG_FILE = "ltu_jax.json"
PARAMS_DIR = "params"
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json")


def config_to_dict(config: Any) -> dict[str, Any]:
  return dataclasses.asdict(config)


def config_from_dict(cls: type, data: dict[str, Any], where: str = "config") -> Any:
  """Rebuilds a (nested) config dataclass from `config_to_dict`'s output; unknown keys are errors."""
  hints = typing.get_type_hints(cls)
  names = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(data) - names)
  if unknown:
    raise ValueError(f"{where}: unknown keys {unknown} for {cls.__name__}; expected some of {sorted(names)}")
  values = {}
  for name, value in data.items():
    kind = hints[name]
    options = typing.get_args(kind) if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union else (kind,)
    nested = next((t for t in options if dataclasses.is_dataclass(t)), None)
    if nested is not None and isinstance(value, dict):
      value = config_from_dict(nested, value, f"{where}.{name}")
    elif isinstance(value, list):
      value = tuple(value)
    values[name] = value
  return cls(**values)


@dataclasses.dataclass
class Loaded:
  """A model folder in memory: `model(...)` for logits, `tokenizer` for text."""

  kind: str
  config: Any
  model: nnx.Module
  tokenizer: Any
  extra: dict[str, Any]
  folder: str


def _save_handlers() -> Any:
  """Orbax's standard type handlers, except that numpy arrays are written in place, not deep-copied.

  Orbax copies host arrays so that an asynchronous save survives their mutation; `save` returns only
  once the checkpoint is written, so the copy buys nothing and would hold a second copy of the model
  (a converter's memory-mapped weights would become anonymous memory). The format is the standard one.
  """
  handlers = ocp.type_handlers
  return handlers.create_type_handler_registry(
    (int, handlers.ScalarHandler()),
    (float, handlers.ScalarHandler()),
    (np.number, handlers.ScalarHandler()),
    (np.ndarray, handlers.NumpyHandler(deepcopy_host_arrays=False)),
    (jax.Array, handlers.ArrayHandler()),
  )


def this_process() -> ocp.options.MultiprocessingOptions:
  """A model folder is read and written by one process alone: no barriers with the other processes of a
  multi-process run (the trainer writes its model from process 0 only)."""
  return ocp.options.MultiprocessingOptions(primary_host=jax.process_index(), active_processes={jax.process_index()})


def _process_local_state(model: nnx.Module) -> dict[str, Any]:
  """The model's parameters as orbax can write them from one process of a multi-process run.

  In such a run orbax's `ArrayHandler` refuses every fully addressable `jax.Array` (it takes them for
  pmap outputs), even when only this process saves: the arrays go to it as host numpy arrays, which
  `NumpyHandler` writes, though only on process 0 (orbax's own rule, whatever the primary host).
  """
  state = nnx.to_pure_dict(nnx.state(model))
  if jax.process_count() == 1:
    return state
  if jax.process_index() != 0:
    raise ValueError(
      f"process {jax.process_index()} of {jax.process_count()} cannot write a model folder: in a multi-process "
      "run orbax writes one process's arrays from process 0 only"
    )

  def host(path: tuple[Any, ...], x: Any) -> Any:
    if not isinstance(x, jax.Array):
      return x
    if not x.is_fully_addressable:
      raise ValueError(
        f"parameter {jax.tree_util.keystr(path)} is sharded over several processes; gather it first "
        "(jax.experimental.multihost_utils.process_allgather): a model folder is written by one process"
      )
    return np.asarray(x)

  return jax.tree_util.tree_map_with_path(host, state)


def save(folder: str | os.PathLike, model: nnx.Module, kind: str, extra: dict[str, Any] | None = None, tokenizer: Any = None) -> None:
  """Writes `model` (its config, its parameters) and `tokenizer` (`save_pretrained`) to a new folder.

  In a multi-process run only process 0 may call it, with arrays it holds whole (see `this_process`)."""
  folder = os.path.abspath(folder)
  kinds.get(kind)
  state = _process_local_state(model)  # before anything is written: it may refuse this process
  os.makedirs(folder, exist_ok=True)
  if os.path.exists(os.path.join(folder, PARAMS_DIR)):
    raise FileExistsError(f"{folder} already holds a model; choose a new output folder")
  # Uncompressed: tensorstore then writes each array straight from its (memory-mapped) buffer, so saving
  # a converter's output adds no memory; zstd would hold every encoded array until it is written, about
  # the model's size, to save ~8% of disk on fp32 weights.
  handler = ocp.PyTreeCheckpointHandler(
    use_compression=False, type_handler_registry=_save_handlers(), multiprocessing_options=this_process()
  )
  with ocp.Checkpointer(handler, multiprocessing_options=this_process()) as checkpointer:
    checkpointer.save(os.path.join(folder, PARAMS_DIR), args=ocp.args.PyTreeSave(state))
  if tokenizer is not None:
    tokenizer.save_pretrained(folder)
  manifest = {"kind": kind, "config": config_to_dict(model.config), "extra": extra or {}}
  with open(os.path.join(folder, CONFIG_FILE), "w") as f:
    json.dump(manifest, f, indent=2)


def save_like(folder: str | os.PathLike, model: nnx.Module, parent: Loaded) -> None:
  """Saves `model` as a folder of the same kind as `parent`, with its tokenizer, extra data and the
  model folders it holds (an LTU-AS folder's `whisper/`)."""
  save(folder, model, parent.kind, extra=parent.extra, tokenizer=parent.tokenizer)
  for value in parent.extra.values():
    inner = os.path.join(parent.folder, value) if isinstance(value, str) else None
    if inner and os.path.isfile(os.path.join(inner, CONFIG_FILE)):
      shutil.copytree(inner, os.path.join(folder, value))


def read_manifest(folder: str | os.PathLike) -> dict[str, Any]:
  path = os.path.join(folder, CONFIG_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{folder} is not an ltu-jax model folder: {CONFIG_FILE} is missing (convert a checkpoint first)")
  with open(path) as f:
    manifest = json.load(f)
  if manifest.get("kind") not in kinds.KINDS:
    raise ValueError(f"{path}: 'kind' is {manifest.get('kind')!r}; expected one of {sorted(kinds.KINDS)}")
  return manifest


def require(folder: str | os.PathLike, command: str, needs: str) -> kinds.Kind:
  """The folder's kind if `command` applies to it (`kinds.require`), checked before any weight is read."""
  return kinds.require(read_manifest(folder)["kind"], command, needs, str(folder))


def load(
  folder: str | os.PathLike,
  *,
  param_dtype: str | None = None,
  tokenizer: bool = True,
  configure: Callable[[Any], Any] | None = None,
  lora: LoRAConfig | None = None,
  seed: int = 0,
  **overrides: Any,
) -> Loaded:
  """Loads any model folder. `param_dtype` casts the stored weights; `overrides` replace config fields
  of the model and its parts (e.g. `dtype="bfloat16"` for bf16 compute, `remat=True`); `configure` maps
  the config to another one of the same shapes (e.g. a training LoRA dropout). With `lora`, an LLM that
  has no adapters gets fresh ones of that shape (B zero, so the model is unchanged; A drawn from `seed`);
  adapters the folder has are kept. The tokenizer is loaded when the folder has one and `tokenizer` is true."""
  folder = os.path.abspath(folder)
  manifest = read_manifest(folder)
  kind = kinds.get(manifest["kind"])
  stored = config_from_dict(kind.config, manifest["config"], f"{folder}/{CONFIG_FILE}")
  if param_dtype is not None:
    overrides["param_dtype"] = param_dtype
  config = _with_overrides(stored, overrides)
  if lora is not None:
    config = _with_lora(config, lora)
  if configure is not None:
    config = configure(config)
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: kind.model(config, rngs=nnx.Rngs(seed))))
  # On this process's first device: the saved placement may name devices another process does not have.
  local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=local), nnx.to_pure_dict(abstract))
  added = lora is not None and _with_lora(stored, lora) != stored
  if added:
    # The folder has no adapters: restore everything else, then draw the adapters as a fresh model would.
    fresh = nnx.to_pure_dict(jax.jit(lambda: nnx.state(kind.model(config, rngs=nnx.Rngs(seed)), LoRAParam))())
    target = _without(target, fresh)
  with ocp.StandardCheckpointer(multiprocessing_options=this_process()) as checkpointer:
    restored = checkpointer.restore(os.path.join(folder, PARAMS_DIR), target)
  if added:
    restored = _merged(restored, jax.device_put(fresh, local))
  nnx.replace_by_pure_dict(abstract, restored)
  text = None
  if tokenizer and any(os.path.isfile(os.path.join(folder, f)) for f in TOKENIZER_FILES):
    import transformers  # only where text is needed: it is slow to import

    text = transformers.AutoTokenizer.from_pretrained(folder)
  return Loaded(manifest["kind"], config, nnx.merge(graphdef, abstract), text, manifest["extra"], folder)


def map_lora(config: Any, change: Callable[[LoRAConfig | None], LoRAConfig | None]) -> Any:
  """`config` with `change` applied to the adapters setting (`lora`, None without adapters) of every LLM
  inside it."""
  changes = {}
  for field in dataclasses.fields(config):
    value = getattr(config, field.name)
    if field.name == "lora":
      changes["lora"] = change(value)
    elif dataclasses.is_dataclass(value):
      changes[field.name] = map_lora(value, change)
  return dataclasses.replace(config, **changes)


def _with_lora(config: Any, lora: LoRAConfig) -> Any:
  """`config` with `lora` on every LLM inside it that has no adapters yet."""
  return map_lora(config, lambda own: lora if own is None else own)


def _without(tree: dict, remove: dict) -> dict:
  """The nested dict `tree` less the leaves that `remove` has."""
  out = {}
  for k, v in tree.items():
    if k not in remove:
      out[k] = v
    elif isinstance(v, dict):
      out[k] = _without(v, remove[k])
  return out


def _merged(tree: dict, more: dict) -> dict:
  """The nested dicts `tree` and `more` in one (their leaves do not overlap)."""
  out = dict(tree)
  for k, v in more.items():
    out[k] = _merged(out.get(k, {}), v) if isinstance(v, dict) else v
  return out


def cast_to(dtype: str | None) -> dict[str, str]:
  """`load` options that store and compute a model in `dtype` ("bfloat16" on accelerators); none for None."""
  return {} if dtype is None else {"param_dtype": dtype, "dtype": dtype}


def _with_overrides(config: Any, overrides: dict[str, Any]) -> Any:
  """Applies dtype/remat-style overrides to the config and to its nested model configs."""
  if not overrides:
    return config
  own = {k: v for k, v in overrides.items() if k in {f.name for f in dataclasses.fields(config)}}
  nested = {
    f.name: _with_overrides(getattr(config, f.name), overrides)
    for f in dataclasses.fields(config)
    if dataclasses.is_dataclass(getattr(config, f.name)) and f.name != "lora"
  }
  return dataclasses.replace(config, **own, **nested)
