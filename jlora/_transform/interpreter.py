"""The evaluation loop: a jaxpr re-emitted equation by equation, adapted kernels factored.

An equation none of whose operands is a :class:`~jlora._transform.factored.Factored`
value is bound as it is. Otherwise the loop looks its primitive up in one registry,
:data:`RULES`, filled by :func:`register` next to each rule's body (``moves.py``,
``dot.py``, ``consumers.py``, ``control_flow.py``, ``quantized.py``); the loop itself
knows nothing about any single primitive. A rule that cannot keep the kernel factored
raises :class:`~jlora._transform.factored.Unsupported`, and the loop forms
``W + s·A·B`` there instead (recorded in the report, with the reason).

Extensions plug in without fields here:

* operand hooks (:func:`operand_hook`) see every equation with a factored operand before
  its rule, and may answer it or change its operands (quantized kernels: ``quantized.py``);
* per-interpreter state (:meth:`Interpreter.local`): an extension's own object per
  (sub-)jaxpr; objects with ``flush``/``absorb`` have what they gathered inside a
  ``scan`` or ``checkpoint`` body returned through it (input collection: ``collect.py``);
* per-call state lives in :class:`Run` (the report, dropout's keys and use counts);
* a rule may answer later equations of the same jaxpr ahead of time
  (:meth:`Interpreter.settle_ahead`; shared-input fusion: ``fusion.py``).

Example:
  >>> import jlora._transform  # imports every rule module, which registers its rules
  >>> from jlora import _jax_compat as jc
  >>> RULES[jc.dot_general_p].kind, RULES[jc.transpose_p].kind, RULES[jc.scan_p].kind
  ('consumer', 'array', 'carry')
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from jlora import _jax_compat as jc
from jlora._transform.dropout import Dropout
from jlora._transform.factored import Factored, Unsupported

FACTORED = "factored"
UNUSED = "unused"

# How a rule treats a kernel's W, for extensions whose W is not an array yet:
#   array     needs W as an array: moves re-bind the equation on W, others form the kernel
#             (equations without a rule are treated so)
#   identity  returns the value unchanged
#   recast    changes only the dtype the program sees, never W
#   consumer  reads W only through factored.bind_with_kernel
#   carry     takes every kind of factored value as it is (control flow into sub-jaxprs;
#             quantized.py's `dequantize`, which assembles a kernel from its arrays)
KINDS = ("array", "identity", "recast", "consumer", "carry")


@dataclasses.dataclass(frozen=True)
class Rule:
    """``fn(interp, eqn, invals) -> outvals`` for one primitive, and its ``kind``."""

    fn: Callable
    kind: str


RULES: dict[Any, Rule] = {}
OPERAND_HOOKS: list[Callable] = []


def register(*primitives, kind: str) -> Callable:
    """Decorator: ``fn`` is the rule for ``primitives`` (None entries, primitives this
    JAX release lacks, are skipped)."""
    if kind not in KINDS:
        raise ValueError(f"`kind` must be one of {KINDS}, got {kind!r}.")

    def decorate(fn):
        for p in primitives:
            if p is not None:
                RULES[p] = Rule(fn, kind)
        return fn

    return decorate


def operand_hook(fn: Callable) -> Callable:
    """Decorator: ``fn(interp, eqn, rule, invals) -> (outvals or None, invals)`` runs
    before the rule of every equation with a factored operand (``rule`` may be None)."""
    OPERAND_HOOKS.append(fn)
    return fn


@dataclasses.dataclass
class Run:
    """State shared by every (sub-)interpreter of one call of the transformed function."""

    custom_vjp: bool = False  # factored dots through jlora._factored_ops (see `lora`)
    fuse_shared_inputs: bool = False  # kernels dotted with the same input share x·[A|A'|..]
    dropout: Dropout = dataclasses.field(default_factory=Dropout)
    report: dict = dataclasses.field(default_factory=dict)

    def mark(self, path: str, status: str) -> None:
        if status == FACTORED:
            self.report.setdefault(path, FACTORED)
        elif self.report.get(path, FACTORED) == FACTORED:
            self.report[path] = status  # the first fallback reason is the one reported


def describe(eqn) -> str:
    """The equation's primitive and user source line, for report sentences."""
    where = jc.source_summary(eqn)
    return f"`{eqn.primitive.name}`" + (f" at {where}" if where else "")


