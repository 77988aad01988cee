"""Shared-input fusion: adapted kernels dotted with the same input in the same way.

Query, key and value (or gate and up) read one activation ``x``. When the first of
their dots is rewritten, the later ones of the same jaxpr whose kernels are already at
hand join it in one :func:`jlora._factored_ops.factored_dots`: one ``x·[A_q|A_k|A_v]``
forward and one ``xᵀ·[u_q|u_k|u_v]`` backward, reading ``x`` once. The later equations'
outputs are settled ahead (``Interpreter.settle_ahead``). Kernels with dropout, DoRA or a
quantized W are not fused. Enabled by ``jlora.lora(..., fuse_shared_inputs=True)``.
"""

from __future__ import annotations

import collections
import dataclasses

from jlora import _factored_ops as fops
from jlora import _jax_compat as jc
from jlora._transform import dot
from jlora._transform.factored import Factored


@dataclasses.dataclass
class DotReaders:
    """Per interpreter: for each jaxpr seen, which dot equations read each variable."""

    by_jaxpr: dict = dataclasses.field(default_factory=dict)  # id -> (jaxpr, {var: [index]})

    def of(self, jaxpr) -> dict:
        cached = self.by_jaxpr.get(id(jaxpr))
        if cached is None or cached[0] is not jaxpr:
            readers = collections.defaultdict(list)
            for j, e in enumerate(jaxpr.eqns):
                if e.primitive is jc.dot_general_p:
                    for v in e.invars:
                        if not isinstance(v, jc.Literal):
                            readers[v].append(j)
            cached = self.by_jaxpr[id(jaxpr)] = (jaxpr, readers)
        return cached[1]


def _fusable(peer, fv: Factored, peers) -> bool:
    return (isinstance(peer, Factored) and peer.adapted and peer.m is None
            and peer.keys is None and not peer.lazy and peer.roles == fv.roles
            and peer.meta.dtype == fv.meta.dtype and peer.w.dtype == fv.w.dtype
            and peer is not fv and all(p is not peer for _, p in peers))


def shared_input_peers(interp, plan: dot.DotPlan) -> list:
    """Later dots in this jaxpr that read the same input with another adapted kernel
    already at hand, in the same way (q, k, v; gate and up): ``[(index, kernel)]``."""
    eqn, fv = plan.eqn, plan.fv
    if not (interp.run.fuse_shared_inputs and interp.frames) or fv.keys is not None:
        return []
    frame = interp.frames[-1]
    k_pos = 0 if plan.kernel_is_lhs else 1
    x_var = eqn.invars[1 - k_pos]
    if isinstance(x_var, jc.Literal):
        return []
    peers = []
    for j in interp.local(DotReaders).of(frame.jaxpr).get(x_var, ()):
        other = frame.jaxpr.eqns[j]
        if j <= frame.index or other.params != eqn.params:
            continue
        k_var = other.invars[k_pos]
        if other.invars[1 - k_pos] is not x_var or isinstance(k_var, jc.Literal):
            continue
        peer = frame.env.get(k_var)
        if _fusable(peer, fv, peers):
            peers.append((j, peer))
    return peers


def emit_fused(interp, plan: dot.DotPlan) -> list | None:
    """The dot of ``plan`` and its peers as one ``factored_dots`` (None without peers)."""
    peers = shared_input_peers(interp, plan)
    if not peers:
        return None
    members = [(None, plan.fv), *peers]
    fvs = [fv for _, fv in members]
    ys: list = fops.factored_dots(
        plan.spec(), tuple(fv.meta.scale for fv in fvs), plan.x,
        [fv.w.astype(fv.meta.dtype) for fv in fvs],
        [getattr(fv, plan.g_field).astype(fv.meta.dtype) for fv in fvs],
        [getattr(fv, plan.h_field).astype(fv.meta.dtype) for fv in fvs],
    )
    for (j, fv), y in zip(members, ys, strict=True):
        interp.consumed(fv)  # (no dropout in a fused group, so the order is immaterial)
        if j is not None:
            interp.settle_ahead(j, [y])
    return [ys[0]]


dot.GROUP_EMITTERS.append(emit_fused)
