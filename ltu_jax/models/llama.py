"""The LLaMA family: LLaMA-1 (Vicuna), LLaMA-2/3 and SmolLM2 share this one code path.

Grouped-query attention, rotary position embeddings (theta and scaling from the config, Hugging Face's
rotate-half layout), RMSNorm, SiLU-gated MLP, tied or untied output layer, LoRA on any projection.
"""

from __future__ import annotations

import dataclasses
import math
import weakref

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ltu_jax import sharding
from ltu_jax.models import layers
from ltu_jax.models.layers import KVCache
from ltu_jax.models.lora import Linear, LoRAConfig


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """RoPE frequency scaling: "linear" (position interpolation) or "llama3" (LLaMA 3.1 by-band)."""

  kind: str
  factor: float
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192

  def __post_init__(self):
    if self.kind not in ("linear", "llama3"):
      raise ValueError(f"rope scaling type {self.kind!r} is not supported; expected 'linear' or 'llama3'")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int | None = None  # hidden_size // num_heads when None
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  rope_scaling: RopeScaling | None = None
  max_position_embeddings: int = 2048
  tie_word_embeddings: bool = False
  lora: LoRAConfig | None = None
  dtype: str = "float32"  # compute
  param_dtype: str = "float32"  # storage
  remat: bool = False

  def __post_init__(self):
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")

  @property
  def head_size(self) -> int:
    return self.head_dim or self.hidden_size // self.num_heads


