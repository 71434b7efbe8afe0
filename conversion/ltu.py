"""LTU checkpoints: the release `.bin` (LoRA + CAV-MAE audio branch + audio projection under peft names,
facts §5.3), a fine-tuned CAV-MAE checkpoint alone (to start the encoder of a fresh LTU, stage 1), or
nothing (fresh encoder, projection and LoRA); and the way back (a peft adapter folder, the release layout).

    python -m conversion.ltu [SRC] --llm LLM_DIR OUT [--encoder-dim 768 --encoder-heads 12 ...]
    python -m conversion.ltu --export --model DIR [--peft-dir DIR] [--release FILE.bin]

LLM_DIR is a model folder (`python -m conversion.llm`). OUT is a self-contained model folder: the
composite's weights and the LLM's tokenizer; LTU reads the fbank itself, so it holds no other model.

Keys that the audio path never reads are dropped by name, every other key is strict: the video branch
(`*_v`, `blocks_v`, CAV-MAE's joint `norm` and `mlp_head`), and the LayerNorm pairs a block holds but does
not use when fed audio (`blocks_a.N.norm{1,2}_a`; `blocks_u.N.norm{1,2}`). So the way back writes the
release's keys less those, each tensor bit for bit; the original loads such a file with `strict=False`.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Iterable, Iterator

import numpy as np

from conversion import rules
from conversion.hf_llama import llama_rules
from conversion.ltu_as import (
  LTU_AS_LORA, RELEASE_PREFIX, adapter_rules, add_composite_options, compose, export_command, load_composite,
  lora_from_args, write_release,
)
from conversion.rules import Permute, Rule, layer_norm_rules, linear_rules
from ltu_jax import kinds, model_folder
from ltu_jax.models.cav_mae import CavMaeConfig
from ltu_jax.models.lora import LoRAConfig
from ltu_jax.models.ltu import Ltu, LtuConfig

CAV_MAE_PREFIX = "module."  # a fine-tuned CAV-MAE checkpoint, saved from DataParallel
LTU_LORA = LTU_AS_LORA  # the same adapters (facts §1.7, §3.3): the shared options' defaults
CONV_KERNEL = Permute((2, 3, 1, 0))  # Conv2d [out, in, h, w] → [h, w, in, out]
BLOCK_NORMS = ("norm1", "norm1_a", "norm1_v", "norm2", "norm2_a", "norm2_v")
# The LayerNorm pair each block group uses on audio: `blocks_a` run without a modality, `blocks_u` with 'a'.
USED_NORMS = {"blocks_a": ("norm1", "norm2"), "blocks_u": ("norm1_a", "norm2_a")}
VIDEO_PARAMS = ("patch_embed_v.proj.weight", "patch_embed_v.proj.bias", "pos_embed_v", "modality_v",
                "norm_v.weight", "norm_v.bias")
CAV_MAE_HEAD = ("norm.weight", "norm.bias", "mlp_head.0.weight", "mlp_head.0.bias", "mlp_head.1.weight", "mlp_head.1.bias")


def block_rules(source: str, target: str | None, norms: tuple[str, str]) -> Iterator[Rule]:
  """One CAV-MAE block group (`{layer}` in `source`) onto our stacked blocks at `target`; its norms `norms`
  (the pair it uses) become `norm1`/`norm2`, the other four are dropped. `target` None drops the group."""
  for norm in BLOCK_NORMS:
    ours = {norms[0]: "norm1", norms[1]: "norm2"}.get(norm) if target else None
    yield from (
      layer_norm_rules(f"{source}.{norm}", f"{target}.{ours}") if ours
      else (Rule(f"{source}.{norm}.{p}", None) for p in ("weight", "bias"))
    )
  for module in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"):
    yield from (
      linear_rules(f"{source}.{module}", f"{target}.{module}") if target
      else (Rule(f"{source}.{module}.{p}", None) for p in ("weight", "bias"))
    )


def encoder_rules(prefix: str, head: bool = False) -> tuple[Rule, ...]:
  """CAV-MAE's audio branch under `prefix` onto `audio_encoder`, its video branch dropped by name; with
  `head`, also the joint `norm` and `mlp_head` (which a CAV-MAE checkpoint holds and the release does not)."""
  table = [
    Rule(f"{prefix}patch_embed_a.proj.weight", "audio_encoder.patch_embed.kernel", CONV_KERNEL),
    Rule(f"{prefix}patch_embed_a.proj.bias", "audio_encoder.patch_embed.bias"),
    Rule(f"{prefix}pos_embed_a", "audio_encoder.pos_embed"),
    Rule(f"{prefix}modality_a", "audio_encoder.modality"),
    *layer_norm_rules(f"{prefix}norm_a", "audio_encoder.norm"),
  ]
  for group, norms in USED_NORMS.items():
    table.extend(block_rules(f"{prefix}{group}.{{layer}}", f"audio_encoder.{group}", norms))
  table.extend(block_rules(f"{prefix}blocks_v.{{layer}}", None, ("norm1", "norm2")))
  table.extend(Rule(f"{prefix}{name}", None) for name in VIDEO_PARAMS + (CAV_MAE_HEAD if head else ()))
  return tuple(table)


def audio_rules(prefix: str = RELEASE_PREFIX) -> tuple[Rule, ...]:
  """The encoder (`model.audio_encoder`) and `model.audio_proj.1` (index 0 has no parameters)."""
  return encoder_rules(f"{prefix}model.audio_encoder.") + tuple(linear_rules(f"{prefix}model.audio_proj.1", "audio_proj"))


def release_rules(config: LtuConfig) -> tuple[Rule, ...]:
  """What the release `.bin` holds: adapters, the encoder and the projection (the base LLM is not in it)."""
  return adapter_rules(config) + audio_rules()


def ltu_rules(config: LtuConfig, prefix: str = RELEASE_PREFIX, llm_prefix: str = RELEASE_PREFIX) -> tuple[Rule, ...]:
  """The whole composite: LLM keys under `llm_prefix` ("" for a plain HF folder), the rest under `prefix`."""
  return rules.nested(llama_rules(config.llm, llm_prefix, lora_prefix=prefix), "llm.") + audio_rules(prefix)


def load_ltu(config: LtuConfig, tensors: Iterable[tuple[str, np.ndarray]], *, source: str = "checkpoint") -> Ltu:
  """LTU from `(key, array)` pairs holding every parameter under peft names (base LLM, LoRA, encoder, projection)."""
  return load_composite(Ltu, config, ltu_rules(config), tensors, source)


def checkpoint_table(config: LtuConfig, path: str, first_key: str) -> tuple[Rule, ...]:
  if first_key.startswith(RELEASE_PREFIX):
    return release_rules(config)
  if first_key.startswith(CAV_MAE_PREFIX):
    return encoder_rules(CAV_MAE_PREFIX, head=True)
  raise ValueError(
    f"{path}: key {first_key!r} is neither an LTU release key ({RELEASE_PREFIX}...) "
    f"nor a CAV-MAE key ({CAV_MAE_PREFIX}...)"
  )


def convert(
  src: str | None,
  llm_dir: str,
  out: str,
  *,
  encoder: CavMaeConfig = CavMaeConfig(),
  lora: LoRAConfig | None = LTU_LORA,
  seed: int = 0,
  force: bool = False,
) -> Ltu:
  """Composes an LLM folder with the encoder, projection and LoRA from `src` (or fresh) into `out`; without
  `lora` the composite has no adapters (the trainer adds them); `force` allows a non-empty `out`."""
  rules.check_output(out, [src, llm_dir], force=force)
  model_folder.require(llm_dir, "conversion.ltu --llm", kinds.CHATS)
  llm = model_folder.load(llm_dir)
  types = dict(dtype=llm.config.dtype, param_dtype=llm.config.param_dtype)
  config = LtuConfig(llm=dataclasses.replace(llm.config, lora=lora), encoder=dataclasses.replace(encoder, **types))
  model = compose(Ltu, config, llm, src, lambda path, key: checkpoint_table(config, path, key), seed)
  model_folder.save(out, model, "ltu", extra=llm.extra, tokenizer=llm.tokenizer)
  return model


def export_release(model: Ltu, path: str) -> None:
  """Encoder + projection + LoRA in the release layout (fp32, `.default.` adapter names), `torch.save`d like
  the original's `.bin` (or safetensors when `path` ends in `.safetensors`)."""
  write_release(model, release_rules(model.config), path)


