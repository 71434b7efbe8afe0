"""Per-device memory of the 7B LTU-AS (and LTU) train step, from the compiler alone: no weights, no accelerator.

    .venv/bin/python bench/train_memory.py [--stages stage3 stage3_16gb] [--devices 1 4 8] [--remat config off on]
                                           [--micro 4] [--cutoff 160] [--cpu-hoisting]
    .venv/bin/python bench/train_memory.py --stages ltu_stage4 --devices 1 8 --cutoff 108   # LTU

The model is the released LTU-AS (Vicuna-7B, TLTR at Whisper large's width over 32 layers, LoRA r8 on
q and v), or for the `ltu_stage*` rows the released LTU (the same LLM and LoRA, CAV-MAE's ViT-B audio
branch over one 10.24 s fbank window, 32 audio tokens), built abstractly with `nnx.eval_shape`, split by a stage's trainable filter, the frozen part
cast to the config's storage dtype (bf16); the trainer's own jitted step (`train.jit_train_step` with
`train.TrainShardings`) is lowered and compiled for a mesh of 1, 4 or 8 host devices (the config's
mesh: fsdp over every device). `memory_analysis()` of the compiled step gives per-device bytes:
  args   trainable fp32 masters, AdamW moments, the frozen bf16 LLM (its shard), the batch
  out    outputs not aliased to the donated state (the metrics)
  temp   everything else live at the peak: activations kept for the backward pass, gradients,
         all-gathered weight shards
  peak   args + out + temp
One accumulation step is compiled: more steps reuse the scan's buffers, so the peak does not grow.
remat on (the trainer's `precision.remat`): the LLM's layers recompute their activations in the backward
pass. Each row of the table is an entry of `ROWS` (a trainer config, a model
kind and size, its batch's shapes): another model is one more entry.

These are the XLA CPU compiler's figures, estimates of a GPU's. The CPU has no native bf16 matmul: it
converts each bf16 weight to fp32 before its dot, and loop-invariant code motion then hoists that
convert out of the layer scan, a full fp32 copy of the stacked frozen LLM (+27 GB) that a GPU never
makes. By default that hoisting is switched off for the compile (`--cpu-hoisting` keeps it, for the raw
CPU figure); some activations are still kept in fp32 where a GPU keeps bf16, so the figures lean high.
"""

from __future__ import annotations

import os

FORCED_HOST_DEVICES = 8
# Before jax is imported: the host platform then offers 8 devices for the multi-device meshes.
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={FORCED_HOST_DEVICES}".strip()

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from typing import Any, Callable  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

import sizes  # noqa: E402
from ltu_jax import kinds, sharding, train  # noqa: E402

GB = 1e9
CARDS_GB = (16, 24, 48)  # issue #15's goal; the original's low-resource A5000s and its A6000s (facts §7.1)
NO_HOISTING = {"xla_disable_hlo_passes": "while-loop-invariant-code-motion,while-loop-expensive-invariant-code-motion"}


@dataclasses.dataclass(frozen=True)
class Row:
  """A model under one trainer config: a row of the table (one more model is one more entry in `ROWS`)."""

  config: str  # the trainer config in configs/
  kind: str  # its model kind (the trainable groups)
  model: Callable[[str, bool], Any]  # (compute dtype, remat) → the model config, weights fp32
  batch: Callable[[Any, int, int], dict]  # (model config, batch, text tokens) → {name: (shape, dtype)}
  paper_trainable: int  # trainable parameters the paper counts (facts §1.8)


ROWS = {
  "stage1": Row("stage1", "ltu_as", sizes.ltu_as, sizes.audio_batch, 5_246_976),
  "stage2": Row("stage2", "ltu_as", sizes.ltu_as, sizes.audio_batch, 48_793_600),
  "stage3": Row("stage3", "ltu_as", sizes.ltu_as, sizes.audio_batch, 48_793_600),
  "stage3_16gb": Row("stage3_16gb", "ltu_as", sizes.ltu_as, sizes.audio_batch, 48_793_600),
  # LTU: the paper's count has the 48 LayerNorms the original holds but never reads (73,728 parameters): ours is that less
  "ltu_stage1": Row("ltu_stage1", "ltu", sizes.ltu, sizes.audio_batch, 3_149_824),
  **{f"ltu_stage{i}": Row(f"ltu_stage{i}", "ltu", sizes.ltu, sizes.audio_batch, 93_065_216) for i in (2, 3, 4)},
}


def abstract_split(name: str, remat: bool | None, micro: int | None):
  """(trainer config, model config, graphdef, abstract trainable params, abstract frozen params in storage dtype);
  `remat` and `micro` (the micro-batch) override the config's own when given."""
  row = ROWS[name]
  overrides = {"precision.remat": remat, "optim.micro_batch_size": micro}
  c = train.load_config(row.config, [f"{key}={value}" for key, value in overrides.items() if value is not None])
  kind = kinds.get(row.kind)
  config = row.model(c.precision.compute, c.precision.remat)
  model = nnx.eval_shape(lambda: kind.model(config, rngs=nnx.Rngs(0)))
  graphdef, params, frozen = train.split_for_training(model, c, kind)
  return c, config, graphdef, params, frozen


