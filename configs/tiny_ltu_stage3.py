"""LTU stage 3 on the embedded default (a small fresh CAV-MAE + SmolLM2-135M), sized for CPU."""

from configs import ltu_stage3
from configs.tiny import scale_ltu_to_cpu


def get_config():
  return scale_ltu_to_cpu(ltu_stage3.get_config(), 3)
