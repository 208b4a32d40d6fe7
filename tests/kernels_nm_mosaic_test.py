"""The Pallas Mosaic GPU N:M kernels against the float64 reference and the XLA path.

On CPU the kernels run in Mosaic GPU interpret mode (exact, slow: small shapes).
The tests marked ``gpu`` compile the real kernels on a Hopper GPU; run them on
the device machine with ``pytest -m gpu tests/kernels_nm_mosaic_test.py``.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference as ref
import testing

import jasp
from jasp import _dispatch
from jasp import masks
from jasp import packing
from jasp import pruning
from jasp.kernels import nm_mosaic
from jasp.kernels import nm_pallas

DTYPES = [jnp.float32, jnp.bfloat16, jnp.float16]

# (shape, axis, n, m): Flax layouts (group axis not last), multi-axis groups,
# general N:M up to m = 8.
CASES = [
  ((64, 256), 0, 2, 4),  # Dense (in, out)
  ((3, 3, 16, 64), -2, 2, 4),  # conv HWIO
  ((8, 16, 128), (0, 1), 2, 4),  # DenseGeneral over two contracted axes
  ((48, 64), 0, 1, 3),  # m not a power of two (no packed plan)
  ((32, 128), 0, 3, 8),
  ((16, 4, 32), 1, 1, 2),
  ((32, 64), -1, 2, 4),  # PyTorch (out, in): the strided "cols" view
  ((4, 32, 48), (1, 2), 3, 8),  # multi-axis groups reaching the last axis
]


def _outputs_match(w, n, m, axis, outputs, msg, interpret=True):
  want = ref.nm_mask_ref(testing.as_np64(w), n, m, axis)
  got = nm_mosaic.nm_mosaic(w, n, m, axis, outputs, interpret=interpret)
  assert len(got) == len(outputs)
  for name, g in zip(outputs, got):
    if name == "mask":
      assert g.dtype == jnp.bool_ and g.shape == w.shape, msg
      np.testing.assert_array_equal(np.asarray(g), want, err_msg=msg)
    elif name == "weight":
      assert g.dtype == w.dtype and g.shape == w.shape, msg
      expect = jnp.where(jnp.asarray(want), w, jnp.zeros_like(w))
      assert testing.same_bits(g, expect), msg
    elif name == "bits":
      np.testing.assert_array_equal(
        np.asarray(g), np.asarray(packing.pack(jnp.asarray(want), axis).bits), err_msg=msg
      )
    else:
      assert g.dtype == jnp.int32 and g.ndim == 1, msg
      assert bool(jnp.all(g != 0)) == bool(np.isfinite(testing.as_np64(w)).all()), msg


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{testing.param_id(c[0])}-{c[2]}of{c[3]}")
def test_outputs_match_the_reference(case):
  shape, axis, n, m = case
  rng, seed = testing.fresh_rng()
  for i, dtype in enumerate(DTYPES):
    w = jnp.asarray(rng.integers(-3, 4, shape) * rng.uniform(0.01, 10), dtype)
    if i == 1:  # non-finite entries: NaN ranks as +inf, and the flag says so
      w = (
        w.reshape(-1)
        .at[np.array([0, 5, 6])]
        .set(jnp.array([np.nan, np.inf, -np.inf], dtype))
        .reshape(shape)
      )
    msg = f"seed={seed} {shape} axis={axis} {n}:{m} {dtype}"
    _outputs_match(w, n, m, axis, ("weight", "mask", "finite"), msg)
    if nm_mosaic.plan(shape, m, axis, packed=True) is not None:
      _outputs_match(w, n, m, axis, ("bits", "finite"), msg)
      _outputs_match(w, n, m, axis, ("weight", "bits", "mask"), msg)


@pytest.mark.parametrize("dtype", DTYPES)
def test_special_values(dtype):
  rng, seed = testing.fresh_rng()
  w = jnp.asarray(rng.choice(testing.special_values(dtype, True), size=(32, 128)), dtype)
  _outputs_match(w, 2, 4, 0, ("weight", "mask", "finite"), f"seed={seed} {dtype}")
  _outputs_match(w, 2, 4, 0, ("bits",), f"seed={seed} {dtype}")


def test_plan_applies_to_row_layouts_that_tile():
  p = nm_mosaic.plan((4096, 11008), 4, 0, itemsize=2)
  assert p.view == (1024, 4, 11008) and p.grid == (11008 // p.block[1], 1024 // p.block[0])
  assert (p.block[0] * p.block[1]) % (128 * p.vec) == 0 and p.vec * 2 <= 16
  assert nm_mosaic.plan((4096, 11008), 4, 0, packed=True).view == (512, 8, 11008)
  cols = nm_mosaic.plan((64, 128), 4, -1)  # groups along the last axis
  assert cols.cols and cols.view == (8, 256, 4, 1) and cols.vec == 1 and cols.tile == (2, 256, 1)
  assert nm_mosaic.plan((12, 128), 4, 0, packed=True) is None  # 12 entries: not whole bytes
  assert nm_mosaic.plan((48, 64), 3, 0, packed=True) is None  # a byte would split a group
  assert nm_mosaic.plan((4, 3), 4, 0) is None  # a tile of 3 elements: not 128
  assert nm_mosaic.plan((0, 128), 4, 0) is None  # empty: nothing to launch
  tall = nm_mosaic.plan((4 * 4 * 65536, 256), 4, 0)  # 131072 tiles of 2 rows: past CUDA's limit
  assert tall.block == (8, 256) and tall.grid == (1, 32768)
  assert nm_mosaic.plan((4 * 3 * 65537, 256), 4, 0) is None  # an odd row count cannot grow
  with pytest.raises(ValueError, match="multiple of m"):
    nm_mosaic.plan((6, 128), 4, 0)


def test_errors():
  w = jnp.ones((64, 128), jnp.float32)
  with pytest.raises(ValueError, match="outputs"):
    nm_mosaic.nm_mosaic(w, 2, 4, 0, ("weights",))
  with pytest.raises(ValueError, match="outputs"):
    nm_mosaic.nm_mosaic(w, 2, 4, 0, ())
  with pytest.raises(ValueError, match="supports"):
    nm_mosaic.nm_mosaic(w.astype(jnp.int32), 2, 4, 0, ("mask",))
  with pytest.raises(ValueError, match="does not tile"):
    nm_mosaic.nm_mosaic(w[:8, :4], 2, 4, 0, ("mask",))
  with pytest.raises(ValueError, match="start with 'weight'"):
    nm_mosaic.prune(w, 2, 4, 0, ("mask", "weight"))
  with pytest.raises(ValueError, match="1 <= n < m"):
    nm_mosaic.nm_mosaic(w, 4, 4, 0, ("mask",))


def test_prune_gradient_is_the_mask():
  w = testing.normal((64, 128), seed=3)
  want = ref.nm_mask_ref(testing.as_np64(w), 2, 4, 0)
  g = jax.grad(lambda x: jnp.sum(nm_mosaic.prune(x, 2, 4, 0, ("weight",))))(w)
  np.testing.assert_array_equal(np.asarray(g), want.astype(np.float32))
  g = jax.grad(lambda x: jnp.sum(nm_mosaic.prune(x, 2, 4, 0, ("weight", "bits", "finite"))[0]))(w)
  np.testing.assert_array_equal(np.asarray(g), want.astype(np.float32))


def _hide_triton(monkeypatch):
  monkeypatch.setattr(nm_pallas, "backend_available", lambda: False)


def test_dispatch_picks_mosaic_on_hopper_and_triton_before(monkeypatch):
  monkeypatch.delenv("JASP_MASK_IMPL", raising=False)
  monkeypatch.setattr(_dispatch, "_backend", lambda w: "gpu")
  big = jax.ShapeDtypeStruct((4096, 4096), jnp.bfloat16)
  cap = {"value": 9.0}
  monkeypatch.setattr(_dispatch, "_capability", lambda w: cap["value"])
  assert _dispatch.pick_kernel(big, 2, 4, 0) == "mosaic"
  assert _dispatch.pick_kernel(big, 2, 4, -1) == "mosaic"  # last axis: the strided view
  narrow = jax.ShapeDtypeStruct((65536, 16), jnp.float32)  # 16 contiguous elements: XLA
  assert _dispatch.pick_kernel(narrow, 2, 4, 0) is None
  cap["value"] = 8.0  # Ampere: Triton only
  assert _dispatch.pick_kernel(big, 2, 4, 0) == "triton"
  _hide_triton(monkeypatch)
  assert _dispatch.pick_kernel(big, 2, 4, 0) is None
  with pytest.raises(RuntimeError, match="no Pallas kernel applies"):
    _dispatch.pick_kernel(big, 2, 4, 0, "pallas")
  cap["value"] = 9.0
  assert _dispatch.pick_kernel(big, 2, 4, 0) == "mosaic"
  assert _dispatch.pick_kernel(big, 2, 4, -1) == "mosaic"


def test_public_api_uses_the_kernel_without_triton(monkeypatch):
  """In a JAX without Pallas Triton, "pallas" runs the Mosaic GPU kernel (interpreted here)."""
  _hide_triton(monkeypatch)
  calls = []
  real = nm_mosaic.nm_mosaic
  monkeypatch.setattr(nm_mosaic, "nm_mosaic", lambda *a, **k: calls.append(a[4]) or real(*a, **k))
  w = testing.normal((64, 256), seed=1, dtype=jnp.bfloat16)
  want = ref.nm_mask_ref(testing.as_np64(w), 2, 4, 0)
  np.testing.assert_array_equal(np.asarray(jasp.nm_mask(w, impl="pallas")), want)
  pruned, mask = masks.nm_prune(w, impl="pallas")
  np.testing.assert_array_equal(np.asarray(mask), want)
  assert calls == [("mask",), ("weight", "mask")]
  np.testing.assert_array_equal(np.asarray(jasp.nm_mask(w.T, 2, 4, -1, impl="pallas")), want.T)
  assert calls[-1] == ("mask",)
  with pytest.raises(RuntimeError, match="no Pallas kernel applies"):
    jasp.nm_mask(w[:4, :8], 2, 4, 0, impl="pallas")  # a 2 x 8 tile: not 128 elements
  with jasp.mask_impl("pallas"):  # a preference: XLA where no kernel applies
    assert jasp.nm_mask(jnp.ones((0, 128)), 2, 4, 0).shape == (0, 128)


@pytest.mark.parametrize("packed", [False, True], ids=["bool", "packed"])
def test_prune_tree_in_one_pass(monkeypatch, packed):
  """jasp.prune: pruned weight, mask and finiteness from one kernel call per leaf."""
  _hide_triton(monkeypatch)
  calls = []
  real = nm_mosaic.nm_mosaic
  monkeypatch.setattr(nm_mosaic, "nm_mosaic", lambda *a, **k: calls.append(a[4]) or real(*a, **k))
  rng, seed = testing.fresh_rng()
  params = {
    "up": {
      "kernel": jnp.asarray(rng.standard_normal((64, 256)), jnp.bfloat16),
      "bias": jnp.zeros(256),
    },
    "down": {"kernel": jnp.asarray(rng.standard_normal((256, 64)), jnp.float32)},
  }
  want_p, want_m = jasp.prune(params, impl="xla")
  got_p, got_m = jasp.prune(params, impl="pallas", packed=packed)
  mask_kind = "bits" if packed else "mask"
  assert sorted(calls) == [("weight", mask_kind, "finite")] * 2
  if packed:
    assert isinstance(got_m["up"]["kernel"], packing.PackedMask)
    assert isinstance(got_m["down"]["kernel"], packing.PackedMask)
    got_m = packing.unpack_masks(got_m)
  for path in (("up", "kernel"), ("down", "kernel")):
    a, b = got_m[path[0]][path[1]], want_m[path[0]][path[1]]
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=f"seed={seed} {path}")
    assert testing.same_bits(got_p[path[0]][path[1]], want_p[path[0]][path[1]])
  calls.clear()
  only = jasp.compute_masks(params, impl="pallas", packed=packed)
  assert sorted(calls) == [(mask_kind, "finite")] * 2
  only = packing.unpack_masks(only) if packed else only
  for name in ("up", "down"):
    np.testing.assert_array_equal(
      np.asarray(only[name]["kernel"]), np.asarray(want_m[name]["kernel"])
    )
  bad = {"up": {"kernel": params["up"]["kernel"].at[3, 7].set(jnp.nan)}}
  with pytest.raises(ValueError, match="'up/kernel'.*1 NaN/Inf"):
    jasp.prune(bad, impl="pallas", packed=packed)


@pytest.mark.parametrize(
  "shape,axis,outputs",
  [
    ((64, 256), 0, ("weight", "mask", "finite")),
    ((32, 64), -1, ("weight", "bits", "finite")),  # the "cols" view
    ((3, 3, 16, 64), -2, ("mask",)),
  ],
)
def test_many_weights_in_one_launch_match_one_by_one(shape, axis, outputs, monkeypatch):
  rng, seed = testing.fresh_rng()
  ws = [jnp.asarray(rng.standard_normal(shape), jnp.bfloat16) for _ in range(5)]
  ws[1] = ws[1].at[(0,) * len(shape)].set(jnp.nan)
  monkeypatch.setattr(nm_mosaic, "MAX_GROUP", 2)  # 5 weights: launches of 2, 2 and 1
  launches = []
  real = nm_mosaic._run_many
  monkeypatch.setattr(
    nm_mosaic, "_run_many", lambda ws, **k: launches.append(len(ws)) or real(ws, **k)
  )
  many = nm_mosaic.nm_mosaic_many(ws, 2, 4, axis, outputs)
  assert launches == [2, 2, 1] and len(many) == len(ws)
  for i, (w, got) in enumerate(zip(ws, many)):
    want = ref.nm_mask_ref(testing.as_np64(w), 2, 4, axis)
    for name, g in zip(outputs, got):
      msg = f"seed={seed} weight {i} {name}"
      if name == "mask":
        np.testing.assert_array_equal(np.asarray(g), want, err_msg=msg)
      elif name == "weight":
        assert testing.same_bits(g, jnp.where(jnp.asarray(want), w, jnp.zeros_like(w))), msg
      elif name == "bits":
        bits = packing.pack(jnp.asarray(want), axis).bits
        np.testing.assert_array_equal(np.asarray(g), np.asarray(bits), err_msg=msg)
      else:
        assert bool(jnp.all(g != 0)) == (i != 1), msg
  with pytest.raises(ValueError, match="one shape and dtype"):
    nm_mosaic.nm_mosaic_many([ws[0], ws[0].astype(jnp.float32)], 2, 4, axis, outputs)


def test_prune_many_gradient_is_each_mask():
  ws = [testing.normal((64, 256), seed=s) for s in range(3)]
  grads = jax.grad(
    lambda ws: sum(jnp.sum(o[0] * 1.5) for o in nm_mosaic.prune_many(ws, 2, 4, 0, ("weight",)))
  )(ws)
  for w, g in zip(ws, grads):
    want = jnp.asarray(ref.nm_mask_ref(testing.as_np64(w), 2, 4, 0))
    assert testing.same_bits(g, jnp.where(want, 1.5, 0.0).astype(g.dtype))


@pytest.mark.parametrize("packed", [False, True])
def test_prune_tree_with_shared_launches(monkeypatch, packed):
  """jasp.prune with same-shaped leaves grouped: one launch per shape, same results."""
  _hide_triton(monkeypatch)
  monkeypatch.setattr(pruning, "_GROUP_SAME_SHAPES", True)
  launches = []
  real = nm_mosaic._run_many
  monkeypatch.setattr(
    nm_mosaic, "_run_many", lambda ws, **k: launches.append(len(ws)) or real(ws, **k)
  )
  rng, seed = testing.fresh_rng()
  params = {
    f"layer{i}": {
      "up": {"kernel": jnp.asarray(rng.standard_normal((64, 128)), jnp.bfloat16)},
      "down": {"kernel": jnp.asarray(rng.standard_normal((128, 64)), jnp.bfloat16)},
    }
    for i in range(3)
  }
  params["head"] = {"kernel": jnp.asarray(rng.standard_normal((64, 256)), jnp.float32)}
  want_p, want_m = jasp.prune(params, impl="xla")
  got_p, got_m = jasp.prune(params, impl="pallas", packed=packed)
  assert sorted(launches) == [3, 3]
  got_m = packing.unpack_masks(got_m) if packed else got_m
  for (path, a), b in zip(testing.leaves(got_m).items(), testing.leaves(want_m).values()):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=f"seed={seed} {path}")
  for a, b in zip(jax.tree.leaves(got_p), jax.tree.leaves(want_p)):
    assert testing.same_bits(a, b)
  down = params["layer1"]["down"]["kernel"].at[0, 0].set(jnp.inf)
  bad = dict(params, layer1={**params["layer1"], "down": {"kernel": down}})
  with pytest.raises(ValueError, match="'layer1/down/kernel'.*1 NaN/Inf"):
    jasp.prune(bad, impl="pallas", packed=packed)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
def test_every_gpu_case_lowers_for_cuda(dtype):
  # Lowering for CUDA runs Mosaic GPU's layout and memory-access checks on the CPU.
  lowered = 0
  for i, (shape, axis) in enumerate(GPU_CASES):
    for n, m in [(2, 4), [(1, 4), (3, 8), (2, 8), (1, 2)][i % 4]]:
      for outputs in [("weight", "mask", "finite"), ("bits",)]:
        p = nm_mosaic.plan(
          shape, m, axis, packed="bits" in outputs, itemsize=jnp.dtype(dtype).itemsize
        )
        if p is None:
          continue
        run = lambda w, n=n, p=p, o=outputs: nm_mosaic._run(w, n=n, p=p, outputs=o, interpret=False)
        testing.lowers_for_cuda(run, jax.ShapeDtypeStruct(shape, dtype))
        lowered += 1
  assert lowered >= 2 * len(GPU_CASES)


@pytest.mark.parametrize("shape,axis", [((2048, 5632), 0), ((11008, 4096), -1)], ids=str)
def test_shared_launches_lower_for_cuda(shape, axis):
  for outputs in [("weight", "mask", "finite"), ("weight", "bits", "finite")]:
    p = nm_mosaic.plan(shape, 4, axis, packed="bits" in outputs, itemsize=2)
    run = lambda *ws, p=p, o=outputs: nm_mosaic._run_many(ws, n=2, p=p, outputs=o, interpret=False)
    testing.lowers_for_cuda(run, *[jax.ShapeDtypeStruct(shape, jnp.bfloat16)] * 3)


# ---------------------------------------------------------------------------
# On the GPU (Hopper).

GPU_CASES = [
  ((4096, 11008), 0),
  ((11008, 4096), -1),  # PyTorch (out, in): the strided "cols" view
  ((11008, 4096), 0),
  ((3, 3, 256, 512), -2),
  ((8, 512, 1024), (0, 1)),
  ((1024, 36), 0),
]


def _hopper() -> bool:
  return jax.default_backend() == "gpu" and (_dispatch._capability(jnp.zeros(1)) or 0) >= 9.0


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_kernel_matches_xla(dtype):
  if not _hopper():
    pytest.skip("the Mosaic GPU kernels need compute capability 9.0+")
  rng, seed = testing.fresh_rng()
  for i, (shape, axis) in enumerate(GPU_CASES):
    for n, m in [(2, 4), [(1, 4), (3, 8), (2, 8), (1, 2)][i % 4]]:
      w = jnp.asarray(rng.integers(-3, 4, shape) * rng.choice([1.0, 0.01]), dtype)
      w = w.reshape(-1).at[np.array([1, 2])].set(jnp.array([np.nan, np.inf], dtype)).reshape(shape)
      msg = f"seed={seed} {shape} axis={axis} {n}:{m}"
      want = masks.nm_mask(w, n, m, axis, impl="xla")
      if nm_mosaic.plan(shape, m, axis) is None:
        continue
      pruned, mask, finite = nm_mosaic.nm_mosaic(w, n, m, axis, ("weight", "mask", "finite"))
      np.testing.assert_array_equal(np.asarray(mask), np.asarray(want), err_msg=msg)
      assert testing.same_bits(pruned, jnp.where(want, w, jnp.zeros_like(w))), msg
      assert not bool(jnp.all(finite != 0)), msg
      if nm_mosaic.plan(shape, m, axis, packed=True) is not None:
        (bits,) = nm_mosaic.nm_mosaic(w, n, m, axis, ("bits",))
        np.testing.assert_array_equal(
          np.asarray(bits), np.asarray(packing.pack(want, axis).bits), err_msg=msg
        )


@pytest.mark.gpu
def test_gpu_no_deprecation_warning_from_jasp_calls():
  if not _hopper():
    pytest.skip("the Mosaic GPU kernels need compute capability 9.0+")
  w = testing.normal((4096, 1024), seed=2, dtype=jnp.bfloat16)
  with warnings.catch_warnings():
    warnings.simplefilter("error", DeprecationWarning)
    assert _dispatch.pick_kernel(w, 2, 4, 0) == "mosaic"
    jax.block_until_ready(jasp.nm_mask(w))
    jax.block_until_ready(masks.nm_prune(w))
    jax.block_until_ready(jasp.prune({"k": w}, packed=True))
    assert _dispatch.pick_kernel(w.T, 2, 4, -1) == "mosaic"  # PyTorch (out, in) layout
    jax.block_until_ready(jasp.nm_mask(w.T, 2, 4, -1))
    jax.block_until_ready(jasp.nm_mask_2d(w, 2, 4, 0, 1))
