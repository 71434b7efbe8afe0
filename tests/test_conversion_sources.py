"""Checkpoint readers: Hugging Face folders (safetensors / .bin, sharded or not), torch files, CTranslate2."""

from __future__ import annotations

import json
import struct

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from conversion import ctranslate2, sources


def random_tensors() -> dict[str, np.ndarray]:
  rng = np.random.default_rng(0)
  return {
    "model.a.weight": rng.standard_normal((4, 3)).astype(np.float32),
    "model.b.bias": rng.standard_normal(5).astype(np.float16),
    "model.c.weight": rng.standard_normal((2, 6)).astype(ml_dtypes.bfloat16),
    "lm_head.weight": rng.standard_normal((3, 3)).astype(np.float32),
  }


def as_torch(array: np.ndarray) -> torch.Tensor:
  if array.dtype == ml_dtypes.bfloat16:
    return torch.from_numpy(array.view(np.int16).copy()).view(torch.bfloat16)
  return torch.from_numpy(array.copy())


def save_safetensors(path, tensors: dict[str, np.ndarray]) -> None:
  """Through torch: safetensors' numpy writer has no bfloat16."""
  from safetensors.torch import save_file as save_torch

  save_torch({key: as_torch(value) for key, value in tensors.items()}, str(path))


def write_shards(folder, tensors: dict[str, np.ndarray], fmt: str) -> None:
  """Two shards and their index, as `save_pretrained(max_shard_size=...)` lays them out."""
  keys = list(tensors)
  shards = {f"model-0000{i + 1}-of-00002.{fmt}": keys[i::2] for i in range(2)}
  for name, shard_keys in shards.items():
    part = {key: tensors[key] for key in shard_keys}
    if fmt == "safetensors":
      save_safetensors(folder / name, part)
    else:
      torch.save({key: as_torch(value) for key, value in part.items()}, folder / name)
  index = sources.SAFETENSORS_INDEX if fmt == "safetensors" else sources.TORCH_BIN_INDEX
  weight_map = {key: name for name, shard_keys in shards.items() for key in shard_keys}
  (folder / index).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def assert_same(read, expected: dict[str, np.ndarray]) -> None:
  read = dict(read)
  assert sorted(read) == sorted(expected)
  for key, value in expected.items():
    assert read[key].dtype == value.dtype, key
    np.testing.assert_array_equal(read[key].view(np.uint8), value.view(np.uint8), err_msg=key)


@pytest.mark.parametrize("layout", ["safetensors", "safetensors_sharded", "bin", "bin_sharded"])
def test_hf_folder_layouts_read_exactly(tmp_path, layout):
  tensors = random_tensors()
  if layout == "safetensors":
    save_safetensors(tmp_path / sources.SAFETENSORS, tensors)
  elif layout == "bin":
    torch.save({key: as_torch(value) for key, value in tensors.items()}, tmp_path / sources.TORCH_BIN)
  else:
    write_shards(tmp_path, tensors, layout.split("_")[0])
  assert_same(sources.iter_hf_folder(tmp_path), tensors)


def test_safetensors_are_preferred_to_bin(tmp_path):
  tensors = random_tensors()
  save_safetensors(tmp_path / sources.SAFETENSORS, tensors)
  torch.save({"other": torch.zeros(1)}, tmp_path / sources.TORCH_BIN)
  assert sources.hf_weight_files(tmp_path) == [str(tmp_path / sources.SAFETENSORS)]


def test_plain_numpy_safetensors(tmp_path):
  tensors = {key: value for key, value in random_tensors().items() if value.dtype != ml_dtypes.bfloat16}
  save_file(tensors, tmp_path / "weights.safetensors")
  assert_same(sources.iter_safetensors(tmp_path / "weights.safetensors"), tensors)


class Payload:
  """A custom class: loading it would mean unpickling code."""


def test_pickled_code_is_refused(tmp_path):
  path = tmp_path / "evil.bin"
  torch.save({"weight": torch.zeros(2), "payload": Payload()}, path)
  with pytest.raises(ValueError, match="refusing to unpickle") as caught:
    sources.iter_torch_file(path)
  assert str(path) in str(caught.value) and "Payload" in str(caught.value)


def test_torch_file_that_is_not_a_state_dict(tmp_path):
  path = tmp_path / "nested.pt"
  torch.save({"dims": {"n_mels": 80}, "model_state_dict": {}}, path)
  with pytest.raises(ValueError, match="not a state dict of tensors") as caught:
    sources.iter_torch_file(path)
  assert str(path) in str(caught.value)


def test_legacy_torch_file_reads_without_mmap(tmp_path):
  path = tmp_path / "legacy.bin"
  torch.save({"w": torch.arange(3.0)}, path, _use_new_zipfile_serialization=False)
  np.testing.assert_array_equal(dict(sources.iter_torch_file(path))["w"], [0.0, 1.0, 2.0])


def test_corrupt_files_name_the_file(tmp_path):
  for name in ("broken.bin", "broken.safetensors"):
    (tmp_path / name).write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError) as caught:
      list(sources.iter_file(tmp_path / name))
    assert str(tmp_path / name) in str(caught.value)


