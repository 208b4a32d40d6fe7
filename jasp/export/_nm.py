"""N:M checks on host (numpy) arrays, for weights read back from files.

The checker reads weights that left JAX (ONNX initializers, TensorFlow
variables, safetensors tensors), so it works on numpy arrays and never
compiles anything. The rule is :func:`jasp.is_nm`'s: along the group axes
(consecutive, flattened row-major), every aligned group of ``m`` entries holds
at most ``n`` non-zeros.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

__all__ = ["NMStats", "nm_stats", "nm_axes", "zero_fraction"]


@dataclasses.dataclass(frozen=True)
class NMStats:
  """The N:M verdict for one weight along one run of axes.

  Attributes:
    applicable: False when the group axes' size is not a multiple of ``m``.
    nm: whether every group holds at most ``n`` non-zeros (False when not
      applicable).
    groups: the number of groups of ``m``.
    bad_groups: groups with more than ``n`` non-zeros.
  """

  applicable: bool
  nm: bool
  groups: int
  bad_groups: int


def nm_stats(w: np.ndarray, axes: Sequence[int], n: int, m: int) -> NMStats:
  """Counts the groups of ``m`` along ``axes`` holding more than ``n`` non-zeros.

  Args:
    w: any numeric array (float32/16, bfloat16 via ml_dtypes, integers).
    axes: consecutive axes of ``w``, flattened row-major into the group axis.
    n, m: the pattern.

  Returns:
    :class:`NMStats`.
  """
  w = np.asarray(w)
  axes = sorted(int(a) % w.ndim for a in axes)
  a0, a1 = axes[0], axes[-1]
  if axes != list(range(a0, a1 + 1)):
    raise ValueError(f"group axes must be consecutive, got {tuple(axes)}.")
  k = int(np.prod(w.shape[a0 : a1 + 1], dtype=np.int64))
  pre = int(np.prod(w.shape[:a0], dtype=np.int64))
  post = int(np.prod(w.shape[a1 + 1 :], dtype=np.int64))
  if k % m or k == 0:
    return NMStats(False, False, 0, 0)
  nz = (w != 0).reshape(pre, k // m, m, post).sum(axis=2)
  bad = int(np.count_nonzero(nz > n))
  return NMStats(True, bad == 0, int(nz.size), bad)


def nm_axes(w: np.ndarray, n: int, m: int, skip: Sequence[int] = ()) -> list[int]:
  """The single axes (other than ``skip``) along which ``w`` is N:M (a diagnosis aid)."""
  out = []
  for a in range(np.ndim(w)):
    if a in skip:
      continue
    s = nm_stats(w, (a,), n, m)
    if s.applicable and s.nm:
      out.append(a)
  return out


def zero_fraction(w: np.ndarray) -> float:
  """Fraction of entries that are exactly zero (0.0 for an empty array)."""
  w = np.asarray(w)
  return float(np.count_nonzero(w == 0)) / w.size if w.size else 0.0
