"""The shared rank rule against a float64 oracle, for every N:M up to m = 8."""

import jax.numpy as jnp
import numpy as np
import pytest
import testing

from jasp.kernels import ranking


def _oracle(vals: np.ndarray, n: int) -> np.ndarray:
  """vals (m, k) float64: keep the n largest |v| per column, NaN as +inf, ties to the lower index."""
  mag = np.abs(vals)
  mag = np.where(np.isnan(mag), np.inf, mag)
  keep = np.zeros(vals.shape, bool)
  for c in range(vals.shape[1]):
    order = sorted(range(vals.shape[0]), key=lambda i: -mag[i, c])  # stable: ties keep index order
    keep[order[:n], c] = True
  return keep


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_keep_top_n_every_n_m(dtype):
  rng, seed = testing.fresh_rng()
  specials = testing.special_values(dtype, subnormals=True)
  for m in range(2, 9):
    for n in range(1, m):
      # Small integers give many ties; specials give NaN, inf, -0 and subnormals.
      vals = np.concatenate(
        [rng.integers(-2, 3, (m, 300)).astype(np.float64), rng.choice(specials, (m, 300))], axis=1
      )
      x = jnp.asarray(vals, dtype)
      keeps = ranking.keep_top_n([ranking.rank_keys(x[i]) for i in range(m)], n)
      got = np.stack([np.asarray(k) for k in keeps])
      want = _oracle(np.asarray(x, np.float64), n)
      np.testing.assert_array_equal(got, want, err_msg=f"seed={seed} {n}:{m} {dtype}")
      assert (got.sum(axis=0) == n).all()


def test_rank_keys_order_is_the_magnitude_order():
  x = jnp.asarray([0.0, -0.0, 1e-45, 1.0, -2.0, np.inf, -np.inf, np.nan], jnp.float32)
  keys = np.asarray(ranking.rank_keys(x))
  assert keys.dtype == np.int32
  assert keys[0] == keys[1] and keys[2] > keys[0] and keys[4] > keys[3]
  assert keys[5] == keys[6] == keys[7]  # NaN ranks as +inf
