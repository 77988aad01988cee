"""LoRA variants: DoRA, and the inits PiSSA, OLoRA, orthogonal, EVA and CorDA.

==============  =====================================================================
DoRA            ``LoraConfig(variant="dora")``: a trainable magnitude per output
                feature; merged and factored paths (:func:`dora_norm`).
PiSSA           :func:`pissa_init` -> ``(new_params, adapters)``: principal singular
                triplets in the adapter, residual in the base.
OLoRA           :func:`olora_init` -> ``(new_params, adapters)``: QR of each kernel.
orthogonal      ``jlora.init(key, params, LoraConfig(init="orthogonal"))``: ``A@B = 0``
                with both factors non-zero (:func:`orthogonal_factors`).
EVA             :func:`eva_init` -> ``adapters``: ``A`` from the principal directions
                of each layer's inputs, ranks redistributed by explained variance.
CorDA           :func:`corda_init` -> ``(new_params, adapters)``: SVD of ``W·C`` with
                ``C`` the input covariance (:func:`corda_covariances`).
==============  =====================================================================

Every init works under any scaling policy: the scale is applied exactly where PEFT
applies it, so the adapted model equals the original one at init. Inits that change
the frozen base return the new base; nothing is mutated.

Example:
  >>> import jax, jax.numpy as jnp, jlora
  >>> params = {"dense": {"kernel": jax.random.normal(jax.random.key(1), (8, 6))}}
  >>> config = jlora.LoraConfig(rank=2, scaling="rslora", init="pissa", variant="dora")
  >>> base, adapters = jlora.variants.pissa_init(jax.random.key(0), params, config)
  >>> sorted(adapters)
  ['dense/kernel']
"""

from jlora.variants._common import randomized_svd as randomized_svd
from jlora.variants._corda import corda_covariances as corda_covariances
from jlora.variants._corda import corda_init as corda_init
from jlora.variants._dora import dora_merged_kernel as dora_merged_kernel
from jlora.variants._dora import dora_norm as dora_norm
from jlora.variants._dora import init_dora_magnitudes as init_dora_magnitudes
from jlora.variants._eva import eva_init as eva_init
from jlora.variants._eva import ipca_step as ipca_step
from jlora.variants._svd_inits import olora_init as olora_init
from jlora.variants._svd_inits import orthogonal_factors as orthogonal_factors
from jlora.variants._svd_inits import pissa_init as pissa_init

__all__ = [
    "corda_covariances",
    "corda_init",
    "dora_merged_kernel",
    "dora_norm",
    "eva_init",
    "init_dora_magnitudes",
    "ipca_step",
    "olora_init",
    "orthogonal_factors",
    "pissa_init",
    "randomized_svd",
]
