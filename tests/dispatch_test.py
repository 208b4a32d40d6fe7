"""Choosing XLA or Pallas: arguments, the context manager, the environment, auto."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import testing

import jasp
from jasp import _dispatch
from jasp.kernels import mosaic
from jasp.kernels import nm2d_pallas
from jasp.kernels import nm_pallas


@pytest.fixture
def calls(monkeypatch):
  """Counts the kernel calls (the kernel still runs, in interpret mode)."""
  counter = {"mask": 0, "prune": 0}
  mask_fn, prune_fn = nm_pallas.nm_mask_pallas, nm_pallas.nm_prune_pallas

  def mask(*a, **k):
    counter["mask"] += 1
    return mask_fn(*a, **k)

  def prune(*a, **k):
    counter["prune"] += 1
    return prune_fn(*a, **k)

  mask2d_fn = nm2d_pallas.nm_mask_2d_pallas
  counter["mask2d"] = 0

  def mask2d(*a, **k):
    counter["mask2d"] += 1
    return mask2d_fn(*a, **k)

  monkeypatch.setattr(nm_pallas, "nm_mask_pallas", mask)
  monkeypatch.setattr(nm_pallas, "nm_prune_pallas", prune)
  monkeypatch.setattr(nm2d_pallas, "nm_mask_2d_pallas", mask2d)
  monkeypatch.delenv("JASP_MASK_IMPL", raising=False)
  return counter


def test_cpu_default_is_xla(calls):
  w = jnp.ones((64, 8))
  assert jasp.masks.nm_mask(w).shape == w.shape
  assert calls["mask"] == 0
  assert _dispatch.get_mask_impl() == "auto"
  assert not _dispatch.use_pallas(w, 2, 4, 0)


def test_context_forces_pallas_and_restores(calls):
  rng, seed = testing.fresh_rng()
  w = jnp.asarray(rng.standard_normal((16, 12)), jnp.float32)
  want = np.asarray(jasp.masks.nm_mask(w, impl="xla"))
  with _dispatch.mask_impl("pallas"):
    assert _dispatch.get_mask_impl() == "pallas"
    got = np.asarray(jasp.masks.nm_mask(w))
    with _dispatch.mask_impl("xla"):  # nesting: the innermost wins
      np.testing.assert_array_equal(np.asarray(jasp.masks.nm_mask(w)), want)
    assert _dispatch.get_mask_impl() == "pallas"
  assert _dispatch.get_mask_impl() == "auto"
  np.testing.assert_array_equal(got, want, err_msg=f"seed={seed}")
  assert calls["mask"] == 1


def test_argument_beats_context(calls):
  w = jnp.ones((16, 4))
  with _dispatch.mask_impl("pallas"):
    jasp.masks.nm_mask(w, impl="xla")
  assert calls["mask"] == 0
  with _dispatch.mask_impl("xla"):
    jasp.masks.nm_mask(w, impl="pallas")
  assert calls["mask"] == 1


def test_environment_variable(calls, monkeypatch):
  monkeypatch.setenv("JASP_MASK_IMPL", "pallas")
  jasp.masks.nm_mask(jnp.ones((16, 4)))
  assert calls["mask"] == 1
  with _dispatch.mask_impl("xla"):  # a context beats the environment
    jasp.masks.nm_mask(jnp.ones((16, 4)))
  assert calls["mask"] == 1
  monkeypatch.setenv("JASP_MASK_IMPL", "fast")
  with pytest.raises(ValueError, match="JASP_MASK_IMPL"):
    jasp.masks.nm_mask(jnp.ones((16, 4)))


def test_unsupported_dtypes(calls):
  w = jnp.arange(32, dtype=jnp.int32).reshape(8, 4)
  with _dispatch.mask_impl("pallas"):  # a preference: XLA where the kernel can't
    mask = jasp.masks.nm_mask(w)
  assert calls["mask"] == 0
  np.testing.assert_array_equal(np.asarray(mask), np.asarray(jasp.masks.nm_mask(w, impl="xla")))
  with pytest.raises(ValueError, match="impl='xla'"):
    jasp.masks.nm_mask(w, impl="pallas")  # an explicit request that can't be met
  with pytest.raises(ValueError, match="impl='xla'"):
    jasp.masks.nm_mask(jnp.ones((16, 4)), 2, 16, axis=0, impl="pallas")
  with pytest.raises(ValueError, match="one of"):
    with _dispatch.mask_impl("triton"):
      pass


def test_decision_is_static_under_jit(calls):
  w = jnp.ones((16, 8), jnp.bfloat16)
  with _dispatch.mask_impl("pallas"):
    f = jax.jit(lambda x: jasp.masks.nm_mask(x))
    f(w)
  assert calls["mask"] == 1
  f(w)  # cached executable: the choice made at trace time stays
  assert calls["mask"] == 1


def test_auto_rules(monkeypatch):
  monkeypatch.delenv("JASP_MASK_IMPL", raising=False)
  monkeypatch.setattr(_dispatch, "_backend", lambda w: "gpu")
  big = jax.ShapeDtypeStruct((4096, 4096), jnp.bfloat16)
  assert _dispatch.use_pallas(big, 2, 4, 0)
  assert _dispatch.use_pallas(big, 2, 4, -1)
  assert _dispatch.use_pallas(jax.ShapeDtypeStruct((3, 3, 256, 512), jnp.float16), 2, 4, -2)
  assert not _dispatch.use_pallas(jax.ShapeDtypeStruct((64, 64), jnp.float32), 2, 4, 0)
  assert not _dispatch.use_pallas(jax.ShapeDtypeStruct((4096, 4096), jnp.int8), 2, 4, 0)
  assert not _dispatch.use_pallas(big, 2, 16, 0)
  # Narrow trailing axes (e.g. a conv with 10 outputs): XLA.
  assert not _dispatch.use_pallas(jax.ShapeDtypeStruct((3, 3, 65536, 10), jnp.float32), 2, 4, -2)
  with _dispatch.mask_impl("xla"):
    assert not _dispatch.use_pallas(big, 2, 4, 0)
  monkeypatch.setattr(_dispatch, "_single_device", lambda w: False)  # sharded: no gather
  assert not _dispatch.use_pallas(big, 2, 4, 0)


def test_without_a_kernel_backend_masks_use_xla(calls, monkeypatch):
  monkeypatch.setattr(nm_pallas, "backend_available", lambda: False)
  monkeypatch.setattr(mosaic, "available", lambda: False)
  monkeypatch.setattr(_dispatch, "_backend", lambda w: "gpu")
  big = jax.ShapeDtypeStruct((4096, 4096), jnp.bfloat16)
  assert not _dispatch.use_pallas(big, 2, 4, 0)  # auto
  w = jnp.asarray(np.random.default_rng(0).normal(size=(64, 32)), jnp.float32)
  with jasp.mask_impl("pallas"):  # a preference: XLA, no error
    assert not _dispatch.use_pallas(w, 2, 4, 0)
    np.testing.assert_array_equal(jasp.nm_mask(w), jasp.nm_mask(w, impl="xla"))
    got = jasp.nm_mask_2d(w, 2, 4, method="best")
  assert calls == {"mask": 0, "prune": 0, "mask2d": 0}
  with jasp.mask_impl("xla"):
    np.testing.assert_array_equal(got, jasp.nm_mask_2d(w, 2, 4, method="best"))
  with pytest.raises(RuntimeError, match="no Pallas kernel applies.*no Pallas Triton backend"):
    jasp.nm_mask(w, impl="pallas")


def test_triton_backend_is_found_in_this_jax():
  # Whether the kernels (and their interpret-mode tests) can run at all here.
  assert nm_pallas.backend_available()


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_nm_prune(impl):
  rng, seed = testing.fresh_rng()
  w = jnp.asarray(rng.standard_normal((24, 12)), jnp.bfloat16)
  pruned, mask = jasp.masks.nm_prune(w, 2, 4, 0, impl=impl)
  want = np.asarray(jasp.masks.nm_mask(w, impl="xla"))
  np.testing.assert_array_equal(np.asarray(mask), want, err_msg=f"seed={seed}")
  np.testing.assert_array_equal(
    np.asarray(pruned, np.float32), np.where(want, np.asarray(w, np.float32), 0)
  )
  assert pruned.dtype == w.dtype and bool(jasp.is_nm(pruned, 2, 4, 0))
  only = jax.jit(lambda x: jasp.masks.nm_prune(x, 2, 4, 0, impl=impl, with_mask=False))(w)
  np.testing.assert_array_equal(np.asarray(only, np.float32), np.asarray(pruned, np.float32))
  g = jax.grad(lambda x: jasp.masks.nm_prune(x, impl=impl, with_mask=False).sum())(
    w.astype(jnp.float32)
  )
  np.testing.assert_array_equal(np.asarray(g), want.astype(np.float32))


def test_nm_prune_integers_and_errors():
  w = jnp.arange(-8, 8, dtype=jnp.int32).reshape(4, 4)
  pruned, mask = jasp.masks.nm_prune(w)
  assert pruned.dtype == jnp.int32 and int((pruned != 0).sum()) <= 8
  with pytest.raises(ValueError, match="scalar"):
    jasp.masks.nm_prune(jnp.float32(1.0))
  with pytest.raises(ValueError, match="multiple"):
    jasp.masks.nm_prune(jnp.ones((6, 4)))


@pytest.mark.slow
def test_nm_mask_2d_best_routes_to_kernel(calls, monkeypatch):
  rng, seed = testing.fresh_rng()
  w = jnp.asarray(rng.standard_normal((16, 24)), jnp.bfloat16)
  want = np.asarray(jasp.nm_mask_2d(w))  # CPU, auto: XLA
  assert calls["mask2d"] == 0
  with _dispatch.mask_impl("pallas"):
    np.testing.assert_array_equal(np.asarray(jasp.nm_mask_2d(w)), want, err_msg=f"seed={seed}")
    jasp.nm_mask_2d(w, method="greedy")  # greedy: XLA only
    jasp.nm_mask_2d(jnp.ones((8, 3, 8)), 2, 4, 0, 2)  # layout needs a transpose: XLA
  assert calls["mask2d"] == 1
  monkeypatch.setattr(_dispatch, "_backend", lambda w: "gpu")
  big = jax.ShapeDtypeStruct((1024, 1024), jnp.float32)
  assert _dispatch.pallas_nm_mask_2d(big, 2, 4, 0, 1) is not None
  assert (
    _dispatch.pallas_nm_mask_2d(jax.ShapeDtypeStruct((64, 64), jnp.float32), 2, 4, 0, 1) is None
  )
  with _dispatch.mask_impl("xla"):
    assert _dispatch.pallas_nm_mask_2d(big, 2, 4, 0, 1) is None


def test_prune_follows_the_context_of_each_call(calls):
  # Repeated jasp.prune calls on one tree reuse their program, but each call honours the
  # mask_impl block it runs in, as a preference: an int weight still falls back to XLA.
  params = {"dense": {"kernel": jnp.arange(64.0).reshape(16, 4)}, "ints": jnp.ones((8, 4), int)}
  lay = {"dense/kernel": jasp.Layout((0,), (1,), kind="dot")}
  lay["ints"] = jasp.Layout((0,), (1,), kind="dot")
  want, _ = jasp.prune(params, layouts=lay)
  assert calls["prune"] == 0
  with jasp.mask_impl("pallas"):
    for _ in range(2):
      got, _ = jasp.prune(params, layouts=lay)
      jax.tree.map(np.testing.assert_array_equal, got, want)
  assert calls["prune"] == 1  # the float kernel, traced once for both calls
  jasp.prune(params, layouts=lay)
  assert calls["prune"] == 1
  masks = jasp.compute_masks(params, layouts=lay)
  with jasp.mask_impl("pallas"):
    jax.tree.map(np.testing.assert_array_equal, jasp.compute_masks(params, layouts=lay), masks)
  assert calls["mask"] == 1
