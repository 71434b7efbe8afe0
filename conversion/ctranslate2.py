"""CTranslate2 (faster-whisper) model folders: the `model.bin` reader and the Whisper table.

`model.bin` (binary versions 4 to 6), little-endian:

    u32 binary_version | str spec_name | u32 spec_revision | u32 n_vars
    n_vars × { str name | u8 rank | rank × u32 shape | u8 dtype_id | u32 nbytes | nbytes raw bytes }
    u32 n_aliases × { str alias | str target }

where `str` is a u16 length (counting a trailing NUL), the UTF-8 bytes and the NUL. Besides weights the
file holds the spec's scalar attributes as integer variables (`encoder/num_heads`, `decoder/activation`,
...). Quantized weights are integer arrays with a float `<name>_scale` beside them.

Names map straight onto our Whisper paths: CTranslate2 fuses self-attention q, k, v into one `linear_0`
(split in 3 along the output axis) and cross-attention k, v into `linear_1` (split in 2).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import struct
from typing import Callable

import ml_dtypes
import numpy as np

from conversion.hf_whisper import conv_kernel
from conversion.rules import Rule, identity, transpose
from conversion.sources import Tensors, require_file
from ltu_jax.models.whisper import WhisperConfig

MODEL_FILE = "model.bin"
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
BINARY_VERSIONS = range(4, 7)  # from 4 on, each variable records its dtype id and byte count
DTYPES = {
  0: np.dtype(np.float32),
  1: np.dtype(np.int8),
  2: np.dtype(np.int16),
  3: np.dtype(np.int32),
  4: np.dtype(np.float16),
  5: np.dtype(ml_dtypes.bfloat16),
}
SCALE_SUFFIX = "_scale"


@dataclasses.dataclass(frozen=True)
class Variable:
  """Where one variable's bytes lie in the file."""

  shape: tuple[int, ...]
  dtype: np.dtype
  offset: int


@dataclasses.dataclass(frozen=True)
class Header:
  """Everything in `model.bin` but the weights' bytes, and reads of single variables."""

  path: str
  spec: str
  spec_revision: int
  variables: dict[str, Variable]
  aliases: dict[str, str]

  def raw(self, name: str) -> np.ndarray:
    """One variable as stored (integers stay integers)."""
    variable = self.variables[name]
    with open(self.path, "rb") as file:
      file.seek(variable.offset)
      return np.fromfile(file, variable.dtype, math.prod(variable.shape)).reshape(variable.shape)

  def scalar(self, name: str) -> int | None:
    """The value of an integer spec attribute such as `encoder/num_heads`, None if the file lacks it."""
    return int(self.raw(name)) if name in self.variables else None

  def weight(self, name: str) -> np.ndarray:
    """A variable, quantized integers dequantized as CTranslate2 does: `q / scale` in float32.

    The scale is per output row (int8) or one number (int16). An integer weight without a scale, or of
    another integer type (packed 4-bit), cannot be dequantized exactly and is refused; integer spec
    attributes pass through.
    """
    array = self.raw(name)
    if not np.issubdtype(array.dtype, np.integer):
      return array
    scale_name = name + SCALE_SUFFIX
    if scale_name in self.variables and array.dtype in (np.int8, np.int16):
      scale = self.raw(scale_name).astype(np.float32)
      return array.astype(np.float32) / scale.reshape(scale.shape + (1,) * (array.ndim - scale.ndim))
    if name.endswith("weight") or scale_name in self.variables:
      raise ValueError(
        f"{self.path}: variable {name} is quantized as {array.dtype.name} in a way that cannot be "
        "dequantized exactly; convert the model with CTranslate2 quantization float32, float16 or bfloat16"
      )
    return array

  def tensors(self) -> Tensors:
    """`(name, array)` for every variable in file order, one at a time, then every alias under its own
    name (with its target's value). Quantization scales are folded into their weights, not yielded."""
    names = [name for name in self.variables if not self.is_scale(name)] + list(self.aliases)
    return ((name, self.weight(self.aliases.get(name, name))) for name in names)

  def is_scale(self, name: str) -> bool:
    return name.endswith(SCALE_SUFFIX) and name[: -len(SCALE_SUFFIX)] in self.variables


class _Reader:
  """Sequential little-endian reads of the header, with errors naming the file."""

  def __init__(self, file, path: str):
    self.file, self.path = file, path

  def unpack(self, fmt: str) -> tuple:
    size = struct.calcsize("<" + fmt)
    data = self.file.read(size)
    if len(data) != size:
      raise ValueError(f"{self.path} ends early: truncated or not a CTranslate2 model.bin")
    return struct.unpack("<" + fmt, data)

  def string(self) -> str:
    (length,) = self.unpack("H")
    return self.file.read(length)[:-1].decode("utf-8")


