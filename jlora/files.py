"""Deprecated: ``jlora.files`` is private now (``jlora._files``).

Its public names are at the top of ``jlora``: `jlora.AdapterFormatError`. This stub
forwards them, with a ``DeprecationWarning``, for one release.
"""

from jlora._deprecation import forwarding_getattr

__getattr__ = forwarding_getattr("files", {
    "AdapterFormatError": "AdapterFormatError",
})
