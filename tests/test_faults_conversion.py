"""Issue #14 for conversion: an output that would mix with or land in other files is refused before any
work, a tensor of integers where the model has floats is refused naming its key, and a LLaMA-1 /
Vicuna-era folder (sentencepiece's tokenizer.model, no tokenizer.json) converts with a fast tokenizer
that splits text exactly as sentencepiece does."""

from __future__ import annotations

import json
import os
import shutil
import sys

import numpy as np
import pytest
import sentencepiece
import tokenizers
import transformers
from flax import nnx
from safetensors.numpy import load_file, save_file

from conversion import hf_llama, llm, ltu_as, rules, whisper
from conversion.rules import CheckpointMismatch, OutputRefused, Rule
from ltu_jax import model_folder

VOCAB = 320  # 256 byte pieces (byte fallback, as LLaMA's) + 3 specials + merges
CORPUS = [
  "### Instruction:", "### Input:", "### Response:", "What can be inferred from the spoken text and sounds? Why?",
  "the dog barks loudly while rain falls on the roof", "a man speaks softly and music plays in the background",
  "a woman says hello, the clock reads 10:45 and 3 cars pass by",
] * 8
TEXTS = [  # what the converted tokenizer must split as sentencepiece does
  "### Instruction:\nWhat can be inferred from the spoken text and sounds? Why?\n\n### Response:\n",
  "  two leading spaces,  two inside and one after ",
  " a leading space",
  "digits 12345 and 3.14, unseen letters: café naïve Ωμέγα 🙂",
  "",
]


@pytest.fixture(scope="module")
def vicuna_folder(tmp_path_factory) -> str:
  """A LLaMA-1 / Vicuna-era HF folder: a tiny random LlamaForCausalLM and only a sentencepiece tokenizer.model,
  trained here with LLaMA's settings (no normalisation, byte fallback, split digits, dummy prefix)."""
  root = tmp_path_factory.mktemp("vicuna")
  (root / "corpus.txt").write_text("\n".join(CORPUS))
  sentencepiece.SentencePieceTrainer.train(
    input=str(root / "corpus.txt"), model_prefix=str(root / "sp"), vocab_size=VOCAB, model_type="bpe",
    normalization_rule_name="identity", byte_fallback=True, split_digits=True, add_dummy_prefix=True,
    remove_extra_whitespaces=False, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2,
  )
  folder = root / "vicuna-7b"
  config = transformers.LlamaConfig(
    vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
    max_position_embeddings=64, bos_token_id=1, eos_token_id=2,
  )
  transformers.LlamaForCausalLM(config).save_pretrained(folder)
  shutil.copy(root / "sp.model", folder / hf_llama.SENTENCEPIECE_MODEL)
  (folder / "tokenizer_config.json").write_text(json.dumps({  # as Vicuna v1.1 ships it
    "tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False, "bos_token": "<s>",
    "eos_token": "</s>", "unk_token": "<unk>", "model_max_length": 2048, "sp_model_kwargs": {},
  }))
  assert not (folder / hf_llama.FAST_TOKENIZER).exists()
  return str(folder)


def listing(folder) -> dict[str, int]:
  """Every file under `folder` with its size and modification time: what must not change."""
  found = {}
  for parent, _, files in os.walk(folder):
    for name in files:
      stat = os.stat(os.path.join(parent, name))
      found[os.path.relpath(os.path.join(parent, name), folder)] = (stat.st_size, stat.st_mtime_ns)
  return found


# ---------------------------------------------------------------------------------------------------
# The output folder


def test_a_non_empty_output_is_refused_unless_forced_and_its_files_are_kept(vicuna_folder, tmp_path):
  out = tmp_path / "out"
  out.mkdir()
  (out / "notes.txt").write_text("mine")
  with pytest.raises(OutputRefused, match=rf"output {out} is not empty \(it holds notes\.txt\); .* pass --force"):
    llm.main([vicuna_folder, str(out)])
  assert os.listdir(out) == ["notes.txt"]
  llm.main([vicuna_folder, str(out), "--force"])
  assert (out / "notes.txt").read_text() == "mine" and (out / model_folder.CONFIG_FILE).is_file()
  # --force never replaces a model
  model = listing(out)
  with pytest.raises(OutputRefused, match=rf"output {out} already holds ltu_jax.json, params, tokenizer_config.json"):
    llm.main(["--force", vicuna_folder, str(out)])
  assert listing(out) == model


def test_no_converter_writes_into_or_over_its_source(vicuna_folder, tmp_path):
  source = listing(vicuna_folder)
  link = tmp_path / "link"
  link.symlink_to(vicuna_folder)
  inside = os.path.join(vicuna_folder, "converted")
  cases = [
    (lambda: llm.main([vicuna_folder, vicuna_folder, "--force"]), rf"output {vicuna_folder} is the source"),
    (lambda: llm.main([vicuna_folder, inside]), rf"output {inside} is inside the source {vicuna_folder}"),
    (lambda: llm.main([vicuna_folder, str(link / "x")]), r"is inside the source"),  # another spelling
    (lambda: whisper.main(["w.pt", inside, "--tokenizer", vicuna_folder]), r"is inside the source"),
    (lambda: ltu_as.main(["--llm", vicuna_folder, "--whisper", "w", inside]), r"is inside the source"),
    (lambda: ltu_as.main(["--export", "--model", vicuna_folder, "--peft-dir", inside]), r"is inside the source"),
    (lambda: ltu_as.main(["--export", "--model", vicuna_folder, "--release", f"{inside}.bin"]), r"is the source"),
  ]
  for convert, message in cases:
    with pytest.raises(OutputRefused, match=message + ".*never writes into or over what it reads"):
      convert()
  assert listing(vicuna_folder) == source


