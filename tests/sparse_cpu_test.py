"""jasp.sparse without a GPU: the policy's logic, the dense fallback, errors, pytrees, the build's messages."""

import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import testing

from jasp import _tree
from jasp import sparse
from jasp.sparse import _runtime
from jasp.sparse import autotune as policy_lib
from jasp.sparse import build

needs_cpu = pytest.mark.skipif(sparse.status()[0], reason="checks the fallback without a GPU")


def _fake(speedup, calls=None):
  def measure(k, n, t, dtype):
    if calls is not None:
      calls.append((k, n, t, dtype))
    return 1e-3 * speedup, 1e-3

  return measure


# ----------------------------------------------------------------------------
# Policy.


@pytest.mark.parametrize(
  "speedup,sparse_path", [(1.6, True), (1.05, True), (1.04, False), (0.3, False)]
)
def test_auto_uses_sparse_only_when_faster(speedup, sparse_path):
  pol = sparse.MatmulPolicy(measure=_fake(speedup), cache_file="")
  c = policy_lib.choose(
    pol, k=64, n=32, t=128 + int(speedup * 100), dtype="bfloat16", compressed=True, has_dense=True
  )
  assert c.sparse is sparse_path
  assert c.speedup == pytest.approx(speedup)
  assert ("sparse measured" in c.reason) and (f"{speedup:.2f}x" in c.reason)


def test_modes_and_missing_pieces():
  meas = _fake(0.1)
  c = policy_lib.choose(
    sparse.MatmulPolicy(mode="sparse", measure=meas, cache_file=""),
    k=64,
    n=32,
    t=8,
    dtype="bfloat16",
    compressed=True,
    has_dense=True,
  )
  assert c.sparse and "mode 'sparse'" in c.reason
  c = policy_lib.choose(
    sparse.MatmulPolicy(mode="dense"),
    k=64,
    n=32,
    t=8,
    dtype="bfloat16",
    compressed=True,
    has_dense=True,
  )
  assert not c.sparse
  with pytest.raises(ValueError, match="keep_dense=False"):
    policy_lib.choose(
      sparse.MatmulPolicy(mode="dense"),
      k=64,
      n=32,
      t=8,
      dtype="bfloat16",
      compressed=True,
      has_dense=False,
    )
  c = policy_lib.choose(None, k=64, n=32, t=8, dtype="bfloat16", compressed=False, has_dense=True)
  assert not c.sparse and "unavailable" in c.reason
  c = policy_lib.choose(
    sparse.MatmulPolicy(measure=meas, cache_file=""),
    k=64,
    n=32,
    t=8,
    dtype="bfloat16",
    compressed=True,
    has_dense=False,
  )
  assert c.sparse and "keep_dense=False" in c.reason
  with pytest.raises(ValueError, match="mode"):
    sparse.MatmulPolicy(mode="fast")
  with pytest.raises(ValueError, match="min_speedup"):
    sparse.MatmulPolicy(min_speedup=0)


def test_measurements_are_cached_in_a_file(tmp_path):
  path = str(tmp_path / "timings.json")
  calls = []
  pol = sparse.MatmulPolicy(measure=_fake(2.0, calls), cache_file=path)
  for _ in range(3):
    assert policy_lib.choose(
      pol, k=128, n=64, t=4096, dtype="bfloat16", compressed=True, has_dense=True
    ).sparse
  assert len(calls) == 1 and os.path.exists(path)
  # A fresh cache object (another process) reads the file: no new measurement.
  policy_lib._CACHES.clear()
  calls2 = []
  pol2 = sparse.MatmulPolicy(measure=_fake(0.5, calls2), cache_file=path)
  c = policy_lib.choose(
    pol2, k=128, n=64, t=4096, dtype="bfloat16", compressed=True, has_dense=True
  )
  assert c.sparse and calls2 == []
  # Another shape is measured once.
  policy_lib.choose(pol2, k=128, n=64, t=16, dtype="bfloat16", compressed=True, has_dense=True)
  assert calls2 == [(128, 64, 16, "bfloat16")]


