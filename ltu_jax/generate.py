"""The one decoding engine: Whisper's decoder, the LLM and LTU-AS all decode here.

A model speaks the engine's protocol, and the engine never looks at what its context is (audio features,
a log-mel, nothing):
- `init_cache(batch, max_len)` → an empty `KVCache`;
- `prefill(context, input_ids, attention_mask, cache)` → (logits `[batch, len or 1, vocab]`, cache, carry):
  the prompt (with the context, e.g. LTU-AS's audio or Whisper's mel) goes in; only the last position's
  logits are read, so a model may compute those alone;
- `decode_step(carry, input_ids [batch, 1], cache)` → (logits `[batch, 1, vocab]`, cache): one token more
  (`carry` is what the prefill computed once, e.g. Whisper's cross-attention keys and values).
- optionally `for_decoding()` → a model of this protocol that the engine decodes with instead (the LLMs'
  per-layer layout, `llama.Decoding`: the same parameters, laid out for memory-bound steps, the prompt's
  pass included).

Prefill and the decode loop are one jitted function (a `while_loop`: one dispatch per batch, no host round
trip per token, and it stops once every row has ended). Its shapes come from a short fixed list: the batch
is padded up to one of `BATCH_BUCKETS` (copies of the first row, which never keep the loop running) and
the prompt is left-padded to a power of two (`prompt_bucket`), so a long evaluation compiles once per
bucket used, not once per batch. `compilations()` counts the traces. `stream` decodes the same tokens one
at a time for a caller that shows them as they come (the demo): a jitted prefill, then a jitted step per
token, both compiled once per bucket.

The next token is chosen as Hugging Face `generate` chooses it: suppressed tokens removed (Whisper's
suppress lists), repetition penalty on every token already in the prompt or the output, then (when
sampling) temperature, top-k and top-p; rows that produced an eos id are padded afterwards.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Iterator, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.typing import ArrayLike

# The compiled shapes: batch sizes, and prompt lengths rounded up to powers of two (`prompt_bucket`).
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
_traces = 0


def compilations() -> int:
  """How many times the engine has traced (so compiled) its decode functions in this process: `generate`'s
  prefill and loop count one, `stream`'s prefill and step one each."""
  return _traces


def batch_bucket(batch: int) -> int:
  """The smallest of `BATCH_BUCKETS` that holds `batch` rows (larger batches are decoded in chunks)."""
  return next((b for b in BATCH_BUCKETS if b >= batch), BATCH_BUCKETS[-1])


def prompt_bucket(length: int) -> int:
  """Prompt lengths are left-padded to the next power of two."""
  return 1 << max(0, length - 1).bit_length()


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
# Whisper's untimed greedy search; `transcribe` caps the length at what the decoder's positions hold.
WHISPER_SAMPLING = SamplingConfig(max_new_tokens=448)


class Generated(NamedTuple):
  """tokens: `[batch, max_new_tokens]` new tokens, `pad_id` after a row's eos; lengths: `[batch]` new tokens
  up to and including the eos."""

  tokens: jax.Array
  lengths: jax.Array


