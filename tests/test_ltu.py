"""CAV-MAE's audio branch and the LTU composite against PyTorch references written from the facts
(tests/torch_reference.py), at the release's encoder size and at a small one."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from conversion.hf_llama import config_from_hf
from conversion.ltu import load_ltu
from ltu_jax.models.cav_mae import CavMaeConfig
from ltu_jax.models.lora import LoRAConfig
from ltu_jax.models.ltu import LtuConfig
from tests import torch_reference
from tests.helpers import max_abs_diff, numpy_state_dict

MODULE_TOL = 1e-5  # each encoder block, the encoder, the audio tokens
LOGITS_TOL = 1e-4  # the composite's text logits

LLM = dict(vocab_size=90, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=4, rms_norm_eps=1e-6, tie_word_embeddings=False)
SETUPS = {
  # The release's encoder: ViT-B (768 wide, 12 heads, 11 + 1 blocks) over [1024, 128]; a small LLM.
  "release": dict(encoder=CavMaeConfig(), llm=LLM,
                  lora=LoRAConfig(rank=8, alpha=16.0, dropout=0.05, targets=("q_proj", "v_proj"))),
  # Small and odd: 3 heads of 16, 2 + 2 blocks, 32 bins × 128 frames (2 × 8 patches, 4 tokens); GQA LLM.
  "small": dict(
    encoder=CavMaeConfig(dim=48, heads=3, mlp_dim=80, audio_layers=2, joint_layers=2, mel_bins=32, frames=128),
    llm=dict(LLM, hidden_size=60, num_attention_heads=5, num_key_value_heads=1, head_dim=16, tie_word_embeddings=True),
    lora=LoRAConfig(rank=4, alpha=4.0, dropout=0.0, targets=("q_proj", "o_proj")),
  ),
}


def build_reference(setup: dict) -> torch.nn.Module:
  """A peft-wrapped PyTorch LTU with random weights, random LayerNorm affines and non-zero LoRA B."""
  llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(**setup["llm"], attn_implementation="eager"))
  e = setup["encoder"]
  encoder = torch_reference.CavMaeAudio(e.dim, e.heads, e.mlp_dim, e.audio_layers, e.joint_layers, e.patch, e.mel_bins, e.frames)
  return torch_reference.wrap_with_peft(llama, encoder, e.dim, setup["lora"])


def our_config(setup: dict, reference) -> LtuConfig:
  return LtuConfig(llm=config_from_hf(reference.config, lora=setup["lora"]), encoder=setup["encoder"])


@pytest.fixture(scope="module", params=sorted(SETUPS))
def models(request):
  setup = SETUPS[request.param]
  torch.manual_seed(sum(map(ord, request.param)))
  reference = build_reference(setup)
  return setup, reference, load_ltu(our_config(setup, reference), numpy_state_dict(reference))


def fbank(setup: dict, windows: int = 1, size: int = 1, seed: int = 0) -> np.ndarray:
  e = setup["encoder"]
  return np.random.default_rng(seed).normal(size=(size, windows * e.frames, e.mel_bins)).astype(np.float32)


def test_encoder_blocks_match_reference(models):
  setup, reference, model = models
  inputs = fbank(setup)
  hidden = []
  with torch.no_grad():
    expected = reference.get_base_model().model.audio_encoder(torch.as_tensor(inputs), hidden)
  ours, ours_hidden = nnx.jit(lambda m, x: m.encode(x, hidden_states=True))(model.audio_encoder, inputs)
  e = setup["encoder"]
  assert ours_hidden.shape == (e.audio_layers + e.joint_layers, 1, e.freq_patches * e.time_patches, e.dim)
  for block, (mine, theirs) in enumerate(zip(ours_hidden, hidden)):
    assert max_abs_diff(mine, theirs) <= MODULE_TOL, f"block {block}"
  assert max_abs_diff(ours, expected) <= MODULE_TOL


def test_audio_tokens_and_logits_match_reference(models):
  setup, reference, model = models
  size = 1 if setup["encoder"] == CavMaeConfig() else 2  # the release's encoder is slow on CPU
  inputs = fbank(setup, size=size, seed=1)
  ids = np.random.default_rng(2).integers(3, setup["llm"]["vocab_size"], (size, 7)).astype(np.int32)
  ids[:, 0] = 1
  mask = np.ones_like(ids)
  with torch.no_grad():
    freq = setup["encoder"].freq_patches
    tokens = torch_reference.ltu_audio_tokens(reference.get_base_model(), torch.as_tensor(inputs), freq)
    logits = torch_reference.ltu_forward(reference, torch.as_tensor(inputs), torch.as_tensor(ids), torch.as_tensor(mask), freq)
  audio_tokens = nnx.jit(lambda m, x: m.audio_embeddings(x))(model, inputs[:, None])
  assert audio_tokens.shape == (size, setup["encoder"].time_patches // 2, setup["llm"]["hidden_size"])
  assert max_abs_diff(audio_tokens, tokens) <= MODULE_TOL
  assert max_abs_diff(nnx.jit(lambda m, x, i, k: m(x, i, k)[0])(model, inputs[:, None], ids, mask), logits) <= LOGITS_TOL


def test_windows_are_encoded_alone_and_masked():
  """Two windows give each window's 32 (here 4) tokens in order; a clip with one real window and a padded
  second gives the logits of the one-window clip (its padded tokens are masked and take no positions)."""
  setup = SETUPS["small"]
  torch.manual_seed(3)
  reference = build_reference(setup)
  model = load_ltu(our_config(setup, reference), numpy_state_dict(reference))
  frames = setup["encoder"].frames
  two = fbank(setup, windows=2, seed=4)
  embed = nnx.jit(lambda m, x: m.audio_embeddings(x))
  joined = embed(model, two[:, None])
  apart = np.concatenate([embed(model, two[:, None, :frames]), embed(model, two[:, None, frames:])], axis=1)
  assert max_abs_diff(joined, apart) <= MODULE_TOL
  ids = np.array([[1, 5, 9, 12]])
  padded = two.copy()
  padded[:, frames:] = 0.0
  audio_mask = np.concatenate([np.ones((1, frames)), np.zeros((1, frames))], axis=1).astype(np.int32)
  forward = nnx.jit(lambda m, x, i, a: m(x, i, audio_mask=a)[0])
  one = forward(model, two[:, None, :frames], ids, None)
  assert max_abs_diff(forward(model, padded[:, None], ids, audio_mask), one) <= LOGITS_TOL
  assert model.context_tokens(two[:, None]) == 2 * frames // 32


def test_bad_input_shape_is_named():
  setup = SETUPS["small"]
  model = load_ltu(*_fresh(setup))
  with pytest.raises(ValueError, match=r"expected \(1, a multiple of 128, 32\)"):
    model.audio_embeddings(np.zeros((1, 1, 100, 32), np.float32))


def _fresh(setup):
  torch.manual_seed(5)
  reference = build_reference(setup)
  return our_config(setup, reference), numpy_state_dict(reference)
