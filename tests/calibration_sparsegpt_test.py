"""jasp.calibration.sparsegpt: OBS prune-and-update against a float64 reference and
the ordering SparseGPT < Wanda < magnitude of per-layer reconstruction errors."""

import jax
import jax.numpy as jnp
import models
import numpy as np
import pytest
import reference as ref

import jasp
from jasp import _tree
from jasp import calibration as cal


def sparsegpt_ref(w, h, n, m, damp=0.01):
  """Float64, one column at a time, every later column updated at once (no blocks).

  ``w (K, O)``, ``h (K, K)``; returns ``(w_hat, keep)``.
  """
  w = np.asarray(w, np.float64).T.copy()  # (O, K)
  h = np.asarray(h, np.float64)
  k = h.shape[0]
  h = h + damp * np.mean(np.diag(h)) * np.eye(k)
  u = np.linalg.cholesky(np.linalg.inv(h)).T  # upper, u.T @ u = inv(h)
  keep = np.zeros(w.shape, bool)
  for i in range(k):
    if i % m == 0:
      sal = w[:, i:i + m] ** 2 / np.diag(u)[i:i + m] ** 2
      keep[:, i:i + m] = ref.nm_mask_ref(sal, n, m, 1)
    q = np.where(keep[:, i], w[:, i], 0.0)
    err = (w[:, i] - q) / u[i, i]
    w[:, i:] -= np.outer(err, u[i, i:])
    w[:, i] = q
  return w.T, keep.T