def test_measure_runs_outside_an_enclosing_jit():
  seen = []

  def measure(k, n, t, dtype):
    a = jnp.ones((4,)) * 2  # would be a tracer if it ran inside the jit trace
    seen.append(_tree.is_tracer(a))
    return 2e-3, 1e-3

  pol = sparse.MatmulPolicy(measure=measure, cache_file="")

  @jax.jit
  def f(x):
    c = policy_lib.choose(
      pol, k=16, n=16, t=x.shape[0], dtype="bfloat16", compressed=True, has_dense=True
    )
    return x * (2.0 if c.sparse else 1.0)

  assert float(f(jnp.ones((3,)))[0]) == 2.0
  assert seen == [False]


def test_default_measurement_has_its_own_cache_entries(tmp_path, monkeypatch):
  # An entry of the former host-timed method (the key without a method) is not
  # read as a device time: the default measurement runs and stores its own key.
  path = str(tmp_path / "timings.json")
  key_args = (128, 64, 256, "bfloat16", 0)
  old = policy_lib.timing_key(*key_args)
  new = policy_lib.timing_key(*key_args, method=policy_lib.DEVICE_METHOD)
  assert new != old and new.startswith(old)
  with open(path, "w") as f:
    json.dump({old: [1e-3, 2e-3]}, f)  # host timing said: sparse 0.5x
  calls = []
  monkeypatch.setattr(policy_lib, "measure_gpu", _fake(1.4, calls))
  policy_lib._CACHES.clear()
  pol = sparse.MatmulPolicy(cache_file=path)
  c = policy_lib.choose(pol, k=128, n=64, t=256, dtype="bfloat16", compressed=True, has_dense=True)
  assert c.sparse and calls == [(128, 64, 256, "bfloat16")]
  with open(path) as f:
    stored = json.load(f)
  assert stored[old] == [1e-3, 2e-3] and stored[new] == pytest.approx([1.4e-3, 1e-3])
  # An injected measure keeps the former keys.
  policy_lib._CACHES.clear()
  c = policy_lib.choose(
    sparse.MatmulPolicy(measure=_fake(9.0), cache_file=path),
    k=128,
    n=64,
    t=256,
    dtype="bfloat16",
    compressed=True,
    has_dense=True,
  )
  assert not c.sparse and c.speedup == pytest.approx(0.5)


def _counting_matmul(counter):
  """``x @ w`` through a host callback that counts its executions (opaque to XLA, pure)."""

  def host(x, w):
    counter.append(1)
    return np.asarray(x, np.float32) @ np.asarray(w, np.float32)

  def fn(x, w):
    out = jax.ShapeDtypeStruct((x.shape[0], w.shape[1]), jnp.float32)
    return jax.pure_callback(host, out, x, w)

  return fn


@pytest.mark.parametrize("calls", [1, 2, policy_lib.UNROLL, 2 * policy_lib.UNROLL + 3])
def test_chained_program_makes_every_call(calls):
  # A side-effect-free opaque call, like the sparse kernel's FFI call: XLA may
  # hoist, merge or drop it unless every call depends on the one before.
  counter = []
  fn = _counting_matmul(counter)
  x = np.arange(12, dtype=np.float32).reshape(3, 4)
  w = np.arange(8, dtype=np.float32).reshape(4, 2) / 7
  prog = policy_lib.chained(fn, calls)
  y = jax.block_until_ready(prog(x, w))
  assert len(counter) == calls
  # The chain: each call's x has x[0, 0] = tanh(previous y[0, 0]).
  xi = x.copy()
  for _ in range(calls):
    ref = xi @ w
    xi[0, 0] = np.tanh(ref[0, 0])
  np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5)
  counter.clear()
  jax.block_until_ready(prog(x, w))
  assert len(counter) == calls  # every execution, not only the first
  with pytest.raises(ValueError, match="calls"):
    policy_lib.chained(fn, 0)


