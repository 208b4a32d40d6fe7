"""A 2:4 weight compressed once for cuSPARSELt, kept as a pytree node.

:class:`SparseWeight` holds a Flax kernel ``(*in_shape, *out_shape)`` seen as a
matrix ``W (K, N)`` with ``K = prod(in_shape)`` (the reduction axis, 2:4 along
it) and ``N = prod(out_shape)``:

* ``compressed``: ``uint8 (bytes,)``, cuSPARSELt's compressed form (the kept
  values and their 2-bit metadata, about 56% of the dense bytes) on the device,
  or None where the sparse path is unavailable (CPU, older GPU, a shape the
  sparse kernels do not take);
* ``dense``: the masked weight ``(K, N)`` in the compute dtype, kept (unless
  ``keep_dense=False``) for the token counts where dense is faster (see
  :mod:`jasp.sparse.autotune`) and for devices without sparse tensor cores;
* ``compact``: with ``compress(..., compact=True)``, the weight as a
  :class:`jasp.kernels.decode24.Compressed24` (kept values and 4-bit position
  codes, 56% of the dense bf16 bytes, in jasp's own layout), which the
  decode-time kernel :func:`jasp.kernels.decode24.matmul_24` reads at small
  token counts, where cuSPARSELt is slower than dense; else None.

All three are pytree children (they checkpoint, shard and pass through ``jit``);
the shapes, the compute dtype and the compressed format's tag are static
metadata. The compressed bytes are specific to the cuSPARSELt version and GPU
architecture named by ``fmt``: :func:`jasp.sparse.matmul` refuses a mismatch
rather than compute garbage (recompress from ``dense`` then).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jasp import _tree
from jasp import masks as masks_lib
from jasp.kernels import decode24
from jasp.sparse import _runtime

__all__ = ["SparseWeight", "compress", "sparse_shape_ok", "A_ROW", "A_COL"]

# How the sparse operand A = W^T (N x K) is stored: row-major (a one-time
# transpose at compression; K contiguous, the layout PyTorch's linear path
# uses) or column-major (W as Flax stores it, no transpose at all).
A_ROW = 0
A_COL = 1
DEFAULT_A_ORDER = A_ROW

_DTYPE_CODES = {"bfloat16": 0, "float16": 1}
# float16 per cuSPARSELt (major, minor): the A layouts it is verified with
# (algorithm search over every configuration offered, products against the
# reference). 0.8.x: A_ROW only, with the extension skipping the fp16
# configurations that trap there (see Fp16ConfigCap in _ffi.cc); with A_COL
# other fp16 configurations trap too. 0.10.x: both layouts, every
# configuration (verified on an H100 only). Other versions and layouts take
# the dense path for fp16 unless JASP_SPARSE_EXPERIMENTAL=1. Details:
# KNOWN_ISSUES.md.
FP16_VERIFIED = {(0, 8): (A_ROW,), (0, 10): (A_ROW, A_COL)}
FP16_UNVERIFIED = (
  "jasp.sparse: float16 weights take the dense path here: fp16 sparse kernels were verified "
  "with cuSPARSELt 0.8.x (A_ROW layout; some fp16 kernels of 0.8.0 crash the CUDA context) "
  "and 0.10.x (A_ROW and A_COL); this process: cuSPARSELt {version}, {layout}. bfloat16 "
  "works; set JASP_SPARSE_EXPERIMENTAL=1 to try fp16 anyway."
)


def fp16_enabled(cusparselt_version: int, a_order: int | None = None) -> bool:
  """Whether fp16 weights get compressed with this cuSPARSELt and layout.

  Args:
    cusparselt_version: ``major*10000 + minor*100 + patch``.
    a_order: :data:`A_ROW` or :data:`A_COL` (default: :data:`DEFAULT_A_ORDER`).
  """
  if experimental():
    return True
  major, minor = divmod(cusparselt_version // 100, 100)
  order = DEFAULT_A_ORDER if a_order is None else a_order
  return order in FP16_VERIFIED.get((major, minor), ())


def experimental() -> bool:
  """Whether ``JASP_SPARSE_EXPERIMENTAL=1`` enables fp16 on an unverified cuSPARSELt version."""
  return os.environ.get("JASP_SPARSE_EXPERIMENTAL", "") == "1"


# cuSPARSELt's size rules for 16-bit 2:4 operands: rows and columns of the
# structured matrix multiples of 16; the token count is padded to 16.
SIZE_MULTIPLE = 16


@jax.tree_util.register_pytree_with_keys_class
class SparseWeight:
  """A 2:4 weight for :func:`jasp.sparse.matmul` (see the module docstring).

  Attributes:
    compressed: ``uint8 (bytes,)`` cuSPARSELt data, or None.
    dense: ``(K, N)`` masked weight in ``dtype``, or None.
    in_shape: the contracted axes' sizes of the original kernel.
    out_shape: the output axes' sizes.
    dtype: the compute dtype's name (``"bfloat16"`` or ``"float16"``; any float
      when ``compressed`` is None).
    fmt: the compressed format (``cusparselt<version>:sm<cc>:<a_order>``), ``""``
      when ``compressed`` is None.
    compact: the :class:`jasp.kernels.decode24.Compressed24` of ``(K, N)`` for
      the decode-time kernel, or None.
  """

  def __init__(
    self,
    compressed: jax.Array | None,
    dense: jax.Array | None,
    *,
    in_shape: Sequence[int],
    out_shape: Sequence[int],
    dtype: Any,
    fmt: str = "",
    compact: decode24.Compressed24 | None = None,
  ):
    self.compressed = compressed
    self.dense = dense
    self.compact = compact
    self.in_shape = tuple(int(s) for s in in_shape)
    self.out_shape = tuple(int(s) for s in out_shape)
    self.dtype = jnp.dtype(dtype).name
    self.fmt = fmt

  @property
  def k(self) -> int:
    """The reduction size ``prod(in_shape)``."""
    return math.prod(self.in_shape)

  @property
  def n(self) -> int:
    """The output size ``prod(out_shape)``."""
    return math.prod(self.out_shape)

  @property
  def shape(self) -> tuple[int, ...]:
    """The original kernel's shape ``(*in_shape, *out_shape)``."""
    return self.in_shape + self.out_shape

  @property
  def a_order(self) -> int:
    """:data:`A_ROW` or :data:`A_COL` (from ``fmt``)."""
    return A_COL if self.fmt.endswith(":col") else A_ROW

  @property
  def stack(self) -> tuple[int, ...]:
    """The leading axes of a stack of layers' weights, ``()`` for one weight.

    :func:`jasp.sparse.sparsify` of a scanned model stacks its layers'
    SparseWeights along the kernel's stack axes; the scan over the layers
    slices them, one layer a step.
    """
    if self.dense is not None:
      return tuple(self.dense.shape[:-2])
    if self.compressed is not None:
      return tuple(self.compressed.shape[:-1])
    if self.compact is not None:
      return tuple(self.compact.values.shape[:-3])
    return ()

  @property
  def is_compressed(self) -> bool:
    return self.compressed is not None

  @property
  def is_compact(self) -> bool:
    """Whether the decode-time format (``compact``) is held."""
    return self.compact is not None

  def __jax_array__(self):
    raise TypeError(
      f"a jasp.sparse.SparseWeight (kernel {self.shape}) was used as an array. Only the "
      "layers jasp.sparse runs take one: linen Dense, DenseGeneral and Einsum under "
      "jasp.sparse.apply / intercept, nnx SparseLinear, or jasp.sparse.matmul. Keep this "
      "kernel dense: jasp.sparse.sparsify(..., exclude=[<its path>])."
    )

  def tree_flatten_with_keys(self):
    children = (
      (jax.tree_util.GetAttrKey("compressed"), self.compressed),
      (jax.tree_util.GetAttrKey("dense"), self.dense),
      (jax.tree_util.GetAttrKey("compact"), self.compact),
    )
    return children, (self.in_shape, self.out_shape, self.dtype, self.fmt)

  def tree_flatten(self):
    children = (self.compressed, self.dense, self.compact)
    return children, (self.in_shape, self.out_shape, self.dtype, self.fmt)

  @classmethod
  def tree_unflatten(cls, aux, children):
    in_shape, out_shape, dtype, fmt = aux
    obj = object.__new__(cls)
    obj.compressed, obj.dense, obj.compact = children
    obj.in_shape, obj.out_shape, obj.dtype, obj.fmt = in_shape, out_shape, dtype, fmt
    return obj

  def __repr__(self) -> str:
    parts = []
    if self.compressed is not None:
      parts.append(f"compressed={getattr(self.compressed, 'shape', '?')} bytes, {self.fmt}")
    if self.dense is not None:
      parts.append("dense kept")
    if self.compact is not None:
      parts.append("compact (decode) format")
    return (
      f"SparseWeight(kernel {self.shape} -> ({self.k}, {self.n}) {self.dtype}; "
      + ("; ".join(parts) or "empty")
      + ")"
    )


