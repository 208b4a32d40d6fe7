"""Sparse or dense? Per call shape, measured once on this GPU and cached.

A 2:4 matmul on the sparse tensor cores is faster than dense only for large
enough problems (on an H100, in the thousands of tokens for 4096-wide layers);
for few tokens it can be several times slower. :class:`MatmulPolicy` decides
per ``(K, N, tokens, dtype)``: in ``"auto"`` mode it measures the device time
of the dense XLA dot and of the sparse kernel once on random data of that
shape (:func:`measure_gpu`), keeps the result in a JSON cache (per GPU model,
cuSPARSELt and jax version, and measurement method), and takes the sparse path
only where it was at least ``min_speedup`` times faster, so that no call is
slower than dense beyond measurement noise. The decision is made when
:func:`jasp.sparse.matmul` (defined here) is traced (shapes are static then),
so a jitted model pays nothing per call.

Why device time. Timing single jitted calls from the host measures JAX's
per-call dispatch (40-60 us on an H200) as much as the kernels (30-50 us for a
4096x14336 layer at 16-256 tokens), and the two paths dispatch differently (an
XLA dot vs an FFI custom call), so the host-timed ratio was off by up to 2x
where it mattered. :func:`measure_gpu` therefore runs each path many times
inside ONE compiled program (:func:`chained`: a ``fori_loop`` in which every
call's input has one element taken from the previous call's output, so XLA
can neither hoist a call out of the loop, merge calls nor drop them), and
takes the difference between 3 and 1 back-to-back executions of that program,
each ending in one host sync: dispatch and the sync cancel,
and inside the program the host launches kernels faster than the device runs
them, so what is left is the device time per call. The calls rotate over copies
of the weight spanning several times the L2 cache (:func:`weight_copies`): in a
model each layer's weight comes from memory, and a weight that fits the L2
measured alone favours whichever path reads more bytes. The alternative, CUDA
events around the calls through the FFI extension, would need the dense path
bracketed by custom calls that XLA may schedule away from the dot; CUPTI would
need a profiler dependency. :func:`measure_gpu_host` (the former host-timed
method) is kept for comparison (``benchmarks/sparse_matmul_bench.py
--policy-check``).
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
from jasp.kernels import decode24
from jasp.sparse import _compress as compress_lib
from jasp.sparse import _matmul as matmul_lib
from jasp.sparse import _runtime
from jasp.sparse import build as build_lib

__all__ = [
  "Choice",
  "MatmulPolicy",
  "TimingCache",
  "chained",
  "choice_for",
  "choose",
  "device_seconds",
  "matmul",
  "measure_compact_gpu",
  "measure_gpu",
  "measure_gpu_host",
  "tune",
  "weight_copies",
]

Measure = Callable[[int, int, int, str], tuple[float, float]]

# Part of the timing cache key of the default measurement (:func:`measure_gpu`):
# entries from other methods (keys without it: the former host timing, or an
# injected ``measure``) are never read as device times, and stay in the file
# for the versions that wrote them.
# v2: the calls rotate over copies of the weight (:func:`weight_copies`).
DEVICE_METHOD = "m=device-loop-v2"

# The same for the compact kernel's measurement (:func:`measure_compact_gpu`),
# whose entries are keyed by the device, not the cuSPARSELt runtime.
COMPACT_METHOD = "compact-device-loop-v2"

# Calls per loop iteration in :func:`chained` (amortises the loop counter's kernel).
UNROLL = 8

#: Bytes that the copies of a measured weight span at least (up to :data:`UNROLL`
#: copies), so that each call reads its weight from memory and not from the L2
#: cache (50 MB on an H100 or H200), as it does in a model whose weights together
#: exceed the L2. On an H100 the loop on one copy put the 4096x4096 dense dot at 1
#: token at 6.8 us and the compact kernel at 11.2 us (dense kept); over copies
#: (decode_bench, CUPTI) they took 14.1 us and 14.2 us: 0.63x on one copy, 1.00x streamed.
STREAM_BYTES = 256 << 20

#: The paths :func:`jasp.sparse.matmul` takes: XLA's dense dot, cuSPARSELt,
#: jasp's decode-time kernel on the compact format.
PATHS = ("dense", "sparse", "compact")


@dataclasses.dataclass(frozen=True)
class MatmulPolicy:
  """How :func:`jasp.sparse.matmul` picks its path.

  Attributes:
    mode: ``"auto"`` (measured, the default), ``"sparse"`` (always a sparse
      kernel: cuSPARSELt where a compressed weight exists, else the compact
      kernel) or ``"dense"`` (always the dense dot on the kept masked weight).
    min_speedup: in ``"auto"`` mode, a sparse kernel (cuSPARSELt, or the
      compact kernel where the weight holds the compact format) must be at
      least this much faster than dense (dense time / its time) to be used;
      the faster of the two wins. 1.05 keeps near-ties, where timing noise
      could flip the order, on the dense path.
    cache_file: JSON file of measurements; None for the default
      (``<cache dir>/sparse_timings.json``), ``""`` for memory only.
    measure: ``measure(k, n, tokens, dtype) -> (dense_seconds, sparse_seconds)``;
      None measures the device time of both on the GPU (:func:`measure_gpu`).
      Tests inject tables.
    measure_compact: ``measure_compact(k, n, tokens, dtype) -> (dense_seconds,
      compact_seconds)``; None measures the device time of both on the GPU
      (:func:`measure_compact_gpu`).
  """

  mode: Literal["auto", "sparse", "dense"] = "auto"
  min_speedup: float = 1.05
  cache_file: str | None = None
  measure: Measure | None = None
  measure_compact: Measure | None = None

  def __post_init__(self):
    if self.mode not in ("auto", "sparse", "dense"):
      raise ValueError(f"MatmulPolicy.mode must be 'auto', 'sparse' or 'dense', got {self.mode!r}.")
    if not self.min_speedup > 0:
      raise ValueError(f"MatmulPolicy.min_speedup must be > 0, got {self.min_speedup!r}.")


@dataclasses.dataclass(frozen=True)
class Choice:
  """One decision.

  Attributes:
    sparse: True for the cuSPARSELt kernel, False otherwise.
    reason: why, in words.
    dense_s, sparse_s: the measured seconds per call (``"auto"`` mode only).
    path: one of :data:`PATHS`: ``"dense"``, ``"sparse"`` (cuSPARSELt) or
      ``"compact"`` (the decode-time kernel); by default from ``sparse``.
    compact_s: the compact kernel's measured seconds per call, and
      ``compact_dense_s`` the dense time measured beside it (``"auto"`` mode,
      weights with the compact format).

  Raises:
    ValueError: ``path`` is not one of :data:`PATHS` or contradicts ``sparse``.
  """

  sparse: bool
  reason: str
  dense_s: float | None = None
  sparse_s: float | None = None
  path: str = ""
  compact_s: float | None = None
  compact_dense_s: float | None = None

  def __post_init__(self):
    if not self.path:
      object.__setattr__(self, "path", "sparse" if self.sparse else "dense")
    if self.path not in PATHS or self.sparse != (self.path == "sparse"):
      raise ValueError(f"Choice: path {self.path!r} with sparse={self.sparse} (paths: {PATHS}).")

  @property
  def speedup(self) -> float | None:
    """Dense time over cuSPARSELt's, when both were measured."""
    if self.dense_s is None or not self.sparse_s:
      return None
    return self.dense_s / self.sparse_s

  @property
  def compact_speedup(self) -> float | None:
    """Dense time over the compact kernel's, when both were measured."""
    if self.compact_dense_s is None or not self.compact_s:
      return None
    return self.compact_dense_s / self.compact_s


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


