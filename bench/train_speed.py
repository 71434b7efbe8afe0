"""Train-step speed on CPU: the tiny LTU-AS (Whisper tiny.en features, SmolLM2-135M) against PyTorch.

    .venv/bin/python bench/train_speed.py [--configs tiny_stage1 tiny_stage3] [--rounds 3] [--steps 3] [--text 64]
                                          [--set optim.micro_batch_size=8 ...] [--no-torch] [--keep-denormals]

For each config: the trainer's jitted step (`train.jit_train_step`, built as `train.Trainer` builds
it: stage filter, frozen cast, shardings, AdamW on the warm-up-then-decay schedule) on random weights
and a random batch of full rows (25 audio tokens + `--text` text tokens, every text token a target),
its micro-batches and accumulation steps from the config. PyTorch does the same work: a transformers
`LlamaForCausalLM` with peft LoRA on q, v, the TLTR and projection of `tests.torch_reference`, only the
stage's parameters trainable, fp32 with denormals flushed to zero (as XLA on CPU does), the original's
forward (`ltu_as_forward`) and backward on every micro-batch, then `AdamW.step`.

Each round runs one JAX process, then one PyTorch process (never both frameworks in one process: each
brings its own thread pools and allocator set-up; PyTorch's process runs as users get it, with glibc's
own malloc), so a slow spell of a shared machine falls on both. Each process measures the machine first
(`bounds`: memory bandwidth and a 4096² fp32 GEMM), then per config the compile time (ours) and `--steps`
steps after a warm-up step. Step times are medians (min–max) over every step of every round; the ratio is
PyTorch's median seconds per step over ours (above 1: we are faster). Beside each side's time, its model
FLOPs utilisation: the step's matmul FLOPs (`step_flops`) over its median time, as a share of the median
matmul peak that the same framework's processes measured; last, our bound: the step's FLOPs at JAX's peak
(what 100% MFU would take) and PyTorch's time over it, the most that the ratio can reach without fewer FLOPs.

Sizes come from `cache/models/ltu_as-tiny` when the tiny pipeline has converted it, else from the
embedded default below (the same sizes); weights are random either way, speed does not depend on them.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import statistics
import sys
import time
from typing import Any, Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# PyTorch's process runs with glibc's own malloc, as PyTorch's users get it: `import ltu_jax` (which
# `common` imports) would otherwise set up its own (`ltu_jax.memory`) there too. Before any such import.
if "--framework" in sys.argv and sys.argv[sys.argv.index("--framework") + 1:][:1] == ["torch"]:
  os.environ["LTU_JAX_MALLOC"] = "system"

import numpy as np  # noqa: E402

import bounds  # noqa: E402
import common  # noqa: E402
from configs import tiny  # noqa: E402
from ltu_jax import kinds, model_folder, train  # noqa: E402
from ltu_jax.models.llama import LlamaConfig  # noqa: E402
from ltu_jax.models.lora import LoRAConfig  # noqa: E402
from ltu_jax.models.ltu_as import LtuAsConfig  # noqa: E402
from ltu_jax.models.tltr import TLTRConfig  # noqa: E402

EMBEDDED_DEFAULT = LtuAsConfig(  # Whisper tiny.en (4 blocks of 384) under SmolLM2-135M, as conversion.ltu_as composes them
  llm=LlamaConfig(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9, num_kv_heads=3,
    rms_norm_eps=1e-5, rope_theta=100000.0, max_position_embeddings=8192, tie_word_embeddings=True, lora=LoRAConfig(),
  ),
  tltr=TLTRConfig(dim=384, mlp_dim=1536),
  feature_layers=4,
  audio_tokens=25,
)


def tiny_config() -> tuple[LtuAsConfig, str]:
  """The tiny LTU-AS's config from its converted folder, else the embedded default; and where it came from."""
  folder = os.path.join(ROOT, tiny.LTU_AS)
  if os.path.isfile(os.path.join(folder, model_folder.CONFIG_FILE)):
    return model_folder.config_from_dict(LtuAsConfig, model_folder.read_manifest(folder)["config"]), folder
  return EMBEDDED_DEFAULT, "the embedded default"