def sparse_shape_ok(k: int, n: int) -> tuple[bool, str]:
  """Whether cuSPARSELt takes a ``(K, N)`` 2:4 weight; ``(False, reason)`` if not."""
  if k % SIZE_MULTIPLE or n % SIZE_MULTIPLE:
    return False, (
      f"the weight ({k} in x {n} out) needs both sizes to be multiples of "
      f"{SIZE_MULTIPLE} for cuSPARSELt's 16-bit kernels"
    )
  return True, ""


def _compute_dtype(w: jax.Array, dtype: Any, path: str) -> np.dtype:
  dt = jnp.dtype(dtype) if dtype is not None else jnp.dtype(w.dtype)
  if dt.name not in _DTYPE_CODES:
    where = f" '{path}'" if path else ""
    raise ValueError(
      f"the weight{where} (shape {tuple(w.shape)}, {jnp.dtype(w.dtype).name}) would be "
      f"multiplied in {dt.name}; 2:4 sparse tensor cores take bfloat16 or float16: pass "
      "dtype=jnp.bfloat16 (or float16) to compute this layer in that precision."
    )
  return dt


def _ffi_compress(wt: jax.Array, m: int, k: int, a_order: int, rt: _runtime.Runtime):
  size, buf = rt.compressed_size(m, k, _DTYPE_CODES[jnp.dtype(wt.dtype).name], a_order)
  call = jax.ffi.ffi_call(
    _runtime.COMPRESS_TARGET,
    (jax.ShapeDtypeStruct((size,), jnp.uint8), jax.ShapeDtypeStruct((max(buf, 1),), jnp.uint8)),
  )
  comp, _ = call(wt, m=np.int64(m), k=np.int64(k), a_order=np.int64(a_order))
  return comp


