"""jasp.masks against the float64 NumPy references, on fresh random inputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference as ref
import testing

import jasp

DTYPES = [jnp.float32, jnp.bfloat16, jnp.float16]
NM = [(2, 4), (1, 4), (3, 4), (1, 2), (2, 8), (4, 8), (1, 8)]


CASES = [
  ((16,), 0),
  ((8, 12), 0),
  ((24, 5), 0),
  ((5, 24), 1),
  ((5, 24), -1),
  ((3, 3, 8, 6), -2),
  ((2, 16, 3), 1),
  ((8, 2, 4), 0),
  ((2, 4, 8), (0, 1)),
  ((3, 2, 4, 5), (1, 2)),
  ((4, 4, 4, 8), 3),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,m", NM)
def test_nm_mask_matches_reference(dtype, n, m):
  rng, seed = testing.fresh_rng()
  for shape, axis in CASES:
    ax = (axis,) if isinstance(axis, int) else axis
    if int(np.prod([shape[a] for a in ax])) % m:
      continue
    w = jnp.asarray(rng.standard_normal(shape) * rng.uniform(0.1, 10), dtype)
    got = np.asarray(jasp.nm_mask(w, n, m, axis))
    want = ref.nm_mask_ref(testing.as_np64(w), n, m, axis)
    assert got.dtype == bool and got.shape == shape
    np.testing.assert_array_equal(got, want, err_msg=f"seed={seed} shape={shape} axis={axis}")


@pytest.mark.parametrize("dtype", DTYPES + [jnp.int32])
def test_ties_go_to_lower_index(dtype):
  rng, seed = testing.fresh_rng()
  for shape, axis in CASES:
    w = jnp.asarray(rng.integers(-2, 3, shape), dtype)  # many ties, signs, zeros
    for n, m in [(2, 4), (1, 4), (3, 4), (1, 2)]:
      ax = (axis,) if isinstance(axis, int) else axis
      if int(np.prod([shape[a] for a in ax])) % m:
        continue
      got = np.asarray(jasp.nm_mask(w, n, m, axis))
      np.testing.assert_array_equal(
        got, ref.nm_mask_ref(np.asarray(w, np.float64), n, m, axis), err_msg=f"seed={seed}"
      )


def test_all_equal_group_keeps_first_two():
  w = jnp.ones((8, 3))
  mask = np.asarray(jasp.nm_mask(w))
  assert mask[:, 0].tolist() == [True, True, False, False] * 2


def test_exactly_n_per_group_and_jit():
  rng, _ = testing.fresh_rng()
  w = jnp.asarray(rng.standard_normal((64, 40)), jnp.bfloat16)
  f = jax.jit(jasp.nm_mask, static_argnames=("n", "m", "axis"))
  mask = np.asarray(f(w, n=2, m=4, axis=0))
  assert (mask.reshape(16, 4, 40).sum(1) == 2).all()
  np.testing.assert_array_equal(mask, np.asarray(jasp.nm_mask(w)))


def test_nan_ranks_largest():
  w = jnp.array([[1.0], [jnp.nan], [3.0], [2.0]])
  assert np.asarray(jasp.nm_mask(w))[:, 0].tolist() == [False, True, True, False]


def test_independent_of_matmul_precision():
  rng, seed = testing.fresh_rng()
  w = jnp.asarray(
    rng.standard_normal((256, 64)) * (1 + 1e-4 * rng.standard_normal((256, 64))), jnp.float32
  )
  with jax.default_matmul_precision("bfloat16"):
    low = np.asarray(jasp.nm_mask(w))
    low2d = np.asarray(jasp.nm_mask_2d(w[:16, :16]))
  np.testing.assert_array_equal(
    low, ref.nm_mask_ref(np.asarray(w, np.float64), 2, 4, 0), err_msg=f"seed={seed}"
  )
  np.testing.assert_array_equal(low2d, ref.nm_mask_2d_best_ref(np.asarray(w[:16, :16]), 2, 4))


@pytest.mark.parametrize(
  "bad",
  [
    dict(shape=(6, 4), n=2, m=4, axis=0),  # 6 % 4
    dict(shape=(8, 4), n=4, m=4, axis=0),  # n == m
    dict(shape=(8, 4), n=0, m=4, axis=0),  # n == 0
    dict(shape=(8, 4), n=2, m=4, axis=2),  # axis out of range
    dict(shape=(2, 4, 8), n=2, m=4, axis=(0, 2)),  # not consecutive
  ],
  ids=testing.param_id,
)
def test_bad_inputs_raise(bad):
  w = jnp.ones(bad["shape"])
  with pytest.raises(ValueError):
    jasp.nm_mask(w, bad["n"], bad["m"], bad["axis"])


def test_scalar_and_bool_rejected():
  with pytest.raises(ValueError, match="scalar"):
    jasp.nm_mask(jnp.float32(1.0))
  with pytest.raises(TypeError):
    jasp.nm_mask(jnp.ones((4, 2), bool))


def test_not_multiple_error_names_sizes():
  with pytest.raises(ValueError, match="size 10.*multiple of m=4"):
    jasp.nm_mask(jnp.ones((10, 3)))


def test_is_nm():
  rng, _ = testing.fresh_rng()
  w = jnp.asarray(rng.standard_normal((16, 8)), jnp.float32)
  assert not bool(jasp.is_nm(w))
  pruned = jnp.where(jasp.nm_mask(w), w, 0)
  assert bool(jasp.is_nm(pruned))
  assert bool(jasp.is_nm(jasp.nm_mask(w)))
  assert not bool(jasp.is_nm(pruned, axis=1))
  assert bool(jasp.is_nm(jnp.zeros((8, 2))))


def test_block_patterns():
  p = jasp.block_patterns(2, 4)
  assert p.shape == (90, 4)
  assert jasp.block_patterns(1, 4).shape[0] == 24  # permutation matrices
  assert jasp.block_patterns(3, 4).shape[0] == 24
  with pytest.raises(ValueError, match="greedy"):
    jasp.block_patterns(4, 8)


TWO_D = [
  ((8, 12), 0, 1),
  ((12, 8), 1, 0),
  ((2, 8, 4), 1, 2),
  ((3, 3, 8, 8), -2, -1),
  ((4, 8, 2), 0, 1),
]


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (3, 4), (1, 2)])
@pytest.mark.parametrize("method", ["best", "greedy"])
def test_nm_mask_2d_matches_reference_on_integers(n, m, method):
  rng, seed = testing.fresh_rng()
  reffn = ref.nm_mask_2d_best_ref if method == "best" else ref.nm_mask_2d_greedy_ref
  for shape, axis, out_axis in TWO_D:
    w = jnp.asarray(rng.integers(-4, 5, shape), jnp.float32)
    got = np.asarray(jasp.nm_mask_2d(w, n, m, axis, out_axis, method=method))
    np.testing.assert_array_equal(
      got, reffn(np.asarray(w), n, m, axis, out_axis), err_msg=f"seed={seed} {shape}"
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_nm_mask_2d_transposable_and_optimal(dtype):
  rng, seed = testing.fresh_rng()
  w = jnp.asarray(rng.standard_normal((2, 16, 12)), dtype)
  best = np.asarray(jasp.nm_mask_2d(w, 2, 4, 1, 2, method="best"))
  greedy = np.asarray(jasp.nm_mask_2d(w, 2, 4, 1, 2, method="greedy"))
  for mk in (best, greedy):
    assert bool(jasp.is_nm(mk, 2, 4, axis=1)) and bool(jasp.is_nm(mk, 2, 4, axis=2))
  assert (best.reshape(2, 4, 4, 12).sum(2) == 2).all()  # best keeps exactly n
  w64 = testing.as_np64(w)
  opt = ref.nm_mask_2d_best_ref(w64, 2, 4, 1, 2)
  kb, ko, kg = (ref.kept_fraction(w64, x) for x in (best, opt, greedy))
  assert kb >= ko - 1e-6, f"seed={seed}"
  assert kb >= kg - 1e-6
  # Greedy follows the reference exactly (sorting is exact in any dtype).
  np.testing.assert_array_equal(greedy, ref.nm_mask_2d_greedy_ref(w64, 2, 4, 1, 2))


def test_nm_mask_2d_bad_inputs():
  with pytest.raises(ValueError, match="divide"):
    jasp.nm_mask_2d(jnp.ones((8, 6)))
  with pytest.raises(ValueError, match="rank"):
    jasp.nm_mask_2d(jnp.ones((8,)))
  with pytest.raises(ValueError, match="differ"):
    jasp.nm_mask_2d(jnp.ones((8, 8)), axis=0, out_axis=-2)
  with pytest.raises(ValueError, match="method"):
    jasp.nm_mask_2d(jnp.ones((8, 8)), method="fast")


@pytest.mark.parametrize("dtype", DTYPES)
def test_subnormal_magnitudes_are_ranked(dtype):
  tiny = float(jnp.finfo(dtype).smallest_subnormal)
  w = jnp.asarray(np.array([[1.0], [3.0], [2.0], [0.0]]) * tiny, dtype)
  assert np.asarray(jasp.nm_mask(w))[:, 0].tolist() == [False, True, True, False]


def test_nm_mask_2d_takes_one_axis_each():
  w = jnp.ones((8, 8, 4))
  with pytest.raises(ValueError, match=r"one axis .*got axis=\(0, 1\) for shape \(8, 8, 4\)"):
    jasp.nm_mask_2d(w, axis=(0, 1))
  with pytest.raises(ValueError, match=r"one out_axis .*got out_axis=\(1, 2\)"):
    jasp.nm_mask_2d(w, axis=0, out_axis=(1, 2))
  # A run of one axis is that axis.
  np.testing.assert_array_equal(
    np.asarray(jasp.nm_mask_2d(w, axis=(0,), out_axis=(2,))),
    np.asarray(jasp.nm_mask_2d(w, axis=0, out_axis=2)),
  )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", ["best", "greedy"])
def test_nm_mask_2d_subnormals_match_reference(dtype, method):
  """Subnormal magnitudes are ranked exactly (XLA on CPU flushes them in float arithmetic)."""
  rng, seed = testing.fresh_rng()
  tiny = float(jnp.finfo(dtype).smallest_subnormal)
  want = ref.nm_mask_2d_best_ref if method == "best" else ref.nm_mask_2d_greedy_ref
  for shape, axis, out_axis in [((16, 24), 0, 1), ((3, 8, 12), 1, 2), ((12, 8), 1, 0)]:
    # Small multiples of the smallest subnormal: every sum is exact in float32.
    w = jnp.asarray(rng.integers(-20, 21, shape) * tiny, dtype)
    got = np.asarray(jasp.nm_mask_2d(w, 2, 4, axis, out_axis, method=method))
    np.testing.assert_array_equal(
      got,
      want(testing.as_np64(w), 2, 4, axis, out_axis),
      err_msg=f"seed={seed} {shape} {dtype.__name__}",
    )


@pytest.mark.parametrize("method", ["best", "greedy"])
def test_nm_mask_2d_is_scale_invariant_below_the_normal_range(method):
  """The same weight scaled by a power of two (exactly, in NumPy) gets the same mask."""
  rng, seed = testing.fresh_rng()
  mant = rng.standard_normal((32, 32))
  w = (mant * np.exp2(rng.integers(-150, -110, (32, 32)))).astype(np.float32)  # many subnormal
  normal = (w.astype(np.float64) * 2.0**100).astype(np.float32)  # all normal, exact
  np.testing.assert_array_equal(
    np.asarray(jasp.nm_mask_2d(w, method=method)),
    np.asarray(jasp.nm_mask_2d(normal, method=method)),
    err_msg=f"seed={seed}",
  )


def test_axis_arguments_of_the_wrong_type():
  w = jnp.ones((8, 4))
  for axis in (1.0, None, "0"):
    with pytest.raises(TypeError, match="axis"):
      jasp.nm_mask(w, axis=axis)
  with pytest.raises(TypeError, match=r"axis must be an int or a sequence of ints, got float"):
    jasp.is_nm(w, axis=0.0)
  with pytest.raises(TypeError, match=r"n=True \(bool\)"):
    jasp.nm_mask(w, True, 4)