def generate(
  model: nnx.Module,
  input_ids: ArrayLike,
  attention_mask: ArrayLike | None = None,
  *,
  context: Any = None,
  sampling: SamplingConfig = SamplingConfig(),
  eos_ids: Sequence[int] = (),
  pad_id: int = 0,
  key: jax.Array | None = None,
  suppress: tuple[ArrayLike, ArrayLike] | None = None,
) -> Generated:
  """Continues each prompt of a batch.

  Args:
    model: any model of the engine's protocol (see the module docstring).
    input_ids: `[batch, len]` prompts, left-padded (see `left_pad`).
    attention_mask: `[batch, len]`, 0 on the padding; all ones when None.
    context: what the model's prefill takes beside the prompt, with a leading batch axis on every array
      (LTU-AS: features or `(features, audio_mask)`; Whisper: the log-mel); None for text only.
    sampling: greedy or sampling settings.
    eos_ids: tokens that end a row.
    pad_id: what follows the end of a row.
    key: random key, needed when `sampling.do_sample`.
    suppress: boolean `[vocab]` masks of tokens never chosen: (at the first new token, after it).
  Returns:
    The new tokens of each row, in the order given.
  """
  request = _Request.of(input_ids, attention_mask, context, sampling, eos_ids, pad_id, key, suppress)
  graphdef, params = nnx.split(decoding_form(model))
  chunks = []
  for start in range(0, len(request.input_ids), BATCH_BUCKETS[-1]):
    chunk = request.rows(slice(start, start + BATCH_BUCKETS[-1]))
    chunk = chunk if start == 0 else dataclasses.replace(chunk, key=jax.random.fold_in(request.key, start))
    padded, batch = chunk.bucketed()
    out = _generate(graphdef, params, padded.context, padded.input_ids, padded.attention_mask, padded.active, padded.key,
                    padded.suppress, padded.sampling, padded.eos_ids, padded.pad_id)
    chunks.append((out.tokens[:batch], out.lengths[:batch]))
  return Generated(*(jnp.concatenate(parts) for parts in zip(*chunks)))


def stream(
  model: nnx.Module,
  input_ids: ArrayLike,
  attention_mask: ArrayLike | None = None,
  *,
  context: Any = None,
  sampling: SamplingConfig = SamplingConfig(),
  eos_ids: Sequence[int] = (),
  pad_id: int = 0,
  key: jax.Array | None = None,
  suppress: tuple[ArrayLike, ArrayLike] | None = None,
) -> Iterator[Generated]:
  """`generate` one token at a time, for a caller that shows the text as it grows (the demo).

  Takes `generate`'s arguments, for at most `BATCH_BUCKETS[-1]` rows, and gives the same tokens (the same
  buckets, prefill, sampling keys and stopping rule), but the loop runs here: a jitted prefill, then a
  jitted step per token, each compiled once per bucket. Yields, after each new token, a `Generated` of
  numpy arrays: the tokens so far `[batch, step]` (`pad_id` after a row's eos) and their lengths `[batch]`;
  the last one is `generate`'s result without its trailing padding.
  """
  request = _Request.of(input_ids, attention_mask, context, sampling, eos_ids, pad_id, key, suppress)
  if len(request.input_ids) > BATCH_BUCKETS[-1]:
    raise ValueError(f"stream decodes at most {BATCH_BUCKETS[-1]} rows at once, got {len(request.input_ids)}")
  padded, batch = request.bucketed()
  graphdef, params = nnx.split(decoding_form(model))
  rules = (padded.sampling, padded.eos_ids, padded.pad_id)
  state, carry = _stream_start(graphdef, params, padded.context, padded.input_ids, padded.attention_mask,
                               padded.active, padded.key, padded.suppress, *rules)
  while True:
    # Sliced on the host: a device slice per new length would compile a kernel per token.
    step, done, tokens, lengths = jax.device_get((state.step, state.done, state.tokens, state.lengths))
    yield Generated(tokens[:batch, :step], lengths[:batch])
    if step == sampling.max_new_tokens or done.all():
      return
    state = _stream_step(graphdef, params, carry, state, padded.key, padded.suppress, *rules)


def decoding_form(model: nnx.Module) -> nnx.Module:
  """The form a model decodes in: its `for_decoding()` where it offers one (the LLMs' per-layer, fused
  layout, built once per set of parameters and kept), else the model itself."""
  return model.for_decoding() if hasattr(model, "for_decoding") else model


