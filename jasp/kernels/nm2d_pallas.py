"""Transposable N:M masks (``method="best"``) in one pass, in Pallas.

The exact twin of :func:`jasp.nm_mask_2d` with ``method="best"``: per ``m x m``
block over (``axis``, ``out_axis``), the pattern with exactly ``n`` kept per row
and per column that keeps the most magnitude; among equal scores the first of
:func:`jasp.masks.block_patterns` wins. Scores are float32 sums in the same
order as the XLA path (column 0 first; within a column the kept rows in
increasing order), so the two agree bit for bit.

Layout. The weight is viewed for free as ``(A, m, B, m)``: the earlier of the two
block axes (merged with every axis before it) split into ``A`` aligned groups of
``m``, the later one into ``B``. That view exists when no axis of size > 1 sits
between the two block axes or after the later one (a Flax ``Dense`` kernel
``(in, out)``, a conv kernel ``(kh, kw, in, out)`` with ``axis=-2,
out_axis=-1``, a PyTorch ``(out, in)`` weight with ``axis=1, out_axis=0``);
other layouts use the XLA path. Each program reads a ``(b0, m, b1, m)`` tile of
blocks, each of its ``m`` rows as one contiguous ``(b0, b1, m)`` load split into
members in registers, evaluates every candidate pattern with a running strict
maximum and writes the mask once.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from jasp._nm_core import best_pattern_bits
from jasp._nm_core import block_patterns
from jasp._nm_core import check_nm
from jasp.kernels import nm_pallas
from jasp.kernels.ranking import magnitude_f32
from jasp.kernels.ranking import supports

__all__ = ["Plan2D", "block_view", "nm_mask_2d_pallas", "plan_2d", "supports_2d", "supports_blocks"]

#: Largest number of candidate patterns the kernel unrolls (2:4 has 90).
MAX_PATTERNS = 128

_TILE_BLOCKS = 256  # m x m blocks per program
_MAX_CONTIG_BLOCKS = 64  # blocks along the contiguous axis per program
_NUM_WARPS = 4


def _patterns(n: int, m: int):
  return block_patterns(n, m)


@dataclasses.dataclass(frozen=True)
class Plan2D:
  """Static launch plan of the transposable kernel.

  Attributes:
    view: ``(A, m, B, m)``, the 4-D view of the weight.
    group_first: whether the group axis is the earlier block axis (its inner
      index is view dim 1; else view dim 3).
    block: ``(b0, b1)`` blocks per program along view dims 0 and 2.
    bounds: ``(A, B)`` when edge programs need masks, else ``None``.
    num_warps: Triton warps per program.
    split: load each ``(b0, b1, m)`` row of blocks whole and split it in
      registers (``m`` a power of 2); else one strided load per cell.
  """

  view: tuple[int, int, int, int]
  group_first: bool
  block: tuple[int, int]
  bounds: tuple[int, int] | None
  num_warps: int
  split: bool


def block_view(
  shape: Sequence[int], m: int, axis: int, out_axis: int
) -> tuple[int, int, bool] | None:
  """``(A, B, group_first)`` of the free ``(A, m, B, m)`` view (module doc), or ``None``.

  ``None`` when a transpose would be needed (an axis of size > 1 between the
  two block axes or after the later one), a block axis does not divide by
  ``m``, or the weight is empty. ``group_first``: the group ``axis`` is the
  earlier block axis.
  """
  shape = tuple(int(s) for s in shape)
  nd = len(shape)
  a, b = axis % nd, out_axis % nd
  if a == b or 0 in shape:
    return None
  first, second = min(a, b), max(a, b)
  if math.prod(shape[first + 1 : second]) != 1 or math.prod(shape[second + 1 :]) != 1:
    return None
  if shape[first] % m or shape[second] % m:
    return None
  return math.prod(shape[: first + 1]) // m, shape[second] // m, a < b


def supports_blocks(dtype, n: int, m: int) -> bool:
  """Whether a transposable kernel handles ``dtype`` and ``n:m`` blocks (at most
  :data:`MAX_PATTERNS` candidate patterns)."""
  if not supports(dtype, n, m):
    return False
  try:
    return len(_patterns(n, m)) <= MAX_PATTERNS
  except ValueError:
    return False


def plan_2d(
  shape: Sequence[int],
  m: int,
  axis: int,
  out_axis: int,
  *,
  tile_blocks: int | None = None,
  max_contig: int | None = None,
  num_warps: int | None = None,
) -> Plan2D | None:
  """The view and tiling, or ``None`` when the layout would need a transpose."""
  view = block_view(shape, m, axis, out_axis)
  if view is None:
    return None
  rows, cols, group_first = view
  tile_blocks = tile_blocks or _TILE_BLOCKS
  max_contig = max_contig or _MAX_CONTIG_BLOCKS
  b1 = min(nm_pallas.pow2_ceil(cols), max_contig)
  b0 = max(1, min(nm_pallas.pow2_ceil(rows), tile_blocks // b1))
  bounds = None if (rows % b0 == 0 and cols % b1 == 0) else (rows, cols)
  return Plan2D(
    (rows, m, cols, m), group_first, (b0, b1), bounds, num_warps or _NUM_WARPS, m & (m - 1) == 0
  )


def supports_2d(shape: Sequence[int], dtype, n: int, m: int, axis: int, out_axis: int) -> bool:
  """Whether the kernel handles this weight and block layout (see module doc)."""
  if not supports_blocks(dtype, n, m) or len(shape) < 2:
    return False
  return plan_2d(shape, m, axis, out_axis) is not None


def _kernel(x_ref, o_ref, *, n: int, p: Plan2D):
  from jax.experimental.pallas import triton as plgpu

  m = p.view[1]
  b0, b1 = p.block
  valid = None
  if p.bounds is not None:
    j, i = pl.program_id(0), pl.program_id(1)
    r = i * b0 + lax.broadcasted_iota(jnp.int32, (b0, b1), 0)
    c = j * b1 + lax.broadcasted_iota(jnp.int32, (b0, b1), 1)
    valid = (r < p.bounds[0]) & (c < p.bounds[1])
  valid3 = None if valid is None else jnp.broadcast_to(valid[:, :, None], (b0, b1, m))

  # tiles[i1][i3]: the (b0, b1) tile at inner indices (i1, i3) of the 4-D view.
  tiles = []
  for i1 in range(m):
    if p.split:
      ref = x_ref.at[:, np.int32(i1), :, :]
      row = ref[...] if valid3 is None else plgpu.load(ref, mask=valid3, other=0)
      tiles.append([t.reshape(b0, b1) for t in jnp.split(row, m, axis=-1)])
    else:
      row = []
      for i3 in range(m):
        ref = x_ref.at[:, np.int32(i1), :, np.int32(i3)]
        row.append(ref[...] if valid is None else plgpu.load(ref, mask=valid, other=0))
      tiles.append(row)
  mags = [[magnitude_f32(t) for t in row] for row in tiles]
  group_first = p.group_first
  bits = best_pattern_bits(lambda r, c: mags[r][c] if group_first else mags[c][r], n, m)

  def keep(i1, i3):
    r, c = (i1, i3) if group_first else (i3, i1)
    return ((bits >> (r * m + c)) & 1) != 0

  for i1 in range(m):
    if p.split:
      val = nm_pallas.interleave([keep(i1, i3) for i3 in range(m)])
      ref = o_ref.at[:, np.int32(i1), :, :]
      if valid3 is None:
        ref[...] = val
      else:
        plgpu.store(ref, val, mask=valid3)
    else:
      for i3 in range(m):
        ref = o_ref.at[:, np.int32(i1), :, np.int32(i3)]
        if valid is None:
          ref[...] = keep(i1, i3)
        else:
          plgpu.store(ref, keep(i1, i3), mask=valid)


@functools.partial(jax.jit, static_argnames=("n", "p", "interpret"))
def _run(w: jax.Array, *, n: int, p: Plan2D, interpret: bool) -> jax.Array:
  view = p.view
  rows, m = view[0], view[1]
  b0, b1 = p.block
  spec = pl.BlockSpec((b0, m, b1, m), lambda j, i: (i, 0, j, 0))
  out = pl.pallas_call(
    functools.partial(_kernel, n=n, p=p),
    out_shape=jax.ShapeDtypeStruct(view, jnp.bool_),
    grid=(pl.cdiv(view[2], b1), pl.cdiv(rows, b0)),
    in_specs=[spec],
    out_specs=spec,
    interpret=interpret,
    name="jasp_nm_mask_2d_best",
    **nm_pallas.triton_params(interpret, p.num_warps),
  )(w.reshape(view))
  return out.reshape(w.shape)


def nm_mask_2d_pallas(
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
      :data:`MAX_PATTERNS` candidate patterns: 2:4, 1:4, 3:4, 1:2, 1:3, 2:3).
    axis: the group (reduction) axis; 0 for a Dense kernel ``(in, out)``.
    out_axis: the other block axis (the output channels), default -1.
    interpret: Pallas interpret mode; ``None`` interprets off GPUs.
    **tuning: ``tile_blocks``, ``max_contig``, ``num_warps`` (benchmarks only).

  Returns:
    bool array of ``w.shape``, identical to ``jasp.nm_mask_2d(w, n, m, axis,
    out_axis, method="best")`` computed by XLA.

  Raises:
    ValueError: for unsupported dtypes, group sizes or layouts.
  """
  check_nm(n, m)
  w = jnp.asarray(w)
  if not supports_2d(w.shape, w.dtype, n, m, axis, out_axis):
    raise ValueError(
      f"the Pallas transposable kernel does not support shape {w.shape} dtype {w.dtype} "
      f"with {n}:{m} blocks over axes ({axis}, {out_axis}); use the XLA path."
    )
  p = plan_2d(w.shape, m, axis, out_axis, **tuning)
  interpret = nm_pallas.use_interpret(interpret)
  return _run(lax.stop_gradient(w), n=n, p=p, interpret=interpret)
