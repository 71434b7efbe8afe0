"""One command for a machine with GPUs or TPUs: `python -m bench.accelerator [--tiny] [--json out.json]`.

In one process, on JAX's default backend, with random weights built on the devices (jit with out_shardings,
no host copy of a 7B model):
  bounds   measured memory bandwidth (a jitted sum over 4 GiB) and bf16 matmul peak (an 8192² GEMM), beside
           the device's datasheet HBM bandwidth and dense bf16 FLOP/s (`DEVICES`; unknown kinds: measured only)
  train    LTU-AS 7B stage-3 train step (configs/stage3.py: micro-batch 4 a device, 25 audio + 160 text
           tokens, bf16 compute, frozen LLM bf16, its remat setting) on 1 device and on all local devices:
           samples/s, model FLOPs utilisation, peak memory a device, first step's time (compilation)
  decode   Vicuna-7B greedy decoding, bf16, batch 1, 8 and 64 (64-token prompts, 64 new tokens): tokens/s, and
           a step's bytes (the weights but the input embedding table, and the KV cache it reads) over its time
           as a share of HBM bandwidth; a step's time is the fastest full call less the fastest one-token
           call, over the steps between (a busy host only adds time; a difference of medians can be negative).
           The decoding layout (`llama.Decoding`) holds a second copy of the layers' weights (7B: +13 GB).
  encoder  Whisper large-v1's encoder on 30 s clips, bf16, batch 8: clips/s
Medians over `--repeats` timed calls after the first (compiling) one, with the spread (min–max).

Model FLOPs of a train sample (MFU counts these, not the remat recomputation): the frozen LLM's matmuls
forward and back through the activations, 4 × weights × tokens (no weight gradients), attention 12 × layers ×
tokens² × width, the trainable TLTR, projection and adapters 6 × weights × the positions they see.

`--tiny` runs the same code on tiny models, so it runs on a CPU in seconds (the test suite runs it there).
Goals on one H100 (issue #15): stage 3 ≥ 100 samples/s (the original: ≈ 12.5 per A6000), decode ≥ 70% of HBM
bandwidth, compile ≤ 60 s.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import statistics
import sys
import time
from typing import Any

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(BENCH))
sys.path.insert(0, BENCH)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import bounds  # noqa: E402
import sizes  # noqa: E402
import timing  # noqa: E402
from ltu_jax import generate, kinds, sharding, train  # noqa: E402
from ltu_jax.models.llama import Llama  # noqa: E402
from ltu_jax.models.ltu_as import LtuAs  # noqa: E402
from ltu_jax.models.whisper import WhisperEncoder  # noqa: E402

TB = 1e12
# Datasheet figures per device kind (substring of `device_kind`, first match): HBM bytes/s, dense bf16 FLOP/s.
DEVICES = (
  ("H100 PCIe", 2000e9, 756e12),
  ("H100", 3350e9, 989e12),  # SXM
  ("H200", 4800e9, 989e12),
  ("A100-SXM4-80GB", 2039e9, 312e12),
  ("A100-PCIE-80GB", 1935e9, 312e12),
  ("A100", 1555e9, 312e12),  # 40 GB
  ("A6000", 768e9, 154.8e12),
  ("L4", 300e9, 121e12),
  ("TPU v4", 1200e9, 275e12),
  ("TPU v5 lite", 819e9, 197e12),  # v5e
  ("TPU v5e", 819e9, 197e12),
  ("TPU v5p", 2765e9, 459e12),
  ("TPU v5", 2765e9, 459e12),
  ("TPU v6 lite", 1640e9, 918e12),  # v6e
  ("TPU v6e", 1640e9, 918e12),
)
DECODE_BATCHES = (1, 8, 64)


def datasheet(device: jax.Device) -> tuple[float | None, float | None]:
  """(HBM bytes/s, dense bf16 FLOP/s) of a device kind, or Nones for a kind not in `DEVICES` (a CPU)."""
  return next(((bw, flops) for name, bw, flops in DEVICES if name in device.device_kind), (None, None))


def median(times: list[float]) -> float:
  return statistics.median(times)


def on_devices(make, mesh: jax.sharding.Mesh):
  """(graphdef, state) of the module `make()` builds, its state created on the mesh's devices, sharded by its
  logical axes: never on the host."""
  graphdef, abstract = nnx.split(nnx.eval_shape(make))
  state = jax.jit(lambda: nnx.split(make())[1], out_shardings=sharding.state_shardings(abstract, mesh))()
  return graphdef, state


def count(tree: Any) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def sample_flops(config, text_len: int, frozen: Any, params: Any) -> float:
  """Model FLOPs of one train sample (module docstring)."""
  llm = config.llm
  tokens = config.audio_tokens + text_len
  frozen_matmuls = count(frozen) - llm.vocab_size * llm.hidden_size  # all but the embedding table (a lookup)
  attention = 12 * llm.num_layers * tokens**2 * llm.num_heads * llm.head_size
  tltr_positions = config.feature_layers * config.audio_tokens  # TLTR's time and layer transformers
  return 4 * frozen_matmuls * tokens + attention + 6 * count(params) * max(tokens, tltr_positions)


def train_row(tiny: bool, devices: list[jax.Device], repeats: int) -> dict[str, Any]:
  """The stage-3 step on a mesh of `devices`."""
  overrides = ["optim.micro_batch_size=2", "data.cutoff_len=16"] if tiny else []
  c = train.load_config("stage3", overrides)
  kind = kinds.get("ltu_as")
  config = sizes.ltu_as(c.precision.compute, c.precision.remat, tiny, llm_param_dtype=c.precision.frozen)
  mesh = sharding.make_mesh(c.mesh.data, c.mesh.fsdp, c.mesh.tensor, devices=devices)

  def split(model):
    return train.split_for_training(model, c, kind)

  graphdef, abstract_params, abstract_frozen = split(nnx.eval_shape(lambda: LtuAs(config, rngs=nnx.Rngs(0))))
  tx, schedule = train.optimizer(c, 1000, kind)
  spec = train.TrainShardings.of(abstract_params, abstract_frozen, tx, mesh)

  def init():
    _, params, frozen = split(LtuAs(config, rngs=nnx.Rngs(0)))
    return train.TrainState(jnp.zeros((), jnp.int32), params, tx.init(params)), frozen

  state, frozen = jax.jit(init, out_shardings=(spec.state, spec.frozen))()
  batch_size = c.optim.micro_batch_size * mesh.shape["data"] * mesh.shape["fsdp"]
  text_len = -(-c.data.cutoff_len // c.data.pad_to_multiple_of) * c.data.pad_to_multiple_of
  shapes = sizes.audio_batch(config, batch_size, text_len)

  def make_batch():
    key = jax.random.key(1)
    out = {name: jnp.ones(shape, dtype) for name, (shape, dtype) in shapes.items()}
    out["features"] = jax.random.normal(key, shapes["features"][0], jnp.float32)
    out["input_ids"] = jax.random.randint(key, shapes["input_ids"][0], 3, config.llm.vocab_size, jnp.int32)
    return out

  batch = jax.jit(make_batch, out_shardings={name: spec.batch(len(shape)) for name, (shape, _) in shapes.items()})()
  step = train.jit_train_step(graphdef, tx, schedule, spec)
  key = jax.random.key(0)
  start = time.perf_counter()
  compiled = step.lower(state, frozen, batch, key).compile()
  compile_s = time.perf_counter() - start
  memory = compiled.memory_analysis()  # None where a backend does not say
  state, metrics = compiled(state, frozen, batch, key)
  jax.block_until_ready(metrics)
  first_s = time.perf_counter() - start
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    state, metrics = compiled(state, frozen, batch, key)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  loss = float(metrics["loss"])
  flops = sample_flops(config, text_len, abstract_frozen, abstract_params) * batch_size
  peak_flops = datasheet(devices[0])[1]
  stats = devices[0].memory_stats() or {}
  compiled_peak = memory and (
    memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes + memory.temp_size_in_bytes
  )
  return dict(
    devices=len(devices), batch=batch_size, step_s=times, samples_per_s=batch_size / median(times),
    mfu=None if peak_flops is None else flops / median(times) / (peak_flops * len(devices)),
    model_tflop_per_step=flops / 1e12, compiled_peak_gb=compiled_peak and compiled_peak / 1e9,
    peak_gb=stats["peak_bytes_in_use"] / 1e9 if "peak_bytes_in_use" in stats else None,
    compile_s=compile_s, first_step_s=first_s, loss=loss,
  )


def decode_rows(tiny: bool, repeats: int, hbm: float | None, measured: float) -> list[dict[str, Any]]:
  """Greedy decoding of the 7B LLM (or the tiny one) on the first device, bf16."""
  config = sizes.ltu_as("bfloat16", False, tiny, llm_param_dtype="bfloat16").llm
  prompt, new_tokens = (8, 48) if tiny else (64, 64)
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  graphdef, state = on_devices(lambda: Llama(config, rngs=nnx.Rngs(0)), mesh)
  model = nnx.merge(graphdef, state)
  weight_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  if not config.tie_word_embeddings:  # a step gathers a row of the input embedding, not the whole table
    weight_bytes -= config.vocab_size * config.hidden_size * jnp.dtype(config.param_dtype).itemsize
  rows = []
  for batch in DECODE_BATCHES:
    ids = np.random.default_rng(batch).integers(3, config.vocab_size, (batch, prompt)).astype(np.int32)

    def run(count):
      sampling = generate.SamplingConfig(max_new_tokens=count)
      return jax.block_until_ready(generate.generate(model, ids, sampling=sampling).tokens)

    start = time.perf_counter()
    run(new_tokens)
    first_call = time.perf_counter() - start
    full, first = timing.timed(lambda: run(new_tokens), repeats), timing.timed(lambda: run(1), repeats, warm_up=True)
    step = (min(full) - min(first)) / (new_tokens - 1)
    max_len = prompt + new_tokens - 1
    cache_bytes = 2 * config.num_layers * batch * max_len * config.num_kv_heads * config.head_size * 2
    step_bytes = weight_bytes + cache_bytes
    rows.append(dict(
      batch=batch, tokens_per_s=[batch * new_tokens / t for t in full], step_s=step, step_gb=step_bytes / 1e9,
      hbm_share=None if hbm is None else step_bytes / step / hbm, measured_share=step_bytes / step / measured,
      first_call_s=first_call,
    ))
  return rows


def encoder_row(tiny: bool, repeats: int) -> dict[str, Any]:
  """Whisper large-v1's encoder (or the tiny one) on 30 s of mel (tiny: 2 s), bf16, on the first device."""
  config = sizes.TINY_WHISPER if tiny else sizes.WHISPER_LARGE_V1
  config = dataclasses.replace(config, dtype="bfloat16", param_dtype="bfloat16")
  batch, frames = (2, 200) if tiny else (8, 3000)
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  graphdef, state = on_devices(lambda: WhisperEncoder(config, nnx.Rngs(0)), mesh)
  mel = jax.random.normal(jax.random.key(0), (batch, config.num_mel_bins, frames), jnp.float32)
  encode = jax.jit(lambda state, mel: nnx.merge(graphdef, state)(mel))
  start = time.perf_counter()
  jax.block_until_ready(encode(state, mel))
  first_call = time.perf_counter() - start
  times = timing.timed(lambda: jax.block_until_ready(encode(state, mel)), repeats)
  return dict(batch=batch, seconds=frames / 100, clips_per_s=[batch / t for t in times], first_call_s=first_call)


def parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
    prog="python -m bench.accelerator", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument("--tiny", action="store_true", help="tiny models: the same code in seconds, on any CPU")
  parser.add_argument("--repeats", type=int, default=5, help="timed calls after the first (compiling) one")
  parser.add_argument("--json", help="also write the figures to this file")
  return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
  args = parser().parse_args(argv)
  device = jax.devices()[0]
  hbm, peak = datasheet(device)
  scale = 64 if args.tiny else 1  # the tiny run's bounds: 64 MiB and 1024², enough to be sane, fast on a CPU
  measured = bounds.jax_bounds(args.repeats, 4 * bounds.BANDWIDTH_BYTES // scale, 2 * bounds.GEMM // (8 if args.tiny else 1),
                               "float32" if device.platform == "cpu" else "bfloat16")
  result: dict[str, Any] = dict(
    device=device.device_kind, platform=device.platform, local_devices=jax.local_device_count(), tiny=args.tiny,
    jax=jax.__version__, datasheet_hbm_tb_s=hbm and hbm / TB, datasheet_bf16_tflop_s=peak and peak / 1e12,
    measured_bandwidth_tb_s=bounds.bandwidth(measured) / TB, measured_matmul_tflop_s=bounds.peak_flops(measured) / 1e12,
  )
  print(f"{jax.local_device_count()} × {device.device_kind} ({device.platform}), jax {jax.__version__}"
        + (", tiny models" if args.tiny else "") + f"; {bounds.describe(measured)}"
        + (f"; datasheet HBM {hbm / TB:.2f} TB/s, bf16 {peak / 1e12:.0f} TFLOP/s" if hbm else "; not in the datasheet table"),
        flush=True)
  counts = sorted({1, jax.local_device_count()})
  result["train"] = []
  for n in counts:
    row = train_row(args.tiny, jax.devices()[:n], args.repeats)
    result["train"].append(row)
    mfu = "" if row["mfu"] is None else f", MFU {100 * row['mfu']:.1f}%"
    peak_gb = "" if row["peak_gb"] is None else f", measured peak {row['peak_gb']:.2f} GB"
    print(f"train stage 3, {n} device(s), batch {row['batch']}: {row['samples_per_s']:.2f} samples/s "
          f"(step {timing.spread(row['step_s'])} s){mfu}; compiled peak {row['compiled_peak_gb'] or float('nan'):.2f} GB a device{peak_gb}; "
          f"compile {row['compile_s']:.1f} s, first step {row['first_step_s']:.1f} s", flush=True)
    gc.collect()
  result["decode"] = decode_rows(args.tiny, args.repeats, hbm, bounds.bandwidth(measured))
  for row in result["decode"]:
    share = "" if row["hbm_share"] is None else f"{100 * row['hbm_share']:.0f}% of HBM, "
    print(f"decode batch {row['batch']}: {timing.spread(row['tokens_per_s'])} tokens/s; a step {1e3 * row['step_s']:.2f} ms "
          f"for {row['step_gb']:.2f} GB: {share}{100 * row['measured_share']:.0f}% of the measured bandwidth; "
          f"first call {row['first_call_s']:.1f} s", flush=True)
  gc.collect()
  result["encoder"] = encoder_row(args.tiny, args.repeats)
  row = result["encoder"]
  print(f"Whisper encoder, batch {row['batch']} of {row['seconds']:g} s: {timing.spread(row['clips_per_s'])} clips/s; "
        f"first call {row['first_call_s']:.1f} s", flush=True)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=2)
  print(json.dumps(result))
  return result


if __name__ == "__main__":
  main()
