"""Deprecated: ``jlora.optim`` is private now (``jlora._optim``).

Its public names are at the top of ``jlora``: `jlora.split_trainable`,
`jlora.merge_trainable`, `jlora.lora_plus`, `jlora.trainable_mask`,
`jlora.trainable_labels`. This stub forwards them, with a ``DeprecationWarning``, for
one release.
"""

from jlora._deprecation import forwarding_getattr

__getattr__ = forwarding_getattr("optim", {
    "split_trainable": "split_trainable",
    "merge_trainable": "merge_trainable",
    "lora_plus": "lora_plus",
    "trainable_mask": "trainable_mask",
    "labels": "trainable_labels",
})
