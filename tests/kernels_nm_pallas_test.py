"""The Pallas N:M kernels against the XLA path and the float64 reference.

On CPU the kernels run in Pallas interpret mode (exact, slow: small shapes). The
tests marked ``gpu`` compile the real Triton kernels; run them on the device
machine with ``pytest -m gpu tests/kernels_nm_pallas_test.py``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference as ref
import testing

from jasp import _dispatch
from jasp import masks
from jasp.kernels import nm2d_pallas
from jasp.kernels import nm_pallas

DTYPES = [jnp.float32, jnp.bfloat16, jnp.float16]

# (shape, axis, n, m): both layouts ("rows": trailing elements after the group
# axes; "cols": the group axis is last), masked edge blocks and exact tilings,
# multi-axis groups, general N:M up to m = 8.
CASES = [
  ((40, 20), 0, 2, 4),  # Dense (in, out), masked edges in both dims
  ((64, 256), 0, 2, 4),  # Dense, exact tiling
  ((3, 3, 8, 10), -2, 2, 4),  # conv HWIO, group axis -2
  ((12, 24), -1, 2, 4),  # PyTorch (out, in): groups along the last axis
  ((5, 24), 1, 3, 8),
  ((36, 20), 0, 1, 3),  # m not a power of two
  ((7, 12), 1, 2, 6),
  ((2, 3, 4, 5), (1, 2), 2, 4),  # multi-axis consecutive groups
  ((2, 4, 8), (1, 2), 1, 4),  # multi-axis groups reaching the last axis
  ((16,), 0, 2, 4),  # rank 1
  ((42, 8), 0, 1, 2),
  ((6, 9, 8), 2, 5, 8),
]


def check_all(w, n, m, axis, msg, interpret=True):
  """Mask and pruned weight equal the XLA path bit for bit and the reference."""
  want = np.asarray(masks.nm_mask(w, n, m, axis, impl="xla"))
  got = np.asarray(nm_pallas.nm_mask_pallas(w, n, m, axis, interpret=interpret))
  assert got.dtype == bool and got.shape == w.shape, msg
  np.testing.assert_array_equal(got, want, err_msg=msg)
  np.testing.assert_array_equal(got, ref.nm_mask_ref(testing.as_np64(w), n, m, axis), err_msg=msg)
  pruned, mask2 = nm_pallas.nm_prune_pallas(w, n, m, axis, interpret=interpret)
  np.testing.assert_array_equal(np.asarray(mask2), want, err_msg=msg)
  assert pruned.dtype == w.dtype and pruned.shape == w.shape
  expect = jnp.where(want, w, jnp.zeros_like(w))
  np.testing.assert_array_equal(
    np.asarray(jax.lax.bitcast_convert_type(pruned, jnp.uint8)),
    np.asarray(jax.lax.bitcast_convert_type(expect, jnp.uint8)),
    err_msg=msg,
  )


def _case_id(shape, axis, n, m):
  return f"{testing.param_id(shape)}-axis{testing.param_id(axis) or axis}-{n}of{m}"


@pytest.mark.parametrize("i", range(len(CASES)), ids=[_case_id(*c) for c in CASES])
def test_random_values_and_ties_match_xla_and_reference(i):
  shape, axis, n, m = CASES[i]
  rng, seed = testing.fresh_rng()
  dtype = DTYPES[i % 3]
  w = jnp.asarray(rng.standard_normal(shape) * rng.uniform(0.1, 100), dtype)
  check_all(w, n, m, axis, f"seed={seed} {shape} axis={axis} {n}:{m} {dtype}")
  w = jnp.asarray(rng.integers(-2, 3, shape), dtype)  # many ties, signed zeros
  check_all(w, n, m, axis, f"seed={seed} ties {shape} axis={axis} {n}:{m} {dtype}")


def test_random_shapes():
  """Random shapes, axes and N:M from the run's seed (``JASP_TEST_SEED`` varies them)."""
  rng, seed = testing.fresh_rng()
  for _ in range(4):
    m = int(rng.choice([2, 4, 4, 4, 8, 3]))
    n = int(rng.integers(1, m))
    rank = int(rng.integers(1, 4))
    shape = [int(rng.integers(1, 20)) for _ in range(rank)]
    axis = int(rng.integers(-rank, rank))
    shape[axis] = m * int(rng.integers(1, 6))
    dtype = DTYPES[int(rng.integers(0, 3))]
    w = jnp.asarray(rng.integers(-4, 5, shape) * rng.choice([1.0, 0.37]), dtype)
    check_all(w, n, m, axis, f"seed={seed} {shape} axis={axis} {n}:{m} {dtype}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_special_values(dtype):
  """NaN ranks as +inf (ties with inf go to the lower index); -0 == +0."""
  rng, seed = testing.fresh_rng()
  w = jnp.asarray(rng.choice(testing.special_values(dtype, False), size=(48, 24)), dtype)
  for n, m, axis in [(2, 4, 0), (3, 8, -1)]:
    check_all(w, n, m, axis, f"seed={seed} {n}:{m} axis={axis}")
  w = jnp.asarray([[np.inf], [np.nan], [1.0], [np.nan]], dtype)
  assert np.asarray(nm_pallas.nm_mask_pallas(w, 1, 4, interpret=True))[:, 0].tolist() == [
    True,
    False,
    False,
    False,
  ]


@pytest.mark.parametrize("dtype", DTYPES)
def test_subnormals_ranked_exactly(dtype):
  """Subnormal magnitudes are ranked exactly, as in the float64 reference.

  (XLA on CPU flushes subnormals to zero in comparisons, so the XLA path ranks
  them as ties with 0 there; the kernel compares bit patterns and does not.)
  """
  rng, seed = testing.fresh_rng()
  w = jnp.asarray(rng.choice(testing.special_values(dtype, True), size=(48, 24)), dtype)
  for n, m, axis in [(2, 4, 0)]:
    got = np.asarray(nm_pallas.nm_mask_pallas(w, n, m, axis, interpret=True))
    np.testing.assert_array_equal(
      got, ref.nm_mask_ref(testing.as_np64(w), n, m, axis), err_msg=f"seed={seed}"
    )


def test_uneven_shapes_with_partial_blocks():
  """Shapes whose groups do not fill the kernel's blocks (scaled down for interpret mode)."""
  rng, seed = testing.fresh_rng()
  for shape, axis in [((3, 3, 64, 10), -2), ((4100, 44), 0), ((44, 4100), -1)]:
    w = jnp.asarray(rng.standard_normal(shape), jnp.bfloat16)
    check_all(w, 2, 4, axis, f"seed={seed} {shape}")


def test_plans():
  p = nm_pallas.plan((4096, 11008), 4, 0)
  assert p.view == (1024, 4, 11008) and p.member_dim == 1 and p.bounds is None
  p = nm_pallas.plan((4100, 11008), 4, 0)
  assert p.bounds is not None  # 1025 groups: masked edge rows
  p = nm_pallas.plan((11008, 4096), 4, -1)
  assert p.member_dim == 2 and p.bounds is None and p.view[2] == 4
  p = nm_pallas.plan((3, 3, 64, 10), 4, -2)
  assert p.view == (144, 4, 10) and p.bounds is not None
  with pytest.raises(ValueError, match="multiple"):
    nm_pallas.plan((10, 8), 4, 0)


def test_jit_vmap_and_grad():
  rng, _ = testing.fresh_rng()
  w = jnp.asarray(rng.standard_normal((3, 16, 12)), jnp.float32)
  f = jax.jit(lambda x: nm_pallas.nm_mask_pallas(x, 2, 4, 0, interpret=True))
  np.testing.assert_array_equal(np.asarray(f(w[0])), np.asarray(masks.nm_mask(w[0], impl="xla")))
  got = jax.vmap(lambda x: nm_pallas.nm_mask_pallas(x, 2, 4, 0, interpret=True))(w)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(masks.nm_mask(w, axis=1, impl="xla")))

  def loss(x):
    pruned = nm_pallas.nm_prune_pallas(x, 2, 4, 0, with_mask=False, interpret=True)
    return jnp.sum(pruned**2)

  g = jax.grad(loss)(w[1])
  mask = masks.nm_mask(w[1], impl="xla")
  np.testing.assert_allclose(np.asarray(g), np.asarray(jnp.where(mask, 2 * w[1], 0)))
  # The mask itself is constant: gradients through it are zero, not an error.
  assert (
    float(
      jnp.abs(
        jax.grad(lambda x: jnp.sum(nm_pallas.nm_mask_pallas(x, interpret=True) * x))(w[1])
      ).sum()
    )
    > 0
  )


