"""LTU stage 1 (facts §3.3, `stage1_proj_cla.sh`): the audio projection only, on the closed-ended
classification set, lr 1e-3, micro-batch 8. The original has no adapters in this stage (`['dummy']`
targets); here they exist with B = 0 and stay frozen, which is the same model."""

from configs.common import ltu_config


def get_config():
  c = ltu_config(1)
  c.data.train = "openaqa/data/closed_ended/combine_cla.json"
  c.trainable = ("audio_proj",)
  c.optim.lr = 1e-3
  c.optim.epochs = 2.0
  c.optim.micro_batch_size = 8
  return c
