"""The README's first command, shortened (`python -m ltu_jax.tiny --smoke`): every part of the pipeline runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from ltu_jax import kinds, model_folder, tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_smoke_run_goes_end_to_end(tmp_path):
  # In its own working directory: the pipeline writes cache/ and runs/ where it runs.
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  result = subprocess.run(
    [sys.executable, "-m", "ltu_jax.tiny", "--smoke"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900
  )
  assert result.returncode == 0, result.stderr[-5000:]
  for stage in (1, 2, 3):
    rows = [json.loads(line) for line in open(tmp_path / f"runs/tiny_stage{stage}/metrics.jsonl")]
    # the stage's last step: at most the smoke cap (stage 1's short epoch may end sooner)
    assert 0 < rows[-1]["step"] <= tiny.SMOKE.max_steps and all(row["loss"] > 0 for row in rows)
    assert os.path.isfile(tmp_path / f"runs/tiny_stage{stage}/model/ltu_jax.json")
  assert os.path.isfile(tmp_path / "cache/models/ltu_as-tiny-tagged/ltu_jax.json")
  for name in ("untrained", "trained"):
    for split in tiny.SPLITS:
      out = tmp_path / tiny.EVAL_DIR / f"{name}_{split}"
      assert len(open(out / "predictions.jsonl").readlines()) == tiny.SMOKE.limit
      assert {"summary.md", "summary.json", "scores.png"} <= set(os.listdir(out))
  report = open(tmp_path / "runs/tiny_report.md").read()
  assert report.strip() in result.stdout
  # both readings of the held-out split, and the multiple-choice accuracy, before and after training
  held_out, choices = report.split("## ")[1:]
  header = "| task | n | metric | before | after | chance |"
  assert all(header in " ".join(part.split()) for part in (held_out, choices))
  assert "accuracy (embedding) %" in held_out and "accuracy (keywords) %" in held_out and "WER %" in held_out
  assert "test_choices.json" in choices and "accuracy %" in choices
  # It ends with the command that opens the web demo on the trained model.
  trained = os.path.join("runs", "tiny_stage3", "model")
  python, command = result.stdout.splitlines()[-1].split(" -m ", 1)
  assert os.path.samefile(tmp_path / python, sys.executable) and command == f"ltu_jax.demo --model {trained}"
  model_folder.require(tmp_path / trained, "demo", kinds.AUDIO_LLM)
