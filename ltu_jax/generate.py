"""KV-cache decoding for the LLaMA family and LTU-AS: greedy or sampled, batched over left-padded prompts.

The next token is chosen as Hugging Face `generate` chooses it: repetition penalty on every token already in
the prompt or the output, then (when sampling) temperature, top-k and top-p; rows that produced an eos id
are padded afterwards. The whole decode (prefill and every step) is one jitted function.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.typing import ArrayLike

from ltu_jax.models.layers import KVCache
from ltu_jax.models.llama import Llama
from ltu_jax.models.ltu_as import LtuAs


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """How tokens are chosen. Greedy unless `do_sample`; `repetition_penalty` applies to both; temperature,
  `top_k` (0: off) and `top_p` (1: off) only when sampling."""

  max_new_tokens: int = 128
  do_sample: bool = False
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  repetition_penalty: float = 1.0

  def __post_init__(self):
    if self.max_new_tokens < 1:
      raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
    if self.temperature <= 0 or self.repetition_penalty <= 0:
      raise ValueError(f"temperature {self.temperature} and repetition_penalty {self.repetition_penalty} must be > 0")
    if self.top_k < 0 or not 0 < self.top_p <= 1:
      raise ValueError(f"top_k must be ≥ 0 and top_p in (0, 1], got {self.top_k}, {self.top_p}")


# LTU-AS's evaluation settings (ltu `src/ltu_as/inference_batch.py`; its demo allows 500 new tokens).
LTU_AS_SAMPLING = SamplingConfig(
  max_new_tokens=400, do_sample=True, temperature=0.1, top_k=500, top_p=0.95, repetition_penalty=1.1
)


class Generated(NamedTuple):
  """tokens: `[batch, max_new_tokens]` new tokens, `pad_id` after a row's eos; lengths: `[batch]` new tokens
  up to and including the eos."""

  tokens: jax.Array
  lengths: jax.Array


def generate(
  model: Llama | LtuAs,
  input_ids: ArrayLike,
  attention_mask: ArrayLike | None = None,
  *,
  features: ArrayLike | None = None,
  sampling: SamplingConfig = SamplingConfig(),
  eos_ids: Sequence[int] = (),
  pad_id: int = 0,
  key: jax.Array | None = None,
) -> Generated:
  """Continues each prompt of a batch.

  Args:
    model: a `Llama` or an `LtuAs`.
    input_ids: `[batch, len]` prompts, left-padded (see `left_pad`).
    attention_mask: `[batch, len]`, 0 on the padding; all ones when None.
    features: `[batch, layers, time, whisper_dim]` audio features for LTU-AS (None: text only).
    sampling: greedy or sampling settings.
    eos_ids: tokens that end a row.
    pad_id: what follows the end of a row.
    key: random key, needed when `sampling.do_sample`.
  """
  if sampling.do_sample and key is None:
    raise ValueError("sampling needs a random key: pass key=jax.random.key(seed)")
  if features is not None and not isinstance(model, LtuAs):
    raise ValueError(f"audio features need an LTU-AS model, got {type(model).__name__}")
  input_ids = jnp.asarray(input_ids, jnp.int32)
  attention_mask = jnp.ones_like(input_ids) if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
  key = jax.random.key(0) if key is None else key
  return _generate(model, features, input_ids, attention_mask, key, sampling, tuple(eos_ids), pad_id)


def _forward(model: Llama | LtuAs, features: jax.Array | None, ids: jax.Array, mask: jax.Array, cache: KVCache):
  """One cached call of either model: LTU-AS takes the audio first (None once it is in the cache)."""
  if isinstance(model, LtuAs):
    return model(features, ids, mask, cache=cache)
  return model(ids, mask, cache=cache)


# A jitted `while_loop` rather than a Python loop around a jitted step: one dispatch for the whole answer,
# no host round trip per token, and, unlike `scan`, it stops as soon as every row has ended.
@functools.partial(nnx.jit, static_argnames=("sampling", "eos_ids", "pad_id"))
def _generate(model, features, input_ids, attention_mask, key, sampling, eos_ids, pad_id) -> Generated:
  batch, prompt_len = input_ids.shape
  llm = model.llm if isinstance(model, LtuAs) else model
  audio_len = 0 if features is None else model.config.audio_tokens
  # The last new token is never fed back, so the cache needs one slot less than the full sequence.
  cache = llm.init_cache(batch, audio_len + prompt_len + sampling.max_new_tokens - 1)
  logits, cache = _forward(model, features, input_ids, attention_mask, cache)
  rows = jnp.arange(batch)
  seen = jnp.zeros((batch, logits.shape[-1]), bool).at[rows[:, None], input_ids].max(attention_mask.astype(bool))
  eos = jnp.asarray(eos_ids, jnp.int32)

  def emit(step, logits, tokens, lengths, done, seen):
    """Chooses token `step` from `logits` `[batch, vocab]` and records it."""
    token = next_token(logits, seen, jax.random.fold_in(key, step), sampling)
    token = jnp.where(done, pad_id, token)
    tokens = jax.lax.dynamic_update_slice(tokens, token[:, None], (0, step))
    lengths = lengths + (~done).astype(jnp.int32)
    seen = seen.at[rows, token].max(~done)
    return tokens, lengths, done | jnp.isin(token, eos), seen

  tokens = jnp.full((batch, sampling.max_new_tokens), pad_id, jnp.int32)
  lengths = jnp.zeros((batch,), jnp.int32)
  first = emit(0, logits[:, -1], tokens, lengths, jnp.zeros((batch,), bool), seen)

  def unfinished(carry):
    step, _, _, done, _, _ = carry
    return (step < sampling.max_new_tokens) & ~jnp.all(done)

  def body(carry):
    step, tokens, lengths, done, seen, cache = carry
    previous = jax.lax.dynamic_slice_in_dim(tokens, step - 1, 1, axis=1)
    logits, cache = _forward(model, None, previous, jnp.ones_like(previous), cache)
    return (step + 1, *emit(step, logits[:, 0], tokens, lengths, done, seen), cache)

  _, tokens, lengths, _, _, _ = jax.lax.while_loop(unfinished, body, (jnp.int32(1), *first, cache))
  return Generated(tokens, lengths)


def next_token(logits: jax.Array, seen: jax.Array, key: jax.Array, sampling: SamplingConfig) -> jax.Array:
  """Token ids `[batch]` from float32 logits `[batch, vocab]`; `seen` `[batch, vocab]` marks the tokens to penalise."""
  scores = logits.astype(jnp.float32)
  if sampling.repetition_penalty != 1.0:
    scores = penalize_repetition(scores, seen, sampling.repetition_penalty)
  if not sampling.do_sample:
    return jnp.argmax(scores, axis=-1).astype(jnp.int32)
  scores = keep_top(scores / sampling.temperature, sampling.top_k, sampling.top_p)
  return jax.random.categorical(key, scores, axis=-1).astype(jnp.int32)


def penalize_repetition(scores: jax.Array, seen: jax.Array, penalty: float) -> jax.Array:
  """HF's RepetitionPenaltyLogitsProcessor: the scores `[batch, vocab]` of `seen` tokens shrink towards zero
  (positive ones divided by `penalty`, negative ones multiplied)."""
  return jnp.where(seen, jnp.where(scores < 0, scores * penalty, scores / penalty), scores)


def keep_top(scores: jax.Array, top_k: int, top_p: float) -> jax.Array:
  """HF's top-k then top-p filters on `[batch, vocab]` scores; the rest become -inf.

  Both keep the scores at or above a per-row threshold, so one `top_k` (a partial sort when top_k is set)
  serves both: top-p keeps a token while the probability of the better tokens is below `top_p`.
  Tokens tied with the threshold are all kept (HF keeps them for top-k and splits them arbitrarily for top-p).
  """
  vocab = scores.shape[-1]
  k = min(top_k, vocab) if top_k > 0 else vocab
  if k == vocab and top_p >= 1.0:
    return scores
  best = jax.lax.top_k(scores, k)[0]  # [batch, k], descending
  threshold = best[:, -1]
  if top_p < 1.0:
    probs = jax.nn.softmax(best, axis=-1)
    better = jnp.cumsum(probs, axis=-1) - probs
    threshold = jnp.min(jnp.where(better < top_p, best, jnp.inf), axis=-1)
  return jnp.where(scores < threshold[:, None], -jnp.inf, scores)


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  """Token id lists → (`[batch, longest]` ids padded on the left, `[batch, longest]` attention mask)."""
  longest = max(len(s) for s in sequences)
  ids = np.full((len(sequences), longest), pad_id, np.int32)
  mask = np.zeros((len(sequences), longest), np.int32)
  for row, sequence in enumerate(sequences):
    if len(sequence):
      ids[row, -len(sequence):] = sequence
      mask[row, -len(sequence):] = 1
  return ids, mask


def complete(
  loaded: Any, prompt: str, sampling: SamplingConfig = SamplingConfig(), key: jax.Array | None = None
) -> str:
  """Continues `prompt` (tokenised as the tokenizer does by default) with a loaded "llama" model folder."""
  return _answer(loaded, loaded.tokenizer(prompt)["input_ids"], sampling, key)


def chat(
  loaded: Any,
  messages: Sequence[dict[str, str]],
  sampling: SamplingConfig = SamplingConfig(),
  key: jax.Array | None = None,
) -> str:
  """The assistant's reply to `messages` (`[{"role": "user", "content": ...}, ...]`), via the chat template."""
  tokenizer = loaded.tokenizer
  text = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
  # The template writes the special tokens itself.
  return _answer(loaded, tokenizer(text, add_special_tokens=False)["input_ids"], sampling, key)


def _answer(loaded: Any, prompt_ids: Sequence[int], sampling: SamplingConfig, key: jax.Array | None) -> str:
  if loaded.kind != "llama" or loaded.tokenizer is None:
    raise ValueError(f"text generation needs a 'llama' model folder with a tokenizer, got kind {loaded.kind!r}")
  eos_ids = loaded.extra.get("eos_token_ids", [])
  pad_id = loaded.extra.get("pad_token_id")
  pad_id = pad_id if pad_id is not None else (eos_ids[0] if eos_ids else 0)
  ids = np.asarray([prompt_ids], np.int32)
  out = generate(loaded.model, ids, sampling=sampling, eos_ids=eos_ids, pad_id=pad_id, key=key)
  return loaded.tokenizer.decode(np.asarray(out.tokens[0, : int(out.lengths[0])]), skip_special_tokens=True)
