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


def attach_audio_modules(llama: nn.Module, tltr: TLTR, whisper_dim: int) -> None:
  """Puts TLTR and the projection where the original keeps them, inside `LlamaModel`, so that the
  peft-wrapped state dict has the released key names (`base_model.model.model.audio_encoder...`)."""
  llama.model.audio_encoder = tltr
  llama.model.audio_proj = nn.Sequential(
    nn.LayerNorm(whisper_dim, elementwise_affine=False), nn.Linear(whisper_dim, llama.config.hidden_size)
  )


def ltu_as_forward(model: nn.Module, features, input_ids, attention_mask, labels=None):
  """The original's forward: audio tokens first (positions 0..N-1), logits on text positions only.

  `model` is a (peft-wrapped) `LlamaForCausalLM` prepared with `attach_audio_modules`. Returns
  (text logits, loss) where the loss is the shifted cross entropy over `labels` (-100 ignored).
  """
  llama = model.get_base_model() if hasattr(model, "get_base_model") else model
  audio = llama.model.audio_proj(llama.model.audio_encoder(features))
  embeds = torch.cat([audio, llama.model.embed_tokens(input_ids)], dim=1)
  mask = torch.cat([torch.ones(audio.shape[:2], dtype=attention_mask.dtype), attention_mask], dim=1)
  positions = (mask.cumsum(-1) - 1).clamp(min=0)
  hidden = llama.model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).last_hidden_state
  logits = llama.lm_head(hidden[:, audio.shape[1] :]).float()
  loss = None
  if labels is not None:
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)
  return logits, loss


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
