"""Optional dependencies of the export package, imported on first use.

Each exporter needs a package that jasp does not install by default. A missing
one raises :class:`MissingDependencyError` naming the pip extra that brings it
(``pip install 'jasp[onnx]'``), so neither the library nor ``jasp check``
ever shows a bare ``ModuleNotFoundError``.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["MissingDependencyError", "require"]

# module -> (extra, what needs it)
_EXTRAS = {
  "onnx": ("onnx", "reading and writing .onnx files"),
  "onnxruntime": ("onnx", "running .onnx files"),
  "jax2onnx": ("onnx", "exporting to ONNX"),
  "tensorflow": ("tf", "TensorFlow SavedModels"),
  "safetensors": ("safetensors", ".safetensors state dicts"),
  "safetensors.numpy": ("safetensors", ".safetensors state dicts"),
  "orbax.checkpoint": ("checkpoint", "orbax checkpoints"),
}


class MissingDependencyError(ImportError):
  """An optional dependency is not installed; the message names the extra."""


def require(module: str) -> ModuleType:
  """Imports ``module`` or raises :class:`MissingDependencyError` naming its extra."""
  try:
    return importlib.import_module(module)
  except ImportError as e:
    extra, what = _EXTRAS.get(module, (None, "this feature"))
    hint = f"pip install 'jasp[{extra}]'" if extra else f"pip install {module.split('.')[0]}"
    raise MissingDependencyError(
      f"{what} needs the optional package '{module}', which is not installed "
      f"({e.__class__.__name__}: {e}); install it with: {hint}"
    ) from None
