"""TLTR and the LTU-AS composite against PyTorch references written from the facts (tests/torch_reference.py)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from conversion.hf_llama import config_from_hf
from conversion.ltu_as import load_ltu_as
from ltu_jax.models.lora import LoRAConfig
from ltu_jax.models.ltu_as import LtuAsConfig, lm_loss, text_loss_mask
from ltu_jax.models.tltr import TLTRConfig
from tests import torch_reference
from tests.helpers import max_abs_diff, numpy_state_dict

MODULE_TOL = 1e-5  # a single module (TLTR, audio tokens)
LOGITS_TOL = 1e-4  # full-model logits and loss
CACHE_TOL = 1e-4  # KV-cache decoding vs a full forward

SETUPS = {
  # LTU-AS's shape of things: 1-head time and 8-head layer attention, LoRA r8/α16 on q and v, MHA LLM.
  "ltu_as_like": dict(
    whisper_dim=64, time_heads=1, layer_heads=8, feature_layers=6, time=5,
    llm=dict(vocab_size=90, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=4, rms_norm_eps=1e-6, tie_word_embeddings=False),
    lora=LoRAConfig(rank=8, alpha=16.0, dropout=0.05, targets=("q_proj", "v_proj")),
  ),
  # Odd sizes: 2-head time / 3-head layer attention at width 48, GQA and tied LLM, other LoRA targets.
  "odd": dict(
    whisper_dim=48, time_heads=2, layer_heads=3, feature_layers=4, time=7,
    llm=dict(vocab_size=77, hidden_size=60, intermediate_size=80, num_hidden_layers=3, num_attention_heads=5,
             num_key_value_heads=1, head_dim=16, rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True),
    lora=LoRAConfig(rank=4, alpha=4.0, dropout=0.0, targets=("q_proj", "o_proj", "up_proj")),
  ),
}


def build(name: str):
  """A peft-wrapped PyTorch LTU-AS with random weights (non-zero LoRA B) and our model loaded from it."""
  torch.manual_seed(sum(map(ord, name)))
  reference = build_reference(SETUPS[name])
  return reference, load_ltu_as(our_config(SETUPS[name], reference), numpy_state_dict(reference))


def build_reference(setup: dict):
  """A peft-wrapped PyTorch LTU-AS with random weights, non-zero LoRA B and random LayerNorm affines."""
  llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(**setup["llm"], attn_implementation="eager"))
  dim = setup["whisper_dim"]
  tltr = torch_reference.TLTR(dim, setup["time_heads"], setup["layer_heads"])
  return torch_reference.wrap_with_peft(llama, tltr, dim, setup["lora"])


def our_config(setup: dict, reference) -> LtuAsConfig:
  dim = setup["whisper_dim"]
  return LtuAsConfig(
    llm=config_from_hf(reference.config, lora=setup["lora"]),
    tltr=TLTRConfig(dim=dim, time_heads=setup["time_heads"], layer_heads=setup["layer_heads"], mlp_dim=4 * dim),
    feature_layers=setup["feature_layers"],
    audio_tokens=setup["time"],
  )


@pytest.fixture(scope="module", params=sorted(SETUPS))
def models(request):
  return (request.param, *build(request.param))


def batch(name: str, length: int = 9, size: int = 2, seed: int = 0, setup: dict | None = None):
  setup = setup or SETUPS[name]
  rng = np.random.default_rng(seed)
  features = rng.normal(size=(size, setup["feature_layers"], setup["time"], setup["whisper_dim"])).astype(np.float32)
  ids = rng.integers(3, setup["llm"]["vocab_size"], (size, length))
  ids[:, 0] = 1  # BOS
  return features, ids


def reference_outputs(reference, features, ids, mask, labels=None):
  with torch.no_grad():
    logits, loss = torch_reference.ltu_as_forward(
      reference, torch.as_tensor(features), torch.as_tensor(ids), torch.as_tensor(mask),
      None if labels is None else torch.as_tensor(labels),
    )
  return logits.numpy(), None if loss is None else float(loss)


@nnx.jit
def forward(model, features, ids, mask):
  return model(features, ids, mask)[0]


def test_tltr_matches_reference(models):
  name, reference, model = models
  features, _ = batch(name)
  tltr = reference.get_base_model().model.audio_encoder
  with torch.no_grad():
    expected = tltr(torch.as_tensor(features))
  assert max_abs_diff(nnx.jit(lambda m, f: m(f))(model.audio_encoder, features), expected) <= MODULE_TOL
  with torch.no_grad():
    tokens = reference.get_base_model().model.audio_proj(expected)
  assert max_abs_diff(nnx.jit(lambda m, f: m.audio_embeddings(f))(model, features), tokens) <= MODULE_TOL


def test_logits_and_loss_match_reference(models):
  name, reference, model = models
  features, ids = batch(name)
  mask = np.ones_like(ids)
  ref_logits, ref_loss = reference_outputs(reference, features, ids, mask, labels=ids)
  logits = forward(model, features, ids, mask)
  assert logits.shape == ids.shape + (SETUPS[name]["llm"]["vocab_size"],)  # text positions only
  assert max_abs_diff(logits, ref_logits) <= LOGITS_TOL
  loss, count = lm_loss(logits, jnp.asarray(ids), text_loss_mask(jnp.asarray(mask), None, train_on_inputs=True))
  assert int(count) == ids.size - ids.shape[0]
  assert abs(float(loss) - ref_loss) <= LOGITS_TOL


def test_train_on_inputs_false_counts_only_the_answer(models):
  name, reference, model = models
  features, ids = batch(name, length=10)
  mask = np.ones_like(ids)
  mask[1, 7:] = 0  # right padding on the second row
  prompt_lengths = np.array([4, 6])
  labels = np.where(mask == 1, ids, -100)
  for row, length in enumerate(prompt_lengths):
    labels[row, :length] = -100
  _, ref_loss = reference_outputs(reference, features, ids, mask, labels=labels)
  logits = forward(model, features, ids, mask)
  loss_mask = text_loss_mask(jnp.asarray(mask), jnp.asarray(prompt_lengths), train_on_inputs=False)
  loss, count = lm_loss(logits, jnp.asarray(ids), loss_mask)
  assert int(count) == (10 - 4 - 0) + (7 - 6)
  assert abs(float(loss) - ref_loss) <= LOGITS_TOL


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_keeps_real_tokens_exact(models, side):
  name, reference, model = models
  features, ids = batch(name, length=9)
  real = 5
  mask = np.ones_like(ids)
  keep = slice(9 - real, 9) if side == "left" else slice(0, real)
  mask[1] = 0
  mask[1, keep] = 1
  logits = np.asarray(forward(model, features, ids, mask))
  alone = np.asarray(forward(model, features[1:], ids[1:, keep], np.ones((1, real), np.int64)))
  assert max_abs_diff(logits[1, keep], alone[0]) <= LOGITS_TOL
  ref_logits, _ = reference_outputs(reference, features, ids, mask)
  assert max_abs_diff(logits[mask == 1], ref_logits[mask == 1]) <= LOGITS_TOL


def test_kv_cache_decoding_equals_full_forward(models):
  name, _, model = models
  features, ids = batch(name, length=8)
  mask = np.ones_like(ids)
  mask[0, :2] = 0  # left padding, as batched generation uses
  full = np.asarray(forward(model, features, ids, mask))
  audio = SETUPS[name]["time"]
  cache = model.llm.init_cache(batch=2, max_len=audio + 8)
  first = nnx.jit(lambda m, f, i, a, c: m(f, i, a, cache=c))
  step = nnx.jit(lambda m, i, a, c: m(None, i, a, cache=c))
  logits, cache = first(model, features, ids[:, :4], mask[:, :4], cache)
  pieces = [np.asarray(logits)]
  for t in range(4, 8):
    logits, cache = step(model, ids[:, t : t + 1], mask[:, t : t + 1], cache)
    pieces.append(np.asarray(logits))
  decoded = np.concatenate(pieces, axis=1)
  assert max_abs_diff(decoded[mask == 1], full[mask == 1]) <= CACHE_TOL


def test_wrong_feature_shape_is_a_clear_error(models):
  name, _, model = models
  features, ids = batch(name)
  with pytest.raises(ValueError, match="audio features have shape"):
    model(features[:, :-1], jnp.asarray(ids))


def test_windows_are_encoded_apart_in_order_and_unfilled_ones_are_masked(models):
  name, _, model = models
  first, ids = batch(name, seed=1)
  second, _ = batch(name, seed=2)
  both = np.concatenate([first, second], axis=2)  # a clip of two windows
  embed = nnx.jit(lambda m, f: m.audio_embeddings(f))
  expected = np.concatenate([embed(model, first), embed(model, second)], axis=1)
  assert max_abs_diff(embed(model, both), expected) <= MODULE_TOL
  # one window alone equals the same clip padded to two windows with the second masked
  padded = np.concatenate([first, np.zeros_like(first)], axis=2)
  audio_mask = np.concatenate([np.ones_like(first[:, 0, :, 0]), np.zeros_like(first[:, 0, :, 0])], axis=1).astype(np.int32)
  mask = np.ones_like(ids)
  alone = forward(model, first, ids, mask)
  masked = nnx.jit(lambda m, f, i, k, a: m(f, i, k, audio_mask=a)[0])(model, padded, ids, mask, audio_mask)
  assert max_abs_diff(masked, alone) <= LOGITS_TOL
