"""Stage 3 of the recipe on the embedded default (Whisper tiny.en + SmolLM2-135M), sized for CPU."""

from configs import stage3
from configs.tiny import scale_to_cpu


def get_config():
  return scale_to_cpu(stage3.get_config(), 3)
