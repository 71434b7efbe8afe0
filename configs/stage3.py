"""LTU-AS stage 3 (the released v2 recipe): the full open- and closed-ended mix, lr 2e-4, cutoff 160."""

from configs.common import base_config


def get_config():
  c = base_config()
  c.name = "stage3"
  c.model = "runs/stage2/model"
  c.data.train = "data/openasqa_10.3M_v2.json"
  c.data.features = "data/whisper_feat"
  c.optim.lr = 2e-4
  c.optim.epochs = 1.0
  c.optim.micro_batch_size = 4
  c.data.cutoff_len = 160
  return c
