"""The trainer: loss falls, a group at `lr_scale` 0 is held, the same run on 1 and 8 devices and on 1 and
2 processes, exact resume after SIGKILL, NaN stops, and the optimizer equal to the HF Trainer's."""

from __future__ import annotations

import json
import os
import signal
import socket
import shutil
import subprocess
import sys
import time

import jax
import numpy as np
import optax
import pytest
from flax import nnx

import ltu_jax
from conversion import ltu_as
from ltu_jax import data, kinds, train
from tests import train_setup

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARDED_TOL = 1e-5  # loss and parameters, 1 device vs 8 (reduction order differs)
OPTIMIZER_TOL = 1e-6  # fp32 parameters after 8 AdamW steps, ours vs torch
ADAPTERS = {f"llm.layers.self_attn.{proj}.{w}" for proj in ("q_proj", "v_proj") for w in ("lora_a", "lora_b")}


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
  return train_setup.build(str(tmp_path_factory.mktemp("train")))


def losses(output_dir: str) -> list[float]:
  with open(os.path.join(output_dir, "metrics.jsonl")) as f:
    return [json.loads(line)["loss"] for line in f]


def trained_params(output_dir: str) -> list[np.ndarray]:
  model = ltu_jax.load(os.path.join(output_dir, "model"), tokenizer=False).model
  return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model))]


def run_cli(args: list[str], **env) -> subprocess.Popen:
  return subprocess.Popen(
    [sys.executable, "-m", "ltu_jax.train", *args], cwd=ROOT, env=dict(os.environ, **env),
    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
  )


def changed_parameters(before_dir: str, after_dir: str) -> set[str]:
  before = nnx.state(ltu_jax.load(before_dir, tokenizer=False).model)
  after = nnx.state(ltu_jax.load(after_dir, tokenizer=False).model)
  pairs = zip(nnx.to_flat_state(before), nnx.to_flat_state(after), strict=True)
  return {".".join(map(str, p)) for (p, a), (_, b) in pairs if not np.array_equal(a.get_value(), b.get_value())}


def test_loss_falls(parts, tmp_path):
  out = str(tmp_path / "run")
  model_dir = train.Trainer(train.load_config("tiny_stage3", train_setup.overrides(parts, out, **{"optim.max_steps": 12, "optim.epochs": 3.0}))).run()
  history = losses(out)
  assert len(history) == 12 and np.mean(history[-3:]) < 0.8 * np.mean(history[:3])
  changed = changed_parameters(parts["ltu_as"], model_dir)
  assert {p for p in changed if p.startswith("llm.")} == ADAPTERS  # of the LLM only the adapters train
  assert any(p.startswith("audio_encoder.") for p in changed)
  assert os.path.isfile(os.path.join(out, "config.json")) and os.listdir(os.path.join(out, "tensorboard"))
  assert ltu_jax.load(os.path.join(model_dir, "whisper"), tokenizer=False).kind == "whisper"


def test_stage1_trains_the_projection_only(parts, tmp_path):
  out = str(tmp_path / "run")
  model_dir = train.Trainer(train.load_config("tiny_stage1", train_setup.overrides(parts, out, **{"optim.max_steps": 2, "data.train": parts["train"]}))).run()
  assert changed_parameters(parts["ltu_as"], model_dir) == {"audio_proj.kernel", "audio_proj.bias"}


def test_a_group_at_lr_scale_zero_is_held(parts, tmp_path):
  out = str(tmp_path / "run")
  more = {"optim.max_steps": 3, "optim.lr_scale.audio_encoder": 0.0}  # lora_a moves once lora_b has
  model_dir = train.Trainer(train.load_config("tiny_stage3", train_setup.overrides(parts, out, **more))).run()
  assert changed_parameters(parts["ltu_as"], model_dir) == {"audio_proj.kernel", "audio_proj.bias", *ADAPTERS}


SHARDED = """
import json, sys
from ltu_jax import train
from tests import train_setup
paths, out = json.loads(sys.argv[1]), sys.argv[2]
for data, fsdp, tensor, micro in ((1, 8, 1, 1), (2, 2, 2, 1), (4, 1, 2, 2)):
  run = f"{out}/mesh_{data}_{fsdp}_{tensor}"
  more = {"mesh.data": data, "mesh.fsdp": fsdp, "mesh.tensor": tensor, "optim.micro_batch_size": micro,
          "optim.max_steps": 3, "lora.dropout": 0.0}
  train.Trainer(train.load_config("tiny_stage3", train_setup.overrides(paths, run, **more))).run()
  print(run)
"""


