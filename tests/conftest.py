"""Strict numerics for every test: no silent rank promotion, float32 matmuls exact."""

import jax

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_default_matmul_precision", "highest")
