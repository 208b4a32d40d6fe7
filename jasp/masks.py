"""N:M masks: the pure math of structured sparsity.

Every function here maps an array to a boolean mask of the same shape. Groups
are *aligned*: along the group axis, entries ``m*g .. m*g + m - 1`` form group
``g``. A mask keeps the ``n`` entries of largest magnitude in each group.

Tie rule (for every function in this module): when two entries of a group have
equal magnitude, the one at the lower index along the group axis wins. NaN is
treated as the largest magnitude (it is kept, so that it is not hidden); the
pruning front end (:func:`jasp.prune`) rejects NaN and Inf in concrete weights
before this point (under ``jit`` it cannot, and these rules apply).

No function here goes through a matmul: magnitudes are compared exactly in the
input's own dtype (fp32, bf16, fp16 or an integer type), so the mask never
depends on reduced-precision (TF32) matrix units.
"""

from __future__ import annotations

import functools
import itertools
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from jasp import _deprecation
from jasp import _dispatch
from jasp._nm_core import best_pattern_bits
from jasp._nm_core import block_patterns
from jasp._nm_core import check_nm
from jasp._nm_core import group_axes
from jasp._nm_core import innermost_group_axes
from jasp.typing import Axis
from jasp.typing import Impl

__all__ = [
  "block_patterns",
  "group_axes",
  "is_nm",
  "magnitude",
  "nm_mask",
  "nm_mask_2d",
  "nm_prune",
]


def magnitude(w: jax.Array) -> jax.Array:
  """The key the masks rank by: ``|w|`` in ``w``'s dtype, NaN mapped to +inf.

  Args:
    w: a real floating or integer array. Complex inputs use their modulus.

  Returns:
    An array of ``w``'s shape; floating for floating/complex input, the same
    integer dtype for integer input (signed minimum values saturate).
  """
  w = jnp.asarray(w)
  if w.dtype == jnp.bool_:
    raise TypeError("N:M masks are defined for numeric arrays, got a bool array.")
  if jnp.issubdtype(w.dtype, jnp.unsignedinteger):
    return w
  if jnp.issubdtype(w.dtype, jnp.integer):
    # |INT_MIN| overflows; saturate so that it still ranks as the largest.
    info = jnp.iinfo(w.dtype)
    return jnp.where(w == info.min, info.max, jnp.abs(w))
  a = jnp.abs(w)
  return jnp.where(jnp.isnan(a), jnp.inf, a)


