"""LoftQ (Li et al. 2023, arXiv 2310.08659): a quantized base and adapters made together.

QLoRA quantizes ``W`` and starts the adapter at zero, so training starts from the
quantization error. LoftQ chooses the quantized base ``Q`` and the factors so that
``Q + s·A@B`` is close to ``W``, alternating ``T`` times (``A₀ B₀ = 0``)::

    Q_t        = quantize(W - s·A_{t-1} B_{t-1})
    s·A_t B_t  = the rank-r SVD of W - dequantize(Q_t)

and returns ``Q_T`` (a :class:`jlora.quantization.QuantizedKernel`) as the new frozen
base with ``A_T``, ``B_T``. These are exactly PEFT's ``loftq_init`` steps (the last
iteration quantizes and decomposes, nothing more), on the kernel's matrix view (any axis
order, stacked layers each on their own) with the factors split as PEFT splits them
(``lora_A = sqrt(S_r) Vh_r``, ``lora_B = U_r sqrt(S_r)``) and, unlike PEFT, divided by
``sqrt(s)`` each, so ``s·A@B`` is the SVD part under any ``alpha`` and policy (PEFT's
factors are not scaled: its adapted model is ``Q + s·L R``, the intended ``Q + L R``
only when ``s = 1``).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jlora import _paths as paths_lib
from jlora import quantization as quant_lib
from jlora._config import LoraConfig
from jlora._initializers import init_variant_arrays, plan
from jlora.layouts import Layout
from jlora.quantization._scheme import get_scheme
from jlora.variants._common import (
    check_config,
    factors_from_matrices,
    kernel_matrix,
    make_adapter,
    matmul,
    replace_leaves,
)
from jlora.variants._svd_inits import _pissa_factors

__all__ = ["loftq_init"]

# PEFT's loftq_bits: 4 is bitsandbytes' NF4 (blocks of 64, float32 block scales), 8 its
# Int8Params (int8 per output channel): jlora's "nf4" and "int8" schemes.
SCHEME_OF_BITS = {4: "nf4", 8: "int8"}


def _scheme(loftq_bits, scheme) -> str:
    if scheme is None:
        if loftq_bits is None:
            loftq_bits = 4
        if loftq_bits not in SCHEME_OF_BITS:
            raise ValueError(
                f"`loftq_bits` must be one of {sorted(SCHEME_OF_BITS)} (as PEFT's LoftQ: NF4 "
                f"or int8), got {loftq_bits!r}; for another format pass `scheme=` (one of "
                f"{quant_lib.SCHEMES})."
            )
        return SCHEME_OF_BITS[loftq_bits]
    bits = get_scheme(scheme).bits
    if loftq_bits is not None and loftq_bits != bits:
        raise ValueError(f"`loftq_bits={loftq_bits!r}` contradicts `scheme={scheme!r}`, which "
                         f"stores {bits} bits per weight; give one or the other.")
    return scheme


@functools.partial(jax.jit, static_argnames=(
    "layout", "rank", "scale", "scheme", "block_size", "double_quant", "iters", "dtype"))
def _loftq(w, *, layout: Layout, rank: int, scale: float, scheme: str, block_size,
           double_quant: bool, iters: int, dtype):
    shape = tuple(w.shape)
    w2 = kernel_matrix(w, layout)

    def step(target):  # quantize the target, then factor what the base misses of W
        qk = quant_lib.quantize(layout.from_matrix(target, shape), scheme, layout=layout,
                                block_size=block_size, double_quant=double_quant)
        residual = w2 - kernel_matrix(qk.dequantized(), layout)
        a2, b2 = _pissa_factors(None, residual, rank=rank, scale=scale, niter=None)
        return qk, a2.astype(dtype), b2.astype(dtype)  # the next step sees them as stored

    target = w2
    for _ in range(iters - 1):
        _, a2, b2 = step(target)
        target = w2 - scale * matmul(a2.astype(jnp.float32), b2.astype(jnp.float32))
    qk, a2, b2 = step(target)
    return dataclasses.replace(qk, dtype=np.dtype(w.dtype)), a2, b2


def loftq_init(key, params, config: LoraConfig, *, loftq_bits: int | None = None,
               loftq_iter: int = 1, scheme: str | None = None, block_size: int | None = None,
               double_quant: bool = False):
    """LoftQ: adapters and a quantized base such that ``Q + s·A@B`` starts close to ``W``.

    PEFT's ``LoraConfig(init_lora_weights="loftq", loftq_config=LoftQConfig(loftq_bits=4,
    loftq_iter=1))`` is ``loftq_init(key, params, LoraConfig(init="loftq"),
    loftq_bits=4, loftq_iter=1)``.

    Args:
      key: unused (LoftQ is deterministic; None is fine); kept so every init has the
        same signature.
      params: the parameter pytree with float kernels; not modified.
      config: a :class:`jlora.LoraConfig` (``init`` ``"loftq"`` or ``"default"``), any
        scaling policy.
      loftq_bits: PEFT's ``loftq_bits``: 4 (NF4, the default) or 8 (int8 per output
        channel), the formats PEFT's LoftQ uses.
      loftq_iter: PEFT's ``loftq_iter``: alternations of quantizing and decomposing
        (``>= 1``; 1 by default, as PEFT; more bring ``Q + s·A@B`` closer to ``W``).
      scheme: instead of ``loftq_bits``, any :mod:`jlora.quantization` scheme
        (``"int4"``, ``"fp8"``, ...), with its ``block_size`` and ``double_quant``.
      block_size, double_quant: as for :func:`jlora.quantization.quantize`.

    Returns:
      ``(new_params, adapters)``: ``new_params`` holds a ``QuantizedKernel`` at each
      adapted kernel (the other leaves as they were; quantize those with
      ``jlora.quantization.quantize_params(..., exclude=...)`` if wanted). With
      ``variant="dora"`` the magnitudes are the norms of ``Q + s·A@B``, as PEFT's.

    Example:
      >>> import jax, jax.numpy as jnp, jlora
      >>> w = jax.random.normal(jax.random.key(1), (128, 64))
      >>> config = jlora.LoraConfig(rank=8, init="loftq")
      >>> base, ads = jlora.variants.loftq_init(None, {"kernel": w}, config, loftq_iter=2)
      >>> jlora.quantization.is_quantized(base["kernel"])
      True
      >>> plain = jlora.quantization.dequantize(jlora.quantization.quantize(w, "nf4"))
      >>> err = lambda v: float(jnp.linalg.norm(v - w))
      >>> bool(err(jlora.merge(base, ads)["kernel"]) < err(plain))
      True
    """
    check_config(config, "loftq")
    if isinstance(loftq_iter, bool) or not isinstance(loftq_iter, int) or loftq_iter < 1:
        raise ValueError(f"`loftq_iter` must be an int >= 1, got {loftq_iter!r}.")
    name = _scheme(loftq_bits, scheme)
    planned = plan(params, config)
    flat = paths_lib.select(params, ".*", allow_empty=True)
    dtype = jnp.dtype(config.dtype)
    new_kernels, adapters = {}, {}
    for path, entry in planned.items():
        kernel = flat[path]
        if quant_lib.is_quantized(kernel):
            raise ValueError(
                f"loftq_init: the kernel at path {path!r} is already quantized "
                f"({kernel.scheme}); LoftQ quantizes the float kernel itself. Pass the float "
                "params, or leave this kernel out with `exclude`."
            )
        qk, a2, b2 = _loftq(kernel, layout=entry.layout, rank=entry.rank, scale=entry.scale,
                            scheme=name, block_size=block_size, double_quant=double_quant,
                            iters=loftq_iter, dtype=dtype)
        a, b = factors_from_matrices(a2, b2, entry.layout, kernel.shape, dtype)
        new_kernels[path] = qk
        adapters[path] = make_adapter(a, b, entry, config)
    new_params = replace_leaves(params, new_kernels)
    return new_params, init_variant_arrays(new_params, adapters)