@pytest.mark.parametrize("copies", [2, 4])
def test_chained_program_rotates_over_weight_copies(copies):
  counter = []
  fn = _counting_matmul(counter)
  calls = 2 * policy_lib.UNROLL + 3
  x = np.arange(12, dtype=np.float32).reshape(3, 4) / 11
  ws = tuple(np.arange(8, dtype=np.float32).reshape(4, 2) / (7 + c) for c in range(copies))
  y = jax.block_until_ready(policy_lib.chained(fn, calls)(x, ws))
  assert len(counter) == calls
  xi = x.astype(np.float64)
  for i in range(calls):  # call i reads copy i % copies (copies divide the unrolled 8)
    ref = xi @ ws[i % copies]
    xi[0, 0] = np.tanh(ref[0, 0])
  np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5)
  with pytest.raises(ValueError, match="divisor of 8"):
    policy_lib.chained(fn, 3)(x, ws[:1] * 3)


def test_weight_copies_span_the_stream_bytes():
  mib = 1 << 20
  got = {b: policy_lib.weight_copies(b * mib) for b in (1, 18, 32, 64, 112, 128, 255, 256, 512)}
  assert got == {1: 8, 18: 8, 32: 8, 64: 4, 112: 4, 128: 2, 255: 2, 256: 1, 512: 1}
  for b, c in got.items():  # the fewest power-of-two copies spanning 256 MiB, 8 at most
    assert c == 8 or c * b * mib >= policy_lib.STREAM_BYTES > c // 2 * b * mib
  with pytest.raises(ValueError, match="nbytes"):
    policy_lib.weight_copies(0)


def test_measurement_copies_are_buffers_of_their_own():
  w = {"a": jnp.arange(6.0).reshape(2, 3), "b": None}
  c = policy_lib._copies(w, 4)
  assert len(c) == 4 and c[0] is w
  ptrs = {x["a"].unsafe_buffer_pointer() for x in c}
  assert len(ptrs) == 4 and all(x["b"] is None for x in c)
  for x in c:
    np.testing.assert_array_equal(np.asarray(x["a"]), np.arange(6.0).reshape(2, 3))


def test_device_seconds_measures_each_function():
  x = jnp.ones((64, 128), jnp.float32)
  w = jnp.ones((128, 96), jnp.float32)
  fns = [(lambda x, w: x @ w, (x, w)), (lambda x, w: jnp.tanh(x @ w), (x, (w, w + 1)))]
  secs = policy_lib.device_seconds(fns, rounds=2, target_s=2e-4, max_calls=16)
  assert len(secs) == 2 and all(np.isfinite(s) and s > 0 for s in secs)


# ----------------------------------------------------------------------------
# CPU fallback.


@needs_cpu
def test_status_and_dense_fallback(caplog):
  ok, why = sparse.status()
  assert not ok and "no CUDA GPU" in why and "dense path" in why
  _runtime.note_dense_fallback.cache_clear()
  w = testing.nm_weight()
  with caplog.at_level(logging.WARNING, logger="jasp.sparse"):
    sw = sparse.compress(w)
    sparse.compress(w)
  assert [r.getMessage() for r in caplog.records].count(why) == 1  # once per process
  assert not sw.is_compressed and sw.dense is not None
  x = jax.random.normal(jax.random.key(1), (3, 5, 64), jnp.bfloat16)
  y = jax.jit(sparse.matmul)(x, sw)
  ref = jnp.dot(x, w)
  assert y.shape == (3, 5, 32) and y.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(ref, np.float32))
  b = jnp.arange(32, dtype=jnp.bfloat16)
  np.testing.assert_allclose(
    np.asarray(sparse.matmul(x, sw, b), np.float32),
    np.asarray(ref + b, np.float32),
    rtol=1e-2,
    atol=1e-2,
  )
  # vmap over activations.
  yv = jax.vmap(lambda xi: sparse.matmul(xi, sw))(x)
  np.testing.assert_array_equal(np.asarray(yv, np.float32), np.asarray(y, np.float32))


