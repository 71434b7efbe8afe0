"""Parity of `ltu_jax.models.whisper` with transformers' PyTorch Whisper on identical random weights."""

from __future__ import annotations

import copy
import functools
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from jax.sharding import PartitionSpec as P

from conversion import hf_whisper
from conversion.rules import CheckpointMismatch
from ltu_jax import frontend
from ltu_jax.models import whisper
from tests.helpers import max_abs_diff, numpy_state_dict

HIDDEN_ATOL = 1e-5  # encoder block outputs, last_hidden_state, LTU-AS features
LOGITS_ATOL = 1e-4  # full-model logits
CACHE_ATOL = 1e-4  # KV-cache decoding against the full forward

SIZES = {
  # head_dim 16, equal depths, 80 mel bins (large-v1).
  "d64_h4": dict(
    d_model=64,
    encoder_attention_heads=4,
    decoder_attention_heads=4,
    encoder_layers=2,
    decoder_layers=2,
    encoder_ffn_dim=128,
    decoder_ffn_dim=256,
    num_mel_bins=80,
    vocab_size=100,
    max_source_positions=50,
    max_target_positions=32,
  ),
  # head_dim 32, uneven depths and MLP widths, 128 mel bins (large-v3).
  "d96_h3": dict(
    d_model=96,
    encoder_attention_heads=3,
    decoder_attention_heads=3,
    encoder_layers=3,
    decoder_layers=2,
    encoder_ffn_dim=160,
    decoder_ffn_dim=192,
    num_mel_bins=128,
    vocab_size=120,
    max_source_positions=40,
    max_target_positions=24,
  ),
}


def hf_whisper_model(sizes: dict, seed: int) -> transformers.WhisperForConditionalGeneration:
  """A random PyTorch Whisper; every weight (biases and LayerNorms too) is random so no term hides.

  Matrices get std 1/sqrt(fan_in) so activations stay O(1) at any width, as in a trained model, and the
  absolute tolerances mean the same for every config.
  """
  config = transformers.WhisperConfig(
    **sizes,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    decoder_start_token_id=3,
    attn_implementation="eager",
  )
  model = transformers.WhisperForConditionalGeneration(config).eval()
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, param in model.named_parameters():
      noise = torch.randn(param.shape, generator=generator)
      if name.endswith("layer_norm.weight"):
        param.copy_(1 + 0.1 * noise)
      elif "embed" in name or param.ndim == 1:
        param.copy_(0.1 * noise)
      else:
        param.copy_(noise / math.sqrt(param[0].numel()))
  return model


