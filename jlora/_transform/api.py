"""The public entry points: :func:`lora`, :func:`lora_report`, :func:`collect_inputs`.

Each traces ``fn`` (``jlora/_tracing.py``), enters the adapted kernels as factored values
(``entry.py``, ``quantized.py``) and evaluates the jaxpr with the interpreter
(``interpreter.py`` and the rules it has registered).
"""

from __future__ import annotations

import collections
import functools
import warnings
from collections.abc import Callable

import jax

from jlora import _layout_inference
from jlora._adapter import Adapters
from jlora._merging import check_adapters_fit
from jlora._tracing import Traced, abstract_call, trace
from jlora._transform import quantized
from jlora._transform.collect import Collector, layouts_for
from jlora._transform.dropout import Dropout, dropout_rng
from jlora._transform.entry import enter_kernel
from jlora._transform.interpreter import FACTORED, UNUSED, Interpreter, Run
from jlora.layouts import Layout


class FactoredFallbackWarning(UserWarning):
    """An adapted kernel reached an operation the factored transform cannot rewrite, or a
    quantized kernel one that needs it whole (not a dot, convolution or gather).

    The result is still exact: ``W + s·A·B`` is formed at that point, as ``merge`` would
    (a quantized kernel is dequantized whole there). Raised at most once per kernel path
    and transformed function.
    """


def _fallback_message(path: str, status: str, adapted: bool) -> str:
    if adapted:
        return (f"jlora.lora: the adapted kernel at path {path!r} is {status}; W + s·A·B is "
                "formed there (the result is still exact). jlora.lora_report(...) lists every "
                "such path.")
    return (f"jlora.lora: the quantized kernel at path {path!r} is {status}; it is dequantized "
            "whole there (the result is still exact, but the float kernel is formed there and "
            "may be kept for the backward pass, whereas dots, convolutions and gathers "
            "dequantize it one use, or one layer, at a time).")


def evaluate(traced: Traced, values, consts, adapters, run: Run, layouts=None):
    """Evaluate ``traced`` with the listed kernels factored: ``(outputs, interpreter)``.

    ``adapters`` maps paths to adapters; ``layouts`` (collect mode) maps paths to the
    layouts of kernels to watch without adapters.
    """
    interp = Interpreter(run)
    kernels = quantized.enter_kernels(traced, values, adapters, run, layouts)
    entered = []
    for x, path, part in zip(values, traced.param_paths, traced.param_parts, strict=True):
        if part is not None:
            x = quantized.Part.of(kernels[path], x, part)
        elif path in kernels:  # a whole quantized kernel, where the jaxpr has its float kernel
            x = kernels[path]
        elif path is not None and path in adapters:
            x = enter_kernel(path, x, adapters[path], adapters[path].layout, run)
        elif path is not None and layouts and path in layouts:
            x = enter_kernel(path, x, None, layouts[path], run)
        entered.append(x)
    outs = interp.eval_jaxpr(traced.closed.jaxpr, consts, entered)
    outs = interp.materialise_all(outs, "materialised: the kernel is returned by the function")
    return jax.tree_util.tree_unflatten(traced.out_tree, outs), interp


def check_guesses(traced: Traced, layouts: dict[str, Layout]) -> None:
    """Check each layout guessed from a shape (``Layout.guessed``) against the model's own
    use of the kernel: a contradiction is a :class:`~jlora.layouts.LayoutError` naming the
    path, the guess, the use and the fix, never a silently transposed update. Done once
    per traced signature and set of guesses."""
    guessed = {path: lay for path, lay in layouts.items() if lay.guessed}
    key = frozenset((path, lay.axes) for path, lay in guessed.items())
    if not guessed or key in traced.checked:
        return
    # A quantized kernel traced as its arrays is not the kernel the guess describes (a
    # quantized kernel traced whole is: the jaxpr has its float kernel).
    paths = [None if part else path
             for path, part in zip(traced.param_paths, traced.param_parts, strict=True)]
    _layout_inference.check_guessed_layouts(traced.closed, paths, guessed)
    traced.checked.add(key)


def _layouts_of(adapters: Adapters) -> dict[str, Layout]:
    return {path: adapter.layout for path, adapter in adapters.items()}


def _check_fn(fn) -> None:
    if not callable(fn):
        raise TypeError(f"`fn` must be a callable fn(params, *args), got {type(fn).__name__}.")


