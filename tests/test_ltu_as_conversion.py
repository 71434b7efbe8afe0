"""LTU-AS checkpoints: a synthetic release `.bin` with the released key names, Whisper-AT's TL-TR, a
fresh start, wrong checkpoints, and the way back to peft and the release layout."""

from __future__ import annotations

import numpy as np
import peft
import pytest
import torch
import transformers
from flax import nnx

import ltu_jax
from conversion import hf_whisper, ltu_as, rules
from conversion.hf_llama import config_from_hf, load_llama
from ltu_jax import model_folder
from ltu_jax.models.lora import LoRAParam
from tests import torch_reference
from tests.helpers import max_abs_diff, numpy_state_dict
from tests.test_ltu_as import SETUPS, batch, build_reference

LOGITS_TOL = 1e-4
# The LTU-AS recipe's shape: 1 + 8 heads, LoRA r8/α16 on q and v, 25 audio tokens.
SETUP = {**SETUPS["ltu_as_like"], "time": 25}


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
  """The PyTorch reference, its release `.bin`, and our LLM and Whisper folders for the same weights."""
  root = tmp_path_factory.mktemp("ltu_as")
  torch.manual_seed(7)
  reference = build_reference(SETUP)
  state = reference.state_dict()
  release = {k: v for k, v in state.items() if "lora" in k or "audio" in k}  # what the original's Trainer saves
  torch.save(release, root / "release.bin")
  base = reference.get_base_model()
  llm_tensors = ((k, v) for k, v in numpy_state_dict(base) if "lora" not in k and "audio" not in k)
  llm = load_llama(config_from_hf(base.config), ((k.replace(".base_layer.", "."), v) for k, v in llm_tensors))
  model_folder.save(root / "llm", llm, "llama", extra={"bos_token_id": 1})
  whisper_config = transformers.WhisperConfig(
    d_model=SETUP["whisper_dim"], encoder_layers=SETUP["feature_layers"], encoder_attention_heads=4,
    encoder_ffn_dim=128, decoder_layers=1, decoder_attention_heads=4, decoder_ffn_dim=128, vocab_size=60,
    max_source_positions=1500, max_target_positions=32, num_mel_bins=80, pad_token_id=0, bos_token_id=0,
    eos_token_id=0, decoder_start_token_id=1,
  )
  whisper = hf_whisper.from_torch(transformers.WhisperForConditionalGeneration(whisper_config).eval())
  model_folder.save(root / "whisper", whisper, "whisper")
  return root, reference, release


def test_release_bin_gives_the_reference_logits(parts):
  root, reference, _ = parts
  ltu_as.main([str(root / "release.bin"), str(root / "out"), "--llm", str(root / "llm"), "--whisper", str(root / "whisper")])
  loaded = ltu_jax.load(root / "out")
  assert loaded.kind == "ltu_as" and loaded.extra["bos_token_id"] == 1
  assert ltu_jax.load(root / "out" / "whisper", tokenizer=False).kind == "whisper"
  features, ids = batch("", setup=SETUP)
  mask = np.ones_like(ids)
  with torch.no_grad():
    expected, _ = torch_reference.ltu_as_forward(reference, torch.as_tensor(features), torch.as_tensor(ids), torch.as_tensor(mask))
  logits = nnx.jit(lambda m, f, i, a: m(f, i, a)[0])(loaded.model, features, ids, mask)
  assert max_abs_diff(logits, expected) <= LOGITS_TOL


def test_names_with_or_without_default_segment(parts, tmp_path):
  root, _, release = parts
  plain = {k.replace(".default.", "."): v for k, v in release.items()}
  torch.save(plain, tmp_path / "plain.bin")
  model = ltu_as.convert(str(tmp_path / "plain.bin"), str(root / "llm"), str(root / "whisper"), str(tmp_path / "out"))
  reference = ltu_as.convert(str(root / "release.bin"), str(root / "llm"), str(root / "whisper"), str(tmp_path / "out2"))
  for a, b in zip(nnx.to_flat_state(nnx.state(model)), nnx.to_flat_state(nnx.state(reference)), strict=True):
    np.testing.assert_array_equal(a[1].get_value(), b[1].get_value())


