"""The scripts here run in subprocesses with several devices (see tests/test_sharding.py);
pytest must not import them itself (not even for doctests)."""

collect_ignore_glob = ["*.py"]
