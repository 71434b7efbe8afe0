"""LTU stage 3 (facts §3.3, `stage3_all_close.sh`): everything trainable, all closed-ended questions, lr 1e-4, one epoch."""

from configs.common import ltu_config


def get_config():
  c = ltu_config(3)
  c.model = "runs/ltu_stage2/model"
  c.data.train = "openaqa/data/closed_ended/all_closed_qa.json"
  c.optim.lr = 1e-4
  c.optim.epochs = 1.0
  c.optim.micro_batch_size = 4
  return c
