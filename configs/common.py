"""The recipe shared by every stage (facts §3.1, LTU-AS and LTU alike); each stage file changes only what differs."""

from __future__ import annotations

import ml_collections


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.name = ""
  c.seed = 42  # HF Trainer's default
  # The model folder to start from: a converted LTU-AS (conversion.ltu_as) or a previous stage's output.
  c.model = ""
  c.output_dir = ""

  c.data = ml_collections.ConfigDict()
  c.data.train = ""  # LTU JSON / JSONL
  c.data.features = ""  # feature cache folder (python -m ltu_jax.extract_features)
  c.data.features_on_the_fly = False  # compute missing features (LTU-AS: with the model folder's Whisper)
  c.data.cutoff_len = 108
  c.data.train_on_inputs = True  # the original computes the loss over the whole text
  c.data.padding_side = "left"
  c.data.pad_to_multiple_of = 8
  c.data.group_by_length = True  # batches of similar lengths (HF's group_by_length): little padding
  c.data.skip_bad_records = False
  c.data.workers = 0

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 1e-4
  c.optim.warmup_steps = 100
  c.optim.batch_size = 256  # effective batch, over all devices and accumulation steps
  c.optim.micro_batch_size = 8  # per device and step
  c.optim.epochs = 2.0
  c.optim.max_steps = -1  # > 0: stop after this many optimizer steps (schedule still spans the epochs)
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.eps = 1e-8
  c.optim.weight_decay = 0.0
  # The HF Trainer clips the accumulated gradient to this global norm by default (None: no clipping).
  c.optim.max_grad_norm = 1.0
  # Learning-rate multipliers per trainable group (the model kind's groups, `ltu_jax.kinds`): TLTR, the
  # projection, the LoRA adapters.
  c.optim.lr_scale = ml_collections.ConfigDict({"audio_encoder": 1.0, "audio_proj": 1.0, "lora": 1.0})

  # What trains: groups of the model kind (stage 1: the projection; later stages TLTR, projection and LoRA).
  c.trainable = ("audio_encoder", "audio_proj", "lora")
  # The adapters: a model folder without them gets fresh ones of this shape; one with them keeps its own
  # (and trains them with this dropout).
  c.lora = ml_collections.ConfigDict({"rank": 8, "alpha": 16.0, "dropout": 0.05, "targets": ("q_proj", "v_proj")})

  c.audio = ml_collections.ConfigDict()
  # Windows a clip may fill (LTU-AS: 10 s, 25 audio tokens each; LTU: 10.24 s, 32) (None: what the model
  # folder was trained with; the releases: 1). The trained model folder records it.
  c.audio.max_windows = ml_collections.FieldReference(None, field_type=int)

  c.precision = ml_collections.ConfigDict()
  c.precision.compute = "bfloat16"  # activations and matmuls
  c.precision.frozen = "bfloat16"  # storage of the frozen LLM (trainable weights are fp32 masters)
  c.precision.remat = False

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = 1
  c.mesh.fsdp = -1  # all remaining devices
  c.mesh.tensor = 1

  c.log_every = 10
  c.checkpoint_every = 500
  c.keep_checkpoints = 3
  return c


def ltu_config(stage: int) -> ml_collections.ConfigDict:
  """LTU's stages (facts §3.3): batch 256, cutoff 108, the loss over the whole text (`--train_on_inputs`),
  LoRA r8/α16/0.05 on q and v, as the shared recipe; the fbank is computed from the audio as the
  original's collator does (a cache from `extract_features --model` is read where it has the clip)."""
  c = base_config()
  c.name = f"ltu_stage{stage}"
  c.data.features = "data/ltu_fbank"
  c.data.features_on_the_fly = True
  return c