def parser() -> argparse.ArgumentParser:
  """The command line; options may come before, between or after the positionals (`parse_intermixed_args`)."""
  parser = argparse.ArgumentParser(
    prog="python -m conversion.ltu", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  release = CavMaeConfig()
  parser.add_argument("paths", nargs="*", help="[SRC] OUT when converting")
  parser.add_argument("--llm", help="LLM model folder (conversion.llm)")
  parser.add_argument("--encoder-dim", type=int, default=release.dim, help="CAV-MAE width (the release: 768)")
  parser.add_argument("--encoder-heads", type=int, default=release.heads)
  parser.add_argument("--encoder-layers", type=int, default=release.audio_layers, help="audio-only blocks (blocks_a)")
  parser.add_argument("--encoder-joint-layers", type=int, default=release.joint_layers, help="joint blocks (blocks_u)")
  add_composite_options(parser, "LTU")
  return parser


def main(argv: list[str] | None = None) -> None:
  command = parser()
  args = command.parse_intermixed_args(argv)
  if args.export:
    if not args.model or not (args.peft_dir or args.release) or args.paths:
      command.error("--export needs --model and at least one of --peft-dir, --release, and no positional paths")
    export_command(args, command, __spec__.name, export_release)
    return
  if len(args.paths) not in (1, 2) or not args.llm:
    command.error("usage: [SRC] OUT --llm LLM_DIR")
  src, out = (None, args.paths[0]) if len(args.paths) == 1 else args.paths
  encoder = CavMaeConfig(
    dim=args.encoder_dim, heads=args.encoder_heads, mlp_dim=4 * args.encoder_dim,
    audio_layers=args.encoder_layers, joint_layers=args.encoder_joint_layers,
  )
  convert(src, args.llm, out, encoder=encoder, lora=lora_from_args(args), seed=args.seed, force=args.force)
  print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
  main()
