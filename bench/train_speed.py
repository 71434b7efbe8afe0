"""Train-step speed on CPU: the tiny LTU-AS (Whisper tiny.en features, SmolLM2-135M) against PyTorch.

    .venv/bin/python bench/train_speed.py [--configs tiny_stage1 tiny_stage3] [--steps 3] [--text 64]
                                          [--set optim.micro_batch_size=8 ...] [--no-torch] [--keep-denormals]

For each config: the trainer's jitted step (`train.jit_train_step`, built as `train.Trainer` builds
it: stage filter, frozen cast, shardings, AdamW on the warm-up-then-decay schedule) on random weights
and a random batch of full rows (25 audio tokens + `--text` text tokens, every text token a target),
its micro-batches and accumulation steps from the config. It prints the compile time, then samples/s
and tokens/s (audio + text) from the median of `--steps` steps after a warm-up step. PyTorch does the
same work: a transformers `LlamaForCausalLM` with peft LoRA on q, v, the TLTR and projection of
`tests.torch_reference`, only the stage's parameters trainable, fp32 with denormals flushed to zero
(as XLA on CPU does), the original's forward (`ltu_as_forward`) and backward on every micro-batch, then
`AdamW.step`. The two take turns step by step, so a slow spell of a shared machine slows both; the
ratio is PyTorch's seconds per step over ours (above 1: we are faster). Beside it, each side's model FLOPs
utilisation: the step's matmul FLOPs (`step_flops`) over its time, as a share of the matmul peak that the
same process measures first (a 4096² fp32 GEMM, median of 5 after a warm-up, in each framework).

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
from typing import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import peft  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from flax import nnx  # noqa: E402

from configs import tiny  # noqa: E402
from ltu_jax import kinds, model_folder, sharding, train  # noqa: E402
from ltu_jax.models.llama import LlamaConfig  # noqa: E402
from ltu_jax.models.lora import LoRAConfig  # noqa: E402
from ltu_jax.models.ltu_as import LtuAs, LtuAsConfig  # noqa: E402
from ltu_jax.models.tltr import TLTRConfig  # noqa: E402
from tests import torch_reference  # noqa: E402
import timing  # noqa: E402

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


def matmul_peak(framework: str, repeats: int = 5) -> float:
  """FLOP/s of a 4096² fp32 matmul in `framework` ("jax" or "torch"), median of `repeats` after a warm-up."""
  size = 4096
  if framework == "jax":
    matrix = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
    matmul = jax.jit(jnp.matmul)
    times = timing.timed(lambda: matmul(matrix, matrix).block_until_ready(), repeats, warm_up=True)
  else:
    matrix = torch.randn(size, size)
    times = timing.timed(lambda: matrix @ matrix, repeats, warm_up=True)
  return 2 * size**3 / statistics.median(times)


def seconds_per_step(steps: dict[str, Callable[[], None]], repeats: int) -> dict[str, float]:
  """Median seconds of each step function over `repeats` rounds, after one warm-up call each.

  The functions take turns within each round, so a slow spell of a shared machine hits all alike.
  """
  for step in steps.values():
    step()
  times = {name: [] for name in steps}
  for _ in range(repeats):
    for name, step in steps.items():
      start = time.perf_counter()
      step()
      times[name].append(time.perf_counter() - start)
  return {name: statistics.median(t) for name, t in times.items()}


def ours(config: LtuAsConfig, c, batch: dict[str, np.ndarray]) -> tuple[float, Callable[[], None]]:
  """(compile seconds, one training step) of the trainer's jitted step."""
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


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--configs", nargs="+", default=["tiny_stage1", "tiny_stage3"])
  parser.add_argument("--steps", type=int, default=3, help="timed steps (median) after one warm-up step")
  parser.add_argument("--text", type=int, default=64, help="text tokens per row (the tiny data pads to a multiple of 16)")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
  parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch reference")
  parser.add_argument("--keep-denormals", action="store_true", help="PyTorch without flushing denormals (10× slower here)")
  args = parser.parse_args()
  torch.set_num_threads(os.cpu_count())
  # XLA's CPU runtime flushes denormals to zero; PyTorch does not by default, and the backward pass through
  # a deep random-weight LLM makes enough of them to slow it about 10×. Both are measured flushing.
  torch.set_flush_denormal(not args.keep_denormals)
  config, source = tiny_config()
  print(f"jax {jax.__version__} on {len(jax.devices())} {jax.devices()[0].platform} device(s), torch {torch.__version__} "
        f"with {torch.get_num_threads()} threads; sizes from {source}; {config.audio_tokens} audio + {args.text} text tokens")
  peaks = {framework: matmul_peak(framework) for framework in (["jax"] if args.no_torch else ["jax", "torch"])}
  print("matmul peak (4096² fp32): " + ", ".join(f"{name} {peak * 1e-9:.0f} GFLOP/s" for name, peak in peaks.items()))
  header = f"{'config':12s} {'batch':>9s} {'compile s':>9s} {'GFLOP':>6s} {'step s':>7s} {'samples/s':>9s} {'tokens/s':>9s} {'MFU':>5s}"
  print(header + ("" if args.no_torch else f" {'torch s':>8s} {'torch MFU':>9s} {'torch/ours':>10s}"))
  for name in args.configs:
    c = train.load_config(name, args.set)
    model_config = for_training(config, c)
    micro, data_parallel = c.optim.micro_batch_size, len(jax.devices()) // c.mesh.tensor
    accum = c.optim.batch_size // (micro * data_parallel)
    batch = random_batch(model_config, accum, micro * data_parallel, args.text)
    samples = accum * micro * data_parallel
    compile_s, step = ours(model_config, c, batch)
    steps = {"ours": step} if args.no_torch else {"ours": step, "torch": pytorch(model_config, c, batch)}
    seconds = seconds_per_step(steps, args.steps)
    flops = step_flops(model_config, samples, args.text)
    mfu = {side: flops / seconds[side] / peaks["jax" if side == "ours" else "torch"] for side in seconds}
    row = f"{name:12s} {f'{accum}×{micro}':>9s} {compile_s:9.1f} {flops * 1e-9:6.0f} {seconds['ours']:7.2f} "
    row += f"{samples / seconds['ours']:9.2f} {samples * (config.audio_tokens + args.text) / seconds['ours']:9.0f} {mfu['ours']:5.0%}"
    if "torch" in seconds:
      row += f" {seconds['torch']:8.2f} {mfu['torch']:9.0%} {seconds['torch'] / seconds['ours']:10.2f}"
    print(row, flush=True)


if __name__ == "__main__":
  main()
