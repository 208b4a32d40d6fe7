"""Choosing the mask implementation: the Pallas kernels on a GPU, XLA elsewhere.

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

The kernels use the Pallas Triton backend, which JAX 0.11 deprecates: in a
JAX without it, ``"auto"`` and a ``"pallas"`` context or environment
setting use XLA, and an explicit ``impl="pallas"`` raises ``RuntimeError``.

Forcing ``"pallas"`` on a backend that is not a GPU runs the kernel in Pallas
interpret mode (slow, exact: what the CPU tests do). An explicit
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

from jasp.kernels import nm2d_pallas
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
  """Contiguous elements per tile row of the kernel's view (see nm_pallas.plan)."""
  p = nm_pallas.plan(shape, m, axis)
  if p.member_dim == 1:
    return p.view[2]
  return p.view[1] * m


def _auto(w, n: int, m: int, axis: Axis) -> bool:
  if _backend(w) not in ("gpu", "cuda"):
    return False
  if not nm_pallas.supports(w.dtype, n, m) or not nm_pallas.backend_available():
    return False
  if math.prod(w.shape) < AUTO_MIN_ELEMENTS or not _single_device(w):
    return False
  return _contig(tuple(w.shape), m, axis) >= AUTO_MIN_CONTIG


def use_pallas(w, n: int, m: int, axis: Axis, impl: Impl | None = None) -> bool:
  """Whether the Pallas kernel computes the mask of ``w`` (static decision).

  Args:
    w: the weight (a concrete array or a tracer); only its shape, dtype,
      placement and the backend are looked at.
    n, m, axis: as in :func:`jasp.nm_mask`.
    impl: the caller's explicit choice, or ``None`` for the context / default.

  Raises:
    ValueError: if ``impl="pallas"`` is passed for a dtype or ``m`` the kernel
      does not support.
  """
  _check_impl(impl, allow_none=True)
  explicit = impl is not None
  impl = impl or get_mask_impl()
  if impl == "xla":
    return False
  if impl == "pallas":
    if not nm_pallas.backend_available():
      if not explicit:
        return False
      raise RuntimeError(
        "impl='pallas': this JAX has no Pallas Triton backend "
        "(jax.experimental.pallas.triton), which jasp's mask kernels are written for. "
        "Use impl='xla'."
      )
    if not nm_pallas.supports(w.dtype, n, m):
      if not explicit:
        return False  # a context / environment setting prefers, never breaks
      raise ValueError(
        f"impl='pallas' supports float32, bfloat16 and float16 weights with m <= "
        f"{nm_pallas.MAX_M}; got dtype {w.dtype}, n={n}, m={m}. Use impl='xla'."
      )
    return True
  return _auto(w, n, m, axis)


def _interpret(w) -> bool:
  return _backend(w) not in ("gpu", "cuda")


def pallas_nm_mask(w, n, m, axis, forced):
  """Returns a thunk computing the mask with Pallas, or ``None`` for XLA.

  Called by :func:`jasp.nm_mask` when its ``impl`` is ``"pallas"`` (``forced``)
  or ``None`` (the context / automatic choice).
  """
  if not use_pallas(w, n, m, axis, "pallas" if forced else None):
    return None
  interpret = _interpret(w)
  return lambda: nm_pallas.nm_mask_pallas(w, n, m, axis, interpret=interpret)


def pallas_nm_mask_2d(w, n, m, axis, out_axis):
  """A thunk computing ``nm_mask_2d(..., method="best")`` with Pallas, or ``None``.

  ``axis`` and ``out_axis`` are normalised (non-negative). There is no ``impl``
  argument: the context, the environment or ``"auto"`` decide; a ``"pallas"``
  setting uses the kernel wherever it applies (see
  :func:`jasp.kernels.nm2d_pallas.supports_2d`) and XLA elsewhere.
  """
  impl = get_mask_impl()
  if (
    impl == "xla"
    or not nm_pallas.backend_available()
    or not nm2d_pallas.supports_2d(w.shape, w.dtype, n, m, axis, out_axis)
  ):
    return None
  if impl == "auto" and not (
    _backend(w) in ("gpu", "cuda") and _single_device(w) and math.prod(w.shape) >= AUTO_MIN_ELEMENTS
  ):
    return None
  interpret = _interpret(w)
  return lambda: nm2d_pallas.nm_mask_2d_pallas(w, n, m, axis, out_axis, interpret=interpret)


def pallas_nm_prune(w, n, m, axis, impl, with_mask):
  """A thunk pruning ``w`` with the Pallas kernel (see :func:`jasp.masks.nm_prune`), or ``None``.

  ``None`` means XLA: ``impl`` and the context / environment decide as for
  :func:`use_pallas`.
  """
  if not use_pallas(w, n, m, axis, impl):
    return None
  interpret = _interpret(w)
  return lambda: nm_pallas.nm_prune_pallas(w, n, m, axis, with_mask=with_mask, interpret=interpret)
