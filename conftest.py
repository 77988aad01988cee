"""Collection settings for the doctests under jlora/ (tests/conftest.py has the rest)."""

from flax import nnx

# jlora.nnx needs flax 0.12's NNX API; on older flax its functions raise an ImportError
# that says so, and its doctests are not collected.
collect_ignore_glob = [] if hasattr(nnx, "Dict") and hasattr(nnx.Variable, "get_value") else [
    "jlora/nnx/*"]
