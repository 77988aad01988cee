"""Deprecated: ``jlora.adapter`` is private now (``jlora._adapter``).

Its public names are at the top of ``jlora``: `jlora.Adapter`, `jlora.Adapters`,
`jlora.is_adapter`. This stub forwards them, with a ``DeprecationWarning``, for one
release.
"""

from jlora._deprecation import forwarding_getattr

__getattr__ = forwarding_getattr("adapter", {
    "Adapter": "Adapter",
    "Adapters": "Adapters",
    "is_adapter": "is_adapter",
})
