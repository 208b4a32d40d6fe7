"""What an exporter proves about a file before it hands it over.

:func:`jasp.export.to_onnx` and :func:`jasp.export.to_saved_model` write into a
fresh directory next to the destination, check what they wrote, and only then
move it into place (:func:`staged`), so a failed export leaves no file behind
and an existing file is replaced whole or not at all. The checks:

* the format's own validation (``onnx.checker`` with ``full_check``; for a
  SavedModel, TensorFlow loading it);
* a run of the written file (onnxruntime; TensorFlow) on the sample inputs,
  compared with the JAX model at ``Precision.HIGHEST``
  (:func:`compare_outputs`): ``max |y_file - y_jax| / max |y_jax| <= rtol``,
  with ``rtol`` 1e-4 for float32/float64 outputs and 2e-2 for 16-bit ones by
  default (:func:`default_rtol`);
* the N:M pattern of every pruned weight, read back from the file by
  :func:`jasp.export.check_file` along the axis its consumer reduces over
  (:func:`check_pruned`): each pruned weight (each layer of a stacked one) must
  be found and be N:M.

Any failure raises :class:`ExportError` naming the cause.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable
from collections.abc import Iterator
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

__all__ = [
  "ExportError",
  "check_pruned",
  "compare_outputs",
  "default_rtol",
  "deliver",
  "reference",
  "staged",
]


class ExportError(RuntimeError):
  """An export did not pass its checks; nothing was written at the destination."""


def default_rtol(outputs: Sequence[Any]) -> float:
  """1e-4 when every output is float32/float64 (or not floating), else 2e-2."""
  low = any(
    np.dtype(getattr(y, "dtype", np.float32)).itemsize < 4
    and np.issubdtype(np.dtype(getattr(y, "dtype", np.float32)), np.floating)
    for y in outputs
  )
  return 2e-2 if low else 1e-4


def reference(apply, params, inputs: Sequence[Any]) -> list[np.ndarray]:
  """The JAX model's outputs on ``inputs`` at full matmul precision (flattened, as numpy)."""
  with jax.default_matmul_precision("highest"):
    out = jax.jit(apply)(params, *inputs)
  return [np.asarray(y) for y in jax.tree_util.tree_leaves(out)]


def compare_outputs(
  what: str, got: Sequence[Any], want: Sequence[np.ndarray], rtol: float
) -> float:
  """Raises :class:`ExportError` unless ``got`` matches ``want`` within ``rtol``.

  Returns:
    The largest relative error ``max |got - want| / max |want|`` over the outputs.
  """
  if len(got) != len(want):
    raise ExportError(f"{what} returned {len(got)} output(s), the JAX model {len(want)}.")
  worst = 0.0
  for i, (g, w) in enumerate(zip(got, want)):
    g = np.asarray(g)
    if g.shape != w.shape:
      raise ExportError(f"{what}: output {i} has shape {g.shape}, the JAX model's {w.shape}.")
    g64, w64 = g.astype(np.float64), w.astype(np.float64)
    finite = np.isfinite(w64)
    if not np.array_equal(finite, np.isfinite(g64)):
      raise ExportError(
        f"{what}: output {i} is non-finite where the JAX model's is not (or the other way round)."
      )
    scale = float(np.max(np.abs(w64[finite]), initial=0.0)) or 1.0
    err = float(np.max(np.abs(g64[finite] - w64[finite]), initial=0.0)) / scale
    if not err <= rtol:
      raise ExportError(
        f"{what}: output {i} differs from the JAX model by {err:.3g} (relative "
        f"to its largest value), more than the tolerance {rtol:g}."
      )
    worst = max(worst, err)
  return worst


def check_pruned(report, pruned: Mapping[str, bool]) -> None:
  """Raises :class:`ExportError` unless every pruned weight is in the file and N:M there.

  Args:
    report: the :class:`jasp.export.CheckReport` of the written file.
    pruned: ``{path: pruned}`` of the model's matmul/conv weights.
  """
  by_param = report.by_param()
  problems = []
  for path, is_pruned in pruned.items():
    if not is_pruned:
      continue
    found = [
      w
      for name, w in by_param.items()
      if name == path or (name.startswith(path + "[") and name.endswith("]"))
    ]
    if not found:
      problems.append(f"{path}: not found in the file as a weight its consumer reads whole")
    for w in found:
      if not w.nm:
        problems.append(
          f"{w.param}: not {report.n}:{report.m} along the axis its consumer "
          f"({w.consumer}) reduces over ({w.note or 'see jasp check'})"
        )
  if problems:
    raise ExportError(
      "the written file does not carry the N:M pattern of every pruned weight:\n  "
      + "\n  ".join(problems)
    )


@contextlib.contextmanager
def staged(path: str | os.PathLike) -> Iterator[str]:
  """A temporary path beside ``path``; on success its content replaces ``path``.

  Yields a path in a fresh directory of ``path``'s parent (same file system):
  the caller writes there (a file, or a directory such as a SavedModel; with
  any side files, e.g. ONNX external data, next to it) and checks it. When the
  block exits normally, everything written is moved into ``path``'s directory,
  replacing what was there; on an exception it is all removed and ``path`` is
  left as it was.
  """
  path = os.path.abspath(os.fspath(path))
  parent = os.path.dirname(path)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".jasp-export-", dir=parent)
  try:
    yield os.path.join(tmp, os.path.basename(path))
    for name in sorted(os.listdir(tmp), key=lambda n: n == os.path.basename(path)):
      src, dst = os.path.join(tmp, name), os.path.join(parent, name)
      if os.path.isdir(src) and os.path.isdir(dst):
        old = tempfile.mkdtemp(prefix=".jasp-old-", dir=parent)
        os.replace(dst, os.path.join(old, name))
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
      else:
        if os.path.isdir(dst):
          shutil.rmtree(dst)
        os.replace(src, dst)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def deliver(
  path: str | os.PathLike,
  write: Callable[[str], None],
  check: Callable[[str], None] | None = None,
) -> None:
  """Writes a file (or directory) beside ``path``, checks it, and only then moves it into place.

  Args:
    path: the destination.
    write: ``write(tmp)`` writes the export at the path ``tmp`` (see :func:`staged`).
    check: ``check(tmp)`` raises :class:`ExportError` when what was written is
      wrong; None: no check.

  Raises:
    Whatever ``write`` or ``check`` raise; ``path`` is then left as it was.
  """
  with staged(path) as tmp:
    write(tmp)
    if check is not None:
      check(tmp)
