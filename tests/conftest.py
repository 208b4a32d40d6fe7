"""Shared pytest set-up: the tests directory on sys.path, the seed, the gpu and slow markers.

* Seed: ``testing.seed()`` (also the ``seed`` fixture) is 0 unless
  ``JASP_TEST_SEED`` says otherwise (an int, or ``random``); the header and
  every failure print it, so ``JASP_TEST_SEED=<that> pytest ...`` reproduces.
* ``gpu``: skipped without a CUDA GPU.
* ``slow``: skipped unless ``--runslow`` (or ``JASP_SLOW=1``, or a ``-m``
  expression naming ``slow``); CI passes ``--runslow``.
"""

import gc
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

import testing  # noqa: E402

# Every test process searches cuSPARSELt's configurations itself (a search
# cache file left by an earlier run would skip them); the cache has its own
# tests, which set the variable where they need it.
os.environ.setdefault("JASP_SPARSE_SEARCH_CACHE", "0")


def pytest_addoption(parser):
  parser.addoption(
    "--runslow",
    action="store_true",
    default=False,
    help="also run the tests marked slow (fuzzing, the model zoo, exports, examples); "
    "JASP_SLOW=1 does the same",
  )


def pytest_configure(config):
  testing.seed()  # resolved once, before any test, and exported to subprocesses


def pytest_report_header(config):
  s = testing.seed()
  return [
    f"jasp test seed: {s} (JASP_TEST_SEED={s} reproduces it; "
    f"JASP_TEST_SEED=random draws a fresh one)",
    "jasp slow tests: " + ("run" if _run_slow(config) else "skipped (--runslow runs them)"),
  ]


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session):
  """Frees JAX's compiled programs and collects garbage once, before the run reports its end.

  pytest collects garbage five times after the run. With hundreds of compiled
  programs alive that took 3-6 s in a worker of the quick run, past the 5 s
  that pytest-xdist's shutdown waits before it interrupts the worker (a
  ``KeyboardInterrupt`` traceback after the summary).
  """
  import jax

  jax.clear_caches()
  gc.collect()


@pytest.fixture
def seed() -> int:
  """The run's seed (``testing.seed()``): fixed by default, ``JASP_TEST_SEED`` overrides it."""
  return testing.seed()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
  outcome = yield
  report = outcome.get_result()
  if report.failed:
    report.sections.append(
      ("jasp test seed", f"JASP_TEST_SEED={testing.seed()} reproduces this run's random draws")
    )


def _has_gpu() -> bool:
  import jax

  try:
    return bool(jax.devices("gpu"))
  except RuntimeError:
    return False


def _run_slow(config) -> bool:
  return (
    config.getoption("--runslow")
    or os.environ.get("JASP_SLOW", "") not in ("", "0")
    or "slow" in (config.getoption("markexpr") or "")
  )


def pytest_collection_modifyitems(config, items):
  if not _run_slow(config):
    skip_slow = pytest.mark.skip(reason="slow: run with --runslow (CI does)")
    for item in items:
      if "slow" in item.keywords:
        item.add_marker(skip_slow)
  if _has_gpu():
    return
  skip = pytest.mark.skip(reason="needs a CUDA GPU; run `pytest -m gpu` on the device machine")
  for item in items:
    if "gpu" in item.keywords:
      item.add_marker(skip)
