"""Shared plumbing of jasp's Pallas Mosaic GPU kernels.

Launching a kernel (one warpgroup per program, Lane semantics, no automatic
barriers), loading a tile straight from global memory into registers and
storing it back (a ``bool`` tile as XLA's one byte per entry), and the CPU
interpret mode the tests use. The kernels themselves:
:mod:`jasp.kernels.nm_mosaic` (1-D masks) and :mod:`jasp.kernels.nm2d_mosaic`
(transposable masks). Why they are built this way:
``docs/design/mosaic-kernels.md``.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable

import jax
import jax.numpy as jnp

__all__ = [
  "available",
  "bool_stores",
  "compute_capability",
  "grid_fits",
  "interpret_params",
  "launch",
  "load",
  "pow2_divisor",
  "store",
]

#: CUDA's limit on the second and third grid dimensions (the first allows 2**31 - 1).
MAX_GRID_YZ = 65535


@functools.lru_cache(maxsize=None)
def available() -> bool:
  """Whether this JAX has the Pallas Mosaic GPU API the kernels are written for."""
  try:
    from jax.experimental.pallas import mosaic_gpu as plgpu
  except ImportError:
    return False
  needed = (
    "kernel",
    "load",
    "inline_mgpu",
    "RefType",
    "Layout",
    "CompilerParams",
    "LoweringSemantics",
  )
  return all(hasattr(plgpu, a) for a in needed) and hasattr(plgpu.Layout, "WG_STRIDED")


def compute_capability(device=None) -> float | None:
  """The compute capability of ``device`` (default: JAX's first device), e.g. 9.0; None if it
  has none (not a CUDA GPU) or it cannot be read."""
  device = device or jax.devices()[0]
  try:
    return float(getattr(device, "compute_capability", None))
  except (TypeError, ValueError):
    return None


@functools.lru_cache(maxsize=None)
def bool_stores() -> bool:
  """Whether this JAX has what :func:`store` needs for ``bool`` tiles (the byte view)."""
  if not available():
    return False
  try:  # inline_mgpu and RefType: checked by available()
    from jax.experimental.mosaic.gpu import utils as mgpu_utils
    from jaxlib.mlir.dialects import builtin  # noqa: F401
    from jaxlib.mlir.dialects import llvm  # noqa: F401
  except ImportError:
    return False
  needed = ("getelementptr", "ptr_as_memref", "get_memref_llvm_address_space")
  return all(hasattr(mgpu_utils, a) for a in needed)


def pow2_divisor(x: int, cap: int) -> int:
  """The largest power of two that divides ``x`` and is at most ``cap``."""
  p = 1
  while p < cap and x % (2 * p) == 0:
    p *= 2
  return p


def grid_fits(grid: tuple[int, int]) -> bool:
  """Whether a ``(c, r)`` grid launches: ``c`` below 2**31, ``r`` at most :data:`MAX_GRID_YZ`."""
  return 0 < grid[0] < 2**31 and 0 < grid[1] <= MAX_GRID_YZ


@functools.lru_cache(maxsize=None)
def _load_takes_index() -> bool:
  """Whether this JAX's ``plgpu.load`` requires the index (older releases)."""
  from jax.experimental.pallas import mosaic_gpu as plgpu

  param = inspect.signature(plgpu.load).parameters.get("idx")
  return param is not None and param.default is inspect.Parameter.empty


def load(ref, idx: tuple, tile: tuple[int, ...], vec: int, interpret: bool) -> jax.Array:
  """``ref[idx]``, a tile of shape ``tile``, into registers.

  On the GPU the tile is loaded straight from global memory in the
  ``WG_STRIDED`` layout, ``vec`` consecutive elements per thread access (the
  tile's minor dimension must have unit stride). Interpreted, a plain read.
  """
  if interpret:
    return ref[idx]
  from jax.experimental.pallas import mosaic_gpu as plgpu

  layout = plgpu.Layout.WG_STRIDED(tile, vec_size=vec)
  if _load_takes_index():
    return plgpu.load(ref, idx, layout=layout)
  return plgpu.load(ref.at[idx], layout=layout)  # newer JAX: index the ref itself


def store(ref, idx: tuple, val: jax.Array, vec: int, interpret: bool) -> None:
  """``ref[idx] = val``, a tile in the ``WG_STRIDED`` layout of :func:`load`.

  On the GPU the tile is written straight from registers through the output's
  memref (``FragmentedArray.store_untiled`` inside ``plgpu.inline_mgpu``),
  ``vec`` elements per thread access. A plain Pallas store would not do: it
  first reads the tile's old value with a vector width of its own choosing,
  which a strided tile (unit minor dimension) does not allow.

  A ``bool`` tile is stored as XLA keeps it, one byte (0 or 1) per entry,
  whereas Mosaic GPU treats an ``i1`` memref as packed bits: the memref is
  re-read as a strided ``i8`` memref at the same address (its descriptor's
  aligned pointer advanced by its offset in bytes, a ``getelementptr``, so
  that the compiler still sees the output's alignment and keeps the stores
  vectorised) and ``val`` is stored as ``uint8`` through it.

  Interpreted, a plain write.
  """
  if interpret:
    ref[idx] = val
    return
  from jax.experimental.pallas import mosaic_gpu as plgpu

  is_bool = val.dtype == jnp.bool_

  @plgpu.inline_mgpu(arg_types=(plgpu.RefType(), plgpu.Layout.WG_STRIDED(val.shape, vec_size=vec)))
  def write(ctx, tile, v):
    del ctx
    v.store_untiled(_as_bytes(tile) if is_bool else tile)

  write(ref.at[idx], val.astype(jnp.uint8) if is_bool else val)


def _as_bytes(tile):
  """The ``i1`` memref ``tile`` re-read as a strided ``i8`` memref at the same address."""
  from jax.experimental.mosaic.gpu import utils as mgpu_utils
  from jaxlib.mlir import ir
  from jaxlib.mlir.dialects import builtin
  from jaxlib.mlir.dialects import llvm

  ty = ir.MemRefType(tile.type)
  strides, _ = ty.get_strides_and_offset()
  i8, i64 = ir.IntegerType.get_signless(8), ir.IntegerType.get_signless(64)
  ptr = llvm.PointerType.get(mgpu_utils.get_memref_llvm_address_space(ty) or 0)
  rank_arrays = [llvm.ArrayType.get(i64, len(ty.shape))] * 2
  desc = builtin.unrealized_conversion_cast(
    [llvm.StructType.get_literal([ptr, ptr, i64, *rank_arrays])], [tile]
  )
  base = llvm.extractvalue(ptr, desc, [1])
  addr = mgpu_utils.getelementptr(base, [llvm.extractvalue(i64, desc, [2])], i8)
  bytes_ty = ir.MemRefType.get(
    ty.shape, i8, layout=ir.StridedLayoutAttr.get(0, strides), memory_space=ty.memory_space
  )
  return mgpu_utils.ptr_as_memref(addr, bytes_ty)


def interpret_params():
  """GPU interpret mode (simulates the kernel on the CPU; tests only).

  JAX exposes it only under a private path; without it, interpreting raises.
  """
  try:
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
  except ImportError as e:  # pragma: no cover - depends on the JAX release
    raise RuntimeError(
      "this JAX has no Pallas Mosaic GPU interpret mode; the Mosaic GPU kernels run on a GPU only."
    ) from e
  return InterpretGPUParams()


def _compiler_params():
  from jax.experimental.pallas import mosaic_gpu as plgpu

  fields = {f.name for f in dataclasses.fields(plgpu.CompilerParams)}
  kwargs = {"lowering_semantics": plgpu.LoweringSemantics.Lane}
  if "unsafe_no_auto_barriers" in fields:  # no region is read and written
    kwargs["unsafe_no_auto_barriers"] = True
  return plgpu.CompilerParams(**kwargs)


def launch(
  body: Callable[..., None],
  out_type: tuple[jax.ShapeDtypeStruct, ...],
  grid: tuple[int, int],
  name: str,
  interpret: bool,
) -> Callable[..., tuple[jax.Array, ...]]:
  """A Mosaic GPU kernel: ``body(*in_refs, *out_refs)`` over ``grid``.

  The grid's axes are named ``"c"`` (first, fastest) and ``"r"``; a program
  reads its indices with ``lax.axis_index``. One warpgroup per program.
  """
  from jax.experimental.pallas import mosaic_gpu as plgpu

  return plgpu.kernel(
    body,
    out_type=out_type,
    grid=grid,
    grid_names=("c", "r"),
    compiler_params=None if interpret else _compiler_params(),
    interpret=interpret_params() if interpret else None,
    kernel_name=name,
  )
