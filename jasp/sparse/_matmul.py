"""``y = x @ W (+ bias)`` with a compressed 2:4 ``W``: the sparse tensor cores or dense.

:func:`sparse_matmul` always runs cuSPARSELt through the ``jax.ffi`` target
(jittable; ``vmap`` over activations batches into one call; the weight is never
copied or transposed per call); :func:`dense_matmul` runs XLA's dense dot on the
kept masked weight; :func:`compact_matmul` runs jasp's decode-time kernel
(:func:`jasp.kernels.decode24.matmul_24`) on the compact format.
:func:`jasp.sparse.matmul`, which picks one of them per call shape, lives in
:mod:`jasp.sparse.autotune`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jasp.kernels import decode24
from jasp.sparse import _compress as compress_lib
from jasp.sparse import _runtime

__all__ = ["batched_call", "check_x", "compact_matmul", "dense_matmul", "sparse_matmul"]

# The workspace comes from XLA's scratch allocator; this many bytes are also
# reserved as an output the handler falls back to (XLA reuses the buffer).
FALLBACK_WORKSPACE = 4 << 20


def _check_format(w: compress_lib.SparseWeight, rt: _runtime.Runtime) -> None:
  expect = rt.format_tag
  if not w.fmt.startswith(expect + ":"):
    raise ValueError(
      f"this SparseWeight was compressed as '{w.fmt}' but this process runs '{expect}' "
      "(another cuSPARSELt version or GPU architecture): its bytes cannot be used here. "
      "Recompress it from its dense weight (jasp.sparse.compress)."
    )


def check_x(x: jax.Array, w: compress_lib.SparseWeight) -> None:
  if w.stack:
    raise ValueError(
      f"this SparseWeight holds a stack of {w.stack} layers' weights (kernel {w.shape} "
      "each); it runs one layer at a time, inside the scan over its layers (nn.scan, "
      "nnx.scan or lax.scan slice it)."
    )
  if x.ndim < 1 or x.shape[-1] != w.k:
    raise ValueError(
      f"x of shape {tuple(x.shape)} does not match the weight: its last axis "
      f"must have the reduction size K={w.k} (kernel {w.shape})."
    )


def _bias_vector(bias, w: compress_lib.SparseWeight):
  if bias is None:
    return None
  b = jnp.asarray(bias)
  if b.size != w.n:
    raise ValueError(
      f"bias of shape {tuple(b.shape)} does not match the weight's {w.n} outputs "
      f"(kernel {w.shape})."
    )
  return b.reshape(w.n).astype(w.dtype)


def _plus_bias(y: jax.Array, bias, w: compress_lib.SparseWeight) -> jax.Array:
  """``y + bias`` (checked against ``w``, in ``y``'s dtype); ``y`` when ``bias`` is None."""
  b = _bias_vector(bias, w)
  return y if b is None else y + b.astype(y.dtype)


def sparse_matmul(
  x: jax.Array,
  w: compress_lib.SparseWeight,
  bias: jax.Array | None = None,
  *,
  bias_epilogue: bool = False,
  search: bool = True,
) -> jax.Array:
  """``x @ W (+ bias)`` on the 2:4 sparse tensor cores (cuSPARSELt).

  Args:
    x: activations ``(..., K)``; cast to ``w.dtype``.
    w: a compressed :class:`SparseWeight`.
    bias: ``(N,)`` (any shape of N elements) or None.
    bias_epilogue: add the bias inside cuSPARSELt's epilogue instead of a
      (fused) XLA add after the call.
    search: on the first call of each shape, time every cuSPARSELt
      algorithm configuration on the real buffers and keep the fastest
      (cached per process; the first call blocks until the search ends).
      False uses cuSPARSELt's default configuration.

  Returns:
    ``(..., N)`` in ``w.dtype``.

  Raises:
    SparseUnavailable: no sparse runtime here. ValueError: no compressed
      weight, a format from another library/GPU, or mismatched shapes.
  """
  if not w.is_compressed:
    raise ValueError(
      f"sparse_matmul needs a compressed weight; this one ({w.shape}) holds only "
      "its dense form (compressed where the sparse path was unavailable?)."
    )
  rt = _runtime.runtime()
  _check_format(w, rt)
  x = jnp.asarray(x)
  check_x(x, w)
  b = _bias_vector(bias, w)
  use_epi = b is not None and bias_epilogue
  meta = (w.k, w.n, w.dtype, w.a_order, use_epi, bool(search))
  b_arg = b if b is not None else jnp.zeros((0,), w.dtype)
  return batched_call(
    functools.partial(_ffi_2d, meta=meta),
    meta,
    x.astype(w.dtype),
    w.compressed,
    b_arg,
    b is not None,
  )


def _ffi_2d(x2: jax.Array, compressed: jax.Array, b: jax.Array, *, meta) -> jax.Array:
  """The FFI call on ``x2 (t, K)`` with ``t`` a multiple of 16: ``(t, N)``, no bias added."""
  k, n, dtype, a_order, use_epi, search = meta
  call = jax.ffi.ffi_call(
    _runtime.MATMUL_TARGET,
    (
      jax.ShapeDtypeStruct((x2.shape[0], n), dtype),
      jax.ShapeDtypeStruct((FALLBACK_WORKSPACE,), jnp.uint8),
    ),
  )
  b_arg = b if use_epi else jnp.zeros((0,), dtype)
  y, _ = call(
    compressed,
    x2,
    b_arg,
    m=np.int64(n),
    k=np.int64(k),
    a_order=np.int64(a_order),
    has_bias=np.int64(use_epi),
    search=np.int64(search),
  )
  return y


def batched_call(
  fn2d: Callable[..., jax.Array],
  meta: tuple,
  x: jax.Array,
  compressed: jax.Array,
  b: jax.Array,
  has_bias: bool,
) -> jax.Array:
  """``x (..., K) -> (..., N)`` through ``fn2d`` on one ``(t, K)`` matrix, ``vmap``-able.

  Leading axes (and, under ``vmap``, the batch axes) fold into the token axis,
  padded to a multiple of 16, so the kernel always sees one 2-D activation and
  the unbatched weight: a vmapped call is one bigger call. ``vmap`` over the
  compressed weight or the bias is refused (ValueError) at trace time.
  ``meta = (K, N, dtype, a_order, bias_in_epilogue, search)``.
  """
  k, n, _, _, use_epi, _ = meta

  @jax.custom_batching.custom_vmap
  def core(x, compressed, b):
    lead = x.shape[:-1]
    t = math.prod(lead)
    x2 = x.reshape(t, k)
    tp = -(-max(t, 1) // compress_lib.SIZE_MULTIPLE) * compress_lib.SIZE_MULTIPLE
    if tp != t:
      x2 = jnp.pad(x2, ((0, tp - t), (0, 0)))
    y = fn2d(x2, compressed, b)
    if tp != t:
      y = y[:t]
    if has_bias and not use_epi:
      y = y + b
    return y.reshape(*lead, n)

  @core.def_vmap
  def _rule(axis_size, in_batched, x, compressed, b):
    xb, cb, bb = in_batched
    if cb or bb:
      raise ValueError(
        "jasp.sparse: vmap over the compressed weight (or the bias) is not "
        "supported: one weight per call; vmap over the activations only."
      )
    if not xb:
      x = jnp.broadcast_to(x, (axis_size, *x.shape))
    return core(x, compressed, b), True

  return core(x, compressed, b)


def dense_matmul(
  x: jax.Array, w: compress_lib.SparseWeight, bias: jax.Array | None = None
) -> jax.Array:
  """``x @ W (+ bias)`` with XLA's dense dot on the kept masked weight.

  Returns ``(..., N)`` in ``w.dtype``.
  """
  if w.dense is None:
    raise ValueError(
      f"the SparseWeight {w.shape} kept no dense weight (keep_dense=False), so "
      "the dense path cannot run; recompress with keep_dense=True."
    )
  x = jnp.asarray(x)
  check_x(x, w)
  return _plus_bias(jnp.dot(x.astype(w.dense.dtype), w.dense), bias, w)


def compact_matmul(
  x: jax.Array,
  w: compress_lib.SparseWeight,
  bias: jax.Array | None = None,
  *,
  interpret: bool | None = None,
) -> jax.Array:
  """``x @ W (+ bias)`` with the decode-time kernel on ``w.compact``.

  Args:
    x: ``(..., K)``; cast to ``w.dtype``.
    w: a :class:`SparseWeight` compressed with ``compact=True``.
    bias: ``(N,)`` or None.
    interpret: Pallas interpret mode (None: off a GPU; tests).

  Returns:
    ``(..., N)`` in ``w.dtype`` (float32 accumulation).

  Raises:
    ValueError: ``w`` holds no compact format, or ``x`` does not match it.
  """
  if w.compact is None:
    raise ValueError(
      f"the SparseWeight {w.shape} holds no compact (decode) format; compress it with "
      "jasp.sparse.compress(..., compact=True)."
    )
  x = jnp.asarray(x)
  check_x(x, w)
  return _plus_bias(decode24.matmul_24(x.astype(w.dtype), w.compact, interpret=interpret), bias, w)
