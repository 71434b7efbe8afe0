"""Issue #14 for the demo: `python -m ltu_jax.tiny --fresh` deletes what the demo wrote and nothing else
(`tiny.remove_outputs`, tested on its own: the demo itself is tests/test_tiny.py)."""

from __future__ import annotations

import os

from configs import tiny as tiny_config
from ltu_jax import tiny

USER_FILES = {  # what a user keeps beside the demo's outputs
  "cache/notes.txt": "my notes",
  "cache/models/my-model/ltu_jax.json": "{}",
  "cache/tiny_data.bak/train.json": "[]",
  "runs/stage3/model/ltu_jax.json": "{}",
  "runs/tiny_report.md.old": "an earlier report",
}


def write(path: str, text: str) -> None:
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with open(path, "w") as f:
    f.write(text)


def write_demo_outputs() -> None:
  """A file in every folder the demo writes, and every file it writes, as a finished run leaves them."""
  os.makedirs(os.path.join(os.path.dirname(tiny_config.LLM), f".{os.path.basename(tiny_config.LLM)}-k2x9"))
  for path in tiny.outputs():
    write(path if os.path.splitext(path)[1] in (".md", ".jsonl") else os.path.join(path, "ltu_jax.json"), "demo")
  write(os.path.join(tiny_config.FEATURES, "x.npz"), "demo")


def test_fresh_removes_the_demos_outputs_and_keeps_the_users_files(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  for path, text in USER_FILES.items():
    write(path, text)
  write_demo_outputs()
  outputs = tiny.outputs()
  assert any(os.path.basename(p).startswith(".smollm2-135m-") for p in outputs)  # a killed conversion's scratch
  assert {tiny_config.WHISPER, tiny_config.DATA, "runs/tiny_stage1", tiny.REPORT} <= set(outputs)
  tiny.remove_outputs()
  assert not any(os.path.lexists(path) for path in outputs)
  for path, text in USER_FILES.items():
    assert open(path).read() == text, path


def test_fresh_leaves_no_empty_folders_of_its_own(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  write_demo_outputs()
  write("elsewhere/kept.txt", "mine")
  tiny.remove_outputs()
  assert sorted(os.listdir(tmp_path)) == ["elsewhere"]
  tiny.remove_outputs()  # nothing left to remove is no error