def test_one_device_equals_eight(parts, tmp_path):
  single = str(tmp_path / "single")
  more = {"optim.max_steps": 3, "lora.dropout": 0.0}
  train.Trainer(train.load_config("tiny_stage3", train_setup.overrides(parts, single, **more))).run()
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, "-c", SHARDED, json.dumps(parts), str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True)
  assert result.returncode == 0, result.stderr[-3000:]
  runs = result.stdout.split()
  assert len(runs) == 3
  reference = trained_params(single)
  for run in runs:
    np.testing.assert_allclose(losses(run), losses(single), rtol=SHARDED_TOL, atol=0)
    for ours, theirs in zip(trained_params(run), reference, strict=True):
      np.testing.assert_allclose(ours, theirs, rtol=SHARDED_TOL, atol=SHARDED_TOL)


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_two_processes_equal_one(parts, tmp_path):
  """2 processes × 1 CPU device (jax.distributed, gloo collectives) train as 1 process × 2 devices, and
  both exit 0: a process that fails leaves the other at a barrier and both abort at JAX's shutdown."""
  more = {"optim.max_steps": 3, "lora.dropout": 0.0}
  args = lambda out: ["--config", "tiny_stage3", *[a for o in train_setup.overrides(parts, out, **more) for a in ("--set", o)]]
  one, two = str(tmp_path / "one"), str(tmp_path / "two")
  distributed = ["--coordinator", f"localhost:{free_port()}", "--num-processes", "2"]
  runs = {
    "one": (args(one), "--xla_force_host_platform_device_count=2"),
    **{f"two.{i}": ([*args(two), *distributed, "--process-id", str(i)], "--xla_force_host_platform_device_count=1") for i in range(2)},
  }
  processes = {}
  for name, (argv, xla_flags) in runs.items():
    with open(tmp_path / f"{name}.log", "w") as log:  # files, not pipes: a full pipe would stall a process
      processes[name] = subprocess.Popen(
        [sys.executable, "-u", "-m", "ltu_jax.train", *argv], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
        env=dict(os.environ, XLA_FLAGS=xla_flags, JAX_PLATFORMS="cpu"),
      )
  deadline = time.time() + 240  # ~1 min on 2 busy cores; a process stuck at a barrier would wait 5
  try:
    codes = {name: process.wait(timeout=max(deadline - time.time(), 0)) for name, process in processes.items()}
  except subprocess.TimeoutExpired:
    codes = {name: process.poll() for name, process in processes.items()}  # None: still running
  finally:
    for process in processes.values():
      if process.poll() is None:
        process.kill()
        process.wait()
  logs = {name: (tmp_path / f"{name}.log").read_text()[-3000:] for name in processes}
  assert codes == {name: 0 for name in processes}, logs
  assert len(losses(one)) == 3 and len(losses(two)) == 3  # process 0 alone logs
  np.testing.assert_allclose(losses(two), losses(one), rtol=SHARDED_TOL, atol=0)
  for ours, theirs in zip(trained_params(two), trained_params(one), strict=True):
    np.testing.assert_allclose(ours, theirs, rtol=SHARDED_TOL, atol=SHARDED_TOL)


def test_resume_after_sigkill_is_bitwise_identical(parts, tmp_path):
  steps = 6
  args = lambda out: ["--config", "tiny_stage3", *[a for o in train_setup.overrides(parts, out, **{"optim.max_steps": steps}) for a in ("--set", o)]]
  straight = run_cli(args(str(tmp_path / "straight")))
  killed_dir = tmp_path / "killed"
  killed = run_cli(args(str(killed_dir)))
  deadline = time.time() + 300
  while not (killed_dir / "checkpoints" / "3").is_dir():  # kill once a few steps are checkpointed
    assert killed.poll() is None, killed.communicate()[1][-3000:]
    assert time.time() < deadline
    time.sleep(0.05)
  killed.send_signal(signal.SIGKILL)
  killed.wait()
  assert not (killed_dir / "model").exists()
  resumed = run_cli(args(str(killed_dir)))
  _, resumed_err = resumed.communicate()
  _, straight_err = straight.communicate()
  assert resumed.returncode == 0, resumed_err[-3000:]
  assert straight.returncode == 0, straight_err[-3000:]
  assert "resumed from step" in resumed_err
  for ours, theirs in zip(trained_params(str(killed_dir)), trained_params(str(tmp_path / "straight")), strict=True):
    np.testing.assert_array_equal(ours, theirs)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(parts, tmp_path, monkeypatch):
  # NaN features are refused when the data is read (tests/test_faults_data.py); let them through here
  # to make a NaN loss, which other causes (a diverging run) also give.
  monkeypatch.setattr(data.FeatureStore, "_checked", lambda self, path, audio_id, features: features)
  out = str(tmp_path / "run")
  train.Trainer(train.load_config("tiny_stage3", train_setup.overrides(parts, out, **{"optim.max_steps": 2}))).run()
  poisoned = tmp_path / "nan_features"
  poisoned.mkdir()
  for name in os.listdir(parts["features"]):
    np.savez_compressed(poisoned / name, np.full((2, 25, 16), np.nan, np.float16))
  config = train.load_config("tiny_stage3", train_setup.overrides(parts, out, **{"optim.max_steps": 4, "data.features": str(poisoned)}))
  with pytest.raises(FloatingPointError, match=r"step 2: loss is nan.*last good checkpoint is step 2"):
    train.Trainer(config, resume=True).run()
  assert sorted(int(d) for d in os.listdir(os.path.join(out, "checkpoints")) if d.isdigit())[-1] == 2


