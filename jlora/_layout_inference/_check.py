"""Reading every kernel's uses from a jaxpr, and checking a layout against them."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from jlora._layout_inference._reader import _open, _Reader, _shape
from jlora._layout_inference._uses import _CATEGORY, _FIX, _ROLE, KernelUses, Use, _explicit, _View
from jlora.layouts import Layout, LayoutError

# ---------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------


def _read(jaxpr, input_paths: Sequence[str | None], wanted) -> list[KernelUses]:
    """Run the reader over ``jaxpr`` with the inputs that ``wanted(path, aval)`` accepts
    entered as kernels."""
    kernels: list[KernelUses] = []
    invals = []
    for var, path in zip(jaxpr.invars, input_paths, strict=True):
        if path is None or not wanted(path, var.aval):
            invals.append(None)
            continue
        shape = _shape(var)
        invals.append((_View(len(kernels), tuple(frozenset([k]) for k in range(len(shape)))),))
        kernels.append(KernelUses(path, shape))
    if kernels:
        reader = _Reader(kernels)
        for x in reader.eval_jaxpr(jaxpr, invals):
            reader.hide_all(x, "the function's return value")
    return kernels


def read_kernel_uses(
    closed_jaxpr, input_paths: Sequence[str | None], paths: Iterable[str]
) -> dict[str, KernelUses]:
    """The uses of the kernels at ``paths`` in a traced program.

    Args:
      closed_jaxpr: the program, a ``ClosedJaxpr`` (or ``Jaxpr``).
      input_paths: for each jaxpr input, its parameter path, or ``None`` (an argument).
      paths: the kernels to read; each is read from the first input with that path.

    Returns:
      ``{path: KernelUses}`` for the listed paths present among the inputs; each has
      ``.uses`` (where and how the program consumes it), ``.roles()`` and ``.layout()``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> closed = jax.make_jaxpr(lambda w, x: x @ w.T)(jnp.ones((3, 2)), jnp.ones((4, 2)))
      >>> read_kernel_uses(closed, ["head/kernel", None], ["head/kernel"])["head/kernel"].layout()
      ('oi', '')
    """
    wanted, seen = set(paths), set()

    def take(path, aval):
        if path in wanted and path not in seen:
            seen.add(path)
            return True
        return False

    kernels = _read(_open(closed_jaxpr), input_paths, take)
    return {k.path: k for k in kernels}


def _contradictions(layout: Layout, use: Use) -> list[tuple[int, str, str]]:
    """``(axis, layout letter, use letter)`` wherever ``use`` reads the kernel otherwise."""
    roles = dict(use.roles)
    axes = layout.axes
    if layout.kind == "embed":
        v, f = axes.index("v"), axes.index("f")
        if roles.get(v) == "o" and roles.get(f) == "i":
            del roles[v], roles[f]  # x @ table.T: attending with the table, as tied embeddings do
    out = []
    for k, letter in roles.items():
        kind_differs = (letter in "vf" and layout.kind != "embed") or (
            letter == "w" and layout.kind != "conv"
        )
        if kind_differs or _CATEGORY[letter] != _CATEGORY[axes[k]]:
            out.append((k, axes[k], letter))
    return out


def check_layout(found: KernelUses, layout: Layout) -> None:
    """Raise :class:`LayoutError` if the program uses the kernel against ``layout``.

    A contradiction is a use that gives an axis another role: a guessed ``'io'`` kernel
    contracted over axis 1 (stored ``(out, in)``: ``'oi'``), a guessed dense kernel whose
    rows are gathered (an embedding, ``'vf'``), a guessed ``'ioo'`` kernel that a scan
    slices along axis 0 (``'sio'``). ``x @ table.T`` on a ``'vf'`` table is not one.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> closed = jax.make_jaxpr(lambda w, x: x @ w.T)(jnp.ones((3, 2)), jnp.ones((4, 2)))
      >>> found = read_kernel_uses(closed, ["head/kernel", None], ["head/kernel"])
      >>> check_layout(found["head/kernel"], Layout("oi"))
      >>> check_layout(found["head/kernel"], Layout("io", guessed=True))
      Traceback (most recent call last):
        ...
      jlora.LayoutError: The kernel at path 'head/kernel' (shape (3, 2)) has the ...
    """
    if layout.ndim != len(found.shape):
        layout.check_shape(found.shape, found.path)
    for use in found.uses:
        bad = _contradictions(layout, use)
        if not bad:
            continue
        try:
            read, _ = found.layout()
        except LayoutError:
            read = None
        read = read or use.letters(len(found.shape))
        how = "; ".join(
            f"axis {k} is {_ROLE[letter]}, not {_ROLE[have]}" for k, have, letter in bad
        )
        # Guesses come from a kernel's shape and name, or from a codebase's usual axis
        # order (jlora.peft.templates).
        origin = " (guessed: from its shape and name, or a template)" if layout.guessed else ""
        raise LayoutError(
            f"The kernel at path {found.path!r} (shape {found.shape}) has the layout "
            f"{layout.axes!r}{origin}, but {use} uses it as {read!r}: {how}. Read the "
            f"layouts from the model with {_FIX}, or give this one explicitly: "
            f"{_explicit(found.path, read)}."
        )


def check_guessed_layouts(
    closed_jaxpr, input_paths: Sequence[str | None], layouts: Mapping[str, Layout]
) -> dict[str, KernelUses]:
    """Check every guessed layout in ``layouts`` against the program (one pass).

    Args:
      closed_jaxpr: the traced program.
      input_paths: for each jaxpr input, its parameter path or ``None``.
      layouts: ``{path: Layout}`` of the adapted kernels; only those with
        ``guessed=True`` are read and checked.

    Returns:
      ``{path: KernelUses}`` of the checked kernels.

    Raises:
      LayoutError: naming the path, the guess, the contradicting use and the fix.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> closed = jax.make_jaxpr(lambda w, x: x @ w)(jnp.ones((2, 3)), jnp.ones((4, 2)))
      >>> found = check_guessed_layouts(closed, ["w", None], {"w": Layout("io", guessed=True)})
      >>> [str(u).split(" at ")[0] for u in found["w"].uses]
      ['dot_general']
    """
    guessed = {path: lay for path, lay in layouts.items() if lay.guessed}
    if not guessed:
        return {}
    found = read_kernel_uses(closed_jaxpr, input_paths, guessed)
    for path, uses in found.items():
        check_layout(uses, guessed[path])
    return found