def lora(fn: Callable, *, deterministic: bool | None = None, custom_vjp: bool = True,
         fuse_shared_inputs: bool = True) -> Callable:
    """Transform ``fn(params, *args, **kwargs)`` into ``g(params, adapters, *args, **kwargs)``.

    ``g`` returns ``fn(jlora.merge(params, adapters), *args, **kwargs)`` (and so do its
    gradients), computed with each adapted kernel kept factored: ``x·W + s·((x·A)·B)``.
    ``g`` composes with ``jax.jit``, ``grad``, ``vmap`` and ``checkpoint``; ``fn`` is traced
    once per input signature (array leaves' shapes and dtypes plus non-array leaves' values;
    non-array leaves such as Python bools stay static, as in a plain call of ``fn``).

    ``params`` may hold quantized kernels (:mod:`jlora.quantization`) where ``fn`` reads
    float kernels: ``fn`` is traced on each one's float shape and dtype, and the kernel is
    dequantized only where a dot, convolution or gather consumes it (under
    ``jax.checkpoint``, one layer at a time under ``scan``), adapted or not; so
    ``g(qparams, {}, x)`` runs the quantized model.

    Dropout (adapters with ``dropout > 0``, PEFT's ``lora_dropout``): ``g`` takes the key
    as ``lora_rng=key`` and drops the input of each ``A·B`` branch only. Without a key it
    is the identity (evaluation). ``lora_deterministic=True`` forces evaluation, and
    ``lora_deterministic=False`` (or ``deterministic=False`` here, the per-call value
    wins) declares training: a missing ``lora_rng`` is then a ``ValueError`` instead of
    silently training without dropout.

    Args:
      fn: any JAX function whose first argument is a parameter pytree (a linen ``apply``,
        a function that calls ``nnx.merge(graphdef, state)``, plain JAX).
      deterministic: the default for ``lora_deterministic`` (see above).
      custom_vjp: compute each factored dot's backward pass by hand
        (``jlora/_factored_ops.py``: same values, laid out for XLA, keeps ``x·A`` instead
        of extra copies); faster train steps. ``False`` leaves the derivative to JAX,
        which forward-mode differentiation (``jax.jvp``, ``jax.jacfwd``) needs.
      fuse_shared_inputs: with ``custom_vjp``, adapted kernels dotted with the same input
        in the same way (query, key and value; gate and up) share one ``x·[A_q|A_k|A_v]``
        matmul forward and one ``xᵀ·[u_q|u_k|u_v]`` backward, reading ``x`` once (not for
        kernels with dropout or DoRA).

    Returns:
      ``g(params, adapters, *args, lora_rng=None, lora_deterministic=None, **kwargs)``.

    Example:
      >>> import jax, jax.numpy as jnp, jlora
      >>> params = {"w": jnp.ones((3, 2))}
      >>> ads = jlora.init(jax.random.key(0), params, jlora.LoraConfig(rank=1, targets="w"))
      >>> g = jlora.lora(lambda p, x: jnp.tanh(x @ p["w"]))
      >>> grads = jax.grad(lambda a: g(params, a, jnp.ones((4, 3))).sum())(ads)
      >>> grads["w"].a.shape
      (3, 1)
    """
    _check_fn(fn)
    if not (deterministic is None or isinstance(deterministic, bool)):
        raise TypeError(f"`deterministic` must be True, False or None, got {deterministic!r}.")
    cache: collections.OrderedDict = collections.OrderedDict()
    warned: set[str] = set()

    def interpret(traced, values, consts, adapters, rng):
        # Runs when jax.jit traces it: once per signature, so the warnings come once too.
        run = Run(custom_vjp=custom_vjp, fuse_shared_inputs=custom_vjp and fuse_shared_inputs,
                  dropout=Dropout(rng=rng))
        out, _ = evaluate(traced, values, consts, adapters, run)
        for path, status in run.report.items():
            if status != FACTORED and path not in warned:
                warned.add(path)
                warnings.warn(_fallback_message(path, status, path in adapters),
                              FactoredFallbackWarning, stacklevel=2)
        return out

    @functools.wraps(fn)
    def transformed(params, adapters: Adapters, *args, lora_rng=None, lora_deterministic=None,
                    **kwargs):
        check_adapters_fit(params, adapters)
        rng = dropout_rng(adapters, lora_rng, lora_deterministic, deterministic)
        traced, values = trace(fn, cache, params, args, kwargs)
        check_guesses(traced, _layouts_of(adapters))
        if traced.jitted is None:
            # fn is a jaxpr now, so interpreting it under jit changes no semantics; it saves
            # compiling every primitive separately when called outside jit, and under an
            # outer jit it is inlined.
            traced.jitted = jax.jit(functools.partial(interpret, traced))
        return traced.jitted(values, list(traced.closed.consts), adapters, rng)

    # Keep fn's name and docstring but our own signature (jax.jit's static_argnames and
    # inspect read the signature through __wrapped__).
    del transformed.__wrapped__
    return transformed


