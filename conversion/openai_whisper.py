"""OpenAI Whisper names (`blocks.N.attn.query`, `mlp.0`, ...): openai-whisper checkpoints, and TLTR's
blocks in the LTU-AS release and Whisper-AT, which use the same residual block."""

from __future__ import annotations

from typing import Iterator

from conversion.rules import Rule, layer_norm_rules, linear_rules


def residual_block_rules(source: str, target: str) -> Iterator[Rule]:
  """An OpenAI `ResidualAttentionBlock` (self-attention only) onto our `whisper.EncoderLayer`."""
  for name, ours in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj"), ("out", "out_proj")):
    yield from linear_rules(f"{source}.attn.{name}", f"{target}.self_attn.{ours}", bias=name != "key")
  yield from layer_norm_rules(f"{source}.attn_ln", f"{target}.self_attn_layer_norm")
  yield from linear_rules(f"{source}.mlp.0", f"{target}.fc1")
  yield from linear_rules(f"{source}.mlp.2", f"{target}.fc2")
  yield from layer_norm_rules(f"{source}.mlp_ln", f"{target}.final_layer_norm")