def for_training(config: LtuAsConfig, c) -> LtuAsConfig:
  """The config as `Trainer` loads it: compute dtype and remat from `precision`, the training LoRA dropout."""
  config = dataclasses.replace(
    config,
    llm=dataclasses.replace(config.llm, dtype=c.precision.compute, remat=c.precision.remat),
    tltr=dataclasses.replace(config.tltr, dtype=c.precision.compute),
  )
  return train.training_config(config, c)


def random_batch(config: LtuAsConfig, accum: int, micro: int, text_len: int, seed: int = 0) -> dict[str, np.ndarray]:
  """`[accum, micro, ...]` full rows: random features and tokens, every token a target."""
  rng = np.random.default_rng(seed)
  shape = (accum, micro, text_len)
  return {
    "features": rng.normal(size=(accum, micro, config.feature_layers, config.audio_tokens, config.tltr.dim)).astype(np.float32),
    "audio_mask": np.ones((accum, micro, config.audio_tokens), np.int32),
    "input_ids": rng.integers(3, config.llm.vocab_size, shape).astype(np.int32),
    "attention_mask": np.ones(shape, np.int32),
    "loss_mask": np.ones(shape, bool),
  }


def step_flops(config: LtuAsConfig, rows: int, text_len: int) -> float:
  """Matmul FLOPs (2 per multiply-add) of one training step over `rows` rows of audio + `text_len` tokens.

  The forward pass of the LLM's blocks over every token (projections, MLP, and attention's two matmuls over
  the whole row, as computed) and of its output head over the text tokens; the backward pass costs as much
  again, for the gradients of the activations. Frozen weights need no gradient of their own, and those of
  the trainable ones (the projection, TLTR, the rank-8 adapters), like TLTR's forward, are under 1% of it at
  these sizes: left out. So about 4 × LLM parameters × tokens.
  """
  llm = config.llm
  tokens = config.audio_tokens + text_len
  attention_width = llm.num_heads * llm.head_size
  kv_width = llm.num_kv_heads * llm.head_size
  block_weights = llm.hidden_size * (2 * attention_width + 2 * kv_width) + 3 * llm.hidden_size * llm.intermediate_size
  per_row = llm.num_layers * (2 * block_weights * tokens + 2 * 2 * tokens * tokens * attention_width)
  per_row += 2 * llm.hidden_size * llm.vocab_size * text_len
  return 2 * rows * per_row