@dataclasses.dataclass
class Frame:
    """A jaxpr being evaluated: the index of its current equation and its environment."""

    jaxpr: Any
    index: int
    env: dict


_STATE_TYPES: dict[str, type] = {}  # per-interpreter state classes, by name (see absorb)


class Interpreter:
    """Evaluates jaxprs under the current trace, rewriting equations on factored kernels."""

    def __init__(self, run: Run):
        self.run = run
        self.frames: list[Frame] = []  # innermost last
        self.ahead: dict = {}  # (id(jaxpr), equation index) -> outputs settled ahead
        self._local: dict[type, Any] = {}

    def sub(self) -> Interpreter:
        """An interpreter for a sub-jaxpr traced on its own (a scan, while or cond body)."""
        return Interpreter(self.run)

    def eval_jaxpr(self, jaxpr, consts, args) -> list:
        env: dict = {}

        def read(v):
            return v.val if isinstance(v, jc.Literal) else env[v]

        def write(v, val):
            if not isinstance(v, jc.DropVar):
                env[v] = val

        for v, x in zip(jaxpr.constvars, consts, strict=True):
            write(v, x)
        for v, x in zip(jaxpr.invars, args, strict=True):
            write(v, x)
        frame = Frame(jaxpr, 0, env)
        self.frames.append(frame)
        for i, eqn in enumerate(jaxpr.eqns):
            frame.index = i
            outs = self.ahead.pop((id(jaxpr), i), None)
            if outs is None:
                invals = [read(v) for v in eqn.invars]
                if any(isinstance(x, Factored) for x in invals):
                    outs = self.factored_eqn(eqn, invals)
                else:
                    outs = jc.bind_eqn(eqn, invals)
            for v, x in zip(eqn.outvars, outs, strict=True):
                write(v, x)
        self.frames.pop()
        return [read(v) for v in jaxpr.outvars]

    def factored_eqn(self, eqn, invals) -> list:
        rule = RULES.get(eqn.primitive)
        for hook in OPERAND_HOOKS:
            outs, invals = hook(self, eqn, rule, invals)
            if outs is not None:
                return outs
        if not any(isinstance(x, Factored) for x in invals):
            return jc.bind_eqn(eqn, invals)
        if rule is None:
            return self.fallback(eqn, invals)
        try:
            return rule.fn(self, eqn, invals)
        except Unsupported as e:
            return self.fallback(eqn, invals, str(e))

    def materialise(self, x, reason: str):
        """``x`` as the program sees it (a factored kernel formed, ``reason`` reported)."""
        return x.materialise(self.run, reason) if isinstance(x, Factored) else x

    def materialise_all(self, xs, reason: str) -> list:
        return [self.materialise(x, reason) for x in xs]

    def fallback(self, eqn, invals, why: str = "") -> list:
        reason = f"materialised: the kernel reaches {describe(eqn)}" + (f" ({why})" if why else "")
        return jc.bind_eqn(eqn, self.materialise_all(invals, reason))

    def settle_ahead(self, index: int, outs: list) -> None:
        """Outputs of the current jaxpr's equation ``index`` (a later one), computed now."""
        self.ahead[(id(self.frames[-1].jaxpr), index)] = outs

    def consumed(self, fv: Factored) -> None:
        """A consumer has rewritten one use of ``fv``."""
        self.run.dropout.used(fv.meta.path)
        if fv.adapted:
            self.run.mark(fv.meta.path, FACTORED)

    def local(self, cls):
        """This interpreter's instance of an extension's state class (made on first use)."""
        state = self._local.get(cls)
        if state is None:
            state = self._local[cls] = cls()
            _STATE_TYPES[cls.__qualname__] = cls
        return state

    def flush(self) -> dict:
        """What extensions gathered here, to return from a sub-jaxpr (then forgotten)."""
        return {type(s).__qualname__: s.flush() for s in self._local.values()
                if hasattr(s, "flush")}

    def absorb(self, flushed: dict) -> None:
        """Take over what a sub-interpreter flushed (as returned through its jaxpr)."""
        for name, value in flushed.items():
            self.local(_STATE_TYPES[name]).absorb(value)
