"""One name-mapping mechanism for every checkpoint format.

A format is a table of `Rule`s: a source key pattern (`{layer}` stands for a layer index), the dotted
path of the target parameter in our model, and a transform (transpose, split, un-permute, ...).
Stacked (scanned) targets have a leading layer axis; a rule whose source has `{layer}` fills one slice.

`load` streams source tensors one at a time into the target arrays and, in strict mode, raises one
`CheckpointMismatch` that lists every missing, unexpected and mis-shaped key at once.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Iterable, Iterator

import jax
import numpy as np
from flax import nnx


def identity(array: np.ndarray) -> np.ndarray:
  return array


def transpose(array: np.ndarray) -> np.ndarray:
  """PyTorch Linear `[out, in]` → Flax kernel `[in, out]`."""
  return np.ascontiguousarray(array.T)


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

  def __init__(self, source: str, missing: list[str], unexpected: list[str], misshaped: list[str]):
    self.missing, self.unexpected, self.misshaped = missing, unexpected, misshaped
    lines = [f"{source} does not match the model:"]
    for title, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshaped)):
      if keys:
        lines.append(f"  {len(keys)} {title}:")
        lines.extend(f"    {k}" for k in keys)
    super().__init__("\n".join(lines))


def path_str(path: tuple) -> str:
  return ".".join(str(p) for p in path)


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
  reported: set[tuple[str, int | None]] = set()  # mis-shaped targets, not to be listed again as missing

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
      array = np.asarray(array)
      value = rule.transform(array)
      got = f"{tuple(array.shape)}" + (f" (as {tuple(value.shape)})" if value.shape != array.shape else "")
      if rule.layered:
        layer = int(m["layer"])
        if layer >= shape[0]:
          unexpected.append(f"{key} (the model has {shape[0]} layers)")
          continue
        if value.shape != shape[1:]:
          misshaped.append(f"{key}: {got}, expected {tuple(shape[1:])} for {rule.target}")
          reported.add((rule.target, layer))
          continue
        if rule.target not in out:
          out[rule.target] = allocate(rule.target, shape, dtype)
          filled[rule.target] = np.zeros(shape[0], bool)
        out[rule.target][layer] = value
        filled[rule.target][layer] = True
      else:
        if value.shape != shape:
          misshaped.append(f"{key}: {got}, expected {tuple(shape)} for {rule.target}")
          reported.add((rule.target, None))
          continue
        if rule.target not in out:
          out[rule.target] = allocate(rule.target, shape, dtype)
        out[rule.target][...] = value  # cast to the target dtype on the way in
        filled[rule.target] = np.ones((), bool)
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
  if strict and (missing or unexpected or misshaped):
    raise CheckpointMismatch(source, missing, unexpected, misshaped)

  def value_of(path: tuple, var: nnx.Variable) -> nnx.Variable:
    name = path_str(path)
    if name in out and filled[name].all():
      return var.replace(out[name])
    if isinstance(var.get_value(), jax.ShapeDtypeStruct):
      raise CheckpointMismatch(source, [name], [], [])
    return var.replace(np.asarray(var.get_value()))

  return nnx.from_flat_state([(path, value_of(path, var)) for path, var in nnx.to_flat_state(state)])


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

  Only rules whose transform is invertible here (identity, transpose) can be exported.
  """
  flat = {path_str(path): var for path, var in nnx.to_flat_state(state)}
  for rule in table:
    if rule.target is None:
      continue
    if rule.transform not in _INVERSES:
      raise ValueError(f"cannot export {rule.source!r}: its transform {rule.transform.__name__} has no inverse")
    if rule.target not in flat:
      raise KeyError(f"the model has no {rule.target!r} to export as {rule.source!r}")
    value = np.asarray(flat[rule.target].get_value())
    invert = _INVERSES[rule.transform]
    if rule.layered:
      for layer in range(value.shape[0]):
        yield rule.source.format(layer=layer), invert(value[layer])
    else:
      yield rule.source, invert(value)
