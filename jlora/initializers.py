"""Deprecated: ``jlora.initializers`` is private now (``jlora._initializers``).

Its public names are at the top of ``jlora``: `jlora.init`, `jlora.plan`. This stub
forwards them, with a ``DeprecationWarning``, for one release.
"""

from jlora._deprecation import forwarding_getattr

__getattr__ = forwarding_getattr("initializers", {
    "init": "init",
    "plan": "plan",
})
