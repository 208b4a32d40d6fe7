"""Transposable N:M masks (``method="best"``) in one pass, in Pallas Mosaic GPU.

The Mosaic GPU twin of :mod:`jasp.kernels.nm2d_pallas`, with the same scoring
(:func:`jasp._nm_core.best_pattern_bits` on the float32 magnitudes of
:func:`jasp.kernels.ranking.magnitude_f32`): per ``m x m`` block over
(``axis``, ``out_axis``), the pattern with exactly ``n`` kept per row and per
column that keeps the most magnitude, the first of
:func:`jasp.masks.block_patterns` among equal scores.

Layout. The weight is viewed for free as ``(A, m, B, m, 1)``: the earlier of
the two block axes (merged with every axis before it) split into ``A`` aligned
groups of ``m``, the later one into ``B``, and a trailing unit axis. The view
exists when no axis of size > 1 sits between the two block axes or after the
later one (a Flax ``Dense`` kernel ``(in, out)``, a conv kernel ``(kh, kw, in,
out)`` with ``axis=-2, out_axis=-1``, a PyTorch ``(out, in)`` weight with
``axis=1, out_axis=0``). Cell ``(i1, i3)`` of every block in a program's
``(b0, b1)`` tile of blocks is the strided tile ``[rows, i1, cols, i3, :]``;
the unit axis gives it the unit-stride minor dimension Mosaic GPU's vector
loads need (one element per access). Each program loads the ``m * m`` cells,
scores every candidate pattern with a running strict maximum and stores the
mask (``bool``, one byte per entry, through
:func:`jasp.kernels.mosaic.store`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from jasp._nm_core import best_pattern_bits
from jasp._nm_core import check_nm
from jasp.kernels import mosaic
from jasp.kernels.nm2d_pallas import block_view
from jasp.kernels.nm2d_pallas import supports_blocks
from jasp.kernels.ranking import magnitude_f32

__all__ = ["Plan2D", "nm_mask_2d_mosaic", "plan_2d", "supports_2d"]

_TILE_BLOCKS = 128  # m x m blocks per program: one per thread
_MAX_COLS = 64  # blocks along the contiguous axis per program


@dataclasses.dataclass(frozen=True)
class Plan2D:
  """Static launch plan.

  Attributes:
    view: ``(A, m, B, m, 1)``, the view of the weight.
    group_first: whether the group axis is the earlier block axis (its inner
      index is view dim 1; else view dim 3).
    block: ``(b0, b1)`` blocks per program along view dims 0 and 2.
  """

  view: tuple[int, int, int, int, int]
  group_first: bool
  block: tuple[int, int]

  @property
  def grid(self) -> tuple[int, int]:
    return (self.view[2] // self.block[1], self.view[0] // self.block[0])

  @property
  def tile(self) -> tuple[int, int, int]:
    return (*self.block, 1)


def plan_2d(
  shape: Sequence[int],
  m: int,
  axis: int,
  out_axis: int,
  *,
  tile_blocks: int | None = None,
  max_cols: int | None = None,
) -> Plan2D | None:
  """The view and tiling, or ``None`` (a layout that needs a transpose, or no 128-block tile)."""
  view = block_view(shape, m, axis, out_axis)
  if view is None:
    return None
  rows, cols, group_first = view
  b1 = mosaic.pow2_divisor(cols, max_cols or _MAX_COLS)
  b0 = mosaic.pow2_divisor(rows, max(1, (tile_blocks or _TILE_BLOCKS) // b1))
  p = Plan2D((rows, m, cols, m, 1), group_first, (b0, b1))
  if (b0 * b1) % 128 or not mosaic.grid_fits(p.grid):
    return None
  return p


def supports_2d(shape: Sequence[int], dtype, n: int, m: int, axis: int, out_axis: int) -> bool:
  """Whether the kernel handles this weight and block layout (see module doc)."""
  if not supports_blocks(dtype, n, m) or len(shape) < 2:
    return False
  return plan_2d(shape, m, axis, out_axis) is not None


def _kernel(x_ref, o_ref, *, n: int, p: Plan2D, interpret: bool):
  m = p.view[1]
  b0, b1 = p.block
  i, j = lax.axis_index("r"), lax.axis_index("c")
  rows, cols = pl.ds(i * b0, b0), pl.ds(j * b1, b1)

  def at(i1, i3):
    return (rows, i1, cols, i3, slice(None))

  mags = [
    [magnitude_f32(mosaic.load(x_ref, at(i1, i3), p.tile, 1, interpret)) for i3 in range(m)]
    for i1 in range(m)
  ]
  group_first = p.group_first
  bits = best_pattern_bits(lambda r, c: mags[r][c] if group_first else mags[c][r], n, m)
  for i1 in range(m):
    for i3 in range(m):
      r, c = (i1, i3) if group_first else (i3, i1)
      keep = ((bits >> (r * m + c)) & 1) != 0
      mosaic.store(o_ref, at(i1, i3), keep, 1, interpret)


@functools.partial(jax.jit, static_argnames=("n", "p", "interpret"))
def _run(w: jax.Array, *, n: int, p: Plan2D, interpret: bool) -> jax.Array:
  (out,) = mosaic.launch(
    functools.partial(_kernel, n=n, p=p, interpret=interpret),
    (jax.ShapeDtypeStruct(p.view, jnp.bool_),),
    p.grid,
    "jasp_nm_mask_2d_best",
    interpret,
  )(w.reshape(p.view))
  return out.reshape(w.shape)


def nm_mask_2d_mosaic(
  w: jax.Array,
  n: int = 2,
  m: int = 4,
  axis: int = 0,
  out_axis: int = -1,
  *,
  interpret: bool | None = None,
  **tuning,
) -> jax.Array:
  """Transposable N:M mask (``method="best"``) in one pass over ``w``.

  Args:
    w: fp32, bf16 or fp16 array of rank >= 2 whose block axes allow the view of
      the module doc (see :func:`supports_2d`).
    n, m: ``n`` kept per row and per column of every ``m x m`` block (at most
      ``nm2d_pallas.MAX_PATTERNS`` candidate patterns: 2:4, 1:4, 3:4, 1:2, 1:3, 2:3).
    axis: the group (reduction) axis; 0 for a Dense kernel ``(in, out)``.
    out_axis: the other block axis (the output channels), default -1.
    interpret: Mosaic GPU interpret mode; ``None`` interprets off GPUs.
    **tuning: ``tile_blocks``, ``max_cols`` (benchmarks only).

  Returns:
    bool array of ``w.shape``, identical to ``jasp.nm_mask_2d(w, n, m, axis,
    out_axis, method="best")``.

  Raises:
    ValueError: for unsupported dtypes, group sizes or layouts.
  """
  check_nm(n, m)
  w = jnp.asarray(w)
  if not supports_2d(w.shape, w.dtype, n, m, axis, out_axis):
    raise ValueError(
      f"the Mosaic GPU transposable kernel does not support shape {w.shape} dtype {w.dtype} "
      f"with {n}:{m} blocks over axes ({axis}, {out_axis}); use the XLA path."
    )
  p = plan_2d(w.shape, m, axis, out_axis, **tuning)
  if interpret is None:
    interpret = jax.default_backend() != "gpu"
  return _run(lax.stop_gradient(w), n=n, p=p, interpret=bool(interpret))
