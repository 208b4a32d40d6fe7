"""Tests of the matrix-level channel-permutation search."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import testing

from jasp.permutation import search as search_lib
from jasp.permutation.search import permutation_score
from jasp.permutation.search import permute_axis
from jasp.permutation.search import search_permutation


def kept64(w, perm, n, m, axis=0):
  """float64 reference: sum |w| kept by N:M after permuting ``axis`` by ``perm``."""
  w = np.abs(np.asarray(w, np.float64))
  w = np.moveaxis(np.take(w, np.asarray(perm), axis=axis), axis, 0)
  c = w.shape[0]
  g = np.sort(w.reshape(c // m, m, -1), axis=1)
  return float(g[:, m - n :].sum())


def brute_force(w, n, m):
  """Best kept magnitude over every partition of the channels into groups of m."""
  c = w.shape[0]
  best = -1.0

  def rec(rest, acc):
    nonlocal best
    if not rest:
      best = max(best, kept64(w, np.concatenate(acc), n, m))
      return
    first, others = rest[0], rest[1:]
    for comb in itertools.combinations(others, m - 1):
      left = [x for x in others if x not in comb]
      rec(left, acc + [np.array((first,) + comb)])

  rec(list(range(c)), [])
  return best


def apex_matrix(rows=128, cols=64, seed=1):
  """apex's permutation-test matrix: uniform [0, 1), groups along the columns."""
  np.random.seed(seed)
  return np.random.rand(rows, cols).astype(np.float32).T  # (channels, rows)


def test_window_tables_count_canonical_permutations():
  for k, m, count in [(2, 4, 35), (3, 4, 5775), (2, 2, 3), (2, 8, 6435)]:
    subsets, parts = search_lib.window_tables(k, m)
    assert parts.shape == (count, k)
    assert np.array_equal(subsets[parts[0]].reshape(-1), np.arange(k * m))  # identity first
    for row in parts[:50]:
      assert sorted(subsets[row].reshape(-1).tolist()) == list(range(k * m))


@pytest.mark.parametrize("seed", range(4), ids=[f"seed={s}" for s in range(4)])
def test_matches_brute_force_on_8_channels(seed):
  w = np.random.default_rng(seed).standard_normal((8, 6)).astype(np.float32)
  perm = search_permutation(w, 2, 4, escapes=2)
  assert np.isclose(kept64(w, perm, 2, 4), brute_force(w, 2, 4), rtol=1e-6)


def test_matches_brute_force_on_12_channels_with_window_3():
  w = np.random.default_rng(7).standard_normal((12, 5)).astype(np.float32)
  perm = search_permutation(w, 2, 4, window=3, escapes=0)
  assert np.isclose(kept64(w, perm, 2, 4), brute_force(w, 2, 4), rtol=1e-6)


@pytest.mark.parametrize(
  "shape,axis,n,m",
  [
    ((32, 12), 0, 2, 4),
    ((12, 32), 1, 2, 4),
    ((2, 2, 32, 5), -2, 2, 4),
    ((4, 8, 6), (0, 1), 2, 4),
    ((32, 10), 0, 1, 4),
    ((16, 10), 0, 3, 8),
  ],
  ids=testing.param_id,
)
def test_valid_permutation_never_worse(shape, axis, n, m):
  w = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
  perm, info = search_permutation(w, n, m, axis, escapes=3 if m == 4 else 0, return_info=True)
  c = int(np.prod([shape[a] for a in ((axis,) if isinstance(axis, int) else axis)]))
  assert perm.dtype == jnp.int32 and perm.shape == (c,)
  assert sorted(np.asarray(perm).tolist()) == list(range(c))
  assert info.score.kept >= info.score.kept_identity - 1e-9
  if isinstance(axis, int):
    permuted = jnp.take(w, perm, axis=axis)
    assert np.isclose(kept64(w, perm, n, m, axis % w.ndim), info.score.kept, rtol=1e-9)
  else:
    permuted = permute_axis(w, perm, axis)
  assert sorted(np.asarray(permuted).ravel().tolist()) == sorted(np.asarray(w).ravel().tolist())


def test_deterministic_for_a_seed():
  w = np.random.default_rng(3).random((32, 40), np.float32)
  a = search_permutation(w, escapes=5, seed=11)
  b = search_permutation(w, escapes=5, seed=11)
  assert np.array_equal(np.asarray(a), np.asarray(b))
  c = search_permutation(w, escapes=5, seed=11, max_rounds=7)
  d = search_permutation(w, escapes=5, seed=11, max_rounds=7)
  assert np.array_equal(np.asarray(c), np.asarray(d))


