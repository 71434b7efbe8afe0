"""LTU-AS stage 3 on one 16 GB device: the v2 recipe with the LLM's layers rematerialised and one sample a
micro-batch. The effective batch (256) and so every optimizer step are the recipe's; only the accumulation
differs (the loss is the mean over the effective batch's tokens however it is split). `bench/train_memory.py
--stages stage3 stage3_16gb`: 15.9 GB a device against stage 3's 24.4 (16.6 with remat alone), in XLA CPU's
estimate, which also counts fp32 copies of bf16 weights that a GPU does not make."""

from configs import stage3


def get_config():
  c = stage3.get_config()
  c.name = "stage3_16gb"
  c.precision.remat = True
  c.optim.micro_batch_size = 1
  return c
