"""Export of sparse flax models, and a checker for the N:M pattern in files.

* :func:`to_onnx`: ONNX through ``jax2onnx`` (``pip install 'jasp[onnx]'``);
* :func:`to_saved_model`: TensorFlow SavedModel through ``jax2tf``
  (``pip install 'jasp[tf]'``);
  both check what they wrote (the format's checker, a run against JAX, the
  N:M pattern read back) before moving it into place, else raise
  :class:`ExportError` and leave nothing behind;
* :func:`to_torch_state_dict` / :func:`save_safetensors`: PyTorch layouts
  (``(out, in)``, ``KCRS``), optionally with apex ASP's mask buffers
  (``pip install 'jasp[safetensors]'``; no PyTorch needed);
* :func:`check_file`: which weights of an ``.onnx``, SavedModel,
  ``.safetensors``, msgpack or orbax file are N:M along the axis their
  consumer reduces over; also the ``jasp check FILE`` command.

Importing this package imports none of the optional dependencies, nor jax:
names load on first use (PEP 562), so the ``jasp`` command starts fast. Each
function imports the optional dependency it needs and, when it is missing,
raises :class:`MissingDependencyError` naming the extra to install.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # what IDEs and type checkers see; at run time __getattr__ loads these
  from jasp.export._check import FORMATS
  from jasp.export._check import CheckError
  from jasp.export._check import CheckReport
  from jasp.export._check import WeightCheck
  from jasp.export._check import check_file
  from jasp.export._check import check_onnx
  from jasp.export._check import check_params
  from jasp.export._deps import MissingDependencyError
  from jasp.export._onnx import run_onnx
  from jasp.export._onnx import to_onnx
  from jasp.export._saved_model import run_saved_model
  from jasp.export._saved_model import to_saved_model
  from jasp.export._validate import ExportError
  from jasp.export.torch_layout import flax_weight
  from jasp.export.torch_layout import from_torch_state_dict
  from jasp.export.torch_layout import load_safetensors
  from jasp.export.torch_layout import save_safetensors
  from jasp.export.torch_layout import to_torch_state_dict
  from jasp.export.torch_layout import torch_key
  from jasp.export.torch_layout import torch_weight

__all__ = [
  "FORMATS",
  "CheckError",
  "CheckReport",
  "ExportError",
  "MissingDependencyError",
  "WeightCheck",
  "check_file",
  "check_onnx",
  "check_params",
  "flax_weight",
  "from_torch_state_dict",
  "load_safetensors",
  "run_onnx",
  "run_saved_model",
  "save_safetensors",
  "to_onnx",
  "to_saved_model",
  "to_torch_state_dict",
  "torch_key",
  "torch_weight",
]

# name -> the submodule that defines it.
_LAZY = {
  "CheckError": "jasp.export._check",
  "CheckReport": "jasp.export._check",
  "ExportError": "jasp.export._validate",
  "FORMATS": "jasp.export._check",
  "MissingDependencyError": "jasp.export._deps",
  "WeightCheck": "jasp.export._check",
  "check_file": "jasp.export._check",
  "check_onnx": "jasp.export._check",
  "check_params": "jasp.export._check",
  "flax_weight": "jasp.export.torch_layout",
  "from_torch_state_dict": "jasp.export.torch_layout",
  "load_safetensors": "jasp.export.torch_layout",
  "run_onnx": "jasp.export._onnx",
  "run_saved_model": "jasp.export._saved_model",
  "save_safetensors": "jasp.export.torch_layout",
  "to_onnx": "jasp.export._onnx",
  "to_saved_model": "jasp.export._saved_model",
  "to_torch_state_dict": "jasp.export.torch_layout",
  "torch_key": "jasp.export.torch_layout",
  "torch_weight": "jasp.export.torch_layout",
}


def __getattr__(name: str):
  if name not in _LAZY:
    raise AttributeError(f"module 'jasp.export' has no attribute {name!r}")
  value = getattr(importlib.import_module(_LAZY[name]), name)
  globals()[name] = value  # later lookups skip __getattr__
  return value


def __dir__() -> list[str]:
  return sorted(set(globals()) | set(__all__))
