"""LTU-AS checkpoints: the release `.bin` (LoRA + TLTR + audio projection under peft names), Whisper-AT's
TL-TR `.pth` (to start TLTR before stage 1), or nothing (fresh TLTR, projection and LoRA); and the way
back to PyTorch (a peft adapter folder, an LTU-AS-layout checkpoint).

    python -m conversion.ltu_as [SRC] --llm LLM_DIR --whisper WHISPER_DIR OUT
    python -m conversion.ltu_as --export --model DIR [--peft-dir DIR] [--release FILE.bin]

LLM_DIR and WHISPER_DIR are model folders (`python -m conversion.llm`, `python -m conversion.whisper`).
OUT is a self-contained model folder: the composite's weights, the LLM's tokenizer, and the Whisper
folder inside it (`OUT/whisper`) for features and transcripts.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import shutil
import sys
from typing import Iterable

import jax
import numpy as np
import torch
from flax import nnx
from safetensors.numpy import save_file

from conversion import rules, sources
from conversion.hf_llama import llama_rules, normalize_peft_key
from conversion.openai_whisper import residual_block_rules
from conversion.rules import Rule, linear_rules
from ltu_jax import frontend, kinds, model_folder
from ltu_jax.models.lora import LoRAConfig, LoRAParam
from ltu_jax.models.ltu_as import LtuAs, LtuAsConfig
from ltu_jax.models.tltr import TLTRConfig

RELEASE_PREFIX = "base_model.model."  # PeftModelForCausalLM → LoraModel → LlamaForCausalLM
WHISPER_AT_PREFIX = "at_model."
WHISPER_SUBFOLDER = "whisper"
LTU_AS_LORA = LoRAConfig(rank=8, alpha=16.0, dropout=0.05, targets=("q_proj", "v_proj"))


def audio_rules(prefix: str = RELEASE_PREFIX) -> tuple[Rule, ...]:
  """TLTR (`model.audio_encoder.{time_tr,layer_tr}`) and `model.audio_proj.1` (index 0 has no parameters)."""
  return tltr_rules(f"{prefix}model.audio_encoder.") + tuple(linear_rules(f"{prefix}model.audio_proj.1", "audio_proj"))


def tltr_rules(prefix: str) -> tuple[Rule, ...]:
  return tuple(
    rule for block in ("time_tr", "layer_tr") for rule in residual_block_rules(f"{prefix}{block}", f"audio_encoder.{block}")
  )


def whisper_at_rules() -> tuple[Rule, ...]:
  """Whisper-AT's TL-TR: the same blocks; its AudioSet head (`mlp_layer`: LN + Linear to 527) is dropped."""
  head = tuple(Rule(f"{WHISPER_AT_PREFIX}mlp_layer.{i}.{p}", None) for i in (0, 1) for p in ("weight", "bias"))
  return tltr_rules(WHISPER_AT_PREFIX) + head


def adapter_rules(config: LtuAsConfig, prefix: str = RELEASE_PREFIX) -> tuple[Rule, ...]:
  """The LoRA adapters only, under peft names."""
  return rules.nested(tuple(r for r in llama_rules(config.llm, prefix) if r.target and "lora_" in r.target), "llm.")


def ltu_as_rules(config: LtuAsConfig, prefix: str = RELEASE_PREFIX, llm_prefix: str = RELEASE_PREFIX) -> tuple[Rule, ...]:
  """The whole composite: LLM keys under `llm_prefix` ("" for a plain HF folder), the rest under `prefix`."""
  llm = llama_rules(config.llm, llm_prefix, lora_prefix=prefix)
  return rules.nested(llm, "llm.") + audio_rules(prefix)


def release_rules(config: LtuAsConfig) -> tuple[Rule, ...]:
  """What the release `.bin` holds: adapters, TLTR and the projection (the base LLM is not in it)."""
  return adapter_rules(config) + audio_rules()


def load_ltu_as(
  config: LtuAsConfig,
  tensors: Iterable[tuple[str, np.ndarray]],
  *,
  prefix: str = RELEASE_PREFIX,
  llm_prefix: str = RELEASE_PREFIX,
  source: str = "checkpoint",
) -> LtuAs:
  """Builds LTU-AS from `(key, array)` pairs holding every parameter (base LLM, LoRA, TLTR, projection)."""
  return load_composite(LtuAs, config, ltu_as_rules(config, prefix, llm_prefix), tensors, source)


def load_composite(model: type, config, table: Iterable[Rule], tensors: Iterable[tuple[str, np.ndarray]], source: str):
  """`model(config)` filled from `(key, array)` pairs (peft names normalized) that hold every parameter."""
  graphdef, state = nnx.split(nnx.eval_shape(lambda: model(config, rngs=nnx.Rngs(0))))
  tensors = ((normalize_peft_key(k), v) for k, v in tensors)
  return nnx.merge(graphdef, rules.load(tensors, table, state, source=source))


