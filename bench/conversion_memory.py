"""Peak memory of `python -m conversion.llm` against checkpoint size, on a synthetic LLaMA checkpoint.

    .venv/bin/python bench/conversion_memory.py [--size-gb 3] [--layers N] [--dir PATH] [--keep]

Writes a Hugging Face LLaMA folder of about `--size-gb` GB (hidden 2048, intermediate 5632, 32 heads,
4 KV heads, vocab 32000, untied embeddings: TinyLlama's shapes; the layer count sets the size), fp32
random weights in sharded safetensors with an index, each tensor generated and written on its own so
that this process never holds the checkpoint, plus a small tokenizer. It then converts the folder in a
subprocess and samples the child's /proc status every 50 ms:
  VmRSS    resident memory, including file pages (the memory-mapped targets, the safetensors file)
  RssAnon  anonymous memory: what the process needs, as opposed to page cache the kernel can reclaim
A second subprocess that only imports the converter gives the baseline (Python, jax, transformers), so
the verdict compares the anonymous memory the conversion adds with the largest tensor and the model.
Everything it writes lives in a temporary folder under `--dir` (on disk, not /tmp, which may be RAM)
and is deleted at the end unless `--keep`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time

import numpy as np

HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, VOCAB = 2048, 5632, 32, 4, 32000
SHARD_BYTES = 1 << 30
GB = 1e9
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def layer_shapes(layer: int) -> dict[str, tuple[int, ...]]:
  head = HIDDEN // HEADS
  p = f"model.layers.{layer}."
  return {
    p + "self_attn.q_proj.weight": (HIDDEN, HIDDEN),
    p + "self_attn.k_proj.weight": (KV_HEADS * head, HIDDEN),
    p + "self_attn.v_proj.weight": (KV_HEADS * head, HIDDEN),
    p + "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
    p + "mlp.gate_proj.weight": (INTERMEDIATE, HIDDEN),
    p + "mlp.up_proj.weight": (INTERMEDIATE, HIDDEN),
    p + "mlp.down_proj.weight": (HIDDEN, INTERMEDIATE),
    p + "input_layernorm.weight": (HIDDEN,),
    p + "post_attention_layernorm.weight": (HIDDEN,),
  }


def checkpoint_shapes(layers: int) -> dict[str, tuple[int, ...]]:
  shapes = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
  for layer in range(layers):
    shapes.update(layer_shapes(layer))
  shapes["model.norm.weight"] = (HIDDEN,)
  shapes["lm_head.weight"] = (VOCAB, HIDDEN)
  return shapes


def nbytes(shape: tuple[int, ...]) -> int:
  return int(np.prod(shape)) * 4


def layers_for(size_gb: float) -> int:
  fixed = nbytes((VOCAB, HIDDEN)) * 2
  per_layer = sum(nbytes(s) for s in layer_shapes(0).values())
  return max(1, round((size_gb * GB - fixed) / per_layer))


def write_safetensors(path: str, shapes: dict[str, tuple[int, ...]], rng: np.random.Generator) -> None:
  """The safetensors layout written by hand (8-byte header length, JSON header, raw data), one tensor at a
  time: `safetensors.numpy.save_file` wants the whole shard in memory."""
  header, offset = {}, 0
  for key, shape in shapes.items():
    header[key] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + nbytes(shape)]}
    offset += nbytes(shape)
  text = json.dumps(header).encode()
  text += b" " * (-len(text) % 8)
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(text)) + text)
    for shape in shapes.values():
      # Small values: the converted model stays a sane network; random so nothing compresses away.
      (rng.standard_normal(shape, dtype=np.float32) * 0.02).tofile(f)


def write_tokenizer(folder: str) -> None:
  from tokenizers import Tokenizer, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast

  vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(100)}}
  raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  raw.pre_tokenizer = pre_tokenizers.Whitespace()
  PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>", bos_token="<s>", eos_token="</s>").save_pretrained(folder)


def write_checkpoint(folder: str, layers: int, seed: int = 0) -> tuple[int, int]:
  """The synthetic HF folder; returns (checkpoint bytes, largest tensor bytes)."""
  os.makedirs(folder)
  shapes = checkpoint_shapes(layers)
  shards: list[dict[str, tuple[int, ...]]] = [{}]
  for key, shape in shapes.items():
    if shards[-1] and sum(map(nbytes, shards[-1].values())) + nbytes(shape) > SHARD_BYTES:
      shards.append({})
    shards[-1][key] = shape
  rng = np.random.default_rng(seed)
  weight_map = {}
  for i, shard in enumerate(shards):
    name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    write_safetensors(os.path.join(folder, name), shard, rng)
    weight_map.update(dict.fromkeys(shard, name))
  total = sum(map(nbytes, shapes.values()))
  with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
  config = {
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": HIDDEN,
    "intermediate_size": INTERMEDIATE, "num_hidden_layers": layers, "num_attention_heads": HEADS,
    "num_key_value_heads": KV_HEADS, "vocab_size": VOCAB, "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False, "hidden_act": "silu",
    "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32",
  }
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(config, f)
  write_tokenizer(folder)
  return total, max(map(nbytes, shapes.values()))


def status_mb(pid: int) -> dict[str, float]:
  """VmRSS, RssAnon, RssFile, RssShmem of a live process, in MB (kB figures from /proc)."""
  found = {}
  with open(f"/proc/{pid}/status") as f:
    for line in f:
      key, _, value = line.partition(":")
      if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
        found[key] = int(value.split()[0]) * 1024 / 1e6
  return found


def run_sampled(args: list[str], interval: float = 0.05) -> dict[str, float]:
  """Runs `args` and returns the peak of each /proc figure, `maxrss` (the kernel's own RSS high-water
  mark, which a 50 ms sample can miss) and `seconds`."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", TOKENIZERS_PARALLELISM="false")
  start = time.time()
  child = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  peaks: dict[str, float] = {}
  while True:
    pid, code, usage = os.wait4(child.pid, os.WNOHANG)
    if pid:
      break
    try:
      for key, value in status_mb(child.pid).items():
        peaks[key] = max(peaks.get(key, 0.0), value)
    except (FileNotFoundError, ProcessLookupError, ValueError):
      pass  # exiting between wait4 and the read
    time.sleep(interval)
  child.returncode = os.waitstatus_to_exitcode(code)
  if child.returncode:
    raise RuntimeError(f"{' '.join(args)} failed ({child.returncode}):\n{child.stderr.read().decode()[-3000:]}")
  peaks["maxrss"] = usage.ru_maxrss * 1024 / 1e6
  peaks["seconds"] = time.time() - start
  return peaks


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--size-gb", type=float, default=3.0, help="approximate checkpoint size (sets the layer count)")
  parser.add_argument("--layers", type=int, help="layer count (overrides --size-gb)")
  parser.add_argument("--dir", default=REPO, help="where the temporary folder goes (a disk, not tmpfs)")
  parser.add_argument("--keep", action="store_true", help="keep the checkpoint and model folder")
  args = parser.parse_args()
  layers = args.layers or layers_for(args.size_gb)
  work = tempfile.mkdtemp(prefix=".conversion_memory-", dir=args.dir)
  try:
    source, out = os.path.join(work, "hf"), os.path.join(work, "model")
    t = time.time()
    total, largest = write_checkpoint(source, layers)
    print(f"checkpoint: {layers} layers, {total / GB:.2f} GB fp32, largest tensor {largest / 1e6:.0f} MB "
          f"(written in {time.time() - t:.0f} s)", flush=True)
    base = run_sampled([sys.executable, "-c", "import conversion.llm, transformers, jax; jax.numpy.zeros(1)"])
    conv = run_sampled([sys.executable, "-m", "conversion.llm", source, out])
    print(f"converted in {conv['seconds']:.0f} s; model folder {du(out) / GB:.2f} GB")
    print(f"{'':>22}{'import only':>14}{'conversion':>14}{'added':>10}{'/ largest':>11}{'/ model':>9}")
    for key in ("RssAnon", "VmRSS", "maxrss", "RssFile", "RssShmem"):
      added = conv.get(key, 0.0) - base.get(key, 0.0)
      print(f"{'peak ' + key + ' (MB)':>22}{base.get(key, 0.0):>14.0f}{conv.get(key, 0.0):>14.0f}{added:>10.0f}"
            f"{added * 1e6 / largest:>11.2f}{added * 1e6 / total:>9.2f}")
    added = (conv["RssAnon"] - base["RssAnon"]) * 1e6
    verdict = "follows the largest tensor" if added < 0.25 * total else "follows the model"
    print(f"verdict: the conversion adds {added / 1e6:.0f} MB of anonymous memory over the import baseline, "
          f"{added / largest:.1f}x the largest tensor and {added / total:.2f}x the {total / GB:.2f} GB model: "
          f"{verdict}.")
  finally:
    if args.keep:
      print(f"kept {work}")
    else:
      shutil.rmtree(work, ignore_errors=True)


def du(folder: str) -> int:
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(folder) for f in files)


if __name__ == "__main__":
  main()
