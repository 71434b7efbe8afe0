"""LLaMA family and LoRA: parity with transformers' `LlamaForCausalLM` and peft on the same weights."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers
from flax import nnx
from jax.ad_checkpoint import print_saved_residuals

from conversion import rules
from conversion.hf_llama import config_from_hf, load_llama
from ltu_jax.models.llama import DecoderLayer, Llama, LlamaConfig, attention_inputs
from ltu_jax.models.lora import LoRAConfig, LoRAParam, bernoulli
from tests.helpers import max_abs_diff, numpy_state_dict

LOGITS_TOL = 1e-4  # full-model logits, fp32
GRAD_TOL = 1e-4  # gradients of a loss over a full model's logits, fp32, relative to their largest entry
CACHE_TOL = 1e-4  # KV-cache decoding vs a full forward

HF_CONFIGS = {
  # SmolLM2-like: grouped-query attention (3 heads share 1 KV head), tied embeddings, odd head count.
  "gqa_tied": dict(
    vocab_size=101, hidden_size=96, intermediate_size=160, num_hidden_layers=3, num_attention_heads=3,
    num_key_value_heads=1, rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True,
  ),
  # LLaMA-1 / Vicuna-like: full multi-head attention, untied output, head_dim 16.
  "mha_untied": dict(
    vocab_size=128, hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=4, rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False,
  ),
  # LLaMA-3.1-like: explicit head_dim 24 ≠ hidden/heads 16, 6 heads on 2 KV heads, llama3 RoPE scaling.
  "llama3_scaled": dict(
    vocab_size=96, hidden_size=96, intermediate_size=144, num_hidden_layers=2, num_attention_heads=6,
    num_key_value_heads=2, head_dim=24, rms_norm_eps=1e-5, tie_word_embeddings=False, max_position_embeddings=256,
    rope_parameters=dict(
      rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
      original_max_position_embeddings=16,
    ),
  ),
  # Linear position interpolation.
  "linear_scaled": dict(
    vocab_size=64, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2,
    num_key_value_heads=1, rms_norm_eps=1e-6, tie_word_embeddings=True,
    rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=2.0),
  ),
}


def hf_model(name: str) -> transformers.LlamaForCausalLM:
  torch.manual_seed(sum(map(ord, name)))
  config = transformers.LlamaConfig(**HF_CONFIGS[name], attn_implementation="eager")
  model = transformers.LlamaForCausalLM(config).eval()
  with torch.no_grad():  # random norms, so a wrong norm weight mapping cannot hide behind ones
    for module in model.modules():
      if isinstance(module, transformers.models.llama.modeling_llama.LlamaRMSNorm):
        module.weight.uniform_(0.5, 1.5)
  return model


def ours(reference: torch.nn.Module, lora: LoRAConfig | None = None):
  config = config_from_hf(reference.config, lora=lora)
  prefix = "base_model.model." if lora is not None else ""
  return load_llama(config, numpy_state_dict(reference), prefix=prefix)


def token_batch(vocab: int, batch: int = 2, length: int = 12, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, vocab, (batch, length))


def reference_logits(model, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
  positions = np.maximum(np.cumsum(mask, -1) - 1, 0)
  with torch.no_grad():
    out = model(
      input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask), position_ids=torch.as_tensor(positions)
    )
  return out.logits.numpy()


@nnx.jit
def forward(model, ids, mask):
  return model(ids, mask)[0]


@pytest.mark.parametrize("name", sorted(HF_CONFIGS))
def test_logits_match_transformers(name):
  reference = hf_model(name)
  model = ours(reference)
  ids = token_batch(reference.config.vocab_size)
  mask = np.ones_like(ids)
  assert max_abs_diff(forward(model, ids, mask), reference_logits(reference, ids, mask)) <= LOGITS_TOL


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_rows_match_unpadded(side):
  """Padding changes nothing for real tokens: positions skip pads and pads are masked."""
  reference = hf_model("gqa_tied")
  model = ours(reference)
  ids = token_batch(reference.config.vocab_size, batch=2, length=10)
  real = 6  # the second row keeps 6 real tokens
  mask = np.ones_like(ids)
  if side == "left":
    mask[1, : 10 - real] = 0
    row_real = slice(10 - real, 10)
  else:
    mask[1, real:] = 0
    row_real = slice(0, real)
  logits = np.asarray(forward(model, ids, mask))
  alone = np.asarray(forward(model, ids[1:2, row_real], np.ones((1, real), np.int64)))
  assert max_abs_diff(logits[1, row_real], alone[0]) <= LOGITS_TOL
  ref = reference_logits(reference, ids, mask)
  assert max_abs_diff(logits[mask == 1], ref[mask == 1]) <= LOGITS_TOL


@pytest.mark.parametrize("name", ["gqa_tied", "llama3_scaled"])
def test_kv_cache_decoding_equals_full_forward(name):
  reference = hf_model(name)
  model = ours(reference)
  ids = token_batch(reference.config.vocab_size, batch=2, length=11)
  mask = np.ones_like(ids)
  mask[1, :3] = 0  # left padding, as batched generation uses
  full = np.asarray(forward(model, ids, mask))

  step = nnx.jit(lambda m, i, a, c: m(i, a, cache=c))
  cache = model.init_cache(batch=2, max_len=16)
  prompt = 5
  logits, cache = step(model, ids[:, :prompt], mask[:, :prompt], cache)
  pieces = [np.asarray(logits)]
  for t in range(prompt, ids.shape[1]):
    logits, cache = step(model, ids[:, t : t + 1], mask[:, t : t + 1], cache)
    pieces.append(np.asarray(logits))
  decoded = np.concatenate(pieces, axis=1)
  assert max_abs_diff(decoded[mask == 1], full[mask == 1]) <= CACHE_TOL


def peft_model(name: str, targets: tuple[str, ...], rank: int, alpha: float):
  base = hf_model(name)
  lora = peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(targets), bias="none")
  model = peft.get_peft_model(base, lora).eval()
  with torch.no_grad():  # non-zero B, so the adapters really change the output
    for key, param in model.named_parameters():
      if "lora_B" in key:
        param.normal_(0.0, 0.2)
  return model


@pytest.mark.parametrize(
  "name,targets,rank,alpha",
  [
    ("mha_untied", ("q_proj", "v_proj"), 8, 16.0),  # LTU-AS's adapters
    ("gqa_tied", ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"), 4, 12.0),
  ],
)
def test_lora_matches_peft(name, targets, rank, alpha):
  reference = peft_model(name, targets, rank, alpha)
  model = ours(reference, LoRAConfig(rank=rank, alpha=alpha, dropout=0.05, targets=targets))
  ids = token_batch(reference.config.vocab_size)
  mask = np.ones_like(ids)
  ref = reference_logits(reference, ids, mask)
  assert max_abs_diff(forward(model, ids, mask), ref) <= LOGITS_TOL
  with torch.no_grad(), reference.disable_adapter():
    base_only = reference_logits(reference, ids, mask)
  assert max_abs_diff(ref, base_only) > 100 * LOGITS_TOL  # the adapters matter in this test


def test_fresh_lora_is_identity_and_filterable():
  reference = hf_model("mha_untied")
  lora = LoRAConfig(rank=8, alpha=16.0, dropout=0.05, targets=("q_proj", "v_proj"))
  model = load_llama(config_from_hf(reference.config, lora=lora), numpy_state_dict(reference), fresh_lora=True)
  ids = token_batch(reference.config.vocab_size)
  mask = np.ones_like(ids)
  assert max_abs_diff(forward(model, ids, mask), reference_logits(reference, ids, mask)) <= LOGITS_TOL

  adapters = dict(nnx.to_flat_state(nnx.state(model, LoRAParam)))
  names = sorted(rules.path_str(path) for path in adapters)
  assert names == [f"layers.self_attn.{p}.{w}" for p in ("q_proj", "v_proj") for w in ("lora_a", "lora_b")]
  cfg = model.config
  count = sum(v.get_value().size for v in adapters.values())
  assert count == cfg.num_layers * 2 * (cfg.hidden_size * 8 + 8 * cfg.hidden_size)
  assert all(np.all(np.asarray(adapters[("layers", "self_attn", p, "lora_b")].get_value()) == 0) for p in ("q_proj", "v_proj"))
  base = nnx.state(model, nnx.All(nnx.Param, nnx.Not(LoRAParam)))
  assert not any("lora" in rules.path_str(path) for path, _ in nnx.to_flat_state(base))


def test_lora_dropout_only_with_a_key():
  reference = hf_model("mha_untied")
  lora = LoRAConfig(rank=4, alpha=8.0, dropout=0.5, targets=("q_proj", "v_proj"))
  model = load_llama(config_from_hf(reference.config, lora=lora), numpy_state_dict(reference), fresh_lora=True)
  for _, var in nnx.to_flat_state(nnx.state(model, LoRAParam)):
    var.set_value(jnp.ones_like(var.get_value()) * 0.1)
  ids = jnp.asarray(token_batch(reference.config.vocab_size))
  mask = jnp.ones_like(ids)
  positions = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
  embeds = model.embed_tokens(ids)
  plain = model.hidden(embeds, mask, positions)[0]
  again = model.hidden(embeds, mask, positions)[0]
  dropped = model.hidden(embeds, mask, positions, dropout_key=jax.random.key(1))[0]
  assert max_abs_diff(plain, again) == 0.0
  assert max_abs_diff(plain, dropped) > 1e-3


def test_gradients_match_peft():
  """The backward pass (the norms and the MLP's `gated` recompute) gives PyTorch's gradients of a loss over the
  logits, with respect to the input embeddings (what stage 1 trains through) and to every LoRA adapter."""
  targets = ("q_proj", "v_proj", "gate_proj", "up_proj", "down_proj")
  reference = peft_model("gqa_tied", targets, 4, 12.0)
  model = ours(reference, LoRAConfig(rank=4, alpha=12.0, dropout=0.0, targets=targets))
  ids = token_batch(reference.config.vocab_size)
  positions = np.broadcast_to(np.arange(ids.shape[1]), ids.shape)
  weights = np.random.default_rng(1).standard_normal((*ids.shape, reference.config.vocab_size)).astype(np.float32)
  embeds = np.asarray(model.embed_tokens(jnp.asarray(ids)))

  graphdef, adapters, rest = nnx.split(model, LoRAParam, ...)

  def loss(adapters, embeds):
    llm = nnx.merge(graphdef, adapters, rest)
    hidden, _ = llm.hidden(embeds, jnp.ones(ids.shape, jnp.int32), jnp.asarray(positions))
    return jnp.sum(llm.logits(hidden) * weights)

  adapter_grads, embed_grads = jax.grad(loss, argnums=(0, 1))(adapters, jnp.asarray(embeds))
  torch_embeds = torch.tensor(embeds, requires_grad=True)
  logits = reference(inputs_embeds=torch_embeds, position_ids=torch.as_tensor(positions)).logits
  torch.sum(logits * torch.as_tensor(weights)).backward()

  def close(ours_grad, torch_grad) -> bool:
    return max_abs_diff(ours_grad, torch_grad) <= GRAD_TOL * float(np.abs(torch_grad).max())

  assert close(embed_grads, torch_embeds.grad.numpy())
  torch_grads = dict(reference.named_parameters())
  flat = dict(nnx.to_flat_state(adapter_grads))
  assert len(flat) == 2 * len(targets)  # A and B of each target, stacked over the layers
  for path, grad in flat.items():
    module, proj, weight = path[-3:]
    for layer in range(reference.config.num_hidden_layers):
      name = f"base_model.model.model.layers.{layer}.{module}.{proj}.lora_{weight[-1].upper()}.default.weight"
      assert close(np.asarray(grad.get_value())[layer], torch_grads[name].grad.numpy().T), name


def test_a_layer_keeps_little_for_the_backward_pass(capsys):
  """With frozen weights, a decoder layer's backward pass needs, besides attention's own, only the layer's input
  and its input plus attention (the norms recompute from them) and the gate and up projections (`silu(gate) *
  up` recomputes its sigmoid). Issue #15: six `[batch, len, embed]` and five `[batch, len, mlp]` arrays before."""
  config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=48, num_layers=1, num_heads=2, num_kv_heads=1)
  layer = DecoderLayer(config, rngs=nnx.Rngs(0))
  _, mask, _ = attention_inputs(jnp.ones((2, 5), jnp.int32), None)
  positions = jnp.broadcast_to(jnp.arange(5), (2, 5))
  print_saved_residuals(lambda x: layer(x, positions, mask, None, None, None)[0].sum(), jnp.ones((2, 5, 16)))
  saved = capsys.readouterr().out
  assert saved.count("f32[2,5,16]") == 2
  assert saved.count("f32[2,5,48]") == 2