def composite_config(llm: model_folder.Loaded, whisper: model_folder.Loaded, lora: LoRAConfig | None) -> LtuAsConfig:
  """LTU-AS sized to its parts: TLTR at the Whisper width over all its encoder blocks, 1 + 8 heads; one 10 s
  window as the release (`max_windows` 1; the trainer's `audio.max_windows` changes it)."""
  w = whisper.config
  return LtuAsConfig(
    llm=dataclasses.replace(llm.config, lora=lora),
    tltr=TLTRConfig(dim=w.d_model, mlp_dim=4 * w.d_model, dtype=llm.config.dtype, param_dtype=llm.config.param_dtype),
    feature_layers=w.encoder_layers,
    audio_tokens=frontend.LTU_AS_TOKENS,
    n_mels=w.num_mel_bins,
  )


def checkpoint_kind(path: str, first_key: str) -> str:
  if first_key.startswith(WHISPER_AT_PREFIX):
    return "whisper_at"
  if first_key.startswith(RELEASE_PREFIX):
    return "release"
  raise ValueError(
    f"{path}: key {first_key!r} is neither an LTU-AS release key ({RELEASE_PREFIX}...) "
    f"nor a Whisper-AT TL-TR key ({WHISPER_AT_PREFIX}...)"
  )


def convert(
  src: str | None,
  llm_dir: str,
  whisper_dir: str,
  out: str,
  *,
  lora: LoRAConfig | None = LTU_AS_LORA,
  seed: int = 0,
  force: bool = False,
) -> LtuAs:
  """Composes LLM + Whisper folders with TLTR, projection and LoRA from `src` (or fresh) into `out`; without
  `lora` the composite has no adapters (the trainer adds them at the rank its config names); `force`
  allows a non-empty `out` (`rules.check_output`)."""
  rules.check_output(out, [src, llm_dir, whisper_dir], force=force, writes=(*rules.MODEL_FOLDER_FILES, WHISPER_SUBFOLDER))
  model_folder.require(llm_dir, "conversion.ltu_as --llm", kinds.CHATS)
  model_folder.require(whisper_dir, "conversion.ltu_as --whisper", kinds.TRANSCRIBES)
  llm = model_folder.load(llm_dir)
  whisper = model_folder.load(whisper_dir, tokenizer=False)
  config = composite_config(llm, whisper, lora)

  def table(path: str, first_key: str) -> tuple[Rule, ...]:
    return release_rules(config) if checkpoint_kind(path, first_key) == "release" else whisper_at_rules()

  model = compose(LtuAs, config, llm, src, table, seed)
  model_folder.save(out, model, "ltu_as", extra={**llm.extra, "whisper": WHISPER_SUBFOLDER}, tokenizer=llm.tokenizer)
  shutil.copytree(whisper.folder, os.path.join(out, WHISPER_SUBFOLDER))
  return model


def compose(model: type, config, llm: model_folder.Loaded, src: str | None, table, seed: int):
  """`model(config)` with the base LLM of `llm`, and its audio parts and LoRA from `src` (keys mapped by
  `table(src, first_key)`) where it holds them, else freshly initialised from `seed`."""
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: model(config, rngs=nnx.Rngs(seed))))
  # Jitted so only the new parts are initialised; the base LLM comes from its folder.
  new_parts = nnx.Any(nnx.PathContains("audio_encoder"), nnx.PathContains("audio_proj"), LoRAParam)
  new = jax.jit(lambda: nnx.state(model(config, rngs=nnx.Rngs(seed)), new_parts))()
  base = nnx.state(llm.model, nnx.Not(LoRAParam))
  state = nnx.merge_state(abstract, new)
  state["llm"] = nnx.merge_state(state["llm"], base)
  if src is not None:
    tensors = sources.iter_file(src)
    first_key, first = next(tensors)
    chosen = table(src, first_key)
    filled = {rule.target for rule in chosen if rule.target}
    tensors = ((normalize_peft_key(k), v) for k, v in itertools.chain([(first_key, first)], tensors))
    state = rules.load(tensors, chosen, state, source=src, keep=lambda path: path not in filled)
  return nnx.merge(graphdef, state)


PEFT_FILES = ("adapter_model.safetensors", "adapter_config.json")


def export_peft(model: LtuAs, folder: str, base_model: str = "") -> None:
  """Our adapters as a peft adapter folder that `PeftModel.from_pretrained(llama, folder)` loads."""
  lora = model.config.llm.lora
  if lora is None:
    raise ValueError("the model has no LoRA adapters to export")
  os.makedirs(folder, exist_ok=True)
  tensors = dict(rules.export(nnx.state(model), adapter_rules(model.config)))
  save_file({k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()}, os.path.join(folder, PEFT_FILES[0]))
  config = dict(
    peft_type="LORA", task_type="CAUSAL_LM", r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
    target_modules=list(lora.targets), bias="none", base_model_name_or_path=base_model, inference_mode=True,
  )
  with open(os.path.join(folder, PEFT_FILES[1]), "w") as f:
    json.dump(config, f, indent=2)