def batch_layout(c, devices: int) -> tuple[int, int]:
  """(accumulation steps, rows a micro-batch) of a step of `c` on `devices` devices, as `Trainer` splits it:
  micro-batches over the data-parallel ones (all but the tensor axis)."""
  micro = c.optim.micro_batch_size * (devices // c.mesh.tensor)
  return c.optim.batch_size // micro, micro


def ours(config: LtuAsConfig, c, batch: dict[str, np.ndarray]) -> tuple[float, Callable[[], None]]:
  """(compile seconds, one training step) of the trainer's jitted step."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from ltu_jax import sharding
  from ltu_jax.models.ltu_as import LtuAs

  model = LtuAs(config, rngs=nnx.Rngs(0))
  graphdef, params, frozen = train.split_for_training(model, c, kinds.get("ltu_as"))
  mesh = sharding.make_mesh(c.mesh.data, c.mesh.fsdp, c.mesh.tensor)
  tx, schedule = train.optimizer(c, 1000, kinds.get("ltu_as"))
  spec = train.TrainShardings.of(params, frozen, tx, mesh)
  frozen = jax.device_put(frozen, spec.frozen)
  params = jax.device_put(params, spec.state.params)
  state = train.TrainState(jnp.zeros((), jnp.int32), params, jax.jit(tx.init, out_shardings=spec.state.opt_state)(params))
  batch = {k: jax.device_put(v, spec.batch(v.ndim)) for k, v in batch.items()}
  key = jax.random.key(c.seed)
  start = time.perf_counter()
  step_fn = train.jit_train_step(graphdef, tx, schedule, spec).lower(state, frozen, batch, key).compile()
  compile_s = time.perf_counter() - start

  def step():
    nonlocal state
    state, metrics = step_fn(state, frozen, batch, key)
    jax.block_until_ready(metrics["loss"])

  return compile_s, step


def pytorch(config: LtuAsConfig, c, batch: dict[str, np.ndarray]) -> Callable[[], None]:
  """The same training step in PyTorch (transformers + peft), fp32."""
  import peft
  import torch
  import transformers

  from tests import torch_reference

  torch.manual_seed(0)
  llm = config.llm
  llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
    vocab_size=llm.vocab_size, hidden_size=llm.hidden_size, intermediate_size=llm.intermediate_size,
    num_hidden_layers=llm.num_layers, num_attention_heads=llm.num_heads, num_key_value_heads=llm.num_kv_heads,
    rms_norm_eps=llm.rms_norm_eps, rope_theta=llm.rope_theta, max_position_embeddings=llm.max_position_embeddings,
    tie_word_embeddings=llm.tie_word_embeddings, attn_implementation="sdpa",
  ))
  tltr = config.tltr
  torch_reference.attach_audio_modules(
    llama, torch_reference.TLTR(tltr.dim, tltr.time_heads, tltr.layer_heads, tltr.mlp_dim), tltr.dim
  )
  lora = llm.lora
  model = peft.get_peft_model(llama, peft.LoraConfig(
    r=lora.rank, lora_alpha=lora.alpha, lora_dropout=c.lora.dropout, target_modules=list(lora.targets)
  ))
  # peft freezes all but the adapters; then the stage's choice, as the original's finetune.py does.
  # torch names (`base_model.model.model.audio_proj.1.weight`, `...q_proj.lora_A.default.weight`) in our
  # kind's group terms: the groups' expressions, unanchored, on the dotted name
  ltu_as, chosen = kinds.get("ltu_as"), set(train.group_names(kinds.get("ltu_as"), c.trainable, "trainable"))
  patterns = [pattern.lstrip("^").replace("lora_[ab]$", "lora_[AB]") for name, pattern in ltu_as.groups if name in chosen]
  for name, param in model.named_parameters():
    param.requires_grad = any(re.search(pattern, name) for pattern in patterns)
  model.train()
  optim = torch.optim.AdamW(
    [p for p in model.parameters() if p.requires_grad], lr=c.optim.lr, betas=(c.optim.b1, c.optim.b2),
    eps=c.optim.eps, weight_decay=c.optim.weight_decay,
  )
  micro_batches = [
    {k: torch.from_numpy(v[i]).long() if v.dtype == np.int32 else torch.from_numpy(v[i]) for k, v in batch.items()}
    for i in range(batch["input_ids"].shape[0])
  ]

  def step():
    for micro in micro_batches:
      _, loss = torch_reference.ltu_as_forward(model, micro["features"], micro["input_ids"], micro["attention_mask"], micro["input_ids"])
      (loss / len(micro_batches)).backward()
    optim.step()
    optim.zero_grad()

  return step


def child(framework: str, args: argparse.Namespace) -> None:
  """One side's figures, as the JSON line `common.in_child` reads: its bounds, then per config the batch
  layout, FLOPs, compile time (ours) and `--steps` step times after a warm-up step."""
  if framework == "jax":
    import jax

    devices = len(jax.devices())
    version = f"jax {jax.__version__} on {devices} {jax.devices()[0].platform} device(s)"
    measured = bounds.jax_bounds(args.steps)
  else:
    import torch

    devices = 1  # one process, one device: the same rows in micro-batches of the config's size
    torch.set_num_threads(os.cpu_count())
    # XLA's CPU runtime flushes denormals to zero; PyTorch does not by default, and the backward pass through
    # a deep random-weight LLM makes enough of them to slow it about 10×. Both are measured flushing.
    torch.set_flush_denormal(not args.keep_denormals)
    version = f"torch {torch.__version__} with {torch.get_num_threads()} threads"
    measured = bounds.torch_bounds(args.steps)
  config, source = tiny_config()
  result = {"version": version, "source": source, "bounds": measured, "configs": {}}
  for name in args.configs:
    c = train.load_config(name, args.set)
    model_config = for_training(config, c)
    accum, micro = batch_layout(c, devices)
    batch = random_batch(model_config, accum, micro, args.text)
    row = {"batch": f"{accum}×{micro}", "rows": accum * micro, "flops": step_flops(model_config, accum * micro, args.text)}
    if framework == "jax":
      row["compile_s"], step = ours(model_config, c, batch)
    else:
      step = pytorch(model_config, c, batch)
    row["step_s"] = common.timed(step, args.steps, warm_up=True)
    result["configs"][name] = row
  common.report(result)


def parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--configs", nargs="+", default=["tiny_stage1", "tiny_stage3"])
  parser.add_argument("--rounds", type=int, default=3, help="rounds of one JAX process, then one PyTorch process")
  parser.add_argument("--steps", type=int, default=3, help="timed steps a process, after one warm-up step")
  parser.add_argument("--text", type=int, default=64, help="text tokens per row (the tiny data pads to a multiple of 16)")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
  parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch reference")
  parser.add_argument("--keep-denormals", action="store_true", help="PyTorch without flushing denormals (10× slower here)")
  parser.add_argument("--framework", choices=("jax", "torch"), help="(internal) run one side and print JSON")
  return parser


def main() -> None:
  args = parser().parse_args()
  if args.framework:
    return child(args.framework, args)
  flags = ["--steps", str(args.steps), "--text", str(args.text), "--configs", *args.configs]
  flags += [f"--set={item}" for item in args.set] + (["--keep-denormals"] if args.keep_denormals else [])
  frameworks = ["jax"] if args.no_torch else ["jax", "torch"]
  load_before = os.getloadavg()[0]
  runs = {framework: [] for framework in frameworks}
  for round_ in range(args.rounds):
    for framework in frameworks:
      print(f"round {round_ + 1}/{args.rounds}: {framework}", file=sys.stderr, flush=True)
      runs[framework].append(common.in_child(__file__, framework, flags))
  load_after = os.getloadavg()[0]

  def pooled(framework: str, name: str, field: str) -> list[float]:
    """A figure of every round (lists, such as step times, joined)."""
    values = [run["configs"][name][field] for run in runs[framework]]
    return [v for value in values for v in value] if isinstance(values[0], list) else values

  peaks = {}
  for framework, rs in runs.items():
    measured = dict(rs[0]["bounds"], bandwidth_s=[t for r in rs for t in r["bounds"]["bandwidth_s"]],
                    gemm_s=[t for r in rs for t in r["bounds"]["gemm_s"]])
    peaks[framework] = bounds.peak_flops(measured)
    print(f"{rs[0]['version']}: {bounds.describe(measured)}")
  first = runs["jax"][0]
  print(f"sizes from {first['source']}; {EMBEDDED_DEFAULT.audio_tokens} audio + {args.text} text tokens a row; "
        f"load average (1 min) {load_before:.1f} before, {load_after:.1f} after; {args.rounds} rounds × {args.steps} "
        "steps; medians (min–max) over all steps")
  header = f"{'config':12s} {'batch':>5s} {'compile s':>9s} {'GFLOP':>6s} {'step s':>18s} {'samples/s':>9s} {'tokens/s':>8s} {'MFU':>5s}"
  print(header + ("" if args.no_torch else f" {'torch s':>18s} {'torch MFU':>9s} {'torch/ours':>10s}"))
  bounds_line = []
  for name in args.configs:
    row = first["configs"][name]
    flops, rows = row["flops"], row["rows"]
    seconds = {framework: statistics.median(pooled(framework, name, "step_s")) for framework in frameworks}
    mfu = {framework: flops / seconds[framework] / peaks[framework] for framework in frameworks}
    tokens = rows * (EMBEDDED_DEFAULT.audio_tokens + args.text)
    line = f"{name:12s} {row['batch']:>5s} {statistics.median(pooled('jax', name, 'compile_s')):9.1f} {flops * 1e-9:6.0f} "
    line += f"{common.spread(pooled('jax', name, 'step_s')):>18s} {rows / seconds['jax']:9.2f} {tokens / seconds['jax']:8.0f} {mfu['jax']:5.0%}"
    if not args.no_torch:
      line += f" {common.spread(pooled('torch', name, 'step_s')):>18s} {mfu['torch']:9.0%} {seconds['torch'] / seconds['jax']:10.2f}"
    print(line, flush=True)
    bounds_line.append(f"{name} {flops / peaks['jax']:.2f} s" + ("" if args.no_torch else f" ({seconds['torch'] * peaks['jax'] / flops:.2f}× PyTorch's step)"))
  # What no step of ours can beat without doing fewer FLOPs: all of them at the measured GEMM peak.
  print("our bound, the step's FLOPs at JAX's matmul peak: " + "; ".join(bounds_line))


if __name__ == "__main__":
  main()
