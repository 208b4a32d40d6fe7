"""The ``>>>`` examples in jasp's docstrings run and print what they show."""

import doctest
import importlib
import pathlib

import pytest

import jasp

ROOT = pathlib.Path(jasp.__file__).parent


def _modules_with_examples() -> list[str]:
  """Every jasp module whose source holds a ``>>>`` example, as a dotted name."""
  names = []
  for path in sorted(ROOT.rglob("*.py")):
    if ">>>" in path.read_text(encoding="utf-8"):
      rel = path.relative_to(ROOT.parent).with_suffix("")
      parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
      names.append(".".join(parts))
  return names


MODULES = _modules_with_examples()


def test_examples_are_found():
  assert "jasp.masks" in MODULES, MODULES


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
  try:
    module = importlib.import_module(name)
  except ModuleNotFoundError as e:  # an optional dependency (an export backend)
    if e.name and e.name.split(".")[0] == "jasp":
      raise
    pytest.skip(f"{name} needs {e.name}, not installed")
  flags = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
  result = doctest.testmod(module, optionflags=flags, verbose=False, report=True)
  assert result.attempted > 0, f"{name}: no example ran"
  assert result.failed == 0, f"{name}: {result.failed} of {result.attempted} examples failed"