def test_unsupported_inputs_raise():
  with pytest.raises(ValueError, match="xla"):
    nm_pallas.nm_mask_pallas(jnp.ones((8, 4), jnp.int32), interpret=True)
  with pytest.raises(ValueError, match="m <= 8"):
    nm_pallas.nm_mask_pallas(jnp.ones((16, 4)), 2, 16, interpret=True)
  with pytest.raises(ValueError, match="scalar"):
    nm_pallas.nm_mask_pallas(jnp.float32(1.0), interpret=True)
  with pytest.raises(ValueError):
    nm_pallas.nm_mask_pallas(jnp.ones((8, 4)), 4, 4, interpret=True)
  assert nm_pallas.nm_mask_pallas(jnp.ones((0, 4)), interpret=True).shape == (0, 4)
  assert nm_pallas.nm_prune_pallas(jnp.ones((8, 0)), interpret=True)[1].shape == (8, 0)
  assert not nm_pallas.supports(jnp.float64, 2, 4)
  assert nm_pallas.supports(jnp.bfloat16, 7, 8)


# ----------------------------------------------------------------------------
# Transposable masks (method="best").

# (shape, axis, out_axis, n, m): Dense, PyTorch layout, conv HWIO, edges, m = 3.
CASES_2D = [
  ((8, 12), 0, 1, 2, 4),
  ((12, 8), 1, 0, 2, 4),
  ((3, 3, 8, 8), -2, -1, 2, 4),
  ((40, 24), 0, 1, 1, 4),
  ((36, 20), 1, 0, 3, 4),
  ((9, 12), 0, 1, 2, 3),
  ((64, 256), 0, 1, 2, 4),
]


