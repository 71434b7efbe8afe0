"""A tiny LTU-AS with random weights, a word-level tokenizer, records and cached features, for trainer tests."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess

import numpy as np
import soundfile as sf
import tokenizers
import transformers
from flax import nnx

from conversion import ltu_as
from ltu_jax import audio, data, model_folder
from ltu_jax.models.llama import Llama, LlamaConfig
from ltu_jax.models.whisper import Whisper, WhisperConfig

WORDS = "the a speaker is male female sound of bell siren says hello world quickly slowly what was said who".split()
SPECIALS = ["<unk>", "<s>", "</s>"]


def tokenizer() -> transformers.PreTrainedTokenizerFast:
  vocab = {token: i for i, token in enumerate(SPECIALS + WORDS + ["###", "Instruction:", "Input:", "Response:"])}
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
  return transformers.PreTrainedTokenizerFast(
    tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<unk>"
  )


def build(root: str, records: int = 48, seed: int = 0) -> dict[str, str]:
  """Writes llm/, whisper/, ltu_as/ model folders, train.json and features/ under `root`; returns their paths."""
  text = tokenizer()
  llm_config = LlamaConfig(
    vocab_size=len(text), hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2
  )
  paths = {name: os.path.join(root, name) for name in ("llm", "whisper", "ltu_as", "features")}
  llm = Llama(llm_config, rngs=nnx.Rngs(seed))
  # A wider output layer than the 0.02 init: a frozen random LLM must be able to express confident text.
  llm.lm_head.kernel.set_value(llm.lm_head.kernel.get_value() * 25)
  model_folder.save(
    paths["llm"], llm, "llama",
    extra={"bos_token_id": 1, "eos_token_ids": [2], "pad_token_id": 0}, tokenizer=text,
  )
  whisper_config = WhisperConfig(
    num_mel_bins=80, d_model=16, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=32, decoder_layers=1,
    decoder_attention_heads=2, decoder_ffn_dim=32, vocab_size=30, max_source_positions=500, max_target_positions=16,
  )
  model_folder.save(paths["whisper"], Whisper(whisper_config, rngs=nnx.Rngs(seed)), "whisper")
  ltu_as.convert(None, paths["llm"], paths["whisper"], paths["ltu_as"], seed=seed)

  rng = np.random.default_rng(seed)
  os.makedirs(paths["features"])
  rows = []
  for i in range(records):
    audio_id = f"/data/tiny/clips/set{i % 3}/clip{i}.wav"
    np.savez_compressed(
      os.path.join(paths["features"], data.feature_filename(audio_id)),
      rng.normal(size=(2, 25, 16)).astype(np.float16),
    )
    # Templated text, so that a few steps can learn it (random words would sit at the uniform loss).
    rows.append(dict(
      instruction=["who is the speaker", "what was said", "sound of what"][i % 3],
      input=["", "hello world", "the bell says hello"][int(rng.integers(3))],
      output=f"the speaker is {['male', 'female'][i % 2]}",
      audio_id=audio_id, dataset="tiny", task="test",
    ))
  paths["train"] = os.path.join(root, "train.json")
  with open(paths["train"], "w") as f:
    json.dump(rows, f)
  return paths


WHISPER_POSITIONS = 1500  # 30 s of encoder frames, as transcription needs


def build_answering(root: str, records: int = 48) -> dict[str, str]:
  """`build`'s parts, with an LTU-AS whose Whisper (the same encoder) can also transcribe: 30 s positions, a
  tokenizer and the ids that transcription needs. What infer, eval and the demo answer with; `root` too."""
  paths = build(root, records=records)
  config = model_folder.load(paths["whisper"], tokenizer=False).config
  inner = os.path.join(paths["ltu_as"], "whisper")
  shutil.rmtree(inner)
  text = tokenizer()
  extra = dict(
    decoder_start_token_id=1, eos_token_id=2, no_timestamps_token_id=0, suppress_tokens=[],
    begin_suppress_tokens=[2], text_vocab_size=len(text),
  )
  whisper = Whisper(dataclasses.replace(config, max_source_positions=WHISPER_POSITIONS), rngs=nnx.Rngs(0))
  model_folder.save(inner, whisper, "whisper", extra=extra, tokenizer=text)
  paths["root"] = root
  return paths


def speech_and_tone(folder: str) -> list[str]:
  """Two clips written to `folder`: an espeak-ng sentence (22.05 kHz: resampled on loading) and a 1.5 s
  440 Hz tone at 16 kHz."""
  speech = os.path.join(folder, "speech.wav")
  subprocess.run(["espeak-ng", "-w", speech, "the bell says hello"], check=True)
  tone = os.path.join(folder, "tone.wav")
  t = np.arange(int(1.5 * audio.SAMPLE_RATE)) / audio.SAMPLE_RATE
  sf.write(tone, 0.5 * np.sin(2 * np.pi * 440 * t), audio.SAMPLE_RATE)
  return [speech, tone]


def overrides(paths: dict[str, str], output_dir: str, **more) -> list[str]:
  """`--set` overrides that point tiny_stage3 at the built parts."""
  fields = {
    "model": paths["ltu_as"], "output_dir": output_dir, "data.train": paths["train"],
    "data.features": paths["features"], "optim.batch_size": 8, "optim.micro_batch_size": 4,
    "optim.lr": 1e-2, "optim.warmup_steps": 2, "optim.epochs": 4.0, "data.train_on_inputs": True,
    "log_every": 1, "checkpoint_every": 1,
    "optim.lr_scale.audio_encoder": 1.0,  # tiny_stage3 holds TLTR; these tests train and shard all of it
    **more,
  }
  return [f"{key}={value}" for key, value in fields.items()]
