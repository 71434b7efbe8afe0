"""The device mesh and the one table that maps logical axis names onto it.

Parameters name their axes ("embed", "mlp", "vocab", ...; stacked layers add "layers"). A rules table
maps each name to mesh axes (or None: replicated), so changing the parallelism is a config edit. The
mesh has three axes: "data" (batch), "fsdp" (batch, and parameters sharded ZeRO-3 style), "tensor"
(Megatron-style splits of heads, MLP and vocabulary).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

Rules = Sequence[tuple[str, str | tuple[str, ...] | None]]

DEFAULT_RULES: Rules = (
  ("batch", ("data", "fsdp")),
  ("length", None),
  ("layers", None),
  ("embed", "fsdp"),
  ("audio_embed", None),
  ("conv_in", None),
  ("mlp", "tensor"),
  ("heads", "tensor"),
  ("q_heads", "tensor"),
  ("kv_heads", "tensor"),
  ("vocab", "tensor"),
  ("lora_rank", None),
  ("norm", None),
)


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ("data", "fsdp", "tensor") mesh; one size may be -1 to take the remaining devices.

  Axes are `Auto` so that XLA propagates shardings through the model (classic GSPMD), as jit
  shardings with a rules table expect.
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = [data, fsdp, tensor]
  if sizes.count(-1) > 1:
    raise ValueError(f"at most one mesh axis may be -1, got data={data} fsdp={fsdp} tensor={tensor}")
  known = math.prod(s for s in sizes if s != -1)
  sizes = [len(devices) // known if s == -1 else s for s in sizes]
  if math.prod(sizes) != len(devices):
    raise ValueError(f"mesh data={sizes[0]} fsdp={sizes[1]} tensor={sizes[2]} does not use the {len(devices)} devices")
  return Mesh(np.array(devices).reshape(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules: Rules = DEFAULT_RULES) -> PartitionSpec:
  """The mesh partition of an array with logical axis `names`.

  A dimension that its mesh axes do not divide is replicated instead (9 heads on 2 tensor devices),
  and a mesh axis is used at most once per array.
  """
  table = dict(rules)
  used: set[str] = set()
  spec: list[Any] = []
  for name, size in zip(names, shape, strict=True):
    if name is None:
      spec.append(None)
      continue
    if name not in table:
      raise KeyError(f"logical axis {name!r} has no sharding rule; add it to the rules table")
    target = table[name]
    axes = () if target is None else (target,) if isinstance(target, str) else tuple(target)
    axes = tuple(a for a in axes if a not in used and mesh.shape[a] > 1)
    if not axes or size % math.prod(mesh.shape[a] for a in axes):
      spec.append(None)
      continue
    used.update(axes)
    spec.append(axes[0] if len(axes) == 1 else axes)
  return PartitionSpec(*spec)


def constrain(x: jax.Array, names: Sequence[str | None], rules: Rules = DEFAULT_RULES) -> jax.Array:
  """`x` sharded as its logical axes say on the mesh being traced for (`jax.sharding.use_abstract_mesh`);
  unchanged outside one. Activations need it: left alone, XLA may give them the parameters' fsdp
  sharding, so that every device holds every example's activations."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_spec(names, x.shape, mesh, rules))


def state_shardings(state: nnx.State, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> nnx.State:
  """A `NamedSharding` for every variable of `state` (abstract or concrete), from its logical axes."""

  def sharding(var: nnx.Variable) -> nnx.Variable:
    names = var.get_metadata().get("out_sharding") or (None,) * len(var.shape)
    return var.replace(NamedSharding(mesh, logical_to_spec(names, var.shape, mesh, rules)))

  return jax.tree.map(sharding, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
