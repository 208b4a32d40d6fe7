"""The N:M core shared by the XLA masks and the Pallas kernels.

Argument checks and group-axis arithmetic, and the enumeration and scoring of
transposable blocks: everything that :mod:`jasp.masks` (XLA) and
:mod:`jasp.kernels` (Pallas) must agree on, bit for bit. It imports no other
jasp module, so both layers can build on it.
"""

from __future__ import annotations

import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np

from jasp.typing import Axis

__all__ = [
  "best_pattern_bits",
  "block_patterns",
  "check_nm",
  "group_axes",
  "innermost_group_axes",
  "split_around",
]


def check_nm(n: int, m: int) -> None:
  """Raises ``TypeError`` unless n and m are ints, ``ValueError`` unless ``1 <= n < m``."""
  if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in (n, m)):
    raise TypeError(
      f"n and m must be integers, got n={n!r} ({type(n).__name__}), m={m!r} ({type(m).__name__})."
    )
  if m < 2 or not 1 <= n < m:
    raise ValueError(f"N:M sparsity needs 1 <= n < m and m >= 2, got n={n}, m={m}.")


def group_axes(ndim: int, axis: Axis) -> tuple[int, ...]:
  """Normalises ``axis`` (an int or a run of consecutive ints) to sorted axes.

  Several axes are flattened in row-major order into one group axis, as a
  ``DenseGeneral`` kernel whose contracted axes are ``(heads, head_dim)`` is
  seen by a matmul. The axes must be consecutive.

  Raises:
    ValueError: if an axis is out of range, repeated, or the run has gaps.
    TypeError: if ``axis`` is not an int or a sequence of ints.
  """
  if isinstance(axis, (int, np.integer)) and not isinstance(axis, bool):
    axes = (axis,)
  else:
    try:
      axes = tuple(axis) if not isinstance(axis, (str, bytes)) else None
    except TypeError:
      axes = None
    if axes is None:
      raise TypeError(
        f"axis must be an int or a sequence of ints, got {type(axis).__name__} {axis!r}."
      )
  if not axes:
    raise ValueError("axis must name at least one axis.")
  out = []
  for a in axes:
    if isinstance(a, bool) or not isinstance(a, (int, np.integer)):
      raise TypeError(f"axis entries must be integers, got {a!r}.")
    if not -ndim <= a < ndim:
      raise ValueError(f"axis {a} is out of range for an array of rank {ndim}.")
    out.append(int(a) % ndim)
  out = sorted(out)
  if len(set(out)) != len(out) or out != list(range(out[0], out[0] + len(out))):
    raise ValueError(f"group axes must be distinct and consecutive, got {axes}.")
  return tuple(out)


def split_around(shape: tuple[int, ...], axis: Axis, m: int) -> tuple[int, int, int]:
  """``(pre, k, post)``: the sizes before, of, and after the group axes (flattened).

  Raises:
    ValueError: ``k`` is not a multiple of ``m`` (or ``axis`` is invalid).
  """
  shape = tuple(int(s) for s in shape)
  axes = group_axes(len(shape), axis)
  k = math.prod(shape[axes[0] : axes[-1] + 1])
  if k % m:
    raise ValueError(
      f"the group axes {axes} of shape {shape} have size {k}, not a multiple of m={m}."
    )
  return math.prod(shape[: axes[0]]), k, math.prod(shape[axes[-1] + 1 :])


def innermost_group_axes(shape: tuple[int, ...], axes: tuple[int, ...], m: int) -> tuple[int, ...]:
  """The same groups on fewer axes: only the innermost one when its size divides by m.

  Groups of ``m`` consecutive entries of the row-major flattened run
  ``axes`` lie inside the innermost axis when its size is a multiple of ``m``;
  grouping along it alone avoids a reshape that merges axes, which a sharded
  outer axis (e.g. attention heads over a mesh axis) does not allow.
  """
  if len(axes) > 1 and shape[axes[-1]] % m == 0:
    return axes[-1:]
  return axes


@functools.lru_cache(maxsize=None)
def block_patterns(n: int, m: int) -> np.ndarray:
  """All ``m x m`` 0/1 blocks whose every row and column holds ``n`` ones.

  Enumeration order (which defines the tie rule of ``method="best"``): each
  *column* ``c`` (fixed out index) picks its ``n`` kept rows (group-axis
  positions) as one of ``itertools.combinations(range(m), n)``; patterns are
  ordered lexicographically by (choice of column 0, choice of column 1, ...).

  Returns:
    int array ``(P, m)``: for each pattern, the index of each column's choice
    in ``itertools.combinations(range(m), n)``. For 2:4, ``P == 90``.
  """
  check_nm(n, m)
  choices = list(itertools.combinations(range(m), n))
  if len(choices) ** m > 5_000_000:
    raise ValueError(
      f"method='best' enumerates the {n}:{m} transposable blocks and supports "
      f"m <= 5 at most (here {len(choices)}^{m} candidates); use method='greedy'."
    )
  counts = np.zeros((len(choices), m), np.int64)
  for k, rows in enumerate(choices):
    counts[k, list(rows)] = 1
  out = []

  def rec(col, acc, prefix):
    if col == m:
      if np.all(acc == n):
        out.append(tuple(prefix))
      return
    for k in range(len(choices)):
      nxt = acc + counts[k]
      if np.all(nxt <= n) and np.all(nxt + n * (m - col - 1) >= n):
        rec(col + 1, nxt, prefix + [k])

  rec(0, np.zeros(m, np.int64), [])
  return np.asarray(out, np.int32)


def best_pattern_bits(cell, n: int, m: int) -> jax.Array:
  """The ``m*m``-bit pattern of the first best transposable block, element-wise.

  ``cell(r, c)`` gives the float32 magnitudes of block entry (row ``r`` along
  the group axis, column ``c``) for every block at once (any shape). Every
  candidate of :func:`block_patterns` is scored as a chain of adds of
  per-column partial sums in a fixed order (column 0 first; within a column the
  chosen rows in increasing order), shared between candidates with a common
  prefix; a running strict maximum keeps the first best candidate. Used by the
  XLA path and by the Pallas kernel alike, so both sum in the same order.

  Returns:
    int32 array of ``cell``'s shape; bit ``r * m + c`` set when kept.
  """
  choices = list(itertools.combinations(range(m), n))
  per_choice = {}
  for c in range(m):
    for k, rows in enumerate(choices):
      s = cell(rows[0], c)
      for r in rows[1:]:
        s = s + cell(r, c)
      per_choice[c, k] = s
  prefix: dict[tuple[int, ...], jax.Array] = {}

  def score(pat: tuple[int, ...]) -> jax.Array:
    if pat not in prefix:
      c = len(pat) - 1
      prefix[pat] = per_choice[0, pat[0]] if c == 0 else score(pat[:-1]) + per_choice[c, pat[c]]
    return prefix[pat]

  best = bits = None
  for pat in block_patterns(n, m):
    pat = tuple(int(k) for k in pat)
    pattern_bits = sum(1 << (r * m + c) for c in range(m) for r in choices[pat[c]])
    s = score(pat)
    if best is None:
      best, bits = s, jnp.full(s.shape, pattern_bits, jnp.int32)
    else:
      better = s > best  # strict: the first best pattern wins ties
      best = jnp.where(better, s, best)
      bits = jnp.where(better, pattern_bits, bits)
  return bits
