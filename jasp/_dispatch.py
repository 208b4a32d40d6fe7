"""Choosing the mask implementation: a Pallas kernel on a GPU, XLA elsewhere.

Covers :func:`jasp.masks.nm_mask`, :func:`jasp.masks.nm_prune` and
``jasp.masks.nm_mask_2d(..., method="best")``. The layering: this module
imports the kernels and :mod:`jasp.masks` imports this module; the kernels and
the XLA path share :mod:`jasp._nm_core`.

Every decision here is static (shapes, dtypes, backend, device count), so it is
made once at trace time and composes with ``jax.jit``, ``vmap`` and ``grad``.

Precedence, highest first:

1. the ``impl=`` argument of :func:`jasp.masks.nm_mask` / :func:`jasp.masks.nm_prune`;
2. the innermost :func:`mask_impl` context (``"xla"``, ``"pallas"`` or
   ``"auto"``);
3. the environment variable ``JASP_MASK_IMPL`` (same values), read at call time;
4. ``"auto"``: Pallas when the backend is a GPU, the dtype is fp32/bf16/fp16,
   ``m <= 8``, the weight has at least :data:`AUTO_MIN_ELEMENTS` elements and
   a contiguous run of at least :data:`AUTO_MIN_CONTIG` elements per tile row,
   and the weight is on one device (see below); XLA otherwise.

Which kernel ("pallas" names both): on a GPU of compute capability 9.0 or
newer (Hopper), the Pallas Mosaic GPU kernels (:mod:`jasp.kernels.nm_mosaic`,
:mod:`jasp.kernels.nm2d_mosaic`), for every layout; the Pallas Triton kernels
(:mod:`jasp.kernels.nm_pallas`, :mod:`jasp.kernels.nm2d_pallas`) on older
GPUs, while JAX still has that backend (JAX 0.11 deprecates it). In a JAX with neither,
``"auto"`` and a ``"pallas"`` context or environment setting use XLA, and an
explicit ``impl="pallas"`` raises ``RuntimeError``.

Forcing ``"pallas"`` on a backend that is not a GPU runs a kernel in Pallas
interpret mode (slow, exact: what the CPU tests do): the Triton kernel where
JAX has it, the Mosaic GPU kernel otherwise. An explicit
``impl="pallas"`` for a dtype or group size the kernel does not support (fp64,
integers, ``m > 8``) raises ``ValueError``; a ``"pallas"`` context or
environment setting uses XLA for those instead.

Sharding: a Pallas call has no partitioning rule, so under ``jit`` XLA would
gather a sharded weight onto each device before calling it. ``"auto"`` therefore
picks Pallas only for a concrete array on a single device, or for a traced value
when the process sees one device; inside ``shard_map`` (per-shard values) force
it with ``mask_impl("pallas")``.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import os
from collections.abc import Iterator

import jax
import jax.numpy as jnp

from jasp.kernels import mosaic
from jasp.kernels import nm2d_mosaic
from jasp.kernels import nm2d_pallas
from jasp.kernels import nm_mosaic
from jasp.kernels import nm_pallas
from jasp.typing import Axis
from jasp.typing import Impl

__all__ = [
  "AUTO_MIN_CONTIG",
  "AUTO_MIN_ELEMENTS",
  "get_mask_impl",
  "mask_impl",
  "pallas_nm_mask",
  "pallas_nm_mask_2d",
  "pallas_nm_prune",
  "pallas_nm_fused_many",
  "pick_kernel",
  "use_pallas",
]

#: ``"auto"`` uses the kernel only from this many elements (launch overheads
#: dominate below; both paths take a few microseconds there).
AUTO_MIN_ELEMENTS = 1 << 18

#: ``"auto"`` uses the kernel only when the tile rows it streams hold at least
#: this many contiguous elements (a group axis with many trailing elements, or
#: the last axis); narrow trailing sizes waste most of each memory transaction.
AUTO_MIN_CONTIG = 32

_IMPLS = ("xla", "pallas", "auto")
_CONTEXT: contextvars.ContextVar[str | None] = contextvars.ContextVar(
  "jasp_mask_impl", default=None
)


def _check_impl(impl, allow_none: bool) -> None:
  if impl is None and allow_none:
    return
  if impl not in _IMPLS:
    raise ValueError(f"mask implementation must be one of {_IMPLS}, got {impl!r}.")


@contextlib.contextmanager
def mask_impl(impl: Impl) -> Iterator[None]:
  """Context manager choosing how masks are computed inside its block.

  Args:
    impl: ``"xla"`` (the fused element-wise XLA computation), ``"pallas"``
      (the one-pass kernel; interpret mode off GPUs) or ``"auto"``.

  Example:
    >>> import jax.numpy as jnp, jasp
    >>> w = jnp.arange(16.0).reshape(8, 2)
    >>> with jasp.mask_impl("xla"):
    ...   mask = jasp.nm_mask(w)  # XLA even on a GPU
    >>> mask[:, 0].astype(int)
    Array([0, 0, 1, 1, 0, 0, 1, 1], dtype=int32)

  An explicit ``impl=`` argument still wins. The setting is read when a mask
  function is *traced*: a function jitted inside the block keeps its choice.
  """
  _check_impl(impl, allow_none=False)
  token = _CONTEXT.set(impl)
  try:
    yield
  finally:
    _CONTEXT.reset(token)


def get_mask_impl() -> str:
  """The implementation in force: the innermost context, ``JASP_MASK_IMPL`` or ``"auto"``."""
  impl = _CONTEXT.get()
  if impl is None:
    impl = os.environ.get("JASP_MASK_IMPL", "auto").strip().lower() or "auto"
    if impl not in _IMPLS:
      raise ValueError(f"JASP_MASK_IMPL must be one of {_IMPLS}, got {impl!r}.")
  return impl


def _single_device(w) -> bool:
  if isinstance(w, jax.core.Tracer):
    return jax.device_count() == 1
  sharding = getattr(w, "sharding", None)
  return sharding is None or len(sharding.device_set) == 1


def _backend(w) -> str:
  if not isinstance(w, jax.core.Tracer) and hasattr(w, "devices"):
    devices = w.devices()
    if len(devices) == 1:
      return next(iter(devices)).platform
  return jax.default_backend()


def _contig(shape: tuple[int, ...], m: int, axis: Axis) -> int:
  """Contiguous elements per tile row of the Triton kernel's view (see nm_pallas.plan)."""
  p = nm_pallas.plan(shape, m, axis)
  if p.member_dim == 1:
    return p.view[2]
  return p.view[1] * m


