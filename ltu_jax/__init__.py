"""ltu-jax: LTU-AS and LTU in JAX/Flax. `ltu_jax.load(folder)` opens any converted model folder."""

import os

from ltu_jax import memory

if os.environ.get("LTU_JAX_MALLOC") != "system":  # the opt-out, for comparisons
  memory.reuse_freed_memory()  # before jax starts its threads: see ltu_jax.memory

from ltu_jax.model_folder import Loaded, load  # noqa: E402

__all__ = ["Loaded", "load"]