def count(tree) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def abstract_batch(name: str, config: Any, micro: int, text_len: int, spec: train.TrainShardings) -> dict:
  """One accumulation step `[1, micro × data-parallel devices, ...]`, sharded as the trainer shards it."""
  shapes = ROWS[name].batch(config, micro * spec.mesh.shape["data"] * spec.mesh.shape["fsdp"], text_len)
  return {k: jax.ShapeDtypeStruct(s, d, sharding=spec.batch(len(s))) for k, (s, d) in shapes.items()}


def measure(stage: str, devices: list[jax.Device], remat: bool | None, micro: int | None, text_len: int, compiler_options: dict) -> dict:
  """Lowers and compiles the stage's train step on a mesh of `devices`; returns bytes per device, its remat
  setting and micro-batch."""
  c, config, graphdef, params, frozen = abstract_split(stage, remat, micro)
  kind = kinds.get(ROWS[stage].kind)
  mesh = sharding.make_mesh(c.mesh.data, c.mesh.fsdp, c.mesh.tensor, devices=devices)
  tx, schedule = train.optimizer(c, 1000, kind)
  spec = train.TrainShardings.of(params, frozen, tx, mesh)
  state = train.TrainState(jax.ShapeDtypeStruct((), jnp.int32), params, jax.eval_shape(tx.init, params))
  key = jax.eval_shape(lambda: jax.random.key(0))
  key = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
  batch = abstract_batch(stage, config, c.optim.micro_batch_size, text_len, spec)
  start = time.perf_counter()
  lowered = train.jit_train_step(graphdef, tx, schedule, spec).lower(state, frozen, batch, key)
  memory = lowered.compile(compiler_options=compiler_options).memory_analysis()
  seconds = time.perf_counter() - start
  out = memory.output_size_in_bytes - memory.alias_size_in_bytes
  return dict(
    args=memory.argument_size_in_bytes, out=out, temp=memory.temp_size_in_bytes,
    peak=memory.argument_size_in_bytes + out + memory.temp_size_in_bytes, compile_s=seconds,
    remat="on" if c.precision.remat else "off", micro=c.optim.micro_batch_size,
  )


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--stages", nargs="+", default=["stage3", "stage3_16gb"], choices=sorted(ROWS), help="rows (`ROWS`)")
  parser.add_argument("--devices", nargs="+", type=int, default=[1, 4, 8], help=f"mesh sizes, at most {FORCED_HOST_DEVICES}")
  parser.add_argument("--remat", nargs="+", default=["config"], choices=["config", "off", "on"], help="config: the row's own")
  parser.add_argument("--micro", type=int, help="micro-batch per device (default: the config's; stage 3 v2 ran 4)")
  parser.add_argument("--cutoff", type=int, default=160, help="text tokens (stage 3 v2: 160), padded to a multiple of 8")
  parser.add_argument("--cpu-hoisting", action="store_true", help="keep XLA CPU's hoisted fp32 weight copies (raw CPU figure)")
  args = parser.parse_args()
  text_len = -(-args.cutoff // 8) * 8
  devices = jax.devices("cpu")
  print(f"jax {jax.__version__}, XLA CPU compiler's estimate{' with its fp32 weight hoisting' if args.cpu_hoisting else ''}; "
        f"7B models (LTU-AS: 25 audio tokens, LTU: 32) + {text_len} text tokens, bf16 compute, "
        f"frozen LLM bf16, trainable fp32 + AdamW; GB = 1e9 bytes per device")
  for stage in args.stages:
    *_, params, frozen = abstract_split(stage, None, args.micro)
    print(f"{stage}: {count(params):,} trainable parameters (paper: {ROWS[stage].paper_trainable:,}), {count(frozen):,} frozen")
  print(f"{'config':11s} {'devices':>7s} {'remat':>5s} {'micro':>5s} {'args':>6s} {'out':>6s} {'temp':>6s} {'peak':>6s}"
        + "".join(f" {f'≤{gb} GB':>6s}" for gb in CARDS_GB) + f" {'compile s':>9s}")
  for stage in args.stages:
    for remat in args.remat:
      for n in args.devices:
        if n > len(devices):
          raise SystemExit(f"--devices {n}: only {len(devices)} host devices are forced")
        setting = None if remat == "config" else remat == "on"
        row = measure(stage, devices[:n], setting, args.micro, text_len, {} if args.cpu_hoisting else NO_HOISTING)
        fits = "".join(f" {'yes' if row['peak'] <= gb * GB else 'no':>6s}" for gb in CARDS_GB)
        print(f"{stage:11s} {n:7d} {row['remat']:>5s} {row['micro']:5d} " + " ".join(f"{row[k] / GB:6.2f}" for k in ("args", "out", "temp", "peak"))
              + f"{fits} {row['compile_s']:9.1f}", flush=True)


if __name__ == "__main__":
  main()