def best_xla(w, n, m, axis, out_axis):
  with _dispatch.mask_impl("xla"):
    return np.asarray(masks.nm_mask_2d(w, n, m, axis, out_axis, method="best"))


def check_2d(w, n, m, axis, out_axis, msg, interpret=True):
  got = np.asarray(nm2d_pallas.nm_mask_2d_pallas(w, n, m, axis, out_axis, interpret=interpret))
  assert got.dtype == bool and got.shape == w.shape
  np.testing.assert_array_equal(got, best_xla(w, n, m, axis, out_axis), err_msg=msg)
  return got


@pytest.mark.parametrize(
  "i",
  range(len(CASES_2D)),
  ids=[f"{testing.param_id(s)}-axes{a}_{o}-{n}of{m}" for s, a, o, n, m in CASES_2D],
)
def test_2d_best_matches_xla_and_reference(i):
  shape, axis, out_axis, n, m = CASES_2D[i]
  rng, seed = testing.fresh_rng()
  w = jnp.asarray(rng.integers(-3, 4, shape), DTYPES[i % 3])  # ties everywhere
  msg = f"seed={seed} ties {shape} ({axis}, {out_axis}) {n}:{m}"
  got = check_2d(w, n, m, axis, out_axis, msg)
  np.testing.assert_array_equal(
    got, ref.nm_mask_2d_best_ref(testing.as_np64(w), n, m, axis, out_axis), err_msg=msg
  )
  w = jnp.asarray(rng.standard_normal(shape), DTYPES[i % 3])
  got = check_2d(w, n, m, axis, out_axis, f"seed={seed} {shape} ({axis}, {out_axis}) {n}:{m}")
  assert bool(masks.is_nm(got, n, m, axis)) and bool(masks.is_nm(got, n, m, out_axis))


