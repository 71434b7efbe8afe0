"""LTU-AS stage 1: train the audio projection only, on the closed-ended classification set (lr 1e-3)."""

from configs.common import base_config


def get_config():
  c = base_config()
  c.name = "stage1"
  c.data.train = "data/openasqa_classification.json"
  c.data.features = "data/whisper_feat"
  c.trainable = ("audio_proj",)
  c.optim.lr = 1e-3
  c.optim.epochs = 2.0
  c.optim.micro_batch_size = 8
  return c