def _capability(w) -> float | None:
  """The compute capability of the GPU ``w`` is (or will be) on, e.g. 9.0; None if unknown."""
  device = None
  if not isinstance(w, jax.core.Tracer) and hasattr(w, "devices"):
    devices = w.devices()
    device = next(iter(devices)) if len(devices) == 1 else None
  return mosaic.compute_capability(device)


def _mosaic_plan(w, n: int, m: int, axis: Axis, packed: bool, on_gpu: bool):
  if not (mosaic.available() and nm_mosaic.supports(w.dtype, n, m)):
    return None
  if not packed and not mosaic.bool_stores():
    return None
  if on_gpu and (_capability(w) or 0.0) < 9.0:
    return None
  return nm_mosaic.plan(w.shape, m, axis, packed=packed, itemsize=jnp.dtype(w.dtype).itemsize)


def _kernels(w, n: int, m: int, axis: Axis, on_gpu: bool, auto: bool) -> list[str]:
  """The kernels that apply to ``w``, preferred first ("mosaic", "triton").

  On a GPU the Mosaic kernel comes first (compute capability 9.0+, where it
  plans); interpreted, Triton's is the lighter one.
  """
  found = []
  p = _mosaic_plan(w, n, m, axis, packed=False, on_gpu=on_gpu)
  if p is not None and (not auto or p.block[1] * (p.entries if p.cols else 1) >= AUTO_MIN_CONTIG):
    found.append("mosaic")
  if nm_pallas.backend_available() and nm_pallas.supports(w.dtype, n, m):
    if not auto or _contig(tuple(w.shape), m, axis) >= AUTO_MIN_CONTIG:
      found.append("triton")
  if not on_gpu:
    found.reverse()
  return found


