"""Deprecated: ``jlora.reporting`` is private now (``jlora._reporting``).

Its public names are at the top of ``jlora``: `jlora.summary`. This stub forwards them,
with a ``DeprecationWarning``, for one release.
"""

from jlora._deprecation import forwarding_getattr

__getattr__ = forwarding_getattr("reporting", {
    "summary": "summary",
})
