"""LTU stage 2 (facts §3.3, `stage2_all_cla.sh`): everything trainable (CAV-MAE, projection, LoRA), the same classification set, lr 1e-4."""

from configs.common import ltu_config


def get_config():
  c = ltu_config(2)
  c.model = "runs/ltu_stage1/model"
  c.data.train = "openaqa/data/closed_ended/combine_cla.json"
  c.optim.lr = 1e-4
  c.optim.epochs = 2.0
  c.optim.micro_batch_size = 4
  return c
