"""Deprecated: ``jlora.merging`` is private now (``jlora._merging``).

Its public names are at the top of ``jlora``: `jlora.merge`, `jlora.unmerge`,
`jlora.safe_merge`, `jlora.delta`. This stub forwards them, with a
``DeprecationWarning``, for one release.
"""

from jlora._deprecation import forwarding_getattr

__getattr__ = forwarding_getattr("merging", {
    "merge": "merge",
    "unmerge": "unmerge",
    "safe_merge": "safe_merge",
    "delta": "delta",
})
