"""EVA (explained variance adaptation, Paischer et al. 2024, arXiv 2410.07170).

``A`` is initialised from the top right-singular vectors of each layer's (centered)
inputs, found by an incremental PCA over batches; ``B`` is zero, so the model starts
unchanged and the base is not touched. The ranks can then be redistributed across layers
by explained variance. This follows PEFT's ``get_eva_state_dict`` step by step:

1. each layer may keep up to ``round(rank·rho)`` components (capped at its fan-in);
   layers whose inputs are identical on the first batch (e.g. query/key/value) share one
   PCA;
2. per batch, each layer's PCA is updated (sklearn's ``IncrementalPCA.partial_fit``, with
   the mean-correction row and ``svd_flip`` signs), and a component counts as converged
   when its cosine similarity to the previous step's is ``>= tau``; a layer stops being
   fed once the components its current rank needs have converged;
3. after each batch the total rank budget ``Σ rank`` is handed out to the largest
   explained-variance ratios over all layers (``rho=1`` keeps every layer at its rank);
4. ``A = components[:rank]ᵀ`` (divided by ``sqrt`` of the singular values if ``whiten``);
   layers given rank 0 get no adapter; with ``adjust_scaling_factors`` a layer whose rank
   changed gets ``alpha·new_rank/rank``, and its scale is the config's policy applied to
   the new rank and alpha.

Unlike PEFT, which cycles its dataloader until every layer converges, the batches are
used once: if they run out first, a warning names the layers still unconverged and the
PCA of all the data seen is used.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections import Counter
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jlora import scaling as scaling_lib
from jlora._adapter import Adapters
from jlora._config import LoraConfig
from jlora._initializers import init_variant_arrays, kernel_key, plan
from jlora.variants._common import (
    check_config,
    check_layouts,
    factors_from_matrices,
    make_adapter,
    randomized_svd,
)
from jlora.variants._data import fan_in_sizes, input_batches

__all__ = ["eva_init"]


class IpcaState(NamedTuple):
    """An incremental PCA's state after some batches (PEFT's ``IncrementalPCA`` fields)."""

    components: jax.Array  # (k, d), rows are right-singular vectors
    singular_values: jax.Array  # (k,)
    mean: jax.Array  # (d,)
    var: jax.Array  # (d,)
    n_seen: jax.Array  # () float32
    explained_variance_ratio: jax.Array  # (k,)


@functools.partial(jax.jit, static_argnames=("k", "niter"))
def ipca_step(state: IpcaState | None, x: jax.Array, key: jax.Array, *, k: int,
              niter: int | None = None) -> IpcaState:
    """One ``partial_fit`` of an incremental PCA keeping ``k`` components.

    ``state=None`` starts a new PCA. ``niter=None`` uses an exact SVD, an int a randomized
    one with ``2k`` directions and ``niter`` power iterations (PEFT's ``lowrank=True``).
    After every batch of a stream, the components equal those of one PCA over all rows
    seen when ``k`` is the full rank (sklearn's guarantee); otherwise they approximate it.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> x = jax.random.normal(jax.random.key(0), (32, 4))
      >>> st = ipca_step(None, x[:16], jax.random.key(1), k=2)
      >>> ipca_step(st, x[16:], jax.random.key(1), k=2).components.shape
      (2, 4)
    """
    x = x.astype(jnp.float32)
    n = jnp.float32(x.shape[0])
    # Incremental mean and variance (sklearn's _incremental_mean_and_var).
    new_sum = jnp.sum(x, axis=0)
    centered = x - (new_sum / n)[None, :]
    new_unnorm_var = jnp.sum(jnp.square(centered), axis=0)
    new_unnorm_var = new_unnorm_var - jnp.square(jnp.sum(centered, axis=0)) / n
    if state is None:
        total = n
        mean = new_sum / n
        var = new_unnorm_var / n
        data = x - mean[None, :]
    else:
        last_n = state.n_seen
        total = last_n + n
        last_sum = state.mean * last_n
        mean = (last_sum + new_sum) / total
        last_over_new = last_n / n
        unnorm = (state.var * last_n + new_unnorm_var
                  + last_over_new / total * jnp.square(last_sum / last_over_new - new_sum))
        var = unnorm / total
        batch_mean = jnp.mean(x, axis=0)
        correction = jnp.sqrt(last_n / total * n) * (state.mean - batch_mean)
        data = jnp.concatenate([
            state.singular_values[:, None] * state.components,
            x - batch_mean[None, :],
            correction[None, :],
        ])
    if niter is None:
        _, s, vt = jnp.linalg.svd(data, full_matrices=False)
    else:
        _, s, vt = randomized_svd(key, data, k, niter, oversample=k)
    # svd_flip(u_based_decision=False): the largest-magnitude entry of each row positive.
    pick = jnp.take_along_axis(vt, jnp.argmax(jnp.abs(vt), axis=1)[:, None], axis=1)
    vt = vt * jnp.where(pick < 0, -1.0, 1.0)
    evr = jnp.square(s) / jnp.sum(var * total)
    return IpcaState(vt[:k], s[:k], mean, var, total, evr[:k])


def _rank_distribution(evr: dict, group_of: dict, max_components: dict, budget: int) -> dict:
    """Hand the rank budget to the largest explained-variance ratios over all layers.

    Ties keep the layers' order (a stable sort), so of layers sharing one PCA the first
    gets at least the rank of the others, as PEFT ensures by swapping.
    """
    keys, values = [], []
    for path, hook in group_of.items():
        ratios = evr[hook][: max_components[path]]
        keys.extend([path] * len(ratios))
        values.extend(ratios.tolist())
    order = np.argsort(-np.asarray(values, np.float64), kind="stable")
    counts = Counter(keys[i] for i in order[:budget])
    return {path: counts.get(path, 0) for path in group_of}


def _groups_of_equal_inputs(first: dict) -> dict:
    """``{path: hook path}``: layers whose first-batch inputs are identical share one PCA."""
    group_of, seen = {}, []
    for path, x in first.items():
        host = np.asarray(x)
        for hook, hx in seen:
            if hx.shape == host.shape and np.array_equal(hx, host):
                group_of[path] = hook
                break
        else:
            seen.append((path, host))
            group_of[path] = path
    return group_of


def eva_init(
    key: jax.Array,
    params,
    config: LoraConfig,
    inputs=None,
    *,
    fn=None,
    batches=None,
    rho: float = 2.0,
    tau: float = 0.99,
    whiten: bool = False,
    adjust_scaling_factors: bool = True,
    niter: int | None = None,
) -> Adapters:
    """EVA: ``A`` from the principal directions of each layer's inputs, ``B`` zero.

    Runs eagerly (the convergence checks are data-dependent); each PCA step is jitted.

    Args:
      key: a JAX random key, used by randomized SVDs only (None is fine otherwise).
      params: the parameter pytree; not modified (EVA leaves the base alone).
      config: a :class:`jlora.LoraConfig` (``init`` ``"eva"`` or ``"default"``); its
        ``rank``/``rank_pattern`` set the rank budget. Dense and conv kernels only (for a
        conv the inputs are patches, ``window x in`` wide); not embeddings or stacked
        kernels.
      inputs: precomputed layer inputs: ``{path: (N, fan_in)}`` or an iterable of such
        mappings, one per batch.
      fn, batches: instead of ``inputs``: ``fn(params, batch)`` is traced once per batch
        and each kernel's input read by ``jlora.collect_inputs``.
      rho: ``>= 1``; a layer may get up to ``round(rank·rho)`` ranks. ``1`` disables
        redistribution.
      tau: cosine-similarity threshold in ``[0, 1]`` for a component to count as converged.
      whiten: divide each component by the square root of its singular value.
      adjust_scaling_factors: scale alpha by ``new_rank/rank`` where the rank changed.
      niter: ``None`` for exact SVDs, an int for randomized ones (as PEFT's EVA).

    Returns:
      ``{path: Adapter}``; layers redistributed to rank 0 are left out.

    Example:
      >>> import jax, jax.numpy as jnp, jlora
      >>> params = {"dense": {"kernel": jnp.zeros((6, 4))}}
      >>> x = jax.random.normal(jax.random.key(1), (64, 6))
      >>> ads = jlora.variants.eva_init(jax.random.key(0), params,
      ...                               jlora.LoraConfig(rank=2, init="eva"),
      ...                               inputs={"dense/kernel": x})
      >>> ads["dense/kernel"].a.shape, float(jnp.abs(ads["dense/kernel"].b).max())
      ((6, 2), 0.0)
    """
    check_config(config, "eva")
    if not (isinstance(rho, int | float) and not isinstance(rho, bool) and rho >= 1.0):
        raise ValueError(f"`rho` must be a number >= 1.0, got {rho!r}.")
    if not (isinstance(tau, int | float) and not isinstance(tau, bool) and 0.0 <= tau <= 1.0):
        raise ValueError(f"`tau` must be a number in [0, 1], got {tau!r}.")
    if niter is not None and not (isinstance(niter, int) and niter >= 0):
        raise ValueError(f"`niter` must be None (exact SVD) or an int >= 0, got {niter!r}.")
    if key is None:
        if niter is not None:
            raise ValueError("`niter` (randomized SVDs) needs a random `key`, got key=None.")
        key = jax.random.key(0)  # unused by exact SVDs; ipca_step takes one either way
    planned = plan(params, config)
    check_layouts(planned, "eva", stacked_ok=False, embed_ok=False)
    fan_in = fan_in_sizes(planned)
    if rho > 1000:  # PEFT's ceiling for very large rho
        max_dim = max(max(getattr(x, "shape", ()) or (0,)) for x in jax.tree.leaves(params))
        rho = min(rho, max_dim // config.rank)
    max_components = {p: min(round(e.rank * rho), fan_in[p]) for p, e in planned.items()}
    budget = sum(e.rank for e in planned.values())

    stream = input_batches(params, planned, inputs=inputs, fn=fn, batches=batches,
                           init_name="eva")
    group_of, states, converged, k_of = None, {}, {}, {}
    rank_dist = dict(max_components)
    all_converged, n_batches = False, 0
    for batch in stream:
        if group_of is None:
            group_of = _groups_of_equal_inputs(batch)
            for hook in set(group_of.values()):
                members = [p for p, h in group_of.items() if h == hook]
                k_of[hook] = max(max_components[p] for p in members)
                for p in members:
                    max_components[p] = k_of[hook]
                states[hook] = None
                converged[hook] = np.zeros(k_of[hook], bool)
        active = []
        for hook in states:
            need = max(rank_dist[p] for p, h in group_of.items() if h == hook)
            if not converged[hook][:need].all():
                active.append(hook)
        if not active:
            all_converged = True
            break
        n_batches += 1
        for hook in active:
            x, k = batch[hook], k_of[hook]
            if x.shape[0] < k:  # PEFT skips a batch with fewer rows than components
                continue
            prev = states[hook]
            states[hook] = ipca_step(prev, x, kernel_key(key, hook), k=k, niter=niter)
            if prev is not None:
                sim = jnp.sum(states[hook].components * prev.components, axis=1)
                converged[hook] = np.asarray(sim >= tau)
        if all(s is not None for s in states.values()):
            evr = {h: np.asarray(s.explained_variance_ratio) for h, s in states.items()}
            rank_dist = _rank_distribution(evr, group_of, max_components, budget)
    if group_of is None:
        raise ValueError("`init='eva'` got no batches of layer inputs.")
    for hook, state in states.items():
        if state is None:
            raise ValueError(
                f"`init='eva'`: no batch had at least {k_of[hook]} rows of inputs for the "
                f"kernel at path {hook!r}, so its PCA never started: give bigger batches."
            )
    if not all_converged:
        # Re-check with the final distribution: the loop may have ended on exhaustion.
        late = [h for h in states
                if not converged[h][: max(rank_dist[p] for p, g in group_of.items() if g == h)]
                .all()]
        if late and n_batches > 1:
            warnings.warn(
                f"EVA ran out of batches after {n_batches} before the components of {late} "
                f"converged (tau={tau}); using the PCA of all inputs seen. Give more batches "
                "or lower `tau`.",
                stacklevel=2,
            )

    dtype = jnp.dtype(config.dtype)
    adapters = {}
    for path, entry in planned.items():
        rank = rank_dist[path]
        if rank == 0:
            continue
        state = states[group_of[path]]
        u = state.components[:rank]
        if whiten:
            u = u / jnp.sqrt(state.singular_values[:rank])[:, None]
        layout, shape = entry.layout, entry.shape
        n_out = math.prod(layout.split_shape(shape)[2])
        a, b = factors_from_matrices(u.T, jnp.zeros((rank, n_out)), layout, shape, dtype)
        alpha = entry.alpha
        if rank != entry.rank and adjust_scaling_factors:
            alpha = alpha * rank / entry.rank
        scale = scaling_lib.compute_scale(config._policy, rank, alpha, path=path)
        adapters[path] = make_adapter(a, b, entry, config, rank=rank, alpha=alpha, scale=scale)
    return init_variant_arrays(params, adapters)
