"""Checks the N:M pattern on the weights stored in an exported file.

This module ties the parts together: :mod:`jasp.export._readers` (one reader per
format), :mod:`jasp.export._meta` (jasp's metadata in a file) and
:mod:`jasp.export._verdict` (the verdict per weight, and the report).

What each format tells about the axis a consumer reduces over:

* ``.onnx``: the graph itself. Every initializer (or ``Constant``) is followed
  through ``Identity``/``Cast``/``Transpose``/``Reshape``/``Squeeze``/
  ``Unsqueeze``/``Flatten``/``DequantizeLinear`` to the ``MatMul``, ``Gemm`` or
  ``Conv`` that consumes it, and the reduction axis is read there, mapped back
  to the stored tensor's own axes: ``MatMul`` reduces its B operand ``(..., K,
  N)`` along ``-2`` and its A operand ``(..., M, K)`` along ``-1``; ``Gemm``
  its B along 0, or along 1 with ``transB=1`` (A: 1, or 0 with ``transA=1``);
  ``Conv`` its ``W (K, C/group, R, S ...)`` along ``C/group`` (axis 1; apex's
  and TensorRT's ``KCRS`` rule: for each ``k, r, s``, every ``m`` consecutive
  ``c``); ``ConvTranspose`` its ``W (C, K/group, ...)`` along axis 0. The
  sizes of intermediate values (for a ``Concat``) are the ones the graph
  declares (``value_info``, inputs, outputs); ONNX shape inference is not run
  on the untrusted graph.
* TensorFlow SavedModel (written by :func:`jasp.export.to_saved_model`): the
  variables in flax layouts, with the traced axes recorded in
  ``assets.extra/jasp.json``; other SavedModels use flax's/Keras's naming
  conventions (``kernel (in, out)``, conv ``(*spatial, in, out)``).
* ``.safetensors``: PyTorch layouts (``weight (out, in)`` / ``(K, C, R, S)``:
  axis 1), or the layouts recorded by :func:`jasp.export.save_safetensors`.
* flax ``msgpack`` and orbax checkpoints: the leaf paths, by flax's
  conventions (:func:`jasp.convention_layout`); ``opt_state`` subtrees are
  skipped.

Which weights are *expected* to be N:M (the exit status depends on them):

1. with ``expect_sparse`` (regular expressions, ``re.search`` on the weight's
   name or its flax path): exactly the weights that match;
2. otherwise the union of: the weights the file's jasp metadata marks as
   pruned; the weights that carry a mask in the file (apex's
   ``__weight_mma_mask`` or ``weight_mask`` tensors; a ``masks`` subtree of a
   checkpoint); and every weight with at least ``min_zeros`` exact zeros
   (default ``0.8 * (m - n) / m``, 40% for 2:4): a weight that looks pruned
   must carry the pattern.

A weight whose reduction size is not a multiple of ``m`` (or a depthwise
conv) cannot hold the pattern: it is reported ``n/a``, and fails only if
expected.

The files are untrusted input, and the check fails closed: it raises
:class:`CheckError` (``jasp check`` exits 2), never reports success, when

* the file holds no weight at all (an empty or truncated file, a graph without
  nodes), unless ``require_weights=False``;
* the file's jasp metadata marks a weight as pruned that the file does not
  hold, or that the check cannot follow to its consumer;
* the jasp metadata is malformed (not JSON, duplicate keys, a field of the
  wrong type: the message names the field);
* the file is not a regular file (a FIFO, a device), declares sizes that the
  bytes behind them do not hold, or would need more memory than ``max_bytes``
  (:mod:`jasp.export._safe_read` lists the limits).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any

import numpy as np

from jasp import _tree
from jasp.export import _safe_read
from jasp.export._deps import require
from jasp.export._meta import is_int
from jasp.export._readers import Found
from jasp.export._readers import msgpack as msgpack_reader
from jasp.export._readers import onnx as onnx_reader
from jasp.export._readers import orbax as orbax_reader
from jasp.export._readers import safetensors as safetensors_reader
from jasp.export._readers import savedmodel as savedmodel_reader
from jasp.export._readers import tree as tree_reader
from jasp.export._safe_read import Budget
from jasp.export._safe_read import CheckError
from jasp.export._verdict import CheckReport
from jasp.export._verdict import WeightCheck
from jasp.export._verdict import report

__all__ = [
  "CheckError",
  "WeightCheck",
  "CheckReport",
  "check_file",
  "check_onnx",
  "check_params",
  "detect_format",
  "FORMATS",
]

FORMATS = ("onnx", "savedmodel", "safetensors", "msgpack", "orbax")

# The reader of each format: ``read(path, layout, budget) -> Found``.
_READERS: dict[str, Callable[[str, str | None, Budget], Found]] = {
  "onnx": onnx_reader.read,
  "savedmodel": savedmodel_reader.read,
  "safetensors": safetensors_reader.read,
  "msgpack": msgpack_reader.read,
  "orbax": orbax_reader.read,
}

# File name extensions that name a format.
_BY_EXTENSION = {
  ".onnx": "onnx",
  ".safetensors": "safetensors",
  ".msgpack": "msgpack",
  ".flax": "msgpack",
}


def _budget(max_bytes: int | None) -> Budget:
  if max_bytes is not None and (not is_int(max_bytes) or max_bytes < 1):
    raise CheckError(f"max_bytes must be a positive integer, got {max_bytes!r}.")
  return Budget(max_bytes)


def check_onnx(
  model_or_path: Any,
  *,
  n: int | None = None,
  m: int | None = None,
  expect_sparse: str | Sequence[str] | None = None,
  min_zeros: float | None = None,
  max_bytes: int | None = None,
  require_weights: bool = True,
) -> CheckReport:
  """Checks every weight that feeds a MatMul/Gemm/Conv of an ONNX model (see the module doc).

  Args:
    model_or_path: an ``onnx.ModelProto`` or a path to a ``.onnx`` file.
    n, m: the pattern (default: the file's jasp metadata, else 2:4).
    expect_sparse: regular expression(s) naming the weights that must be N:M.
    min_zeros: the zero fraction from which a weight must be N:M.
    max_bytes, require_weights: as for :func:`check_file`.

  Returns:
    A :class:`CheckReport`.

  Raises:
    CheckError: as :func:`check_file` (a ``ModelProto`` whose tensors keep their data in
      external files: pass the path instead).
    MissingDependencyError: without ``onnx`` (``pip install 'jasp[onnx]'``).
  """
  if isinstance(model_or_path, (str, os.PathLike)):
    return check_file(
      model_or_path,
      n=n,
      m=m,
      expect_sparse=expect_sparse,
      min_zeros=min_zeros,
      format="onnx",
      max_bytes=max_bytes,
      require_weights=require_weights,
    )
  onnx = require("onnx")
  budget = _budget(max_bytes)
  where = "<model>"
  model = onnx.ModelProto()
  model.CopyFrom(model_or_path)  # external data is never loaded into the caller's proto
  onnx_reader.prepare(model, where, None, budget)
  cands, meta = onnx_reader.candidates(model, where, budget)
  found = Found(cands, meta, onnx_reader.none_found(model), where)
  return _checked(found, "onnx", n, m, expect_sparse, min_zeros, require_weights)


def check_params(
  params: Any,
  *,
  layouts: Mapping[str, Any] | None = None,
  n: int = 2,
  m: int = 4,
  expect_sparse: str | Sequence[str] | None = None,
  min_zeros: float | None = None,
  name: str = "<params>",
) -> CheckReport:
  """Checks a flax params pytree (or a restored checkpoint) by its leaf paths.

  Weights are the leaves that :func:`jasp.convention_layout` (or ``layouts``)
  says are matmul/conv kernels; ``opt_state`` subtrees are skipped; a
  ``masks`` subtree next to ``params`` marks the masked weights as expected.

  Raises:
    CheckError: ``n``/``m`` or ``expect_sparse`` are invalid.
  """
  flat = {p: np.asarray(x) for p, x in _tree.leaves_by_path(params).items()}
  return report(
    name, "pytree", tree_reader.candidates(flat, layouts=layouts), n, m, expect_sparse, min_zeros
  )


def _directory_format(path: str) -> str:
  """The format of the directory ``path``: a SavedModel or an orbax checkpoint."""
  if os.path.exists(os.path.join(path, "saved_model.pb")) or os.path.exists(
    os.path.join(path, "saved_model.pbtxt")
  ):
    return "savedmodel"
  if orbax_reader.find_dir(path) is not None:
    return "orbax"
  raise CheckError(
    f"{path}: a directory that is neither a TensorFlow SavedModel "
    "(saved_model.pb) nor an orbax checkpoint."
  )


def _content_format(path: str) -> str | None:
  """The format of the file ``path`` by its first bytes; None when they tell none."""
  head = _safe_read.read_head(path, 16)
  if len(head) >= 9 and head[8:9] == b"{":
    return "safetensors"
  if head[:1] in (b"\x80", b"\x81", b"\x82", b"\x83", b"\xde", b"\xdf"):
    return "msgpack"
  if head[:1] == b"\x08":  # an ONNX ModelProto starts with ir_version (field 1, varint)
    return "onnx"
  return None


def detect_format(path: str) -> str:
  """The format of ``path``: one of :data:`FORMATS` (by name, then by content).

  Raises:
    CheckError: if the path does not exist, is not a regular file or
      directory, or its format is not recognised.
  """
  if not os.path.exists(path):
    raise CheckError(f"{path}: no such file or directory.")
  if os.path.isdir(path):
    return _directory_format(path)
  fmt = _BY_EXTENSION.get(os.path.splitext(path)[1].lower()) or _content_format(path)
  if fmt is None:
    raise CheckError(
      f"{path}: unsupported file format (expected .onnx, a SavedModel directory, "
      ".safetensors, a flax .msgpack or an orbax checkpoint directory)."
    )
  return fmt


def _checked(
  found: Found,
  fmt: str,
  n: int | None,
  m: int | None,
  expect_sparse: str | Sequence[str] | None,
  min_zeros: float | None,
  require_weights: bool,
) -> CheckReport:
  """The report on what a reader found (the pattern defaults to the file's metadata, else 2:4)."""
  if require_weights and not found.cands:
    raise CheckError(f"{found.path}: no weights found: {found.none_found}.")
  n = n if n is not None else found.meta.get("n", 2)
  m = m if m is not None else found.meta.get("m", 4)
  return report(found.path, fmt, found.cands, n, m, expect_sparse, min_zeros)


def check_file(
  path: str | os.PathLike,
  *,
  n: int | None = None,
  m: int | None = None,
  expect_sparse: str | Sequence[str] | None = None,
  min_zeros: float | None = None,
  format: str | None = None,
  layout: str | None = None,
  max_bytes: int | None = None,
  require_weights: bool = True,
) -> CheckReport:
  """Checks the N:M pattern of the weights stored in an exported file.

  Lists each weight that feeds a matmul/conv (or each kernel leaf of a
  checkpoint), the axis its consumer reduces over, whether it is N:M along it
  and its sparsity; see the module doc for the per-format rules, for what
  makes a weight *expected* sparse, and for when the check refuses a file.

  Example::

    report = jasp.export.check_file("model.onnx")
    print(report)            # a table
    assert report.ok, report.failures

  Args:
    path: a ``.onnx`` file, a SavedModel directory, a ``.safetensors`` file, a
      flax ``.msgpack`` file or an orbax checkpoint directory.
    n, m: the pattern (default: the file's jasp metadata, else 2:4).
    expect_sparse: regular expression(s); when given, exactly the weights
      whose name or flax path matches must be N:M.
    min_zeros: without ``expect_sparse``, a weight with at least this fraction
      of zeros must be N:M (default ``0.8 * (m - n) / m``).
    format: force one of :data:`FORMATS` instead of detecting it.
    layout: for ``.safetensors`` without jasp metadata: ``"torch"`` (default)
      or ``"flax"``.
    max_bytes: the most bytes the check may read from files plus decode into
      arrays (default: half of the memory the process may still use); a file
      that needs more is refused.
    require_weights: a file holding no weight at all is an error (default);
      False reports it as an empty (passing) check.

  Returns:
    A :class:`CheckReport` (``.ok``, ``.failures``, ``str()``, ``.to_json()``).

  Raises:
    CheckError: missing, unreadable, corrupt or unsupported file; no weights;
      malformed jasp metadata, or metadata naming pruned weights that the file
      does not hold; sizes over ``max_bytes`` (the message says why).
    MissingDependencyError: the format needs an optional package (the message
      names the pip extra).
  """
  path = os.fspath(path)
  if format is not None and format not in FORMATS:
    raise CheckError(f"unknown format {format!r}; one of {', '.join(FORMATS)}.")
  if layout not in (None, "torch", "flax"):
    raise CheckError(f"unknown layout {layout!r}; 'torch' or 'flax'.")
  budget = _budget(max_bytes)
  fmt = format or detect_format(path)
  if not os.path.exists(path):
    raise CheckError(f"{path}: no such file or directory.")
  found = _READERS[fmt](path, layout, budget)
  return _checked(found, fmt, n, m, expect_sparse, min_zeros, require_weights)
