"""The embedded default's dataset: a small LTU-AS question-answer set built offline from real audio.

`python -m ltu_jax.tiny_data OUT_DIR [--seed S] [--train N] [--test M] [--transcriber MODEL_DIR]`

Speech is espeak-ng reading known English sentences in male and female voices at three speaking rates
and two pitches; sounds are seven classes synthesised in numpy with per-clip random variation; some
clips put speech over a background sound. One sound clip in eight lasts 12-28 s (2-5 s the others), so
that LTU-AS's long audio (several 10 s windows) is trained and scored. The questions are LTU-AS's kinds (ASR, gender, speed, pitch,
sound, open-ended), each asked in several paraphrases so the model has to read the instruction.

    OUT_DIR/
      audio/                 16 kHz mono 16-bit wavs, at most 30 s, named `{split}_{index}_{kind}_{hash}.wav`
      train.json             every question of the train clips (stage 3, the full mix)
      classification.json    the closed-ended classification questions of the train clips (stages 1 and 2)
      closed.json            every closed-ended question of the train clips (LTU's stage 3)
      test.json              every question of the held-out clips, in its canonical (evaluation) wording
      test_choices.json      multiple-choice questions about the held-out clips, in MMAU's format
      labels.json            the label names of each closed-ended task (`python -m ltu_jax.eval --labels`)
      transcripts.json       Whisper transcripts, cached per audio file (only with --transcriber)

Each JSON file is a list of records with the six LTU fields (facts §4.1):
  instruction, input (the transcript; "" without speech), output, audio_id (absolute path),
  dataset ("tiny_ltu_as"), task (one of TASKS)
and two more:
  labels         the clip's ground truth for evaluation: {"speech": bool, "text", "gender", "speed",
                 "pitch": str or None when there is no speech, "sound": a SOUNDS class, or "speech" for a
                 clip of speech alone}
  input_source   "whisper" (transcribed), "reference" (the sentence espeak-ng read) or "none" (no speech)
  label          in closed-ended records only, the truth that `ltu_jax.eval` scores: the class of gender,
                 speed and pitch; the list of classes heard for sound ("speech" and/or a SOUNDS class)

test_choices.json is a list of MMAU items, `{"id", "audio_id", "question", "choices", "answer" (the right
choice), "dataset", "task" (MMAU's category: "speech" or "sound"), "sub-category" (gender, speed, pitch or
sound), "input" (the transcript, which MMAU lacks)}`: per speech clip its gender, speed and pitch, per clip
with a sound that sound among MC_SOUND_CHOICES classes, the choices in a drawn order.

Whisper's transcripts aside, the build is a pure function of the seed and sizes: every clip's recipe is
drawn first, its audio is a function of its recipe alone, and the recipe's hash names its file, so a
re-run skips the files it finds.
Test clips are disjoint from train clips, and the last HELD_OUT_SENTENCES sentences are read only in
test clips.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import os
import subprocess
from typing import Any, Callable

import librosa
import numpy as np
import soundfile as sf
from tqdm import tqdm

from ltu_jax import kinds, model_folder, transcribe
from ltu_jax.audio import RESAMPLER, SAMPLE_RATE, load_audio

DATASET = "tiny_ltu_as"
# bump when the synthesis changes, so that files made by the old recipe are not reused
RECIPE_VERSION = 1
MAX_SECONDS = 30.0
LONG_SOUND_EVERY = 8  # of the sound clips, one in this many is long
# clips; with about 5 questions each, ~2000 train records keep the tiny 3-stage training short on a CPU
DEFAULT_TRAIN = 400
DEFAULT_TEST = 80
# clips per Whisper call: every clip is padded to 30 s, so a batch costs one encoder pass
TRANSCRIBE_BATCH = 8

SENTENCES = (
  "The cat sat on the warm windowsill.",
  "Please close the door when you leave.",
  "We walked to the park after lunch.",
  "My brother likes to read old books.",
  "The river runs past the small village.",
  "She bought fresh bread at the market.",
  "It rained all day on Sunday.",
  "The children played in the garden until dark.",
  "Turn left at the next corner.",
  "He forgot his umbrella on the train.",
  "The coffee is too hot to drink.",
  "Our team won the game last night.",
  "The garden is full of red flowers.",
  "I will call you tomorrow morning.",
  "The little boat drifted across the quiet lake.",
  "Can you pass me the salt, please?",
  "The museum opens at nine o'clock.",
  "A yellow kite flew over the beach.",
  "They painted the kitchen green.",
  "The baker wakes up before sunrise.",
  "We need more chairs for the party.",
  "The old clock on the wall has stopped.",
  "My friend lives near the train station.",
  "The dog chased the ball across the yard.",
  "Snow covered the roofs of the houses.",
  "Please write your name on the paper.",
  "The soup needs a little more salt.",
  "She plays the piano every evening.",
  "The bus was late again this morning.",
  "I left my keys on the kitchen table.",
  "The mountains look beautiful in the spring.",
  "He fixed the broken chair with glue.",
  "We watched the stars from the hill.",
  "The shop on the corner sells fresh fruit.",
  "Let us meet at the library at noon.",
  "The farmer planted corn in the field.",
  "Water the plants twice a week.",
  "The letter arrived three days late.",
  "My sister is learning to swim.",
  "The wind blew the leaves across the road.",
  "Dinner will be ready in ten minutes.",
  "The teacher smiled at the students.",
  "A green apple fell from the tree.",
  "They sailed to the island in a small boat.",
  "The lamp in the hall is broken.",
  "Bring a warm coat for the trip.",
  "The birds sing outside my window every morning.",
  "Our neighbors have a new blue car.",
)
HELD_OUT_SENTENCES = 8

# espeak-ng voice variants (m1 and m4 turn creaky at a low pitch: a pitch tracker finds no voicing)
VOICES = {"male": ("en+m2", "en+m3", "en+m5", "en+m6"), "female": ("en+f1", "en+f2", "en+f3", "en+f4")}
# espeak-ng `-s` words per minute, drawn uniformly in the range
SPEEDS = {"slow": (100, 120), "normal": (150, 170), "fast": (215, 245)}
# espeak-ng `-p` (0-99), relative to the voice's gender; a man's high pitch stays below a woman's low one
# (median F0 at most ~125 Hz vs at least ~150 Hz) so that gender is still heard in the voice
PITCHES = {
  ("male", "low"): (15, 25),
  ("male", "high"): (60, 70),
  ("female", "low"): (38, 48),
  ("female", "high"): (85, 95),
}


def _siren(samples: int, rng: np.random.Generator) -> np.ndarray:
  """A tone sliding up and down around 550-850 Hz, with a weak second harmonic."""
  t = np.arange(samples) / SAMPLE_RATE
  centre = rng.uniform(550, 850)
  frequency = centre * (1 + rng.uniform(0.25, 0.45) * np.sin(2 * np.pi * rng.uniform(0.4, 1.2) * t))
  phase = 2 * np.pi * np.cumsum(frequency) / SAMPLE_RATE
  return np.sin(phase) + 0.3 * np.sin(2 * phase)


def _beeping(samples: int, rng: np.random.Generator) -> np.ndarray:
  """A 700-2200 Hz tone switched on for 80-250 ms every 180-650 ms."""
  t = np.arange(samples) / SAMPLE_RATE
  on = rng.uniform(0.08, 0.25)
  gate = (t % (on + rng.uniform(0.1, 0.4))) < on
  # 5 ms ramps: a hard gate would add clicks that are not part of a beep
  ramp = np.hanning(int(0.01 * SAMPLE_RATE))
  gate = np.convolve(gate.astype(np.float64), ramp / ramp.sum(), mode="same")
  return gate * np.sin(2 * np.pi * rng.uniform(700, 2200) * t)


def _white_noise(samples: int, rng: np.random.Generator) -> np.ndarray:
  """Gaussian white noise."""
  return rng.standard_normal(samples)


def _bell(samples: int, rng: np.random.Generator) -> np.ndarray:
  """One to three strikes of five inharmonic partials on 400-850 Hz that decay, the higher ones faster."""
  t = np.arange(samples) / SAMPLE_RATE
  # the top partial (8.93 x) stays below the 8 kHz Nyquist frequency
  fundamental, decay = rng.uniform(400, 850), rng.uniform(0.6, 1.5)
  strike = np.zeros_like(t)
  for ratio, amplitude in zip((1.0, 2.0, 2.76, 5.4, 8.93), (1.0, 0.6, 0.4, 0.25, 0.15)):
    strike += amplitude * np.exp(-t * (1 + ratio / 2) / decay) * np.sin(2 * np.pi * ratio * fundamental * t)
  waveform = np.zeros_like(t)
  for start in np.arange(rng.integers(1, 4)) * rng.uniform(0.6, 1.2):
    offset = int(start * SAMPLE_RATE)
    waveform[offset:] += strike[: len(t) - offset]
  return waveform


def _engine_hum(samples: int, rng: np.random.Generator) -> np.ndarray:
  """A 35-80 Hz buzz (a sawtooth's first 12 harmonics) with a slow wobble, over low rumble."""
  t = np.arange(samples) / SAMPLE_RATE
  fundamental = rng.uniform(35, 80)
  buzz = sum(np.sin(2 * np.pi * k * fundamental * t) / k for k in range(1, 13))
  wobble = 1 + 0.2 * np.sin(2 * np.pi * rng.uniform(2, 6) * t)
  # a 5 ms moving average keeps the noise below ~200 Hz, a rumble rather than a hiss
  width = int(0.005 * SAMPLE_RATE)
  rumble = np.convolve(rng.standard_normal(len(t)), np.ones(width) / np.sqrt(width), mode="same")
  return wobble * buzz + 0.3 * rumble


def _whistle(samples: int, rng: np.random.Generator) -> np.ndarray:
  """A 1200-2800 Hz tone with 4-7 Hz vibrato and a slight glide, plus a little breath noise."""
  t = np.arange(samples) / SAMPLE_RATE
  vibrato = 1 + rng.uniform(0.01, 0.03) * np.sin(2 * np.pi * rng.uniform(4, 7) * t)
  frequency = rng.uniform(1200, 2800) * (1 + rng.uniform(-0.15, 0.15) * t / t[-1]) * vibrato
  return np.sin(2 * np.pi * np.cumsum(frequency) / SAMPLE_RATE) + 0.03 * rng.standard_normal(len(t))


def _tapping(samples: int, rng: np.random.Generator) -> np.ndarray:
  """Knocks every 0.2-0.6 s (with timing jitter): a damped 150-400 Hz resonance plus a short noise burst."""
  seconds = samples / SAMPLE_RATE
  kernel_t = np.arange(int(0.15 * SAMPLE_RATE)) / SAMPLE_RATE
  knock = np.exp(-kernel_t / 0.02) * np.sin(2 * np.pi * rng.uniform(150, 400) * kernel_t)
  knock += 0.5 * np.exp(-kernel_t / 0.004) * rng.standard_normal(len(kernel_t))
  interval = rng.uniform(0.2, 0.6)
  onsets = np.arange(0.05, seconds - 0.15, interval)
  onsets = onsets + rng.uniform(-0.03, 0.03, size=len(onsets))
  impulses = np.zeros(samples)
  impulses[np.clip((onsets * SAMPLE_RATE).astype(int), 0, samples - 1)] = rng.uniform(0.6, 1.0, size=len(onsets))
  return np.convolve(impulses, knock)[:samples]


@dataclasses.dataclass(frozen=True)
class Sound:
  """A sound class: its synthesiser, and the words that describe it in answers."""

  synthesise: Callable[[int, np.random.Generator], np.ndarray]  # (samples, rng) -> [samples]
  phrase: str  # "the sound of {phrase}"
  evidence: str  # what is heard, for the open-ended answer's "why"
  inference: str  # what that suggests


SOUNDS = {
  "siren": Sound(
    _siren, "a siren", "a tone that keeps rising and falling", "an emergency vehicle may be nearby"
  ),
  "beeping": Sound(
    _beeping, "beeping", "a tone that switches on and off in short pulses", "a machine or an alarm is giving a signal"
  ),
  "white noise": Sound(
    _white_noise, "white noise", "a steady hiss over all frequencies", "a fan, static or another steady noise is near"
  ),
  "bell": Sound(
    _bell, "a bell", "ringing tones that fade slowly after each strike", "a bell or a chime is being struck"
  ),
  "engine hum": Sound(
    _engine_hum, "an engine hum", "a low, steady buzz", "an engine or a motor is running nearby"
  ),
  "whistle": Sound(
    _whistle, "a whistle", "a high, clear tone that wavers slightly", "someone or something is whistling"
  ),
  "tapping": Sound(
    _tapping, "tapping", "short, dull knocks in a rhythm", "someone is tapping or knocking on a surface"
  ),
}

OPEN_ENDED = "open-ended question"
TASKS = ("asr", "gender", "speed", "pitch", "sound", OPEN_ENDED)
# LTU-AS's stages 1-2 train on closed-ended classification only (facts §3.2)
CLASSIFICATION_TASKS = ("gender", "speed", "pitch", "sound")
SPEECH_TASKS = ("asr", "gender", "speed", "pitch")
# the first wording of each task is the canonical one, the evaluation question of facts §6.1 where it has one
QUESTIONS = {
  "asr": (
    "Closed-ended question: Can you identify the spoken text?",
    "What does the speaker say?",
    "Transcribe the speech.",
    "What words are spoken in this clip?",
  ),
  "gender": (
    "Is the speaker male or female? Output an answer anyways.",
    "What is the gender of the speaker?",
    "Is this voice a man's or a woman's?",
    "Who is speaking, a man or a woman?",
  ),
  "speed": (
    "How fast does the speaker talk?",
    "What is the speaking rate of the speaker?",
    "Is the speech slow, normal or fast?",
    "Describe the speed of the speech.",
  ),
  "pitch": (
    "What is the pitch of the speaker's voice?",
    "Is the speaker's voice high or low?",
    "Describe the pitch of the voice.",
    "Does the speaker have a high-pitched or a low-pitched voice?",
  ),
  "sound": (
    "Close-ended question: Write an audio caption describing the sound.",
    "What sound is heard in this clip?",
    "Which sounds can you hear?",
    "Identify the sound in the recording.",
  ),
  "open-ended question": (
    "What can be inferred from the spoken text and sounds? Why?",
    "What can be inferred from the audio? Why?",
    "Describe what is happening in this recording.",
    "What is going on in this audio, and how can you tell?",
  ),
}
SPEED_WORDS = {"slow": "slowly", "normal": "at a normal pace", "fast": "quickly"}
# the multiple-choice split's questions; their choices are the task's classes (sound: MC_SOUND_CHOICES of them)
CHOICE_QUESTIONS = {
  "gender": "What is the speaker's gender?",
  "speed": "How fast does the speaker talk?",
  "pitch": "How high is the speaker's voice?",
  "sound": "Which sound is heard, apart from any speech?",
}
MC_SOUND_CHOICES = 4


def class_names() -> dict[str, list[str]]:
  """Each closed-ended task's classes: the label file `labels.json`."""
  return {
    "gender": list(VOICES), "speed": list(SPEEDS), "pitch": ["low", "high"], "sound": ["speech", *SOUNDS],
  }


@dataclasses.dataclass(frozen=True)
class Clip:
  """One clip's recipe. Its audio is a function of these fields alone (see `render`).

  kind: "speech" (a sentence alone), "mixed" (a sentence over a sound) or "sound" (a sound alone).
  The speech fields are None for "sound" clips, `sound` is None for "speech" clips.
  """

  split: str
  index: int
  kind: str
  seed: int  # for the sound, the padding and the level
  text: str | None = None
  voice: str | None = None
  gender: str | None = None
  speed: str | None = None
  words_per_minute: int | None = None
  pitch: str | None = None
  espeak_pitch: int | None = None
  sound: str | None = None
  sound_seconds: float | None = None  # a "sound" clip's length; "mixed" clips last as long as the speech

  @property
  def file_name(self) -> str:
    """`{split}_{index}_{kind}_{hash of the recipe}.wav`: a changed recipe never reuses an old file."""
    recipe = json.dumps([RECIPE_VERSION, dataclasses.asdict(self)], sort_keys=True)
    digest = hashlib.sha1(recipe.encode()).hexdigest()[:10]
    return f"{self.split}_{self.index:04d}_{self.kind}_{digest}.wav"

  @property
  def labels(self) -> dict[str, Any]:
    """The ground truth stored with every record (see the module docstring)."""
    return {
      "speech": self.kind != "sound",
      "text": self.text,
      "gender": self.gender,
      "speed": self.speed,
      "pitch": self.pitch,
      "sound": self.sound if self.sound is not None else "speech",
    }


def plan_clips(seed: int, train: int, test: int) -> list[Clip]:
  """Draws every clip's recipe: `train` clips then `test` clips, a quarter each "mixed" and "sound".

  Train clips read only the first `len(SENTENCES) - HELD_OUT_SENTENCES` sentences; test clips read any.
  """
  rng = np.random.default_rng(seed)
  clips = []
  for split, count, sentences in (
    ("train", train, SENTENCES[:-HELD_OUT_SENTENCES]),
    ("test", test, SENTENCES),
  ):
    for index in range(count):
      # a fixed cycle rather than a draw keeps the kinds' shares exact even in a tiny build
      kind = ("speech", "mixed", "speech", "sound")[index % 4]
      fields: dict[str, Any] = {"split": split, "index": index, "kind": kind, "seed": int(rng.integers(2**31))}
      if kind != "sound":
        gender = str(rng.choice(list(VOICES)))
        speed = str(rng.choice(list(SPEEDS)))
        pitch = str(rng.choice(["low", "high"]))
        fields.update(
          text=str(rng.choice(sentences)),
          voice=str(rng.choice(VOICES[gender])),
          gender=gender,
          speed=speed,
          words_per_minute=int(rng.integers(*SPEEDS[speed], endpoint=True)),
          pitch=pitch,
          espeak_pitch=int(rng.integers(*PITCHES[gender, pitch], endpoint=True)),
        )
      if kind != "speech":
        fields["sound"] = str(rng.choice(list(SOUNDS)))
      if kind == "sound":
        long = index // 4 % LONG_SOUND_EVERY == 0
        fields["sound_seconds"] = round(float(rng.uniform(12.0, 28.0) if long else rng.uniform(2.0, 5.0)), 2)
      clips.append(Clip(**fields))
  return clips


def speak(text: str, voice: str, words_per_minute: int, pitch: int) -> np.ndarray:
  """espeak-ng reading `text`, resampled to 16 kHz: `[samples]` float32."""
  wav = subprocess.run(
    ["espeak-ng", "-v", voice, "-s", str(words_per_minute), "-p", str(pitch), "--stdout", text],
    capture_output=True,
    check=True,
  ).stdout
  waveform, rate = sf.read(io.BytesIO(wav), dtype="float32")
  return librosa.resample(waveform, orig_sr=rate, target_sr=SAMPLE_RATE, res_type=RESAMPLER)


def _fade(waveform: np.ndarray) -> np.ndarray:
  """10 ms fades, so no clip starts or ends with a click."""
  ramp = np.linspace(0.0, 1.0, int(0.01 * SAMPLE_RATE))
  waveform = waveform.copy()
  waveform[: len(ramp)] *= ramp
  waveform[-len(ramp) :] *= ramp[::-1]
  return waveform


def _rms(waveform: np.ndarray) -> float:
  return float(np.sqrt(np.mean(waveform**2)))


def render(clip: Clip) -> np.ndarray:
  """The clip's audio, `[samples]` float32 at 16 kHz, peak 0.3-0.9.

  Speech gets 0.1-0.5 s of padding on each side; a "mixed" clip's sound fills the whole clip, 5-15 dB
  below the speech (in RMS).
  """
  rng = np.random.default_rng(clip.seed)
  if clip.kind == "sound":
    waveform = _fade(SOUNDS[clip.sound].synthesise(round(clip.sound_seconds * SAMPLE_RATE), rng))
  else:
    speech = speak(clip.text, clip.voice, clip.words_per_minute, clip.espeak_pitch).astype(np.float64)
    before, after = (int(s * SAMPLE_RATE) for s in rng.uniform(0.1, 0.5, size=2))
    waveform = np.concatenate([np.zeros(before), speech, np.zeros(after)])
    if clip.kind == "mixed":
      background = _fade(SOUNDS[clip.sound].synthesise(len(waveform), rng))
      snr_db = rng.uniform(5, 15)
      waveform = waveform + background * _rms(speech) / _rms(background) * 10 ** (-snr_db / 20)
  waveform = waveform * rng.uniform(0.3, 0.9) / np.max(np.abs(waveform))
  if len(waveform) > MAX_SECONDS * SAMPLE_RATE:
    seconds = len(waveform) / SAMPLE_RATE
    raise ValueError(f"clip {clip.file_name} lasts {seconds:.1f} s; the tiny set's clips last at most {MAX_SECONDS} s")
  return waveform.astype(np.float32)


def answer(clip: Clip, task: str) -> str:
  """The answer to a `task` question about `clip`: a short sentence that names the label verbatim."""
  sound = SOUNDS.get(clip.sound)
  if task == "asr":
    return clip.text
  if task == "gender":
    return f"The speaker is {clip.gender}."
  if task == "speed":
    return f"The speaker talks {SPEED_WORDS[clip.speed]}."
  if task == "pitch":
    return f"The speaker has a {clip.pitch}-pitched voice."
  if task == "sound":
    if sound is None:
      return "The sound of speech."
    return f"The sound of {'speech and ' if clip.kind == 'mixed' else ''}{sound.phrase}."
  if task == "open-ended question":
    if clip.kind == "sound":
      return f"No one speaks. The sound of {sound.phrase} is heard: {sound.evidence}, so {sound.inference}."
    said = f'A {clip.gender} speaker says: "{clip.text}"'
    if clip.kind == "mixed":
      return f"{said} Behind the voice there is the sound of {sound.phrase}: {sound.evidence}, so {sound.inference}."
    pronoun = "He" if clip.gender == "male" else "She"
    return (
      f"{said} {pronoun} talks {SPEED_WORDS[clip.speed]} in a {clip.pitch}-pitched voice, and no other sound is"
      " heard, so this is one person speaking in a quiet place."
    )
  raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")


def records(
  clip: Clip, audio_path: str, transcript: str | None, rng: np.random.Generator | None
) -> list[dict[str, Any]]:
  """The clip's LTU records, one per task that applies to it.

  Each question is a paraphrase drawn with `rng`, or the canonical wording when `rng` is None (test).
  `transcript` is Whisper's text, or None to use the reference sentence.
  """
  if clip.kind == "sound":
    tasks, text, source = ("sound", "open-ended question"), "", "none"
  elif transcript is None:
    tasks, text, source = TASKS, clip.text, "reference"
  else:
    tasks, text, source = TASKS, transcript, "whisper"
  return [
    {
      "instruction": QUESTIONS[task][0 if rng is None else int(rng.integers(len(QUESTIONS[task])))],
      "input": text,
      "output": answer(clip, task),
      "audio_id": audio_path,
      "dataset": DATASET,
      "task": task,
      "labels": clip.labels,
      "input_source": source,
      **({"label": label(clip, task)} if task in CLASSIFICATION_TASKS else {}),
    }
    for task in tasks
  ]


def label(clip: Clip, task: str) -> str | list[str]:
  """The truth of a closed-ended `task` about `clip`: a class, or for sound the list of classes heard."""
  if task == "sound":
    return (["speech"] if clip.kind != "sound" else []) + ([clip.sound] if clip.sound else [])
  return getattr(clip, task)


def choice_items(clip: Clip, audio_path: str, transcript: str, rng: np.random.Generator) -> list[dict[str, Any]]:
  """The clip's multiple-choice questions in MMAU's format (see the module docstring)."""
  items = []
  for task in ("gender", "speed", "pitch") if clip.kind != "sound" else ():
    items.append((task, "speech", getattr(clip, task), class_names()[task]))
  if clip.kind != "speech":
    others = [name for name in SOUNDS if name != clip.sound]
    distractors = [str(name) for name in rng.choice(others, MC_SOUND_CHOICES - 1, replace=False)]
    items.append(("sound", "sound", clip.sound, [clip.sound, *distractors]))
  return [
    {
      "id": f"{os.path.splitext(clip.file_name)[0]}_{task}", "audio_id": audio_path, "question": CHOICE_QUESTIONS[task],
      "choices": [str(c) for c in rng.permutation(options)], "answer": answer, "dataset": DATASET, "task": category,
      "sub-category": task, "input": transcript,
    }
    for task, category, answer, options in items
  ]


def transcribe_speech(paths: list[str], model_dir: str, cache_path: str, progress: bool) -> dict[str, str]:
  """Whisper transcripts of `paths` by the model folder `model_dir`, keyed by file name.

  Cached in `cache_path` for the same model folder, so a re-run transcribes only new files.
  """
  model_dir = os.path.abspath(model_dir)
  cache = {}
  if os.path.exists(cache_path):
    with open(cache_path) as file:
      stored = json.load(file)
    cache = stored["text"] if stored["model"] == model_dir else {}
  missing = [path for path in paths if os.path.basename(path) not in cache]
  if missing:
    loaded = model_folder.load(model_dir)
    kinds.require(loaded.kind, "tiny_data --transcriber", kinds.TRANSCRIBES, model_dir)
    with tqdm(total=len(missing), desc="transcribing", disable=not progress) as bar:
      for start in range(0, len(missing), TRANSCRIBE_BATCH):
        batch = missing[start : start + TRANSCRIBE_BATCH]
        texts = transcribe.transcribe_batch(loaded, [load_audio(path) for path in batch])
        cache.update((os.path.basename(path), text) for path, text in zip(batch, texts))
        bar.update(len(batch))
    with open(cache_path, "w") as file:
      json.dump({"model": model_dir, "text": cache}, file, indent=1)
  return {os.path.basename(path): cache[os.path.basename(path)] for path in paths}


def build(
  out_dir: str | os.PathLike,
  seed: int = 0,
  train: int = DEFAULT_TRAIN,
  test: int = DEFAULT_TEST,
  transcriber: str | os.PathLike | None = None,
  progress: bool = True,
) -> dict[str, list[dict[str, Any]]]:
  """Writes the dataset to `out_dir` (see the module docstring) and returns its splits by file stem.

  Audio files already in `out_dir/audio` are kept: their names are hashes of their recipes.
  """
  out_dir = os.path.abspath(out_dir)
  audio_dir = os.path.join(out_dir, "audio")
  os.makedirs(audio_dir, exist_ok=True)
  clips = plan_clips(seed, train, test)
  paths = [os.path.join(audio_dir, clip.file_name) for clip in clips]
  for clip, path in tqdm(list(zip(clips, paths)), desc="synthesising", disable=not progress):
    if not os.path.exists(path):
      # written under a temporary name, so an interrupted build never leaves a truncated clip behind
      sf.write(path + ".part", render(clip), SAMPLE_RATE, subtype="PCM_16", format="WAV")
      os.replace(path + ".part", path)
  transcripts = {}
  if transcriber is not None:
    speech_paths = [path for clip, path in zip(clips, paths) if clip.kind != "sound"]
    cache_path = os.path.join(out_dir, "transcripts.json")
    transcripts = transcribe_speech(speech_paths, os.fspath(transcriber), cache_path, progress)
  # a generator apart from the recipes', so the questions drawn do not change the clips
  question_rng, choice_rng = np.random.default_rng([seed, 1]), np.random.default_rng([seed, 2])
  splits: dict[str, list[dict[str, Any]]] = {"train": [], "test": [], "test_choices": []}
  for clip, path in zip(clips, paths):
    rng = question_rng if clip.split == "train" else None
    splits[clip.split] += records(clip, path, transcripts.get(os.path.basename(path)), rng)
    if clip.split == "test":
      splits["test_choices"] += choice_items(clip, path, splits["test"][-1]["input"], choice_rng)
  splits["classification"] = [record for record in splits["train"] if record["task"] in CLASSIFICATION_TASKS]
  splits["closed"] = [record for record in splits["train"] if record["task"] != OPEN_ENDED]
  with open(os.path.join(out_dir, "labels.json"), "w") as file:
    json.dump(class_names(), file, indent=1)
  for name, split in splits.items():
    with open(os.path.join(out_dir, f"{name}.json"), "w") as file:
      json.dump(split, file, indent=1)
  return splits


def parser() -> argparse.ArgumentParser:
  """The command line; options may come before, between or after the positionals (`parse_intermixed_args`)."""
  parser = argparse.ArgumentParser(prog="python -m ltu_jax.tiny_data", description=__doc__.split("\n\n")[0])
  parser.add_argument("out_dir", metavar="OUT_DIR")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--train", type=int, default=DEFAULT_TRAIN, help="train clips (about 5 questions each)")
  parser.add_argument("--test", type=int, default=DEFAULT_TEST, help="held-out test clips")
  parser.add_argument(
    "--transcriber", metavar="MODEL_DIR", help="a Whisper model folder to fill `input` (default: the sentence read)"
  )
  return parser


def main(argv: list[str] | None = None) -> None:
  args = parser().parse_intermixed_args(argv)
  splits = build(args.out_dir, args.seed, args.train, args.test, args.transcriber)
  counts = ", ".join(f"{name}.json: {len(split)} records" for name, split in splits.items())
  print(counts, "in", os.path.abspath(args.out_dir))


if __name__ == "__main__":
  main()
