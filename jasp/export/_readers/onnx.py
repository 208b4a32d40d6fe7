"""Reads an ``.onnx`` model: its tensors checked, its weights followed to their consumers."""

from __future__ import annotations

import math
import os

from jasp.export import _onnx_graph
from jasp.export import _safe_read
from jasp.export._deps import require
from jasp.export._format import METADATA_KEY
from jasp.export._meta import jasp_meta
from jasp.export._meta import unverified
from jasp.export._readers import Found
from jasp.export._safe_read import Budget
from jasp.export._safe_read import CheckError
from jasp.export._verdict import Candidate

__all__ = ["candidates", "none_found", "prepare", "read", "read_file"]

# ONNX data types the check reads, and their sizes in bytes.
_ITEMSIZES = {
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


def _itemsizes() -> dict[int, int]:
  """``{TensorProto data type: bytes per element}`` of the types this onnx defines."""
  from onnx import TensorProto

  return {getattr(TensorProto, k): v for k, v in _ITEMSIZES.items() if hasattr(TensorProto, k)}


def _external_info(t, at: str) -> dict[str, str]:
  """A tensor's ``external_data`` entries as a dict (text keys and values, none repeated)."""
  info: dict[str, str] = {}
  for e in t.external_data:
    if not (isinstance(e.key, str) and isinstance(e.value, str)):
      raise CheckError(f"{at}: a key or value that is not UTF-8 text.")
    if e.key in info:
      raise CheckError(f"{at}: the key {e.key!r} appears twice.")
    info[e.key] = e.value
  return info


def _external_path(base: str, loc: str, at: str) -> str:
  """The real path of the external data file ``loc``, which must lie inside ``base``."""
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
  return full


def _external_number(info: dict[str, str], key: str, at: str) -> int | None:
  """The ``offset`` or ``length`` entry as an int (at most 20 digits); None when absent."""
  v = info.get(key)
  if v is not None and not (v.isascii() and v.isdigit() and len(v) <= 20):
    raise CheckError(f"{at}: {key} {v!r} is not a non-negative integer.")
  return None if v is None else int(v)


def _external(t, base: str, where: str, budget: Budget, itemsizes: dict) -> None:
  """Reads a tensor's external data into ``raw_data``: inside ``base``, bounded, size-checked."""
  from onnx import TensorProto

  at = f"{where}: tensor {t.name!r}'s external data"
  info = _external_info(t, at)
  full = _external_path(base, info.get("location", ""), at)
  offset = _external_number(info, "offset", at)
  length = _external_number(info, "length", at)
  size = itemsizes.get(t.data_type)
  if size is None:
    raise CheckError(f"{at}: external data of data type {t.data_type} is not supported.")
  want = _safe_read.nbytes_of(list(t.dims), size, at)
  if length is not None and length != want:
    raise CheckError(
      f"{at}: declares {length} bytes, but dims {list(t.dims)} of {size}-byte elements need {want}."
    )
  try:
    t.raw_data = _safe_read.read_bytes(full, budget, offset=offset or 0, length=want, exact=True)
  except CheckError as e:
    raise CheckError(f"{at}: {e}") from None
  del t.external_data[:]
  t.data_location = TensorProto.DEFAULT


def _check_data_size(t, at: str, size: int) -> None:
  """Raises unless the data a tensor holds is what its dims need."""
  from onnx import helper

  count = math.prod(t.dims)
  if t.HasField("raw_data"):
    have, want, unit = len(t.raw_data), count * size, "bytes"
  else:
    have = len(getattr(t, helper.tensor_dtype_to_field(t.data_type)))
    want, unit = count, "elements"
  if have != want:
    raise CheckError(
      f"{at}: dims {list(t.dims)} need {want} {unit} of data, the file holds {have}."
    )


def prepare(model, where: str, base: str | None, budget: Budget) -> None:
  """Loads external data (files under ``base``) and checks every tensor's data against its dims.

  Raises:
    CheckError: a name that is not text, a negative dimension, external data
      without ``base`` or outside it, data of the wrong size.
  """
  from onnx import TensorProto

  itemsizes = _itemsizes()
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
      _external(t, base, where, budget, itemsizes)
    size = itemsizes.get(t.data_type)
    if size is not None:  # strings, complex and sub-byte types are never read as weights
      _check_data_size(t, at, size)


def _meta(model, where: str) -> dict:
  """jasp's metadata in the model's ``metadata_props`` (``{}`` when none)."""

  values = [e.value for e in model.metadata_props if e.key == METADATA_KEY]
  if not values:
    return {}
  if len(values) > 1:
    raise CheckError(
      f"{where}: {len(values)} metadata_props entries named {METADATA_KEY!r}; one expected."
    )
  meta = _safe_read.loads_json(values[0], f"{where}: jasp metadata")
  return jasp_meta(meta, where)


def _param(rec: dict) -> str | None:
  """The flax path a metadata record names (with its layer index for a stacked weight)."""
  param = rec.get("path")
  if param is not None and rec.get("layer"):
    param = f"{param}[{','.join(str(i) for i in rec['layer'])}]"
  return param


class _Weights:
  """The walk of one prepared model's constants to their consumers."""

  def __init__(self, model, where: str, budget: Budget, recorded: dict):
    self.where, self.budget, self.recorded = where, budget, recorded
    self.itemsizes = _itemsizes()
    try:
      self.walker = _onnx_graph.WeightUses(model.graph)
    except CheckError as e:
      raise CheckError(f"{where}: {e}") from None

  def _uses(self, graph, name: str, shape: tuple[int, ...]) -> list:
    try:
      return self.walker.follow(graph, name, shape)
    except CheckError as e:
      raise CheckError(f"{self.where}: {e}") from None

  def candidate(self, graph, name: str, t) -> Candidate | str:
    """The weight ``name`` (a ``TensorProto``), or why it is not one."""
    from onnx import numpy_helper

    if len(t.dims) < 1:
      return "a scalar"
    shape = tuple(int(d) for d in t.dims)
    uses = self._uses(graph, name, shape)
    mm = [(lbl, ax) for lbl, ax in uses if ax is not None]
    others = sorted({lbl for lbl, ax in uses if ax is None})
    if not mm:
      read_by = f" (read by: {', '.join(others)})" if others else " (read by nothing)"
      return "read by no MatMul/Gemm/Conv/Einsum the check can follow" + read_by
    if t.data_type not in self.itemsizes:
      return f"of ONNX data type {t.data_type}, which the check does not read"
    self.budget.charge(
      math.prod(shape) * self.itemsizes[t.data_type], f"{self.where}: tensor {name!r}"
    )
    notes = ["also used by " + ", ".join(others)] if others else []
    if any(not ax for _, ax in mm):
      notes.append("depthwise: no channel groups")
    rec = self.recorded.get(name, {})
    return Candidate(
      name,
      numpy_helper.to_array(t),
      ", ".join(dict.fromkeys(lbl for lbl, _ in mm)),
      [tuple(sorted(ax)) for _, ax in mm if ax],
      _param(rec),
      "metadata" if rec.get("pruned") else "",
      "; ".join(notes),
    )


def candidates(model, where: str, budget: Budget) -> tuple[list[Candidate], dict]:
  """The weights of a prepared model (:func:`prepare`), checked against its metadata.

  Returns:
    ``(weights, jasp metadata)``.

  Raises:
    CheckError: no graph; a graph too large to follow; metadata that is
      malformed or marks as pruned a weight the walk does not reach.
  """
  if not model.HasField("graph"):
    raise CheckError(f"{where}: no graph: not an ONNX model, or a file cut before its graph.")
  meta = _meta(model, where)
  recorded = meta.get("weights", {})
  weights = _Weights(model, where, budget, recorded)
  cands, seen, why = [], set(), {}
  for graph, name, t in weights.walker.constants():
    seen.add(name)
    got = weights.candidate(graph, name, t)
    if isinstance(got, str):
      why.setdefault(name, got)
    else:
      cands.append(got)
  for name in recorded:
    if name not in seen:
      why.setdefault(name, "no initializer or Constant of that name in the graph")
  unverified(where, recorded, {c.name for c in cands}, why)
  return cands, meta


def none_found(model) -> str:
  """Why a model holds no weight to check."""
  graphs = _onnx_graph.all_graphs(model.graph)
  inits = sum(len(g.initializer) for g in graphs)
  nodes = sum(len(g.node) for g in graphs)
  return (
    f"no initializer feeds a MatMul, Gemm, Conv or Einsum ({inits} initializer(s), {nodes} node(s))"
  )


def read_file(path: str, budget: Budget):
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
  prepare(model, path, os.path.dirname(os.path.abspath(path)), budget)
  return model


def read(path: str, layout: str | None, budget: Budget) -> Found:
  """The weights of the ``.onnx`` file ``path`` (``layout`` is not used)."""
  del layout
  model = read_file(path, budget)
  cands, meta = candidates(model, path, budget)
  return Found(cands, meta, none_found(model), path)
