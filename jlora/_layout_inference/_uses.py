"""What a kernel's axes are used as: views of a kernel inside the program, each use a
consumer makes of them, and the layout they add up to."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

from jlora import layouts as layouts_lib
from jlora.layouts import LayoutError

_CATEGORY = {"s": "s", "i": "i", "w": "i", "v": "i", "o": "o", "f": "o"}
_ROLE = {
    "s": "stacked",
    "i": "fan-in (contracted)",
    "o": "fan-out",
    "w": "conv window",
    "v": "vocabulary (indexed by ids)",
    "f": "embedding features",
}
_FIX = "`LoraConfig(layouts=jlora.infer_layouts(fn, params, *args))`"


class LayoutInferenceWarning(UserWarning):
    """Floating leaves with two or more axes whose layout ``fn`` does not show."""


# ---------------------------------------------------------------------------------------
# What the reader knows about a value: which kernel axes each of its axes comes from.
# ---------------------------------------------------------------------------------------


class _Piece(frozenset):
    """The kernel axes an axis holds part of: a reshape split them (a fused QKV kernel's
    ``(3, heads, head_dim)`` pieces). Indexing a piece away does not make a stacked axis."""


@dataclasses.dataclass(frozen=True)
class _View:
    """One kernel seen through the moves that led to a value.

    With ``derived`` set, the value is not the kernel but the output of the dot
    ``derived``: its axes hold the kernel's fan-out axes, followed only to see whether the
    model indexes one of them away (``k, v = einsum("BSD,CKDH->CBSKH", x, w)``).
    """

    kernel: int  # index into _Reader.kernels
    axes: tuple[frozenset, ...]  # per axis of the value: the kernel axes it holds
    # kernel axes indexed away on the way (scan slices, W[i]), with the move that did it
    picks: tuple[tuple[frozenset, str], ...] = ()
    derived: Use | None = None

    def moved(self, axes: Iterable[frozenset], picks: Iterable[tuple] = ()) -> _View:
        return dataclasses.replace(self, axes=tuple(axes), picks=self.picks + tuple(picks))

    @property
    def num_sourced(self) -> int:
        return sum(1 for a in self.axes if a)


_BROADCAST = object()  # a non-kernel value broadcast from fewer elements (a scale, a constant)
_NONE = frozenset()


@dataclasses.dataclass(frozen=True)
class Use:
    """One consumer of a kernel: the role it gives each kernel axis, and where it is."""

    roles: tuple[tuple[int, str], ...]  # (kernel axis, layout letter), by axis
    primitive: str
    where: str  # "file:line (function)"
    stacked_by: tuple[str, ...] = ()  # the moves that index its stacked axes away

    def __str__(self) -> str:
        text = f"{self.primitive} at {self.where or 'an unknown line'}"
        if self.stacked_by:
            text += " (stacked by " + ", ".join(self.stacked_by) + ")"
        return text

    def letters(self, ndim: int) -> str:
        """The layout this use alone reads, ``?`` for the axes it says nothing about."""
        roles = dict(self.roles)
        return "".join(roles.get(k, "?") for k in range(ndim))


@dataclasses.dataclass
class KernelUses:
    """Everything the program shows about one kernel."""

    path: str
    shape: tuple[int, ...]
    uses: dict = dataclasses.field(default_factory=dict)  # Use -> None: an ordered set
    hidden_by: dict = dataclasses.field(default_factory=dict)  # ops hiding its layout
    combined: bool = False  # added to, multiplied with or joined to activations

    def roles(self) -> list[str | None]:
        """One letter per kernel axis from all uses together (``None``: not shown).

        Raises :class:`LayoutError` naming both uses when two of them disagree.
        """
        letters: list[str | None] = [None] * len(self.shape)
        origin: list[Use | None] = [None] * len(self.shape)
        embed = None  # (vocab axis, feature axis) once a row gather is seen
        for use in sorted(self.uses, key=lambda u: u.primitive != "gather"):
            roles = dict(use.roles)
            if embed and roles.get(embed[0]) == "o" and roles.get(embed[1]) == "i":
                del roles[embed[0]], roles[embed[1]]  # x @ table.T: tied embeddings attend
            for axis, letter in roles.items():
                have = letters[axis]
                if have is None or (have != letter and _refines(have, letter)):
                    letters[axis], origin[axis] = letter, use
                elif not _refines(letter, have):
                    raise self._conflict(axis, origin[axis], have, use, letter)
            if use.primitive == "gather" and embed is None:
                found = {letter: axis for axis, letter in use.roles}
                embed = (found["v"], found["f"])
        return letters

    def layout(self) -> tuple[str | None, str]:
        """``(layout string, "")`` or ``(None, why no layout was read)``."""
        if not self.uses:
            if self.hidden_by:
                return None, "it reaches only " + ", ".join(self.hidden_by) + (
                    ", which do not show its layout"
                )
            return None, "fn never passes it whole to a dot_general, conv or gather"
        letters = self.roles()
        # An axis of size 1 dropped on the way is a stack of one.
        letters = [c or ("s" if n == 1 else None) for c, n in zip(letters, self.shape, strict=True)]
        unknown = [k for k, c in enumerate(letters) if c is None]
        if unknown:
            return None, (
                f"its uses ({'; '.join(map(str, self.uses))}) do not show the role of axes "
                f"{unknown}"
            )
        axes = "".join(c for c in letters if c is not None)  # none is None: checked above
        problem = layouts_lib._layout_problem(axes)
        if problem:
            return None, f"its uses read {axes!r}, which is not a kernel layout: {problem}"
        return axes, ""

    def _conflict(self, axis: int, first: Use, a: str, second: Use, b: str) -> LayoutError:
        ndim = len(self.shape)
        return LayoutError(
            f"The kernel at path {self.path!r} (shape {self.shape}) is used in two "
            f"incompatible ways: {first} uses its axis {axis} as {_ROLE[a]} (layout "
            f"{first.letters(ndim)!r}), but {second} uses it as {_ROLE[b]} (layout "
            f"{second.letters(ndim)!r}). A kernel has one layout: use it one way, or give "
            f"the layout to adapt it with explicitly, {_explicit(self.path, first.letters(ndim))}."
        )


def _explicit(path: str, layout: str) -> str:
    """How to give ``path`` a layout, with ``layout`` as the example when it is complete."""
    if "?" in layout or layouts_lib._layout_problem(layout):
        return (f"`LoraConfig(layouts={{{path!r}: ...}})` (one letter per axis, see "
                "jlora.layouts)")
    return f"`LoraConfig(layouts={{{path!r}: {layout!r}}})`"


def _refines(have: str, new: str) -> bool:
    """Whether ``new`` agrees with ``have`` and says at least as much (``w`` refines ``i``)."""
    return new == have or (have in "io" and _CATEGORY[new] == have)