@needs_cpu
def test_compressed_weight_without_dense_on_cpu_says_why():
  sw = sparse.SparseWeight(
    jnp.zeros((64,), jnp.uint8),
    None,
    in_shape=(64,),
    out_shape=(32,),
    dtype=jnp.bfloat16,
    fmt="cusparselt1000:sm90:row",
  )
  with pytest.raises(sparse.SparseUnavailable, match="kept no dense weight"):
    sparse.matmul(jnp.ones((2, 64), jnp.bfloat16), sw)
  with pytest.raises(sparse.SparseUnavailable, match="no CUDA GPU"):
    sparse.sparse_matmul(jnp.ones((2, 64), jnp.bfloat16), sw)


# ----------------------------------------------------------------------------
# Errors.


def test_compress_rejects_dense_weights_naming_the_leaf():
  w = jax.random.normal(jax.random.key(0), (64, 32), jnp.bfloat16)
  with pytest.raises(
    ValueError,
    match=r"'params/Dense_0/kernel' of shape \(64, 32\) is not 2:4.*"
    r"512 of 512 groups",
  ):
    sparse.compress(w, path="params/Dense_0/kernel")


def test_compress_dtype_and_shape_errors():
  w32 = testing.nm_weight(dtype=jnp.float32)
  with pytest.raises(ValueError, match=r"dtype=jnp.bfloat16"):
    sparse.compress(w32)
  assert sparse.compress(w32, dtype=jnp.float16).dtype == "float16"
  with pytest.raises(ValueError, match="in_axes"):
    sparse.compress(testing.nm_weight(), in_axes=2)
  with pytest.raises(ValueError, match="not a multiple of 4"):
    sparse.compress(jnp.zeros((6, 16), jnp.bfloat16))
  with pytest.raises(ValueError, match="a_order"):
    sparse.compress(testing.nm_weight(), a_order=3)


def test_matmul_shape_errors():
  sw = sparse.compress(testing.nm_weight())
  with pytest.raises(ValueError, match="reduction size K=64"):
    sparse.matmul(jnp.ones((2, 32), jnp.bfloat16), sw)
  with pytest.raises(ValueError, match="32 outputs"):
    sparse.matmul(jnp.ones((2, 64), jnp.bfloat16), sw, jnp.ones((31,)))


@needs_cpu
def test_sparse_path_needs_a_compressed_weight():
  sw = sparse.compress(testing.nm_weight())  # not compressed without a GPU
  with pytest.raises(ValueError, match="needs a compressed weight"):
    sparse.sparse_matmul(jnp.ones((2, 64), jnp.bfloat16), sw)


def test_size_rule():
  assert sparse.SparseWeight  # re-exported
  from jasp.sparse import _compress

  assert _compress.sparse_shape_ok(4096, 11008) == (True, "")
  ok, why = _compress.sparse_shape_ok(64, 10)
  assert not ok and "multiples of 16" in why


# ----------------------------------------------------------------------------
# Pytree handling.


def test_sparse_weight_is_a_pytree_with_named_children():
  sw = sparse.compress(testing.nm_weight().reshape(4, 16, 32), in_axes=2)
  assert sw.shape == (4, 16, 32) and (sw.k, sw.n) == (64, 32)
  flat, treedef = jax.tree_util.tree_flatten_with_path({"kernel": sw})
  names = [jax.tree_util.keystr(p) for p, _ in flat]
  assert names == ["['kernel'].dense"] or names == ["['kernel'].compressed", "['kernel'].dense"]
  back = jax.tree_util.tree_unflatten(treedef, [x for _, x in flat])["kernel"]
  assert isinstance(back, sparse.SparseWeight)
  assert (back.in_shape, back.out_shape, back.dtype, back.fmt) == (
    sw.in_shape,
    sw.out_shape,
    sw.dtype,
    sw.fmt,
  )
  # Through jit as an argument and as a result.
  out = jax.jit(lambda s: s)(sw)
  assert isinstance(out, sparse.SparseWeight) and out.shape == sw.shape
  assert "SparseWeight(kernel (4, 16, 32)" in repr(sw)