def timing_key(k: int, n: int, t: int, dtype: str, a_order: int = 0, method: str = "") -> str:
  """The cache key: GPU model, cuSPARSELt and jax versions, dtype, shape and method.

  ``method`` is empty for the former host-timed measurement and injected
  ``measure`` functions (the keys of earlier versions), :data:`DEVICE_METHOD`
  for :func:`measure_gpu`.
  """
  try:
    rt = _runtime.runtime()
    dev = f"{rt.device_kind}|sm{rt.compute_capability}|cslt{rt.cusparselt_version}"
  except _runtime.SparseUnavailable:
    dev = "no-sparse-runtime"
  key = f"{dev}|jax{jax.__version__}|{dtype}|a{a_order}|{k}x{n}|t{t}"
  return f"{key}|{method}" if method else key


def compact_key(k: int, n: int, t: int, dtype: str) -> str:
  """The cache key of the compact kernel's measurement: device kind, jax version, dtype, shape
  and the layout (hence kernel) :func:`jasp.kernels.decode24.compress_24` picks for it."""
  dev = jax.devices()[0].device_kind if jax.devices() else "no-device"
  layout = decode24.default_layout(k, n, jnp.dtype(dtype))
  return f"{dev}|jax{jax.__version__}|{dtype}|{k}x{n}|t{t}|{layout}|{COMPACT_METHOD}"


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
  compact: bool = False,
) -> Choice:
  """The path for one call of ``x (t, k) @ W (k, n)``.

  Args:
    policy: the policy (None: ``MatmulPolicy()``).
    k, n, t: reduction size, output size, tokens (rows of ``x``).
    dtype: the compute dtype's name.
    compressed: whether a runnable cuSPARSELt weight exists.
    has_dense: whether the dense masked weight was kept.
    a_order: the compressed layout (part of the cache key).
    compact: whether the compact format exists and its kernel runs here.

  Raises:
    ValueError: ``mode="dense"`` without a kept dense weight.
  """
  policy = policy or MatmulPolicy()
  if not compressed and not compact:
    return Choice(False, "no compressed weight (the sparse path is unavailable here)")
  if policy.mode == "dense":
    if not has_dense:
      raise ValueError(
        "MatmulPolicy(mode='dense') needs the dense weight, but it was compressed "
        "with keep_dense=False."
      )
    return Choice(False, "policy mode 'dense'")
  if policy.mode == "sparse":
    if compressed:
      return Choice(True, "policy mode 'sparse'")
    return Choice(
      False, "policy mode 'sparse': the compact kernel (no cuSPARSELt weight)", path="compact"
    )
  if not has_dense and not (compressed and compact):
    path = "sparse" if compressed else "compact"
    what = "the compressed weight" if compressed else "the compact format"
    return Choice(path == "sparse", f"only {what} was kept (keep_dense=False)", path=path)
  cache = _cache_for(policy)
  times: dict[str, tuple[float, float]] = {}  # path -> (dense_s, path_s)
  if compressed:
    measure = policy.measure or measure_gpu
    key = timing_key(k, n, t, dtype, a_order, DEVICE_METHOD if measure is measure_gpu else "")
    times["sparse"] = cache.get(key, lambda: _off_trace(measure, k, n, t, dtype))
  if compact:
    measure_c = policy.measure_compact or measure_compact_gpu
    key = compact_key(k, n, t, dtype)
    if policy.measure_compact is not None:
      key += "|injected"
    times["compact"] = cache.get(key, lambda: _off_trace(measure_c, k, n, t, dtype))
  dense_s, sparse_s = times.get("sparse", (None, None))
  compact_dense_s, compact_s = times.get("compact", (None, None))
  kw = dict(
    dense_s=dense_s, sparse_s=sparse_s, compact_s=compact_s, compact_dense_s=compact_dense_s
  )
  speed = {p: d / x if x > 0 else 0.0 for p, (d, x) in times.items()}
  said = {p: f"{p} measured {v:.2f}x dense" for p, v in speed.items()}
  if not has_dense:  # both sparse forms: the faster
    best = min(times, key=lambda p: times[p][1])
    why = "; ".join(said.values())
    return Choice(best == "sparse", f"no dense weight kept: {best} ({why})", path=best, **kw)
  best = max(speed, key=lambda p: speed[p])
  others = "".join(f"; {v}" for p, v in said.items() if p != best)
  if speed[best] >= policy.min_speedup:
    reason = f"{said[best]} (>= {policy.min_speedup}){others}"
    return Choice(best == "sparse", reason, path=best, **kw)
  return Choice(False, f"{said[best]} (< {policy.min_speedup}){others}", **kw)


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


