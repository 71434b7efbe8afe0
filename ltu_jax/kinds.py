"""The registry of model kinds: the one place that knows which kinds exist and what each one is.

A model folder names its kind (`ltu_jax.json`); everything a command needs to know about that kind comes
from its entry here: config and model classes, the audio front end, the prompt format, how many audio
tokens a clip gives, the conversion module that makes such folders, the default sampling, and its
trainable parameter groups as regular expressions over parameter paths (big_vision's way), which the
trainer's `trainable` and `optim.lr_scale` settings name. A new kind is one entry here, its model file and
its conversion module. Commands ask `require(kind, command, needs)` and get a message that says what the
folder holds and how to make the folder they need; nothing outside this module compares kind names.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable

from ltu_jax import data, frontend
from ltu_jax.generate import LTU_AS_SAMPLING, WHISPER_SAMPLING, SamplingConfig
from ltu_jax.models.llama import Llama, LlamaConfig
from ltu_jax.models.ltu import Ltu, LtuConfig
from ltu_jax.models.ltu_as import LtuAs, LtuAsConfig
from ltu_jax.models.whisper import Whisper, WhisperConfig

# What a command can need of a kind.
AUDIO_LLM = "audio_llm"  # answers questions about audio: infer, eval, train, demo
TRANSCRIBES = "transcribes"  # speech to text: transcribe
CHATS = "chats"  # text in, text out: generate.chat / complete


@dataclasses.dataclass(frozen=True)
class Kind:
  """One model kind.

  name: as written in a model folder's `ltu_jax.json`.
  described: what a folder of this kind holds, in words ("an LLM", "a Whisper speech recogniser").
  config, model: the frozen config dataclass and the nnx module built from it.
  conversion: the module that writes such folders (`python -m <conversion>`).
  abilities: which of AUDIO_LLM, TRANSCRIBES, CHATS it has.
  frontend: the audio recipe, from the model config and the number of windows a clip may fill.
  prompt: `(instruction, transcript or None) -> text` before the answer (`data.prompt`, the original's
    `alpaca_short`); None for kinds without prompts.
  uses_transcript: whether the prompt carries the clip's transcript (LTU-AS's `### Input:`).
  whisper_features: whether the model reads the features of the Whisper folder it holds
    (`extra["whisper"]`, LTU-AS), cached or computed before it; else it reads its front end's windows
    (LTU's fbank) and encodes them itself.
  sampling: the default decoding settings.
  groups: trainable parameter groups, name → regular expression searched in a parameter's path
    (`llm/layers/attn/q_proj/lora_a`); the first group whose expression matches owns the parameter.
  """

  name: str
  described: str
  config: type
  model: type
  conversion: str
  abilities: frozenset[str]
  frontend: Callable[[Any, int], frontend.Frontend] | None = None
  prompt: Callable[[str, str | None], str] | None = None
  uses_transcript: bool = False
  whisper_features: bool = False
  sampling: SamplingConfig = SamplingConfig()
  groups: tuple[tuple[str, str], ...] = ()

  def group_of(self, path: str) -> str | None:
    """The trainable group that owns the parameter at `path` ("a/b/c"), or None."""
    return next((name for name, pattern in self.groups if re.search(pattern, path)), None)


def _ltu_as_frontend(config: LtuAsConfig, max_windows: int) -> frontend.Frontend:
  return frontend.LtuAsWindows(n_mels=config.n_mels, max_windows=max_windows, tokens_per_window=config.audio_tokens)


def _ltu_frontend(config: LtuConfig, max_windows: int) -> frontend.Frontend:
  return frontend.LtuFbankWindows(
    n_mels=config.encoder.mel_bins, max_windows=max_windows, tokens_per_window=config.audio_tokens,
    window_frames=config.encoder.frames,
  )


AUDIO_LLM_GROUPS = (("audio_encoder", r"^audio_encoder\b"), ("audio_proj", r"^audio_proj\b"), ("lora", r"lora_[ab]$"))


def _whisper_frontend(config: WhisperConfig, max_windows: int) -> frontend.Frontend:
  del max_windows  # long-form transcription windows the audio itself (`transcribe`)
  return frontend.WhisperLogMel(n_mels=config.num_mel_bins)


KINDS: dict[str, Kind] = {
  kind.name: kind
  for kind in (
    Kind(
      name="whisper",
      described="a Whisper speech recogniser",
      config=WhisperConfig,
      model=Whisper,
      conversion="conversion.whisper",
      abilities=frozenset({TRANSCRIBES}),
      frontend=_whisper_frontend,
      sampling=WHISPER_SAMPLING,
    ),
    Kind(
      name="llama",
      described="an LLM (LLaMA family)",
      config=LlamaConfig,
      model=Llama,
      conversion="conversion.llm",
      abilities=frozenset({CHATS}),
      groups=(("lora", r"lora_[ab]$"),),
    ),
    Kind(
      name="ltu_as",
      described="LTU-AS (Whisper features, TLTR and an LLM with LoRA)",
      config=LtuAsConfig,
      model=LtuAs,
      conversion="conversion.ltu_as",
      abilities=frozenset({AUDIO_LLM}),
      frontend=_ltu_as_frontend,
      prompt=data.prompt,
      uses_transcript=True,
      whisper_features=True,
      sampling=LTU_AS_SAMPLING,
      groups=AUDIO_LLM_GROUPS,
    ),
    Kind(
      name="ltu",
      described="LTU (Kaldi fbank, CAV-MAE and an LLM with LoRA)",
      config=LtuConfig,
      model=Ltu,
      conversion="conversion.ltu",
      abilities=frozenset({AUDIO_LLM}),
      frontend=_ltu_frontend,
      prompt=data.prompt,
      sampling=LTU_AS_SAMPLING,  # LTU's evaluation samples as LTU-AS's (facts §1.9)
      groups=AUDIO_LLM_GROUPS,
    ),
  )
}

NEEDS = {
  AUDIO_LLM: ("a model with audio", "ltu_as"),
  TRANSCRIBES: ("a Whisper model", "whisper"),
  CHATS: ("an LLM", "llama"),
}


def get(name: str) -> Kind:
  if name not in KINDS:
    raise ValueError(f"unknown model kind {name!r}; expected one of {sorted(KINDS)}")
  return KINDS[name]


def require(name: str, command: str, needs: str, where: str = "this folder") -> Kind:
  """The kind `name`, if it has the ability `needs`; else an error for `command` that says what the folder
  holds and how to make one that fits ("`train` needs a model with audio; ... holds an LLM: ...")."""
  kind = get(name)
  if needs not in kind.abilities:
    what, example = NEEDS[needs]
    raise ValueError(
      f"`{command}` needs {what}; {where} holds {kind.described} (kind {name!r}): "
      f"convert one with python -m {KINDS[example].conversion}"
    )
  return kind
