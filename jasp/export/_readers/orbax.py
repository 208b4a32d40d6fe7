"""Reads an orbax checkpoint directory (the latest step, a single item) as host arrays."""

from __future__ import annotations

import os

import numpy as np

from jasp import _tree
from jasp.export import _safe_read
from jasp.export._deps import require
from jasp.export._meta import first_line
from jasp.export._meta import short
from jasp.export._readers import Found
from jasp.export._readers import tree
from jasp.export._safe_read import Budget
from jasp.export._safe_read import CheckError

__all__ = ["find_dir", "read", "read_tree"]

_MARKERS = ("_CHECKPOINT_METADATA", "_METADATA", "manifest.ocdbt", "_sharding")
_MAX_STEP_DEPTH = 8

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


def _has_item(path: str) -> bool:
  """Whether ``path`` holds one tree item (its metadata, manifest or sharding file)."""
  return any(os.path.exists(os.path.join(path, mk)) for mk in _MARKERS[1:])


def find_dir(path: str) -> str | None:
  """The orbax checkpoint directory at or under ``path`` (latest step, single item)."""
  for _ in range(_MAX_STEP_DEPTH):
    if any(os.path.exists(os.path.join(path, mk)) for mk in _MARKERS):
      items = [
        d
        for d in sorted(os.listdir(path))
        if os.path.isdir(os.path.join(path, d)) and _has_item(os.path.join(path, d))
      ]
      if not os.path.exists(os.path.join(path, "_METADATA")) and len(items) == 1:
        return os.path.join(path, items[0])  # a step directory holding one item
      return path
    steps = [d for d in os.listdir(path) if d.isdigit() and os.path.isdir(os.path.join(path, d))]
    if not steps:
      return None
    path = os.path.join(path, max(steps, key=int))
  return None


def _restore_args(ocp, meta_tree, where: str, budget: Budget):
  """Restore arguments (host numpy arrays) for every array leaf, sizes checked on ``budget``."""
  import jax

  as_int = lambda dims: [int(d) if isinstance(d, (int, np.integer)) else d for d in dims]

  def one(leaf):
    shape, dtype = getattr(leaf, "shape", None), getattr(leaf, "dtype", None)
    if shape is None or dtype is None:
      return ocp.RestoreArgs()
    name = getattr(leaf, "name", "an array")
    try:
      itemsize = np.dtype(dtype).itemsize
    except (TypeError, ValueError):
      raise CheckError(f"{where}: {name} has dtype {short(dtype)}, not a numeric dtype.") from None
    at = f"{where}: {name}"
    nbytes = _safe_read.nbytes_of(as_int(shape), itemsize, at)
    chunk = getattr(getattr(leaf, "storage", None), "chunk_shape", None)
    chunks = ""
    if chunk is not None:  # the reader decodes one whole chunk at a time
      nbytes += _safe_read.nbytes_of(as_int(chunk), itemsize, at + " (one chunk)")
      chunks = f", chunks {tuple(chunk)}"
    budget.charge(nbytes, f"{at} (shape {tuple(shape)}{chunks})")
    return ocp.RestoreArgs(restore_type=np.ndarray)

  return jax.tree.map(one, meta_tree)


def _item_dir(path: str) -> str:
  """The item directory to read at or under ``path``."""
  d = find_dir(path)
  if d is None:
    raise CheckError(
      f"{path}: not an orbax checkpoint directory (no _CHECKPOINT_METADATA, "
      "_METADATA or step sub-directories)."
    )
  d = os.path.abspath(d)
  if not _has_item(d):
    items = sorted(x for x in os.listdir(d) if os.path.isdir(os.path.join(d, x)))
    raise CheckError(
      f"{d}: an orbax step directory without one tree item to read "
      f"(items: {', '.join(items) or 'none'}); pass the item's directory."
    )
  return d


def _restore(ocp, d: str, budget: Budget):
  """The checkpoint's tree, restored as host numpy arrays (no devices, no sharding needed)."""
  with ocp.PyTreeCheckpointer() as ckptr:
    try:
      meta = ckptr.metadata(d)
    except _ORBAX_ERRORS as e:
      raise CheckError(
        f"{d}: orbax cannot read the checkpoint's metadata ({type(e).__name__}: {first_line(e)})."
      ) from None
    meta = getattr(meta, "item_metadata", meta)
    meta_tree = getattr(meta, "tree", meta)
    if meta_tree is None:
      raise CheckError(f"{d}: orbax finds no tree metadata in the checkpoint.")
    args = _restore_args(ocp, meta_tree, d, budget)
    try:
      return ckptr.restore(d, restore_args=args)
    except _ORBAX_ERRORS as e:
      raise CheckError(
        f"{d}: orbax cannot restore the checkpoint ({type(e).__name__}: {first_line(e)})."
      ) from None


def read_tree(path: str, budget: Budget) -> tuple[dict[str, np.ndarray], str]:
  """``({path: array}, the item directory read)`` of the orbax checkpoint at or under ``path``."""
  ocp = require("orbax.checkpoint")

  d = _item_dir(path)
  _safe_read.check_tree(d, budget)
  restored = _restore(ocp, d, budget)
  flat = {
    p: np.asarray(x) for p, x in _tree.leaves_by_path(restored).items() if hasattr(x, "dtype")
  }
  return flat, d


def read(path: str, layout: str | None, budget: Budget) -> Found:
  """The weights of the orbax checkpoint at or under ``path`` (``layout`` is not used)."""
  del layout
  if not os.path.isdir(path):
    raise CheckError(f"{path}: an orbax checkpoint is a directory; this is not one.")
  flat, resolved = read_tree(path, budget)
  if resolved != os.path.abspath(path):
    path = f"{path} ({os.path.relpath(resolved, path)})"
  return Found(tree.candidates(flat), {}, tree.none_found(flat), path)
