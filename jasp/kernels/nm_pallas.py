"""One-pass N:M mask kernels in Pallas (Triton backend on GPUs).

Two entry points, both exact twins of the XLA path in :mod:`jasp.masks`:

* :func:`nm_mask_pallas` reads the weight once and writes the bool mask once;
* :func:`nm_prune_pallas` reads the weight once and writes the masked weight
  (and, optionally, the mask) in the same pass.

Layouts. The group axis (or run of consecutive axes, flattened row-major) is
never transposed. With ``pre`` the product of the sizes before the group axes,
``k`` their flattened size and ``post`` the product of the sizes after them,
the weight is viewed for free (a reshape) as one of two 3-D arrays:

* ``post > 1`` ("rows"): ``(pre * k / m, m, post)``. A Flax ``Dense`` kernel
  ``(in, out)`` grouped along axis 0 is ``(in / m, m, out)``; a conv kernel
  ``(kh, kw, in, out)`` grouped along axis -2 is ``(kh * kw * in / m, m, out)``
  (aligned groups never straddle two taps because ``m`` divides ``in``). Each
  program loads ``m`` tiles ``(b0, b1)``, one per group member, each contiguous
  along ``post``: coalesced loads, no transpose.
* ``post == 1`` ("cols", groups along the last axis, e.g. PyTorch ``(out,
  in)``): ``(rows, q, m)`` with ``q * m`` consecutive elements per row. For
  ``m`` a power of 2 each program loads its ``(b0, b1, m)`` block whole
  (contiguous, wide loads), splits the members apart in registers and
  interleaves the results back before one contiguous store; otherwise member
  ``i`` is the strided tile ``[:, :, i]``.

Shapes that do not tile evenly are handled with masked loads and stores on the
edge blocks (the bounds are static, so evenly tiled shapes carry no masks).

Ranking: :mod:`jasp.kernels.ranking` (shared with the Mosaic GPU kernels).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from jasp._nm_core import check_nm
from jasp._nm_core import split_around
from jasp.kernels.ranking import MAX_M
from jasp.kernels.ranking import SUPPORTED_DTYPES
from jasp.kernels.ranking import keep_top_n
from jasp.kernels.ranking import rank_keys
from jasp.kernels.ranking import supports
from jasp.typing import Axis

__all__ = [
  "SUPPORTED_DTYPES",
  "nm_mask_pallas",
  "nm_prune_pallas",
  "supports",
]


# Default tiling: elements per member tile, widest tile along the contiguous
# axis (in elements), warps per program, whole-block loads for the "cols" view.
# From the sweep in benchmarks/mask_bench.py on an H100 (8192^2, bf16 and fp32,
# both layouts): within 1% of the best configuration in each case.
_TILE_ELEMS = 1024
_MAX_CONTIG = 256
_NUM_WARPS = 8
_SPLIT = True


@functools.lru_cache(maxsize=None)
def backend_available() -> bool:
  """Whether this JAX still has the Pallas Triton backend the kernels are written for.

  JAX 0.11 deprecates it (in favour of Mosaic GPU) and will remove it; without
  it the dispatcher computes masks with XLA.
  """
  try:
    from jax.experimental.pallas import triton  # noqa: F401
  except ImportError:
    return False
  return True


def pow2_ceil(x: int) -> int:
  return 1 << max(0, int(x) - 1).bit_length()


def _pow2_divisor(x: int, cap: int) -> int:
  """Largest power of two that divides ``x`` and is at most ``cap``."""
  p = 1
  while p < cap and x % (2 * p) == 0:
    p *= 2
  return p


@dataclasses.dataclass(frozen=True)
class Plan:
  """Static launch plan: the 3-D view, the tiling and the grid.

  Attributes:
    view: shape of the 3-D view of the weight.
    member_dim: 1 for the "rows" view ``(G, m, C)``, 2 for "cols" ``(R, Q, m)``.
    block: ``(b0, b1)``, the member tile over view dims ``(0, tiled_dim)``.
    bounds: ``(d0, d1)`` sizes of the two tiled dims when edge blocks need
      masks, else ``None``.
    num_warps: Triton warps per program.
    split: "cols" view only: load each ``(b0, b1, m)`` block whole (contiguous,
      wide loads) and split it into members in registers; ``m`` a power of 2.
  """

  view: tuple[int, int, int]
  member_dim: int
  block: tuple[int, int]
  bounds: tuple[int, int] | None
  num_warps: int
  split: bool = False

  @property
  def tiled_dim(self) -> int:
    return 2 if self.member_dim == 1 else 1

  @property
  def grid(self) -> tuple[int, int]:
    d0, d1 = self.view[0], self.view[self.tiled_dim]
    return (pl.cdiv(d1, self.block[1]), pl.cdiv(d0, self.block[0]))

  @property
  def block_shape(self) -> tuple[int, int, int]:
    b0, b1 = self.block
    m = self.view[self.member_dim]
    return (b0, m, b1) if self.member_dim == 1 else (b0, b1, m)


def plan(
  shape: Sequence[int],
  m: int,
  axis: Axis,
  *,
  tile_elems: int | None = None,
  max_contig: int | None = None,
  num_warps: int | None = None,
  split: bool | None = None,
) -> Plan:
  """Chooses the view and tiling for a weight of ``shape`` (see module doc).

  Args:
    shape: the weight's shape.
    m: group size.
    axis: group axis, or a run of consecutive axes.
    tile_elems, max_contig, num_warps, split: tuning overrides (benchmarks).

  Raises:
    ValueError: if the group axes' size is not a multiple of ``m``.
  """
  shape = tuple(int(s) for s in shape)
  tile_elems = tile_elems or _TILE_ELEMS
  max_contig = max_contig or _MAX_CONTIG
  num_warps = num_warps or _NUM_WARPS
  pre, k, post = split_around(shape, axis, m)
  if post > 1:
    view = (pre * k // m, m, post)
    b1 = min(pow2_ceil(post), max_contig)
    d0, d1 = view[0], post
    member_dim = 1
  else:
    groups = pre * k // m
    q = _pow2_divisor(groups, max_contig)
    qn = k // m
    if q >= min(32, pow2_ceil(qn)):
      view = (groups // q, q, m)  # flat rows of q whole groups: no edge masks
    else:
      view = (pre, qn, m)  # natural rows, masked at the edge
    b1 = min(pow2_ceil(view[1]), max_contig)
    d0, d1 = view[0], view[1]
    member_dim = 2
  b0 = max(1, min(pow2_ceil(d0), tile_elems // b1))
  bounds = None if (d0 % b0 == 0 and d1 % b1 == 0) else (d0, d1)
  pow2 = m & (m - 1) == 0
  split = (_SPLIT if split is None else split) and member_dim == 2 and pow2
  return Plan(view, member_dim, (b0, b1), bounds, num_warps, bool(split))


def _kernel(x_ref, *out_refs, n: int, p: Plan, outputs: tuple[str, ...]):
  """One program: ``m`` member tiles in, their masks / masked values out."""
  from jax.experimental.pallas import triton as plgpu

  m = p.view[p.member_dim]
  b0, b1 = p.block
  valid = None
  if p.bounds is not None:
    j, i = pl.program_id(0), pl.program_id(1)
    r = i * b0 + lax.broadcasted_iota(jnp.int32, (b0, b1), 0)
    c = j * b1 + lax.broadcasted_iota(jnp.int32, (b0, b1), 1)
    valid = (r < p.bounds[0]) & (c < p.bounds[1])

  def idx(k):
    if p.member_dim == 1:
      return (slice(None), np.int32(k), slice(None))
    return (slice(None), slice(None), np.int32(k))

  def load(k):
    if valid is None:
      return x_ref[idx(k)]
    return plgpu.load(x_ref.at[idx(k)], mask=valid, other=0)

  def store(ref, k, val):
    if valid is None:
      ref[idx(k)] = val
    else:
      plgpu.store(ref.at[idx(k)], val, mask=valid)

  if p.split:
    # Whole (b0, b1, m) block: contiguous loads and stores; members split off
    # and interleaved back in registers.
    valid3 = None if valid is None else jnp.broadcast_to(valid[:, :, None], (b0, b1, m))
    block = x_ref[...] if valid3 is None else plgpu.load(x_ref, mask=valid3, other=0)
    xs = [t.reshape(b0, b1) for t in jnp.split(block, m, axis=-1)]
    keeps = keep_top_n([rank_keys(x) for x in xs], n)
    for name, ref in zip(outputs, out_refs):
      vals = (
        keeps
        if name == "mask"
        else [jnp.where(kp, x, jnp.zeros_like(x)) for kp, x in zip(keeps, xs)]
      )
      val = interleave(vals)
      if valid3 is None:
        ref[...] = val
      else:
        plgpu.store(ref, val, mask=valid3)
    return

  xs = [load(k) for k in range(m)]
  keeps = keep_top_n([rank_keys(x) for x in xs], n)
  for name, ref in zip(outputs, out_refs):
    for k in range(m):
      if name == "mask":
        store(ref, k, keeps[k])
      else:
        store(ref, k, jnp.where(keeps[k], xs[k], jnp.zeros_like(xs[k])))


def interleave(vals: list[jax.Array]) -> jax.Array:
  """``(b0, b1)`` arrays ``vals[k]`` -> ``(b0, b1, len(vals))``; len a power of 2.

  Only two-way stacks along the last axis (what the Triton lowering has).
  """
  if len(vals) == 2:
    return jnp.stack(vals, axis=-1)
  even, odd = interleave(vals[0::2]), interleave(vals[1::2])  # [..., i] = vals[2i (+1)]
  both = jnp.stack([even, odd], axis=-1)  # [..., i, j] = vals[2i + j]
  return both.reshape(both.shape[:-2] + (len(vals),))


def triton_params(interpret: bool, num_warps: int, num_stages: int = 1) -> dict:
  """``pallas_call`` keyword arguments for the Triton backend (none when interpreting)."""
  if interpret:
    return {}
  from jax.experimental.pallas import triton as plgpu

  return {"compiler_params": plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)}


def use_interpret(interpret: bool | None) -> bool:
  if interpret is not None:
    return bool(interpret)
  return jax.default_backend() != "gpu"


@functools.partial(jax.jit, static_argnames=("n", "p", "outputs", "interpret"))
def _run(w: jax.Array, *, n: int, p: Plan, outputs: tuple[str, ...], interpret: bool):
  x = w.reshape(p.view)
  spec = pl.BlockSpec(
    p.block_shape, (lambda j, i: (i, 0, j)) if p.member_dim == 1 else (lambda j, i: (i, j, 0))
  )
  out_shape = tuple(
    jax.ShapeDtypeStruct(p.view, jnp.bool_ if o == "mask" else w.dtype) for o in outputs
  )
  outs = pl.pallas_call(
    functools.partial(_kernel, n=n, p=p, outputs=outputs),
    out_shape=out_shape,
    grid=p.grid,
    in_specs=[spec],
    out_specs=tuple(spec for _ in outputs),
    interpret=interpret,
    name=f"jasp_nm_{'_'.join(outputs)}",
    **triton_params(interpret, p.num_warps),
  )(x)
  return tuple(o.reshape(w.shape) for o in outs)


def _check(w: jax.Array, n: int, m: int) -> None:
  check_nm(n, m)
  if w.ndim == 0:
    raise ValueError("N:M masks need an array of rank >= 1, got a scalar.")
  if not supports(w.dtype, n, m):
    raise ValueError(
      f"the Pallas N:M kernel supports {', '.join(str(d) for d in SUPPORTED_DTYPES)} "
      f"weights and m <= {MAX_M}; got dtype {w.dtype} with n={n}, m={m} "
      "(use impl='xla')."
    )


def nm_mask_pallas(
  w: jax.Array, n: int = 2, m: int = 4, axis: Axis = 0, *, interpret: bool | None = None, **tuning
) -> jax.Array:
  """N:M magnitude mask in one pass: read ``w`` once, write the mask once.

  Args:
    w: fp32, bf16 or fp16 array of rank >= 1.
    n, m: keep the ``n`` largest ``|w|`` of every aligned group of ``m`` along
      ``axis`` (``1 <= n < m <= 8``).
    axis: the group axis (0 for a Flax ``Dense`` kernel ``(in, out)``, -2 for a
      conv kernel ``(*spatial, in, out)``), or a run of consecutive axes
      flattened row-major.
    interpret: run in Pallas interpret mode; ``None`` interprets everywhere but
      on a GPU backend.
    **tuning: ``tile_elems``, ``max_contig``, ``num_warps`` (benchmarks only).

  Returns:
    bool array of ``w.shape``, identical to ``jasp.nm_mask(w, n, m, axis,
    impl="xla")``: exactly ``n`` True per group, ties to the lower index, NaN
    ranked as +inf.
  """
  w = jnp.asarray(w)
  _check(w, n, m)
  p = plan(w.shape, m, axis, **tuning)
  if w.size == 0:
    return jnp.zeros(w.shape, jnp.bool_)
  (mask,) = _run(
    lax.stop_gradient(w), n=n, p=p, outputs=("mask",), interpret=use_interpret(interpret)
  )
  return mask


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2, 3, 4))
def _prune(w, n, p, with_mask, interpret):
  return _run(
    w, n=n, p=p, outputs=("weight", "mask") if with_mask else ("weight",), interpret=interpret
  )


@_prune.defjvp
def _prune_jvp(n, p, with_mask, interpret, primals, tangents):
  (w,), (dw,) = primals, tangents
  pruned, mask = _run(w, n=n, p=p, outputs=("weight", "mask"), interpret=interpret)
  dpruned = jnp.where(mask, dw, jnp.zeros_like(dw))
  if not with_mask:
    return (pruned,), (dpruned,)
  return (pruned, mask), (dpruned, np.zeros(mask.shape, jax.dtypes.float0))


def nm_prune_pallas(
  w: jax.Array,
  n: int = 2,
  m: int = 4,
  axis: Axis = 0,
  *,
  with_mask: bool = True,
  interpret: bool | None = None,
  **tuning,
) -> tuple[jax.Array, jax.Array] | jax.Array:
  """Masked weight (and mask) in one pass: read ``w`` once, write each output once.

  Args:
    w, n, m, axis, interpret, **tuning: as in :func:`nm_mask_pallas`.
    with_mask: also write the bool mask (one more byte per element).

  Returns:
    ``(pruned, mask)`` when ``with_mask`` else ``pruned``: ``pruned`` has
    ``w``'s shape and dtype, ``w`` where the mask keeps and ``0`` elsewhere.
    Differentiable in ``w``: the derivative of ``pruned`` is the mask (the mask
    itself is piecewise constant).
  """
  w = jnp.asarray(w)
  _check(w, n, m)
  p = plan(w.shape, m, axis, **tuning)
  if w.size == 0:
    return (w, jnp.zeros(w.shape, jnp.bool_)) if with_mask else w
  out = _prune(w, n, p, bool(with_mask), use_interpret(interpret))
  return out if with_mask else out[0]