def _auto(w, n: int, m: int, axis: Axis) -> str | None:
  if _backend(w) not in ("gpu", "cuda"):
    return None
  if math.prod(w.shape) < AUTO_MIN_ELEMENTS or not _single_device(w):
    return None
  found = _kernels(w, n, m, axis, on_gpu=True, auto=True)
  return found[0] if found else None


def pick_kernel(w, n: int, m: int, axis: Axis, impl: Impl | None = None) -> str | None:
  """The kernel that computes the mask of ``w``: ``"mosaic"``, ``"triton"`` or None (XLA).

  A static decision (see the module doc for the rules).

  Args:
    w: the weight (a concrete array or a tracer); only its shape, dtype,
      placement and the backend are looked at.
    n, m, axis: as in :func:`jasp.nm_mask`.
    impl: the caller's explicit choice, or ``None`` for the context / default.

  Raises:
    ValueError: if ``impl="pallas"`` is passed for a dtype or ``m`` no kernel
      supports.
    RuntimeError: if ``impl="pallas"`` is passed and this JAX has no kernel
      backend for ``w`` (neither Pallas Triton nor Pallas Mosaic GPU applies).
  """
  _check_impl(impl, allow_none=True)
  explicit = impl is not None
  impl = impl or get_mask_impl()
  if impl == "xla":
    return None
  if impl == "auto":
    return _auto(w, n, m, axis)
  if not (nm_pallas.supports(w.dtype, n, m) or nm_mosaic.supports(w.dtype, n, m)):
    if not explicit:
      return None  # a context / environment setting prefers, never breaks
    raise ValueError(
      f"impl='pallas' supports float32, bfloat16 and float16 weights with m <= "
      f"{nm_pallas.MAX_M}; got dtype {w.dtype}, n={n}, m={m}. Use impl='xla'."
    )
  found = _kernels(w, n, m, axis, on_gpu=_backend(w) in ("gpu", "cuda"), auto=False)
  if found:
    return found[0]
  if not explicit:
    return None
  raise RuntimeError(
    "impl='pallas': no Pallas kernel applies here. This JAX has "
    + ("the Pallas Triton backend" if nm_pallas.backend_available() else "no Pallas Triton backend")
    + "; the Pallas Mosaic GPU kernels need a GPU of compute capability 9.0+ and a shape whose "
    "tiles hold a multiple of 128 elements. Use impl='xla'."
  )


def use_pallas(w, n: int, m: int, axis: Axis, impl: Impl | None = None) -> bool:
  """Whether a Pallas kernel computes the mask of ``w`` (see :func:`pick_kernel`)."""
  return pick_kernel(w, n, m, axis, impl) is not None


def _interpret(w) -> bool:
  return _backend(w) not in ("gpu", "cuda")


def pallas_nm_mask(w, n, m, axis, forced):
  """Returns a thunk computing the mask with Pallas, or ``None`` for XLA.

  Called by :func:`jasp.nm_mask` when its ``impl`` is ``"pallas"`` (``forced``)
  or ``None`` (the context / automatic choice).
  """
  kernel = pick_kernel(w, n, m, axis, "pallas" if forced else None)
  if kernel is None:
    return None
  interpret = _interpret(w)
  if kernel == "mosaic":
    return lambda: nm_mosaic.nm_mosaic(w, n, m, axis, ("mask",), interpret=interpret)[0]
  return lambda: nm_pallas.nm_mask_pallas(w, n, m, axis, interpret=interpret)


