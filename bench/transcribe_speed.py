"""Transcription speed of real Whisper tiny.en: ours (`ltu_jax.transcribe.transcribe_batch`) against
transformers' `WhisperForConditionalGeneration.generate` on the same fp32 weights, on CPU.

    .venv/bin/python bench/transcribe_speed.py [--repeats 3]

The clips are 8 espeak-ng sentences (3-5 s each, 6 voices). Both sides decode greedily from
`<|startoftranscript|> <|notimestamps|>` with the same suppress lists (`common.tiny_en_hf_folder`), and both
timings include the log-mel. Batch 1 transcribes the 8 clips one call each, batch 8 in one call; clips/s as
median (min-max) over the repeats, after a warm-up call of each shape (ours: its compile time). Each side runs
in its own process. The last line gives the ratios ours / transformers in clips/s (above 1: ours is faster).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import soundfile as sf  # noqa: E402

from ltu_jax import audio  # noqa: E402
from tests.helpers import LONG_SPEECH, espeak_speech  # noqa: E402

CLIPS = 8
BATCHES = (1, 8)


def transcriber(framework: str):
  """A function from a list of 16 kHz waveforms to their texts, on `framework`'s side."""
  if framework == "jax":
    import ltu_jax
    from ltu_jax import transcribe

    loaded = ltu_jax.load(common.tiny_en_folder())
    return lambda waveforms: transcribe.transcribe_batch(loaded, waveforms)
  import torch
  import transformers

  folder = common.tiny_en_hf_folder()
  model = transformers.WhisperForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
  processor = transformers.WhisperProcessor.from_pretrained(folder)

  def transcribe(waveforms):
    features = processor.feature_extractor(waveforms, sampling_rate=audio.SAMPLE_RATE, return_tensors="pt")
    with torch.no_grad():
      ids = model.generate(features.input_features, return_timestamps=False)
    return [text.strip() for text in processor.tokenizer.batch_decode(ids, skip_special_tokens=True)]

  return transcribe


def child(framework: str, folder: str, repeats: int) -> None:
  transcribe = transcriber(framework)
  clips = [audio.load_audio(os.path.join(folder, f"sentence_{i}.wav")) for i in range(CLIPS)]
  result = {}
  for batch in BATCHES:
    groups = [clips[start : start + batch] for start in range(0, CLIPS, batch)]
    start = time.perf_counter()
    transcribe(groups[0])  # warm-up: compilation on our side
    warmup_s = time.perf_counter() - start
    texts = []
    times = common.timed(lambda: texts.append([text for group in groups for text in transcribe(group)]), repeats)
    result[batch] = {"warmup_s": warmup_s, "seconds": times, "texts": texts[-1]}
  common.report(result)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--framework", choices=("jax", "torch"), help="(internal) run one side and print JSON")
  parser.add_argument("--clips", help="(internal) the folder of sentence wavs")
  args = parser.parse_args()
  if args.framework:
    return child(args.framework, args.clips, args.repeats)
  common.tiny_en_hf_folder()  # converted once, before the children time anything
  with tempfile.TemporaryDirectory() as folder:
    waveforms = espeak_speech(LONG_SPEECH[:CLIPS], folder)
    for i, waveform in enumerate(waveforms):  # the 16 kHz samples exactly, for both sides
      sf.write(os.path.join(folder, f"sentence_{i}.wav"), waveform, audio.SAMPLE_RATE, subtype="FLOAT")
    flags = ["--repeats", str(args.repeats), "--clips", folder]
    ours, theirs = (common.in_child(__file__, name, flags) for name in ("jax", "torch"))
  seconds = sum(map(len, waveforms)) / audio.SAMPLE_RATE
  print(f"Whisper tiny.en fp32, {CLIPS} clips ({seconds:.1f} s of speech), {args.repeats} repeats, median (min-max)")
  print(f"{'batch':>5s} {'side':6s} {'clips/s':>20s} {'warm-up s':>10s}")
  ratios = {}
  for batch in map(str, BATCHES):
    for name, side in (("ours", ours[batch]), ("torch", theirs[batch])):
      rates = [CLIPS / s for s in side["seconds"]]
      print(f"{batch:>5s} {name:6s} {common.spread(rates):>20s} {side['warmup_s']:10.1f}")
    ratios[batch] = statistics.median(theirs[batch]["seconds"]) / statistics.median(ours[batch]["seconds"])
    same = sum(a == b for a, b in zip(ours[batch]["texts"], theirs[batch]["texts"]))
    print(f"{batch:>5s} ratio ours/torch clips/s {ratios[batch]:.2f}; {same}/{CLIPS} transcripts identical")
  print("clips/s ratio ours/torch: " + ", ".join(f"batch {b} {r:.2f}" for b, r in ratios.items()))


if __name__ == "__main__":
  main()