@dataclasses.dataclass(frozen=True)
class _Request:
  """`generate`'s arguments checked and as arrays; `active` marks the real rows (False on bucket padding)."""

  input_ids: np.ndarray
  attention_mask: np.ndarray
  context: Any
  sampling: SamplingConfig
  eos_ids: tuple[int, ...]
  pad_id: int
  key: jax.Array
  suppress: tuple[jax.Array, jax.Array] | None
  active: jax.Array | None = None  # set by `bucketed`

  @classmethod
  def of(cls, input_ids, attention_mask, context, sampling, eos_ids, pad_id, key, suppress) -> "_Request":
    if sampling.do_sample and key is None:
      raise ValueError("sampling needs a random key: pass key=jax.random.key(seed)")
    input_ids = np.asarray(input_ids, np.int32)
    attention_mask = np.ones_like(input_ids) if attention_mask is None else np.asarray(attention_mask, np.int32)
    return cls(
      input_ids, attention_mask, context, sampling, tuple(eos_ids), pad_id, jax.random.key(0) if key is None else key,
      None if suppress is None else tuple(jnp.asarray(m, bool) for m in suppress),
    )

  def rows(self, rows: slice) -> "_Request":
    return dataclasses.replace(
      self, input_ids=self.input_ids[rows], attention_mask=self.attention_mask[rows],
      context=jax.tree.map(lambda x: x[rows], self.context),
    )

  def bucketed(self) -> tuple["_Request", int]:
    """The batch padded into its bucket (rows copied from the first, inactive; left padding up to the
    prompt bucket), and how many rows are real."""
    batch, length = self.input_ids.shape
    extra_rows, extra_columns = batch_bucket(batch) - batch, prompt_bucket(length) - length

    def pad_rows(x):
      x = jnp.asarray(x)
      return jnp.concatenate([x, jnp.repeat(x[:1], extra_rows, axis=0)]) if extra_rows else x

    input_ids = np.pad(self.input_ids, ((0, 0), (extra_columns, 0)), constant_values=self.pad_id)
    attention_mask = np.pad(self.attention_mask, ((0, 0), (extra_columns, 0)))
    padded = dataclasses.replace(
      self, input_ids=pad_rows(input_ids), attention_mask=pad_rows(attention_mask),
      context=jax.tree.map(pad_rows, self.context), active=jnp.asarray(np.arange(batch + extra_rows) < batch),
    )
    return padded, batch


class _State(NamedTuple):
  """The decode loop's carry: the index of the next new token, the tokens `[batch, max_new_tokens]` and
  lengths `[batch]` so far, which rows have ended `[batch]`, the tokens each row has seen `[batch, vocab]`
  (for the repetition penalty), and the KV cache."""

  step: jax.Array
  tokens: jax.Array
  lengths: jax.Array
  done: jax.Array
  seen: jax.Array
  cache: Any


# `jax.jit` of the split model, not `nnx.jit`: nnx.jit writes the model's arrays back after each call as new
# array objects, which made `llama.fused_layers` rebuild the decoding layout on every call.
@functools.partial(jax.jit, static_argnames=("graphdef", "sampling", "eos_ids", "pad_id"))
def _generate(graphdef, params, context, input_ids, attention_mask, active, key, suppress, sampling, eos_ids, pad_id) -> Generated:
  model = nnx.merge(graphdef, params)
  rules = (sampling, eos_ids, pad_id)
  state, carry = _start(model, context, input_ids, attention_mask, active, key, suppress, *rules)

  def unfinished(state):
    return (state.step < sampling.max_new_tokens) & ~jnp.all(state.done)

  state = jax.lax.while_loop(unfinished, lambda state: _advance(model, carry, state, key, suppress, *rules), state)
  return Generated(state.tokens, state.lengths)


@functools.partial(jax.jit, static_argnames=("graphdef", "sampling", "eos_ids", "pad_id"))
def _stream_start(graphdef, params, context, input_ids, attention_mask, active, key, suppress, sampling, eos_ids, pad_id):
  model = nnx.merge(graphdef, params)
  return _start(model, context, input_ids, attention_mask, active, key, suppress, sampling, eos_ids, pad_id)


