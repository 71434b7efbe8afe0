"""The README's first command, shortened (`python -m ltu_jax.tiny --smoke`): every part of the pipeline runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from ltu_jax import kinds, model_folder, tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """One working directory for both kinds' runs: LTU's reuses the converted models and the data."""
  return tmp_path_factory.mktemp("tiny")


def smoke(workdir, *args: str) -> subprocess.CompletedProcess:
  # In its own working directory: the pipeline writes cache/ and runs/ where it runs.
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  result = subprocess.run(
    [sys.executable, "-m", "ltu_jax.tiny", "--smoke", *args], cwd=workdir, env=env, capture_output=True, text=True,
    timeout=900,
  )
  assert result.returncode == 0, result.stderr[-5000:]
  return result


def check_stages(workdir, stages) -> None:
  for stage in stages:
    rows = [json.loads(line) for line in open(workdir / f"runs/{stage}/metrics.jsonl")]
    # the stage's last step: at most the smoke cap (stage 1's short epoch may end sooner)
    assert 0 < rows[-1]["step"] <= tiny.SMOKE.max_steps and all(row["loss"] > 0 for row in rows)
    assert os.path.isfile(workdir / f"runs/{stage}/model/ltu_jax.json")


def section(report: str, title: str) -> str:
  return report.split(f"\n## {title}\n\n")[1].split("\n## ")[0].strip()


def test_smoke_run_goes_end_to_end(workdir):
  result = smoke(workdir)
  check_stages(workdir, ("tiny_stage1", "tiny_stage2", "tiny_stage3"))
  assert os.path.isfile(workdir / "cache/models/ltu_as-tiny-tagged/ltu_jax.json")
  for name in ("untrained", "trained"):
    for split in tiny.SPLITS:
      out = workdir / tiny.EVAL_DIR / f"{name}_{split}"
      assert len(open(out / "predictions.jsonl").readlines()) == tiny.SMOKE.limit
      assert {"summary.md", "summary.json", "scores.png"} <= set(os.listdir(out))
  ltu_as = section(open(workdir / "runs/tiny_report.md").read(), "LTU-AS")
  assert ltu_as in result.stdout
  # both readings of the held-out split, and the multiple-choice accuracy, before and after training
  held_out, choices = ltu_as.split("### ")[1:]
  header = "| task | n | metric | before | after | chance |"
  assert all(header in " ".join(part.split()) for part in (held_out, choices))
  assert "accuracy (embedding) %" in held_out and "accuracy (keywords) %" in held_out and "WER %" in held_out
  assert "test_choices.json" in choices and "accuracy %" in choices
  # It ends with the command that opens the web demo on the trained model.
  trained = os.path.join("runs", "tiny_stage3", "model")
  python, command = result.stdout.splitlines()[-1].split(" -m ", 1)
  assert os.path.samefile(workdir / python, sys.executable) and command == f"ltu_jax.demo --model {trained}"
  model_folder.require(workdir / trained, "demo", kinds.AUDIO_LLM)


def test_ltu_smoke_run_reports_beside_ltu_as(workdir):
  """`--kind ltu` after the LTU-AS run: its four stages, its predictions, its section beside LTU-AS's."""
  result = smoke(workdir, "--kind", "ltu")
  check_stages(workdir, [f"tiny_ltu_stage{i}" for i in (1, 2, 3, 4)])
  assert json.load(open(workdir / "runs/tiny_ltu_stage4/model/ltu_jax.json"))["kind"] == "ltu"
  for name in ("untrained", "trained"):
    for split in tiny.SPLITS:
      assert len(open(workdir / tiny.EVAL_DIR / f"ltu_{name}_{split}" / "predictions.jsonl").readlines()) == tiny.SMOKE.limit
  report = open(workdir / "runs/tiny_report.md").read()
  ltu = section(report, "LTU")
  assert "before" in ltu and "no transcript" in ltu and ltu in result.stdout
  if "## LTU-AS" in report:  # after the LTU-AS run (the whole file): LTU-AS's section first, kept
    assert report.index("## LTU-AS") < report.index("## LTU\n") and section(report, "LTU-AS")