def _compact(w2: jax.Array, wanted: bool, where: str) -> decode24.Compressed24 | None:
  """The decode-time format of the checked ``(K, N)`` weight ``w2``, if wanted and the kernel takes it."""
  if not wanted:
    return None
  ok, why = decode24.shape_ok(*w2.shape, w2.dtype)
  if not ok:
    _runtime.note_dense_fallback(f"jasp.sparse: {where}no compact (decode) format: {why}.")
    return None
  return decode24.compress_24(w2, check=False)


def compress(
  w: jax.Array,
  *,
  in_axes: int = 1,
  dtype: Any = None,
  keep_dense: bool = True,
  a_order: int = DEFAULT_A_ORDER,
  check: bool = True,
  path: str = "",
  compact: bool = False,
) -> SparseWeight:
  """Compresses a 2:4 kernel once for the sparse tensor cores.

  Args:
    w: a Flax kernel ``(*in_shape, *out_shape)`` (``Dense``: ``(in, out)``;
      ``DenseGeneral``: the contracted axes first), already N:M = 2:4 along
      the flattened ``in`` axes (:func:`jasp.prune` does that).
    in_axes: how many leading axes are contracted (1 for ``Dense``).
    dtype: the compute dtype (``jnp.bfloat16`` or ``jnp.float16``); default
      ``w.dtype``, which must then be one of them.
    keep_dense: also keep the masked ``(K, N)`` weight for the dense path (the
      policy uses it where dense is faster, e.g. few tokens). Without it, the
      sparse kernel runs at every token count.
    a_order: :data:`A_ROW` (default) or :data:`A_COL`, the stored layout.
    check: verify the 2:4 pattern first (skipped under ``jit``).
    path: the leaf's name, for error messages.
    compact: also keep the decode-time format (:class:`SparseWeight`'s
      ``compact``, 56% of the dense bf16 bytes) for
      :func:`jasp.kernels.decode24.matmul_24`, which the policy weighs against
      dense and cuSPARSELt at every token count. Built wherever the kernel
      takes the shape (``N`` a multiple of 32), CPU included; otherwise left
      out, with a warning once per process.

  Returns:
    A :class:`SparseWeight`. Without a usable GPU (CPU, compute capability
    < 8.0, no cuSPARSELt) or with sizes the kernels do not take, it holds no
    cuSPARSELt data (only the dense weight and, if asked, the compact one),
    and a warning says why once per process.

  Raises:
    ValueError: if ``w`` is not 2:4 along its ``in`` axes (naming ``path``,
      the shape and the number of bad groups), or the dtype is not 16-bit.

  Example::

    sw = jasp.sparse.compress(pruned["params"]["Dense_0"]["kernel"], dtype=jnp.bfloat16)
    y = jasp.sparse.matmul(x, sw)
  """
  w = jnp.asarray(w)
  where = f"'{path}' " if path else ""
  if not 1 <= in_axes < w.ndim:
    raise ValueError(
      f"the kernel {where}of shape {tuple(w.shape)} needs 1 <= in_axes < "
      f"{w.ndim}, got in_axes={in_axes}."
    )
  if a_order not in (A_ROW, A_COL):
    raise ValueError(f"a_order must be A_ROW (0) or A_COL (1), got {a_order!r}.")
  in_shape, out_shape = tuple(w.shape[:in_axes]), tuple(w.shape[in_axes:])
  k, n = math.prod(in_shape), math.prod(out_shape)
  if k % 4:
    raise ValueError(
      f"the kernel {where}of shape {tuple(w.shape)} has {k} input channels, "
      "not a multiple of 4: it cannot be 2:4 along them."
    )
  dt = _compute_dtype(w, dtype, path)
  w2 = w.reshape(k, n).astype(dt)
  if check and not _tree.is_tracer(w2):
    ok = masks_lib.is_nm(w2, 2, 4, axis=0)
    if not bool(ok):
      nz = np.asarray(jax.device_get(jnp.sum((w2 != 0).reshape(k // 4, 4, n), axis=1)))
      bad = int(np.sum(nz > 2))
      raise ValueError(
        f"the kernel {where}of shape {tuple(w.shape)} is not 2:4 along its input axes: "
        f"{bad} of {nz.size} groups of 4 hold more than 2 non-zeros. Prune it first "
        "(jasp.prune) or keep it dense."
      )
  kw = dict(in_shape=in_shape, out_shape=out_shape, dtype=dt, compact=_compact(w2, compact, where))
  shape_ok, why = sparse_shape_ok(k, n)
  try:
    rt = _runtime.runtime()
  except _runtime.SparseUnavailable as e:
    _runtime.note_dense_fallback(str(e))
    return SparseWeight(None, w2, **kw)
  if not shape_ok:
    _runtime.note_dense_fallback(f"jasp.sparse: {where}kept dense: {why}.")
    return SparseWeight(None, w2, **kw)
  if dt.name == "float16" and not fp16_enabled(rt.cusparselt_version, a_order):
    v = rt.cusparselt_version
    _runtime.note_dense_fallback(
      FP16_UNVERIFIED.format(
        version=f"{v // 10000}.{v // 100 % 100}.{v % 100}",
        layout="A_COL" if a_order == A_COL else "A_ROW",
      )
    )
    return SparseWeight(None, w2, **kw)
  # The 2:4 check above (exact, in jasp.masks) is the authority: cuSPARSELt
  # 0.8.0's cusparseLtSpMMAPruneCheck can leave its flag unwritten for valid
  # weights, so it is not called.
  comp = _ffi_compress(w2.T if a_order == A_ROW else w2, n, k, a_order, rt)
  fmt = rt.format_tag + (":col" if a_order == A_COL else ":row")
  return SparseWeight(comp, w2 if keep_dense else None, fmt=fmt, **kw)