def test_sparse_weight_checkpoints(tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint")
  params = {"Dense_0": {"kernel": sparse.compress(testing.nm_weight()), "bias": jnp.ones((32,))}}
  path = tmp_path / "ckpt"
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(path, params)
    ckptr.wait_until_finished()
    abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    restored = ckptr.restore(path, abstract)
  sw = restored["Dense_0"]["kernel"]
  assert isinstance(sw, sparse.SparseWeight)
  np.testing.assert_array_equal(
    np.asarray(sw.dense, np.float32), np.asarray(params["Dense_0"]["kernel"].dense, np.float32)
  )


# ----------------------------------------------------------------------------
# Build messages (no compiler run here).


def test_build_names_what_is_missing(monkeypatch):
  monkeypatch.setattr(build, "_candidates", lambda filename, sub: [])
  with pytest.raises(build.BuildError) as e:
    build.find_toolchain()
  msg = str(e.value)
  for piece in ("cusparseLt.h", "nvidia-cusparselt-cu13", "libcusparseLt.so.0", "driver_types.h"):
    assert piece in msg


def test_build_prefers_an_explicit_cusparselt_home(monkeypatch, tmp_path):
  for sub in ("include", "lib"):
    (tmp_path / sub).mkdir()
  (tmp_path / "include" / "cusparseLt.h").write_text("")
  (tmp_path / "lib" / "libcusparseLt.so.0").write_text("")
  monkeypatch.setenv("CUSPARSELT_HOME", str(tmp_path))
  # Before any wheel's copy (the nvidia wheels may be installed here too).
  assert build._candidates("cusparseLt.h", "include")[0] == str(
    tmp_path / "include" / "cusparseLt.h"
  )
  assert build._candidates("libcusparseLt.so.0", "lib")[0] == str(
    tmp_path / "lib" / "libcusparseLt.so.0"
  )


def test_loaded_cusparselt_must_match_the_header():
  # Same major.minor: accepted (patch levels may differ); no version macros: unchecked.
  _runtime.check_versions(800, 802, "/x/libcusparseLt.so.0")
  _runtime.check_versions(-1, 1000, "")
  with pytest.raises(_runtime.SparseUnavailable) as e:
    _runtime.check_versions(1000, 800, "/torch/nvidia/cusparselt/lib/libcusparseLt.so.0")
  msg = str(e.value)
  for piece in (
    "0.10.0",
    "0.8.0",
    "/torch/nvidia/cusparselt/lib/libcusparseLt.so.0",
    "CUSPARSELT_HOME",
    "dense path",
  ):
    assert piece in msg


def test_build_cache_dir_and_stub(monkeypatch, tmp_path):
  monkeypatch.setenv("JASP_CACHE_DIR", str(tmp_path))
  assert build.cache_dir() == str(tmp_path)
  hdir = tmp_path / "inc"
  hdir.mkdir()
  (hdir / "cusparseLt.h").write_text("")
  tc = build.Toolchain(
    "c++", (str(hdir),), str(tmp_path), "libcusparseLt.so.0", str(hdir / "cusparseLt.h")
  )
  assert build._needs_stub(tc)
  (hdir / "cusparseLt_cusparse_stub.h").write_text("")
  assert not build._needs_stub(tc)
  assert os.path.exists(build.SOURCE) and build.SOURCE.endswith("_ffi.cc")


# ----------------------------------------------------------------------------
# Batching: vmap folds into the token axis (the kernel sees one 2-D call).


def test_batched_call_folds_vmap_into_tokens():
  from jasp.sparse import _matmul

  k, n = 64, 32
  w = testing.nm_weight(k, n, dtype=jnp.float32)
  b = jnp.arange(n, dtype=jnp.float32)
  seen = []

  def fn2d(x2, c, bias):
    seen.append((x2.shape, c.shape))
    return x2 @ c

  meta = (k, n, "float32", 0, False, True)
  f = lambda x: _matmul.batched_call(fn2d, meta, x, w, b, True)
  x = jax.random.normal(jax.random.key(2), (3, 5, 7, k))
  ref = x @ w + b
  np.testing.assert_allclose(f(x), ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(jax.jit(jax.vmap(f))(x), ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(jax.vmap(jax.vmap(f))(x), ref, rtol=1e-5, atol=1e-5)
  # Every kernel call saw a 2-D (t, K) activation with t a multiple of 16 and the
  # unbatched weight.
  assert seen and all(
    len(xs) == 2 and xs[0] % 16 == 0 and xs[1] == k and cs == (k, n) for xs, cs in seen
  ), seen
  assert ((112, k), (k, n)) in seen  # 3*5*7 = 105 tokens, padded to 112
  g = lambda c: _matmul.batched_call(fn2d, meta, x[0], c, b, True)
  with pytest.raises(ValueError, match="vmap over the compressed weight"):
    jax.vmap(g)(jnp.stack([w, w]))


@needs_cpu
def test_layouts_on_cpu_keep_the_dense_path():
  w = testing.nm_weight()
  for order in (sparse.A_ROW, sparse.A_COL):
    sw = sparse.compress(w, a_order=order)
    assert not sw.is_compressed
    np.testing.assert_array_equal(np.asarray(sw.dense, np.float32), np.asarray(w, np.float32))


def test_unknown_layout_is_refused():
  with pytest.raises(ValueError, match="a_order must be A_ROW"):
    sparse.compress(testing.nm_weight(), a_order=2)


def test_fp16_version_gate(monkeypatch):
  from jasp.sparse import _compress

  monkeypatch.delenv("JASP_SPARSE_EXPERIMENTAL", raising=False)
  assert _compress.fp16_enabled(800) and _compress.fp16_enabled(803, sparse.A_ROW)
  assert not _compress.fp16_enabled(800, sparse.A_COL)
  for order in (None, sparse.A_ROW, sparse.A_COL):
    assert _compress.fp16_enabled(1000, order) and _compress.fp16_enabled(1002, order)
    for version in (701, 900, 1100, 10800):  # unverified minors; major 1
      assert not _compress.fp16_enabled(version, order)
  monkeypatch.setenv("JASP_SPARSE_EXPERIMENTAL", "1")
  assert _compress.fp16_enabled(1100) and _compress.fp16_enabled(800, sparse.A_COL)
  msg = _compress.FP16_UNVERIFIED.format(version="0.11.0", layout="A_ROW")
  assert "0.11.0" in msg and "JASP_SPARSE_EXPERIMENTAL=1" in msg


# ----------------------------------------------------------------------------
# The compact (decode-time) format: the policy's three-way choice, the path.


def _times(dense_s, path_s):
  def measure(k, n, t, dtype):
    return dense_s, path_s

  return measure


@pytest.mark.parametrize(
  "sparse_x,compact_x,path",
  [(1.3, 1.6, "compact"), (1.6, 1.3, "sparse"), (0.7, 1.02, "dense"), (0.5, 1.2, "compact")],
)
def test_auto_picks_the_fastest_of_three(sparse_x, compact_x, path):
  policy_lib._CACHES.clear()  # the in-memory timings of other tests' injected tables
  pol = sparse.MatmulPolicy(
    measure=_fake(sparse_x), measure_compact=_fake(compact_x), cache_file=""
  )
  c = policy_lib.choose(
    pol, k=64, n=32, t=16, dtype="bfloat16", compressed=True, has_dense=True, compact=True
  )
  assert c.path == path and c.sparse == (path == "sparse")
  assert c.speedup == pytest.approx(sparse_x) and c.compact_speedup == pytest.approx(compact_x)
  assert f"compact measured {compact_x:.2f}x dense" in c.reason
  assert f"sparse measured {sparse_x:.2f}x dense" in c.reason


def test_compact_without_cusparselt_and_without_dense():
  policy_lib._CACHES.clear()
  kw = dict(k=64, n=32, t=8, dtype="bfloat16", compressed=False, compact=True)
  fast = sparse.MatmulPolicy(measure_compact=_fake(1.5), cache_file="")
  assert policy_lib.choose(fast, has_dense=True, **kw).path == "compact"
  policy_lib._CACHES.clear()
  slow = sparse.MatmulPolicy(measure_compact=_fake(0.9), cache_file="")
  c = policy_lib.choose(slow, has_dense=True, **kw)
  assert c.path == "dense" and "compact measured 0.90x dense (< 1.05)" in c.reason
  # Without the dense weight: the only form kept, unmeasured; with both sparse forms, the faster.
  c = policy_lib.choose(slow, has_dense=False, **kw)
  assert c.path == "compact" and c.compact_s is None
  policy_lib._CACHES.clear()
  both = sparse.MatmulPolicy(
    measure=_times(1e-3, 4e-4), measure_compact=_times(1e-3, 3e-4), cache_file=""
  )
  c = policy_lib.choose(both, has_dense=False, **{**kw, "compressed": True})
  assert c.path == "compact" and "no dense weight kept" in c.reason
  # mode="sparse": cuSPARSELt where it exists, else the compact kernel.
  mode = sparse.MatmulPolicy(mode="sparse")
  assert policy_lib.choose(mode, has_dense=True, **kw).path == "compact"
  assert policy_lib.choose(mode, has_dense=True, **{**kw, "compressed": True}).path == "sparse"
  with pytest.raises(ValueError, match="path"):
    policy_lib.Choice(True, "contradiction", path="compact")


def _pruned_bf16(k, n, seed):
  w = testing.normal((k, n), seed)
  keep = np.argsort(np.argsort(-np.abs(np.asarray(w)).reshape(k // 4, 4, n), axis=1), axis=1) < 2
  return (w * keep.reshape(k, n)).astype(jnp.bfloat16)


def test_compress_keeps_the_compact_format():
  w = _pruned_bf16(64, 96, 0)
  sw = sparse.compress(w, compact=True)
  assert sw.is_compact and sw.dense is not None
  from jasp.kernels import decode24

  np.testing.assert_array_equal(np.asarray(decode24.decompress_24(sw.compact)), np.asarray(w))
  leaves, treedef = jax.tree_util.tree_flatten(sw)
  assert len(leaves) == 3  # dense, compact values, compact codes (no cuSPARSELt bytes here)
  back = jax.tree_util.tree_unflatten(treedef, leaves)
  assert back.is_compact and back.shape == sw.shape
  assert not sparse.compress(w).is_compact  # only when asked


def test_compact_format_needs_a_kernel_sized_output(caplog):
  w = _pruned_bf16(64, 40, 1)  # N = 40: not a multiple of 32
  with caplog.at_level(logging.WARNING, logger="jasp.sparse"):
    sw = sparse.compress(w, compact=True, path="head")
  assert not sw.is_compact and sw.dense is not None
  assert any("'head' no compact (decode) format: N=40" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("lead", [(3,), (2, 5)])
def test_matmul_takes_the_compact_path(monkeypatch, lead):
  """The compact kernel (interpreted here) as the policy's choice, against a float64 product."""
  from jasp.kernels import decode24

  monkeypatch.setattr(decode24, "native", lambda layout="kn": True)  # as on a GPU
  w = _pruned_bf16(128, 64, 2)
  b = testing.normal((64,), 3).astype(jnp.bfloat16)
  x = testing.normal((*lead, 128), 4).astype(jnp.bfloat16)
  sw = sparse.compress(w, compact=True)
  policy_lib._CACHES.clear()
  pol = sparse.MatmulPolicy(measure_compact=_fake(1.7), cache_file="")
  calls = []
  real = decode24.matmul_24
  monkeypatch.setattr(decode24, "matmul_24", lambda *a, **k: calls.append(1) or real(*a, **k))
  y = jax.jit(lambda x, sw: sparse.matmul(x, sw, b, policy=pol))(x, sw)
  assert calls and y.shape == (*lead, 64) and y.dtype == jnp.bfloat16
  want = np.asarray(x, np.float64) @ np.asarray(w, np.float64) + np.asarray(b, np.float64)
  scale = np.abs(np.asarray(x, np.float64)) @ np.abs(np.asarray(w, np.float64))
  # bf16 output rounding (2^-8 relative) of a float32-accumulated product, plus the bias add.
  assert np.all(
    np.abs(np.asarray(y, np.float64) - want) <= 2**-7 * (np.abs(want) + 1) + 1e-5 * scale
  )


def test_the_compact_path_needs_the_kernel_of_the_weights_layout(monkeypatch):
  """As on a Hopper GPU whose JAX has Mosaic GPU but not Triton: an "nk" weight runs
  compact, a "kn" one falls back to dense."""
  from jasp.kernels import decode24

  monkeypatch.setattr(decode24, "native", lambda layout="kn": layout == "nk")
  w = _pruned_bf16(256, 64, 2)
  x = testing.normal((3, 256), 4).astype(jnp.bfloat16)
  want = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
  pol = sparse.MatmulPolicy(measure_compact=_fake(1.7), cache_file="")
  real, calls = decode24.matmul_24, []
  monkeypatch.setattr(decode24, "matmul_24", lambda *a, **k: calls.append(1) or real(*a, **k))
  for layout, runs_compact in (("nk", True), ("kn", False)):
    compact = decode24.compress_24(w, layout=layout)
    sw = sparse.SparseWeight(
      None, w, in_shape=(256,), out_shape=(64,), dtype="bfloat16", compact=compact
    )
    policy_lib._CACHES.clear()
    calls.clear()
    y = sparse.matmul(x, sw, policy=pol)
    assert bool(calls) == runs_compact, layout
    np.testing.assert_allclose(np.asarray(y, np.float64), want, rtol=2**-7, atol=0.05)


def test_a_weight_kept_only_compact_runs_interpreted_off_gpu(caplog):
  from jasp.kernels import decode24

  w = _pruned_bf16(64, 32, 5)
  sw = sparse.SparseWeight(
    None, None, in_shape=(64,), out_shape=(32,), dtype="bfloat16", compact=decode24.compress_24(w)
  )
  x = testing.normal((2, 64), 6).astype(jnp.bfloat16)
  with caplog.at_level(logging.WARNING, logger="jasp.sparse"):
    y = sparse.matmul(x, sw)
  want = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
  np.testing.assert_allclose(np.asarray(y, np.float64), want, rtol=2**-7, atol=1e-2)
  with pytest.raises(ValueError, match="no compact"):
    sparse.compact_matmul(x, sparse.compress(w))


def test_a_weight_kept_in_the_nk_layout_runs_its_mosaic_kernel_interpreted(caplog):
  """The compact form in the Mosaic GPU kernel's layout (Hopper's default) goes through matmul."""
  from jasp.kernels import decode24

  w = _pruned_bf16(256, 64, 7)
  c = decode24.compress_24(w, layout="nk")
  sw = sparse.SparseWeight(
    None, None, in_shape=(256,), out_shape=(64,), dtype="bfloat16", compact=c
  )
  x = testing.normal((3, 256), 8).astype(jnp.bfloat16)
  with caplog.at_level(logging.WARNING, logger="jasp.sparse"):
    y = sparse.matmul(x, sw)
  want = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
  np.testing.assert_allclose(np.asarray(y, np.float64), want, rtol=2**-7, atol=1e-2)