def test_bad_record_is_named_before_training(parts, tmp_path):
  records = json.load(open(parts["train"]))
  del records[5]["output"]
  bad = tmp_path / "bad.json"
  bad.write_text(json.dumps(records))
  config = train.load_config("tiny_stage3", train_setup.overrides(parts, str(tmp_path / "run"), **{"data.train": str(bad)}))
  with pytest.raises(ValueError, match=r"bad.json.*record 5.*'output'"):
    train.Trainer(config)
  skipping = train.load_config(
    "tiny_stage3", train_setup.overrides(parts, str(tmp_path / "run2"), **{"data.train": str(bad), "data.skip_bad_records": True, "optim.max_steps": 1})
  )
  train.Trainer(skipping).run()


@pytest.mark.parametrize(
  "max_grad_norm, lr_scale", [(1.0, {}), (None, {}), (1.0, {"audio_encoder": 0.1, "lora": 3.0})]
)
def test_optimizer_matches_the_hf_trainer(max_grad_norm, lr_scale):
  """Clip to the global norm, AdamW, warm-up then linear decay: what the HF Trainer does (torch), with
  `optim.lr_scale` as torch parameter groups of their own learning rates."""
  import torch
  import transformers

  c = train.load_config("stage2", [
    "optim.lr=1e-2", "optim.warmup_steps=3", "optim.weight_decay=0.1", f"optim.max_grad_norm={max_grad_norm}",
    *(f"optim.lr_scale.{group}={scale}" for group, scale in lr_scale.items()),
  ])
  steps = 8
  rng = np.random.default_rng(0)
  start = {  # one parameter of each group (the kind's group expressions read the names)
    "audio_encoder": rng.standard_normal((4, 3)).astype(np.float32),
    "audio_proj": rng.standard_normal(5).astype(np.float32),
    "lora_a": rng.standard_normal((2, 3)).astype(np.float32),
  }
  # Norms far above and below the clip, so that clipping changes Adam's moments.
  grads = [{k: (10.0 if i % 2 else 0.1) * rng.standard_normal(v.shape).astype(np.float32) for k, v in start.items()}
           for i in range(steps)]

  ltu_as = kinds.get("ltu_as")
  tx, _ = train.optimizer(c, steps, ltu_as)
  params = jax.tree.map(jax.numpy.asarray, start)
  opt_state = tx.init(params)
  torch_params = {k: torch.nn.Parameter(torch.tensor(v)) for k, v in start.items()}
  groups = [{"params": [p], "lr": c.optim.lr * lr_scale.get(ltu_as.group_of(k), 1.0)} for k, p in torch_params.items()]
  torch_opt = torch.optim.AdamW(
    groups, lr=c.optim.lr, betas=(c.optim.b1, c.optim.b2), eps=c.optim.eps,
    weight_decay=c.optim.weight_decay,
  )
  torch_schedule = transformers.get_linear_schedule_with_warmup(torch_opt, c.optim.warmup_steps, steps)
  for g in grads:
    updates, opt_state = tx.update(jax.tree.map(jax.numpy.asarray, g), opt_state, params)
    params = optax.apply_updates(params, updates)
    for k, p in torch_params.items():
      p.grad = torch.tensor(g[k])
    if max_grad_norm is not None:
      torch.nn.utils.clip_grad_norm_(torch_params.values(), max_grad_norm)
    torch_opt.step()
    torch_schedule.step()
    for k, p in torch_params.items():
      np.testing.assert_allclose(np.asarray(params[k]), p.detach().numpy(), rtol=OPTIMIZER_TOL, atol=OPTIMIZER_TOL)


