"""Deprecated: ``jlora.io`` is private now (``jlora._io``).

Its public names are at the top of ``jlora``: `jlora.save`, `jlora.load`,
`jlora.abstract_adapters`, `jlora.adapter_metadata`, `jlora.AdapterFormatError`. This
stub forwards them, with a ``DeprecationWarning``, for one release.
"""

from jlora._deprecation import forwarding_getattr

__getattr__ = forwarding_getattr("io", {
    "save": "save",
    "load": "load",
    "abstract_adapters": "abstract_adapters",
    "adapter_metadata": "adapter_metadata",
    "AdapterFormatError": "AdapterFormatError",
})
