"""LTU stage 4 (facts §3.3, `stage4_all_mix.sh`): everything trainable, the whole OpenAQA-5.6M mix (1.9M closed + 3.7M open-ended), lr 1e-4, one epoch."""

from configs.common import ltu_config


def get_config():
  c = ltu_config(4)
  c.model = "runs/ltu_stage3/model"
  c.data.train = "openaqa/data/openaqa_5.6M.json"
  c.optim.lr = 1e-4
  c.optim.epochs = 1.0
  c.optim.micro_batch_size = 4
  return c
