"""Per-device memory of the 7B LTU-AS (or LTU) train step, from the compiler alone: no weights, no accelerator.

    .venv/bin/python bench/train_memory.py [--stages stage3 stage1] [--devices 1 4 8] [--remat off on]
                                           [--micro 4] [--cutoff 160] [--cpu-hoisting]
    .venv/bin/python bench/train_memory.py --model ltu [--stages ltu_stage4] [--devices 1 8] [--cutoff 108]

The model is the released LTU-AS (Vicuna-7B, TLTR at Whisper large's width over 32 layers, LoRA r8 on
q and v), or with `--model ltu` the released LTU (the same LLM and LoRA, CAV-MAE's ViT-B audio branch over
one 10.24 s fbank window, 32 audio tokens), built abstractly with `nnx.eval_shape`, split by a stage's trainable filter, the frozen part
cast to the config's storage dtype (bf16); the trainer's own jitted step (`train.jit_train_step` with
`train.TrainShardings`) is lowered and compiled for a mesh of 1, 4 or 8 host devices (the config's
mesh: fsdp over every device). `memory_analysis()` of the compiled step gives per-device bytes:
  args   trainable fp32 masters, AdamW moments, the frozen bf16 LLM (its shard), the batch
  out    outputs not aliased to the donated state (the metrics)
  temp   everything else live at the peak: activations kept for the backward pass, gradients,
         all-gathered weight shards
  peak   args + out + temp
One accumulation step is compiled: more steps reuse the scan's buffers, so the peak does not grow.

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

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from ltu_jax import kinds, sharding, train  # noqa: E402
from ltu_jax.models.llama import LlamaConfig  # noqa: E402
from ltu_jax.models.cav_mae import CavMaeConfig  # noqa: E402
from ltu_jax.models.lora import LoRAConfig  # noqa: E402
from ltu_jax.models.ltu import Ltu, LtuConfig  # noqa: E402
from ltu_jax.models.ltu_as import LtuAs, LtuAsConfig  # noqa: E402
from ltu_jax.models.tltr import TLTRConfig  # noqa: E402

GB = 1e9
CARDS_GB = (24, 48)  # the original's low-resource A5000s and its A6000s (facts §7.1)
NO_HOISTING = {"xla_disable_hlo_passes": "while-loop-invariant-code-motion,while-loop-expensive-invariant-code-motion"}

VICUNA_7B = LlamaConfig(
  vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32, num_kv_heads=32,
  rms_norm_eps=1e-6, tie_word_embeddings=False, lora=LoRAConfig(rank=8, alpha=16.0, dropout=0.05, targets=("q_proj", "v_proj")),
)


def ltu_as_7b(compute: str, remat: bool) -> LtuAsConfig:
  """The released LTU-AS, weights fp32 (the trainable masters; the frozen part is cast after the split)."""
  return LtuAsConfig(
    llm=dataclasses.replace(VICUNA_7B, dtype=compute, remat=remat),
    tltr=TLTRConfig(dim=1280, mlp_dim=5120, dtype=compute),
    feature_layers=32,
    audio_tokens=25,
  )


def ltu_7b(compute: str, remat: bool) -> LtuConfig:
  """The released LTU: Vicuna-7B with LoRA and CAV-MAE's audio branch (ViT-B), weights fp32."""
  return LtuConfig(
    llm=dataclasses.replace(VICUNA_7B, dtype=compute, remat=remat), encoder=CavMaeConfig(dtype=compute, remat=remat)
  )


@dataclasses.dataclass(frozen=True)
class Model:
  kind: str
  title: str
  config: object  # (compute dtype, remat) → the model's config
  module: type
  paper_trainable: dict[str, int]  # per stage config (facts §1.8, §2)


MODELS = {
  "ltu_as": Model("ltu_as", "LTU-AS", ltu_as_7b, LtuAs, {"stage1": 5_246_976, "stage2": 48_793_600, "stage3": 48_793_600}),
  "ltu": Model("ltu", "LTU", ltu_7b, Ltu, {"ltu_stage1": 3_149_824, **{f"ltu_stage{i}": 93_065_216 for i in (2, 3, 4)}}),
}


def abstract_split(model_spec: Model, stage: str, remat: bool, micro: int):
  """(stage config, model config, graphdef, abstract trainable params, abstract frozen params in storage dtype)."""
  c = train.load_config(stage, [f"precision.remat={remat}", f"optim.micro_batch_size={micro}"])
  config = model_spec.config(c.precision.compute, c.precision.remat)
  model = nnx.eval_shape(lambda: model_spec.module(config, rngs=nnx.Rngs(0)))
  graphdef, params, frozen = train.split_for_training(model, c, kinds.get(model_spec.kind))
  return c, config, graphdef, params, frozen