def test_adapters_are_added_at_the_configured_rank_and_a_model_in_its_own_output_survives(parts, tmp_path):
  bare = str(tmp_path / "bare")
  ltu_as.convert(None, parts["llm"], parts["whisper"], bare, lora=None)  # an LLM converted once, no adapters
  assert ltu_jax.load(bare, tokenizer=False).config.llm.lora is None
  more = {"optim.max_steps": 2, "lora.rank": 4, "audio.max_windows": 2}  # cached clips fill 1 of 2 windows
  model_dir = train.Trainer(train.load_config("tiny_stage3", train_setup.overrides(parts, str(tmp_path / "run"), model=bare, **more))).run()
  trained = ltu_jax.load(model_dir, tokenizer=False)
  assert trained.config.llm.lora.rank == 4 and trained.config.max_windows == 2
  assert trained.model.llm.layers.self_attn.q_proj.lora_a.shape[-1] == 4
  assert np.abs(np.asarray(trained.model.llm.layers.self_attn.q_proj.lora_b)).max() > 0
  # The next run starts from a model inside its own output folder: read before it is replaced; a folder
  # with adapters keeps them whatever rank the config names.
  own = tmp_path / "own"
  shutil.copytree(model_dir, own / "model")
  more = {"optim.max_steps": 1, "lora.rank": 2}
  again = train.Trainer(train.load_config("tiny_stage3", train_setup.overrides(parts, str(own), model=str(own / "model"), **more))).run()
  assert again == str(own / "model") and sorted(os.listdir(own)) == ["checkpoints", "config.json", "metrics.jsonl", "model", "tensorboard"]
  assert ltu_jax.load(again, tokenizer=False).config.llm.lora.rank == 4


def test_a_step_that_blows_up_the_parameters_is_not_saved(parts, tmp_path):
  # At lr 1e30 the loss and the clipped gradient of step 0 are finite; the updated parameters are not.
  out = str(tmp_path / "run")
  config = train.load_config("tiny_stage3", train_setup.overrides(parts, out, **{"optim.max_steps": 3, "optim.lr": 1e30, "optim.warmup_steps": 0}))
  with pytest.raises(FloatingPointError, match=r"step 0: loss is [0-9.]+, grad norm [0-9.]+, updated parameters' norm inf: not finite; .* No checkpoint was saved before it"):
    train.Trainer(config).run()
  assert not os.path.exists(os.path.join(out, "model"))
  assert not [d for d in os.listdir(os.path.join(out, "checkpoints")) if d.isdigit()]


def test_a_run_is_resumed_only_under_its_own_settings(parts, tmp_path):
  out = str(tmp_path / "run")
  train.Trainer(train.load_config("tiny_stage3", train_setup.overrides(parts, out, **{"optim.max_steps": 1}))).run()
  with open(os.path.join(out, "config.json")) as f:
    before = f.read()
  changed = train.load_config("tiny_stage3", train_setup.overrides(parts, out, **{"optim.max_steps": 2, "optim.lr": 0.5}))
  with pytest.raises(ValueError, match=r"holds a run with other settings \(optim.lr: 0.01 → 0.5; optim.max_steps: 1 → 2\); nothing was changed"):
    train.Trainer(changed)
  with open(os.path.join(out, "config.json")) as f:
    assert f.read() == before
  train.Trainer(changed, resume=True).run()
  with open(os.path.join(out, "config.0.json")) as f:
    assert f.read() == before
  assert json.load(open(os.path.join(out, "config.json")))["optim"]["lr"] == 0.5


@pytest.mark.parametrize("setting, value, message", [
  ("optim.micro_batch_size", 0, r"optim.micro_batch_size is 0; expected a whole number ≥ 1"),
  ("precision.compute", "float7", r"precision.compute is 'float7'; expected one of \('float32', 'bfloat16', 'float16'\)"),
  ("lora.rank", 0, r"lora.rank is 0; expected a whole number ≥ 1"),
])
def test_bad_settings_are_named_when_the_run_starts(parts, tmp_path, setting, value, message):
  config = train.load_config("tiny_stage3", train_setup.overrides(parts, str(tmp_path / "run"), **{setting: value}))
  with pytest.raises(ValueError, match=message):
    train.Trainer(config)
  assert not os.path.exists(tmp_path / "run")
