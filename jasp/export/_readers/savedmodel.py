"""Reads a TensorFlow SavedModel's variables, by the axes in its ``jasp.json`` or by name.

:func:`jasp.export.to_saved_model` records the traced axes of every weight in
``assets.extra/jasp.json``; other SavedModels use flax's/Keras's naming
conventions (``kernel (in, out)``, conv ``(*spatial, in, out)``).
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any

import numpy as np

from jasp import layouts as layouts_lib
from jasp.export import _safe_read
from jasp.export._deps import require
from jasp.export._format import JASP_JSON
from jasp.export._meta import first_line
from jasp.export._meta import jasp_meta
from jasp.export._meta import unverified
from jasp.export._readers import Found
from jasp.export._safe_read import Budget
from jasp.export._safe_read import CheckError
from jasp.export._verdict import Candidate
from jasp.export._verdict import run_of_axes

__all__ = ["read"]

# What TensorFlow's checkpoint reader raises on a corrupt index or data file, besides its
# own tf.errors.OpError (its C++ reader's errors, translated by pybind11).
_TF_ERRORS = (ValueError, IndexError, RuntimeError)
_SUFFIX = "/.ATTRIBUTES/VARIABLE_VALUE"


def _unescape_tf(name: str) -> str:
  # TF object-graph keys escape "/" as ".S" and "." as "..".
  return re.sub(r"\.(S|\.)", lambda mt: "/" if mt.group(1) == "S" else ".", name)


def _jasp_json(path: str, budget: Budget) -> tuple[dict, str]:
  """``(jasp metadata or {}, the path of jasp.json)``."""

  jp = os.path.join(path, JASP_JSON)
  if not os.path.exists(jp):
    return {}, jp
  return jasp_meta(_safe_read.loads_json(_safe_read.read_bytes(jp, budget), jp), jp), jp


@dataclasses.dataclass
class _Variables:
  """A SavedModel's checkpoint: its reader, declared shapes and dtypes, and data size."""

  path: str
  reader: Any
  shapes: dict
  dtypes: dict
  data_size: int
  errors: tuple

  @classmethod
  def open(cls, path: str, budget: Budget) -> _Variables:
    tf = require("tensorflow")
    vdir = os.path.join(path, "variables")
    index = os.path.join(vdir, "variables.index")
    if not os.path.exists(index):
      raise CheckError(
        f"{path}: no variables/variables.index: a SavedModel without variables (no weights to "
        "check)."
      )
    budget.charge(_safe_read.regular_size(index), index)
    data_size = sum(
      _safe_read.regular_size(os.path.join(vdir, f))
      for f in os.listdir(vdir)
      if f.startswith("variables.data-")
    )
    errors = _TF_ERRORS + (tf.errors.OpError,)
    try:
      reader = tf.train.load_checkpoint(os.path.join(vdir, "variables"))
      shapes = reader.get_variable_to_shape_map()
      dtypes = reader.get_variable_to_dtype_map()
    except errors as e:
      raise CheckError(f"{path}: TensorFlow cannot read its variables ({first_line(e)}).") from None
    return cls(path, reader, shapes, dtypes, data_size, errors)

  def floating(self) -> list[tuple[str, int]]:
    """``[(key, bytes)]`` of the floating-point variables; every numeric one's size checked."""
    todo, declared = [], 0
    for key in sorted(self.shapes):
      dt = self.dtypes[key]
      if not key.endswith(_SUFFIX) or not (dt.is_floating or dt.is_integer):
        continue
      shape = list(self.shapes[key])
      nbytes = _safe_read.nbytes_of(shape, dt.size, f"{self.path}: {key}")
      declared += nbytes
      if declared > self.data_size:
        raise CheckError(
          f"{self.path}: the variables declare at least {declared} bytes "
          f"({key}: {shape} {dt.name}), but its data files hold {self.data_size}."
        )
      if dt.is_floating:
        todo.append((key, nbytes))
    return todo

  def get(self, key: str, nbytes: int, budget: Budget) -> np.ndarray:
    """The variable ``key`` (charged to ``budget``), checked to have its declared shape."""
    budget.charge(nbytes, f"{self.path}: {key}")
    try:
      arr = np.asarray(self.reader.get_tensor(key))
    except self.errors as e:
      raise CheckError(f"{self.path}: TensorFlow cannot read {key} ({first_line(e)}).") from None
    if arr.shape != tuple(self.shapes[key]):
      raise CheckError(
        f"{self.path}: {key} reads as {arr.shape}, its index declares {tuple(self.shapes[key])}."
      )
    return arr


def _recorded(name: str, p: str, arr: np.ndarray, rec: dict, jp: str) -> Candidate:
  """The weight at flax path ``p`` by its record in jasp.json."""
  axis = run_of_axes(tuple(rec["axis"]), arr.ndim)
  if axis is None:
    raise CheckError(
      f"{jp}: jasp metadata: weights[{p!r}].axis {rec['axis']} is not a run "
      f"of consecutive axes of its {arr.ndim}-D variable."
    )
  return Candidate(
    name, arr, rec.get("kind", "dot"), [axis], p, "metadata" if rec["pruned"] else ""
  )


def _by_convention(name: str, p: str, arr: np.ndarray) -> Candidate | None:
  """The weight at flax path ``p`` by flax's naming conventions; None if it is no kernel."""

  lay = layouts_lib.convention_layout(p, arr)
  return None if lay.axis is None else Candidate(name, arr, lay.kind, [tuple(lay.axis)], p)


def read(path: str, layout: str | None, budget: Budget) -> Found:
  """The weights of the SavedModel directory ``path`` (``layout`` is not used)."""
  del layout
  if not os.path.isdir(path):
    raise CheckError(f"{path}: a SavedModel is a directory; this is not one.")
  require("tensorflow")
  _safe_read.check_tree(path)
  meta, jp = _jasp_json(path, budget)
  prefix = meta.get("var_prefix")
  recorded = meta.get("weights", {})
  variables = _Variables.open(path, budget)
  todo = variables.floating()
  cands, found = [], set()
  for key, nbytes in todo:
    name = key[: -len(_SUFFIX)]
    p = _unescape_tf(name)
    if prefix and p.startswith(prefix + "/"):
      p = p[len(prefix) + 1 :]
    rec = recorded.get(p)
    if rec is None and len(variables.shapes[key]) < 2:
      continue
    if rec is not None and rec.get("axis") is None:
      continue
    arr = variables.get(key, nbytes, budget)
    if rec is not None:
      cands.append(_recorded(name, p, arr, rec, jp))
      found.add(p)
    elif (c := _by_convention(name, p, arr)) is not None:
      cands.append(c)
  unverified(path, recorded, found, {})
  return Found(
    cands,
    meta,
    f"none of its {len(todo)} floating-point variable(s) is a matmul/conv kernel",
    path,
  )
