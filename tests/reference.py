"""Float64 NumPy references for every mask function, with the documented tie rules.

Deliberately written as plain loops over groups (a different algorithm from the
library's rank formulation) so that a shared bug cannot hide.
"""

from __future__ import annotations

import itertools

import numpy as np


def magnitude64(w) -> np.ndarray:
  a = np.abs(np.asarray(w, dtype=np.float64))
  return np.where(np.isnan(a), np.inf, a)


def nm_mask_ref(w, n: int, m: int, axis=0) -> np.ndarray:
  """Keep the n largest |w| per aligned group of m; ties to the lower index."""
  w = np.asarray(w)
  axes = (axis,) if isinstance(axis, int) else tuple(axis)
  axes = sorted(a % w.ndim for a in axes)
  a0, a1 = axes[0], axes[-1]
  mag = magnitude64(w)
  moved = np.moveaxis(mag.reshape(w.shape[:a0] + (-1,) + w.shape[a1 + 1 :]), a0, -1)
  flat = moved.reshape(-1, moved.shape[-1])
  out = np.zeros(flat.shape, bool)
  for r in range(flat.shape[0]):
    for g in range(0, flat.shape[1], m):
      grp = flat[r, g : g + m]
      # sorted by (-magnitude, index): Python's sort is stable.
      order = sorted(range(m), key=lambda i: -grp[i])
      for i in order[:n]:
        out[r, g + i] = True
  out = np.moveaxis(out.reshape(moved.shape), -1, a0)
  return out.reshape(w.shape)


def _blocks_ref(w, m, axis, out_axis):
  a, b = axis % w.ndim, out_axis % w.ndim
  x = np.moveaxis(np.asarray(w), (a, b), (-2, -1))
  return x, a, b


def _each_block(shape, m):
  """Index tuples of every m x m block of the last two axes (leading axes looped)."""
  for lead in np.ndindex(*shape[:-2]):
    for i in range(0, shape[-2], m):
      for j in range(0, shape[-1], m):
        yield lead + (slice(i, i + m), slice(j, j + m))


def nm_mask_2d_best_ref(w, n: int, m: int, axis=0, out_axis=-1) -> np.ndarray:
  """Exhaustive: every m x m 0/1 block with n per row and column; first best wins."""
  choices = list(itertools.combinations(range(m), n))
  pats = []
  for combo in itertools.product(range(len(choices)), repeat=m):  # column-major choices
    blk = np.zeros((m, m), bool)
    for c, k in enumerate(combo):
      blk[list(choices[k]), c] = True
    if np.all(blk.sum(1) == n) and np.all(blk.sum(0) == n):
      pats.append(blk)
  x, a, b = _blocks_ref(w, m, axis, out_axis)
  mag = magnitude64(x)
  out = np.zeros(x.shape, bool)
  for idx in _each_block(x.shape, m):
    blk = mag[idx]
    out[idx] = pats[int(np.argmax([blk[p].sum() for p in pats]))]
  return np.moveaxis(out, (-2, -1), (a, b))


def nm_mask_2d_greedy_ref(w, n: int, m: int, axis=0, out_axis=-1) -> np.ndarray:
  x, a, b = _blocks_ref(w, m, axis, out_axis)
  mag = magnitude64(x)
  out = np.zeros(x.shape, bool)
  for idx in _each_block(x.shape, m):
    blk = mag[idx]
    keep = np.zeros((m, m), bool)
    rows, cols = np.zeros(m, int), np.zeros(m, int)
    for t in sorted(range(m * m), key=lambda t: -blk.flat[t]):
      r, c = divmod(t, m)
      if rows[r] < n and cols[c] < n:
        rows[r] += 1
        cols[c] += 1
        keep[r, c] = True
    out[idx] = keep
  return np.moveaxis(out, (-2, -1), (a, b))


def kept_fraction(w, mask) -> float:
  mag = magnitude64(w)
  return float((mag * mask).sum() / mag.sum())