def _random_24(k: int, n: int, t: int, dtype: str) -> tuple[jax.Array, jax.Array]:
  """Random ``x (t, k)`` and a random ``(k, n)`` weight, 2:4 along ``k``, in ``dtype``."""
  kw, kx = jax.random.split(jax.random.key(0))
  w = jax.random.normal(kw, (k, n), jnp.float32)
  w = jnp.where(masks_lib.nm_mask(w, 2, 4, 0), w, 0).astype(dtype)
  return jax.random.normal(kx, (t, k), jnp.float32).astype(dtype), w


def _problem(k: int, n: int, t: int, dtype: str, a_order: int):
  """Random ``x (t, k)`` and a random compressed 2:4 weight ``(k, n)`` (dense kept)."""
  x, w = _random_24(k, n, t, dtype)
  sw = compress_lib.compress(w, dtype=dtype, check=False, a_order=a_order)
  if not sw.is_compressed:
    raise _runtime.SparseUnavailable("jasp.sparse: cannot measure the sparse kernel here.")
  return x, sw


def _dense_call(x: jax.Array, sw: compress_lib.SparseWeight) -> jax.Array:
  return matmul_lib.dense_matmul(x, sw)


def _sparse_call(x: jax.Array, sw: compress_lib.SparseWeight) -> jax.Array:
  return matmul_lib.sparse_matmul(x, sw)


