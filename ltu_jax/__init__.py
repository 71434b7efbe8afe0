"""ltu-jax: LTU-AS and LTU in JAX/Flax. `ltu_jax.load(folder)` opens any converted model folder."""

from ltu_jax import memory

memory.reuse_freed_memory()  # before jax starts its threads: see ltu_jax.memory

from ltu_jax.model_folder import Loaded, load  # noqa: E402

__all__ = ["Loaded", "load"]