def lora_report(fn: Callable, params, adapters: Adapters, *args, **kwargs) -> dict[str, str]:
    """Which adapted kernels ``jlora.lora(fn)`` keeps factored, and why the others are not.

    Traces ``fn`` on shapes only (nothing is computed). Each adapter path maps to
    ``"factored"`` (every use rewritten), ``"unused"`` (the kernel reaches no consumer) or
    a sentence starting ``"materialised: ..."`` naming the operation and source line where
    ``W + s·A·B`` had to be formed.

    Example:
      >>> import jax, jax.numpy as jnp, jlora
      >>> params = {"w": jnp.ones((3, 2)), "v": jnp.ones((3, 2))}
      >>> ads = jlora.init(jax.random.key(0), params, jlora.LoraConfig(rank=1, targets="w|v"))
      >>> rep = jlora.lora_report(lambda p, x: x @ p["w"] + (x @ (2 * p["v"])), params, ads,
      ...                         jnp.ones((4, 3)))
      >>> rep["w"], rep["v"].split(":")[0]
      ('factored', 'materialised')
    """
    _check_fn(fn)
    check_adapters_fit(params, adapters)
    run = Run()

    def body(p, a, kw):
        traced, values = trace(fn, None, p, a, kw)
        check_guesses(traced, _layouts_of(adapters))
        return evaluate(traced, values, traced.closed.consts, adapters, run)[0]

    abstract_call(body, params, args, kwargs)
    return {path: run.report.get(path, UNUSED) for path in adapters}


def collect_inputs(fn: Callable, params, paths, *args, **kwargs) -> dict:
    """The input activations reaching each listed kernel, from one run of ``fn``.

    Runs ``fn(params, *args, **kwargs)`` once through the factored transform's interpreter
    (no adapters) and returns, per path, the rows ``x`` that were multiplied with the
    kernel, flattened over batch/sequence: ``(N, fan_in)`` with the fan-in axes in the
    kernel's own order (so ``x @ W.reshape(fan_in, -1)`` is what the model computed). A
    kernel consumed several times contributes all its inputs (concatenated along ``N``);
    a stacked kernel (``"s..."`` layouts, ``nn.scan``) gives ``(*stacked, N, fan_in)``, one
    set of inputs per layer; a conv filter gives its input patches, ``(N, window x in)``
    in the kernel's fan-in order (as PEFT flattens conv weights). This is what EVA and
    CorDA need for their input statistics.

    Args:
      fn: the model function, as for :func:`lora` (``fn(params, *args, **kwargs)``).
      params: its parameters.
      paths: kernel paths, or a mapping ``{path: layout}`` where a layout is a string,
        a :class:`~jlora.layouts.Layout`, an :class:`~jlora.Adapter` or a
        :func:`jlora.plan` entry (needed for stacked kernels, whose layout is not inferred).
      *args, **kwargs: the inputs of ``fn``.

    Returns:
      ``{path: array}`` as above. A listed kernel that no dot over its fan-in or conv
      reaches (e.g. used only inside a ``while`` loop or a ``cond``) is a ``ValueError``.

    Example:
      >>> import jax.numpy as jnp, jlora
      >>> params = {"w": jnp.ones((3, 2))}
      >>> xs = jlora.collect_inputs(lambda p, x: x @ p["w"], params, ["w"], jnp.ones((4, 5, 3)))
      >>> xs["w"].shape
      (20, 3)
    """
    _check_fn(fn)
    layouts = layouts_for(params, paths)
    traced, values = trace(fn, None, params, args, kwargs)
    check_guesses(traced, layouts)

    @jax.jit
    def run_once(values, consts):
        _, interp = evaluate(traced, values, consts, {}, Run(), layouts)
        return interp.local(Collector).flush()

    collected = run_once(values, list(traced.closed.consts))
    missing = [p for p in layouts if p not in collected]
    if missing:
        raise ValueError(
            f"collect_inputs: no input reached the kernel(s) at {missing} through a dot over "
            "their fan-in (kernels used only inside while loops or conds, in grouped "
            "convolutions, or not at all, cannot be collected)."
        )
    return collected
