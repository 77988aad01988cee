"""Deprecated: ``jlora.paths`` is private now (``jlora._paths``).

Its public names are at the top of ``jlora``: `jlora.select`, `jlora.mask`,
`jlora.partition`, `jlora.combine`, `jlora.leaf_paths`, `jlora.tree_map_with_path`,
`jlora.PatternError`. This stub forwards them, with a ``DeprecationWarning``, for one
release.
"""

from jlora._deprecation import forwarding_getattr

__getattr__ = forwarding_getattr("paths", {
    "select": "select",
    "mask": "mask",
    "partition": "partition",
    "combine": "combine",
    "leaf_paths": "leaf_paths",
    "tree_map_with_path": "tree_map_with_path",
    "PatternError": "PatternError",
})