def test_swap_strategy_and_chains():
  w = np.random.default_rng(4).random((32, 24), np.float32)
  for kw in (dict(strategy="swap", escapes=5), dict(chains=3, escapes=2)):
    perm, info = search_permutation(w, return_info=True, **kw)
    assert sorted(np.asarray(perm).tolist()) == list(range(32))
    assert info.score.kept > info.score.kept_identity


def test_permutation_score_definitions():
  w = apex_matrix()
  sc = permutation_score(w)
  # apex's published figures for this matrix: default 2:4 2852.376, 50% rows 3042.332.
  assert abs(sc.kept_identity - 2852.376) < 0.01
  assert abs(sc.bound - 3042.332) < 0.01
  assert sc.efficacy == 0.0
  assert np.isclose(sc.total, np.abs(w).astype(np.float64).sum())


def test_apex_matrix_efficacy():
  """apex's best on this matrix (OSG window 12) is 36.6%."""
  perm, info = search_permutation(apex_matrix(), 2, 4, return_info=True)
  assert info.score.efficacy >= 36.6


def test_trivial_and_invalid():
  w = jnp.ones((4, 3))
  assert np.array_equal(np.asarray(search_permutation(w)), np.arange(4))
  with pytest.raises(ValueError, match="multiple of m"):
    search_permutation(jnp.ones((6, 3)))
  with pytest.raises(ValueError, match="strategy"):
    search_permutation(jnp.ones((8, 3)), strategy="bogus")
  with pytest.raises(ValueError):
    permutation_score(jnp.ones((8, 3)), jnp.zeros(8, jnp.int32))


@pytest.mark.parametrize(
  "k, m, n", [(2, 4, 2), (2, 4, 1), (2, 4, 3), (3, 4, 2), (2, 2, 1), (2, 8, 2), (2, 5, 2)]
)
def test_window_scores_equal_the_network_bit_for_bit(k, m, n):
  """The pair-sum shortcut must give the compare-exchange network's values exactly."""
  rng = np.random.default_rng(k * 100 + m * 10 + n)
  mag = jnp.asarray(rng.random((3 * k * m, 128), np.float32))
  wc = jnp.asarray(rng.permutation(3 * k * m)[: k * m].astype(np.int32))
  subsets, _ = search_lib.window_tables(k, m)
  got = jax.jit(lambda c: search_lib._subset_scores(mag[c], k, m, n))(wc)
  want = jax.jit(lambda c: search_lib._stripe_scores(mag, c[subsets], n))(wc)
  assert np.array_equal(np.asarray(got), np.asarray(want))
  top = np.sort(np.asarray(mag)[np.asarray(wc)][subsets], axis=1)[:, m - n :]  # float64 oracle
  np.testing.assert_allclose(np.asarray(got), top.astype(np.float64).sum((1, 2)), rtol=1e-5)


def _types(tree):
  return [
    (x.shape, np.dtype(x.dtype), getattr(x, "weak_type", False)) for x in jax.tree.leaves(tree)
  ]


@pytest.mark.parametrize("kw", [dict(k=2, chains=1), dict(k=3, chains=1), dict(k=2, chains=3)])
def test_a_window_chunk_returns_the_state_type_it_takes(kw):
  """Else the second chunk of every search would compile the search again."""
  mag = search_lib._padded_matrix(np.random.default_rng(0).random((32, 20), np.float32), (0,), 128)
  job = search_lib._windows_job(mag, 2, 4, kw["k"], 2, 3, 0, kw["chains"])
  st, _ = jax.eval_shape(lambda s: job.run(mag, s, job.seeds, chunk=np.int32(5)), job.state)
  assert _types(st) == _types(jax.tree.map(jnp.asarray, job.state))


def test_a_swap_chunk_returns_the_state_type_it_takes():
  mag = search_lib._padded_matrix(np.random.default_rng(0).random((16, 20), np.float32), (0,), 128)
  job = search_lib._swap_job(mag, 2, 4, 2, 3, 0)
  st, _ = jax.eval_shape(lambda s: job.run(mag, s, job.seeds, chunk=np.int32(5)), job.state)
  assert _types(st) == _types(job.state)
