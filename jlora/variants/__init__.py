"""LoRA variants: DoRA, and the inits PiSSA, OLoRA, orthogonal, EVA, CorDA and LoftQ.

==============  =====================================================================
DoRA            ``LoraConfig(variant="dora")``: a trainable magnitude per output
                feature; merged and factored paths (:class:`DoRA`, :func:`dora_norm`).
PiSSA           :func:`pissa_init` -> ``(new_params, adapters)``: principal singular
                triplets in the adapter, residual in the base.
OLoRA           :func:`olora_init` -> ``(new_params, adapters)``: QR of each kernel.
orthogonal      ``jlora.init(key, params, LoraConfig(init="orthogonal"))``: ``A@B = 0``
                with both factors non-zero (:func:`orthogonal_factors`).
EVA             :func:`eva_init` -> ``adapters``: ``A`` from the principal directions
                of each layer's inputs, ranks redistributed by explained variance.
CorDA           :func:`corda_init` -> ``(new_params, adapters)``: SVD of ``W·C`` with
                ``C`` the input covariance (:func:`corda_covariances`).
LoftQ           :func:`loftq_init` -> ``(new_params, adapters)``: a quantized base and
                adapters chosen together, so ``Q + s·A@B`` starts close to ``W``.
==============  =====================================================================

A variant (how an adapter is initialised, merged and applied in the factored transform)
is a :class:`Variant` registered by name with :func:`register_variant`; ``jlora.init``,
``merge`` and ``jlora.lora`` ask the adapter's variant and know no variant themselves.
Inits are independent of variants: any init works with any variant.

Every init works under any scaling policy: the scale is applied exactly where PEFT
applies it, so the adapted model equals the original one at init. Inits that change
the frozen base return the new base; nothing is mutated. All of them work on the
kernel's matrix view, so a kernel may store its axes in any order (see
:mod:`jlora.layouts`).

Example:
  >>> import jax, jax.numpy as jnp, jlora
  >>> params = {"dense": {"kernel": jax.random.normal(jax.random.key(1), (8, 6))}}
  >>> config = jlora.LoraConfig(rank=2, scaling="rslora", init="pissa", variant="dora")
  >>> base, adapters = jlora.variants.pissa_init(jax.random.key(0), params, config)
  >>> sorted(adapters)
  ['dense/kernel']
"""

from jlora._initializers import init_variant_arrays as init_variant_arrays
from jlora._initializers import orthogonal_factors as orthogonal_factors
from jlora._variant import Variant as Variant
from jlora._variant import get_variant as get_variant
from jlora._variant import register_variant as register_variant
from jlora._variant import variant_names as variant_names
from jlora.variants._common import randomized_svd as randomized_svd
from jlora.variants._corda import corda_covariances as corda_covariances
from jlora.variants._corda import corda_init as corda_init
from jlora.variants._dora import DoRA as DoRA
from jlora.variants._dora import dora_merged_kernel as dora_merged_kernel
from jlora.variants._dora import dora_norm as dora_norm
from jlora.variants._eva import eva_init as eva_init
from jlora.variants._eva import ipca_step as ipca_step
from jlora.variants._loftq import loftq_init as loftq_init
from jlora.variants._svd_inits import olora_init as olora_init
from jlora.variants._svd_inits import pissa_init as pissa_init

__all__ = [
    "DoRA",
    "Variant",
    "corda_covariances",
    "corda_init",
    "dora_merged_kernel",
    "dora_norm",
    "eva_init",
    "get_variant",
    "init_variant_arrays",
    "ipca_step",
    "loftq_init",
    "olora_init",
    "orthogonal_factors",
    "pissa_init",
    "randomized_svd",
    "register_variant",
    "variant_names",
]
