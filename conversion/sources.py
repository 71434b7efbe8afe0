"""Readers of checkpoint files: each yields `(key, numpy array)` one tensor at a time, so the peak memory of
a conversion follows its largest tensor, not the checkpoint. Every error names the file it is about.

bfloat16 tensors come out as `ml_dtypes.bfloat16` arrays (numpy's own dtypes cannot hold them), which
`conversion.rules.load` casts exactly to the target dtype.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import zipfile
from typing import Any, Iterator

import ml_dtypes
import numpy as np

Tensors = Iterator[tuple[str, np.ndarray]]

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_BIN = "pytorch_model.bin"
TORCH_BIN_INDEX = "pytorch_model.bin.index.json"


def require_file(path: str | os.PathLike, what: str = "checkpoint file") -> str:
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{what} not found: {path}")
  return path


def torch_to_numpy(tensor: Any) -> np.ndarray:
  """A CPU `torch.Tensor` as numpy, sharing its memory; bfloat16 is reinterpreted bit for bit."""
  import torch

  if tensor.dtype == torch.bfloat16:
    return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
  return tensor.numpy()


def iter_safetensors(path: str | os.PathLike) -> Tensors:
  """Tensors of one `.safetensors` file, in the file's key order (a missing file raises at once)."""
  return _safetensors_tensors(require_file(path))


def _safetensors_tensors(path: str) -> Tensors:
  from safetensors import SafetensorError, safe_open

  try:
    with contextlib.ExitStack() as stack:
      file = stack.enter_context(safe_open(path, framework="np"))
      keys = list(file.keys())
      # numpy has no bfloat16: those tensors are read through torch (only imported when needed).
      bf16 = {key for key in keys if file.get_slice(key).get_dtype() == "BF16"}
      as_torch = stack.enter_context(safe_open(path, framework="pt")) if bf16 else None
      for key in keys:
        yield key, torch_to_numpy(as_torch.get_tensor(key)) if key in bf16 else file.get_tensor(key)
  except SafetensorError as error:
    raise ValueError(f"cannot read safetensors file {path}: {error}") from error


def read_torch_file(path: str | os.PathLike) -> Any:
  """The object in a `torch.save` file, loaded with `weights_only=True` (tensors, containers, plain values).

  Zip-format files (every torch ≥ 1.6 save) are memory-mapped, so tensors are read from disk when used.
  A file that needs pickled code (custom classes) is refused: unpickling it could run arbitrary code.
  """
  import torch

  path = require_file(path)
  try:
    return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
  except pickle.UnpicklingError as error:
    reason = str(error).split("WeightsUnpickler error:")[-1].strip().splitlines()[0].split(" Please use")[0]
    raise ValueError(
      f"{path} holds pickled Python objects besides tensors ({reason}); refusing to unpickle code, "
      "only tensors, containers and plain values are read (weights_only=True)"
    ) from error
  except (RuntimeError, KeyError, EOFError, OSError) as error:
    raise ValueError(f"cannot read PyTorch checkpoint {path}: {error!r}") from error


def iter_state_dict(state: Any, path: str | os.PathLike) -> Tensors:
  """Tensors of a loaded state dict (`{key: tensor}`); `path` names the file in errors."""
  import torch

  if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
    entries = sorted(state)[:10] if isinstance(state, dict) else type(state).__name__
    raise ValueError(f"{os.fspath(path)} is not a state dict of tensors (it holds {entries})")
  return ((key, torch_to_numpy(tensor)) for key, tensor in state.items())


def iter_torch_file(path: str | os.PathLike) -> Tensors:
  """Tensors of a `torch.save`d state dict (`pytorch_model.bin`, a `.pt` of `{key: tensor}`)."""
  return iter_state_dict(read_torch_file(path), path)


def hf_weight_files(folder: str | os.PathLike) -> list[str]:
  """The weight files of a Hugging Face model folder, safetensors preferred, shards in index order."""
  folder = os.fspath(folder)
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"model folder not found: {folder}")
  for single, index in ((SAFETENSORS, SAFETENSORS_INDEX), (TORCH_BIN, TORCH_BIN_INDEX)):
    if os.path.isfile(os.path.join(folder, single)):
      return [os.path.join(folder, single)]
    index_path = os.path.join(folder, index)
    if os.path.isfile(index_path):
      with open(index_path) as f:
        weight_map = json.load(f).get("weight_map")
      if not isinstance(weight_map, dict):
        raise ValueError(f"{index_path} has no 'weight_map' from tensor names to shard files")
      shards = [os.path.join(folder, name) for name in dict.fromkeys(weight_map.values())]
      absent = [shard for shard in shards if not os.path.isfile(shard)]
      if absent:
        raise FileNotFoundError(f"{index_path} lists shards that are missing: {absent}")
      return shards
  raise FileNotFoundError(
    f"{folder} holds no Hugging Face weights: expected {SAFETENSORS}, {SAFETENSORS_INDEX} (sharded), "
    f"{TORCH_BIN} or {TORCH_BIN_INDEX} (sharded)"
  )


def iter_file(path: str | os.PathLike) -> Tensors:
  """Tensors of one weight file, by its extension (`.safetensors`, else a `torch.save` file)."""
  return iter_safetensors(path) if os.fspath(path).endswith(".safetensors") else iter_torch_file(path)


def iter_hf_folder(folder: str | os.PathLike) -> Tensors:
  """Tensors of a Hugging Face model folder (`save_pretrained` output), shard after shard."""
  paths = hf_weight_files(folder)
  return (item for path in paths for item in iter_file(path))
