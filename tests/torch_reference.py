"""PyTorch reference modules for LTU-AS, written from the facts of the original (not its code).

TLTR (`ATModel`): Whisper-style residual blocks named as in the original (`attn.query/key/value/out`,
`attn_ln`, `mlp.0`, `mlp.2`, `mlp_ln`), a 1-head time transformer then an 8-head layer transformer,
mean over layers. LTU-AS: those audio tokens go before the text embeddings of a LLaMA with LoRA.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class MultiHeadAttention(nn.Module):
  def __init__(self, dim: int, heads: int):
    super().__init__()
    self.heads = heads
    self.query = nn.Linear(dim, dim)
    self.key = nn.Linear(dim, dim, bias=False)
    self.value = nn.Linear(dim, dim)
    self.out = nn.Linear(dim, dim)

  def forward(self, x):
    batch, length, dim = x.shape
    scale = (dim // self.heads) ** -0.25  # applied to both q and k, as the original does
    q = self.query(x).view(batch, length, self.heads, -1).permute(0, 2, 1, 3) * scale
    k = self.key(x).view(batch, length, self.heads, -1).permute(0, 2, 3, 1) * scale
    v = self.value(x).view(batch, length, self.heads, -1).permute(0, 2, 1, 3)
    weights = (q @ k).float().softmax(dim=-1).to(q.dtype)
    return self.out((weights @ v).permute(0, 2, 1, 3).flatten(start_dim=2))


class ResidualAttentionBlock(nn.Module):
  def __init__(self, dim: int, heads: int, mlp_dim: int):
    super().__init__()
    self.attn = MultiHeadAttention(dim, heads)
    self.attn_ln = nn.LayerNorm(dim)
    self.mlp = nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Linear(mlp_dim, dim))
    self.mlp_ln = nn.LayerNorm(dim)

  def forward(self, x):
    x = x + self.attn(self.attn_ln(x))
    return x + self.mlp(self.mlp_ln(x))


class TLTR(nn.Module):
  def __init__(self, dim: int, time_heads: int = 1, layer_heads: int = 8, mlp_dim: int | None = None):
    super().__init__()
    self.time_tr = ResidualAttentionBlock(dim, time_heads, mlp_dim or 4 * dim)
    self.layer_tr = ResidualAttentionBlock(dim, layer_heads, mlp_dim or 4 * dim)

  def forward(self, features):  # [batch, layers, time, dim]
    batch, layers, time, dim = features.shape
    x = self.time_tr(features.reshape(batch * layers, time, dim))
    x = x.reshape(batch, layers, time, dim).permute(0, 2, 1, 3).reshape(batch * time, layers, dim)
    x = self.layer_tr(x)
    return x.mean(dim=1).reshape(batch, time, dim)


def attach_audio_modules(llama: nn.Module, tltr: nn.Module, whisper_dim: int) -> None:
  """Puts the audio encoder (TLTR; LTU: CAV-MAE) and the projection where the original keeps them, inside `LlamaModel`, so that the
  peft-wrapped state dict has the released key names (`base_model.model.model.audio_encoder...`)."""
  llama.model.audio_encoder = tltr
  llama.model.audio_proj = nn.Sequential(
    nn.LayerNorm(whisper_dim, elementwise_affine=False), nn.Linear(whisper_dim, llama.config.hidden_size)
  )


def wrap_with_peft(llama: nn.Module, encoder: nn.Module, dim: int, lora) -> nn.Module:
  """The reference as the tests build it: random LayerNorm affines in `encoder` (so that no mapping hides
  behind ones and zeros), the audio modules attached, a peft wrapper with `lora` (our `LoRAConfig`) and
  random (non-zero) LoRA B; in eval mode."""
  import peft  # only the tests that build a composite need it

  with torch.no_grad():
    for module in encoder.modules():
      if isinstance(module, nn.LayerNorm):
        module.weight.uniform_(0.5, 1.5)
        module.bias.normal_(0.0, 0.1)
  attach_audio_modules(llama, encoder, dim)
  reference = peft.get_peft_model(
    llama, peft.LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=0.0, target_modules=list(lora.targets))
  ).eval()
  with torch.no_grad():
    for key, param in reference.named_parameters():
      if "lora_B" in key:
        param.normal_(0.0, 0.2)
  return reference


def ltu_as_forward(model: nn.Module, features, input_ids, attention_mask, labels=None):
  """The original's forward: audio tokens first (positions 0..N-1), logits on text positions only.

  `model` is a (peft-wrapped) `LlamaForCausalLM` prepared with `attach_audio_modules`. Returns
  (text logits, loss) where the loss is the shifted cross entropy over `labels` (-100 ignored).
  """
  llama = model.get_base_model() if hasattr(model, "get_base_model") else model
  logits = text_logits(llama, llama.model.audio_proj(llama.model.audio_encoder(features)), input_ids, attention_mask)
  loss = None
  if labels is not None:
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)
  return logits, loss


def text_logits(llama: nn.Module, audio, input_ids, attention_mask):
  """Audio tokens `[batch, n, hidden]` before the text embeddings, positions 0..n-1 for the audio and the
  text after them; the text positions' float32 logits."""
  embeds = torch.cat([audio, llama.model.embed_tokens(input_ids)], dim=1)
  mask = torch.cat([torch.ones(audio.shape[:2], dtype=attention_mask.dtype), attention_mask], dim=1)
  positions = (mask.cumsum(-1) - 1).clamp(min=0)
  hidden = llama.model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).last_hidden_state
  return llama.lm_head(hidden[:, audio.shape[1] :]).float()


