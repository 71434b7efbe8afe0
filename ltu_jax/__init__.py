"""ltu-jax: LTU-AS and LTU in JAX/Flax. `ltu_jax.load(folder)` opens any converted model folder."""

from ltu_jax.model_folder import Loaded, load

__all__ = ["Loaded", "load"]
