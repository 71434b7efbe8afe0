"""Peak memory of `python -m conversion.llm` against checkpoint size, on synthetic LLaMA checkpoints.

    .venv/bin/python bench/conversion_memory.py [--size-gb 1.5 3 6] [--dir PATH]

For each size, writes a Hugging Face LLaMA folder of about that many GB (hidden 2048, intermediate
5632, 32 heads, 4 KV heads, vocab 32000, untied embeddings: TinyLlama's shapes; the layer count sets
the size; the largest tensor, the 262 MB embedding, is the same at every size), fp32 random weights in
sharded safetensors with an index, each tensor generated and written on its own so that this process
never holds the checkpoint, plus a small tokenizer. It converts the folder in a subprocess and samples
the child's /proc status every 50 ms:
  VmRSS    resident memory, including file pages (the memory-mapped targets, the safetensors file)
  RssAnon  anonymous memory: what the process needs, as opposed to page cache the kernel can reclaim
  maxrss   the kernel's own VmRSS high-water mark
  RssFile  file pages
A subprocess that imports the converter and loads the tokenizer gives the baseline subtracted from
each figure. The verdict is how fast the anonymous memory grows with the model: flat means it follows
the largest tensor. Everything lives in a temporary folder under `--dir` (on disk, not /tmp, which may
be RAM), deleted at the end.
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
PEAKS = ("RssAnon", "VmRSS", "maxrss", "RssFile")
# What the converter does besides converting: imports, the tokenizer, jax on CPU.
BASELINE = (
  "import sys, conversion.llm, transformers, jax; jax.numpy.zeros(1); "
  "transformers.AutoTokenizer.from_pretrained(sys.argv[1])"
)
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


def du(folder: str) -> int:
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(folder) for f in files)


def measure(work: str, layers: int, base: dict[str, float]) -> dict[str, float]:
  """Writes a checkpoint of `layers` layers under `work`, converts it, prints a row; returns the row."""
  source, out = os.path.join(work, f"hf{layers}"), os.path.join(work, f"model{layers}")
  total, largest = write_checkpoint(source, layers)
  conv = run_sampled([sys.executable, "-m", "conversion.llm", source, out])
  row = {"model": total / GB, "largest": largest / 1e6, "layers": layers, "seconds": conv["seconds"],
         "folder": du(out) / GB, **{key: conv.get(key, 0.0) - base.get(key, 0.0) for key in PEAKS}}
  print(f"{row['model']:>9.2f}{layers:>8}{row['largest']:>10.0f}{row['folder']:>9.2f}{row['seconds']:>6.0f}"
        + "".join(f"{row[key]:>10.0f}" for key in PEAKS), flush=True)
  shutil.rmtree(source)
  shutil.rmtree(out)
  return row


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--size-gb", type=float, nargs="+", default=[1.5, 3.0, 6.0],
                      help="approximate checkpoint sizes, one conversion each (each sets the layer count)")
  parser.add_argument("--dir", default=REPO, help="where the temporary folder goes (a disk, not tmpfs)")
  args = parser.parse_args()
  work = tempfile.mkdtemp(prefix=".conversion_memory-", dir=args.dir)
  try:
    tokenizer = os.path.join(work, "tokenizer")
    write_tokenizer(tokenizer)
    base = run_sampled([sys.executable, "-c", BASELINE, tokenizer])
    print("baseline (imports, tokenizer, jax): " + ", ".join(f"{key} {base[key]:.0f} MB" for key in PEAKS))
    print("peak memory added by the conversion over the baseline, MB")
    print(f"{'model GB':>9}{'layers':>8}{'largest':>10}{'out GB':>9}{'s':>6}" + "".join(f"{key:>10}" for key in PEAKS))
    rows = [measure(work, layers_for(size), base) for size in args.size_gb]
    if len(rows) > 1:
      first, last = rows[0], rows[-1]
      slope = (last["RssAnon"] - first["RssAnon"]) / (last["model"] - first["model"])
      verdict = "follows the largest tensor" if slope < 100 else "follows the model"
      print(f"verdict: anonymous memory grows {slope:.0f} MB per GB of model from {first['model']:.1f} to "
            f"{last['model']:.1f} GB and stays {max(r['RssAnon'] for r in rows) / last['largest']:.1f}x the "
            f"largest tensor ({last['largest']:.0f} MB): {verdict}.")
  finally:
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
  main()