def _problem(k=40, o=12, t=200, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((t, k)) * np.exp(rng.uniform(-1.5, 1.5, k))
  x[:, 1::3] += 0.8 * x[:, ::3][:, :x[:, 1::3].shape[1]]  # correlated features
  w = rng.standard_normal((k, o))
  return w.astype(np.float32), (x.T @ x).astype(np.float32)


@pytest.mark.parametrize("n,m,blocksize", [(2, 4, 16), (2, 4, 128), (1, 4, 8), (3, 8, 16)])
def test_layer_matches_float64_reference(n, m, blocksize):
  w, h = _problem()
  got, keep = cal.sparsegpt_layer(jnp.asarray(w), jnp.asarray(h), n, m, blocksize=blocksize)
  want, want_keep = sparsegpt_ref(w, h, n, m)
  np.testing.assert_array_equal(np.asarray(keep), want_keep)
  np.testing.assert_allclose(np.asarray(got), want, rtol=2e-3, atol=2e-4)
  assert bool(jasp.is_nm(got, n, m, 0)) and (np.asarray(got)[~np.asarray(keep)] == 0).all()
  # The OBS updates pay off: lower error than pruning the same mask without them.
  e_obs = float(cal.reconstruction_error(w, got, h))
  e_mask = float(cal.reconstruction_error(w, np.where(keep, w, 0), h))
  assert e_obs < e_mask


def test_identity_hessian_is_magnitude_pruning():
  w = np.random.default_rng(1).standard_normal((40, 24)).astype(np.float32)
  got, keep = cal.sparsegpt_layer(jnp.asarray(w), 3.0 * jnp.eye(40), 2, 4, blocksize=16)
  mask = ref.nm_mask_ref(w, 2, 4, 0)
  np.testing.assert_array_equal(np.asarray(keep), mask)
  np.testing.assert_array_equal(np.asarray(got), np.where(mask, w, 0))


def _hadamard(k):
  h = np.ones((1, 1))
  while h.shape[0] < k:
    h = np.block([[h, h], [h, -h]])
  return h


def test_whitened_inputs_make_the_pipeline_magnitude_pruning():
  """Inputs with X^T X = T * I exactly (Hadamard rows): SparseGPT = magnitude."""
  w = {"w": jnp.asarray(np.random.default_rng(2).standard_normal((32, 8)), jnp.float32)}
  x = jnp.asarray(_hadamard(64)[:, :32], jnp.float32)  # (64, 32), orthogonal columns
  pruned, masks = cal.sparsegpt_prune(lambda p, b: b @ p["w"], w, [x[:32], x[32:]],
                                      progress=False)
  mask = ref.nm_mask_ref(w["w"], 2, 4, 0)
  np.testing.assert_array_equal(np.asarray(masks["w"]), mask)
  np.testing.assert_array_equal(np.asarray(pruned["w"]), np.where(mask, w["w"], 0))


def _spread(variables, layouts, seed=0):
  """Very unequal input-feature norms everywhere: every kernel's output channels
  and every norm scale multiplied by log-uniform factors in [e^-2, e^2]."""
  rng = np.random.default_rng(seed)

  def f(path, x):
    lay = layouts.get(path)
    if lay is not None and lay.kind in ("dot", "conv"):
      shape = [x.shape[a] if a in lay.out_axes else 1 for a in range(x.ndim)]
      return x * jnp.asarray(np.exp(rng.uniform(-2, 2, shape)), x.dtype)
    if path.endswith("scale"):
      return x * jnp.asarray(np.exp(rng.uniform(-2, 2, x.shape)), x.dtype)
    return x
  return _tree.map_with_path(f, variables)


def _layer_error(w, w_hat, stats):
  s = stats.site
  a = cal.to_matrix(w, s).reshape(s.k, s.groups, -1)
  b = cal.to_matrix(w_hat, s).reshape(s.k, s.groups, -1)
  return sum(float(cal.reconstruction_error(a[:, g], b[:, g], stats.hessian[g]))
             for g in range(s.groups)) / float(stats.count)


@pytest.mark.parametrize("which", ["block", "cnn"])
def test_sparsegpt_beats_wanda_beats_magnitude_on_every_layer(which):
  rng = np.random.default_rng(5)
  if which == "block":
    model = models.LinenBlock()
    batches = [jnp.asarray(rng.integers(0, 32, (4, 16)), jnp.int32) for _ in range(2)]
  else:
    model = models.LinenCNN()
    pixel_scale = np.exp(rng.uniform(-2, 2, (8, 8, 1)))
    batches = [jnp.asarray(rng.standard_normal((32, 8, 8, 1)) * pixel_scale, jnp.float32)
               for _ in range(2)]
  x = batches[0]
  variables = jax.jit(model.init)(jax.random.key(0), x)  # one compile, not op by op
  apply = jax.jit(model.apply)
  layouts = jasp.trace_layouts(model.apply, variables, x)
  variables = _spread(variables, layouts)
  # Every method sees the dense model's inputs (sequential=False), so the
  # per-layer errors are measured on the same X.
  mag, mag_masks = jasp.prune(variables, layouts=layouts)
  wanda, wanda_masks = cal.wanda_prune(model.apply, variables, batches, layouts=layouts,
                                       progress=False)
  results = []
  sgpt, sgpt_masks = cal.sparsegpt_prune(model.apply, variables, batches, layouts=layouts,
                                         sequential=False, progress=False,
                                         callback=results.append)
  stats = cal.collect_stats(model.apply, variables, batches, hessian=True)
  dense = _tree.leaves_by_path(variables)
  leaves = [_tree.leaves_by_path(t) for t in (mag, wanda, sgpt)]
  pruned = [p for p, mk in _tree.leaves_by_path(sgpt_masks, keep_none=True).items()
            if mk is not None]
  assert len(pruned) == (7 if which == "block" else 4)
  by_path = {r.path: r for r in results}
  for p in pruned:
    for tree in (mag_masks, wanda_masks, sgpt_masks):
      assert _tree.leaves_by_path(tree, keep_none=True)[p] is not None
    axis = layouts[p].axis
    e_mag, e_wanda, e_sgpt = (_layer_error(dense[p], lv[p], stats[p]) for lv in leaves)
    assert e_sgpt < e_wanda < e_mag, (p, e_sgpt, e_wanda, e_mag)
    assert bool(jasp.is_nm(leaves[2][p], 2, 4, axis)) and bool(jasp.is_nm(leaves[1][p], 2, 4, axis))
    np.testing.assert_allclose(by_path[p].error, e_sgpt, rtol=1e-3)
  # The whole model: the output moves least under SparseGPT.
  y = apply(variables, x)
  out = [float(jnp.mean((apply(t, x) - y) ** 2)) for t in (mag, wanda, sgpt)]
  assert out[2] < out[1] < out[0], out


def test_sequential_stages_and_one_layer_per_pass():
  def f(p, x):  # two independent branches, then a layer that reads both
    return jnp.tanh(x @ p["a"] + jnp.sin(x) @ p["b"]) @ p["c"]

  rng = np.random.default_rng(0)
  p = {k: jnp.asarray(rng.standard_normal(s), jnp.float32)
       for k, s in (("a", (16, 32)), ("b", (16, 32)), ("c", (32, 8)))}
  xs = [jnp.asarray(rng.standard_normal((64, 16)) * np.exp(rng.uniform(-2, 2, 16)), jnp.float32)]
  seen = []
  seq, _ = cal.sparsegpt_prune(f, p, xs, blocksize=16, progress=False, callback=seen.append)
  assert [(r.path, r.stage) for r in seen] == [("a", 0), ("b", 0), ("c", 1)]
  one, _ = cal.sparsegpt_prune(f, p, xs, blocksize=16, progress=False, layers_per_pass=1)
  for k in p:  # a and b read the same unpruned input either way
    np.testing.assert_array_equal(np.asarray(one[k]), np.asarray(seq[k]))
  # "c" is calibrated on the pruned branches' outputs: its own error is the one
  # reported, and differs from the one-pass (dense inputs) result.
  flat, _ = cal.sparsegpt_prune(f, p, xs, blocksize=16, progress=False, sequential=False)
  assert not np.allclose(np.asarray(flat["c"]), np.asarray(seq["c"]))
  np.testing.assert_array_equal(np.asarray(flat["a"]), np.asarray(seq["a"]))
  h = np.asarray(xs[0] @ seq["a"] + jnp.sin(xs[0]) @ seq["b"], np.float64)
  h = np.tanh(h)
  err = ((h @ (np.asarray(p["c"], np.float64) - np.asarray(seq["c"], np.float64))) ** 2).sum()
  np.testing.assert_allclose(seen[2].error, err / 64, rtol=1e-3)