def _grouped(shape: tuple[int, ...], axes: tuple[int, ...], m: int):
  """Shape of the (pre, groups, m, post) view and the group axis position."""
  a0, a1 = axes[0], axes[-1]
  k = int(np.prod([shape[a] for a in axes], dtype=np.int64))
  if k % m:
    sizes = "x".join(str(shape[a]) for a in axes)
    raise ValueError(
      f"the group axis {axes if len(axes) > 1 else a0} of an array of shape {shape} has "
      f"size {sizes}={k}, which is not a multiple of m={m}."
    )
  view = shape[:a0] + (k // m, m) + shape[a1 + 1 :]
  return view, a0 + 1


def topn_mask(key: jax.Array, n: int, m: int, axis: Axis = 0) -> jax.Array:
  """Keeps the ``n`` largest ``key`` entries per aligned group of ``m``.

  The element-wise rank formulation: entry ``i`` of a group is kept when fewer
  than ``n`` members beat it (``key_j > key_i``, or equal with ``j < i``).
  ``m*(m-1)`` comparisons per entry, all element-wise, so XLA fuses the whole
  computation into one pass over ``key``.

  Args:
    key: array of scores, any rank; larger is kept. Must not contain NaN.
    n, m: keep ``n`` of every ``m``.
    axis: group axis, or a run of consecutive axes flattened row-major.

  Returns:
    bool array of ``key``'s shape with exactly ``n`` True per group.
  """
  check_nm(n, m)
  key = jnp.asarray(key)
  axes = innermost_group_axes(key.shape, group_axes(key.ndim, axis), m)
  view, g = _grouped(key.shape, axes, m)
  k = key.reshape(view)
  members = [jax.lax.index_in_dim(k, i, axis=g, keepdims=False) for i in range(m)]
  keeps = []
  for i, ki in enumerate(members):
    beaten = jnp.zeros(ki.shape, jnp.int32)
    for j, kj in enumerate(members):
      if j == i:
        continue
      beats = (kj >= ki) if j < i else (kj > ki)
      beaten = beaten + beats.astype(jnp.int32)
    keeps.append(beaten < n)
  return jnp.stack(keeps, axis=g).reshape(key.shape)


def nm_mask(
  w: jax.Array,
  n: int = 2,
  m: int = 4,
  axis: Axis = 0,
  *,
  impl: Literal["xla", "pallas"] | None = None,
) -> jax.Array:
  """N:M magnitude mask: keep the ``n`` largest ``|w|`` in each group of ``m``.

  Args:
    w: weight of any rank >= 1 and any float (fp32, bf16, fp16, fp64) or
      integer dtype.
    n, m: keep ``n`` of every ``m`` consecutive entries (``1 <= n < m``).
    axis: the group axis (the reduction / input-channel axis of the layer), or
      a run of consecutive axes flattened in row-major order. Negative values
      count from the end. A Flax ``Dense`` kernel ``(in, out)`` uses 0, a
      ``Conv`` kernel ``(*spatial, in, out)`` uses -2.
    impl: ``"xla"`` for the fused element-wise XLA computation, ``"pallas"``
      for a Pallas GPU kernel (Mosaic GPU on Hopper, Triton before), ``None``
      to choose by backend and shape.

  Returns:
    bool array of ``w.shape``; exactly ``n`` True per group. Ties go to the
    lower index along the group axis.

  Raises:
    ValueError: if the group axis' size is not a multiple of ``m``, or n/m are
      invalid.

  Example:
    >>> import jax.numpy as jnp, jasp
    >>> w = jnp.array([[1., -4.], [3., 2.], [-2., 1.], [0., 3.]])
    >>> jasp.nm_mask(w, 2, 4, axis=0).astype(int)
    Array([[0, 1],
           [1, 0],
           [1, 0],
           [0, 1]], dtype=int32)
  """
  w = jnp.asarray(w)
  if w.ndim == 0:
    raise ValueError("nm_mask needs an array of rank >= 1, got a scalar.")
  if impl not in (None, "xla", "pallas"):
    raise ValueError(f"impl must be None, 'xla' or 'pallas', got {impl!r}.")
  if impl == "pallas" or impl is None:
    fn = _dispatch.pallas_nm_mask(w, n, m, axis, forced=impl == "pallas")
    if fn is not None:
      return fn()
  check_nm(n, m)
  return _magnitude_mask(w, n, m, group_axes(w.ndim, axis))


@functools.partial(jax.jit, static_argnames=("n", "m", "axis"))
def _magnitude_mask(w, n, m, axis):
  return topn_mask(rank_key(w), n, m, axis)


_UINT = {2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint64}


def rank_key(w: jax.Array) -> jax.Array:
  """An integer key that orders entries exactly as :func:`magnitude` does.

  For floats, the bit pattern of ``|w|`` read as an unsigned integer is
  monotonic in the magnitude (NaN mapped to +inf first). Comparing integers
  instead of floats keeps subnormal magnitudes apart on backends that flush
  them to zero in float comparisons (XLA on CPU does).
  """
  mag = magnitude(w)
  if jnp.issubdtype(mag.dtype, jnp.floating) and mag.dtype.itemsize in _UINT:
    return jax.lax.bitcast_convert_type(mag, _UINT[mag.dtype.itemsize])
  return mag


def is_nm(w: jax.Array, n: int = 2, m: int = 4, axis: Axis = 0) -> jax.Array:
  """True when every aligned group of ``m`` along ``axis`` has <= ``n`` non-zeros.

  Args:
    w: array of any rank; a bool array counts True as non-zero.
    n, m, axis: as in :func:`nm_mask`.

  Returns:
    A scalar bool array (jittable). Raises ``ValueError`` as :func:`nm_mask`
    when the group axis does not divide by ``m``.
  """
  check_nm(n, m)
  w = jnp.asarray(w)
  axes = innermost_group_axes(w.shape, group_axes(w.ndim, axis), m)
  view, g = _grouped(w.shape, axes, m)
  nz = (w != 0).reshape(view).sum(axis=g)
  return jnp.all(nz <= n)


def nm_prune(
  w: jax.Array,
  n: int = 2,
  m: int = 4,
  axis: Axis = 0,
  *,
  impl: Impl | None = None,
  with_mask: bool = True,
) -> tuple[jax.Array, jax.Array] | jax.Array:
  """Prunes one array to N:M: the masked weight, and its mask, in one pass.

  On a GPU a Pallas kernel (Mosaic GPU on Hopper, Triton before) reads ``w``
  once and writes the pruned weight (and the mask) once; elsewhere XLA fuses
  the same computation.

  Args:
    w: weight of rank >= 1 (fp32, bf16 or fp16 for the kernel; any float or
      integer dtype for XLA).
    n, m: keep the ``n`` largest ``|w|`` of every aligned group of ``m``.
    axis: the group (input-channel) axis: 0 for a Flax ``Dense`` kernel
      ``(in, out)``, -2 for a conv kernel ``(*spatial, in, out)``; or a run of
      consecutive axes flattened row-major.
    impl: ``"xla"``, ``"pallas"``, ``"auto"`` or ``None`` (the context's; see
      :func:`jasp.mask_impl`).
    with_mask: also return the bool mask.

  Returns:
    ``(pruned, mask)``, or ``pruned`` when ``with_mask=False``: ``pruned`` has
    ``w``'s shape and dtype, ``w`` where ``mask`` (= ``nm_mask(w, n, m,
    axis)``) keeps and 0 elsewhere. Differentiable in ``w`` (the derivative is
    the mask).

  Raises:
    ValueError: ``w`` is a scalar, n/m are invalid, or the group axis does not
      divide by ``m``; ``impl="pallas"`` for a dtype or ``m`` the kernel does
      not support.
    RuntimeError: ``impl="pallas"`` where no Pallas kernel applies (no Pallas
      Triton backend in this JAX, and the Mosaic GPU kernel needs a Hopper GPU
      and tiles of a multiple of 128 elements).

  Example:
    >>> import jax, jasp
    >>> kernel = jax.random.normal(jax.random.key(0), (16, 8))
    >>> pruned, mask = jasp.masks.nm_prune(kernel, 2, 4, axis=0)
    >>> bool(jasp.is_nm(pruned, 2, 4, axis=0))
    True
  """
  w = jnp.asarray(w)
  if w.ndim == 0:
    raise ValueError("nm_prune needs an array of rank >= 1, got a scalar.")
  check_nm(n, m)
  fn = _dispatch.pallas_nm_prune(w, n, m, axis, impl, with_mask)
  if fn is not None:
    return fn()
  mask = nm_mask(w, n, m, axis, impl="xla")
  pruned = jnp.where(mask, w, jnp.zeros_like(w))
  return (pruned, mask) if with_mask else pruned


nm_prune_array = _deprecation.deprecated_alias(
  nm_prune, "jasp.nm_prune_array", "jasp.masks.nm_prune"
)


# ----------------------------------------------------------------------------
# Transposable (2-D block) masks.


def _single_axis(shape: tuple[int, ...], axis: Axis, name: str) -> int:
  """One axis of ``shape`` (an int, or a run of length 1), normalised to be non-negative.

  Raises:
    ValueError: ``axis`` names several axes (naming the argument and the fix) or is
      out of range.
    TypeError: ``axis`` is not an int or a sequence of ints.
  """
  axes = group_axes(len(shape), axis)
  if len(axes) > 1:
    raise ValueError(
      f"nm_mask_2d takes one {name} (a transposable block has one group axis and one "
      f"output axis), got {name}={axis!r} for shape {tuple(shape)}. Merge the axes first "
      "(e.g. w.reshape(-1, w.shape[-1]) for a kernel (heads, head_dim, out)), or use "
      "jasp.prune(..., pattern='2d_best'), which merges runs of axes itself."
    )
  return axes[0]


def _blocks(w: jax.Array, m: int, axis: int, out_axis: int):
  """(…, R/m, C/m, m[row along axis], m[col along out_axis]) view of ``w``."""
  if w.ndim < 2:
    raise ValueError(f"transposable masks need rank >= 2, got shape {w.shape}.")
  a = _single_axis(w.shape, axis, "axis")
  b = _single_axis(w.shape, out_axis, "out_axis")
  if a == b:
    raise ValueError(f"axis and out_axis must differ, both are {a}.")
  r, c = w.shape[a], w.shape[b]
  if r % m or c % m:
    raise ValueError(
      f"transposable {m}x{m} blocks need both axes to divide by m={m}; shape "
      f"{w.shape} has size {r} on axis {a} and {c} on out_axis {b}."
    )
  x = jnp.moveaxis(w, (a, b), (-2, -1))
  lead = x.shape[:-2]
  x = x.reshape(lead + (r // m, m, c // m, m))
  x = jnp.swapaxes(x, -3, -2)  # (..., R/m, C/m, m, m)

  def restore(blocks):
    y = jnp.swapaxes(blocks, -3, -2).reshape(lead + (r, c))
    return jnp.moveaxis(y, (-2, -1), (a, b))

  return x, restore


# Up to this many candidate patterns, ``method="best"`` is unrolled into one
# element-wise computation (2:4 has 90); beyond it, a gather per pattern.
_BEST_UNROLL_MAX = 128


@functools.partial(jax.jit, static_argnums=(1, 2))
def _best_blocks(mag: jax.Array, n: int, m: int) -> jax.Array:
  """Optimal transposable pattern for each block of ``mag (..., m, m)``.

  Element-wise over the blocks: every candidate's score is a chain of adds of
  per-column partial sums in a fixed order (column 0 first; within a column the
  chosen rows in increasing order), shared between candidates with a common
  prefix; a running strict maximum keeps the first best candidate and its
  ``m*m``-bit pattern. XLA fuses all of it into one pass over ``mag`` (no
  ``(..., P)`` score tensor, no gathers).
  """
  pats = block_patterns(n, m)  # (P, m): per column, the index of its row choice
  if len(pats) > _BEST_UNROLL_MAX:
    return _best_blocks_gather(mag, n, m)
  bits = best_pattern_bits(lambda r, c: mag[..., r, c], n, m)
  keep = [[(bits >> (r * m + c)) & 1 for c in range(m)] for r in range(m)]
  return jnp.stack([jnp.stack(row, axis=-1) for row in keep], axis=-2) > 0


def _best_blocks_gather(mag: jax.Array, n: int, m: int) -> jax.Array:
  """:func:`_best_blocks` by gathers over all patterns (large pattern counts)."""
  choices = np.asarray(list(itertools.combinations(range(m), n)), np.int32)
  sel = np.zeros((len(choices), m), np.float32)
  for k, rows in enumerate(choices):
    sel[k, rows] = 1.0
  pats = block_patterns(n, m)  # (P, m)
  # Per column c: the kept magnitude of each row choice k, summed element-wise
  # in float32 (exact order, no matmul unit): (..., m_cols, K).
  per_choice = jnp.stack([sum(mag[..., int(r), :] for r in rows) for rows in choices], axis=-1)
  # Pattern score: sum over columns of the chosen row set's magnitude.
  score = per_choice[..., 0, :][..., pats[:, 0]]
  for c in range(1, m):
    score = score + per_choice[..., c, :][..., pats[:, c]]
  best = jnp.argmax(score, axis=-1)  # first maximum: lowest pattern index
  chosen = jnp.asarray(pats)[best]  # (..., m) choice per column
  keep = jnp.asarray(sel)[chosen]  # (..., m_cols, m_rows)
  return jnp.swapaxes(keep, -1, -2) > 0


@functools.partial(jax.jit, static_argnums=(1, 2))
def _greedy_blocks(mag: jax.Array, n: int, m: int) -> jax.Array:
  """apex-style greedy: largest first, keep while row and column have < n.

  Sort-free: each entry's rank in the order (larger magnitude, then lower
  row-major index) comes from pairwise comparisons within its block; then
  ``m*m`` steps visit the entries by rank, updating per-row and per-column
  counts. Every step is element-wise over the blocks.
  """
  lead = mag.shape[:-2]
  e_count = m * m
  flat = mag.reshape(lead + (e_count,))
  a, b = flat[..., :, None], flat[..., None, :]  # entry i (rows), entry j (cols)
  lower = np.arange(e_count)[None, :] < np.arange(e_count)[:, None]  # j < i
  rank = ((b > a) | ((b == a) & lower)).sum(-1, dtype=jnp.int32).reshape(lead + (m, m))
  row_count = jnp.zeros(lead + (m, 1), jnp.int32)
  col_count = jnp.zeros(lead + (1, m), jnp.int32)
  keep = jnp.zeros(lead + (m, m), bool)
  for t in range(e_count):
    ok = (rank == t) & (row_count < n) & (col_count < n)
    keep = keep | ok
    row_count = row_count + ok.sum(-1, keepdims=True, dtype=jnp.int32)
    col_count = col_count + ok.sum(-2, keepdims=True, dtype=jnp.int32)
  return keep


def nm_mask_2d(
  w: jax.Array,
  n: int = 2,
  m: int = 4,
  axis: int = 0,
  out_axis: int = -1,
  *,
  method: Literal["best", "greedy"] = "best",
) -> jax.Array:
  """Transposable N:M mask: N:M along ``axis`` *and* along ``out_axis``.

  ``w`` is cut into ``m x m`` blocks over (``axis``, ``out_axis``); any other
  axes (e.g. a conv kernel's spatial taps) are batch axes. In each block every
  group along ``axis`` and every group along ``out_axis`` keeps at most ``n``,
  so both ``w`` and its transpose (used by the backward pass) are N:M.

  * ``method="best"`` (apex ``m4n2_2d_best``): per block, the pattern with
    exactly ``n`` per row and column that keeps the most magnitude (90
    candidates for 2:4). Sums are taken in float32 in a fixed order; among
    equal scores the first pattern of :func:`block_patterns` wins. m <= 5.
  * ``method="greedy"`` (apex ``m4n2_2d_greedy``): visit the block's entries
    from largest to smallest magnitude (ties: lower row-major index), keep one
    while its row and column hold fewer than ``n``. Fast, but may strand
    entries: a row or column can end with fewer than ``n`` kept.

  Magnitudes are ranked exactly, subnormals included, on every backend (XLA on
  CPU flushes subnormals to zero in float arithmetic): ``greedy`` compares the
  integer keys of :func:`rank_key`, as :func:`nm_mask` does; ``best`` scales
  each block whose largest magnitude is below 1 by a power of two (exactly, on
  the bit patterns) before summing, which changes no comparison on a backend
  that keeps subnormals and keeps them apart on one that flushes them.

  Args:
    w: array of rank >= 2; float or integer.
    n, m: keep ``n`` of every ``m``.
    axis: the group (reduction) axis, one axis; 0 for a Dense kernel
      ``(in, out)``, -2 for a conv kernel ``(*spatial, in, out)``.
    out_axis: the other axis of the block (the output channels), one axis,
      default -1.
    method: ``"best"`` or ``"greedy"``.

  Returns:
    bool array of ``w.shape``.

  Raises:
    ValueError: ``axis`` or ``out_axis`` names several axes (merge them with a
      reshape first, or use ``jasp.prune(pattern="2d_best")``) or is out of
      range; the two are equal; a block axis does not divide by ``m``; invalid
      ``n``/``m`` or ``method``.
  """
  check_nm(n, m)
  w = jnp.asarray(w)
  if method not in ("best", "greedy"):
    raise ValueError(f"method must be 'best' or 'greedy', got {method!r}.")
  if w.ndim < 2:
    raise ValueError(f"transposable masks need rank >= 2, got shape {w.shape}.")
  a, b = _single_axis(w.shape, axis, "axis"), _single_axis(w.shape, out_axis, "out_axis")
  if method == "best":  # the one-pass Pallas kernel where it applies (see jasp._dispatch)
    fn = _dispatch.pallas_nm_mask_2d(w, n, m, a, b)
    if fn is not None:
      return fn()
  return _mask_2d(w, n, m, a, b, method)


@functools.partial(jax.jit, static_argnames=("n", "m", "axis", "out_axis", "method"))
def _mask_2d(w, n, m, axis, out_axis, method):
  blocks, restore = _blocks(w, m, axis, out_axis)
  if method == "best":
    keep = _best_blocks(_block_scores_input(magnitude(blocks)), n, m)
  else:
    keep = _greedy_blocks(rank_key(blocks), n, m)
  return restore(keep)


# (unsigned type, mantissa bits, exponent bias) of the float types the scores are summed in.
_FLOAT_BITS = {4: (jnp.uint32, 23, 127), 8: (jnp.uint64, 52, 1023)}


def _block_scores_input(mag: jax.Array) -> jax.Array:
  """The magnitudes ``(..., m, m)`` that ``method="best"`` sums: float32 (float64 kept).

  Each block whose largest magnitude is below 1 is multiplied by ``2**s`` so that
  its largest magnitude lands in [1, 2): exactly (exponent arithmetic on the bit
  patterns, so a backend that flushes subnormals cannot read them as 0), and
  without changing any comparison of the block's sums (scaling by a power of two
  commutes with rounding while nothing under- or overflows). Entries that stay
  below the normal range after scaling are under ``2**-(bias-1)`` of the block's
  largest and read as 0; they cannot change a sum that includes the largest
  entry. Blocks whose largest magnitude is >= 1 (or Inf) are left as they are.
  """
  if jnp.issubdtype(mag.dtype, jnp.integer):
    return mag.astype(jnp.float32)
  if mag.dtype == jnp.bfloat16:  # the upper half of a float32, widened on the bits
    bits = jax.lax.bitcast_convert_type(mag, jnp.uint16).astype(jnp.uint32) << 16
    mag = jax.lax.bitcast_convert_type(bits, jnp.float32)
  elif mag.dtype != jnp.float64:
    mag = mag.astype(jnp.float32)  # float16 subnormals are float32 normals: exact
  utype, mbits, bias = _FLOAT_BITS[mag.dtype.itemsize]
  u = jax.lax.bitcast_convert_type(mag, utype)
  one = utype(1)
  exp = u >> mbits
  frac = u & ((one << mbits) - one)
  top = jnp.max(exp, axis=(-2, -1), keepdims=True)  # the block's largest biased exponent
  shift = jnp.where(top >= bias, utype(0), utype(bias) - jnp.maximum(top, one))
  normal = jax.lax.bitcast_convert_type(((exp + shift) << mbits) | frac, mag.dtype)
  # A subnormal is frac * 2**(1 - bias - mbits); times 2**shift it is exact and normal when
  # shift >= mbits (the power of two is then a normal number, built from its bits).
  scale = jax.lax.bitcast_convert_type((shift + one - mbits) << mbits, mag.dtype)
  sub = jnp.where(shift >= mbits, frac.astype(mag.dtype) * scale, jnp.zeros((), mag.dtype))
  return jnp.where(exp == 0, sub, normal)
