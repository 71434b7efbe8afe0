"""LTU checkpoints: a synthetic release `.bin` with the release's key names (facts §5.3) at small sizes, a
CAV-MAE checkpoint alone, the way back to the release layout and to peft; then `infer` and
`extract_features` on the converted folder."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import peft
import pytest
import torch
import transformers
from flax import nnx

import ltu_jax
from conversion import ltu, rules
from conversion.hf_llama import config_from_hf, load_llama
from ltu_jax import audio, data, extract_features, frontend, infer, model_folder
from ltu_jax.models.cav_mae import CavMaeConfig
from ltu_jax.models.lora import LoRAConfig, LoRAParam
from tests import torch_reference, train_setup
from tests.helpers import max_abs_diff, numpy_state_dict
from tests.test_ltu import build_reference

LOGITS_TOL = 1e-4
P = "base_model.model.model."
# The release's input and LoRA at small widths: 48 wide, 3 heads, 2 + 1 blocks; 128 bins × 1024 frames.
ENCODER = CavMaeConfig(dim=48, heads=3, mlp_dim=192, audio_layers=2, joint_layers=1)
ENCODER_ARGS = ["--encoder-dim", "48", "--encoder-heads", "3", "--encoder-layers", "2", "--encoder-joint-layers", "1"]
SETUP = dict(
  encoder=ENCODER,
  llm=dict(vocab_size=len(train_setup.tokenizer()), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
           num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, tie_word_embeddings=False),
  lora=LoRAConfig(rank=8, alpha=16.0, dropout=0.05, targets=("q_proj", "v_proj")),
)
# What a block holds but the audio path does not read: the video pair everywhere, the `_a` pair of
# `blocks_a` (run without a modality), the plain pair of `blocks_u` (run with 'a').
UNUSED = [f"{P}audio_encoder.{group}.{layer}.{norm}.{p}"
          for group, layers, norms in (("blocks_a", 2, ("norm1_a", "norm2_a", "norm1_v", "norm2_v")),
                                       ("blocks_u", 1, ("norm1", "norm2", "norm1_v", "norm2_v")))
          for layer in range(layers) for norm in norms for p in ("weight", "bias")]


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
  """The PyTorch reference, its release `.bin` (what the original's Trainer saves: `lora` and `audio` keys),
  and an LLM folder (with a tokenizer) of the same base weights."""
  root = tmp_path_factory.mktemp("ltu")
  torch.manual_seed(11)
  reference = build_reference(SETUP)
  release = {k: v for k, v in reference.state_dict().items() if "lora" in k or "audio" in k}
  assert set(UNUSED) <= set(release)
  torch.save(release, root / "release.bin")
  base = reference.get_base_model()
  llm_tensors = ((k.replace(".base_layer.", "."), v) for k, v in numpy_state_dict(base) if "lora" not in k and "audio" not in k)
  llm = load_llama(config_from_hf(base.config), llm_tensors)
  model_folder.save(root / "llm", llm, "llama", extra=train_setup.EXTRA, tokenizer=train_setup.tokenizer())
  return root, reference, release


def convert_release(root, out) -> None:
  ltu.main([str(root / "release.bin"), str(out), "--llm", str(root / "llm"), *ENCODER_ARGS])


def test_release_bin_gives_the_reference_logits(parts):
  root, reference, _ = parts
  convert_release(root, root / "out")
  loaded = ltu_jax.load(root / "out")
  assert loaded.kind == "ltu" and loaded.config.encoder == ENCODER and loaded.extra == train_setup.EXTRA
  rng = np.random.default_rng(0)
  fbank = rng.normal(size=(2, 1024, 128)).astype(np.float32)
  ids = rng.integers(3, SETUP["llm"]["vocab_size"], (2, 6)).astype(np.int32)
  ids[:, 0] = 1
  mask = np.ones_like(ids)
  with torch.no_grad():
    expected = torch_reference.ltu_forward(reference, torch.as_tensor(fbank), torch.as_tensor(ids), torch.as_tensor(mask))
  logits = nnx.jit(lambda m, f, i, a: m(f, i, a)[0])(loaded.model, fbank[:, None], ids, mask)
  assert max_abs_diff(logits, expected) <= LOGITS_TOL


def test_export_round_trip_is_bit_exact(parts, tmp_path):
  """Back to the release layout: every key but the unused LayerNorms, each tensor bit for bit; converting
  that file again gives the same model; and peft loads the adapter folder."""
  root, reference, release = parts
  model = ltu.convert(str(root / "release.bin"), str(root / "llm"), str(tmp_path / "out"), encoder=ENCODER)
  ltu.main(["--export", "--model", str(tmp_path / "out"), "--peft-dir", str(tmp_path / "adapter"),
            "--release", str(tmp_path / "back.bin")])
  back = torch.load(tmp_path / "back.bin", weights_only=True)
  assert sorted(back) == sorted(set(release) - set(UNUSED))
  for key, value in back.items():
    assert torch.equal(value, release[key]), key
  again = ltu.convert(str(tmp_path / "back.bin"), str(root / "llm"), str(tmp_path / "again"), encoder=ENCODER)
  for a, b in zip(nnx.to_flat_state(nnx.state(model)), nnx.to_flat_state(nnx.state(again)), strict=True):
    np.testing.assert_array_equal(a[1].get_value(), b[1].get_value())

  base = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SETUP["llm"], attn_implementation="eager"))
  base.load_state_dict({k.replace(".base_layer.", "."): v for k, v in reference.get_base_model().state_dict().items()
                        if "lora" not in k and "audio" not in k})
  adapted = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
  ids = np.array([[1, 5, 7, 9, 11]])
  with torch.no_grad():
    expected = adapted(input_ids=torch.as_tensor(ids)).logits
  assert max_abs_diff(nnx.jit(lambda m, i: m(i)[0])(model.llm, ids), expected) <= LOGITS_TOL


def test_cav_mae_checkpoint_starts_a_fresh_ltu(parts, tmp_path):
  """A fine-tuned CAV-MAE (`module.`, with its video branch and classification head) fills the encoder;
  the projection and LoRA are fresh (B zero), the base LLM is the folder's."""
  root, reference, release = parts
  audio_keys = {k.replace(f"{P}audio_encoder.", "module."): v for k, v in release.items() if "audio_encoder" in k}
  video = {k.replace("blocks_a.", "blocks_v.").replace("_a.", "_v.").replace("pos_embed_a", "pos_embed_v")
           .replace("modality_a", "modality_v"): torch.zeros_like(v) for k, v in audio_keys.items() if "blocks_u" not in k}
  head = {"module.norm.weight": torch.ones(48), "module.norm.bias": torch.zeros(48),
          "module.mlp_head.0.weight": torch.ones(48), "module.mlp_head.0.bias": torch.zeros(48),
          "module.mlp_head.1.weight": torch.zeros(527, 48), "module.mlp_head.1.bias": torch.zeros(527)}
  torch.save({**audio_keys, **video, **head}, tmp_path / "cav_mae.pth")
  started = ltu.convert(str(tmp_path / "cav_mae.pth"), str(root / "llm"), str(tmp_path / "out"), encoder=ENCODER)
  ours = dict(rules.export(nnx.state(started), ltu.audio_rules()))
  for key, value in release.items():
    if "audio_encoder" in key and key not in UNUSED:
      np.testing.assert_array_equal(ours[key], value.numpy())
  adapters = nnx.to_flat_state(nnx.state(started, LoRAParam))
  assert adapters and all(not np.any(np.asarray(v.get_value())) for p, v in adapters if p[-1] == "lora_b")
  llm = ltu_jax.load(root / "llm", tokenizer=False).model
  for a, b in zip(nnx.to_flat_state(nnx.state(started.llm, nnx.Not(LoRAParam))), nnx.to_flat_state(nnx.state(llm)), strict=True):
    np.testing.assert_array_equal(a[1].get_value(), b[1].get_value())


def test_wrong_checkpoints_are_named(parts, tmp_path):
  root, _, release = parts
  bad = dict(release)
  bad[f"{P}audio_encoder.blocks_a.0.attn.qkv.weight"] = torch.zeros(48, 48)
  bad[f"{P}audio_encoder.time_tr.attn.query.weight"] = torch.zeros(48, 48)
  del bad[f"{P}audio_encoder.norm_a.bias"]
  torch.save(bad, tmp_path / "bad.bin")
  with pytest.raises(rules.CheckpointMismatch) as error:
    ltu.convert(str(tmp_path / "bad.bin"), str(root / "llm"), str(tmp_path / "out"), encoder=ENCODER)
  assert error.value.missing == [f"{P}audio_encoder.norm_a.bias"]
  assert error.value.unexpected == [f"{P}audio_encoder.time_tr.attn.query.weight"]
  assert error.value.misshaped == [
    f"{P}audio_encoder.blocks_a.0.attn.qkv.weight: (48, 48), expected (48, 144) for audio_encoder.blocks_a.attn.qkv.kernel"
  ]
  torch.save({"at_model.time_tr.attn.query.weight": torch.zeros(2, 2)}, tmp_path / "other.pth")
  with pytest.raises(ValueError, match="neither an LTU release key .* nor a CAV-MAE key"):
    ltu.convert(str(tmp_path / "other.pth"), str(root / "llm"), str(tmp_path / "out2"), encoder=ENCODER)


def test_infer_and_extract_features_on_an_ltu_folder(parts, tmp_path, capsys):
  """The same commands as LTU-AS's: answers without a transcript, from the fbank; the cache holds the fbank."""
  root, _, _ = parts
  convert_release(root, tmp_path / "ltu")
  speech = str(tmp_path / "speech.wav")
  subprocess.run(["espeak-ng", "-w", speech, "the bell says hello"], check=True)
  argv = ["--model", str(tmp_path / "ltu"), "--greedy", "--max-new-tokens", "4", "--question", "what was said", "--jsonl", speech]
  assert infer.main(argv) == 0
  line = json.loads(capsys.readouterr().out)
  assert line["transcript"] is None and isinstance(line["answer"], str)
  loaded = infer.load_model(tmp_path / "ltu")
  heard = infer.hear(loaded, [audio.load_audio(speech)])
  assert heard.transcripts is None and heard.features.shape == (1, 1, 1024, 128)
  np.testing.assert_array_equal(heard.features[0, 0], frontend.LtuFbankWindows().windows(audio.load_audio(speech))[0])

  records = tmp_path / "data.json"
  records.write_text(json.dumps([dict(instruction="what was said", input="", output="hello", audio_id=speech)]))
  assert extract_features.main(["--model", str(tmp_path / "ltu"), "--data", str(records), "--out", str(tmp_path / "cache")]) == 0
  cached = np.load(tmp_path / "cache" / data.feature_filename(speech))["arr_0"]
  assert cached.dtype == np.float32
  np.testing.assert_array_equal(cached, heard.features[0])
