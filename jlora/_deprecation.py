"""Module paths and call forms kept for one release after they moved, each with a warning.

jlora's implementation modules are private (``jlora._io``, ``jlora._paths``, ...); their
public names live at the top of ``jlora``. The old public modules (``jlora.io``,
``jlora.paths``, ...) still work for one release: each is a stub whose attributes
forward to the new home with a :class:`DeprecationWarning` that names the replacement.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable, Mapping
from typing import Any

# The old public modules, by their old name: the private module they became.
MOVED_MODULES = {
    "adapter": "jlora._adapter",
    "config": "jlora._config",
    "files": "jlora._files",
    "initializers": "jlora._initializers",
    "io": "jlora._io",
    "merging": "jlora._merging",
    "optim": "jlora._optim",
    "paths": "jlora._paths",
    "reporting": "jlora._reporting",
    "transform": "jlora._transform.api",
}


def warn(message: str, stacklevel: int = 3) -> None:
    warnings.warn(message, DeprecationWarning, stacklevel=stacklevel)


def forwarding_getattr(old: str, renamed: Mapping[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for the stub ``jlora.<old>``.

    ``renamed`` maps an old attribute to its public replacement (``"save"`` ->
    ``"save"`` means ``jlora.save``); any other attribute of the private module still
    resolves, with a warning that it is internal.
    """
    private = MOVED_MODULES[old]

    def __getattr__(name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        if name in renamed:
            jlora = importlib.import_module("jlora")
            warn(f"`jlora.{old}.{name}` is deprecated and will be removed in the next "
                 f"release: use `jlora.{renamed[name]}`.")
            return getattr(jlora, renamed[name])
        module = importlib.import_module(private)
        if not hasattr(module, name):
            raise AttributeError(f"module 'jlora.{old}' has no attribute {name!r}")
        warn(f"`jlora.{old}.{name}` is internal and will be removed from the public API in "
             f"the next release; the public names are listed in `jlora.__all__`.")
        return getattr(module, name)

    __getattr__.renamed = dict(renamed)  # type: ignore[attr-defined]  # read by the tests
    return __getattr__