def test_wrong_checkpoint_lists_every_problem(parts, tmp_path):
  """An LTU (not LTU-AS) checkpoint: CAV-MAE keys and a 768-wide projection, and a missing adapter."""
  root, _, release = parts
  prefix = "base_model.model.model."
  bad = dict(release)
  hidden = SETUP["llm"]["hidden_size"]
  bad[f"{prefix}audio_proj.1.weight"] = torch.zeros(hidden, 768)
  bad[f"{prefix}audio_encoder.patch_embed_a.proj.weight"] = torch.zeros(768, 1, 16, 16)
  del bad[f"{prefix}layers.1.self_attn.v_proj.lora_B.default.weight"]
  torch.save(bad, tmp_path / "ltu.bin")
  with pytest.raises(rules.CheckpointMismatch) as error:
    ltu_as.convert(str(tmp_path / "ltu.bin"), str(root / "llm"), str(root / "whisper"), str(tmp_path / "out"))
  assert error.value.missing == [f"{prefix}layers.1.self_attn.v_proj.lora_B.weight"]
  assert error.value.unexpected == [f"{prefix}audio_encoder.patch_embed_a.proj.weight"]
  assert error.value.misshaped == [
    f"{prefix}audio_proj.1.weight: ({hidden}, 768) (as (768, {hidden})), expected ({SETUP['whisper_dim']}, {hidden}) for audio_proj.kernel"
  ]
  assert str(tmp_path / "ltu.bin") in str(error.value)


def test_whisper_at_tltr_and_fresh_start(parts, tmp_path):
  root, reference, release = parts
  at = {k.replace("base_model.model.model.audio_encoder.", "at_model."): v for k, v in release.items() if "audio_encoder" in k}
  at["at_model.mlp_layer.0.weight"] = torch.ones(SETUP["whisper_dim"])
  at["at_model.mlp_layer.0.bias"] = torch.zeros(SETUP["whisper_dim"])
  at["at_model.mlp_layer.1.weight"] = torch.zeros(527, SETUP["whisper_dim"])
  at["at_model.mlp_layer.1.bias"] = torch.zeros(527)
  torch.save(at, tmp_path / "whisper_at.pth")
  started = ltu_as.convert(str(tmp_path / "whisper_at.pth"), str(root / "llm"), str(root / "whisper"), str(tmp_path / "at"))
  fresh = ltu_as.convert(None, str(root / "llm"), str(root / "whisper"), str(tmp_path / "fresh"))
  ours = dict(rules.export(nnx.state(started), ltu_as.audio_rules()))
  for key, value in release.items():
    if "audio_encoder" in key:
      np.testing.assert_array_equal(ours[key], value.numpy())
  for model in (started, fresh):
    adapters = nnx.state(model, LoRAParam)
    assert all(not np.any(np.asarray(v.get_value())) for p, v in nnx.to_flat_state(adapters) if p[-1] == "lora_b")
    base = nnx.state(model.llm, nnx.Not(LoRAParam))
    llm = ltu_jax.load(root / "llm", tokenizer=False).model
    for a, b in zip(nnx.to_flat_state(base), nnx.to_flat_state(nnx.state(llm)), strict=True):
      np.testing.assert_array_equal(a[1].get_value(), b[1].get_value())


def test_export_to_peft_and_release_layout(parts, tmp_path):
  root, reference, release = parts
  model = ltu_as.convert(str(root / "release.bin"), str(root / "llm"), str(root / "whisper"), str(tmp_path / "out"))
  ltu_as.main(["--export", "--model", str(tmp_path / "out"), "--peft-dir", str(tmp_path / "adapter"), "--release", str(tmp_path / "back.bin")])

  back = torch.load(tmp_path / "back.bin", weights_only=True)
  assert sorted(back) == sorted(release)
  for key, value in release.items():
    assert torch.equal(back[key], value), key

  # peft loads the adapter onto a plain transformers model with the same base weights.
  base = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SETUP["llm"], attn_implementation="eager"))
  base.load_state_dict({k.replace(".base_layer.", "."): v for k, v in reference.get_base_model().state_dict().items() if "lora" not in k and "audio" not in k})
  adapted = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
  _, ids = batch("", setup=SETUP)
  with torch.no_grad():
    expected = adapted(input_ids=torch.as_tensor(ids)).logits
  logits = nnx.jit(lambda m, i: m(i)[0])(model.llm, ids)
  assert max_abs_diff(logits, expected) <= LOGITS_TOL
  with torch.no_grad(), adapted.disable_adapter():
    assert max_abs_diff(logits, adapted(input_ids=torch.as_tensor(ids)).logits) > 100 * LOGITS_TOL
