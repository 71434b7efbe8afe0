"""Long-form transcription quality: ours (`ltu_jax.transcribe`) against transformers' chunked ASR pipeline
(`pipeline("automatic-speech-recognition", chunk_length_s=30)`, its default batch and stride) on the same real
Whisper tiny.en weights, on a 130 s recording of 30 espeak-ng sentences in 6 voices at 150-180 words/min.

    .venv/bin/python bench/long_form_wer.py

Prints each side's word error rate against the sentences read (jiwer, after Whisper's `EnglishTextNormalizer`;
the wheel ships no British-American spelling map, so that part of the normaliser is empty) and its wall time:
the first call (with JAX's compilation, PyTorch's first-run set-up) and a second call. Each side runs in its own
process. Both decode greedily without timestamps, with the same suppress lists (`common.tiny_en_hf_folder`).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import numpy as np  # noqa: E402
import soundfile as sf  # noqa: E402

from ltu_jax import audio  # noqa: E402
from tests.helpers import LONG_SPEECH, espeak_speech, recording  # noqa: E402


def transcriber(framework: str):
  """A function from a 16 kHz waveform `[samples]` to its text, on `framework`'s side."""
  if framework == "jax":
    import ltu_jax
    from ltu_jax import transcribe

    loaded = ltu_jax.load(common.tiny_en_folder())
    return lambda waveform: transcribe.transcribe(loaded, waveform)
  import transformers

  pipe = transformers.pipeline("automatic-speech-recognition", model=common.tiny_en_hf_folder(), chunk_length_s=30)
  return lambda waveform: pipe({"raw": waveform, "sampling_rate": audio.SAMPLE_RATE})["text"].strip()


def child(framework: str, path: str) -> None:
  transcribe = transcriber(framework)
  waveform = audio.load_audio(path)
  times = []
  for _ in range(2):
    start = time.perf_counter()
    text = transcribe(waveform)
    times.append(time.perf_counter() - start)
  common.report({"text": text, "first_s": times[0], "second_s": times[1]})


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--framework", choices=("jax", "torch"), help="(internal) run one side and print JSON")
  parser.add_argument("--audio", help="(internal) the recording")
  args = parser.parse_args()
  if args.framework:
    return child(args.framework, args.audio)
  import jiwer
  from transformers.models.whisper.english_normalizer import EnglishTextNormalizer

  common.tiny_en_hf_folder()  # converted once, before the children time anything
  with tempfile.TemporaryDirectory() as folder:
    waveform = recording(espeak_speech(LONG_SPEECH, folder))
    path = os.path.join(folder, "long_form.wav")
    sf.write(path, waveform, audio.SAMPLE_RATE, subtype="FLOAT")
    results = {name: common.in_child(__file__, name, ["--audio", path]) for name in ("jax", "torch")}
  normalize = EnglishTextNormalizer({})
  reference = normalize(" ".join(text for _, _, text in LONG_SPEECH))
  print(f"recording: {len(waveform) / audio.SAMPLE_RATE:.1f} s, {len(LONG_SPEECH)} sentences, {len(reference.split())} words")
  names = {"jax": "ours (ltu_jax.transcribe)", "torch": "transformers pipeline, chunk_length_s=30"}
  for name, result in results.items():
    print(f"\n{names[name]}: {result['text']}")
  print(f"\n{'':42s} {'WER %':>6s} {'first s':>8s} {'second s':>9s}")
  for name, result in results.items():
    wer = 100 * jiwer.wer(reference, normalize(result["text"]))
    print(f"{names[name]:42s} {wer:6.1f} {result['first_s']:8.1f} {result['second_s']:9.1f}")


if __name__ == "__main__":
  main()