def test_export_keeps_an_existing_adapter_and_release_file(tmp_path):
  peft = tmp_path / "adapter"
  peft.mkdir()
  (peft / "adapter_config.json").write_text("{}")
  with pytest.raises(OutputRefused, match=rf"output {peft} already holds adapter_config.json"):
    ltu_as.main(["--export", "--model", "m", "--peft-dir", str(peft), "--force"])
  (tmp_path / "back.bin").write_bytes(b"earlier export")
  with pytest.raises(OutputRefused, match=rf"output {tmp_path} already holds back.bin"):
    ltu_as.main(["--export", "--model", "m", "--release", str(tmp_path / "back.bin")])
  assert (tmp_path / "back.bin").read_bytes() == b"earlier export"


# ---------------------------------------------------------------------------------------------------
# Dtypes


class Tiny(nnx.Module):
  def __init__(self):
    self.dense = nnx.Linear(3, 2, rngs=nnx.Rngs(0))


TINY_RULES = (Rule("w", "dense.kernel", rules.transpose), Rule("b", "dense.bias"), Rule("step", None))


@pytest.mark.parametrize("strict", [True, False])
def test_integers_where_the_model_has_floats_are_refused_naming_key_and_dtypes(strict):
  _, state = nnx.split(Tiny())
  tensors = [("w", np.ones((2, 3), np.int8)), ("b", np.ones(2, bool)), ("step", np.int64(7))]  # step: dropped
  with pytest.raises(CheckpointMismatch) as error:
    rules.load(tensors, TINY_RULES, state, source="ckpt.bin", strict=strict)
  assert str(error.value) == "\n".join([
    "ckpt.bin does not match the model:",
    "  2 wrong dtype:",
    "    w: int8, expected floating point for dense.kernel (float32)",
    "    b: bool, expected floating point for dense.bias (float32)",
  ])


def test_every_float_dtype_is_accepted():
  import ml_dtypes

  _, state = nnx.split(Tiny())
  for dtype in (np.float16, np.float64, ml_dtypes.bfloat16):
    loaded = rules.load([("w", np.ones((2, 3), dtype)), ("b", np.ones(2, dtype))], TINY_RULES, state)
    np.testing.assert_array_equal(np.asarray(loaded["dense"]["kernel"].get_value()), np.ones((3, 2), np.float32))


def test_an_integer_tensor_in_a_checkpoint_stops_the_conversion(vicuna_folder, tmp_path):
  folder = tmp_path / "int-norm"
  shutil.copytree(vicuna_folder, folder)
  weights = load_file(folder / "model.safetensors")
  weights["model.layers.1.post_attention_layernorm.weight"] = np.ones(16, np.int32)
  save_file(weights, folder / "model.safetensors")
  message = "model.layers.1.post_attention_layernorm.weight: int32, expected floating point for layers.post_attention_layernorm.scale"
  with pytest.raises(CheckpointMismatch, match=rf"1 wrong dtype:\n    {message} \(float32\)$"):
    llm.main([str(folder), str(tmp_path / "out"), "--no-strict"])
  assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------
# Sentencepiece-only tokenizers


def test_a_sentencepiece_only_folder_converts_with_an_equal_fast_tokenizer(vicuna_folder, tmp_path):
  out = tmp_path / "vicuna"
  llm.main([vicuna_folder, str(out)])
  assert (out / hf_llama.FAST_TOKENIZER).is_file() and not (out / hf_llama.SENTENCEPIECE_MODEL).exists()
  slow = sentencepiece.SentencePieceProcessor(model_file=os.path.join(vicuna_folder, hf_llama.SENTENCEPIECE_MODEL))
  fast = tokenizers.Tokenizer.from_file(str(out / hf_llama.FAST_TOKENIZER))  # no sentencepiece needed to read it
  loaded = model_folder.load(out).tokenizer
  for text in TEXTS:
    expected = slow.encode(text)
    assert fast.encode(text, add_special_tokens=False).ids == expected, text
    assert loaded(text)["input_ids"] == [1, *expected], text  # BOS, as LlamaTokenizer adds
    assert loaded.decode(expected) == slow.decode(expected) == text
  assert any(slow.id_to_piece(i).startswith("<0x") for i in slow.encode(TEXTS[3])), "TEXTS must need byte fallback"


def test_without_sentencepiece_the_error_names_the_folder_and_package(vicuna_folder, tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "sentencepiece", None)  # as if it were not installed
  with pytest.raises(ImportError, match=rf"{vicuna_folder} has only a sentencepiece tokenizer \(tokenizer.model, no tokenizer.json\); .* needs the sentencepiece package"):
    llm.main([vicuna_folder, str(tmp_path / "out")])
  assert not (tmp_path / "out").exists()
