"""Checks the N:M pattern on the weights stored in an exported file.

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

import dataclasses
import json
import math
import os
import re
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any

import numpy as np

from jasp import _tree
from jasp import layouts as layouts_lib
from jasp._nm_core import check_nm
from jasp.export import _nm
from jasp.export import _onnx_graph
from jasp.export import _safe_read
from jasp.export import torch_layout
from jasp.export._deps import require
from jasp.export._format import JASP_JSON
from jasp.export._format import METADATA_KEY
from jasp.export._safe_read import Budget
from jasp.export._safe_read import CheckError

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


@dataclasses.dataclass(frozen=True)
class WeightCheck:
  """One weight of a checked file.

  Attributes:
    name: its name in the file (ONNX initializer, variable path, tensor key).
    param: the flax path it came from, when the file records it.
    shape, dtype: as stored in the file.
    consumer: what reads it (``Gemm(transB=1)``, ``MatMul[B]``,
      ``Conv(group=2)``, ``linear``, ``conv``, ``dot`` ...).
    axis: the reduction axes in the stored tensor (consecutive, flattened
      row-major); None when unknown.
    applicable: whether the axes' size is a multiple of ``m``.
    nm: whether the weight is N:M along ``axis`` (along every consumer's axes).
    groups, bad_groups: groups of ``m`` and those over ``n`` non-zeros.
    zero_fraction: fraction of exact zeros.
    expected: whether the weight must be N:M (see the module doc).
    expected_by: why: ``regex``, ``metadata``, ``mask`` or ``zeros``.
    note: diagnosis (e.g. the axes it *is* N:M along, when not the consumer's).
  """

  name: str
  param: str | None
  shape: tuple[int, ...]
  dtype: str
  consumer: str
  axis: tuple[int, ...] | None
  applicable: bool
  nm: bool
  groups: int
  bad_groups: int
  zero_fraction: float
  expected: bool
  expected_by: str
  note: str = ""

  @property
  def ok(self) -> bool:
    return self.nm or not self.expected

  @property
  def status(self) -> str:
    if self.expected and not self.nm:
      return "FAIL"
    if self.nm:
      return "N:M"
    return "dense" if self.applicable else "n/a"


@dataclasses.dataclass(frozen=True)
class CheckReport:
  """The checker's verdict on one file; ``str()`` is a table, ``to_json()`` for machines."""

  path: str
  format: str
  n: int
  m: int
  weights: tuple[WeightCheck, ...]
  rule: str

  @property
  def ok(self) -> bool:
    """Every expected weight is N:M along its consumer's reduction axis."""
    return all(w.ok for w in self.weights)

  @property
  def failures(self) -> tuple[WeightCheck, ...]:
    return tuple(w for w in self.weights if not w.ok)

  def by_name(self) -> dict[str, WeightCheck]:
    return {w.name: w for w in self.weights}

  def by_param(self) -> dict[str, WeightCheck]:
    return {w.param: w for w in self.weights if w.param}

  def summary(self) -> str:
    nm = sum(w.nm for w in self.weights)
    exp = sum(w.expected for w in self.weights)
    verdict = (
      "OK" if self.ok else f"FAILED: {len(self.failures)} expected weight(s) not {self.n}:{self.m}"
    )
    return (
      f"{self.path} ({self.format}): {len(self.weights)} weight(s), {nm} {self.n}:{self.m} "
      f"along the consumer's reduction axis, {exp} expected sparse; {verdict}"
    )

  def format_table(self) -> str:
    head = (
      "weight",
      "param",
      "shape",
      "consumer",
      "axis",
      f"{self.n}:{self.m}",
      "zeros",
      "expected",
      "status",
      "note",
    )
    rows = []
    for w in self.weights:
      nm = (
        "yes" if w.nm else ("-" if not w.applicable else f"no ({w.bad_groups}/{w.groups} groups)")
      )
      rows.append(
        (
          w.name,
          w.param or "-",
          "x".join(map(str, w.shape)) or "()",
          w.consumer,
          "-" if w.axis is None else ",".join(map(str, w.axis)),
          nm,
          f"{100 * w.zero_fraction:.1f}%",
          f"yes ({w.expected_by})" if w.expected else "no",
          w.status,
          w.note,
        )
      )
    lines = [self.summary(), f"expected sparse: {self.rule}"]
    if rows:
      widths = [max(len(str(r[i])) for r in rows + [head]) for i in range(len(head))]
      fmt = lambda r: "  ".join(str(c).ljust(wd) for c, wd in zip(r, widths)).rstrip()
      lines += [fmt(head), fmt(tuple("-" * wd for wd in widths))] + [fmt(r) for r in rows]
    return "\n".join(lines)

  def __str__(self) -> str:
    return self.format_table()

  def to_dict(self) -> dict:
    return {
      "path": self.path,
      "format": self.format,
      "n": self.n,
      "m": self.m,
      "ok": self.ok,
      "rule": self.rule,
      "weights": [dict(dataclasses.asdict(w), status=w.status, ok=w.ok) for w in self.weights],
    }

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=1)


@dataclasses.dataclass
class _Candidate:
  """A weight found in a file, before the N:M verdict."""

  name: str
  array: np.ndarray
  consumer: str
  axes: list[tuple[int, ...]]  # one entry per consumer (empty: unknown)
  param: str | None = None
  marked: str = ""  # "metadata" | "mask" when the file says it was pruned
  note: str = ""
  mask: np.ndarray | None = None


def _run_of_axes(axes: tuple[int, ...], ndim: int) -> tuple[int, ...] | None:
  """``axes`` normalised and sorted if they are a run of consecutive axes of ``range(ndim)``."""
  if not axes or any(not -ndim <= a < ndim for a in axes):
    return None
  out = sorted(a % ndim for a in axes)
  return tuple(out) if out == list(range(out[0], out[0] + len(out))) else None


def _verdict(
  c: _Candidate, n: int, m: int, regexes: Sequence[str], min_zeros: float
) -> WeightCheck:
  w = c.array
  z = _nm.zero_fraction(w)
  notes = [c.note] if c.note else []
  axes_list = [ax for ax in dict.fromkeys(c.axes) if ax]
  applicable, nm, groups, bad = False, False, 0, 0
  odd = [ax for ax in axes_list if _run_of_axes(ax, w.ndim) is None]
  if odd:
    notes.append(
      "reduction axes "
      + "; ".join(",".join(map(str, a)) for a in odd)
      + " are not a run of consecutive axes of the stored tensor: not checked"
    )
  elif axes_list:
    stats = [_nm.nm_stats(w, ax, n, m) for ax in axes_list]
    applicable = all(s.applicable for s in stats)
    nm = applicable and all(s.nm for s in stats)
    groups = sum(s.groups for s in stats)
    bad = sum(s.bad_groups for s in stats)
    if len(axes_list) > 1:
      notes.append(
        "consumed along several axes: " + "; ".join(",".join(map(str, a)) for a in axes_list)
      )
    if not applicable:
      k = [int(np.prod([w.shape[a] for a in ax])) for ax in axes_list]
      notes.append(f"reduction size {k[0] if len(k) == 1 else k} is not a multiple of {m}")
    elif not nm and z > 0:
      other = _nm.nm_axes(w, n, m, skip=[a for ax in axes_list for a in ax])
      if other:
        notes.append(
          f"{n}:{m} along axis {','.join(map(str, other))} instead: "
          "the wrong axis for this consumer"
        )
  if c.mask is not None:
    outside = int(np.count_nonzero((w != 0) & ~c.mask.astype(bool)))
    if outside:
      nm = False
      notes.append(f"{outside} non-zero(s) where its mask is False")
  if regexes:
    expected = any(re.search(r, c.name) or (c.param and re.search(r, c.param)) for r in regexes)
    by = "regex" if expected else ""
  elif c.marked:
    expected, by = True, c.marked
  elif z >= min_zeros:
    expected, by = True, "zeros"
  else:
    expected, by = False, ""
  return WeightCheck(
    name=c.name,
    param=c.param,
    shape=tuple(int(d) for d in w.shape),
    dtype=str(w.dtype),
    consumer=c.consumer,
    axis=axes_list[0] if axes_list else None,
    applicable=applicable,
    nm=bool(nm),
    groups=groups,
    bad_groups=bad,
    zero_fraction=z,
    expected=bool(expected),
    expected_by=by,
    note="; ".join(notes),
  )


def _report(
  path: str,
  fmt: str,
  cands: list[_Candidate],
  n: int,
  m: int,
  expect_sparse: str | Sequence[str] | None,
  min_zeros: float | None,
) -> CheckReport:
  try:
    check_nm(n, m)
  except (TypeError, ValueError) as e:
    raise CheckError(str(e)) from None
  regexes = [expect_sparse] if isinstance(expect_sparse, str) else list(expect_sparse or ())
  for r in regexes:
    try:
      re.compile(r)
    except re.error as e:
      raise CheckError(f"--expect-sparse {r!r} is not a valid regular expression: {e}") from None
  if min_zeros is None:
    min_zeros = 0.8 * (m - n) / m
  if regexes:
    rule = "weights matching " + " or ".join(repr(r) for r in regexes)
  else:
    rule = (
      f"weights the file marks as pruned (metadata or masks), and any weight with "
      f">= {100 * min_zeros:.0f}% zeros"
    )
  weights = tuple(_verdict(c, n, m, regexes, min_zeros) for c in cands)
  return CheckReport(path, fmt, n, m, weights, rule)


# ----------------------------------------------------------------------------
# jasp's metadata (ONNX metadata_props, the safetensors header, a SavedModel's jasp.json).


def _short(value: Any) -> str:
  r = repr(value)
  return r if len(r) <= 60 else r[:57] + "..."


def _is_int(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _int_list(value: Any, *, nonneg: bool) -> bool:
  return isinstance(value, list) and all(_is_int(v) and (v >= 0 or not nonneg) for v in value)


def _jasp_meta(meta: Any, where: str) -> dict:
  """jasp's metadata, checked field by field (the fields the checker reads).

  Raises:
    CheckError: naming the first malformed field.
  """
  where = f"{where}: jasp metadata"
  if not isinstance(meta, dict):
    raise CheckError(f"{where} must be a JSON object, got {type(meta).__name__} {_short(meta)}.")
  for key in ("n", "m"):
    if key in meta and not (_is_int(meta[key]) and meta[key] >= 1):
      raise CheckError(f"{where}: {key!r} must be a positive integer, got {_short(meta[key])}.")
  n, m = meta.get("n", 2), meta.get("m", 4)
  if m < 2 or not n < m:
    raise CheckError(f"{where}: 'n' and 'm' must give 1 <= n < m, got n={n}, m={m}.")
  for key in ("layout", "var_prefix", "producer"):
    if key in meta and not isinstance(meta[key], str):
      raise CheckError(f"{where}: {key!r} must be a string, got {_short(meta[key])}.")
  if meta.get("layout", "torch") not in ("torch", "flax"):
    raise CheckError(f"{where}: 'layout' must be 'torch' or 'flax', got {_short(meta['layout'])}.")
  weights = meta.get("weights", {})
  if not isinstance(weights, dict):
    raise CheckError(
      f"{where}: 'weights' must be an object {{name: {{...}}}}, got "
      f"{type(weights).__name__} {_short(weights)}."
    )
  for name, rec in weights.items():
    at = f"{where}: weights[{name!r}]"
    if not isinstance(rec, dict):
      raise CheckError(f"{at} must be an object, got {type(rec).__name__} {_short(rec)}.")
    if not isinstance(rec.get("pruned"), bool):
      raise CheckError(
        f"{at}.pruned must be true or false, got "
        + ("nothing" if "pruned" not in rec else _short(rec["pruned"]))
        + "."
      )
    for key in ("path", "kind"):
      if key in rec and not isinstance(rec[key], str):
        raise CheckError(f"{at}.{key} must be a string, got {_short(rec[key])}.")
    if "layer" in rec and not _int_list(rec["layer"], nonneg=True):
      raise CheckError(
        f"{at}.layer must be a list of non-negative integers, got {_short(rec['layer'])}."
      )
    if rec.get("axis") is not None and not (_int_list(rec["axis"], nonneg=False) and rec["axis"]):
      raise CheckError(
        f"{at}.axis must be null or a non-empty list of integers, got {_short(rec['axis'])}."
      )
  return meta


def _unverified(
  where: str, recorded: Mapping[str, Any], found: set[str], why: Mapping[str, str]
) -> None:
  """Raises :class:`CheckError` when the metadata marks as pruned a weight the check did not see."""
  lost = [name for name, rec in recorded.items() if rec["pruned"] and name not in found]
  if not lost:
    return
  items = []
  for name in lost[:10]:
    path = recorded[name].get("path")
    items.append(
      f"{name}"
      + (f" ({path})" if path and path != name else "")
      + f": {why.get(name, 'not in the file')}"
    )
  more = f"; and {len(lost) - 10} more" if len(lost) > 10 else ""
  raise CheckError(
    f"{where}: jasp's metadata marks {len(lost)} weight(s) as pruned that the "
    f"check cannot verify: {'; '.join(items)}{more}."
  )


# ----------------------------------------------------------------------------
# ONNX.


def _onnx_itemsizes() -> dict[int, int]:
  from onnx import TensorProto

  sizes = {
    "FLOAT": 4,
    "UINT8": 1,
    "INT8": 1,
    "UINT16": 2,
    "INT16": 2,
    "INT32": 4,
    "INT64": 8,
    "BOOL": 1,
    "FLOAT16": 2,
    "DOUBLE": 8,
    "UINT32": 4,
    "UINT64": 8,
    "BFLOAT16": 2,
    "FLOAT8E4M3FN": 1,
    "FLOAT8E4M3FNUZ": 1,
    "FLOAT8E5M2": 1,
    "FLOAT8E5M2FNUZ": 1,
  }
  return {getattr(TensorProto, k): v for k, v in sizes.items() if hasattr(TensorProto, k)}


def _onnx_external(t, base: str, where: str, budget: Budget, itemsizes: dict) -> None:
  """Reads a tensor's external data into ``raw_data``: inside ``base``, bounded, size-checked."""
  from onnx import TensorProto

  at = f"{where}: tensor {t.name!r}'s external data"
  info: dict[str, str] = {}
  for e in t.external_data:
    if not (isinstance(e.key, str) and isinstance(e.value, str)):
      raise CheckError(f"{at}: a key or value that is not UTF-8 text.")
    if e.key in info:
      raise CheckError(f"{at}: the key {e.key!r} appears twice.")
    info[e.key] = e.value
  loc = info.get("location", "")
  if not loc or os.path.isabs(loc) or os.path.splitdrive(loc)[0]:
    raise CheckError(f"{at}: the location {loc!r} is not a path relative to the model's directory.")
  root = os.path.realpath(base)
  full = os.path.realpath(os.path.join(root, loc))
  try:
    inside = os.path.commonpath([root, full]) == root
  except ValueError:  # another drive
    inside = False
  if not inside:
    raise CheckError(f"{at}: the location {loc!r} points outside the model's directory.")
  nums = {}
  for key in ("offset", "length"):
    v = info.get(key)
    if v is not None and not (v.isascii() and v.isdigit() and len(v) <= 20):
      raise CheckError(f"{at}: {key} {v!r} is not a non-negative integer.")
    nums[key] = None if v is None else int(v)
  size = itemsizes.get(t.data_type)
  if size is None:
    raise CheckError(f"{at}: external data of data type {t.data_type} is not supported.")
  want = _safe_read.nbytes_of(list(t.dims), size, at)
  if nums["length"] is not None and nums["length"] != want:
    raise CheckError(
      f"{at}: declares {nums['length']} bytes, but dims {list(t.dims)} of "
      f"{size}-byte elements need {want}."
    )
  try:
    t.raw_data = _safe_read.read_bytes(
      full, budget, offset=nums["offset"] or 0, length=want, exact=True
    )
  except CheckError as e:
    raise CheckError(f"{at}: {e}") from None
  del t.external_data[:]
  t.data_location = TensorProto.DEFAULT


def _onnx_prepare(model, where: str, base: str | None, budget: Budget) -> None:
  """Loads external data and checks that every tensor's data matches its dims."""
  from onnx import TensorProto
  from onnx import helper

  itemsizes = _onnx_itemsizes()
  bad = _onnx_graph.non_text_name(model.graph)
  if bad is not None:
    raise CheckError(f"{where}: a name or op type that is not UTF-8 text ({bad[:40]!r}).")
  for t in _onnx_graph.tensors(model.graph):
    at = f"{where}: tensor {t.name!r}"
    if any(d < 0 for d in t.dims):
      raise CheckError(f"{at}: a negative dimension in {list(t.dims)}.")
    if t.data_location == TensorProto.EXTERNAL:
      if base is None:
        raise CheckError(f"{at} keeps its data in an external file; pass the model's path.")
      _onnx_external(t, base, where, budget, itemsizes)
    size = itemsizes.get(t.data_type)
    if size is None:
      continue  # strings, complex and sub-byte types are never read as weights
    count = math.prod(t.dims)
    if t.HasField("raw_data"):
      have, want, unit = len(t.raw_data), count * size, "bytes"
    else:
      have, want, unit = (
        len(getattr(t, helper.tensor_dtype_to_field(t.data_type))),
        count,
        "elements",
      )
    if have != want:
      raise CheckError(
        f"{at}: dims {list(t.dims)} need {want} {unit} of data, the file holds {have}."
      )


def _onnx_meta(model, where: str) -> dict:
  values = [e.value for e in model.metadata_props if e.key == METADATA_KEY]
  if not values:
    return {}
  if len(values) > 1:
    raise CheckError(
      f"{where}: {len(values)} metadata_props entries named {METADATA_KEY!r}; one expected."
    )
  meta = _safe_read.loads_json(values[0], f"{where}: jasp metadata")
  return _jasp_meta(meta, where)


def _onnx_candidates(model, where: str, budget: Budget) -> tuple[list[_Candidate], dict]:
  """The weights of a prepared model (:func:`_onnx_prepare`), checked against its metadata."""
  from onnx import numpy_helper

  if not model.HasField("graph"):
    raise CheckError(f"{where}: no graph: not an ONNX model, or a file cut before its graph.")
  meta = _onnx_meta(model, where)
  recorded = meta.get("weights", {})
  itemsizes = _onnx_itemsizes()
  try:
    walker = _onnx_graph.WeightUses(model.graph)
  except CheckError as e:
    raise CheckError(f"{where}: {e}") from None
  cands, seen, why = [], set(), {}
  for graph, name, t in walker.constants():
    seen.add(name)
    if len(t.dims) < 1:
      why.setdefault(name, "a scalar")
      continue
    shape = tuple(int(d) for d in t.dims)
    try:
      uses = walker.follow(graph, name, shape)
    except CheckError as e:
      raise CheckError(f"{where}: {e}") from None
    mm = [(lbl, ax) for lbl, ax in uses if ax is not None]
    others = sorted({lbl for lbl, ax in uses if ax is None})
    if not mm:
      why.setdefault(
        name,
        "read by no MatMul/Gemm/Conv/Einsum the check can follow"
        + (f" (read by: {', '.join(others)})" if others else " (read by nothing)"),
      )
      continue
    if t.data_type not in itemsizes:
      why.setdefault(name, f"of ONNX data type {t.data_type}, which the check does not read")
      continue
    budget.charge(math.prod(shape) * itemsizes[t.data_type], f"{where}: tensor {name!r}")
    arr = numpy_helper.to_array(t)
    axes = [tuple(sorted(ax)) for _, ax in mm if ax]
    labels = list(dict.fromkeys(lbl for lbl, _ in mm))
    rec = recorded.get(name, {})
    param = rec.get("path")
    if param is not None and rec.get("layer"):
      param = f"{param}[{','.join(str(i) for i in rec['layer'])}]"
    note = ("also used by " + ", ".join(others)) if others else ""
    if any(not ax for _, ax in mm):
      note = "; ".join(x for x in (note, "depthwise: no channel groups") if x)
    cands.append(
      _Candidate(
        name, arr, ", ".join(labels), axes, param, "metadata" if rec.get("pruned") else "", note
      )
    )
  for name in recorded:
    if name not in seen:
      why.setdefault(name, "no initializer or Constant of that name in the graph")
  _unverified(where, recorded, {c.name for c in cands}, why)
  return cands, meta


def _read_onnx(path: str, budget: Budget):
  """The parsed ``ModelProto`` of ``path``, its external data read and every tensor checked."""
  onnx = require("onnx")
  from google.protobuf.message import DecodeError

  data = _safe_read.read_bytes(path, budget)
  if not data:
    raise CheckError(f"{path}: an empty file, not an ONNX model.")
  budget.charge(len(data), f"{path} (parsed)")
  model = onnx.ModelProto()
  try:
    model.ParseFromString(data)
  except DecodeError as e:
    raise CheckError(f"{path}: not an ONNX model: its protobuf does not parse ({e}).") from None
  del data
  _onnx_prepare(model, path, os.path.dirname(os.path.abspath(path)), budget)
  return model


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
  _onnx_prepare(model, where, None, budget)
  cands, meta = _onnx_candidates(model, where, budget)
  if require_weights and not cands:
    raise CheckError(f"{where}: no weights found: {_onnx_none_found(model)}.")
  n = n if n is not None else meta.get("n", 2)
  m = m if m is not None else meta.get("m", 4)
  return _report(where, "onnx", cands, n, m, expect_sparse, min_zeros)


def _onnx_none_found(model) -> str:
  graphs = _onnx_graph.all_graphs(model.graph)
  inits = sum(len(g.initializer) for g in graphs)
  nodes = sum(len(g.node) for g in graphs)
  return (
    f"no initializer feeds a MatMul, Gemm, Conv or Einsum ({inits} initializer(s), {nodes} node(s))"
  )


# ----------------------------------------------------------------------------
# Pytrees (flax checkpoints), safetensors, SavedModel.


def _tree_candidates(
  flat: Mapping[str, Any], *, layouts: Mapping[str, Any] | None = None
) -> list[_Candidate]:
  marks: dict[str, np.ndarray] = {}
  for p, x in flat.items():
    parts = p.split("/")
    if parts[0] == "masks" and np.asarray(x).dtype == np.bool_:
      marks["/".join(parts[1:])] = np.asarray(x)
  cands = []
  for p, x in flat.items():
    parts = p.split("/")
    if "opt_state" in parts or parts[0] == "masks":
      continue
    arr = np.asarray(x)
    if arr.dtype.kind not in "fV" or arr.ndim < 2:
      continue
    lay = layouts.get(p) if layouts is not None else None
    if lay is None:
      lay = layouts_lib.convention_layout(p, arr)
    if lay.axis is None:
      continue
    rel = "/".join(parts[1:]) if parts[0] == "params" else p
    mk = marks.get(rel, marks.get(p))
    if mk is not None and mk.shape != arr.shape:
      mk = None
    cands.append(
      _Candidate(p, arr, lay.kind, [tuple(lay.axis)], p, "mask" if mk is not None else "", mask=mk)
    )
  return cands


def _tree_none_found(flat: Mapping[str, Any]) -> str:
  return (
    f"none of its {len(flat)} array(s) is a matmul/conv kernel by flax's conventions "
    "(a floating-point 'kernel' leaf of rank >= 2)"
  )


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
  return _report(
    name, "pytree", _tree_candidates(flat, layouts=layouts), n, m, expect_sparse, min_zeros
  )


# safetensors dtypes and their sizes in bytes.
_ST_ITEMSIZE = {
  "BOOL": 1,
  "U8": 1,
  "I8": 1,
  "F8_E5M2": 1,
  "F8_E4M3": 1,
  "I16": 2,
  "U16": 2,
  "F16": 2,
  "BF16": 2,
  "I32": 4,
  "U32": 4,
  "F32": 4,
  "I64": 8,
  "U64": 8,
  "F64": 8,
}
_ST_MAX_HEADER = 100 << 20  # the format's own limit on the JSON header


def _safetensors_header(path: str, budget: Budget) -> tuple[dict, dict]:
  """``(tensor entries, __metadata__)`` of a ``.safetensors`` header, checked against the file."""
  size = _safe_read.regular_size(path)
  if size < 8:
    raise CheckError(
      f"{path}: {size} byte(s), shorter than a safetensors header's length field (8)."
    )
  hlen = int.from_bytes(_safe_read.read_bytes(path, budget, length=8, exact=True), "little")
  if hlen > size - 8 or hlen > _ST_MAX_HEADER:
    raise CheckError(
      f"{path}: the safetensors header declares {hlen} bytes, but the file holds "
      f"{size - 8} after its length field (and at most {_ST_MAX_HEADER} are "
      "allowed)."
    )
  header = _safe_read.loads_json(
    _safe_read.read_bytes(path, budget, offset=8, length=hlen, exact=True),
    f"{path}: safetensors header",
  )
  if not isinstance(header, dict):
    raise CheckError(f"{path}: the safetensors header is not a JSON object.")
  meta = header.pop("__metadata__", None)
  if meta is None:
    meta = {}
  if not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
    raise CheckError(f"{path}: the safetensors header's __metadata__ must map names to strings.")
  data = size - 8 - hlen
  for key, ent in header.items():
    at = f"{path}: tensor {key!r}"
    if not (
      isinstance(ent, dict)
      and isinstance(ent.get("dtype"), str)
      and isinstance(ent.get("shape"), list)
      and isinstance(ent.get("data_offsets"), list)
    ):
      raise CheckError(f"{at}: its header entry needs dtype, shape and data_offsets.")
    size_of = _ST_ITEMSIZE.get(ent["dtype"])
    if size_of is None:
      raise CheckError(f"{at}: unknown dtype {_short(ent['dtype'])}.")
    want = _safe_read.nbytes_of(ent["shape"], size_of, at)
    offs = ent["data_offsets"]
    if not (len(offs) == 2 and all(_is_int(o) for o in offs) and 0 <= offs[0] <= offs[1] <= data):
      raise CheckError(f"{at}: data_offsets {_short(offs)} are not inside the {data} data bytes.")
    if offs[1] - offs[0] != want:
      raise CheckError(
        f"{at}: shape {ent['shape']} of {ent['dtype']} needs {want} bytes, "
        f"data_offsets give {offs[1] - offs[0]}."
      )
  return header, meta


def _safetensors_candidates(path: str, layout: str | None, budget: Budget):
  safetensors = require("safetensors")
  header, raw_meta = _safetensors_header(path, budget)
  meta: dict = {}
  if torch_layout.SAFETENSORS_METADATA_KEY in raw_meta:
    meta = _jasp_meta(
      _safe_read.loads_json(
        raw_meta[torch_layout.SAFETENSORS_METADATA_KEY], f"{path}: jasp metadata"
      ),
      path,
    )
  budget.charge(
    sum(e["data_offsets"][1] - e["data_offsets"][0] for e in header.values()), f"{path} (tensors)"
  )
  try:
    tensors, _ = torch_layout.read_safetensors(path)
  except safetensors.SafetensorError as e:
    raise CheckError(f"{path}: safetensors cannot read it ({e}).") from None
  info = meta.get("weights", {})
  layout = layout or meta.get("layout", "torch")
  if layout == "flax":
    flat = {k.replace(".", "/"): v for k, v in tensors.items()}
    cands = _tree_candidates(flat)
    _unverified(path, info, {c.name.replace("/", ".") for c in cands}, {})
    return cands, meta, _tree_none_found(flat)
  masks = {}
  for k, v in tensors.items():
    mod, _, leaf = k.rpartition(".")
    mm = re.fullmatch(r"__(.+)_mma_mask", leaf) or re.fullmatch(r"(.+)_mask", leaf)
    if mm:
      masks[f"{mod}.{mm.group(1)}" if mod else mm.group(1)] = v
  mask_keys = {k for k in tensors if k.endswith("_mask")}
  cands, why = [], {}
  for k, v in tensors.items():
    if k in mask_keys:
      continue
    arr = np.asarray(v)
    rec = info.get(k)
    if rec is not None:
      if rec.get("kind", "none") == "none":
        why[k] = "its metadata says it feeds no matmul/conv (kind 'none')"
        continue
      if arr.ndim < 2:
        why[k] = f"a {arr.ndim}-D tensor, not a matmul/conv weight"
        continue
      kind = "linear" if rec["kind"] == "dot" else f"conv{arr.ndim - 2}d"
      param = rec.get("path")
    else:
      leaf = k.rpartition(".")[2]
      if arr.ndim < 2 or arr.dtype.kind not in "fV" or leaf != "weight" or "embed" in k.lower():
        continue
      kind = "linear" if arr.ndim == 2 else f"conv{arr.ndim - 2}d"
      param = None
    mk = masks.get(k)
    if mk is not None and tuple(mk.shape) != arr.shape:
      mk = None
    marked = "metadata" if (rec or {}).get("pruned") else ("mask" if mk is not None else "")
    cands.append(_Candidate(k, arr, kind, [(1,)], param, marked, mask=mk))
  for k in info:
    if k in mask_keys:
      why.setdefault(k, "a mask tensor, not a weight")
  _unverified(path, info, {c.name for c in cands}, why)
  return (
    cands,
    meta,
    (
      f"none of its {len(tensors)} tensor(s) is a matmul/conv weight "
      "(a 'weight' of rank >= 2, or one jasp's metadata names)"
    ),
  )


# What TensorFlow's checkpoint reader raises on a corrupt index or data file, besides its
# own tf.errors.OpError (its C++ reader's errors, translated by pybind11).
_TF_ERRORS = (ValueError, IndexError, RuntimeError)


def _unescape_tf(name: str) -> str:
  # TF object-graph keys escape "/" as ".S" and "." as "..".
  return re.sub(r"\.(S|\.)", lambda mt: "/" if mt.group(1) == "S" else ".", name)


def _savedmodel_candidates(path: str, budget: Budget):
  tf = require("tensorflow")
  _safe_read.check_tree(path)
  meta: dict = {}
  jp = os.path.join(path, JASP_JSON)
  if os.path.exists(jp):
    meta = _jasp_meta(_safe_read.loads_json(_safe_read.read_bytes(jp, budget), jp), jp)
  prefix = meta.get("var_prefix")
  recorded = meta.get("weights", {})
  vdir = os.path.join(path, "variables")
  index = os.path.join(vdir, "variables.index")
  if not os.path.exists(index):
    raise CheckError(
      f"{path}: no variables/variables.index: a SavedModel without variables (no weights to check)."
    )
  budget.charge(_safe_read.regular_size(index), index)
  data_size = sum(
    _safe_read.regular_size(os.path.join(vdir, f))
    for f in os.listdir(vdir)
    if f.startswith("variables.data-")
  )
  try:
    reader = tf.train.load_checkpoint(os.path.join(vdir, "variables"))
    shapes = reader.get_variable_to_shape_map()
    dtypes = reader.get_variable_to_dtype_map()
  except _TF_ERRORS + (tf.errors.OpError,) as e:
    raise CheckError(f"{path}: TensorFlow cannot read its variables ({_first_line(e)}).") from None
  suffix = "/.ATTRIBUTES/VARIABLE_VALUE"
  todo, declared = [], 0
  for key in sorted(shapes):
    if not key.endswith(suffix) or not (dtypes[key].is_floating or dtypes[key].is_integer):
      continue
    nbytes = _safe_read.nbytes_of(list(shapes[key]), dtypes[key].size, f"{path}: {key}")
    declared += nbytes
    if declared > data_size:
      raise CheckError(
        f"{path}: the variables declare at least {declared} bytes "
        f"({key}: {list(shapes[key])} {dtypes[key].name}), but its data files "
        f"hold {data_size}."
      )
    if dtypes[key].is_floating:
      todo.append((key, nbytes))
  cands, found = [], set()
  for key, nbytes in todo:
    name = key[: -len(suffix)]
    p = _unescape_tf(name)
    if prefix and p.startswith(prefix + "/"):
      p = p[len(prefix) + 1 :]
    rec = recorded.get(p)
    if rec is None and len(shapes[key]) < 2:
      continue
    if rec is not None and rec.get("axis") is None:
      continue
    budget.charge(nbytes, f"{path}: {key}")
    try:
      arr = np.asarray(reader.get_tensor(key))
    except _TF_ERRORS + (tf.errors.OpError,) as e:
      raise CheckError(f"{path}: TensorFlow cannot read {key} ({_first_line(e)}).") from None
    if arr.shape != tuple(shapes[key]):
      raise CheckError(
        f"{path}: {key} reads as {arr.shape}, its index declares {tuple(shapes[key])}."
      )
    if rec is not None:
      axis = _run_of_axes(tuple(rec["axis"]), arr.ndim)
      if axis is None:
        raise CheckError(
          f"{jp}: jasp metadata: weights[{p!r}].axis {rec['axis']} is not a run "
          f"of consecutive axes of its {arr.ndim}-D variable."
        )
      cands.append(
        _Candidate(
          name, arr, rec.get("kind", "dot"), [axis], p, "metadata" if rec["pruned"] else ""
        )
      )
      found.add(p)
      continue
    lay = layouts_lib.convention_layout(p, arr)
    if lay.axis is not None:
      cands.append(_Candidate(name, arr, lay.kind, [tuple(lay.axis)], p))
  _unverified(path, recorded, found, {})
  return (
    cands,
    meta,
    (f"none of its {len(todo)} floating-point variable(s) is a matmul/conv kernel"),
  )


def _first_line(e: BaseException) -> str:
  text = str(e).strip()
  line = text.splitlines()[0] if text else type(e).__name__
  return line[:300]


# flax's msgpack extension codes (flax.serialization): an ndarray, a complex, a numpy scalar.
_MP_NDARRAY, _MP_COMPLEX, _MP_SCALAR = 1, 2, 3
_MP_DTYPES = (
  "bool",
  "int8",
  "int16",
  "int32",
  "int64",
  "uint8",
  "uint16",
  "uint32",
  "uint64",
  "float16",
  "float32",
  "float64",
  "complex64",
  "complex128",
  "bfloat16",
  "float8_e4m3fn",
  "float8_e5m2",
  "float8_e4m3fnuz",
  "float8_e5m2fnuz",
  "float8_e4m3b11fnuz",
)
_MAX_TREE_DEPTH = 64


def _mp_dtype(name: Any, where: str) -> np.dtype:
  if isinstance(name, bytes):
    name = name.decode("ascii", "replace")
  if name not in _MP_DTYPES:
    raise CheckError(f"{where}: an array of dtype {_short(name)}, not a numeric dtype.")
  if name in ("bfloat16",) or name.startswith("float8"):
    import ml_dtypes

    return np.dtype(getattr(ml_dtypes, name))
  return np.dtype(name)


def _mp_array(payload: bytes, where: str, budget: Budget) -> np.ndarray:
  """One array of flax's msgpack encoding ``(shape, dtype name, bytes)``, checked."""
  import msgpack

  try:
    parts = msgpack.unpackb(payload, raw=True, use_list=True)
  except (ValueError, TypeError) as e:  # msgpack's errors subclass ValueError
    raise CheckError(f"{where}: an array record that does not decode ({e}).") from None
  if not (
    isinstance(parts, list)
    and len(parts) == 3
    and isinstance(parts[2], bytes)
    and isinstance(parts[0], list)
  ):
    raise CheckError(f"{where}: an array record that is not (shape, dtype, bytes).")
  shape, dtype = parts[0], _mp_dtype(parts[1], where)
  want = _safe_read.nbytes_of(shape, dtype.itemsize, where)
  if want != len(parts[2]):
    raise CheckError(
      f"{where}: an array of shape {_short(shape)} {dtype.name} needs {want} "
      f"bytes, the record holds {len(parts[2])}."
    )
  budget.charge(want, where)
  return np.frombuffer(parts[2], dtype=dtype).reshape(shape)


def _read_msgpack(path: str, budget: Budget) -> dict[str, np.ndarray]:
  """``{path: array}`` of a flax msgpack file (flax's encoding, every size checked)."""
  import msgpack

  data = _safe_read.read_bytes(path, budget)

  def ext(code, payload):
    if code in (_MP_NDARRAY, _MP_SCALAR):
      return _mp_array(payload, path, budget)
    return None  # a complex number or an unknown extension: not a weight

  try:
    tree = msgpack.unpackb(data, ext_hook=ext, raw=False, strict_map_key=False, use_list=False)
  except CheckError:
    raise
  except (ValueError, TypeError) as e:  # msgpack's errors; TypeError: a map used as a map key
    raise CheckError(f"{path}: not msgpack data ({_first_line(e)}).") from None
  if not isinstance(tree, dict):
    raise CheckError(f"{path}: the msgpack data is a {type(tree).__name__}, not a flax state dict.")
  flat: dict[str, np.ndarray] = {}
  stack = [((), tree)]
  while stack:
    keys, node = stack.pop()
    if len(keys) > _MAX_TREE_DEPTH:
      raise CheckError(f"{path}: the state dict is nested more than {_MAX_TREE_DEPTH} levels deep.")
    if isinstance(node, dict) and "__msgpack_chunked_array__" in node:
      node = _mp_chunked(node, f"{path}: {'/'.join(keys)}", budget)
    if isinstance(node, dict):
      stack.extend((keys + (str(k),), v) for k, v in node.items())
    elif isinstance(node, np.ndarray):
      flat["/".join(keys)] = node
  return dict(sorted(flat.items()))


def _mp_chunked(node: dict, where: str, budget: Budget) -> np.ndarray:
  """A large array that flax wrote in chunks (``{"chunks": {...}, "shape": {...}}``)."""
  chunks, shape = node.get("chunks"), node.get("shape")
  if not (isinstance(chunks, dict) and isinstance(shape, dict)):
    raise CheckError(f"{where}: a chunked array without its chunks and shape.")
  order = sorted(chunks, key=lambda k: int(k) if str(k).isdigit() else -1)
  dims = [shape[k] for k in sorted(shape, key=lambda k: int(k) if str(k).isdigit() else -1)]
  parts = [chunks[k] for k in order]
  if (
    not parts
    or not all(isinstance(p, np.ndarray) and p.ndim == 1 for p in parts)
    or len({p.dtype for p in parts}) != 1
  ):
    raise CheckError(f"{where}: a chunked array whose chunks are not 1-D arrays of one dtype.")
  want = _safe_read.nbytes_of(dims, 1, where)
  have = sum(p.size for p in parts)
  if want != have:
    raise CheckError(
      f"{where}: a chunked array of shape {_short(dims)} ({want} elements) holds {have}."
    )
  budget.charge(have * parts[0].dtype.itemsize, where)
  return np.concatenate(parts).reshape(dims)


_ORBAX_MARKERS = ("_CHECKPOINT_METADATA", "_METADATA", "manifest.ocdbt", "_sharding")
_MAX_STEP_DEPTH = 8


def _orbax_dir(path: str) -> str | None:
  """The orbax checkpoint directory at or under ``path`` (latest step, single item)."""
  for _ in range(_MAX_STEP_DEPTH):
    if any(os.path.exists(os.path.join(path, mk)) for mk in _ORBAX_MARKERS):
      items = [
        d
        for d in sorted(os.listdir(path))
        if os.path.isdir(os.path.join(path, d))
        and any(os.path.exists(os.path.join(path, d, mk)) for mk in _ORBAX_MARKERS[1:])
      ]
      if not os.path.exists(os.path.join(path, "_METADATA")) and len(items) == 1:
        return os.path.join(path, items[0])  # a step directory holding one item
      return path
    steps = [d for d in os.listdir(path) if d.isdigit() and os.path.isdir(os.path.join(path, d))]
    if not steps:
      return None
    path = os.path.join(path, max(steps, key=int))
  return None


def _orbax_restore_args(ocp, meta_tree, where: str, budget: Budget):
  """Restore arguments (host numpy arrays) for every array leaf, sizes checked on ``budget``."""
  import jax

  def one(leaf):
    shape, dtype = getattr(leaf, "shape", None), getattr(leaf, "dtype", None)
    if shape is None or dtype is None:
      return ocp.RestoreArgs()
    name = getattr(leaf, "name", "an array")
    try:
      itemsize = np.dtype(dtype).itemsize
    except (TypeError, ValueError):
      raise CheckError(f"{where}: {name} has dtype {_short(dtype)}, not a numeric dtype.") from None
    at = f"{where}: {name}"
    as_int = lambda dims: [int(d) if isinstance(d, (int, np.integer)) else d for d in dims]
    nbytes = _safe_read.nbytes_of(as_int(shape), itemsize, at)
    chunk = getattr(getattr(leaf, "storage", None), "chunk_shape", None)
    if chunk is not None:  # the reader decodes one whole chunk at a time
      nbytes += _safe_read.nbytes_of(as_int(chunk), itemsize, at + " (one chunk)")
    budget.charge(
      nbytes,
      f"{at} (shape {tuple(shape)}"
      + (f", chunks {tuple(chunk)}" if chunk is not None else "")
      + ")",
    )
    return ocp.RestoreArgs(restore_type=np.ndarray)

  return jax.tree.map(one, meta_tree)


def _read_orbax(path: str, budget: Budget):
  ocp = require("orbax.checkpoint")
  d = _orbax_dir(path)
  if d is None:
    raise CheckError(
      f"{path}: not an orbax checkpoint directory (no _CHECKPOINT_METADATA, "
      "_METADATA or step sub-directories)."
    )
  d = os.path.abspath(d)
  if not any(os.path.exists(os.path.join(d, mk)) for mk in _ORBAX_MARKERS[1:]):
    items = sorted(x for x in os.listdir(d) if os.path.isdir(os.path.join(d, x)))
    raise CheckError(
      f"{d}: an orbax step directory without one tree item to read "
      f"(items: {', '.join(items) or 'none'}); pass the item's directory."
    )
  _safe_read.check_tree(d, budget)
  with ocp.PyTreeCheckpointer() as ckptr:
    try:
      meta = ckptr.metadata(d)
    except _ORBAX_ERRORS as e:
      raise CheckError(
        f"{d}: orbax cannot read the checkpoint's metadata ({type(e).__name__}: {_first_line(e)})."
      ) from None
    meta = getattr(meta, "item_metadata", meta)
    meta_tree = getattr(meta, "tree", meta)
    if meta_tree is None:
      raise CheckError(f"{d}: orbax finds no tree metadata in the checkpoint.")
    args = _orbax_restore_args(ocp, meta_tree, d, budget)
    try:  # restored as host numpy arrays: no devices, no sharding needed
      tree = ckptr.restore(d, restore_args=args)
    except _ORBAX_ERRORS as e:
      raise CheckError(
        f"{d}: orbax cannot restore the checkpoint ({type(e).__name__}: {_first_line(e)})."
      ) from None
  flat = {p: np.asarray(x) for p, x in _tree.leaves_by_path(tree).items() if hasattr(x, "dtype")}
  return flat, d


# What orbax (and tensorstore under it) raise on a checkpoint it cannot read: tensorstore's
# errors are ValueErrors; orbax's parsing of its JSON metadata raises KeyError, TypeError,
# AttributeError or AssertionError on fields of the wrong type, RuntimeError where pybind11
# cannot convert a value (a lone surrogate in a key); OSError for files. Only orbax's own
# calls are wrapped in it.
_ORBAX_ERRORS = (
  ValueError,
  KeyError,
  TypeError,
  AttributeError,
  AssertionError,
  RuntimeError,
  IndexError,
  OSError,
)


def detect_format(path: str) -> str:
  """The format of ``path``: one of :data:`FORMATS` (by name, then by content).

  Raises:
    CheckError: if the path does not exist, is not a regular file or
      directory, or its format is not recognised.
  """
  if not os.path.exists(path):
    raise CheckError(f"{path}: no such file or directory.")
  if os.path.isdir(path):
    if os.path.exists(os.path.join(path, "saved_model.pb")) or os.path.exists(
      os.path.join(path, "saved_model.pbtxt")
    ):
      return "savedmodel"
    if _orbax_dir(path) is not None:
      return "orbax"
    raise CheckError(
      f"{path}: a directory that is neither a TensorFlow SavedModel "
      "(saved_model.pb) nor an orbax checkpoint."
    )
  ext = os.path.splitext(path)[1].lower()
  by_ext = {
    ".onnx": "onnx",
    ".safetensors": "safetensors",
    ".msgpack": "msgpack",
    ".flax": "msgpack",
  }
  if ext in by_ext:
    return by_ext[ext]
  head = _safe_read.read_head(path, 16)
  if len(head) >= 9 and head[8:9] == b"{":
    return "safetensors"
  if head[:1] in (b"\x80", b"\x81", b"\x82", b"\x83", b"\xde", b"\xdf"):
    return "msgpack"
  if head[:1] == b"\x08":  # an ONNX ModelProto starts with ir_version (field 1, varint)
    return "onnx"
  raise CheckError(
    f"{path}: unsupported file format (expected .onnx, a SavedModel directory, "
    ".safetensors, a flax .msgpack or an orbax checkpoint directory)."
  )


def _budget(max_bytes: int | None) -> Budget:
  if max_bytes is not None and (not _is_int(max_bytes) or max_bytes < 1):
    raise CheckError(f"max_bytes must be a positive integer, got {max_bytes!r}.")
  return Budget(max_bytes)


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
  meta: dict = {}
  if fmt == "onnx":
    model = _read_onnx(path, budget)
    cands, meta = _onnx_candidates(model, path, budget)
    none_found = _onnx_none_found(model)
  elif fmt == "safetensors":
    cands, meta, none_found = _safetensors_candidates(path, layout, budget)
  elif fmt == "savedmodel":
    if not os.path.isdir(path):
      raise CheckError(f"{path}: a SavedModel is a directory; this is not one.")
    cands, meta, none_found = _savedmodel_candidates(path, budget)
  elif fmt == "msgpack":
    flat = _read_msgpack(path, budget)
    cands, none_found = _tree_candidates(flat), _tree_none_found(flat)
  else:
    if not os.path.isdir(path):
      raise CheckError(f"{path}: an orbax checkpoint is a directory; this is not one.")
    flat, resolved = _read_orbax(path, budget)
    cands, none_found = _tree_candidates(flat), _tree_none_found(flat)
    if resolved != os.path.abspath(path):
      path = f"{path} ({os.path.relpath(resolved, path)})"
  if require_weights and not cands:
    raise CheckError(f"{path}: no weights found: {none_found}.")
  n = n if n is not None else meta.get("n", 2)
  m = m if m is not None else meta.get("m", 4)
  return _report(path, fmt, cands, n, m, expect_sparse, min_zeros)
