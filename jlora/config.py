"""Deprecated: ``jlora.config`` is private now (``jlora._config``).

Its public names are at the top of ``jlora``: `jlora.LoraConfig`. This stub forwards
them, with a ``DeprecationWarning``, for one release.
"""

from jlora._deprecation import forwarding_getattr

__getattr__ = forwarding_getattr("config", {
    "LoraConfig": "LoraConfig",
})
