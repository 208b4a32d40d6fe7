"""2:4 compressed weights and a matmul that reads them, for small token counts (LLM decode).

``y = x @ W`` with ``x (T, K)`` and a weight ``W (K, N)`` that is 2:4 along
``K`` (axis 0, a Flax ``Dense`` kernel ``(in, out)``): in every group of four
consecutive rows ``4g .. 4g + 3`` each column holds at most two nonzeros. At
small ``T`` the product is bound by reading ``W``; the compressed weight
(:class:`Compressed24`) is ``K * N * itemsize / 2 + K * N / 8`` bytes, 56% of
the dense bf16 bytes, so a kernel that reads it can approach 1.78x over dense.

Format (:class:`Compressed24`), with ``G = K / 4`` groups, in one of two
layouts. ``"nk"`` (columns major, for the Mosaic GPU kernel on Hopper) is
described in :mod:`jasp.kernels.decode24_mosaic`. ``"kn"`` (groups major, for
the Triton kernel below), with ``BN`` the format's ``tile``:

* ``values (2, G, N)``, ``W``'s dtype: slot ``s`` of group ``g``, column ``n``
  is the ``s``-th kept entry, in increasing row order, of rows ``4g .. 4g + 3``
  of column ``n``. The kept entries are the nonzeros, completed to two by the
  first zero entries (their values, so a ``-0.0`` kept there survives);
* ``meta (G, N / 2)``, ``uint8``: the positions (0..3) of both slots, one
  4-bit code per (group, column), ``p0 | p1 << 2`` with ``p0 < p1``. For
  column tile ``j`` (``BN`` columns), the low nibble of byte
  ``(g, j * BN / 2 + i)`` is column ``j * BN + i`` and the high nibble column
  ``j * BN + BN / 2 + i``: a program of one column tile reads ``BN / 2``
  contiguous bytes per group and gets two half tiles, with no interleaving
  in registers.

Design note: ``docs/design/decode-kernel.md``.

:func:`matmul_24` runs the kernel of the weight's layout. The ``"kn"`` kernel
(Pallas; the Triton backend on GPUs, interpret mode elsewhere) reorders the
sum over ``k`` by position within the group, ``y = sum_j x[:, j::4] @ D_j``
with ``D_j (G, N) = where(p0 == j, v0, where(p1 == j, v1, 0))``. ``x`` is
viewed for free as ``(T, G, 4)``; a program owns ``block_t`` rows of ``y``
and one column tile, and walks its share of the groups in chunks of
``block_g``: it loads ``x[:, chunk, j]`` (strided by 4), both slots' values
and the codes of the chunk, builds the eight ``(block_g, BN / 2)`` tiles
``D_j`` (two halves) with compares and selects (six per code, since ``p0 <
p1``: :func:`jasp.kernels.decode24_mosaic.position_tile`), and accumulates
eight dots in float32. For small ``T * N`` the groups are split over
``splits`` programs (split-K) so that enough programs run to fill a GPU;
their float32 partial sums are added afterwards (one small XLA reduction).
Rows past ``T`` and groups past ``G`` are masked at load and store: neither
``x`` nor ``W`` is padded or copied.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from jasp.kernels import decode24_mosaic
from jasp.kernels.nm_pallas import backend_available
from jasp.kernels.nm_pallas import pow2_ceil
from jasp.kernels.nm_pallas import triton_params
from jasp.kernels.nm_pallas import use_interpret
from jasp.kernels.ranking import SUPPORTED_DTYPES

__all__ = [
  "Compressed24",
  "LAYOUTS",
  "Plan",
  "compress_24",
  "default_layout",
  "decompress_24",
  "matmul_24",
  "native",
  "nbytes",
  "plan",
  "plan_for",
  "shape_ok",
  "tile_for",
]

#: The layouts of :class:`Compressed24`: groups major (Triton kernel), columns major (Mosaic GPU).
LAYOUTS = ("kn", "nk")

#: Column tiles of the ``"kn"`` layout :func:`compress_24` tries by default, widest first.
KN_TILES = (128, 64, 32)

# Default tiling (see Plan). The program target keeps about two programs per
# SM of a 132-SM H100 busy when T * N alone gives too few.
_BLOCK_T = 64
_BLOCK_G = 32
_TARGET_PROGRAMS = 264
_NUM_WARPS = 4
_NUM_STAGES = 3
_MIN_DOT = 16  # Triton's smallest dot dimension


@functools.partial(
  jax.tree_util.register_dataclass,
  data_fields=["values", "meta"],
  meta_fields=["shape", "tile", "layout"],
)
@dataclasses.dataclass(frozen=True)
class Compressed24:
  """A ``(K, N)`` weight, 2:4 along ``K``, as kept values and 2-bit positions.

  A pytree: ``values`` and ``meta`` are its children (they pass through
  ``jit``, checkpoint and shard), ``shape``, ``tile`` and ``layout`` static.
  Built by :func:`compress_24`; see the module doc for the layouts.

  Attributes:
    values: ``(2, K / 4, N)`` (``"kn"``) or ``(2, N, K / 4)`` (``"nk"``), in
      the weight's dtype.
    meta: ``(K / 4, N / 2)`` (``"kn"``) or ``(N, K / 8)`` (``"nk"``)
      ``uint8``, two 4-bit position codes per byte.
    shape: ``(K, N)``, the dense weight's shape.
    tile: the tile the nibbles of ``meta`` are laid out for: ``BN`` columns
      (``"kn"``) or a chunk of groups (``"nk"``).
    layout: ``"kn"`` or ``"nk"``.
  """

  values: jax.Array
  meta: jax.Array
  shape: tuple[int, int]
  tile: int
  layout: str = "kn"

  @property
  def dtype(self) -> np.dtype:
    return self.values.dtype

  @property
  def nbytes(self) -> int:
    return nbytes(self)


def nbytes(c: Compressed24) -> int:
  """Bytes of ``c``'s arrays: ``K * N * itemsize / 2 + K * N / 8`` (times any batch)."""
  return int(c.values.size * c.values.dtype.itemsize + c.meta.size * c.meta.dtype.itemsize)