def test_dropout_masks_are_independent_draws_at_the_rate():
  """`bernoulli` (LoRA dropout's masks): the rate, reproducible for a key, independent across keys and between
  neighbouring elements, each within 6 standard deviations of a binomial count."""
  shape = (1000, 1000)
  keep = np.asarray(bernoulli(jax.random.key(0), 0.95, shape))
  other = np.asarray(bernoulli(jax.random.key(1), 0.95, shape))

  def near(observed: float, p: float, count: int) -> bool:
    return abs(observed - p) <= 6 * np.sqrt(p * (1 - p) / count)

  assert near(keep.mean(), 0.95, keep.size)
  assert near(np.asarray(bernoulli(jax.random.key(2), 0.5, shape)).mean(), 0.5, keep.size)
  assert np.array_equal(keep, np.asarray(bernoulli(jax.random.key(0), 0.95, shape)))
  assert near((keep & other).mean(), 0.95**2, keep.size)
  flat = keep.ravel()
  assert near((flat[1:] & flat[:-1]).mean(), 0.95**2, flat.size - 1)
  assert near((~flat[1:] & ~flat[:-1]).mean(), 0.05**2, flat.size - 1)


def test_checkpoint_mismatch_lists_every_problem():
  reference = hf_model("mha_untied")
  config = config_from_hf(reference.config)
  tensors = dict(numpy_state_dict(reference))
  del tensors["model.layers.1.mlp.up_proj.weight"]
  tensors["model.layers.0.self_attn.k_proj.weight"] = tensors["model.layers.0.self_attn.k_proj.weight"][:-1]
  tensors["model.layers.0.self_attn.rotary.extra"] = np.zeros(3, np.float32)
  with pytest.raises(rules.CheckpointMismatch) as error:
    load_llama(config, tensors.items(), source="bad.safetensors")
  message = str(error.value)
  assert "bad.safetensors" in message
  assert error.value.missing == ["model.layers.1.mlp.up_proj.weight"]
  assert error.value.unexpected == ["model.layers.0.self_attn.rotary.extra"]
  assert error.value.misshaped == ["model.layers.0.self_attn.k_proj.weight: (63, 64) (as (64, 63)), expected (64, 64) for layers.self_attn.k_proj.base.kernel"]


def test_parameters_carry_logical_axes():
  reference = hf_model("gqa_tied")
  config = dataclasses.replace(config_from_hf(reference.config), lora=LoRAConfig())
  model = nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0)))
  specs = {rules.path_str(p): v.get_value() for p, v in nnx.to_flat_state(nnx.get_partition_spec(nnx.state(model)))}
  assert specs["layers.self_attn.q_proj.base.kernel"] == jax.sharding.PartitionSpec("layers", "embed", "q_heads")
  assert specs["layers.self_attn.q_proj.lora_a"] == jax.sharding.PartitionSpec("layers", "embed", "lora_rank")
  assert specs["layers.mlp.down_proj.base.kernel"] == jax.sharding.PartitionSpec("layers", "mlp", "embed")
  assert specs["embed_tokens.embedding"] == jax.sharding.PartitionSpec("vocab", "embed")
  assert specs["norm.scale"] == jax.sharding.PartitionSpec("norm")
