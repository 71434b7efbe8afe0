"""`python -m ltu_jax.transcribe --model DIR [--jsonl] [--batch-size N] AUDIO...`: English speech to text
with a converted Whisper folder (`python -m conversion.whisper`).

Decoding is Whisper's untimed greedy search over the standard 30 s window (longer audio is cut at 30 s):
- prompt `<|startoftranscript|> <|notimestamps|>`; a multilingual model (a vocabulary of 51865 ids or more,
  openai-whisper's own test) gets `<|en|> <|transcribe|>` after the start token;
- masked logits: the folder's `suppress_tokens` at every step, its `begin_suppress_tokens` at the first
  generated step, and every id from `text_vocab_size` on (timestamps);
- stop at `<|endoftext|>` or when `max_target_positions` tokens fill the decoder.
The encoder and the cross-attention keys run once per batch; each token is one jitted, cached decoder step.

Output: one line of text per file, or with `--jsonl` one `{"audio": PATH, "text": TEXT}` per file, in order.
A file that cannot be read does not stop the others: its error goes to stderr (and with `--jsonl` a
`{"audio": PATH, "error": MESSAGE}` line takes its place) and the command exits with status 1.
"""

from __future__ import annotations

import argparse
import functools
import sys
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ltu_jax import audio, model_folder
from ltu_jax.models.layers import KVCache

MULTILINGUAL_VOCAB = 51865


def prompt_ids(loaded: model_folder.Loaded) -> list[int]:
  """The decoder prompt for untimed English transcription (see the module docstring)."""
  extra = loaded.extra
  task = []
  if loaded.config.vocab_size >= MULTILINGUAL_VOCAB:
    vocab = loaded.tokenizer.get_vocab()
    task = [vocab["<|en|>"], vocab["<|transcribe|>"]]
  return [extra["decoder_start_token_id"], *task, extra["no_timestamps_token_id"]]


def suppress_masks(loaded: model_folder.Loaded) -> tuple[np.ndarray, np.ndarray]:
  """Boolean `[vocab]` masks of the ids never generated: at the first generated step, and after it."""
  extra = loaded.extra
  later = np.zeros(loaded.config.vocab_size, bool)
  later[extra["suppress_tokens"]] = True
  later[extra["text_vocab_size"] :] = True
  first = later.copy()
  first[extra["begin_suppress_tokens"]] = True
  return first, later


@functools.partial(jax.jit, static_argnums=0)
def _cross_kv(graphdef: nnx.GraphDef, state: nnx.State, mel: jax.Array) -> tuple[jax.Array, jax.Array]:
  """`mel` `[batch, n_mels, 3000]` → every decoder layer's cross-attention keys and values."""
  model = nnx.merge(graphdef, state)
  return model.decoder.cross_kv(model.encode(mel)[0])


@functools.partial(jax.jit, static_argnums=0, donate_argnums=4)
def _greedy_step(
  graphdef: nnx.GraphDef,
  state: nnx.State,
  tokens: jax.Array,
  cross_kv: tuple[jax.Array, jax.Array],
  cache: KVCache,
  suppress: jax.Array,
) -> tuple[jax.Array, KVCache]:
  """Feeds `tokens` `[batch, 1]`; returns the most likely unsuppressed next ids `[batch]` and the cache."""
  model = nnx.merge(graphdef, state)
  logits, cache = model.decoder(tokens, cross_kv, cache)
  return jnp.argmax(jnp.where(suppress, -jnp.inf, logits[:, -1]), axis=-1), cache


def greedy_tokens(loaded: model_folder.Loaded, waveforms: Sequence[np.ndarray]) -> list[list[int]]:
  """Generated ids (prompt and `<|endoftext|>` excluded) of each 16 kHz waveform `[samples]`, as one batch."""
  if not waveforms:
    return []
  config, eos = loaded.config, loaded.extra["eos_token_id"]
  graphdef, state = nnx.split(loaded.model)
  clips = np.stack([audio.pad_or_trim(np.asarray(w, np.float32), audio.WHISPER_SAMPLES) for w in waveforms])
  cross_kv = _cross_kv(graphdef, state, jnp.asarray(audio.whisper_mel(clips, config.num_mel_bins)))
  batch, prompt = len(clips), prompt_ids(loaded)
  first, later = (jnp.asarray(mask) for mask in suppress_masks(loaded))
  cache = loaded.model.init_cache(batch)
  # The prompt goes in token by token too, so that one compiled step serves the whole decode.
  for token in prompt[:-1]:
    _, cache = _greedy_step(graphdef, state, np.full((batch, 1), token, np.int32), cross_kv, cache, later)
  current = np.full(batch, prompt[-1], np.int32)
  generated: list[list[int]] = [[] for _ in range(batch)]
  done = np.zeros(batch, bool)
  for step in range(config.max_target_positions - len(prompt)):
    suppress = first if step == 0 else later
    next_ids, cache = _greedy_step(graphdef, state, current[:, None], cross_kv, cache, suppress)
    next_ids = np.asarray(next_ids)
    for row in np.flatnonzero(~done):
      if next_ids[row] == eos:
        done[row] = True
      else:
        generated[row].append(int(next_ids[row]))
    if done.all():
      break
    current = np.where(done, eos, next_ids).astype(np.int32)
  return generated


def transcribe_batch(loaded: model_folder.Loaded, waveforms: Sequence[np.ndarray]) -> list[str]:
  """The text of each 16 kHz waveform `[samples]`, decoded as Whisper does (special tokens skipped, stripped)."""
  return [loaded.tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in greedy_tokens(loaded, waveforms)]


def transcribe(loaded: model_folder.Loaded, waveform: np.ndarray) -> str:
  """The text of one 16 kHz waveform `[samples]`."""
  return transcribe_batch(loaded, [waveform])[0]


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m ltu_jax.transcribe", description=__doc__.split("\n\n")[0])
  parser.add_argument("--model", required=True, help="a Whisper model folder (python -m conversion.whisper)")
  parser.add_argument("--jsonl", action="store_true", help='print {"audio": PATH, "text": TEXT} lines')
  parser.add_argument("--batch-size", type=int, default=8, help="files transcribed together")
  parser.add_argument("audio", nargs="+", help="audio files (any format libsndfile reads)")
  args = parser.parse_args(argv)
  if args.batch_size < 1:
    parser.error("--batch-size must be at least 1")
  loaded = model_folder.load(args.model)
  if loaded.kind != "whisper":
    parser.error(f"{args.model} holds a {loaded.kind} model, not a Whisper")

  def respond(waveforms: dict[int, np.ndarray], batch: int) -> dict[int, tuple[dict, str]]:
    texts = transcribe_batch(loaded, list(waveforms.values()))
    return {index: ({"text": text}, text) for index, text in zip(waveforms, texts)}

  return audio.answer_files(args.audio, args.batch_size, respond, args.jsonl)

if __name__ == "__main__":
  sys.exit(main())