def shape_ok(k: int, n: int, dtype, layout: str | None = None) -> tuple[bool, str]:
  """Whether :func:`matmul_24` takes a ``(k, n)`` weight of ``dtype`` in ``layout``
  (by default :func:`default_layout`) with the default tile, and why not.

  Raises:
    ValueError: ``layout`` is not one of :data:`LAYOUTS`.
  """
  return _kernel_of(layout or default_layout(k, n, dtype)).shape_ok(k, n, dtype)


def native(layout: str = "kn") -> bool:
  """Whether :func:`matmul_24` runs compiled here for ``layout``, not interpreted:
  a GPU backend with Pallas Triton (``"kn"``), or Pallas Mosaic GPU on a
  Hopper-or-newer GPU (``"nk"``).

  Raises:
    ValueError: ``layout`` is not one of :data:`LAYOUTS`.
  """
  return _kernel_of(layout).native()


def default_layout(k: int, n: int, dtype) -> str:
  """The layout :func:`compress_24` picks for a ``(k, n)`` weight of ``dtype``.

  ``"nk"`` where its Mosaic GPU kernel compiles (Hopper) and takes the weight
  (bf16 or fp16, ``K`` a multiple of 256, ``N`` of 64): JAX deprecates the
  Triton backend, and on an H100 the two kernels measured within a few
  percent of each other. Else ``"kn"``.
  """
  if decode24_mosaic.native() and decode24_mosaic.shape_ok(k, n, dtype)[0]:
    return "nk"
  return "kn"


def tile_for(k: int, n: int, dtype, layout: str | None = None, tile: int | None = None) -> int:
  """The ``tile`` :func:`compress_24` lays a ``(k, n)`` weight of ``dtype`` out for.

  Args:
    k, n: the weight's shape.
    dtype: its dtype.
    layout: as :func:`compress_24`'s (default :func:`default_layout`).
    tile: an explicit tile to check, or None for the layout's default.

  Raises:
    ValueError: ``layout`` is unknown, does not take the shape or dtype, or
      ``tile`` does not fit (see :func:`compress_24`).
  """
  return _kernel_of(layout or default_layout(k, n, dtype)).tile(k, n, dtype, tile)


def _check_dtype(dtype, what: str) -> None:
  if jnp.dtype(dtype) not in SUPPORTED_DTYPES:
    raise ValueError(
      f"{what} must be one of {', '.join(str(d) for d in SUPPORTED_DTYPES)}, got {jnp.dtype(dtype)}."
    )


def _kn_shape_ok(k: int, n: int, dtype) -> tuple[bool, str]:
  if jnp.dtype(dtype) not in SUPPORTED_DTYPES:
    return False, f"dtype {jnp.dtype(dtype).name} (the kernel takes bf16, fp16, fp32)"
  if k <= 0 or k % 4:
    return False, f"K={k} is not a positive multiple of 4"
  if n <= 0 or not any(n % t == 0 for t in KN_TILES):
    return False, f"N={n} is not a multiple of 32"
  return True, ""