def measure_gpu_host(
  k: int, n: int, t: int, dtype: str, *, rounds: int = 7, target_s: float = 2e-3, a_order: int = 0
) -> tuple[float, float]:
  """Host seconds per call of the dense XLA dot and the sparse kernel for ``(t, k) @ (k, n)``.

  The former method, kept for comparison with :func:`measure_gpu`: both
  functions jitted and warmed up (the sparse plan search included); each round
  times back-to-back jitted calls from the host (enough for ``target_s``),
  dense and sparse interleaved; the median round. For problems of tens of
  microseconds this measures JAX's dispatch as much as the kernels.

  Raises:
    SparseUnavailable: no sparse runtime here.
  """
  x, sw = _problem(k, n, t, dtype, a_order)
  runs = [(jax.jit(_dense_call), (x, sw)), (jax.jit(_sparse_call), (x, sw))]
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


def _feed_back(x: jax.Array, y: jax.Array) -> jax.Array:
  """``x`` with ``x[0, 0] = tanh(y[0, 0])``: a real dependence on ``y`` for one element's work.

  One small fused kernel (an in-place dynamic-update-slice); ``tanh`` keeps the
  value bounded however many calls are chained.
  """
  corner = jnp.tanh(y[:1, :1].astype(jnp.float32)).astype(x.dtype)
  return jax.lax.dynamic_update_slice(x, corner, (0, 0))


def weight_copies(nbytes: int) -> int:
  """How many copies of a weight of ``nbytes`` a measurement rotates over: the fewest
  of 1, 2, 4 or 8 (divisors of :data:`UNROLL`) that span :data:`STREAM_BYTES`, else 8.

  Raises:
    ValueError: ``nbytes < 1``.
  """
  if nbytes < 1:
    raise ValueError(f"nbytes must be >= 1, got {nbytes}.")
  copies = 1
  while copies < UNROLL and copies * nbytes < STREAM_BYTES:
    copies *= 2
  return copies