def torch_encoder(hf: transformers.WhisperForConditionalGeneration, mel: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """PyTorch last_hidden_state `[batch, frames, dim]` and every block's raw output `[layers, batch, frames, dim]`.

  HF's `output_hidden_states` starts with the embedding and applies the final LayerNorm to its last
  entry, so the raw block outputs are taken with forward hooks.
  """
  blocks = []
  hooks = [
    layer.register_forward_hook(lambda module, args, out: blocks.append(out[0] if isinstance(out, tuple) else out))
    for layer in hf.model.encoder.layers
  ]
  try:
    with torch.no_grad():
      last = hf.model.encoder(torch.from_numpy(mel)).last_hidden_state
  finally:
    for hook in hooks:
      hook.remove()
  return last.numpy(), np.stack([block.numpy() for block in blocks])


@nnx.jit
def encode(model: whisper.Whisper, mel: jax.Array) -> tuple[jax.Array, jax.Array]:
  return model.encode(mel)


@nnx.jit
def logits_of(model: whisper.Whisper, mel: jax.Array, input_ids: jax.Array) -> jax.Array:
  return model(mel, input_ids)


@nnx.jit
def cross_kv(model: whisper.Whisper, mel: jax.Array) -> tuple[jax.Array, jax.Array]:
  return model.decoder.cross_kv(model.encode(mel)[0])


@nnx.jit
def decode(model: whisper.Whisper, input_ids: jax.Array, kv, cache):
  return model.decoder(input_ids, kv, cache)


@dataclasses.dataclass
class Pair:
  hf: transformers.WhisperForConditionalGeneration
  ours: whisper.Whisper
  mel: np.ndarray  # [batch, n_mels, 2 * max_source_positions]
  input_ids: np.ndarray  # [batch, len]


@pytest.fixture(scope="module", params=sorted(SIZES))
def pair(request) -> Pair:
  sizes = SIZES[request.param]
  hf = hf_whisper_model(sizes, seed=1)
  rng = np.random.default_rng(2)
  mel = rng.standard_normal((2, sizes["num_mel_bins"], 2 * sizes["max_source_positions"]), np.float32)
  input_ids = rng.integers(0, sizes["vocab_size"], (2, 11))
  return Pair(hf, hf_whisper.from_torch(hf), mel, input_ids)


def test_encoder_blocks_match_torch(pair):
  last, blocks = encode(pair.ours, jnp.asarray(pair.mel))
  ref_last, ref_blocks = torch_encoder(pair.hf, pair.mel)
  assert blocks.shape == ref_blocks.shape == (pair.hf.config.encoder_layers, *ref_last.shape)
  for i, (block, ref) in enumerate(zip(blocks, ref_blocks)):
    assert (err := max_abs_diff(block, ref)) <= HIDDEN_ATOL, f"block {i}: {err}"
  assert (err := max_abs_diff(last, ref_last)) <= HIDDEN_ATOL, err


def test_short_mel_uses_the_first_positions(pair):
  """LTU-AS feeds fewer mel frames than the maximum (1000 of 3000): positions are the table's first rows.

  HF only takes exactly `2 * max_source_positions` frames, so the reference is a copy of the model with a
  truncated positional table.
  """
  frames = pair.hf.config.max_source_positions // 2
  config = copy.deepcopy(pair.hf.config)
  config.max_source_positions = frames
  short = transformers.WhisperForConditionalGeneration(config).eval()
  state = pair.hf.state_dict()
  state["model.encoder.embed_positions.weight"] = state["model.encoder.embed_positions.weight"][:frames]
  short.load_state_dict(state)
  mel = pair.mel[..., : 2 * frames]

  last, blocks = encode(pair.ours, jnp.asarray(mel))
  ref_last, ref_blocks = torch_encoder(short, mel)
  assert blocks.shape[2] == frames
  assert (err := max_abs_diff(blocks, ref_blocks)) <= HIDDEN_ATOL, err
  assert (err := max_abs_diff(last, ref_last)) <= HIDDEN_ATOL, err


def test_logits_match_torch(pair):
  logits = logits_of(pair.ours, jnp.asarray(pair.mel), jnp.asarray(pair.input_ids))
  with torch.no_grad():
    ref = pair.hf(
      input_features=torch.from_numpy(pair.mel), decoder_input_ids=torch.from_numpy(pair.input_ids)
    ).logits
  assert logits.shape == ref.shape and logits.dtype == jnp.float32
  assert (err := max_abs_diff(logits, ref)) <= LOGITS_ATOL, err


@pytest.mark.parametrize("prompt", [1, 4], ids=["token_by_token", "prompt_then_steps"])
def test_kv_cache_decoding_matches_full_forward(pair, prompt):
  mel, input_ids = jnp.asarray(pair.mel), jnp.asarray(pair.input_ids)
  kv = cross_kv(pair.ours, mel)
  full, _ = decode(pair.ours, input_ids, kv, None)
  # A cache shorter than max_target_positions: empty slots past the tokens must stay masked.
  cache = pair.ours.init_cache(input_ids.shape[0], max_len=input_ids.shape[1] + 3)
  chunks = [input_ids[:, :prompt]] + [input_ids[:, i : i + 1] for i in range(prompt, input_ids.shape[1])]
  steps = []
  for chunk in chunks:
    logits, cache = decode(pair.ours, chunk, kv, cache)
    steps.append(logits)
  assert int(cache.index) == input_ids.shape[1]
  assert (err := max_abs_diff(jnp.concatenate(steps, axis=1), full)) <= CACHE_ATOL, err


def test_a_left_padded_prompt_decodes_as_the_prompt_alone(pair):
  # The decoding engine pads prompts on the left: padding is masked and skipped by the positions.
  mel, input_ids = jnp.asarray(pair.mel), jnp.asarray(pair.input_ids)
  kv = cross_kv(pair.ours, mel)
  full, _ = decode(pair.ours, input_ids, kv, None)
  padding = 3
  padded = jnp.pad(input_ids[:, :4], ((0, 0), (padding, 0)), constant_values=7)
  mask = jnp.concatenate([jnp.zeros((len(padded), padding), jnp.int32), jnp.ones((len(padded), 4), jnp.int32)], axis=1)
  cache = pair.ours.init_cache(input_ids.shape[0], max_len=padding + input_ids.shape[1])
  logits, cache = nnx.jit(lambda m, i, k, c, a: m.decoder(i, k, c, a))(pair.ours, padded, kv, cache, mask)
  steps = [logits[:, padding:]]
  for i in range(4, input_ids.shape[1]):
    logits, cache = decode(pair.ours, input_ids[:, i : i + 1], kv, cache)
    steps.append(logits)
  assert (err := max_abs_diff(jnp.concatenate(steps, axis=1), full)) <= CACHE_ATOL, err


def test_ltu_as_features_pool_every_block(pair):
  _, blocks = encode(pair.ours, jnp.asarray(pair.mel))
  _, ref_blocks = torch_encoder(pair.hf, pair.mel)
  num_layers, batch, frames, dim = ref_blocks.shape
  pool = 5
  features = whisper.ltu_as_features(blocks, pool=pool)
  ref = ref_blocks.transpose(1, 0, 2, 3).reshape(batch, num_layers, frames // pool, pool, dim).mean(axis=3)
  assert features.shape == (batch, num_layers, frames // pool, dim)
  assert (err := max_abs_diff(features, ref)) <= HIDDEN_ATOL, err


def test_ltu_as_feature_shape_for_large_v1():
  """large-v1 on 10 s: 500 encoder frames of 32 blocks → `[batch, 32, 25, 1280]`; a partial window is dropped."""
  states = jax.ShapeDtypeStruct((32, 3, 500, 1280), jnp.float16)
  pool = functools.partial(whisper.ltu_as_features, pool=frontend.LTU_AS_POOL)
  features = jax.eval_shape(pool, states)
  assert features.shape == (3, 32, frontend.LTU_AS_TOKENS, 1280) and features.dtype == jnp.float16
  assert jax.eval_shape(pool, jax.ShapeDtypeStruct((32, 1, 510, 8), jnp.float32)).shape[2] == 25


def test_mel_longer_than_the_positional_table_raises(pair):
  too_long = np.zeros((1, pair.hf.config.num_mel_bins, 2 * pair.hf.config.max_source_positions + 1), np.float32)
  with pytest.raises(ValueError, match="at most"):
    pair.ours.encode(jnp.asarray(too_long))


def test_conversion_lists_every_mismatch(pair):
  missing, extra = "model.decoder.layers.1.fc2.bias", "model.encoder.conv3.weight"
  wrong = "model.encoder.layers.0.fc1.weight"
  tensors = [(key, value) for key, value in numpy_state_dict(pair.hf) if key != missing]
  tensors = [(key, value[:, :-1] if key == wrong else value) for key, value in tensors]
  tensors.append((extra, np.zeros((4, 4, 3), np.float32)))
  with pytest.raises(CheckpointMismatch) as caught:
    hf_whisper.load_whisper(tensors, hf_whisper.config_from_hf(pair.hf.config))
  assert caught.value.missing == [missing]
  assert caught.value.unexpected == [extra]
  assert [entry.split(":")[0] for entry in caught.value.misshaped] == [wrong]


def test_bare_whisper_model_converts_identically(pair):
  bare = hf_whisper.from_torch(pair.hf.model)
  ours, theirs = dict(nnx.to_flat_state(nnx.state(pair.ours))), dict(nnx.to_flat_state(nnx.state(bare)))
  assert ours.keys() == theirs.keys()
  for path, var in ours.items():
    np.testing.assert_array_equal(var.get_value(), theirs[path].get_value(), err_msg=str(path))


def test_every_parameter_has_logical_axes(pair):
  flat = nnx.to_flat_state(nnx.state(pair.ours, nnx.Param))
  for path, var in flat:
    assert len(var.out_sharding) == var.get_value().ndim, path
  specs = nnx.get_partition_spec(nnx.state(pair.ours, nnx.Param))
  assert specs["encoder"]["layers"]["fc1"]["kernel"].get_value() == P("layers", "embed", "mlp")
  assert specs["decoder"]["layers"]["encoder_attn"]["k_proj"]["kernel"].get_value() == P("layers", "embed", "heads")
  assert specs["encoder"]["conv2"]["kernel"].get_value() == P(None, "conv_in", "embed")
  assert specs["decoder"]["embed_tokens"]["embedding"].get_value() == P("vocab", "embed")


def test_compute_and_storage_dtypes():
  """bfloat16 compute keeps block outputs in bfloat16; LayerNorm output and logits stay float32."""
  config = hf_whisper.config_from_hf(SIZES["d64_h4"])
  model = whisper.Whisper(dataclasses.replace(config, dtype="bfloat16", param_dtype="bfloat16"), nnx.Rngs(0))
  mel = jax.ShapeDtypeStruct((1, config.num_mel_bins, 2 * config.max_source_positions), jnp.float32)
  input_ids = jax.ShapeDtypeStruct((1, 5), jnp.int32)
  last, blocks = nnx.eval_shape(lambda m, x: m.encode(x), model, mel)
  logits = nnx.eval_shape(lambda m, x, ids: m(x, ids), model, mel, input_ids)
  assert blocks.dtype == jnp.bfloat16 and last.dtype == jnp.float32 and logits.dtype == jnp.float32
  assert model.encoder.layers.fc1.kernel.get_value().dtype == jnp.bfloat16
