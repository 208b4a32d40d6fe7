"""Sparse or dense? Per call shape, measured once on this GPU and cached.

A 2:4 matmul on the sparse tensor cores is faster than dense only for large
enough problems (on an H100, in the thousands of tokens for 4096-wide layers);
for few tokens it can be several times slower. :class:`MatmulPolicy` decides
per ``(K, N, tokens, dtype)``: in ``"auto"`` mode it times the dense XLA dot
and the sparse kernel once on random data of that shape, keeps the result in a
JSON cache (per GPU model, cuSPARSELt and jax version), and takes the sparse
path only where it was at least ``min_speedup`` times faster, so that no call
is slower than dense beyond measurement noise. The decision is made when
:func:`jasp.sparse.matmul` (defined here) is traced (shapes are static
then), so a jitted model pays nothing per call.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import math
import os
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Literal

import jax
import jax.numpy as jnp

from jasp import masks as masks_lib
from jasp.sparse import _compress as compress_lib
from jasp.sparse import _matmul as matmul_lib
from jasp.sparse import _runtime
from jasp.sparse import build as build_lib

__all__ = ["Choice", "MatmulPolicy", "TimingCache", "choose", "matmul", "measure_gpu", "tune"]

Measure = Callable[[int, int, int, str], tuple[float, float]]


@dataclasses.dataclass(frozen=True)
class MatmulPolicy:
  """How :func:`jasp.sparse.matmul` picks its path.

  Attributes:
    mode: ``"auto"`` (measured, the default), ``"sparse"`` (always the sparse
      kernel where a compressed weight exists) or ``"dense"`` (always the dense
      dot on the kept masked weight).
    min_speedup: in ``"auto"`` mode, the sparse kernel must be at least this
      much faster than dense (dense time / sparse time) to be used. 1.05 keeps
      near-ties, where timing noise could flip the order, on the dense path.
    cache_file: JSON file of measurements; None for the default
      (``<cache dir>/sparse_timings.json``), ``""`` for memory only.
    measure: ``measure(k, n, tokens, dtype) -> (dense_seconds, sparse_seconds)``;
      None times both on the GPU (:func:`measure_gpu`). Tests inject tables.
  """

  mode: Literal["auto", "sparse", "dense"] = "auto"
  min_speedup: float = 1.05
  cache_file: str | None = None
  measure: Measure | None = None

  def __post_init__(self):
    if self.mode not in ("auto", "sparse", "dense"):
      raise ValueError(f"MatmulPolicy.mode must be 'auto', 'sparse' or 'dense', got {self.mode!r}.")
    if not self.min_speedup > 0:
      raise ValueError(f"MatmulPolicy.min_speedup must be > 0, got {self.min_speedup!r}.")


@dataclasses.dataclass(frozen=True)
class Choice:
  """One decision.

  Attributes:
    sparse: True for the sparse kernel, False for the dense dot.
    reason: why, in words.
    dense_s, sparse_s: the measured seconds per call (``"auto"`` mode only).
  """

  sparse: bool
  reason: str
  dense_s: float | None = None
  sparse_s: float | None = None

  @property
  def speedup(self) -> float | None:
    if self.dense_s is None or not self.sparse_s:
      return None
    return self.dense_s / self.sparse_s


class TimingCache:
  """Measured ``(dense_s, sparse_s)`` per key, in memory and (optionally) a JSON file.

  Thread-safe; the file is re-read and merged before each write, and written
  atomically, so several processes can share it.
  """

  def __init__(self, path: str = ""):
    self.path = path
    self._lock = threading.Lock()
    self._data: dict[str, tuple[float, float]] = self._read()

  def _read(self) -> dict[str, tuple[float, float]]:
    if not self.path or not os.path.exists(self.path):
      return {}
    try:
      with open(self.path) as f:
        raw = json.load(f)
      return {k: (float(v[0]), float(v[1])) for k, v in raw.items()}
    except (OSError, ValueError, TypeError, IndexError, AttributeError):
      return {}

  def __contains__(self, key: str) -> bool:
    return key in self._data

  def get(self, key: str, compute: Callable[[], tuple[float, float]]) -> tuple[float, float]:
    """The cached value for ``key``, computing (and storing) it on a miss."""
    with self._lock:
      if key in self._data:
        return self._data[key]
    value = tuple(float(v) for v in compute())
    with self._lock:
      self._data[key] = value
      self._write()
    return value

  def _write(self) -> None:
    if not self.path:
      return
    merged = {**self._read(), **self._data}
    os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(self.path) or ".", suffix=".json")
    with os.fdopen(fd, "w") as f:
      json.dump({k: list(v) for k, v in sorted(merged.items())}, f, indent=0)
    os.replace(tmp, self.path)


_CACHES: dict[str, TimingCache] = {}
_CACHES_LOCK = threading.Lock()


def _cache_for(policy: MatmulPolicy) -> TimingCache:
  path = policy.cache_file
  if path is None:
    path = os.path.join(build_lib.cache_dir(), "sparse_timings.json")
  with _CACHES_LOCK:
    if path not in _CACHES:
      _CACHES[path] = TimingCache(path)
    return _CACHES[path]


def timing_key(k: int, n: int, t: int, dtype: str, a_order: int = 0) -> str:
  """The cache key: GPU model, cuSPARSELt and jax versions, dtype and shape."""
  try:
    rt = _runtime.runtime()
    dev = f"{rt.device_kind}|sm{rt.compute_capability}|cslt{rt.cusparselt_version}"
  except _runtime.SparseUnavailable:
    dev = "no-sparse-runtime"
  return f"{dev}|jax{jax.__version__}|{dtype}|a{a_order}|{k}x{n}|t{t}"


def choose(
  policy: MatmulPolicy | None,
  *,
  k: int,
  n: int,
  t: int,
  dtype: str,
  compressed: bool,
  has_dense: bool,
  a_order: int = 0,
) -> Choice:
  """The path for one call of ``x (t, k) @ W (k, n)``.

  Args:
    policy: the policy (None: ``MatmulPolicy()``).
    k, n, t: reduction size, output size, tokens (rows of ``x``).
    dtype: the compute dtype's name.
    compressed: whether a compressed weight exists (else dense, always).
    has_dense: whether the dense masked weight was kept.
    a_order: the compressed layout (part of the cache key).

  Raises:
    ValueError: ``mode="dense"`` without a kept dense weight.
  """
  policy = policy or MatmulPolicy()
  if not compressed:
    return Choice(False, "no compressed weight (the sparse path is unavailable here)")
  if policy.mode == "dense":
    if not has_dense:
      raise ValueError(
        "MatmulPolicy(mode='dense') needs the dense weight, but it was compressed "
        "with keep_dense=False."
      )
    return Choice(False, "policy mode 'dense'")
  if policy.mode == "sparse":
    return Choice(True, "policy mode 'sparse'")
  if not has_dense:
    return Choice(True, "only the compressed weight was kept (keep_dense=False)")
  measure = policy.measure or measure_gpu
  key = timing_key(k, n, t, dtype, a_order)
  dense_s, sparse_s = _cache_for(policy).get(key, lambda: _off_trace(measure, k, n, t, dtype))
  speed = dense_s / sparse_s if sparse_s > 0 else 0.0
  if speed >= policy.min_speedup:
    return Choice(
      True, f"sparse measured {speed:.2f}x dense (>= {policy.min_speedup})", dense_s, sparse_s
    )
  return Choice(
    False, f"sparse measured {speed:.2f}x dense (< {policy.min_speedup})", dense_s, sparse_s
  )


def _off_trace(fn: Measure, k: int, n: int, t: int, dtype: str) -> tuple[float, float]:
  """Runs ``fn`` on a fresh thread: outside any enclosing ``jit`` trace, so it executes."""
  with concurrent.futures.ThreadPoolExecutor(max_workers=1) as ex:
    return ex.submit(fn, k, n, t, dtype).result()


def _time_calls(fn, args, n_inner: int) -> float:
  t0 = time.perf_counter()
  out = None
  for _ in range(n_inner):
    out = fn(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - t0) / n_inner


def measure_gpu(
  k: int, n: int, t: int, dtype: str, *, rounds: int = 7, target_s: float = 2e-3, a_order: int = 0
) -> tuple[float, float]:
  """Seconds per call of the dense XLA dot and the sparse kernel for ``(t, k) @ (k, n)``.

  Random inputs (a random 2:4 weight), both functions jitted and warmed up
  (the sparse plan search included); each round times back-to-back calls
  (enough for ``target_s``), dense and sparse interleaved; the median round.
  Host-timed, so tiny calls measure dispatch for both paths (a near-tie, which
  the policy leaves on the dense path).
  """
  kw, kx = jax.random.split(jax.random.key(0))
  w = jax.random.normal(kw, (k, n), jnp.float32)
  w = jnp.where(masks_lib.nm_mask(w, 2, 4, 0), w, 0).astype(dtype)
  sw = compress_lib.compress(w, dtype=dtype, check=False, a_order=a_order)
  if not sw.is_compressed:
    raise _runtime.SparseUnavailable("jasp.sparse: cannot measure the sparse kernel here.")
  x = jax.random.normal(kx, (t, k), jnp.float32).astype(dtype)
  dense = jax.jit(lambda x, w: jnp.dot(x, w))
  sparse = jax.jit(lambda x, sw: matmul_lib.sparse_matmul(x, sw))
  runs = [(dense, (x, sw.dense)), (sparse, (x, sw))]
  inner = []
  for fn, args in runs:
    jax.block_until_ready(fn(*args))
    one = _time_calls(fn, args, 1)
    inner.append(max(1, min(200, int(target_s / max(one, 1e-6)))))
  times: list[list[float]] = [[], []]
  for _ in range(rounds):
    for i, (fn, args) in enumerate(runs):
      times[i].append(_time_calls(fn, args, inner[i]))
  return statistics.median(times[0]), statistics.median(times[1])


def tune(
  k: int, n: int, tokens: list[int], dtype: str = "bfloat16", policy: MatmulPolicy | None = None
) -> dict[int, Choice]:
  """Measures (or reads from the cache) the decisions for several token counts.

  Run it once per model shape ahead of serving so that tracing never waits on
  a measurement. Returns ``{tokens: Choice}``.
  """
  policy = policy or MatmulPolicy()
  return {
    t: choose(policy, k=k, n=n, t=t, dtype=dtype, compressed=True, has_dense=True) for t in tokens
  }


def matmul(
  x: jax.Array,
  w: compress_lib.SparseWeight,
  bias: jax.Array | None = None,
  *,
  policy: MatmulPolicy | None = None,
  bias_epilogue: bool = False,
) -> jax.Array:
  """``x @ W (+ bias)``: the sparse kernel where it is faster, else dense.

  The path is chosen when the call is traced, from ``x``'s token count
  ``prod(x.shape[:-1])`` (under ``vmap``: the per-example count), by
  ``policy`` (:class:`jasp.sparse.MatmulPolicy`; default: measured once per
  shape on this GPU and cached). Without a sparse runtime (CPU, a GPU without
  2:4 tensor cores, no cuSPARSELt) the dense dot runs, and a warning says why
  once per process.

  Args:
    x: activations ``(..., K)``.
    w: a :class:`jasp.sparse.SparseWeight` (from :func:`jasp.sparse.compress`).
    bias: ``(N,)`` or None.
    policy: a :class:`jasp.sparse.MatmulPolicy`, or None for the default.
    bias_epilogue: see :func:`jasp.sparse.sparse_matmul`.

  Returns:
    ``(..., N)`` in ``w.dtype``; equal to ``x @ W_masked + bias`` up to the
    accumulation order (fp32 accumulation on both paths).

  Example::

    sw = jasp.sparse.compress(kernel, dtype=jnp.bfloat16)   # kernel 2:4 along axis 0
    y = jax.jit(jasp.sparse.matmul)(x, sw)                  # x (..., in) -> (..., out)
  """
  x = jnp.asarray(x)
  matmul_lib.check_x(x, w)
  runnable = w.is_compressed
  if runnable:
    ok, why = _runtime.status()
    if not ok:
      runnable = False
      if w.dense is None:
        raise _runtime.SparseUnavailable(why + " This SparseWeight kept no dense weight.")
      _runtime.note_dense_fallback(why)
  t = math.prod(x.shape[:-1])
  choice = choose(
    policy,
    k=w.k,
    n=w.n,
    t=t,
    dtype=w.dtype,
    compressed=runnable,
    has_dense=w.dense is not None,
    a_order=w.a_order,
  )
  if choice.sparse:
    return matmul_lib.sparse_matmul(x, w, bias, bias_epilogue=bias_epilogue)
  return matmul_lib.dense_matmul(x, w, bias)