def read_header(path: str | os.PathLike) -> Header:
  """Reads names, shapes, dtypes and offsets, seeking over the weights (nothing large is read)."""
  path = require_file(path, "CTranslate2 model file")
  variables: dict[str, Variable] = {}
  with open(path, "rb") as file:
    reader = _Reader(file, path)
    (version,) = reader.unpack("I")
    if version not in BINARY_VERSIONS:
      raise ValueError(
        f"{path}: CTranslate2 binary version {version} is not supported (expected "
        f"{BINARY_VERSIONS.start} to {BINARY_VERSIONS.stop - 1}); re-convert it with CTranslate2 ≥ 3"
      )
    spec = reader.string()
    (revision, count) = reader.unpack("II")
    for _ in range(count):
      name = reader.string()
      (rank,) = reader.unpack("B")
      shape = reader.unpack(f"{rank}I")
      dtype_id, nbytes = reader.unpack("BI")
      if dtype_id not in DTYPES:
        raise ValueError(f"{path}: variable {name} has dtype id {dtype_id}, which is not one CTranslate2 defines")
      dtype = DTYPES[dtype_id]
      if nbytes != dtype.itemsize * math.prod(shape):
        raise ValueError(f"{path}: variable {name} has {nbytes} bytes for shape {shape} of {dtype.name}")
      variables[name] = Variable(tuple(shape), dtype, file.tell())
      file.seek(nbytes, os.SEEK_CUR)
    (alias_count,) = reader.unpack("I")
    aliases: dict[str, str] = {}
    for _ in range(alias_count):
      alias = reader.string()
      aliases[alias] = reader.string()
  missing = sorted({target for target in aliases.values() if target not in variables})
  if missing:
    raise ValueError(f"{path}: aliases point at variables the file lacks: {missing}")
  return Header(path, spec, revision, variables, aliases)


def iter_ctranslate2(path: str | os.PathLike) -> Tensors:
  """The tensors of a `model.bin`, streamed (see `Header.tensors`)."""
  return read_header(path).tensors()


Transform = Callable[[np.ndarray], np.ndarray]


def rows(index: int, count: int, then: Transform = identity) -> Transform:
  """A transform taking the `index`-th of `count` row blocks of a fused projection, then `then`.

  Uneven blocks are taken as they come, so a mis-sized fused tensor is reported as mis-shaped.
  """

  def take(array: np.ndarray) -> np.ndarray:
    return then(np.array_split(array, count)[index])

  return take


def _linear(source: str, target: str, bias: bool = True) -> list[Rule]:
  table = [Rule(f"{source}/weight", f"{target}.kernel", transpose)]
  return table + [Rule(f"{source}/bias", f"{target}.bias")] if bias else table


def _layer_norm(source: str, target: str) -> list[Rule]:
  return [Rule(f"{source}/gamma", f"{target}.scale"), Rule(f"{source}/beta", f"{target}.bias")]


def _fused(source: str, targets: tuple[str, ...]) -> list[Rule]:
  """A fused projection onto several of ours; the key projection's bias block is not taken: a bias on
  keys adds the same `q · b` to every score of a query, which softmax cancels, so it is dropped exactly."""
  table = []
  for index, target in enumerate(targets):
    table.append(Rule(f"{source}/weight", f"{target}.kernel", rows(index, len(targets), transpose)))
    if not target.endswith("k_proj"):
      table.append(Rule(f"{source}/bias", f"{target}.bias", rows(index, len(targets))))
  return table


# Spec attributes the file stores as integer variables, and the values our Whisper implements
# (None: any value; the head counts are read into the config).
ATTRIBUTES: dict[str, int | None] = {
  "encoder/num_heads": None,
  "decoder/num_heads": None,
  "decoder/activation": 3,  # CTranslate2's ActivationType::GELU, the exact (erf) GELU
  "decoder/pre_norm": 1,
  "decoder/scale_embeddings": 0,
  "decoder/alibi": 0,
  "decoder/start_from_zero_embedding": 0,
  "decoder/alignment_heads": None,  # for word timestamps, unused here
  "decoder/alignment_layer": None,
}


