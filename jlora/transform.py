"""Deprecated: ``jlora.transform`` is private now (``jlora._transform``).

Its public names are at the top of ``jlora``: `jlora.lora`, `jlora.lora_report`,
`jlora.collect_inputs`, `jlora.FactoredFallbackWarning`. This stub forwards them, with a
``DeprecationWarning``, for one release.
"""

from jlora._deprecation import forwarding_getattr

__getattr__ = forwarding_getattr("transform", {
    "lora": "lora",
    "lora_report": "lora_report",
    "collect_inputs": "collect_inputs",
    "FactoredFallbackWarning": "FactoredFallbackWarning",
})
