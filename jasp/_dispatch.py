"""Choosing the mask implementation: XLA everywhere, Pallas on a GPU.

Filled in by the kernel issue; until a kernel is registered this always
answers "use XLA".
"""

from __future__ import annotations


def pallas_nm_mask(w, n, m, axis, forced):
  """Returns a thunk computing the mask with Pallas, or None for XLA."""
  if forced:
    raise NotImplementedError("the Pallas N:M kernel is not available in this build.")
  return None
