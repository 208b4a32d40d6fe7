"""The transposable Mosaic GPU kernel against the float64 reference and the XLA path.

On CPU the kernel runs in Mosaic GPU interpret mode (exact, slow: small shapes).
The tests marked ``gpu`` compile it on a Hopper GPU.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference as ref
import testing

import jasp
from jasp import _dispatch
from jasp.kernels import nm2d_mosaic
from jasp.kernels import nm2d_pallas
from jasp.kernels import nm_pallas

# (shape, axis, out_axis, n, m): Dense (in, out), PyTorch (out, in), conv HWIO, 1:3.
CASES = [
  ((64, 128), 0, 1, 2, 4),
  ((128, 64), 1, 0, 2, 4),
  ((3, 3, 32, 64), -2, -1, 2, 4),
  ((96, 48), 0, 1, 1, 3),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{testing.param_id(c[0])}-{c[3]}of{c[4]}")
def test_matches_the_reference(case):
  shape, axis, out_axis, n, m = case
  rng, seed = testing.fresh_rng()
  for dtype in (jnp.float32, jnp.bfloat16):
    # Small integers: many equal scores, so the first-best tie rule is exercised.
    w = jnp.asarray(rng.integers(-3, 4, shape), dtype)
    got = np.asarray(nm2d_mosaic.nm_mask_2d_mosaic(w, n, m, axis, out_axis))
    want = ref.nm_mask_2d_best_ref(testing.as_np64(w), n, m, axis, out_axis)
    assert got.dtype == bool and got.shape == w.shape
    np.testing.assert_array_equal(got, want, err_msg=f"seed={seed} {shape} {dtype}")


def test_special_values():
  rng, seed = testing.fresh_rng()
  w = jnp.asarray(
    rng.choice(testing.special_values(jnp.float32, False), size=(64, 128)), jnp.float32
  )
  got = np.asarray(nm2d_mosaic.nm_mask_2d_mosaic(w, 2, 4, 0, 1))
  with jasp.mask_impl("xla"):
    want = np.asarray(jasp.nm_mask_2d(w, 2, 4, 0, 1))
  np.testing.assert_array_equal(got, want, err_msg=f"seed={seed}")


def test_plan_and_support():
  p = nm2d_mosaic.plan_2d((8192, 8192), 4, 0, 1)
  assert p.view == (2048, 4, 2048, 4, 1) and p.group_first and p.block[0] * p.block[1] % 128 == 0
  assert not nm2d_mosaic.plan_2d((1024, 4096), 4, 1, 0).group_first
  assert nm2d_mosaic.plan_2d((8, 3, 8), 4, 0, 2) is None  # an axis between the block axes
  assert nm2d_mosaic.plan_2d((8, 8), 4, 0, 1) is None  # 4 blocks: no 128-block tile
  assert nm2d_mosaic.plan_2d((0, 128), 4, 0, 1) is None  # empty
  assert not nm2d_mosaic.supports_2d((64, 128), jnp.int32, 2, 4, 0, 1)
  assert not nm2d_mosaic.supports_2d((64, 128), jnp.float32, 4, 8, 0, 1)  # too many patterns
  with pytest.raises(ValueError, match="does not support"):
    nm2d_mosaic.nm_mask_2d_mosaic(jnp.ones((8, 3, 8)), 2, 4, 0, 2)


def test_dispatch_uses_it_without_triton(monkeypatch):
  monkeypatch.setattr(nm_pallas, "backend_available", lambda: False)
  calls = []
  real = nm2d_mosaic.nm_mask_2d_mosaic
  monkeypatch.setattr(
    nm2d_mosaic, "nm_mask_2d_mosaic", lambda *a, **k: calls.append(1) or real(*a, **k)
  )
  w = testing.normal((64, 128), seed=4)
  with jasp.mask_impl("xla"):
    want = np.asarray(jasp.nm_mask_2d(w))
  with jasp.mask_impl("pallas"):
    np.testing.assert_array_equal(np.asarray(jasp.nm_mask_2d(w, 2, 4, 0, 1)), want)
  assert calls == [1]
  monkeypatch.setattr(_dispatch, "_backend", lambda w: "gpu")
  monkeypatch.setattr(_dispatch, "_capability", lambda w: 8.0)  # before Hopper: XLA
  big = jax.ShapeDtypeStruct((4096, 4096), jnp.bfloat16)
  assert _dispatch.pallas_nm_mask_2d(big, 2, 4, 0, 1) is None
  monkeypatch.setattr(_dispatch, "_capability", lambda w: 9.0)
  assert _dispatch.pallas_nm_mask_2d(big, 2, 4, 0, 1) is not None


def test_dispatch_prefers_it_on_hopper(monkeypatch):
  monkeypatch.delenv("JASP_MASK_IMPL", raising=False)
  called = []
  monkeypatch.setattr(nm2d_mosaic, "nm_mask_2d_mosaic", lambda *a, **k: called.append("mosaic"))
  monkeypatch.setattr(nm2d_pallas, "nm_mask_2d_pallas", lambda *a, **k: called.append("triton"))
  monkeypatch.setattr(_dispatch, "_backend", lambda w: "gpu")
  big = jax.ShapeDtypeStruct((4096, 4096), jnp.bfloat16)
  for cap, want in [(9.0, "mosaic"), (8.0, "triton")]:
    monkeypatch.setattr(_dispatch, "_capability", lambda w, cap=cap: cap)
    _dispatch.pallas_nm_mask_2d(big, 2, 4, 0, 1)()
    assert called[-1] == want, cap


GPU_CASES = [
  ((4096, 4096), 0, 1, 2, 4),
  ((1024, 4096), 1, 0, 2, 4),
  ((3, 3, 64, 128), -2, -1, 2, 4),
  ((96, 384), 0, 1, 1, 4),
]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16], ids=str)
def test_every_gpu_case_lowers_for_cuda(dtype):
  # Lowering for CUDA runs Mosaic GPU's layout and memory-access checks on the CPU.
  for shape, axis, out_axis, n, m in GPU_CASES:
    p = nm2d_mosaic.plan_2d(shape, m, axis, out_axis)
    assert p is not None, shape
    run = lambda w, n=n, p=p: nm2d_mosaic._run(w, n=n, p=p, interpret=False)
    testing.lowers_for_cuda(run, jax.ShapeDtypeStruct(shape, dtype))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_gpu_matches_xla(dtype):
  if jax.default_backend() != "gpu" or (_dispatch._capability(jnp.zeros(1)) or 0) < 9.0:
    pytest.skip("the Mosaic GPU kernels need compute capability 9.0+")
  rng, seed = testing.fresh_rng()
  for shape, axis, out_axis, n, m in GPU_CASES:
    for w in [
      jnp.asarray(rng.standard_normal(shape), dtype),
      jnp.asarray(rng.integers(-3, 4, shape), dtype),
    ]:
      with jasp.mask_impl("xla"):
        want = np.asarray(jasp.nm_mask_2d(w, n, m, axis, out_axis))
      got = np.asarray(nm2d_mosaic.nm_mask_2d_mosaic(w, n, m, axis, out_axis))
      np.testing.assert_array_equal(got, want, err_msg=f"seed={seed} {shape} {dtype}")
