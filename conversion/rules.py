"""One name-mapping mechanism for every checkpoint format.

A format is a table of `Rule`s: a source key pattern (`{layer}` stands for a layer index), the dotted
path of the target parameter in our model, and a transform (transpose, split, un-permute, ...).
Stacked (scanned) targets have a leading layer axis; a rule whose source has `{layer}` fills one slice.

`load` streams source tensors one at a time into the target arrays and, in strict mode, raises one
`CheckpointMismatch` that lists every missing, unexpected and mis-shaped key at once; a key whose values
are not floating point where the model has floats (integers, booleans) is refused in every mode, as a
cast would turn quantized codes or ids into wrong weights without a word. `check_output` is every
converter's guard for the folder it writes.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Callable, Iterable, Iterator

import jax
import numpy as np
from flax import nnx

from ltu_jax import model_folder


def identity(array: np.ndarray) -> np.ndarray:
  return array


def transpose(array: np.ndarray) -> np.ndarray:
  """PyTorch Linear `[out, in]` → Flax kernel `[in, out]`."""
  return np.ascontiguousarray(array.T)


@dataclasses.dataclass(frozen=True)
class Permute:
  """Reorders axes (`numpy.transpose(array, axes)`), e.g. a PyTorch Conv2d `[out, in, h, w]` → Flax
  `[h, w, in, out]` with `(2, 3, 1, 0)`; `export` writes it back with `inverse`."""

  axes: tuple[int, ...]

  def __call__(self, array: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.transpose(array, self.axes))

  @property
  def inverse(self) -> "Permute":
    return Permute(tuple(int(axis) for axis in np.argsort(self.axes)))


@dataclasses.dataclass(frozen=True)
class Rule:
  """Maps source keys matching `source` onto the parameter at `target` (None: a key to drop)."""

  source: str
  target: str | None
  transform: Callable[[np.ndarray], np.ndarray] = identity

  @property
  def pattern(self) -> re.Pattern[str]:
    parts = re.split(r"(\{layer\})", self.source)
    return re.compile("".join("(?P<layer>[0-9]+)" if p == "{layer}" else re.escape(p) for p in parts) + r"\Z")

  @property
  def layered(self) -> bool:
    return "{layer}" in self.source


class CheckpointMismatch(ValueError):
  """A checkpoint whose keys or shapes do not fit the model, with every problem listed."""

  def __init__(
    self, source: str, missing: list[str], unexpected: list[str], misshaped: list[str], mistyped: list[str] = ()
  ):
    self.missing, self.unexpected, self.misshaped, self.mistyped = missing, unexpected, misshaped, list(mistyped)
    lines = [f"{source} does not match the model:"]
    for title, keys in (
      ("missing", missing), ("unexpected", unexpected), ("wrong shape", misshaped), ("wrong dtype", self.mistyped)
    ):
      if keys:
        lines.append(f"  {len(keys)} {title}:")
        lines.extend(f"    {k}" for k in keys)
    super().__init__("\n".join(lines))


def path_str(path: tuple) -> str:
  return ".".join(str(p) for p in path)


def is_floating(dtype: np.dtype) -> bool:
  """numpy's floats and ml_dtypes' (bfloat16, float8_*: numpy files those under kind "V")."""
  dtype = np.dtype(dtype)
  return dtype.kind == "f" or (dtype.kind == "V" and dtype.name.startswith(("bfloat", "float")))


def load(
  tensors: Iterable[tuple[str, np.ndarray]],
  rules: Iterable[Rule],
  state: nnx.State,
  *,
  source: str = "checkpoint",
  strict: bool = True,
  keep: Callable[[str], bool] = lambda path: False,
  allocate: Callable[[str, tuple[int, ...], np.dtype], np.ndarray] | None = None,
) -> nnx.State:
  """Fills `state` (abstract or concrete) from `(key, array)` pairs according to `rules`.

  Args:
    tensors: source tensors, consumed one at a time.
    rules: the format's table.
    state: our model's state; its shapes and dtypes are the targets (arrays are cast to them).
    source: names the checkpoint in error messages (a path).
    strict: raise on any missing, unexpected or mis-shaped key; else leave missing targets as in
      `state` (which must then be concrete) and ignore unexpected keys.
    keep: target paths that the checkpoint is not expected to hold and that keep their `state`
      value (fresh LoRA adapters on a base model).
    allocate: `(target path, shape, dtype)` → the array to fill for that target; `numpy.empty` by
      default. A converter passes file-backed arrays (`numpy.lib.format.open_memmap`) so that the
      filled targets are page cache the kernel can write out and reclaim, not anonymous memory: the
      peak then follows the largest tensor rather than the model.
  Returns:
    A state of numpy arrays with the structure of `state`.
  """
  if allocate is None:
    allocate = lambda path, shape, dtype: np.empty(shape, dtype)
  rules = list(rules)
  compiled = [(rule, rule.pattern) for rule in rules]
  flat = {path_str(path): var for path, var in nnx.to_flat_state(state)}
  for rule in rules:
    if rule.target is not None and rule.target not in flat:
      raise KeyError(f"rule for {rule.source!r} targets {rule.target!r}, which the model does not have")
  out: dict[str, np.ndarray] = {}
  filled: dict[str, np.ndarray] = {}
  unexpected: list[str] = []
  misshaped: list[str] = []
  mistyped: list[str] = []
  reported: set[tuple[str, int | None]] = set()  # mis-shaped or mis-typed targets, not to be listed again as missing

  for key, array in tensors:
    matched = False
    for rule, pattern in compiled:
      m = pattern.match(key)
      if m is None:
        continue
      matched = True
      if rule.target is None:
        continue
      var = flat[rule.target]
      shape, dtype = var.shape, var.dtype
      layer = int(m["layer"]) if rule.layered else None
      if layer is not None and layer >= shape[0]:
        unexpected.append(f"{key} (the model has {shape[0]} layers)")
        continue
      array = np.asarray(array)
      if is_floating(dtype) and not is_floating(array.dtype):
        mistyped.append(f"{key}: {array.dtype.name}, expected floating point for {rule.target} ({np.dtype(dtype).name})")
        reported.add((rule.target, layer))
        continue
      value = rule.transform(array)
      expected = shape if layer is None else shape[1:]
      if value.shape != expected:
        got = f"{tuple(array.shape)}" + (f" (as {tuple(value.shape)})" if value.shape != array.shape else "")
        misshaped.append(f"{key}: {got}, expected {tuple(expected)} for {rule.target}")
        reported.add((rule.target, layer))
        continue
      if rule.target not in out:
        out[rule.target] = allocate(rule.target, shape, dtype)
        filled[rule.target] = np.zeros(shape[0] if rule.layered else (), bool)
      if layer is None:
        out[rule.target][...] = value  # cast to the target dtype on the way in
        filled[rule.target][...] = True
      else:
        out[rule.target][layer] = value
        filled[rule.target][layer] = True
    if not matched:
      unexpected.append(key)

  missing: list[str] = []
  for path, var in flat.items():
    if keep(path) or (path in filled and filled[path].all()):
      continue
    if (path, None) in reported:
      continue
    layers_done = filled.get(path, np.zeros(var.shape[:1], bool)).copy()
    for target, layer in reported:
      if target == path and layer is not None:
        layers_done[layer] = True
    missing.extend(_expected_sources(rules, path, layers_done))
  if mistyped or (strict and (missing or unexpected or misshaped)):
    # Without `strict` only wrong dtypes stop the load: the other lists are what it lets pass.
    if not strict:
      missing, unexpected, misshaped = [], [], []
    raise CheckpointMismatch(source, missing, unexpected, misshaped, mistyped)

  def value_of(path: tuple, var: nnx.Variable) -> nnx.Variable:
    name = path_str(path)
    if name in out and filled[name].all():
      return var.replace(out[name])
    if isinstance(var.get_value(), jax.ShapeDtypeStruct):
      raise CheckpointMismatch(source, [name], [], [])
    return var.replace(np.asarray(var.get_value()))

  return nnx.from_flat_state([(path, value_of(path, var)) for path, var in nnx.to_flat_state(state)])


class OutputRefused(FileExistsError):
  """An output path that a conversion will not write: it would mix with, replace or land in other files."""


# What `model_folder.save` writes into a folder (the tokenizer's files besides these are its own choice).
MODEL_FOLDER_FILES = (model_folder.CONFIG_FILE, model_folder.PARAMS_DIR, *model_folder.TOKENIZER_FILES)


def check_output(
  out: str | os.PathLike,
  sources: Iterable[str | os.PathLike | None],
  *,
  force: bool = False,
  writes: Iterable[str] = MODEL_FOLDER_FILES,
) -> None:
  """Refuses, before any work, an output folder whose writing would lose something: one equal to or inside
  any of `sources`, a file, a folder that already holds any of the names it `writes`, or, without
  `force`, any other non-empty folder. With `force` a non-empty folder is written into and its other
  files are kept. Paths are compared after resolving links, so another spelling does not get past.
  """
  out = os.fspath(out)
  real = os.path.realpath(out)
  for source in sources:
    if source is None:
      continue
    source_real = os.path.realpath(source)
    if real == source_real or real.startswith(source_real.rstrip(os.sep) + os.sep):
      raise OutputRefused(
        f"output {out} is {'the source' if real == source_real else 'inside the source'} {os.fspath(source)}; "
        "a conversion never writes into or over what it reads: choose another output folder"
      )
  if not os.path.exists(out):
    return
  if not os.path.isdir(out):
    raise OutputRefused(f"output {out} is a file; the output must be a new folder")
  entries = sorted(os.listdir(out))
  taken = [name for name in writes if name in entries]
  if taken:
    raise OutputRefused(
      f"output {out} already holds {', '.join(taken)}, which the conversion would replace; choose a new folder, "
      "or move them away first"
    )
  if entries and not force:
    shown = ", ".join(entries[:3]) + (f" and {len(entries) - 3} more" if len(entries) > 3 else "")
    raise OutputRefused(
      f"output {out} is not empty (it holds {shown}); choose a new folder, or pass --force to write beside "
      "those files (they are kept)"
    )


def _expected_sources(rules: list[Rule], target: str, layers_done: np.ndarray) -> Iterator[str]:
  """The source keys that would have filled `target` (or the target itself if no rule names it)."""
  sources = [rule for rule in rules if rule.target == target]
  if not sources:
    yield f"{target} (no rule maps a checkpoint key to it)"
  for rule in sources:
    if rule.layered:
      yield from (rule.source.format(layer=i) for i, done in enumerate(layers_done) if not done)
    else:
      yield rule.source


def linear_rules(source: str, target: str, bias: bool = True) -> Iterator[Rule]:
  """A PyTorch `nn.Linear` at `source` onto an `nnx.Linear` at `target`."""
  yield Rule(f"{source}.weight", f"{target}.kernel", transpose)
  if bias:
    yield Rule(f"{source}.bias", f"{target}.bias")


def layer_norm_rules(source: str, target: str) -> Iterator[Rule]:
  """A PyTorch `nn.LayerNorm` at `source` onto an `nnx.LayerNorm` at `target`."""
  yield Rule(f"{source}.weight", f"{target}.scale")
  yield Rule(f"{source}.bias", f"{target}.bias")


def nested(table: Iterable[Rule], target_prefix: str) -> tuple[Rule, ...]:
  """The same rules for a model held as a submodule (`target_prefix`, e.g. "llm.")."""
  return tuple(
    dataclasses.replace(rule, target=None if rule.target is None else target_prefix + rule.target) for rule in table
  )


_INVERSES: dict[Callable, Callable] = {identity: identity, transpose: transpose}


def export(state: nnx.State, table: Iterable[Rule]) -> Iterator[tuple[str, np.ndarray]]:
  """The way back: `(source key, array)` for every rule of `table`, one layer slice at a time.

  Only rules whose transform is invertible here (identity, transpose, `Permute`) can be exported.
  """
  flat = {path_str(path): var for path, var in nnx.to_flat_state(state)}
  for rule in table:
    if rule.target is None:
      continue
    invert = rule.transform.inverse if isinstance(rule.transform, Permute) else _INVERSES.get(rule.transform)
    if invert is None:
      raise ValueError(f"cannot export {rule.source!r}: its transform {rule.transform.__name__} has no inverse")
    if rule.target not in flat:
      raise KeyError(f"the model has no {rule.target!r} to export as {rule.source!r}")
    value = np.asarray(flat[rule.target].get_value())
    if rule.layered:
      for layer in range(value.shape[0]):
        yield rule.source.format(layer=layer), invert(value[layer])
    else:
      yield rule.source, invert(value)
