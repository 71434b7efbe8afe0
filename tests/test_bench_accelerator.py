"""`python -m bench.accelerator --tiny` runs on a CPU (two forced host devices, so the sharded path runs too)
and prints every figure it promises, each finite and positive, so the accelerator bench cannot rot."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def positive(value) -> bool:
  return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_tiny_accelerator_bench_prints_sane_figures(tmp_path):
  out = tmp_path / "figures.json"
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
  done = subprocess.run(
    [sys.executable, "-m", "bench.accelerator", "--tiny", "--repeats", "2", "--json", str(out)],
    cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
  )
  assert done.returncode == 0, done.stderr[-3000:]
  figures = json.loads(out.read_text())
  assert figures == json.loads(done.stdout.strip().splitlines()[-1])
  assert figures["local_devices"] == 2 and figures["tiny"]
  assert figures["datasheet_hbm_tb_s"] is None  # a CPU is not in the datasheet table: measured figures only
  assert positive(figures["measured_bandwidth_tb_s"]) and positive(figures["measured_matmul_tflop_s"])

  assert [row["devices"] for row in figures["train"]] == [1, 2]
  for row in figures["train"]:
    assert row["batch"] == 2 * row["devices"]  # stage 3's micro-batch (2 when tiny) on every device
    for name in ("samples_per_s", "model_tflop_per_step", "compiled_peak_gb", "compile_s", "first_step_s", "loss"):
      assert positive(row[name]), (name, row[name])
    assert all(positive(t) for t in row["step_s"])
    assert row["compile_s"] <= row["first_step_s"]

  assert [row["batch"] for row in figures["decode"]] == [1, 8, 64]
  for row in figures["decode"]:
    assert all(positive(rate) for rate in row["tokens_per_s"])
    assert positive(row["step_gb"]) and positive(row["first_call_s"])
    # A tiny step is tens of microseconds, a difference of two calls: on a busy host only finite is certain.
    assert math.isfinite(row["step_s"]) and math.isfinite(row["measured_share"])
  assert figures["decode"][2]["step_gb"] > figures["decode"][0]["step_gb"]  # a larger batch reads a larger cache

  assert all(positive(rate) for rate in figures["encoder"]["clips_per_s"])
  for line in ("train stage 3, 1 device(s)", "train stage 3, 2 device(s)", "decode batch 64", "Whisper encoder"):
    assert line in done.stdout


def test_datasheet_tells_the_kinds_apart():
  sys.path.insert(0, os.path.join(ROOT, "bench"))
  from bench import accelerator

  def kind(name):
    return accelerator.datasheet(type("Device", (), {"device_kind": name})())

  assert kind("NVIDIA H100 80GB HBM3") == (3.35e12, 989e12)  # SXM
  assert kind("NVIDIA H100 PCIe")[0] == 2.0e12
  assert kind("NVIDIA A100-SXM4-40GB")[0] == 1.555e12 and kind("NVIDIA A100-SXM4-80GB")[0] == 2.039e12
  assert kind("TPU v5 lite") == (0.819e12, 197e12) and kind("TPU v5p")[0] == 2.765e12
  assert kind("cpu") == (None, None)
