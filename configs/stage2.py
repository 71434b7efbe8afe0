"""LTU-AS stage 2: everything trainable (TLTR, projection, LoRA), same classification set, lr 1e-4."""

from configs.common import base_config


def get_config():
  c = base_config()
  c.name = "stage2"
  c.model = "runs/stage1/model"
  c.data.train = "data/openasqa_classification.json"
  c.data.features = "data/whisper_feat"
  c.optim.lr = 1e-4
  c.optim.epochs = 2.0
  return c