def whisper_rules() -> tuple[Rule, ...]:
  """The table for a CTranslate2 `WhisperSpec` onto `ltu_jax.models.whisper.Whisper`."""
  table: list[Rule] = [Rule(name, None) for name in ATTRIBUTES]
  for side in ("encoder", "decoder"):
    block, ours = f"{side}/layer_{{layer}}", f"{side}.layers"
    table.append(Rule(f"{side}/position_encodings/encodings", f"{side}.embed_positions"))
    table += _layer_norm(f"{side}/layer_norm", f"{side}.layer_norm")
    table += _layer_norm(f"{block}/self_attention/layer_norm", f"{ours}.self_attn_layer_norm")
    qkv = tuple(f"{ours}.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj"))
    table += _fused(f"{block}/self_attention/linear_0", qkv)
    table += _linear(f"{block}/self_attention/linear_1", f"{ours}.self_attn.out_proj")
    table += _layer_norm(f"{block}/ffn/layer_norm", f"{ours}.final_layer_norm")
    table += _linear(f"{block}/ffn/linear_0", f"{ours}.fc1")
    table += _linear(f"{block}/ffn/linear_1", f"{ours}.fc2")
  block = "decoder/layer_{layer}/attention"
  table += _layer_norm(f"{block}/layer_norm", "decoder.layers.encoder_attn_layer_norm")
  table += _linear(f"{block}/linear_0", "decoder.layers.encoder_attn.q_proj")
  table += _fused(f"{block}/linear_1", ("decoder.layers.encoder_attn.k_proj", "decoder.layers.encoder_attn.v_proj"))
  table += _linear(f"{block}/linear_2", "decoder.layers.encoder_attn.out_proj")
  for conv in ("conv1", "conv2"):
    table += [
      Rule(f"encoder/{conv}/weight", f"encoder.{conv}.kernel", conv_kernel),
      Rule(f"encoder/{conv}/bias", f"encoder.{conv}.bias"),
    ]
  table.append(Rule("decoder/embeddings/weight", "decoder.embed_tokens.embedding"))
  # The output projection is an alias of the token embedding: our logits use `embed_tokens.attend`.
  table.append(Rule("decoder/projection/weight", None))
  return tuple(table)


RULES = whisper_rules()

# OpenAI's released sizes (tiny … large): every one has 64-dimensional heads.
HEADS_BY_WIDTH = {384: 6, 512: 8, 768: 12, 1024: 16, 1280: 20}


def whisper_config(header: Header) -> WhisperConfig:
  """Our config from the tensors' shapes and the spec's attributes (head counts; where a file lacks them,
  OpenAI's sizes by width). Attributes our Whisper does not implement are refused."""
  if header.spec != "WhisperSpec":
    raise ValueError(f"{header.path} holds a CTranslate2 {header.spec}, not a WhisperSpec")
  wrong = {
    name: value
    for name, want in ATTRIBUTES.items()
    if want is not None and (value := header.scalar(name)) is not None and value != want
  }
  if wrong:
    raise ValueError(f"{header.path}: unsupported Whisper variant, attributes {wrong} (expected {ATTRIBUTES})")

  def shape(name: str) -> tuple[int, ...]:
    if name not in header.variables:
      raise ValueError(f"{header.path} has no variable {name}; is it a Whisper model?")
    return header.variables[name].shape

  def layers(side: str) -> int:
    found = {int(m[1]) for name in header.variables if (m := re.match(rf"{side}/layer_(\d+)/", name))}
    return len(found)

  d_model, num_mel_bins, _ = shape("encoder/conv1/weight")

  def heads(side: str) -> int:
    stored = header.scalar(f"{side}/num_heads")
    if stored is not None:
      return stored
    if d_model not in HEADS_BY_WIDTH:
      raise ValueError(f"{header.path} stores no {side}/num_heads and d_model {d_model} is not an OpenAI size")
    return HEADS_BY_WIDTH[d_model]

  return WhisperConfig(
    num_mel_bins=num_mel_bins,
    d_model=d_model,
    encoder_layers=layers("encoder"),
    encoder_attention_heads=heads("encoder"),
    encoder_ffn_dim=shape("encoder/layer_0/ffn/linear_0/weight")[0],
    decoder_layers=layers("decoder"),
    decoder_attention_heads=heads("decoder"),
    decoder_ffn_dim=shape("decoder/layer_0/ffn/linear_0/weight")[0],
    vocab_size=shape("decoder/embeddings/weight")[0],
    max_source_positions=shape("encoder/position_encodings/encodings")[0],
    max_target_positions=shape("decoder/position_encodings/encodings")[0],
  )


def read_settings(folder: str | os.PathLike) -> dict:
  """The folder's `config.json` (faster-whisper: `suppress_ids`, `suppress_ids_begin`, `lang_ids`, ...)."""
  path = require_file(os.path.join(folder, CONFIG_FILE), "CTranslate2 config file")
  with open(path) as f:
    return json.load(f)


def is_folder(folder: str | os.PathLike) -> bool:
  return os.path.isfile(os.path.join(folder, MODEL_FILE))


def iter_folder(folder: str | os.PathLike) -> tuple[WhisperConfig, Tensors]:
  """The config and tensors of a CTranslate2 Whisper folder."""
  header = read_header(os.path.join(folder, MODEL_FILE))
  return whisper_config(header), header.tensors()