def pallas_nm_mask_2d(w, n, m, axis, out_axis):
  """A thunk computing ``nm_mask_2d(..., method="best")`` with Pallas, or ``None``.

  ``axis`` and ``out_axis`` are normalised (non-negative). There is no ``impl``
  argument: the context, the environment or ``"auto"`` decide; a ``"pallas"``
  setting uses a kernel wherever one applies (see
  :func:`jasp.kernels.nm2d_pallas.supports_2d` and
  :func:`jasp.kernels.nm2d_mosaic.supports_2d`) and XLA elsewhere. On a GPU
  of compute capability 9.0+ the Mosaic GPU kernel comes first; interpreted,
  and on older GPUs while JAX has it, the Triton kernel.
  """
  impl = get_mask_impl()
  if impl == "xla":
    return None
  on_gpu = _backend(w) in ("gpu", "cuda")
  if impl == "auto" and not (
    on_gpu and _single_device(w) and math.prod(w.shape) >= AUTO_MIN_ELEMENTS
  ):
    return None
  interpret = not on_gpu
  mosaic_ok = (
    mosaic.available()
    and mosaic.bool_stores()
    and nm2d_mosaic.supports_2d(w.shape, w.dtype, n, m, axis, out_axis)
    and (interpret or (_capability(w) or 0.0) >= 9.0)
  )
  if mosaic_ok and on_gpu:
    return lambda: nm2d_mosaic.nm_mask_2d_mosaic(w, n, m, axis, out_axis, interpret=False)
  if nm_pallas.backend_available() and nm2d_pallas.supports_2d(
    w.shape, w.dtype, n, m, axis, out_axis
  ):
    return lambda: nm2d_pallas.nm_mask_2d_pallas(w, n, m, axis, out_axis, interpret=interpret)
  if mosaic_ok:
    return lambda: nm2d_mosaic.nm_mask_2d_mosaic(w, n, m, axis, out_axis, interpret=interpret)
  return None


def pallas_nm_prune(w, n, m, axis, impl, with_mask):
  """A thunk pruning ``w`` with the Pallas kernel (see :func:`jasp.masks.nm_prune`), or ``None``.

  ``None`` means XLA: ``impl`` and the context / environment decide as for
  :func:`use_pallas`.
  """
  kernel = pick_kernel(w, n, m, axis, impl)
  if kernel is None:
    return None
  interpret = _interpret(w)
  if kernel == "mosaic":
    outputs = ("weight", "mask") if with_mask else ("weight",)
    return lambda: nm_mosaic.prune(w, n, m, axis, outputs, interpret=interpret)
  return lambda: nm_pallas.nm_prune_pallas(w, n, m, axis, with_mask=with_mask, interpret=interpret)


def pallas_nm_fused_many(ws, n, m, axis, impl, *, weight, packed):
  """A thunk computing ``([pruned,] mask, finite)`` of each of ``ws`` in one kernel pass,
  or ``None``.

  Only the Mosaic GPU kernel writes them all at once: the pruned weight (when
  ``weight``), the mask (:class:`jasp.packing.PackedMask` bits when
  ``packed``, as :func:`jasp.packing.pack` lays them out) and finiteness
  flags (``int32``, all nonzero exactly when the weight is all finite).
  ``ws`` share one shape and dtype; several share launches
  (:func:`jasp.kernels.nm_mosaic.nm_mosaic_many`). ``None`` means the caller
  composes the outputs.
  """
  if not ws or pick_kernel(ws[0], n, m, axis, impl) != "mosaic":
    return None
  interpret = _interpret(ws[0])
  if _mosaic_plan(ws[0], n, m, axis, packed=packed, on_gpu=not interpret) is None:
    return None
  outputs = (("weight",) if weight else ()) + ("bits" if packed else "mask", "finite")
  if len(ws) == 1:  # the one-weight entry points
    one = nm_mosaic.prune if weight else nm_mosaic.nm_mosaic
    return lambda: [one(ws[0], n, m, axis, outputs, interpret=interpret)]
  many = nm_mosaic.prune_many if weight else nm_mosaic.nm_mosaic_many
  return lambda: many(ws, n, m, axis, outputs, interpret=interpret)