def _kn_tile(k: int, n: int, dtype, tile: int | None) -> int:
  """The column tile for ``N = n``: ``tile`` checked, or the widest default dividing ``n``."""
  del k, dtype  # any K (a multiple of 4) and supported dtype: checked by compress_24
  if tile is None:
    for t in KN_TILES:
      if n % t == 0:
        return t
    raise ValueError(
      f"N={n} is not a multiple of any default column tile {KN_TILES}; pass an even "
      "tile that divides N (the kernel needs a power of two >= 32)."
    )
  if isinstance(tile, bool) or not isinstance(tile, (int, np.integer)):
    raise ValueError(f"tile must be an int, got {tile!r}.")
  if tile < 2 or tile % 2 or n % tile:
    raise ValueError(f"tile must be even, positive and divide N={n}; got tile={tile}.")
  return int(tile)


def _nk_tile(k: int, n: int, dtype, tile: int | None) -> int:
  """The group chunk of a ``(k, n)`` weight of ``dtype`` in the ``"nk"`` layout: ``tile``
  checked, or the widest that divides ``K / 4``."""
  ok, why = decode24_mosaic.shape_ok(k, n, dtype)
  if not ok:
    raise ValueError(f"no 'nk' layout for a ({k}, {n}) {jnp.dtype(dtype).name} weight: {why}.")
  if tile is None:
    return decode24_mosaic.default_tile(k)
  if tile not in decode24_mosaic.NK_TILES or (k // 4) % tile:
    raise ValueError(
      f"the 'nk' tile must be one of {decode24_mosaic.NK_TILES} dividing K/4={k // 4}, "
      f"got {tile!r}."
    )
  return int(tile)


def _positions(w: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """``(count, p0, p1)``, each ``(K / 4, N)`` int32, of a ``(K, N)`` weight.

  ``count``: nonzeros per group. ``p0 < p1``: the kept positions, the
  nonzeros first completed by the lowest-index zeros (exact when count <= 2).
  """
  k, n = w.shape
  nz = (w != 0).reshape(k // 4, 4, n)
  count = jnp.sum(nz, axis=1, dtype=jnp.int32)
  zeros_before = jnp.cumsum(~nz, axis=1, dtype=jnp.int32) - (~nz).astype(jnp.int32)
  kept = nz | (zeros_before < (2 - count)[:, None, :])
  p0 = jnp.argmax(kept, axis=1).astype(jnp.int32)
  p1 = (3 - jnp.argmax(kept[:, ::-1, :], axis=1)).astype(jnp.int32)
  return count, p0, p1


def _pack_codes(code: jax.Array, tile: int) -> jax.Array:
  """``(G, N)`` 4-bit codes -> ``(G, N / 2)`` bytes, two half tiles per tile (module doc)."""
  g, n = code.shape
  halves = code.astype(jnp.uint8).reshape(g, n // tile, 2, tile // 2)
  return (halves[:, :, 0] | (halves[:, :, 1] << 4)).reshape(g, n // 2)


def _unpack_codes(meta: jax.Array, tile: int) -> jax.Array:
  """Inverse of :func:`_pack_codes`: ``(G, N / 2)`` bytes -> ``(G, N)`` int32 codes."""
  g, half = meta.shape
  b = meta.astype(jnp.int32).reshape(g, 2 * half // tile, 1, tile // 2)
  return jnp.concatenate([b & 15, b >> 4], axis=2).reshape(g, 2 * half)


def _first_offender(count: np.ndarray) -> str:
  g, n = np.argwhere(count > 2)[0]
  return (
    f"group {g} (rows {4 * g}..{4 * g + 3}) of column {n} has {count[g, n]} nonzeros; "
    f"{int(np.sum(count > 2))} group(s) have more than 2"
  )


def compress_24(
  w: jax.Array, *, tile: int | None = None, layout: str | None = None, check: bool = True
) -> Compressed24:
  """Compresses a ``(K, N)`` weight that is 2:4 along ``K`` (axis 0).

  Args:
    w: bf16, fp16 or fp32 ``(K, N)`` array, ``K`` a multiple of 4, with at
      most two nonzeros in every group of four consecutive rows of a column
      (e.g. a kernel pruned by ``jasp.prune``).
    tile: ``"kn"``: the column tile ``BN`` the codes are laid out for, even
      and dividing ``N`` (:func:`matmul_24` needs a power of two >= 32); by
      default the widest of 128, 64, 32 that divides ``N``. ``"nk"``: the
      chunk of groups, 128 or 64 dividing ``K / 4``; by default the widest.
    layout: ``"kn"`` or ``"nk"`` (module doc); by default
      :func:`default_layout`. ``"nk"`` takes bf16 and fp16, ``K`` a multiple
      of 256 and ``N`` of 64.
    check: verify that ``w`` is 2:4 (needs a concrete ``w``). With
      ``check=False`` (inside ``jit``), a group with more than two nonzeros
      keeps only its first two: the caller promises there is none.

  Returns:
    A :class:`Compressed24`; :func:`decompress_24` gives ``w`` back exactly
    (up to the sign of zeros that were not kept).

  Raises:
    ValueError: ``w`` is not 2-D, ``K`` is not a multiple of 4, the dtype is
      not supported, ``layout`` is unknown or does not take the shape or
      dtype, ``tile`` does not fit, or (``check``) a group
      holds more than two nonzeros (the message names the first one), or
      ``check`` is on and ``w`` is traced.
  """
  w = jnp.asarray(w)
  if w.ndim != 2:
    raise ValueError(f"compress_24 needs a 2-D (K, N) weight, got shape {w.shape}.")
  k, n = (int(s) for s in w.shape)
  if k % 4 or k == 0 or n == 0:
    raise ValueError(f"K (axis 0) must be a positive multiple of 4, got shape {w.shape}.")
  _check_dtype(w.dtype, "the weight's dtype")
  layout = layout or default_layout(k, n, w.dtype)
  kernel = _kernel_of(layout)
  tile = kernel.tile(k, n, w.dtype, tile)
  count, p0, p1 = _positions(w)
  if check:
    if isinstance(w, jax.core.Tracer):
      raise ValueError(
        "compress_24 checks that w is 2:4, which needs a concrete array; inside jit pass "
        "check=False (groups with more than two nonzeros then lose entries)."
      )
    count = np.asarray(count)
    if np.any(count > 2):
      raise ValueError(f"w is not 2:4 along axis 0: {_first_offender(count)}.")
  grouped = w.reshape(k // 4, 4, n)
  v0 = jnp.take_along_axis(grouped, p0[:, None, :], axis=1)[:, 0]
  v1 = jnp.take_along_axis(grouped, p1[:, None, :], axis=1)[:, 0]
  code = p0 | (p1 << 2)
  if kernel.columns_major:
    v0, v1, code = v0.T, v1.T, code.T
  return Compressed24(jnp.stack([v0, v1]), _pack_codes(code, tile), (k, n), tile, layout)


def _check_compressed(c: Compressed24) -> None:
  if not isinstance(c, Compressed24):
    raise ValueError(f"expected a Compressed24 (from compress_24), got {type(c).__name__}.")
  k, n = c.shape
  t = c.tile
  kernel = _kernel_of(c.layout)
  rows, cols = (n, k // 4) if kernel.columns_major else (k // 4, n)
  bad_tile = not isinstance(t, (int, np.integer)) or t < 2 or t % 2 or cols % t
  if bad_tile or c.values.shape[-3:] != (2, rows, cols) or c.meta.shape[-2:] != (rows, cols // 2):
    raise ValueError(
      f"inconsistent Compressed24 of shape {c.shape}, layout {c.layout}, tile {t}: values "
      f"{c.values.shape}, meta {c.meta.shape} (want (2, {rows}, {cols}), ({rows}, "
      f"{cols // 2}) and an even tile dividing {cols})."
    )
  if c.meta.dtype != jnp.uint8:
    raise ValueError(f"Compressed24.meta must be uint8, got {c.meta.dtype}.")
  if c.dtype not in kernel.dtypes:
    raise ValueError(
      f"a {c.layout!r} Compressed24 holds {', '.join(d.name for d in kernel.dtypes)} values, "
      f"got {c.dtype}."
    )


def decompress_24(c: Compressed24) -> jax.Array:
  """The dense ``(K, N)`` weight of ``c``, in ``c.dtype`` (XLA; the exact inverse of
  :func:`compress_24`). Unkept entries are ``+0``. Codes with ``p0 >= p1``
  (:func:`compress_24` writes none) decode as :func:`matmul_24` reads them
  (:func:`jasp.kernels.decode24_mosaic.position_tile`).

  Raises:
    ValueError: ``c`` is not a consistent :class:`Compressed24` (or is batched).
  """
  _check_compressed(c)
  if c.values.ndim != 3:
    raise ValueError(f"decompress_24 takes one weight; values have shape {c.values.shape}.")
  k, n = c.shape
  code = _unpack_codes(c.meta, c.tile)
  v0, v1 = c.values[0], c.values[1]
  if _kernel_of(c.layout).columns_major:
    code, v0, v1 = code.T, v0.T, v1.T
  p0, p1 = code & 3, code >> 2
  d = [decode24_mosaic.position_tile(j, p0, p1, v0, v1) for j in range(4)]
  return jnp.stack(d, axis=1).reshape(k, n)


# ----------------------------------------------------------------------------
# The kernel.


@dataclasses.dataclass(frozen=True)
class Plan:
  """Static launch plan of :func:`matmul_24`.

  Attributes:
    t, k, n: the product's sizes (``x (t, k)``, ``W (k, n)``).
    block_t: rows of ``y`` per program (a power of two >= 16).
    block_n: columns per program, the format's ``tile``.
    block_g: groups (4 rows of ``W``) per chunk of the K loop (power of two >= 16).
    splits: programs that share one output tile (split-K).
    chunks: whole chunks per split; split ``s`` takes chunks
      ``s * chunks .. (s + 1) * chunks - 1``.
    tail: groups left after ``splits * chunks`` whole chunks (``< block_g``),
      done by the last split as one masked chunk.
    num_warps, num_stages: Triton compiler parameters.
  """

  t: int
  k: int
  n: int
  block_t: int
  block_n: int
  block_g: int
  splits: int
  chunks: int
  tail: int
  num_warps: int = _NUM_WARPS
  num_stages: int = _NUM_STAGES

  @property
  def groups(self) -> int:
    return self.k // 4

  @property
  def padded_groups(self) -> int:
    """Groups the blocks span: whole chunks, and one more for the tail."""
    return (self.splits * self.chunks + (1 if self.tail else 0)) * self.block_g

  @property
  def grid(self) -> tuple[int, int, int]:
    """``(row tiles, column tiles, splits)``; row tiles vary fastest (they share ``W``'s tile)."""
    return (pl.cdiv(self.t, self.block_t), self.n // self.block_n, self.splits)


def plan(
  t: int,
  k: int,
  n: int,
  tile: int,
  *,
  block_t: int | None = None,
  block_g: int | None = None,
  splits: int | None = None,
  target_programs: int | None = None,
  num_warps: int | None = None,
  num_stages: int | None = None,
) -> Plan:
  """The tiling of ``x (t, k) @ W (k, n)`` for a format of column tile ``tile``.

  ``splits`` (by default about ``target_programs`` programs in all, and a
  divisor of the whole chunks so that every split does the same work) and
  the other arguments are tuning overrides (benchmarks).

  Raises:
    ValueError: ``tile`` is not a power of two >= 32, a block is not a power
      of two >= 16, or ``splits`` is more than the whole chunks (or < 1).
  """
  if tile < 2 * _MIN_DOT or tile & (tile - 1):
    raise ValueError(f"matmul_24 needs tile a power of two >= 32, got {tile}.")
  block_t = block_t or min(_BLOCK_T, max(_MIN_DOT, pow2_ceil(t)))
  block_g = block_g or _BLOCK_G
  for name, b in (("block_t", block_t), ("block_g", block_g)):
    if b < _MIN_DOT or b & (b - 1):
      raise ValueError(f"{name} must be a power of two >= {_MIN_DOT}, got {b}.")
  groups = k // 4
  full, tail = divmod(groups, block_g)
  tiles = pl.cdiv(t, block_t) * (n // tile)
  if splits is None:
    splits = decode24_mosaic.pick_splits(full, pl.cdiv(target_programs or _TARGET_PROGRAMS, tiles))
  elif not 1 <= splits <= max(full, 1) or (full and full % splits):
    raise ValueError(
      f"splits must divide the {full} whole chunks of {block_g} groups, got {splits}."
    )
  return Plan(
    t=t,
    k=k,
    n=n,
    block_t=block_t,
    block_n=tile,
    block_g=block_g,
    splits=splits,
    chunks=full // splits,
    tail=tail,
    num_warps=num_warps or _NUM_WARPS,
    num_stages=num_stages or _NUM_STAGES,
  )


def _load(ref, mask):
  """``ref[...]``, entries where ``mask`` is False read as 0 (``mask`` None: all read)."""
  if mask is None:
    return ref[...]
  from jax.experimental.pallas import triton as plgpu

  return plgpu.load(ref, mask=jnp.broadcast_to(mask, ref.shape), other=0)


def _chunk(x_ref, v_ref, m_ref, start, acc, p: Plan, row_ok, g_ok):
  """Adds the ``block_g`` groups from ``start`` to the two half tiles ``acc``.

  ``row_ok (block_t, 1)`` and ``g_ok (block_g,)`` mask rows past ``T`` and
  groups not to count (``None``: all valid).
  """
  bg, h = p.block_g, p.block_n // 2
  rows = pl.ds(start, bg)
  col_mask = None if g_ok is None else g_ok[:, None]
  x_mask = row_ok if g_ok is None else (g_ok[None, :] if row_ok is None else row_ok & g_ok[None, :])
  xs = [_load(x_ref.at[:, rows, np.int32(j)], x_mask) for j in range(4)]
  codes = _load(m_ref.at[rows, :], col_mask).astype(jnp.int32)
  precision = lax.Precision.HIGHEST if xs[0].dtype == jnp.float32 else None
  out = []
  for half in range(2):
    cols = pl.ds(half * h, h)
    v0 = _load(v_ref.at[np.int32(0), rows, cols], col_mask)
    v1 = _load(v_ref.at[np.int32(1), rows, cols], col_mask)
    code = (codes >> (4 * half)) & 15
    p0, p1 = code & 3, code >> 2
    a = acc[half]
    for j in range(4):
      d = decode24_mosaic.position_tile(j, p0, p1, v0, v1)
      a = a + lax.dot(xs[j], d, precision=precision, preferred_element_type=jnp.float32)
    out.append(a)
  return tuple(out)


def _kernel(x_ref, v_ref, m_ref, o_ref, *, p: Plan):
  """One program: rows tile ``program_id(0)``, column tile 1, split 2 (see :class:`Plan`)."""
  bt, bg, h = p.block_t, p.block_g, p.block_n // 2
  s = pl.program_id(2)
  row_ok = None
  if p.t % bt:
    r = pl.program_id(0) * bt + lax.broadcasted_iota(jnp.int32, (bt, 1), 0)
    row_ok = r < p.t
  acc = (jnp.zeros((bt, h), jnp.float32), jnp.zeros((bt, h), jnp.float32))
  if p.chunks:
    first = s * (p.chunks * bg)

    def body(i, a):
      return _chunk(x_ref, v_ref, m_ref, first + i * bg, a, p, row_ok, None)

    acc = lax.fori_loop(0, p.chunks, body, acc)
  if p.tail:
    g_ok = lax.broadcasted_iota(jnp.int32, (bg,), 0) < p.tail
    if p.splits > 1:
      g_ok = g_ok & (s == p.splits - 1)
    acc = _chunk(x_ref, v_ref, m_ref, p.splits * p.chunks * bg, acc, p, row_ok, g_ok)
  for half in range(2):
    val = acc[half].astype(o_ref.dtype)
    dst = o_ref.at[:, pl.ds(half * h, h)]
    if row_ok is None:
      dst[...] = val
    else:
      from jax.experimental.pallas import triton as plgpu

      plgpu.store(dst, val, mask=jnp.broadcast_to(row_ok, val.shape))


@functools.partial(jax.jit, static_argnames=("p", "interpret"))
def _run(x2: jax.Array, values: jax.Array, meta: jax.Array, *, p: Plan, interpret: bool):
  """``x2 (T, K) @ W`` of one compressed weight, ``(T, N)`` in ``x2``'s dtype."""
  gp, bt, bn = p.padded_groups, p.block_t, p.block_n
  in_specs = [
    pl.BlockSpec((bt, gp, 4), lambda t, j, s: (t, 0, 0)),
    pl.BlockSpec((2, gp, bn), lambda t, j, s: (0, 0, j)),
    pl.BlockSpec((gp, bn // 2), lambda t, j, s: (0, j)),
  ]
  if p.splits == 1:
    out_shape = jax.ShapeDtypeStruct((p.t, p.n), x2.dtype)
    out_spec = pl.BlockSpec((bt, bn), lambda t, j, s: (t, j))
  else:
    out_shape = jax.ShapeDtypeStruct((p.splits, p.t, p.n), jnp.float32)
    out_spec = pl.BlockSpec((pl.squeezed, bt, bn), lambda t, j, s: (s, t, j))
  out = pl.pallas_call(
    functools.partial(_kernel, p=p),
    out_shape=out_shape,
    grid=p.grid,
    in_specs=in_specs,
    out_specs=out_spec,
    interpret=interpret,
    name="jasp_matmul_24",
    **triton_params(interpret, p.num_warps, p.num_stages),
  )(x2.reshape(p.t, p.groups, 4), values, meta)
  if p.splits > 1:
    out = jnp.sum(out, axis=0).astype(x2.dtype)
  return out


@functools.lru_cache(maxsize=None)
def _batched(
  shape: tuple[int, int], tile: int, layout: str, interpret: bool, tuning: tuple
) -> Callable:
  """``f(x2, values, meta)``: the product of one weight, with its own ``vmap`` rule.

  Under ``vmap`` over ``x`` alone the mapped rows are folded into ``T`` (one
  launch that reads ``W`` once); over the weight, one launch per weight
  (``lax.map``).
  """
  k, n = shape

  kernel = _kernel_of(layout)

  @jax.custom_batching.custom_vmap
  def f(x2, values, meta):
    p = kernel.plan(x2.shape[0], k, n, tile, **dict(tuning))
    return kernel.run(x2, values, meta, p=p, interpret=interpret)

  @f.def_vmap
  def rule(axis_size, in_batched, x2, values, meta):
    xb, vb, mb = in_batched
    if not (vb or mb):
      b, t = x2.shape[:2]
      return f(x2.reshape(b * t, k), values, meta).reshape(b, t, n), True
    bcast = lambda a, batched: a if batched else jnp.broadcast_to(a, (axis_size, *a.shape))
    args = (bcast(x2, xb), bcast(values, vb), bcast(meta, mb))
    return lax.map(lambda a: f(*a), args), True

  return f


def matmul_24(
  x: jax.Array, c: Compressed24, *, interpret: bool | None = None, **tuning
) -> jax.Array:
  """``x @ W`` with ``W`` read compressed: the decode-time 2:4 matmul.

  Args:
    x: ``(..., K)``, the dtype of ``c`` (bf16, fp16 or fp32); the leading
      axes (``T`` rows in all, any number; the kernel is made for 1 to 256)
      are flattened and restored.
    c: the weight, from :func:`compress_24` (``"kn"``: ``tile`` a power of
      two >= 32). Its layout picks the kernel: ``"kn"`` Pallas Triton,
      ``"nk"`` Pallas Mosaic GPU (Hopper; :mod:`jasp.kernels.decode24_mosaic`).
    interpret: run in Pallas interpret mode; ``None`` interprets everywhere but
      on a GPU backend.
    **tuning: the plan's overrides: ``"kn"``, :func:`plan`'s (``block_t``,
      ``block_g``, ``splits``, ``target_programs``, ``num_warps``,
      ``num_stages``); ``"nk"``, :func:`jasp.kernels.decode24_mosaic.plan`'s
      (``splits``, ``stages``, ``target_programs``). For benchmarks.

  Returns:
    ``(..., N)`` in ``x``'s dtype: float32 products accumulated in float32
    (fp32 inputs at full precision, not TF32; ``"nk"`` takes no fp32),
    rounded once.

  Works under ``jit`` and ``vmap``: mapped over ``x`` only, the mapped rows
  join ``T`` (one kernel launch, ``W`` read once); mapped over ``c`` (a
  batch of weights), one launch per weight in sequence. Not differentiable.

  Raises:
    ValueError: ``c`` is not a :class:`Compressed24` (or is inconsistent),
      ``x``'s last axis is not ``K``, the dtypes differ or are not supported,
      or the tiling does not apply (see :func:`plan`).
    RuntimeError: compiled (not interpreted) without the Pallas backend the
      layout needs (Triton; Mosaic GPU on compute capability 9.0+).
  """
  _check_compressed(c)
  if c.values.ndim != 3:
    raise ValueError(
      f"matmul_24 takes one weight (values (2, K/4, N)), got values {c.values.shape}; "
      "map over a batch of weights with jax.vmap."
    )
  x = jnp.asarray(x)
  k, n = c.shape
  if x.ndim < 1 or x.shape[-1] != k:
    raise ValueError(f"x must be (..., K) with K={k} (the weight is {c.shape}), got {x.shape}.")
  _check_dtype(x.dtype, "x's dtype")
  if x.dtype != c.dtype:
    raise ValueError(f"x is {x.dtype} but the weight is {c.dtype}; cast one to the other.")
  interpret = use_interpret(interpret)
  kernel = _kernel_of(c.layout)
  if not interpret and not kernel.buildable():
    raise RuntimeError(kernel.unbuildable)
  lead = x.shape[:-1]
  t = math.prod(lead)
  _plan(kernel, c, max(t, 1), tuning)  # checks the shape and the tuning before tracing
  if t == 0:
    return jnp.zeros((*lead, n), x.dtype)
  f = _batched((k, n), c.tile, c.layout, interpret, tuple(sorted(tuning.items())))
  return f(x.reshape(t, k), c.values, c.meta).reshape(*lead, n)


def plan_for(c: Compressed24, t: int, **tuning) -> Any:
  """The launch plan :func:`matmul_24` runs ``c`` with at ``t`` tokens.

  Args:
    c: the weight, from :func:`compress_24`.
    t: tokens (rows of ``x``), at least 1.
    **tuning: as :func:`matmul_24`'s.

  Returns:
    A :class:`Plan` (``"kn"``) or a :class:`jasp.kernels.decode24_mosaic.Plan` (``"nk"``).

  Raises:
    ValueError: ``c`` is inconsistent, its layout's kernel does not take its
      shape, or the tuning does not apply (see the plan functions).
  """
  _check_compressed(c)
  return _plan(_kernel_of(c.layout), c, t, tuning)


def _plan(kernel: _Kernel, c: Compressed24, t: int, tuning: dict) -> Any:
  """:func:`plan_for` of a checked ``c`` whose layout's entry is ``kernel``."""
  k, n = c.shape
  ok, why = kernel.shape_ok(k, n, c.dtype)
  if not ok:
    raise ValueError(f"matmul_24's {c.layout!r} kernel does not take this weight: {why}.")
  return kernel.plan(t, k, n, c.tile, **tuning)


# ----------------------------------------------------------------------------
# The layouts: the one place that tells them apart.


@dataclasses.dataclass(frozen=True)
class _Kernel:
  """One layout of :class:`Compressed24`: its format rules and the kernel that reads it.

  Attributes:
    columns_major: ``values (2, N, G)`` and ``meta (N, G / 2)``, the
      ``"kn"`` arrays transposed (the nibbles then pair groups, not columns).
    dtypes: the value dtypes the layout holds.
    shape_ok: ``(k, n, dtype) -> (ok, why not)`` for :func:`matmul_24`.
    tile: ``(k, n, dtype, tile) -> tile``, ``tile`` checked or the default;
      raises ValueError.
    native: whether the kernel runs compiled here.
    buildable: whether :func:`matmul_24` may build the kernel uninterpreted
      here (the Triton kernel lowers for CUDA from any host).
    unbuildable: the RuntimeError message when it may not.
    plan: ``(t, k, n, tile, **tuning) -> plan``.
    run: ``(x2, values, meta, *, p, interpret) -> (T, N)``.
  """

  columns_major: bool
  dtypes: tuple
  shape_ok: Callable[[int, int, Any], tuple[bool, str]]
  tile: Callable[[int, int, Any, int | None], int]
  native: Callable[[], bool]
  buildable: Callable[[], bool]
  unbuildable: str
  plan: Callable[..., Any]
  run: Callable[..., jax.Array]


# The "nk" entries look decode24_mosaic's functions up at call time (tests spy on them).
_KERNELS = {
  "kn": _Kernel(
    columns_major=False,
    dtypes=SUPPORTED_DTYPES,
    shape_ok=_kn_shape_ok,
    tile=_kn_tile,
    native=lambda: jax.default_backend() == "gpu" and backend_available(),
    buildable=backend_available,
    unbuildable="matmul_24 needs the Pallas Triton backend, which this JAX lacks.",
    plan=plan,
    run=_run,
  ),
  "nk": _Kernel(
    columns_major=True,
    dtypes=decode24_mosaic.DTYPES,
    shape_ok=decode24_mosaic.shape_ok,
    tile=_nk_tile,
    native=lambda: decode24_mosaic.native(),
    buildable=lambda: decode24_mosaic.native(),
    unbuildable="the 'nk' layout's kernel needs Pallas Mosaic GPU on a GPU of compute "
    "capability 9.0+ (Hopper); compress with layout='kn' for the Triton kernel.",
    plan=lambda *a, **kw: decode24_mosaic.plan(*a, **kw),
    run=lambda *a, **kw: decode24_mosaic.run(*a, **kw),
  ),
}


def _kernel_of(layout: str) -> _Kernel:
  try:
    return _KERNELS[layout]
  except (KeyError, TypeError):
    raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}.") from None
