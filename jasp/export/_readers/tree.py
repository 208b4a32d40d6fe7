"""The weights of a flax pytree, by its leaf paths (msgpack and orbax checkpoints)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from jasp import layouts as layouts_lib
from jasp.export._verdict import Candidate

__all__ = ["candidates", "none_found"]


def _masks(flat: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """``{path under masks/: bool array}`` of a ``masks`` subtree next to the params."""
  marks: dict[str, np.ndarray] = {}
  for p, x in flat.items():
    parts = p.split("/")
    if parts[0] == "masks" and np.asarray(x).dtype == np.bool_:
      marks["/".join(parts[1:])] = np.asarray(x)
  return marks


def candidates(
  flat: Mapping[str, Any], *, layouts: Mapping[str, Any] | None = None
) -> list[Candidate]:
  """The matmul/conv kernels of ``{path: array}`` by ``layouts`` or flax's conventions.

  ``opt_state`` subtrees are skipped; a ``masks`` subtree marks the weights
  it masks (a mask of another shape is ignored).
  """

  marks = _masks(flat)
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
      Candidate(p, arr, lay.kind, [tuple(lay.axis)], p, "mask" if mk is not None else "", mask=mk)
    )
  return cands


def none_found(flat: Mapping[str, Any]) -> str:
  """Why a tree holds no weight to check."""
  return (
    f"none of its {len(flat)} array(s) is a matmul/conv kernel by flax's conventions "
    "(a floating-point 'kernel' leaf of rank >= 2)"
  )