@functools.partial(
  jax.jit, static_argnames=("graphdef", "sampling", "eos_ids", "pad_id"), donate_argnames=("state",)
)
def _stream_step(graphdef, params, carry, state, key, suppress, sampling, eos_ids, pad_id) -> _State:
  global _traces
  _traces += 1
  return _advance(nnx.merge(graphdef, params), carry, state, key, suppress, sampling, eos_ids, pad_id)


def _start(model, context, input_ids, attention_mask, active, key, suppress, sampling, eos_ids, pad_id):
  """The prefill and the first new token: (`_State` at step 1, the model's decode carry)."""
  global _traces
  _traces += 1  # runs once per trace, that is once per compilation
  batch, prompt_len = input_ids.shape
  # The last new token is never fed back, so the cache needs one slot less than the full sequence.
  audio_len = _context_tokens(model, context)
  cache = model.init_cache(batch, audio_len + prompt_len + sampling.max_new_tokens - 1)
  logits, cache, carry = model.prefill(context, input_ids, attention_mask, cache)
  seen = jnp.zeros((batch, logits.shape[-1]), bool).at[jnp.arange(batch)[:, None], input_ids].max(
    attention_mask.astype(bool)
  )
  state = _State(
    jnp.int32(0), jnp.full((batch, sampling.max_new_tokens), pad_id, jnp.int32), jnp.zeros((batch,), jnp.int32),
    ~active, seen, cache,
  )
  return _emit(state, logits[:, -1], key, suppress, sampling, eos_ids, pad_id), carry


def _advance(model, carry, state: _State, key, suppress, sampling, eos_ids, pad_id) -> _State:
  """Feeds the last new token back and chooses the next."""
  previous = jax.lax.dynamic_slice_in_dim(state.tokens, state.step - 1, 1, axis=1)
  logits, cache = model.decode_step(carry, previous, state.cache)
  return _emit(state._replace(cache=cache), logits[:, 0], key, suppress, sampling, eos_ids, pad_id)


def _emit(state: _State, logits, key, suppress, sampling, eos_ids, pad_id) -> _State:
  """Chooses token `state.step` from `logits` `[batch, vocab]` and records it."""
  step = state.step
  if suppress is not None:
    logits = jnp.where(jnp.where(step == 0, suppress[0], suppress[1]), -jnp.inf, logits)
  token = next_token(logits, state.seen, jax.random.fold_in(key, step), sampling)
  token = jnp.where(state.done, pad_id, token)
  rows = jnp.arange(len(token))
  return _State(
    step + 1,
    jax.lax.dynamic_update_slice(state.tokens, token[:, None], (0, step)),
    state.lengths + (~state.done).astype(jnp.int32),
    state.done | jnp.isin(token, jnp.asarray(eos_ids, jnp.int32)),
    state.seen.at[rows, token].max(~state.done),
    state.cache,
  )


def _context_tokens(model: nnx.Module, context: Any) -> int:
  """Cache slots the context takes before the prompt (the model says, e.g. LTU-AS's audio tokens)."""
  count = getattr(model, "context_tokens", None)
  return 0 if count is None or context is None else count(context)


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
  """Continues `prompt` (tokenised as the tokenizer does by default) with a loaded LLM folder."""
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
  from ltu_jax import kinds  # the registry names this module's sampling presets

  kinds.require(loaded.kind, "chat", kinds.CHATS, loaded.folder)
  if loaded.tokenizer is None:
    raise ValueError(f"{loaded.folder} has no tokenizer to chat with")
  eos_ids = loaded.extra.get("eos_token_ids", [])
  pad_id = loaded.extra.get("pad_token_id")
  pad_id = pad_id if pad_id is not None else (eos_ids[0] if eos_ids else 0)
  ids = np.asarray([prompt_ids], np.int32)
  out = generate(loaded.model, ids, sampling=sampling, eos_ids=eos_ids, pad_id=pad_id, key=key)
  return loaded.tokenizer.decode(np.asarray(out.tokens[0, : int(out.lengths[0])]), skip_special_tokens=True)