# LTU's front end: Kaldi's filterbank (`compute-fbank-feats`, as `torchaudio.compliance.kaldi.fbank` implements
# it) with the options the original passes, float32 throughout as torchaudio computes it.
def kaldi_fbank(waveform: torch.Tensor, num_bins: int = 128, sample_rate: int = 16000) -> torch.Tensor:
  """`[samples]` → `[frames, num_bins]` in the waveform's dtype (the filters are float32, as torchaudio's
  and Kaldi's, whatever the dtype): snip-edges frames of 25 ms every 10 ms, each with its DC
  offset removed, pre-emphasis 0.97 (first sample replicated), a symmetric ("hanning") window, zero-padded
  to the next power of two; power spectrum; HTK-mel triangles from 20 Hz to Nyquist; log floored at eps."""
  frame, shift = int(0.025 * sample_rate), int(0.010 * sample_rate)
  fft = 1 << (frame - 1).bit_length()
  frames = waveform.unfold(0, frame, shift)
  frames = frames - frames.mean(dim=1, keepdim=True)
  frames = frames - 0.97 * F.pad(frames.unsqueeze(0), (1, 0), mode="replicate").squeeze(0)[:, :-1]
  frames = frames * torch.hann_window(frame, periodic=False, dtype=frames.dtype)
  power = torch.fft.rfft(F.pad(frames, (0, fft - frame))).abs().pow(2)

  def mel(hz):
    return 1127.0 * torch.log(1.0 + hz / 700.0)

  low, high = 1127.0 * math.log(1.0 + 20.0 / 700.0), 1127.0 * math.log(1.0 + sample_rate / 2 / 700.0)
  delta = (high - low) / (num_bins + 1)
  index = torch.arange(num_bins).unsqueeze(1)
  left, center, right = low + index * delta, low + (index + 1.0) * delta, low + (index + 2.0) * delta
  bin_mel = mel(sample_rate / fft * torch.arange(fft // 2)).unsqueeze(0)
  filters = torch.clamp(torch.min((bin_mel - left) / (center - left), (right - bin_mel) / (right - center)), min=0.0)
  filters = F.pad(filters, (0, 1)).to(power.dtype)
  return torch.clamp(power @ filters.T, min=torch.finfo(torch.float32).eps).log()


def ltu_fbank_window(waveform: torch.Tensor) -> torch.Tensor:
  """The original's collator: mean removed, fbank, zero-padded or cut to 1024 frames, then normalized."""
  fbank = kaldi_fbank(waveform - waveform.mean())
  fbank = F.pad(fbank, (0, 0, 0, max(0, 1024 - fbank.shape[0])))[:1024]
  return (fbank + 5.081) / 4.4849


# LTU's encoder: CAV-MAE's audio branch (timm 0.4.5 ViT blocks), named as the release's keys
# (`patch_embed_a.proj`, `pos_embed_a`, `modality_a`, `blocks_a`, `blocks_u`, `norm_a`).
class VitAttention(nn.Module):
  def __init__(self, dim: int, heads: int):
    super().__init__()
    self.heads = heads
    self.qkv = nn.Linear(dim, 3 * dim)
    self.proj = nn.Linear(dim, dim)

  def forward(self, x):
    batch, length, dim = x.shape
    q, k, v = self.qkv(x).reshape(batch, length, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
    weights = ((q @ k.transpose(-2, -1)) * (dim // self.heads) ** -0.5).softmax(dim=-1)
    return self.proj((weights @ v).transpose(1, 2).reshape(batch, length, dim))


class VitMlp(nn.Module):
  def __init__(self, dim: int, hidden: int):
    super().__init__()
    self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

  def forward(self, x):
    return self.fc2(self.act(self.fc1(x)))


class CavMaeBlock(nn.Module):
  """A CAV-MAE block: six LayerNorms, of which a call uses one pair (no modality: norm1/norm2; 'a': the `_a`
  pair; 'v': the `_v` pair)."""

  def __init__(self, dim: int, heads: int, mlp_dim: int):
    super().__init__()
    for name in ("norm1", "norm1_a", "norm1_v", "norm2", "norm2_a", "norm2_v"):
      setattr(self, name, nn.LayerNorm(dim))
    self.attn = VitAttention(dim, heads)
    self.mlp = VitMlp(dim, mlp_dim)

  def forward(self, x, modality: str | None = None):
    suffix = "" if modality is None else f"_{modality}"
    x = x + self.attn(getattr(self, f"norm1{suffix}")(x))
    return x + self.mlp(getattr(self, f"norm2{suffix}")(x))


class PatchEmbed(nn.Module):
  def __init__(self, dim: int, patch: int):
    super().__init__()
    self.proj = nn.Conv2d(1, dim, kernel_size=patch, stride=patch)


class CavMaeAudio(nn.Module):
  """`[batch, 1024, 128]` fbank → `[batch, 512, dim]`; `hidden` collects every block's output."""

  def __init__(self, dim=768, heads=12, mlp_dim=3072, audio_layers=11, joint_layers=1, patch=16, bins=128, frames=1024):
    super().__init__()
    patches = (bins // patch) * (frames // patch)
    self.patch_embed_a = PatchEmbed(dim, patch)
    self.pos_embed_a = nn.Parameter(torch.randn(1, patches, dim) * 0.02)
    self.modality_a = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
    self.blocks_a = nn.ModuleList(CavMaeBlock(dim, heads, mlp_dim) for _ in range(audio_layers))
    self.blocks_u = nn.ModuleList(CavMaeBlock(dim, heads, mlp_dim) for _ in range(joint_layers))
    self.norm_a = nn.LayerNorm(dim)

  def forward(self, fbank, hidden: list | None = None):
    x = self.patch_embed_a.proj(fbank.unsqueeze(1).transpose(2, 3)).flatten(2).transpose(1, 2)
    x = x + self.pos_embed_a + self.modality_a
    for block, modality in [(b, None) for b in self.blocks_a] + [(b, "a") for b in self.blocks_u]:
      x = block(x, modality)
      if hidden is not None:
        hidden.append(x)
    return self.norm_a(x)


def ltu_audio_tokens(llama: nn.Module, fbank, freq_patches: int = 8):
  """LTU's `LlamaModel`: encoder output `[batch, freq * time, dim]` → mean over frequency → time pooled by 2
  → divided by 50 → `audio_proj` (LayerNorm without affine, Linear): `[batch, time / 2, hidden]`."""
  encoded = llama.model.audio_encoder(fbank)
  batch, patches, dim = encoded.shape
  pooled = F.avg_pool2d(encoded.reshape(batch, freq_patches, patches // freq_patches, dim).mean(dim=1), (2, 1))
  return llama.model.audio_proj(pooled / 50)


def ltu_forward(model: nn.Module, fbank, input_ids, attention_mask, freq_patches: int = 8):
  """LTU's forward: the CAV-MAE audio tokens first, as LTU-AS's; text logits."""
  llama = model.get_base_model() if hasattr(model, "get_base_model") else model
  return text_logits(llama, ltu_audio_tokens(llama, fbank, freq_patches), input_ids, attention_mask)
