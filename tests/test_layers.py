"""`ltu_jax.models.layers.attention` against a float64 NumPy reference, on the paths the models take:
short and masked (decoders, KV-cache steps), grouped-query, and long enough to run over blocks of queries."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from ltu_jax.models import layers

ATTENTION_ATOL = 1e-6  # float32 attention of O(1) values against float64


def reference_attention(query, key, value, mask):
  """Softmax attention in float64, masked logits filled as `jax.nn.dot_product_attention` fills them."""
  batch, q_len, heads, head_dim = query.shape
  group = heads // key.shape[2]
  key, value = (np.repeat(x.astype(np.float64), group, axis=2) for x in (key, value))
  logits = np.einsum("bthd,bshd->bhts", query.astype(np.float64), key) / np.sqrt(head_dim)
  if mask is not None:
    logits = np.where(mask, logits, -0.7 * np.finfo(np.float32).max)
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  return np.einsum("bhts,bshd->bthd", weights, value).reshape(batch, q_len, heads * head_dim)


@pytest.mark.parametrize(
  "batch, q_len, kv_len, heads, kv_heads, head_dim, mask_shape",
  [
    (2, 7, 9, 4, 4, 16, (2, 4, 7, 9)),  # per-head mask
    (2, 7, 9, 6, 2, 16, (2, 1, 7, 9)),  # grouped-query, causal-style mask shared by heads
    (2, 1, 9, 6, 3, 32, (2, 1, 1, 9)),  # one decoding step over a KV cache
    (1, 1100, 1100, 4, 4, 64, None),  # Whisper-encoder-like: long, unmasked; blocks, the last one padded
    (2, 1000, 1000, 6, 2, 32, (2, 1, 1000, 1000)),  # long prefill: blocks of queries and of the mask
    (2, 1000, 1000, 4, 4, 32, (1, 1, 1, 1000)),  # long, one mask row for every query
  ],
)
def test_attention_matches_float64_softmax(batch, q_len, kv_len, heads, kv_heads, head_dim, mask_shape):
  rng = np.random.default_rng(0)
  query = rng.normal(size=(batch, q_len, heads, head_dim)).astype(np.float32)
  key, value = (rng.normal(size=(batch, kv_len, kv_heads, head_dim)).astype(np.float32) for _ in range(2))
  mask = None
  if mask_shape is not None:
    mask = rng.random(mask_shape) < 0.7
    if mask_shape[2] > 3:
      mask[:, :, 3] = False  # a query that sees nothing (a padding row) averages the values, as jax's does
  out = jax.jit(layers.attention)(query, key, value, mask)
  err = float(np.abs(np.asarray(out) - reference_attention(query, key, value, mask)).max())
  assert err <= ATTENTION_ATOL, err


def test_long_attention_runs_over_blocks():
  """The long cases above take the blocked path: their float32 logits exceed the block size."""
  assert 4 * 1 * 4 * 1100 * 1100 > layers.ATTENTION_BLOCK_BYTES
  assert 4 * 2 * 6 * 1000 * 1000 > layers.ATTENTION_BLOCK_BYTES
  jaxpr = jax.make_jaxpr(layers.attention)(*(np.zeros((1, 1100, 4, 64), np.float32),) * 3)
  assert "scan" in str(jaxpr)
