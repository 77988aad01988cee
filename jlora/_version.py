"""The installed package's version, read from its metadata (one place: pyproject.toml).

Example:
  >>> from jlora._version import __version__
  >>> isinstance(__version__, str)
  True
"""

from importlib import metadata

try:
    __version__ = metadata.version("jlora")
except metadata.PackageNotFoundError:  # imported from a source tree that is not installed
    __version__ = "0+unknown"
