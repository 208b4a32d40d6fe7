"""Shape helpers shared by the jaxpr walkers (layouts, permutation, calibration)."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["reshape_runs"]


def reshape_runs(old: Sequence[int], new: Sequence[int]) -> list | None:
  """Splits a reshape into runs of old and new axes with equal products.

  Size-1 axes stand alone (an empty run on the other side). Returns a list of
  ``(old axes, new axes)`` or None when the shapes do not line up.
  """
  out = []
  i = j = 0
  while i < len(old) or j < len(new):
    if i < len(old) and old[i] == 1:
      out.append(((i,), ()))
      i += 1
      continue
    if j < len(new) and new[j] == 1:
      out.append(((), (j,)))
      j += 1
      continue
    if i >= len(old) or j >= len(new):
      return None
    i1, j1, a, b = i + 1, j + 1, old[i], new[j]
    while a != b:
      if a < b:
        if i1 >= len(old):
          return None
        a *= old[i1]
        i1 += 1
      else:
        if j1 >= len(new):
          return None
        b *= new[j1]
        j1 += 1
    out.append((tuple(range(i, i1)), tuple(range(j, j1))))
    i, j = i1, j1
  return out