def test_2d_special_values_and_layouts():
  rng, seed = testing.fresh_rng()
  w = jnp.asarray(
    rng.choice(testing.special_values(jnp.float32, False), size=(16, 24)), jnp.float32
  )
  check_2d(w, 2, 4, 0, 1, f"seed={seed}")
  assert nm2d_pallas.supports_2d((8, 16), jnp.bfloat16, 2, 4, 0, 1)
  assert not nm2d_pallas.supports_2d((8, 3, 8), jnp.float32, 2, 4, 0, 2)  # axis in between
  assert not nm2d_pallas.supports_2d((8, 8, 3), jnp.float32, 2, 4, 0, 1)  # trailing axis
  assert not nm2d_pallas.supports_2d((8, 8), jnp.float64, 2, 4, 0, 1)
  assert not nm2d_pallas.supports_2d((10, 8), jnp.float32, 2, 4, 0, 1)
  assert not nm2d_pallas.supports_2d((16, 16), jnp.float32, 2, 8, 0, 1)  # too many patterns
  with pytest.raises(ValueError, match="XLA"):
    nm2d_pallas.nm_mask_2d_pallas(jnp.ones((8, 3, 8)), 2, 4, 0, 2, interpret=True)


# ----------------------------------------------------------------------------
# On the GPU: the compiled Triton kernels.

GPU_CASES = [
  ((4096, 4096), 0),
  ((4100, 11008), 0),
  ((11008, 4100), -1),
  ((3, 3, 64, 10), -2),
  ((3, 3, 256, 512), -2),
  ((1000, 36), 0),
  ((36, 1000), 1),
  ((8, 512, 12), (1, 2)),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_kernel_matches_xla(dtype):
  rng, seed = testing.fresh_rng()
  for i, (shape, axis) in enumerate(GPU_CASES):
    for n, m in [(2, 4), [(1, 4), (3, 8), (2, 8), (1, 2)][i % 4]]:
      ax = (axis,) if isinstance(axis, int) else axis
      if int(np.prod([shape[a] for a in ax])) % m:
        continue
      w = jnp.asarray(rng.integers(-3, 4, shape) * rng.choice([1.0, 0.01]), dtype)
      msg = f"seed={seed} {shape} axis={axis} {n}:{m}"
      want = np.asarray(masks.nm_mask(w, n, m, axis, impl="xla"))
      np.testing.assert_array_equal(
        np.asarray(nm_pallas.nm_mask_pallas(w, n, m, axis)), want, err_msg=msg
      )
      pruned, mask = nm_pallas.nm_prune_pallas(w, n, m, axis)
      np.testing.assert_array_equal(np.asarray(mask), want, err_msg=msg)
      np.testing.assert_array_equal(
        np.asarray(pruned), np.asarray(jnp.where(want, w, jnp.zeros_like(w))), err_msg=msg
      )
      assert _dispatch.use_pallas(w, n, m, axis) == (
        w.size >= _dispatch.AUTO_MIN_ELEMENTS
        and (
          nm_pallas.plan(w.shape, m, axis).view[2] >= _dispatch.AUTO_MIN_CONTIG
          if nm_pallas.plan(w.shape, m, axis).member_dim == 1
          else True
        )
      )


@pytest.mark.gpu
def test_gpu_kernel_matches_reference_small():
  rng, seed = testing.fresh_rng()
  for i, (shape, axis, n, m) in enumerate(CASES):
    dtype = DTYPES[i % 3]
    w = jnp.asarray(rng.standard_normal(shape) * rng.uniform(0.1, 100), dtype)
    check_all(w, n, m, axis, f"seed={seed} {shape} axis={axis} {n}:{m} {dtype}", interpret=False)
  for dtype in DTYPES:
    w = jnp.asarray(rng.choice(testing.special_values(dtype, True), size=(48, 24)), dtype)
    check_all(
      w,
      2,
      4,
      0,
      f"seed={seed} special values {dtype} (XLA on GPU keeps subnormals)",
      interpret=False,
    )


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_2d_best_matches_xla(dtype):
  rng, seed = testing.fresh_rng()
  for shape, axis, out_axis, n, m in [
    ((4096, 4096), 0, 1, 2, 4),
    ((4100, 1032), 0, 1, 2, 4),
    ((1032, 4100), 1, 0, 2, 4),
    ((3, 3, 64, 12), -2, -1, 2, 4),
    ((96, 40), 0, 1, 1, 4),
    ((33, 96), 1, 0, 2, 3),
  ]:
    for w in [
      jnp.asarray(rng.standard_normal(shape), dtype),
      jnp.asarray(rng.integers(-3, 4, shape), dtype),
    ]:
      check_2d(
        w,
        n,
        m,
        axis,
        out_axis,
        f"seed={seed} {shape} ({axis}, {out_axis}) {n}:{m}",
        interpret=False,
      )
