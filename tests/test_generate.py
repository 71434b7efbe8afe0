"""KV-cache decoding on random tiny models: equal to full forwards, to transformers' `generate`, batch-invariant."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from transformers.generation import logits_process

from conversion.hf_llama import config_from_hf, load_llama
from ltu_jax import generate as gen
from ltu_jax.models.llama import Llama, decoding_layout
from ltu_jax.models.lora import LoRAConfig, LoRAParam
from ltu_jax.models.ltu_as import LtuAs, LtuAsConfig
from ltu_jax.models.tltr import TLTRConfig
from tests.helpers import max_abs_diff, numpy_state_dict

SCORE_TOL = 1e-6  # our logits processors vs HF's on the same float32 scores
NEW_TOKENS = 12
EOS_IDS, PAD = (10, 33), 0  # tokens the tiny model below does produce, so rows end at different steps
PROMPTS = ([5, 17, 33], [9, 40, 41, 12, 7, 60, 3], [11, 23, 54, 8, 19])  # different lengths: left padding

HF_CONFIG = dict(  # GQA and tied, as SmolLM2; a wide init so that logits are far from ties
  vocab_size=71, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
  num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True, initializer_range=0.2,
)


@pytest.fixture(scope="module")
def reference():
  torch.manual_seed(0)
  return transformers.LlamaForCausalLM(transformers.LlamaConfig(**HF_CONFIG, attn_implementation="eager")).eval()


@pytest.fixture(scope="module")
def model(reference):
  return load_llama(config_from_hf(reference.config), numpy_state_dict(reference))


def settings(**changes) -> gen.SamplingConfig:
  """Greedy, NEW_TOKENS long, unless `changes` say otherwise."""
  return gen.SamplingConfig(max_new_tokens=NEW_TOKENS, **changes)


def run(model, prompts, sampling=None, eos_ids=(), key=None, **kwargs) -> gen.Generated:
  ids, mask = gen.left_pad(prompts, PAD)
  out = gen.generate(model, ids, mask, sampling=sampling or settings(), eos_ids=eos_ids, pad_id=PAD, key=key, **kwargs)
  return gen.Generated(np.asarray(out.tokens), np.asarray(out.lengths))


def argmax_loop(forward, prompt: list[int], steps: int) -> list[int]:
  """Greedy decoding by full forwards (no cache): `forward(ids, mask)` `[1, len]` → logits `[1, len, vocab]`.

  The sequence grows inside one right-padded buffer (pads after the last token change nothing there), so
  each prompt compiles once.
  """
  ids = np.zeros((1, len(prompt) + steps), np.int32)
  ids[0, : len(prompt)] = prompt
  for length in range(len(prompt), len(prompt) + steps):
    mask = (np.arange(ids.shape[1]) < length)[None].astype(np.int32)
    ids[0, length] = np.argmax(np.asarray(forward(ids, mask))[0, length - 1])
  return ids[0, len(prompt):].tolist()


def test_batched_left_padded_prompts_equal_each_alone(model):
  batch = run(model, PROMPTS).tokens
  for row, prompt in enumerate(PROMPTS):
    np.testing.assert_array_equal(batch[row], run(model, [prompt]).tokens[0])


def test_greedy_equals_argmax_over_full_forwards(model):
  forward = nnx.jit(lambda m, ids, mask: m(ids, mask)[0])
  for prompt in PROMPTS:
    assert run(model, [prompt]).tokens[0].tolist() == argmax_loop(lambda *a: forward(model, *a), prompt, NEW_TOKENS)


@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_greedy_equals_transformers_generate(model, reference, penalty):
  """A left-padded batch, eos included; transformers 5 leaves the padding out of the repetition penalty too."""
  ids, mask = gen.left_pad(PROMPTS, PAD)
  with torch.no_grad():
    expected = reference.generate(
      torch.as_tensor(ids, dtype=torch.long), attention_mask=torch.as_tensor(mask), do_sample=False,
      max_new_tokens=NEW_TOKENS, repetition_penalty=penalty, eos_token_id=list(EOS_IDS), pad_token_id=PAD,
    )[:, ids.shape[1]:].numpy()
  assert expected.shape[1] < NEW_TOKENS  # every row has ended, so transformers stopped early
  ours = run(model, PROMPTS, settings(repetition_penalty=penalty), eos_ids=EOS_IDS).tokens
  np.testing.assert_array_equal(ours[:, : expected.shape[1]], expected)
  assert np.all(ours[:, expected.shape[1]:] == PAD)


def test_sampling_is_reproducible_and_its_limits_are_greedy(model):
  sampled = settings(do_sample=True, temperature=1.5, top_k=20, top_p=0.9)
  first = run(model, PROMPTS, sampled, key=jax.random.key(7)).tokens
  np.testing.assert_array_equal(first, run(model, PROMPTS, sampled, key=jax.random.key(7)).tokens)
  assert not np.array_equal(first, run(model, PROMPTS, sampled, key=jax.random.key(8)).tokens)
  expected = run(model, PROMPTS).tokens
  assert not np.array_equal(first, expected)
  for limit in (settings(do_sample=True, temperature=1e-7), settings(do_sample=True, temperature=2.0, top_k=1)):
    np.testing.assert_array_equal(run(model, PROMPTS, limit, key=jax.random.key(3)).tokens, expected)


def test_sampling_needs_a_key(model):
  with pytest.raises(ValueError, match="random key"):
    run(model, PROMPTS, settings(do_sample=True))


def crafted_scores() -> tuple[np.ndarray, np.ndarray]:
  """Scores `[2, 9]` with positive, negative and zero entries, and the prompt+output tokens of each row."""
  scores = np.array(
    [[2.0, -1.5, 0.0, 3.0, -0.2, 1.0, 0.5, -3.0, 2.5], [0.3, 0.1, -2.0, 4.0, 4.0, -0.7, 1.1, 0.0, -1.0]], np.float32
  )
  history = np.array([[1, 3, 3, 6, 0], [2, 5, 8, 7, 2]])  # repeated ids are penalised once
  return scores, history


def test_repetition_penalty_matches_transformers():
  scores, history = crafted_scores()
  seen = np.zeros(scores.shape, bool)
  np.put_along_axis(seen, history, True, axis=1)
  ours = gen.penalize_repetition(jnp.asarray(scores), jnp.asarray(seen), 1.3)
  processor = logits_process.RepetitionPenaltyLogitsProcessor(1.3)
  expected = processor(torch.as_tensor(history), torch.as_tensor(scores)).numpy()
  np.testing.assert_allclose(np.asarray(ours), expected, rtol=0, atol=SCORE_TOL)


@pytest.mark.parametrize("top_k,top_p", [(4, 1.0), (0, 0.8), (5, 0.6), (3, 0.05)])
def test_top_k_top_p_match_transformers(top_k, top_p):
  scores, history = crafted_scores()
  scores = scores[:1] + np.linspace(0, 0.01, scores.shape[1], dtype=np.float32)  # no ties
  expected = torch.as_tensor(scores)
  if top_k:
    expected = logits_process.TopKLogitsWarper(top_k)(torch.as_tensor(history[:1]), expected)
  if top_p < 1:
    expected = logits_process.TopPLogitsWarper(top_p)(torch.as_tensor(history[:1]), expected)
  np.testing.assert_array_equal(np.asarray(gen.keep_top(jnp.asarray(scores), top_k, top_p)), expected.numpy())


def test_eos_stops_the_row_and_pads(model):
  free = run(model, PROMPTS).tokens
  eos_ids = [int(free[0, 3]), int(free[1, 4])]  # rows 0 and 1 end at their 4th and 5th token, or earlier
  out = run(model, PROMPTS, eos_ids=eos_ids)
  for row in range(len(PROMPTS)):
    hits = np.flatnonzero(np.isin(free[row], eos_ids))
    length = hits[0] + 1 if hits.size else NEW_TOKENS
    assert out.lengths[row] == length
    np.testing.assert_array_equal(out.tokens[row, :length], free[row, :length])
    assert np.all(out.tokens[row, length:] == PAD)


@pytest.mark.parametrize("sampled", [False, True])
def test_stream_gives_generates_tokens_one_at_a_time_compiling_once(model, sampled):
  sampling = settings(do_sample=True, temperature=1.5, top_k=20, top_p=0.9) if sampled else settings(repetition_penalty=1.3)
  key = jax.random.key(7) if sampled else None
  free = run(model, PROMPTS, sampling, key=key).tokens
  eos_ids = [int(free[0, 3]), int(free[1, 4])]  # rows end at different steps
  expected = run(model, PROMPTS, sampling, eos_ids, key)
  ids, mask = gen.left_pad(PROMPTS, PAD)

  def stream():
    return list(gen.stream(model, ids, mask, sampling=sampling, eos_ids=eos_ids, pad_id=PAD, key=key))

  before = gen.compilations()
  steps = stream()
  assert gen.compilations() - before <= 2  # a prefill and a step, not one per token
  assert [s.tokens.shape for s in steps] == [(len(PROMPTS), n) for n in range(1, len(steps) + 1)]
  for earlier, later in zip(steps, steps[1:]):
    np.testing.assert_array_equal(later.tokens[:, :-1], earlier.tokens)
  last = steps[-1]
  assert last.tokens.shape[1] == expected.lengths.max()  # it stops once every row has ended
  np.testing.assert_array_equal(last.lengths, expected.lengths)
  np.testing.assert_array_equal(last.tokens, expected.tokens[:, : last.tokens.shape[1]])
  before = gen.compilations()
  np.testing.assert_array_equal(stream()[-1].tokens, last.tokens)
  assert gen.compilations() == before


def test_generation_through_ltu_as_equals_argmax_over_full_forwards():
  tltr = TLTRConfig(dim=32, time_heads=1, layer_heads=4, mlp_dim=64)
  config = LtuAsConfig(llm=config_from_hf(HF_CONFIG), tltr=tltr, feature_layers=3, audio_tokens=4)
  model = LtuAs(config, rngs=nnx.Rngs(0))
  for _, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):  # wide weights: far from ties, as above
    var.set_value(var.get_value() * 10)
  features = np.random.default_rng(0).normal(size=(len(PROMPTS), 3, 4, 32)).astype(np.float32)
  assert gen.decoding_form(model).llm is model.llm  # it decodes through its LLM's decoding layout
  out = run(model, PROMPTS, context=features).tokens
  forward = nnx.jit(lambda m, f, ids, mask: m(f, ids, mask)[0])
  for row, prompt in enumerate(PROMPTS):
    expected = argmax_loop(lambda *a: forward(model, features[row : row + 1], *a), prompt, NEW_TOKENS)
    assert out[row].tolist() == expected

  text_only = run(model, PROMPTS).tokens  # the original's `asr_only` mode: no audio in the cache
  assert text_only[0].tolist() == argmax_loop(lambda *a: forward(model, None, *a), PROMPTS[0], NEW_TOKENS)


def test_audio_features_need_ltu_as(model):
  with pytest.raises(ValueError, match="takes no audio"):
    run(model, PROMPTS, context=np.zeros((3, 3, 4, 32), np.float32))


def test_ltu_as_preset_is_the_original():
  assert gen.LTU_AS_SAMPLING == gen.SamplingConfig(
    max_new_tokens=400, do_sample=True, temperature=0.1, top_k=500, top_p=0.95, repetition_penalty=1.1
  )


ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LAYOUT_TOL = 1e-5  # decode-step logits, decoding layout (fused, LoRA merged) vs the scanned layers, fp32


def with_adapters(model, seed: int):
  """A copy of `model` with LoRA on every projection, its B non-zero so that the adapters change the output."""
  config = dataclasses.replace(model.config, lora=LoRAConfig(rank=4, alpha=8.0, dropout=0.0, targets=ALL_TARGETS))
  adapted = Llama(config, rngs=nnx.Rngs(seed))
  nnx.update(adapted, nnx.state(model))
  for path, var in nnx.to_flat_state(nnx.state(adapted, LoRAParam)):
    if path[-1] == "lora_b":
      var.set_value(jax.random.normal(jax.random.key(seed), var.get_value().shape) * 0.5)
  return adapted


def test_decoding_layout_with_merged_adapters_equals_the_scanned_layers(model):
  adapted = with_adapters(model, seed=1)
  ids, mask = gen.left_pad(PROMPTS, PAD)
  next_ids = np.array([[3], [50], [7]], np.int32)

  @nnx.jit
  def step(decoder, ids, mask, next_ids):
    """(the prompt's last logits, the next step's logits)."""
    cache = decoder.init_cache(len(ids), ids.shape[1] + 1)
    logits, cache, carry = decoder.prefill(None, ids, mask, cache)
    return logits[:, -1], decoder.decode_step(carry, next_ids, cache)[0]

  layout, scanned = (step(d, ids, mask, next_ids) for d in (adapted.for_decoding(), adapted))
  for ours, theirs in zip(layout, scanned):  # the prompt's pass, then a step: both in the decoding layout
    assert max_abs_diff(ours, theirs) <= LAYOUT_TOL * np.max(np.abs(theirs))
  assert max_abs_diff(scanned[1], step(model, ids, mask, next_ids)[1]) > 0.1  # the adapters do count
  forward = nnx.jit(lambda m, ids, mask: m(ids, mask)[0])
  out = run(adapted, PROMPTS).tokens
  for row, prompt in enumerate(PROMPTS):
    assert out[row].tolist() == argmax_loop(lambda *a: forward(adapted, *a), prompt, NEW_TOKENS)


def test_decoding_layout_is_built_once_and_never_stale(model):
  adapted = with_adapters(model, seed=2)
  first = decoding_layout(adapted)
  assert decoding_layout(adapted) is first  # kept while the parameters are the same arrays
  before = run(adapted, PROMPTS).tokens
  assert decoding_layout(adapted) is first  # a decode leaves the parameters as they were
  # An update (as a training step makes) replaces the arrays: the next decode rebuilds the layout.
  nnx.update(adapted, nnx.state(with_adapters(model, seed=3), LoRAParam))
  assert decoding_layout(adapted) is not first
  after = run(adapted, PROMPTS).tokens
  assert not np.array_equal(before, after)
  forward = nnx.jit(lambda m, ids, mask: m(ids, mask)[0])
  assert after[0].tolist() == argmax_loop(lambda *a: forward(adapted, *a), PROMPTS[0], NEW_TOKENS)
