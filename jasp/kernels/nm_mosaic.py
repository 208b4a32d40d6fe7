"""One-pass N:M mask kernels in Pallas Mosaic GPU (Hopper and newer).

The Mosaic GPU twins of :mod:`jasp.kernels.nm_pallas` (Pallas Triton, which
JAX deprecates): the same rank rule (:mod:`jasp.kernels.ranking`), so every
output is identical to XLA's bit for bit.

Layout. The group axis is never transposed. With ``pre`` the product of the
sizes before the group axes, ``k`` their flattened size and ``post`` the
product of the sizes after them, and ``E`` the entries a program row holds
(``m``, or 8 when packed bits are written: one byte covers ``8 / m`` groups),
the weight is viewed (a free reshape) as one of

* ``post > 1`` ("rows"): ``(pre * k / E, E, post)``. A Flax ``Dense`` kernel
  ``(in, out)`` is ``(in / E, E, out)``; each member's tile is contiguous along
  ``out``, so every thread reads ``vec`` consecutive elements at a time.
* ``post == 1`` ("cols", groups along the last axis, the PyTorch layout):
  ``(R, C, E, 1)`` with ``C * E`` consecutive elements per row. A member's tile
  ``[rows, cols, e, :]`` is strided by ``E``; the trailing unit axis gives it
  the unit-stride minor dimension Mosaic GPU's vector loads need, one element
  per access.

Each program is one warpgroup (128 threads). It loads the ``E`` member tiles
``(br, bc)`` from global memory straight into registers, ranks them, and
stores each output tile straight back: no shared memory, no TMA, no
synchronisation. Many programs per SM hide the memory latency. Only shapes
that tile evenly are planned (:func:`plan` returns ``None`` otherwise).

Outputs, any subset, in one pass:

* ``"weight"``: the masked weight (``w``'s dtype);
* ``"mask"``: the bool mask. Mosaic GPU's own stores treat a ``bool`` array
  as packed bits, so each tile is stored as bytes through a byte view of the
  output (:func:`jasp.kernels.mosaic.store`);
* ``"bits"``: the mask packed as :class:`jasp.packing.PackedMask` bits
  (``uint8``, bit ``e`` of a byte is entry ``e`` of its 8 along the group
  axis);
* ``"finite"``: one ``int32`` per program, 1 when all its entries are finite.
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

from jasp._nm_core import check_nm
from jasp._nm_core import group_axes
from jasp._nm_core import innermost_group_axes
from jasp._nm_core import split_around
from jasp.kernels import mosaic
from jasp.kernels.ranking import KEY_BITS
from jasp.kernels.ranking import MAX_M
from jasp.kernels.ranking import SUPPORTED_DTYPES
from jasp.kernels.ranking import keep_top_n
from jasp.kernels.ranking import rank_keys
from jasp.kernels.ranking import supports
from jasp.typing import Axis

__all__ = [
  "OUTPUTS",
  "Plan",
  "nm_mosaic",
  "nm_mosaic_many",
  "prune",
  "prune_many",
  "plan",
  "supports",
]

#: What a kernel can write (see the module doc).
OUTPUTS = ("weight", "mask", "bits", "finite")

#: At most this many weights share one launch of :func:`nm_mosaic_many` (the
#: kernel holds one branch per weight).
MAX_GROUP = 16

# Default tiling: elements per member tile (more for a lone bool mask of a
# 16-bit weight: 8 consecutive mask bytes per thread access), widest tile
# along the contiguous axis, bytes per thread access (rows view). From
# benchmarks/mask_bench.py --sweep-mosaic on an H200.
_TILE_ELEMS = 512
_MASK_TILE_ELEMS_16BIT = 2048
_MAX_COLS = 256
_VEC_BYTES = 16
_WARPGROUP = 128


@dataclasses.dataclass(frozen=True)
class Plan:
  """Static launch plan.

  Attributes:
    view: the weight's view: ``(R, E, C)`` ("rows") or ``(R, C, E, 1)``
      ("cols"), ``E`` entries per row unit.
    block: ``(br, bc)``, one member's tile over the ``R`` and ``C`` dims.
    vec: elements per thread access (a power of two; 1 for "cols").
    m: group size (``E`` is ``m`` or 8).
  """

  view: tuple[int, ...]
  block: tuple[int, int]
  vec: int
  m: int

  @property
  def cols(self) -> bool:
    return len(self.view) == 4

  @property
  def entries(self) -> int:
    return self.view[2] if self.cols else self.view[1]

  @property
  def width(self) -> int:
    """``C``: row units' contiguous extent (rows) or groups per row (cols)."""
    return self.view[1] if self.cols else self.view[2]

  @property
  def tile(self) -> tuple[int, ...]:
    """The shape of one member's tile (and of every array in a program)."""
    return self.block + ((1,) if self.cols else ())

  @property
  def grid(self) -> tuple[int, int]:
    """``(C / bc, R / br)``: consecutive programs read neighbouring columns."""
    return (self.width // self.block[1], self.view[0] // self.block[0])

  def index(self, rows, cols, e) -> tuple:
    """The index of member ``e``'s tile in the view."""
    return (rows, cols, e, slice(None)) if self.cols else (rows, e, cols)

  def out_shape(self, output: str) -> tuple[int, ...]:
    if output in ("weight", "mask"):
      return self.view
    if output == "bits":
      return (self.view[0], self.width) + ((1,) if self.cols else ())
    return self.grid[::-1]


def plan(
  shape: Sequence[int],
  m: int,
  axis: Axis,
  *,
  packed: bool = False,
  itemsize: int = 2,
  tile_elems: int | None = None,
  max_cols: int | None = None,
  vec_bytes: int | None = None,
) -> Plan | None:
  """The view and tiling for a weight of ``shape``, or ``None`` where the kernel does not apply.

  ``None``: an empty shape, a packed plan whose group axes' size is not a
  multiple of 8 (or ``m`` does not divide 8), a tile that is not a multiple
  of 128 elements, or a grid CUDA cannot launch.

  Args:
    shape: the weight's shape.
    m: group size.
    axis: group axis, or a run of consecutive axes.
    packed: plan for the ``"bits"`` output (8 entries per program row; needs
      ``m`` to divide 8 and the group axes' size to be a multiple of 8).
    itemsize: bytes per weight element (sets the access width).
    tile_elems, max_cols, vec_bytes: tuning overrides (benchmarks).

  Raises:
    ValueError: if the group axes' size is not a multiple of ``m``.
  """
  shape = tuple(int(s) for s in shape)
  pre, k, post = split_around(shape, axis, m)
  entries = 8 if packed else m
  if k % entries or entries % m or 0 in shape:
    return None
  units = pre * k // entries
  if post > 1:
    view = (units, entries, post)
    bc = mosaic.pow2_divisor(post, max_cols or _MAX_COLS)
    vec = max(1, min((vec_bytes or _VEC_BYTES) // itemsize, bc))
  else:
    bc = mosaic.pow2_divisor(units, max_cols or _MAX_COLS)
    view, vec = (units // bc, bc, entries, 1), 1
  br = mosaic.pow2_divisor(view[0], max(1, (tile_elems or _TILE_ELEMS) // bc))
  while view[0] // br > mosaic.MAX_GRID_YZ and view[0] % (2 * br) == 0:
    br *= 2  # taller tiles rather than more row tiles than CUDA launches
  while vec > 1 and (br * bc) % (_WARPGROUP * vec):
    vec //= 2
  p = Plan(view, (br, bc), vec, m)
  if (br * bc) % _WARPGROUP or not mosaic.grid_fits(p.grid):
    return None
  return p


def _kernel(*refs, count: int, n: int, p: Plan, outputs: tuple[str, ...], interpret: bool):
  """One program over ``count`` weights of one plan (``count`` inputs, then their
  outputs): row tile ``r`` of the grid is tile ``r % R`` of weight ``r // R``
  (``R`` row tiles per weight)."""
  x_refs, o_refs = refs[:count], refs[count:]
  per, rows = len(outputs), p.grid[1]
  r, j = lax.axis_index("r"), lax.axis_index("c")
  if count == 1:
    _tile(x_refs[0], o_refs, r, j, n, p, outputs, interpret)
    return
  which, i = r // rows, r % rows
  for g in range(count):

    @pl.when(which == g)
    def _(g=g):
      _tile(x_refs[g], o_refs[g * per : (g + 1) * per], i, j, n, p, outputs, interpret)


def _tile(x_ref, o_refs, i, j, n: int, p: Plan, outputs: tuple[str, ...], interpret: bool):
  """Row tile ``i``, column tile ``j`` of one weight: its outputs' tiles."""
  br, bc = p.block
  rows, cols = pl.ds(i * br, br), pl.ds(j * bc, bc)

  def at(e):
    return p.index(rows, cols, e)

  xs = [mosaic.load(x_ref, at(e), p.tile, p.vec, interpret) for e in range(p.entries)]
  keys = [rank_keys(x) for x in xs]
  keeps = []
  for g in range(0, p.entries, p.m):
    keeps += keep_top_n(keys[g : g + p.m], n)
  for name, ref in zip(outputs, o_refs):
    if name == "weight":
      for e, (x, kp) in enumerate(zip(xs, keeps)):
        mosaic.store(ref, at(e), jnp.where(kp, x, jnp.zeros_like(x)), p.vec, interpret)
    elif name == "mask":
      for e, kp in enumerate(keeps):
        mosaic.store(ref, at(e), kp, p.vec, interpret)
    elif name == "bits":
      acc = keeps[0].astype(jnp.int32)
      for e in range(1, p.entries):
        acc = acc | (keeps[e].astype(jnp.int32) << e)
      mosaic.store(
        ref,
        (rows, cols) + ((slice(None),) if p.cols else ()),
        acc.astype(jnp.uint8),
        p.vec,
        interpret,
      )
    else:  # finite
      worst = keys[0]
      for key in keys[1:]:
        worst = jnp.maximum(worst, key)
      inf_bits = KEY_BITS[jnp.dtype(xs[0].dtype)][2]
      ref[i, j] = (jnp.max(worst.astype(jnp.int32)) < inf_bits).astype(jnp.int32)


def _launch(ws: tuple, *, n: int, p: Plan, outputs: tuple[str, ...], interpret: bool) -> tuple:
  """One kernel launch over the weights ``ws``: one tuple of ``outputs`` per weight (views)."""
  count = len(ws)
  dtypes = {"weight": ws[0].dtype, "mask": jnp.bool_, "bits": jnp.uint8, "finite": jnp.int32}
  one = tuple(jax.ShapeDtypeStruct(p.out_shape(o), dtypes[o]) for o in outputs)
  call = mosaic.launch(
    functools.partial(_kernel, count=count, n=n, p=p, outputs=outputs, interpret=interpret),
    one * count,
    (p.grid[0], p.grid[1] * count),
    f"jasp_nm_{'' if count == 1 else f'{count}x_'}{'_'.join(outputs)}",
    interpret,
  )
  flat = call(*(w.reshape(p.view) for w in ws))
  return tuple(flat[g * len(outputs) : (g + 1) * len(outputs)] for g in range(count))


_STATIC = ("n", "p", "outputs", "interpret")
#: One weight (``w``), and several of one plan (``ws``, a tuple), per launch.
_run = jax.jit(lambda w, **kw: _launch((w,), **kw)[0], static_argnames=_STATIC)
_run_many = jax.jit(_launch, static_argnames=_STATIC)


def nm_mosaic(
  w: jax.Array,
  n: int,
  m: int,
  axis: Axis,
  outputs: tuple[str, ...],
  *,
  p: Plan | None = None,
  interpret: bool | None = None,
) -> tuple[jax.Array, ...]:
  """Runs the kernel on ``w`` and returns ``outputs`` in the weight's layout.

  Args:
    w: float32, bfloat16 or float16 array of rank >= 1.
    n, m: keep the ``n`` largest ``|w|`` of every aligned group of ``m`` along
      ``axis`` (``1 <= n < m <= 8``).
    axis: the group axis, or a run of consecutive axes flattened row-major.
    outputs: a tuple of names from :data:`OUTPUTS`.
    p: a plan from :func:`plan` (tuning); by default planned here.
    interpret: run in Pallas interpret mode; ``None`` interprets everywhere but
      on a GPU backend.

  Returns:
    One array per name: ``"weight"`` of ``w``'s shape and dtype; ``"mask"``
    bool of ``w``'s shape (identical to ``jasp.nm_mask(..., impl="xla")``); ``"bits"`` the packed bits, shaped as
    :func:`jasp.packing.pack` lays them out; ``"finite"`` a 1-D ``int32``
    array, one flag per program, all nonzero exactly when ``w`` is all
    finite (reduce with ``jnp.all(f != 0)``).

  Raises:
    ValueError: for unsupported dtypes, ``n``/``m``, or unknown outputs, or if
      the shape does not tile (check :func:`plan` first).
  """
  check_nm(n, m)
  w = jnp.asarray(w)
  outputs = tuple(outputs)
  _check(w, n, m, outputs)
  p = p or _default_plan(w, m, axis, outputs)
  if interpret is None:
    interpret = jax.default_backend() != "gpu"
  outs = _run(lax.stop_gradient(w), n=n, p=p, outputs=outputs, interpret=bool(interpret))
  return _shaped(w.shape, axis, outputs, outs)


def nm_mosaic_many(
  ws: Sequence[jax.Array],
  n: int,
  m: int,
  axis: Axis,
  outputs: tuple[str, ...],
  *,
  interpret: bool | None = None,
) -> list[tuple[jax.Array, ...]]:
  """:func:`nm_mosaic` of several weights of one shape and dtype, in one kernel launch.

  The launch covers every weight's tiles (its row tiles follow each other
  along the grid's second dimension), so a tree of many same-shaped weights
  costs a few launches instead of one per weight; at most
  ``65535 // row_tiles`` (and :data:`MAX_GROUP`) weights share a launch.

  Returns:
    One tuple per weight, as :func:`nm_mosaic` returns it.

  Raises:
    ValueError: as :func:`nm_mosaic`, or if the weights differ in shape or
      dtype.
  """
  ws = [jnp.asarray(w) for w in ws]
  if not ws:
    return []
  shape, dtype = ws[0].shape, ws[0].dtype
  if any(w.shape != shape or w.dtype != dtype for w in ws):
    raise ValueError(
      "nm_mosaic_many needs weights of one shape and dtype, got "
      f"{sorted({(tuple(w.shape), str(w.dtype)) for w in ws})}."
    )
  check_nm(n, m)
  outputs = tuple(outputs)
  _check(ws[0], n, m, outputs)
  p = _default_plan(ws[0], m, axis, outputs)
  if interpret is None:
    interpret = jax.default_backend() != "gpu"
  size = max(1, min(MAX_GROUP, mosaic.MAX_GRID_YZ // p.grid[1]))
  out = []
  for s in range(0, len(ws), size):
    chunk = tuple(lax.stop_gradient(w) for w in ws[s : s + size])
    for outs in _run_many(chunk, n=n, p=p, outputs=outputs, interpret=bool(interpret)):
      out.append(_shaped(shape, axis, outputs, outs))
  return out


def _default_plan(w: jax.Array, m: int, axis: Axis, outputs: tuple[str, ...]) -> Plan:
  """The default plan for ``w`` and ``outputs``; raises where the shape does not tile."""
  tile = _MASK_TILE_ELEMS_16BIT if outputs == ("mask",) and w.dtype.itemsize == 2 else None
  packed = "bits" in outputs
  p = plan(w.shape, m, axis, packed=packed, itemsize=w.dtype.itemsize, tile_elems=tile)
  if p is None:
    raise ValueError(f"shape {w.shape} (axis {axis}, m={m}) does not tile for the kernel.")
  return p


def _check(w: jax.Array, n: int, m: int, outputs: tuple[str, ...]) -> None:
  """Raises for a dtype, ``n:m`` or outputs the kernel does not take."""
  if not supports(w.dtype, n, m) or w.ndim == 0:
    raise ValueError(
      f"the Mosaic GPU N:M kernel supports {', '.join(str(d) for d in SUPPORTED_DTYPES)} "
      f"arrays of rank >= 1 with m <= {MAX_M}; got dtype {w.dtype}, shape {w.shape}, "
      f"n={n}, m={m}."
    )
  unknown = [o for o in outputs if o not in OUTPUTS]
  if unknown or not outputs:
    raise ValueError(f"outputs must be a non-empty tuple of {OUTPUTS}, got {outputs!r}.")


def _shaped(shape, axis: Axis, outputs: tuple[str, ...], outs) -> tuple[jax.Array, ...]:
  """The kernel's outputs in the weight's layout (bits as :func:`jasp.packing.pack`)."""
  a = innermost_group_axes(shape, group_axes(len(shape), axis), 8)  # as jasp.packing lays bits
  k = math.prod(shape[a[0] : a[-1] + 1])
  bits_shape = tuple(shape[: a[0]]) + (k // 8,) + tuple(shape[a[-1] + 1 :])
  shaped = {
    "weight": lambda o: o.reshape(shape),
    "mask": lambda o: o.reshape(shape),
    "bits": lambda o: o.reshape(bits_shape),
    "finite": lambda o: o.reshape(-1),
  }
  return tuple(shaped[name](o) for name, o in zip(outputs, outs))


def prune(
  w: jax.Array,
  n: int,
  m: int,
  axis: Axis,
  outputs: tuple[str, ...] = ("weight", "mask"),
  *,
  interpret: bool | None = None,
) -> jax.Array | tuple[jax.Array, ...]:
  """:func:`nm_mosaic` with the masked weight first, differentiable in ``w``.

  Args:
    w, n, m, axis, interpret: as in :func:`nm_mosaic`.
    outputs: names from :data:`OUTPUTS`, ``"weight"`` first.

  Returns:
    The pruned weight alone when ``outputs == ("weight",)``, else the tuple of
    outputs. The derivative of the pruned weight is the mask; the other
    outputs are piecewise constant.

  Raises:
    ValueError: as :func:`nm_mosaic`, or if ``outputs`` does not start with
      ``"weight"``.
  """
  outputs = tuple(outputs)
  if not outputs or outputs[0] != "weight":
    raise ValueError(f"prune() outputs must start with 'weight', got {outputs!r}.")
  axis = tuple(axis) if isinstance(axis, list) else axis
  out = _prune(w, n, m, axis, outputs, interpret)
  return out if len(outputs) > 1 else out[0]


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2, 3, 4, 5))
def _prune(w, n, m, axis, outputs, interpret):
  return nm_mosaic(w, n, m, axis, outputs, interpret=interpret)


@_prune.defjvp
def _prune_jvp(n, m, axis, outputs, interpret, primals, tangents):
  (w,), (dw,) = primals, tangents
  want = _with_mask(outputs)
  return _pruned_jvp(nm_mosaic(w, n, m, axis, want, interpret=interpret), want, outputs, dw)


def _with_mask(outputs: tuple[str, ...]) -> tuple[str, ...]:
  return outputs if "mask" in outputs else outputs + ("mask",)


def _pruned_jvp(outs, want, outputs, dw) -> tuple[tuple, tuple]:
  """One weight's ``(outputs, tangents)`` from its kernel outputs ``want`` (mask included):
  the pruned weight's tangent is ``dw`` where kept, the other outputs are constant."""
  mask = outs[want.index("mask")]
  rest = [np.zeros(o.shape, jax.dtypes.float0) for o in outs[1 : len(outputs)]]
  return tuple(outs[: len(outputs)]), (jnp.where(mask, dw, jnp.zeros_like(dw)), *rest)


def prune_many(
  ws: Sequence[jax.Array],
  n: int,
  m: int,
  axis: Axis,
  outputs: tuple[str, ...] = ("weight", "mask"),
  *,
  interpret: bool | None = None,
) -> list[tuple[jax.Array, ...]]:
  """:func:`prune` of several weights of one shape and dtype (:func:`nm_mosaic_many`).

  Returns one tuple of ``outputs`` per weight; each pruned weight's
  derivative is its mask.

  Raises:
    ValueError: as :func:`nm_mosaic_many`, or if ``outputs`` does not start
      with ``"weight"``.
  """
  outputs = tuple(outputs)
  if not outputs or outputs[0] != "weight":
    raise ValueError(f"prune_many() outputs must start with 'weight', got {outputs!r}.")
  axis = tuple(axis) if isinstance(axis, list) else axis
  return list(_prune_many(tuple(ws), n, m, axis, outputs, interpret))


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2, 3, 4, 5))
def _prune_many(ws, n, m, axis, outputs, interpret):
  return tuple(nm_mosaic_many(ws, n, m, axis, outputs, interpret=interpret))


@_prune_many.defjvp
def _prune_many_jvp(n, m, axis, outputs, interpret, primals, tangents):
  (ws,), (dws,) = primals, tangents
  want = _with_mask(outputs)
  outs = nm_mosaic_many(ws, n, m, axis, want, interpret=interpret)
  pairs = [_pruned_jvp(o, want, outputs, dw) for o, dw in zip(outs, dws)]
  return tuple(a for a, _ in pairs), tuple(t for _, t in pairs)
