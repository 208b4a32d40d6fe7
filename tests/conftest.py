"""Shared pytest set-up: the tests directory on sys.path, the gpu marker."""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

# Every test process searches cuSPARSELt's configurations itself (a search
# cache file left by an earlier run would skip them); the cache has its own
# tests, which set the variable where they need it.
os.environ.setdefault("JASP_SPARSE_SEARCH_CACHE", "0")


def _has_gpu() -> bool:
  import jax

  try:
    return bool(jax.devices("gpu"))
  except RuntimeError:
    return False


def pytest_collection_modifyitems(config, items):
  if _has_gpu():
    return
  skip = pytest.mark.skip(reason="needs a CUDA GPU; run `pytest -m gpu` on the device machine")
  for item in items:
    if "gpu" in item.keywords:
      item.add_marker(skip)
