"""Stage 2 of the recipe on the embedded default (Whisper tiny.en + SmolLM2-135M), sized for CPU."""

from configs import stage2
from configs.tiny import scale_to_cpu


def get_config():
  return scale_to_cpu(stage2.get_config(), 2)