def export_release(model: LtuAs, path: str) -> None:
  """TLTR + projection + LoRA in the release layout (fp32, peft-0.3 names with `.default.`), `torch.save`d
  like the original's `.bin` (or safetensors when `path` ends in `.safetensors`)."""
  write_release(model, release_rules(model.config), path)


def write_release(model: nnx.Module, table: Iterable[Rule], path: str) -> None:
  """The parameters `table` names, under its keys with peft-0.3's `.default.` adapter names, in fp32."""
  tensors = {}
  for key, value in rules.export(nnx.state(model), table):
    key = key.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default.")
    tensors[key] = np.ascontiguousarray(value, np.float32)
  if path.endswith(".safetensors"):
    save_file(tensors, path)
  else:
    torch.save({k: torch.from_numpy(v) for k, v in tensors.items()}, path)


def export_command(args: argparse.Namespace, command: argparse.ArgumentParser, module: str, export_release) -> None:
  """`--export` of `module`'s folders: both outputs are checked before either is written, and the folder
  must be of a kind that `module` converts (its release layout is that kind's)."""
  if args.peft_dir:
    rules.check_output(args.peft_dir, [args.model], force=args.force, writes=PEFT_FILES)
  if args.release:
    release_folder = os.path.dirname(os.path.abspath(args.release))
    rules.check_output(release_folder, [args.model], force=True, writes=[os.path.basename(args.release)])
  try:
    kind = model_folder.require(args.model, f"{module} --export", kinds.AUDIO_LLM)
  except (FileNotFoundError, ValueError) as error:
    command.error(str(error))
  if kind.conversion != module:
    command.error(f"{args.model} holds {kind.described}; export it with python -m {kind.conversion} --export")
  loaded = model_folder.load(args.model, tokenizer=False)
  if args.peft_dir:
    export_peft(loaded.model, args.peft_dir)
  if args.release:
    export_release(loaded.model, args.release)


def parser() -> argparse.ArgumentParser:
  """The command line; options may come before, between or after the positionals (`parse_intermixed_args`)."""
  parser = argparse.ArgumentParser(
    prog="python -m conversion.ltu_as", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument("paths", nargs="*", help="[SRC] OUT when converting")
  parser.add_argument("--llm", help="LLM model folder (conversion.llm)")
  parser.add_argument("--whisper", help="Whisper model folder (conversion.whisper)")
  add_composite_options(parser, "LTU-AS")
  return parser


def add_composite_options(parser: argparse.ArgumentParser, title: str) -> None:
  """The options every audio-LLM conversion shares: its adapters, seed, --force and the way back."""
  parser.add_argument("--lora-rank", type=int, default=LTU_AS_LORA.rank, help="0: no adapters (the trainer adds them)")
  parser.add_argument("--lora-alpha", type=float, default=LTU_AS_LORA.alpha)
  parser.add_argument("--lora-dropout", type=float, default=LTU_AS_LORA.dropout)
  parser.add_argument("--lora-targets", default=",".join(LTU_AS_LORA.targets))
  parser.add_argument("--seed", type=int, default=0, help="initialisation of whatever SRC does not hold")
  parser.add_argument("--force", action="store_true", help="write into a non-empty OUT or --peft-dir, keeping its files")
  parser.add_argument("--export", action="store_true", help=f"write an {title} model folder back to PyTorch formats")
  parser.add_argument("--model", help=f"with --export: the {title} model folder")
  parser.add_argument("--peft-dir", help="with --export: write a peft adapter folder here")
  parser.add_argument("--release", help=f"with --export: write an {title}-layout .bin (or .safetensors) here")


def lora_from_args(args: argparse.Namespace) -> LoRAConfig | None:
  if not args.lora_rank:
    return None
  return LoRAConfig(args.lora_rank, args.lora_alpha, args.lora_dropout, tuple(args.lora_targets.split(",")))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  """The parsed command line, its combinations checked (`parser().error` exits with the usage)."""
  command = parser()
  args = command.parse_intermixed_args(argv)
  if args.export:
    if not args.model or not (args.peft_dir or args.release):
      command.error("--export needs --model and at least one of --peft-dir, --release")
    if args.paths:
      command.error(f"--export takes no positional paths (got {args.paths}); the model is --model")
  elif len(args.paths) not in (1, 2) or not args.llm or not args.whisper:
    command.error("usage: [SRC] OUT --llm LLM_DIR --whisper WHISPER_DIR")
  return args


def main(argv: list[str] | None = None) -> None:
  args = parse_args(argv)
  if args.export:
    export_command(args, parser(), __spec__.name, export_release)
    return
  src, out = (None, args.paths[0]) if len(args.paths) == 1 else args.paths
  convert(src, args.llm, args.whisper, out, lora=lora_from_args(args), seed=args.seed, force=args.force)
  print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
  main()