def _copies(w, n: int) -> tuple:
  """``w`` and ``n - 1`` copies of it in buffers of their own (every array leaf copied)."""
  copy = lambda a: jnp.array(a, copy=True) if isinstance(a, jax.Array) else a
  return (w,) + tuple(jax.tree.map(copy, w) for _ in range(n - 1))


def chained(fn: Callable[[jax.Array, object], jax.Array], calls: int) -> Callable:
  """A jitted ``prog(x, w)`` making ``calls`` dependent calls ``fn(x, w)``; the last one's output.

  ``x (t, k)`` and ``fn(x, w) (t, n)`` are 2-D. ``w`` may be a tuple of copies
  of the weight, whose number divides :data:`UNROLL`: call ``i`` then reads
  copy ``i % len(w)``. A ``lax.fori_loop`` of
  ``calls // UNROLL`` iterations of :data:`UNROLL` calls each, then the
  remaining calls. Each call's input is the previous input with one element
  replaced by a function of the previous output (:func:`_feed_back`), so no
  call can be hoisted out of the loop (loop-invariant code motion), merged
  with another (CSE) or dropped as dead code, even an opaque side-effect-free
  one such as the sparse kernel's FFI custom call. (An
  ``optimization_barrier`` alone does not do: XLA removes the barriers and
  then the calls whose outputs nothing reads.) The cost is one one-element
  kernel per call, the same on every path.

  Raises:
    ValueError: ``calls < 1``; (at the call) a tuple ``w`` whose length does not
      divide :data:`UNROLL`.
  """
  if calls < 1:
    raise ValueError(f"calls must be >= 1, got {calls}.")

  def step(w, carry, count):
    ws = w if isinstance(w, tuple) else (w,)
    if not ws or UNROLL % len(ws):
      raise ValueError(f"the copies of w must number a divisor of {UNROLL}, got {len(ws)}.")
    x, y = carry
    for i in range(count):
      y = fn(x, ws[i % len(ws)])
      x = _feed_back(x, y)
    return x, y

  def prog(x, w):
    y0 = jax.eval_shape(fn, x, w[0] if isinstance(w, tuple) else w)
    carry = (x, jnp.zeros(y0.shape, y0.dtype))
    if calls >= UNROLL:
      body = lambda _, c: step(w, c, UNROLL)
      carry = jax.lax.fori_loop(0, calls // UNROLL, body, carry)
    return step(w, carry, calls % UNROLL)[1]

  return jax.jit(prog)


def _executions_s(prog, args, n: int) -> float:
  """Host seconds for ``n`` back-to-back executions of ``prog(*args)`` and one sync."""
  t0 = time.perf_counter()
  out = None
  for _ in range(n):
    out = prog(*args)
  jax.block_until_ready(out)
  return time.perf_counter() - t0


def _calls_for(fn, args, target_s: float, max_calls: int) -> int:
  """Warms ``jit(fn)`` up and sizes a program of about ``target_s`` of calls (host-estimated)."""
  x, w = args
  args = (x, w[0] if isinstance(w, tuple) else w)
  one = jax.jit(fn)
  jax.block_until_ready(one(*args))  # compile; the sparse plan search happens here
  per_call = _time_calls(one, args, 3)  # >= the device time (dispatch included)
  return max(2, min(max_calls, math.ceil(target_s / max(per_call, 1e-7))))


def device_seconds(
  runs: list[tuple[Callable, tuple]],
  *,
  rounds: int = 5,
  target_s: float = 4e-3,
  max_calls: int = 256,
) -> list[float]:
  """Device seconds per call of each ``fn(*args)`` in ``runs``, measured from the host.

  Per function, a :func:`chained` program of about ``target_s`` of calls
  (at most ``max_calls``); each round, per function (interleaved), the host
  time of 1 and of 3 back-to-back executions: their difference is 2
  executions' device time (dispatch, launch latency and the sync cancel,
  and the next execution is enqueued while the device runs the previous
  one). The median round, over the calls per execution.

  Args:
    runs: ``[(fn, (x, w)), ...]``; ``fn(x, w)`` returns an array; ``w`` may be a
      tuple of copies of the weight that the calls rotate over (:func:`chained`).
    rounds: measurement rounds (the median is kept).
    target_s: the wanted device time of one execution.
    max_calls: calls per execution at most.

  Returns:
    Seconds per call, one per entry of ``runs`` (positive).
  """
  progs = []
  for fn, args in runs:
    calls = _calls_for(fn, args, target_s, max_calls)
    prog = chained(fn, calls)
    jax.block_until_ready(prog(*args))  # compile
    progs.append((prog, args, calls))
  diffs: list[list[float]] = [[] for _ in runs]
  for _ in range(rounds):
    for i, (prog, args, calls) in enumerate(progs):
      one = _executions_s(prog, args, 1)
      three = _executions_s(prog, args, 3)
      # A negative difference (host noise beyond a tiny execution) falls back to the plain mean.
      diffs[i].append((three - one) / (2 * calls) if three > one else three / (3 * calls))
  return [statistics.median(d) for d in diffs]


def measure_gpu(
  k: int, n: int, t: int, dtype: str, *, rounds: int = 5, target_s: float = 4e-3, a_order: int = 0
) -> tuple[float, float]:
  """Device seconds per call of the dense XLA dot and the sparse kernel for ``(t, k) @ (k, n)``.

  Random inputs (a random 2:4 weight, with copies the calls rotate over so that
  each reads its weight from memory, not the L2 cache: :func:`weight_copies`;
  the copies of the dense and the sparse form hold up to about 1.6 times
  :data:`STREAM_BYTES` during the measurement); both paths as :func:`jasp.sparse.matmul`
  runs them (:func:`jasp.sparse.dense_matmul` on the kept masked weight,
  :func:`jasp.sparse.sparse_matmul` with its plan search), each measured by
  :func:`device_seconds` (many calls in one program, timed as the difference
  of 3 and 1 executions), dense and sparse interleaved, the median of
  ``rounds``. JAX's per-call dispatch, which differs between the paths and
  dominates host timing of problems of tens of microseconds, is not measured;
  the result is what the calls cost inside a compiled model.

  Raises:
    SparseUnavailable: no sparse runtime here.
  """
  x, sw = _problem(k, n, t, dtype, a_order)
  sws = _copies(sw, weight_copies(k * n * jnp.dtype(dtype).itemsize))
  dense_s, sparse_s = device_seconds(
    [(_dense_call, (x, sws)), (_sparse_call, (x, sws))], rounds=rounds, target_s=target_s
  )
  return dense_s, sparse_s


def _compact_problem(k: int, n: int, t: int, dtype: str):
  """Random ``x (t, k)`` and a random 2:4 weight ``(k, n)`` with its dense and compact forms."""
  x, w = _random_24(k, n, t, dtype)
  sw = compress_lib.SparseWeight(
    None,
    w,
    in_shape=(k,),
    out_shape=(n,),
    dtype=dtype,
    compact=decode24.compress_24(w, check=False),
  )
  return x, sw


def _compact_call(x: jax.Array, sw: compress_lib.SparseWeight) -> jax.Array:
  return matmul_lib.compact_matmul(x, sw)


def measure_compact_gpu(
  k: int, n: int, t: int, dtype: str, *, rounds: int = 5, target_s: float = 4e-3
) -> tuple[float, float]:
  """Device seconds per call of the dense XLA dot and the compact kernel for ``(t, k) @ (k, n)``.

  As :func:`measure_gpu`, with :func:`jasp.sparse.compact_matmul` (the
  decode-time kernel, :func:`jasp.kernels.decode24.matmul_24`) in place of
  cuSPARSELt.

  Raises:
    RuntimeError: the compact kernel does not run compiled here (no GPU).
  """
  x, sw = _compact_problem(k, n, t, dtype)
  if not decode24.native(sw.compact.layout):
    raise RuntimeError("jasp.sparse: the compact kernel is measured on a GPU only.")
  sws = _copies(sw, weight_copies(k * n * jnp.dtype(dtype).itemsize))
  dense_s, compact_s = device_seconds(
    [(_dense_call, (x, sws)), (_compact_call, (x, sws))], rounds=rounds, target_s=target_s
  )
  return dense_s, compact_s


def tune(
  k: int,
  n: int,
  tokens: list[int],
  dtype: str = "bfloat16",
  policy: MatmulPolicy | None = None,
  *,
  compressed: bool = True,
  compact: bool = False,
) -> dict[int, Choice]:
  """Measures (or reads from the cache) the decisions for several token counts.

  Run it once per model shape ahead of serving so that tracing never waits on
  a measurement. ``compressed`` / ``compact``: which sparse forms the weights
  hold (cuSPARSELt's; the compact one of ``compress(..., compact=True)``).
  Returns ``{tokens: Choice}``.
  """
  policy = policy or MatmulPolicy()
  return {
    t: choose(
      policy, k=k, n=n, t=t, dtype=dtype, compressed=compressed, has_dense=True, compact=compact
    )
    for t in tokens
  }


def matmul(
  x: jax.Array,
  w: compress_lib.SparseWeight,
  bias: jax.Array | None = None,
  *,
  policy: MatmulPolicy | None = None,
  bias_epilogue: bool = False,
) -> jax.Array:
  """``x @ W (+ bias)``: a sparse kernel where it is faster, else dense.

  The path is chosen when the call is traced, from ``x``'s token count
  ``prod(x.shape[:-1])`` (under ``vmap``: the per-example count), by
  ``policy`` (:class:`jasp.sparse.MatmulPolicy`; default: measured once per
  shape on this GPU and cached), among XLA's dense dot, cuSPARSELt (where
  ``w`` holds its compressed form) and jasp's decode-time kernel (where ``w``
  holds the compact form, ``compress(..., compact=True)``; on a GPU). Without
  a sparse runtime (CPU, a GPU without 2:4 tensor cores, no cuSPARSELt) the
  dense dot runs, and a warning says why once per process.

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
  choice = choice_for(w, math.prod(x.shape[:-1]), policy)
  if choice.path == "sparse":
    return matmul_lib.sparse_matmul(x, w, bias, bias_epilogue=bias_epilogue)
  if choice.path == "compact":
    return matmul_lib.compact_matmul(x, w, bias)
  return matmul_lib.dense_matmul(x, w, bias)


def choice_for(
  w: compress_lib.SparseWeight, tokens: int, policy: MatmulPolicy | None = None
) -> Choice:
  """The path :func:`matmul` takes for ``tokens`` rows of ``x`` times ``w``, here.

  Which forms of ``w`` can run on this process (cuSPARSELt's needs its
  runtime, the compact kernel a GPU), then :func:`choose` among them.

  Raises:
    SparseUnavailable: ``w`` holds only cuSPARSELt's form and it cannot run here.
  """
  runnable = w.is_compressed
  if runnable:
    ok, why = _runtime.status()
    if not ok:
      runnable = False
      if w.dense is None and not w.is_compact:
        raise _runtime.SparseUnavailable(why + " This SparseWeight kept no dense weight.")
      _runtime.note_dense_fallback(why)
  compact = w.is_compact and decode24.native(w.compact.layout)
  if w.dense is None and not runnable and not compact:
    # Only the compact form can run: interpreted off a GPU (slow, but exact).
    _runtime.note_dense_fallback(
      "jasp.sparse: a weight kept only in the compact format runs its kernel interpreted "
      "here (no GPU): slow."
    )
    return Choice(False, "only the compact format was kept; interpreted here", path="compact")
  return choose(
    policy,
    k=w.k,
    n=w.n,
    t=tokens,
    dtype=w.dtype,
    compressed=runnable,
    has_dense=w.dense is not None,
    a_order=w.a_order,
    compact=compact,
  )