def rope_frequencies(config: LlamaConfig) -> np.ndarray:
  """Inverse frequencies `[head_dim // 2]` of the rotary embedding, scaled as the config says."""
  dim = config.head_size
  inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))
  scaling = config.rope_scaling
  if scaling is None:
    return inv_freq
  if scaling.kind == "linear":
    return inv_freq / scaling.factor
  # llama3: long wavelengths are slowed by `factor`, short ones kept, the band between interpolated.
  old_len = scaling.original_max_position_embeddings
  wavelen = 2 * math.pi / inv_freq
  scaled = np.where(wavelen > old_len / scaling.low_freq_factor, inv_freq / scaling.factor, inv_freq)
  smooth = (old_len / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
  smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
  medium = (wavelen >= old_len / scaling.high_freq_factor) & (wavelen <= old_len / scaling.low_freq_factor)
  return np.where(medium, smoothed, scaled).astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
  """Rotates `[batch, len, heads, head_dim]` by `positions` `[batch, len]` (rotate-half layout)."""
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [batch, len, head_dim // 2]
  angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
  cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return x * cos + rotated * sin


def projection(
  config: LlamaConfig, name: str, n_in: int, n_out: int, in_axis: str, out_axis: str, rngs: nnx.Rngs
) -> Linear:
  """A bias-free projection, with a LoRA adapter when the config's LoRA targets `name`."""
  lora = config.lora if config.lora is not None and name in config.lora.targets else None
  return Linear(
    n_in, n_out, in_axis, out_axis, bias=False, lora=lora,
    dtype=config.dtype, param_dtype=config.param_dtype, rngs=rngs,
  )


class Attention(nnx.Module):
  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
    self.config = config
    d, hd = config.hidden_size, config.head_size
    self.q_proj = projection(config, "q_proj", d, config.num_heads * hd, "embed", "q_heads", rngs)
    self.k_proj = projection(config, "k_proj", d, config.num_kv_heads * hd, "embed", "kv_heads", rngs)
    self.v_proj = projection(config, "v_proj", d, config.num_kv_heads * hd, "embed", "kv_heads", rngs)
    self.o_proj = projection(config, "o_proj", config.num_heads * hd, d, "q_heads", "embed", rngs)

  def __call__(self, x, positions, mask, kv, index, dropout_key):
    """x `[batch, len, embed]`; kv: this layer's cached (key, value) or None; returns (out, (key, value))."""
    cfg = self.config
    keys = [None] * 4 if dropout_key is None else list(jax.random.split(dropout_key, 4))
    q, k, v = self.q_proj(x, keys[0]), self.k_proj(x, keys[1]), self.v_proj(x, keys[2])
    out, kv = rotary_attention(cfg, q, k, v, positions, mask, kv, index)
    return self.o_proj(out, keys[3]), kv


def rotary_attention(config: LlamaConfig, q, k, v, positions, mask, kv, index, attend=layers.attention):
  """Projected queries `[batch, len, heads * head_dim]`, keys and values `[batch, len, kv_heads * head_dim]`
  → (attention output `[batch, len, heads * head_dim]`, this layer's keys and values, the cache's when `kv`
  (its `(key, value)`) is given, written at slot `index`); `attend` is `layers.attention` or one like it."""
  inv_freq = rope_frequencies(config)
  q = apply_rope(layers.split_heads(q, config.num_heads), positions, inv_freq)
  k = apply_rope(layers.split_heads(k, config.num_kv_heads), positions, inv_freq)
  v = layers.split_heads(v, config.num_kv_heads)
  if kv is not None:
    k, v = layers.write(kv[0], k, index), layers.write(kv[1], v, index)
  return attend(q, k.astype(q.dtype), v.astype(q.dtype), mask), (k, v)


class MLP(nnx.Module):
  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
    d, f = config.hidden_size, config.intermediate_size
    self.gate_proj = projection(config, "gate_proj", d, f, "embed", "mlp", rngs)
    self.up_proj = projection(config, "up_proj", d, f, "embed", "mlp", rngs)
    self.down_proj = projection(config, "down_proj", f, d, "mlp", "embed", rngs)

  def __call__(self, x, dropout_key):
    keys = [None] * 3 if dropout_key is None else list(jax.random.split(dropout_key, 3))
    return self.down_proj(gated(self.gate_proj(x, keys[0]), self.up_proj(x, keys[1])), keys[2])


@jax.checkpoint
def gated(gate: jax.Array, up: jax.Array) -> jax.Array:
  """`silu(gate) * up`, its backward pass recomputing the sigmoid from `gate` and `up`: a training step then
  keeps those two `[batch, len, mlp]` arrays a layer for the backward pass, not five (measured, issue #15)."""
  return jax.nn.silu(gate) * up


def rms_norm(config: LlamaConfig, rngs: nnx.Rngs) -> nnx.RMSNorm:
  return nnx.RMSNorm(
    config.hidden_size, epsilon=config.rms_norm_eps, use_fast_variance=False, dtype=jnp.float32,
    param_dtype=config.param_dtype, scale_metadata=layers.axes("norm"), rngs=rngs,
  )


class DecoderLayer(nnx.Module):
  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
    self.dtype = config.dtype
    self.input_layernorm = rms_norm(config, rngs)
    self.self_attn = Attention(config, rngs=rngs)
    self.post_attention_layernorm = rms_norm(config, rngs)
    self.mlp = MLP(config, rngs=rngs)

  def __call__(self, x, positions, mask, kv, index, dropout_key):
    keys = (None, None) if dropout_key is None else jax.random.split(dropout_key)
    attn, kv = self.self_attn(normed(self.input_layernorm, x).astype(self.dtype), positions, mask, kv, index, keys[0])
    x = x + attn
    x = x + self.mlp(normed(self.post_attention_layernorm, x).astype(self.dtype), keys[1])
    return x, kv


def normed(norm: nnx.RMSNorm, x: jax.Array) -> jax.Array:
  """`norm(x)`, its backward pass recomputing from `x`: a training step then keeps `x` a layer for it, not
  `x²`, `x` again and the normalised `x` that `nnx.RMSNorm`'s own backward pass reads (issue #15)."""
  graphdef, state = nnx.split(norm)
  return jax.checkpoint(lambda state, x: nnx.merge(graphdef, state)(x))(state, x)


class Llama(nnx.Module):
  """A LLaMA-family causal LM.

  `__call__` takes token ids or embeddings; `hidden` and `logits` are its two halves, so a caller
  (the LTU-AS composite) can put audio embeddings before the text and take logits on text only.
  """

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
    self.config = config
    self.embed_tokens = nnx.Embed(
      config.vocab_size, config.hidden_size, dtype=config.dtype, param_dtype=config.param_dtype,
      embedding_init=nnx.initializers.normal(0.02), embedding_metadata=layers.axes("vocab", "embed"), rngs=rngs,
    )
    self.layers = layers.stack(config.num_layers, lambda r: DecoderLayer(config, rngs=r), rngs)
    self.norm = rms_norm(config, rngs)
    if not config.tie_word_embeddings:
      self.lm_head = layers.linear(
        config.hidden_size, config.vocab_size, "embed", "vocab", bias=False,
        dtype=config.dtype, param_dtype=config.param_dtype, rngs=rngs,
      )

  def init_cache(self, batch: int, max_len: int) -> KVCache:
    cfg = self.config
    return KVCache.zeros(cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_size, cfg.dtype)

  def hidden(
    self,
    embeds: jax.Array,
    attention_mask: jax.Array,
    positions: jax.Array,
    cache: KVCache | None = None,
    dropout_key: jax.Array | None = None,
  ) -> tuple[jax.Array, KVCache | None]:
    """Runs the decoder layers and the final norm.

    Args:
      embeds: `[batch, len, embed]` input embeddings.
      attention_mask: `[batch, len]`, 1 for real tokens, 0 for padding.
      positions: `[batch, len]` rotary positions.
      cache: keys and values of earlier tokens; the new tokens are appended to it.
      dropout_key: enables LoRA dropout (training).
    Returns:
      (`[batch, len, embed]` normalised hidden states, the updated cache or None).
    """
    cfg = self.config
    cache, mask, index = attention_inputs(attention_mask, cache)
    kv = None if cache is None else (cache.key, cache.value)
    dropout_keys = None if dropout_key is None else jax.random.split(dropout_key, cfg.num_layers)

    def body(layer, x, scanned):
      layer_kv, layer_key = scanned
      x = sharding.constrain(x, ("batch", "length", None))
      x, new_kv = layer(x, positions, mask, layer_kv, index, layer_key)
      return x, new_kv if cache is not None else None

    x, new_kv = layers.scan(
      self.layers, body, embeds.astype(cfg.dtype), (kv, dropout_keys), remat=cfg.remat
    )
    if cache is not None:
      cache = cache.replace(key=new_kv[0], value=new_kv[1])
    return self.norm(x).astype(cfg.dtype), cache

  def logits(self, hidden: jax.Array) -> jax.Array:
    """`[batch, len, embed]` → float32 `[batch, len, vocab]`."""
    if self.config.tie_word_embeddings:
      return self.embed_tokens.attend(hidden).astype(jnp.float32)
    return self.lm_head(hidden).astype(jnp.float32)

  def __call__(
    self,
    input_ids: jax.Array,
    attention_mask: jax.Array | None = None,
    positions: jax.Array | None = None,
    cache: KVCache | None = None,
  ) -> tuple[jax.Array, KVCache | None]:
    """Logits `[batch, len, vocab]` for token ids `[batch, len]`.

    Positions default to the count of real tokens before each one (correct for left or right padding);
    with a cache they continue from the tokens already in it.
    """
    if attention_mask is None:
      attention_mask = jnp.ones(input_ids.shape, jnp.int32)
    if positions is None:
      positions = continued_positions(attention_mask, cache)
    hidden, cache = self.hidden(self.embed_tokens(input_ids), attention_mask, positions, cache)
    return self.logits(hidden), cache

  # The decoding engine's protocol (`ltu_jax.generate`).
  def prompt_embeddings(self, context, input_ids, attention_mask):
    """Text only: `context` must be None; returns (embeddings `[batch, len, embed]`, `attention_mask`)."""
    if context is not None:
      raise ValueError("an LLM takes no audio; audio needs an audio model such as LTU-AS")
    return self.embed_tokens(input_ids), attention_mask

  def prefill(self, context, input_ids, attention_mask, cache):
    """Text only: `context` must be None; returns (logits, cache, None)."""
    embeds, attention_mask = self.prompt_embeddings(context, input_ids, attention_mask)
    hidden, cache = self.hidden(embeds, attention_mask, continued_positions(attention_mask, cache), cache)
    return self.logits(hidden), cache, None

  def decode_step(self, context, input_ids, cache):
    del context
    return self(input_ids, jnp.ones_like(input_ids), cache=cache)

  def for_decoding(self) -> "Decoding":
    """This model in the decoding layout (`Decoding`), which the engine decodes with."""
    return Decoding(self, self)


def continued_positions(attention_mask: jax.Array, cache: KVCache | None) -> jax.Array:
  """Rotary positions `[batch, len]` of new tokens: the count of real tokens before each one, those in the
  cache included (correct for left or right padding)."""
  past = 0 if cache is None else jnp.sum(cache.valid, axis=-1, keepdims=True)
  return past + layers.sequence_positions(attention_mask)


def attention_inputs(attention_mask: jax.Array, cache: KVCache | None) -> tuple[KVCache | None, jax.Array, jax.Array | None]:
  """(the cache advanced over the new tokens, the attention mask `[batch, 1, len, kv_len]`, the slot of the
  first new token) for new tokens' `attention_mask` `[batch, len]`; without a cache the tokens see each other."""
  if cache is None:
    slots = jnp.broadcast_to(jnp.arange(attention_mask.shape[1]), attention_mask.shape)
    return None, layers.causal_mask(slots, slots, attention_mask.astype(bool)), None
  cache, q_slots, kv_slots = cache.advance(attention_mask)
  return cache, layers.causal_mask(q_slots, kv_slots, cache.valid), cache.index - attention_mask.shape[1]


# The decoding layout. Inside `lax.scan` over stacked layers XLA copies each layer's weight slice before its
# matmul (read, write, read again), so a memory-bound decode step reads the weights three times. Decoding
# instead runs an unrolled loop over per-layer arrays, q|k|v and gate|up fused into one matmul each, every
# weight stored `[out, in]` (see `project`).


class DecodeWeight(nnx.Variable):
  """A weight of the decoding layout: derived from the parameters, never trained or saved."""


def merged_kernel(linear: Linear) -> jax.Array:
  """A projection's kernel `[in, out]` with its LoRA adapter merged in (`W + A B · alpha / rank`, in fp32)."""
  kernel = linear.base.kernel[...]
  if linear.lora is None:
    return kernel
  # Full fp32 whatever the default matmul precision (a GPU's would round the product to bf16 passes).
  delta = jnp.matmul(linear.lora_a[...].astype(jnp.float32), linear.lora_b[...].astype(jnp.float32), precision="highest")
  return (kernel.astype(jnp.float32) + delta * linear.lora.scale).astype(kernel.dtype)


# Up to this many rows `project` computes `weight @ xᵀ`, the rows as the product's last dimension: XLA:CPU's
# kernels for that form ran a [3072, 576] weight 1.1× (1 row), 1.7× (8), 1.2× (32) faster than `x @ weightᵀ`,
# level at 64 rows, slower above (0.8× at 512: a prompt's pass).
FEW_ROWS = 32


def project(x: jax.Array, weight: jax.Array) -> jax.Array:
  """`x` `[..., in]` through a decoding weight `[out, in]` → `[..., out]`; for a decode step's few rows as
  `weight @ xᵀ` (see `FEW_ROWS`; the tied output layer as `x @ embeddingᵀ` had even become a loop fusion
  that transposed the embedding at every step)."""
  rows = x.reshape(-1, x.shape[-1])
  weight = weight.astype(x.dtype)
  if len(rows) > FEW_ROWS:
    return (rows @ weight.T).reshape(*x.shape[:-1], weight.shape[0])
  # The barrier keeps XLA from folding the transpose back into the product (as `rows @ weightᵀ`).
  product = jax.lax.optimization_barrier(weight @ rows.T)
  return product.T.reshape(*x.shape[:-1], weight.shape[0])


def step_attention(query: jax.Array, key: jax.Array, value: jax.Array, mask: jax.Array) -> jax.Array:
  """`layers.attention` for the decoding layout. One query per row (a decode step) is computed as products
  and sums over the cache in its own layout, read once: `layers.attention` transposes the keys for its
  matmuls, a copy of the layer's whole cache at every step. Longer queries (the prompt) go to it.

  Args: as `layers.attention`, `mask` `[batch, 1, q_len, kv_len]`. Returns `[batch, q_len, heads * head_dim]`.
  """
  batch, q_len, heads, head_dim = query.shape
  if q_len > 1:
    return layers.attention(query, key, value, mask)
  kv_heads = key.shape[2]
  query = query.reshape(batch, 1, kv_heads, heads // kv_heads, head_dim).astype(jnp.float32)
  logits = jnp.sum(query * key[:, :, :, None, :].astype(jnp.float32), axis=-1)  # [batch, kv_len, kv_heads, group]
  logits = jnp.where(mask.reshape(batch, -1, 1, 1), logits, -0.7 * jnp.finfo(jnp.float32).max)
  # As `layers.attention`: the scale on the exponent's pass, normalised after the weighted sum.
  weights = jnp.exp((logits - logits.max(axis=1, keepdims=True)) * head_dim**-0.5)
  out = jnp.sum(weights[..., None] * value[:, :, :, None, :].astype(jnp.float32), axis=1) / weights.sum(axis=1)[..., None]
  return out.astype(value.dtype).reshape(batch, 1, heads * head_dim)


class FusedLayer(nnx.Module):
  """One `DecoderLayer` in the decoding layout: arrays of its own, q|k|v `[(heads + 2 kv_heads) * head_dim,
  embed]` and gate|up `[2 mlp, embed]` fused, LoRA merged (no dropout: decoding never trains)."""

  def __init__(self, layer: DecoderLayer):
    attn, mlp = layer.self_attn, layer.mlp
    self.config = attn.config
    self.input_layernorm = layer.input_layernorm
    self.post_attention_layernorm = layer.post_attention_layernorm
    self.qkv = DecodeWeight(jnp.concatenate([merged_kernel(p) for p in (attn.q_proj, attn.k_proj, attn.v_proj)], axis=1).T)
    self.o = DecodeWeight(merged_kernel(attn.o_proj).T)
    self.gate_up = DecodeWeight(jnp.concatenate([merged_kernel(mlp.gate_proj), merged_kernel(mlp.up_proj)], axis=1).T)
    self.down = DecodeWeight(merged_kernel(mlp.down_proj).T)

  def __call__(self, x, positions, mask, kv, index):
    """As `DecoderLayer.__call__` without dropout."""
    cfg = self.config
    dtype = cfg.dtype
    q_width, kv_width = cfg.num_heads * cfg.head_size, cfg.num_kv_heads * cfg.head_size
    qkv = project(self.input_layernorm(x).astype(dtype), self.qkv[...])
    q, k, v = jnp.split(qkv, [q_width, q_width + kv_width], axis=-1)
    attn, kv = rotary_attention(cfg, q, k, v, positions, mask, kv, index, step_attention)
    x = x + project(attn, self.o[...])
    gate, up = jnp.split(project(self.post_attention_layernorm(x).astype(dtype), self.gate_up[...]), 2, axis=-1)
    return x + project(jax.nn.silu(gate) * up, self.down[...]), kv


class DecodingLayout(nnx.Module):
  """An LLM's weights for decoding: its layers as `FusedLayer`s and its output layer `[vocab, embed]` (the
  untied `lm_head` transposed; None when tied, the embedding being that already)."""

  def __init__(self, llm: Llama):
    graphdef, state = nnx.split(llm.layers)
    self.layers = nnx.List([
      FusedLayer(nnx.merge(graphdef, jax.tree.map(lambda x: x[i], state))) for i in range(llm.config.num_layers)
    ])
    self.head = None if llm.config.tie_word_embeddings else DecodeWeight(llm.lm_head.kernel[...].T)


_LAYOUTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def decoding_layout(llm: Llama) -> DecodingLayout:
  """`llm`'s `DecodingLayout` (a second copy of its layer weights), built on first use and kept while its
  parameters are the very arrays it was built from. Training, `nnx.update` or a load replace those arrays,
  so the next call rebuilds: the layout is never stale. (A model merged afresh from a train state, as an
  evaluation during training makes, is a new model: it builds its own.)"""
  sources = jax.tree.leaves(nnx.state(llm, nnx.Param))
  kept = _LAYOUTS.get(llm)
  if kept is not None and len(kept[0]) == len(sources) and all(ref() is x for ref, x in zip(kept[0], sources)):
    return kept[1]
  layout = DecodingLayout(llm)
  _LAYOUTS[llm] = ([weakref.ref(x) for x in sources], layout)
  return layout


class Decoding(nnx.Module):
  """A model in the engine's protocol that runs its LLM in the decoding layout (`decoding_layout`), the
  prompt's pass included: the model gives the prompt's embeddings (`prompt_embeddings`: its audio tokens
  and text), every layer writes its own `[batch, max_len, kv_heads, head_dim]` cache arrays, and only the
  last position's logits are computed (all the engine reads). Made by a model's `for_decoding()`; holds
  the model, so it is as fresh as it is."""

  def __init__(self, model: nnx.Module, llm: Llama):
    self.model, self.llm, self.layout = model, llm, decoding_layout(llm)

  def init_cache(self, batch: int, max_len: int) -> KVCache:
    cache = self.model.init_cache(batch, max_len)
    return cache.replace(key=list(cache.key), value=list(cache.value))

  def context_tokens(self, context) -> int:
    count = getattr(self.model, "context_tokens", None)
    return 0 if count is None else count(context)

  def prefill(self, context, input_ids, attention_mask, cache):
    """Returns (float32 logits `[batch, 1, vocab]` of the prompt's last token, cache, None)."""
    embeds, attention_mask = self.model.prompt_embeddings(context, input_ids, attention_mask)
    return *self.last_logits(embeds, attention_mask, cache), None

  def decode_step(self, carry, input_ids, cache):
    del carry  # the LLM's decode steps need nothing from the prefill but the cache
    return self.last_logits(self.llm.embed_tokens(input_ids), jnp.ones_like(input_ids), cache)

  def last_logits(self, embeds: jax.Array, attention_mask: jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache]:
    """`Llama.hidden` then `Llama.logits` in the decoding layout, for the last position only: embeddings
    `[batch, len, embed]` and their mask `[batch, len]` → (float32 logits `[batch, 1, vocab]`, the cache
    with all `len` positions appended)."""
    llm, cfg = self.llm, self.llm.config
    positions = continued_positions(attention_mask, cache)
    cache, mask, index = attention_inputs(attention_mask, cache)
    keys, values = list(cache.key), list(cache.value)
    x = embeds.astype(cfg.dtype)
    for i, layer in enumerate(self.layout.layers):
      x, (keys[i], values[i]) = layer(x, positions, mask, (keys[i], values[i]), index)
    head = llm.embed_tokens.embedding if self.layout.head is None else self.layout.head
    logits = project(llm.norm(x[:, -1:]).astype(cfg.dtype), head[...]).astype(jnp.float32)
    return logits, cache.replace(key=keys, value=values)