def count(tree) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def abstract_batch(config: LtuAsConfig | LtuConfig, micro: int, text_len: int, spec: train.TrainShardings) -> dict:
  """One accumulation step `[1, micro × data-parallel devices, ...]`, as `Trainer.device_batch` shapes it;
  one window of audio input."""
  batch = micro * spec.mesh.shape["data"] * spec.mesh.shape["fsdp"]
  shapes = {
    "features": ((1, batch, *config.feature_shape), jnp.float32),
    "audio_mask": ((1, batch, config.feature_shape[1]), jnp.int32),
    "input_ids": ((1, batch, text_len), jnp.int32),
    "attention_mask": ((1, batch, text_len), jnp.int32),
    "loss_mask": ((1, batch, text_len), jnp.bool_),
  }
  return {k: jax.ShapeDtypeStruct(s, d, sharding=spec.batch(len(s))) for k, (s, d) in shapes.items()}


def measure(
  model_spec: Model, stage: str, devices: list[jax.Device], remat: bool, micro: int, text_len: int, compiler_options: dict
) -> dict:
  """Lowers and compiles the stage's train step on a mesh of `devices`; returns bytes per device."""
  c, config, graphdef, params, frozen = abstract_split(model_spec, stage, remat, micro)
  mesh = sharding.make_mesh(c.mesh.data, c.mesh.fsdp, c.mesh.tensor, devices=devices)
  tx, schedule = train.optimizer(c, 1000, kinds.get(model_spec.kind))
  spec = train.TrainShardings.of(params, frozen, tx, mesh)
  state = train.TrainState(jax.ShapeDtypeStruct((), jnp.int32), params, jax.eval_shape(tx.init, params))
  key = jax.eval_shape(lambda: jax.random.key(0))
  key = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
  batch = abstract_batch(config, c.optim.micro_batch_size, text_len, spec)
  start = time.perf_counter()
  lowered = train.jit_train_step(graphdef, tx, schedule, spec).lower(state, frozen, batch, key)
  memory = lowered.compile(compiler_options=compiler_options).memory_analysis()
  seconds = time.perf_counter() - start
  out = memory.output_size_in_bytes - memory.alias_size_in_bytes
  return dict(
    args=memory.argument_size_in_bytes, out=out, temp=memory.temp_size_in_bytes,
    peak=memory.argument_size_in_bytes + out + memory.temp_size_in_bytes, compile_s=seconds,
  )


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--model", choices=sorted(MODELS), default="ltu_as")
  parser.add_argument("--stages", nargs="+", help="stage configs (default: LTU-AS stage3 stage1; LTU ltu_stage4 ltu_stage1)")
  parser.add_argument("--devices", nargs="+", type=int, default=[1, 4, 8], help=f"mesh sizes, at most {FORCED_HOST_DEVICES}")
  parser.add_argument("--remat", nargs="+", default=["off", "on"], choices=["off", "on"])
  parser.add_argument("--micro", type=int, default=4, help="micro-batch per device (stage 3 v2 ran 4)")
  parser.add_argument("--cutoff", type=int, default=160, help="text tokens (stage 3 v2: 160), padded to a multiple of 8")
  parser.add_argument("--cpu-hoisting", action="store_true", help="keep XLA CPU's hoisted fp32 weight copies (raw CPU figure)")
  args = parser.parse_args()
  model_spec = MODELS[args.model]
  args.stages = args.stages or [max(model_spec.paper_trainable), min(model_spec.paper_trainable)]
  unknown = sorted(set(args.stages) - set(model_spec.paper_trainable))
  if unknown:
    parser.error(f"--stages {unknown}: {model_spec.title}'s stages are {sorted(model_spec.paper_trainable)}")
  text_len = -(-args.cutoff // 8) * 8
  devices = jax.devices("cpu")
  audio_tokens = model_spec.config("bfloat16", False).audio_tokens
  print(f"jax {jax.__version__}, XLA CPU compiler's estimate{' with its fp32 weight hoisting' if args.cpu_hoisting else ''}; "
        f"7B {model_spec.title}, micro-batch {args.micro} per device, {audio_tokens} audio + {text_len} text tokens, bf16 compute, "
        f"frozen LLM bf16, trainable fp32 + AdamW; GB = 1e9 bytes per device")
  for stage in args.stages:
    *_, params, frozen = abstract_split(model_spec, stage, False, args.micro)
    print(f"{stage}: {count(params):,} trainable parameters (paper: {model_spec.paper_trainable[stage]:,}), {count(frozen):,} frozen")
  print(f"{'stage':7s} {'devices':>7s} {'remat':>5s} {'args':>6s} {'out':>6s} {'temp':>6s} {'peak':>6s}"
        + "".join(f" {f'≤{gb} GB':>6s}" for gb in CARDS_GB) + f" {'compile s':>9s}")
  for stage in args.stages:
    for remat in args.remat:
      for n in args.devices:
        if n > len(devices):
          raise SystemExit(f"--devices {n}: only {len(devices)} host devices are forced")
        row = measure(model_spec, stage, devices[:n], remat == "on", args.micro, text_len, {} if args.cpu_hoisting else NO_HOISTING)
        fits = "".join(f" {'yes' if row['peak'] <= gb * GB else 'no':>6s}" for gb in CARDS_GB)
        print(f"{stage:7s} {n:7d} {remat:>5s} " + " ".join(f"{row[k] / GB:6.2f}" for k in ("args", "out", "temp", "peak"))
              + f"{fits} {row['compile_s']:9.1f}", flush=True)


if __name__ == "__main__":
  main()