def test_missing_files_and_folders_are_named(tmp_path):
  with pytest.raises(FileNotFoundError, match=str(tmp_path / "absent")):
    sources.iter_hf_folder(tmp_path / "absent")
  with pytest.raises(FileNotFoundError, match="model.safetensors.*pytorch_model.bin") as caught:
    sources.iter_hf_folder(tmp_path)
  assert str(tmp_path) in str(caught.value)
  with pytest.raises(FileNotFoundError, match=str(tmp_path / "absent.bin")):
    sources.iter_torch_file(tmp_path / "absent.bin")
  with pytest.raises(FileNotFoundError, match=str(tmp_path / "absent.safetensors")):
    sources.iter_safetensors(tmp_path / "absent.safetensors")
  write_shards(tmp_path, random_tensors(), "safetensors")
  (tmp_path / "model-00002-of-00002.safetensors").unlink()
  with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors"):
    sources.iter_hf_folder(tmp_path)


# CTranslate2 model.bin, written here from the format's description (conversion/ctranslate2.py).
CT2_DTYPE_IDS = {
  np.dtype(np.float32): 0,
  np.dtype(np.int8): 1,
  np.dtype(np.int16): 2,
  np.dtype(np.float16): 4,
  np.dtype(ml_dtypes.bfloat16): 5,
}


def ct2_string(text: str) -> bytes:
  data = text.encode() + b"\0"
  return struct.pack("<H", len(data)) + data


def write_ctranslate2(
  path, variables: dict[str, np.ndarray], aliases: dict[str, str], *, version: int = 6, dtype_ids=None
) -> None:
  out = struct.pack("<I", version) + ct2_string("WhisperSpec") + struct.pack("<II", 3, len(variables))
  for name, array in variables.items():
    dtype_id = (dtype_ids or {}).get(name, CT2_DTYPE_IDS[array.dtype])
    out += ct2_string(name) + struct.pack(f"<B{array.ndim}I", array.ndim, *array.shape)
    out += struct.pack("<BI", dtype_id, array.nbytes) + array.tobytes()
  out += struct.pack("<I", len(aliases))
  for alias, target in aliases.items():
    out += ct2_string(alias) + ct2_string(target)
  path.write_bytes(out)


def test_ctranslate2_round_trip(tmp_path):
  rng = np.random.default_rng(0)
  quantized = rng.integers(-127, 128, (4, 3)).astype(np.int8)
  scale = rng.uniform(50, 200, 4).astype(np.float32)
  variables = {
    "decoder/embeddings/weight": rng.standard_normal((6, 4)).astype(np.float16),
    "decoder/num_heads": np.array(2, np.int16),
    "decoder/pre_norm": np.array(1, np.int8),
    "encoder/conv1/weight": rng.standard_normal((4, 2, 3)).astype(np.float32),
    "encoder/conv1/bias": rng.standard_normal(4).astype(ml_dtypes.bfloat16),
    "encoder/layer_0/ffn/linear_0/weight": quantized,
    "encoder/layer_0/ffn/linear_0/weight_scale": scale,
  }
  path = tmp_path / "model.bin"
  write_ctranslate2(path, variables, {"decoder/projection/weight": "decoder/embeddings/weight"})

  header = ctranslate2.read_header(path)
  assert (header.spec, header.spec_revision) == ("WhisperSpec", 3)
  assert header.variables["encoder/conv1/weight"].shape == (4, 2, 3)
  assert header.scalar("decoder/num_heads") == 2 and header.scalar("encoder/num_heads") is None
  read = list(ctranslate2.iter_ctranslate2(path))
  # file order, scales folded into their weights, the alias last
  expected = [name for name in variables if not name.endswith("_scale")] + ["decoder/projection/weight"]
  assert [name for name, _ in read] == expected
  read = dict(read)
  for name in ("decoder/embeddings/weight", "encoder/conv1/weight", "encoder/conv1/bias", "decoder/num_heads"):
    assert read[name].dtype == variables[name].dtype, name
    np.testing.assert_array_equal(read[name], variables[name], err_msg=name)
  np.testing.assert_array_equal(read["decoder/projection/weight"], variables["decoder/embeddings/weight"])
  dequantized = read["encoder/layer_0/ffn/linear_0/weight"]
  assert dequantized.dtype == np.float32
  np.testing.assert_array_equal(dequantized, quantized.astype(np.float32) / scale[:, None])


def test_ctranslate2_refuses_what_it_cannot_read_exactly(tmp_path):
  path = tmp_path / "model.bin"
  write_ctranslate2(path, {"encoder/layer_0/ffn/linear_0/weight": np.ones((2, 2), np.int8)}, {})
  with pytest.raises(ValueError, match="encoder/layer_0/ffn/linear_0/weight is quantized as int8"):
    list(ctranslate2.iter_ctranslate2(path))

  write_ctranslate2(path, {"x/weight": np.ones(2, np.float32)}, {}, dtype_ids={"x/weight": 9})
  with pytest.raises(ValueError, match="x/weight has dtype id 9"):
    ctranslate2.read_header(path)

  write_ctranslate2(path, {"x/weight": np.ones(2, np.float32)}, {}, version=3)
  with pytest.raises(ValueError, match="binary version 3"):
    ctranslate2.read_header(path)

  write_ctranslate2(path, {"x/weight": np.ones(8, np.float32)}, {"y/weight": "z/weight"})
  with pytest.raises(ValueError, match="z/weight"):
    ctranslate2.read_header(path)

  path.write_bytes(path.read_bytes()[:40])
  with pytest.raises(ValueError, match=f"{path} ends early"):
    ctranslate2.read_header(path)

  with pytest.raises(FileNotFoundError, match=str(tmp_path / "absent.bin")):
    ctranslate2.read_header(tmp_path / "absent.bin")
