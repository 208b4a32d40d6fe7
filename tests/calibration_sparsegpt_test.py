"""jasp.calibration.sparsegpt: OBS prune-and-update against a float64 reference and
the ordering SparseGPT < Wanda < magnitude of per-layer reconstruction errors."""

import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference as ref
import testing
from zoo import basic

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
      sal = w[:, i : i + m] ** 2 / np.diag(u)[i : i + m] ** 2
      keep[:, i : i + m] = ref.nm_mask_ref(sal, n, m, 1)
    q = np.where(keep[:, i], w[:, i], 0.0)
    err = (w[:, i] - q) / u[i, i]
    w[:, i:] -= np.outer(err, u[i, i:])
    w[:, i] = q
  return w.T, keep.T


def _problem(k=40, o=12, t=200, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((t, k)) * np.exp(rng.uniform(-1.5, 1.5, k))
  x[:, 1::3] += 0.8 * x[:, ::3][:, : x[:, 1::3].shape[1]]  # correlated features
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


def authors_sparsegpt(w, h, n, m, blocksize=128, damp=0.01, dead="authors"):
  """The authors' N:M SparseGPT (``fasterprune``) in float64, as a test oracle.

  ``w (K, O)``, ``h (K, K)`` at any scale (the authors use ``2 X^T X /
  n_sequences``). ``dead="authors"``: features with ``h_ii == 0`` get
  ``h_ii = 1`` and zero weights before the damping (the damping mean then
  includes those 1's, as in the authors' code); ``dead="old"``: nothing special
  (their diagonal is the damping alone, their weights are kept: jasp's former
  behaviour). Blocks of ``blocksize`` columns, the last one shorter when ``K``
  does not divide; the mask of each aligned group of ``m`` is chosen at its
  first column from the current weights' ``w**2 / U_ii**2`` (the ``m - n``
  smallest pruned; exact ties go to the lower index, which the data avoid);
  each column's error is spread over the block's later columns at once and
  over later blocks after the block. Returns ``(w_hat (K, O), keep (K, O))``.
  """
  wt = np.array(w, np.float64).T  # (O, K): rows are outputs, as the authors'
  h = np.array(h, np.float64)
  k = h.shape[0]
  if dead == "authors":
    is_dead = np.diag(h) == 0
    h[is_dead, is_dead] = 1.0
    wt[:, is_dead] = 0.0
  h[np.diag_indices(k)] += damp * np.mean(np.diag(h))
  low_inv = np.linalg.inv(np.linalg.cholesky(h))
  u = np.linalg.cholesky(low_inv.T @ low_inv).T  # upper; u.T @ u = inv(h)
  pruned = np.zeros(wt.shape, bool)
  for b0 in range(0, k, blocksize):
    b1 = min(b0 + blocksize, k)
    blk = wt[:, b0:b1].copy()
    ub = u[b0:b1, b0:b1]
    errs = np.zeros_like(blk)
    for i in range(b1 - b0):
      if i % m == 0:
        sal = blk[:, i : i + m] ** 2 / np.diag(ub)[i : i + m] ** 2
        drop = np.argsort(sal, axis=1, kind="stable")[:, : m - n]
        np.put_along_axis(pruned[:, b0 + i : b0 + i + m], drop, True, axis=1)
      q = np.where(pruned[:, b0 + i], 0.0, blk[:, i])
      errs[:, i] = (blk[:, i] - q) / ub[i, i]
      blk[:, i:] -= np.outer(errs[:, i], ub[i, i:])
      blk[:, i] = q
    wt[:, b0:b1] = blk
    wt[:, b1:] -= errs @ u[b0:b1, b1:]
  return wt.T, ~pruned.T


def _dead_problem(k, o, n, m, seed, nseq=8, seqlen=128):
  """Heavy-tailed inputs (Student-t, 3 degrees of freedom, times log-normal
  per-feature scales, half the features correlated with a neighbour) with dead
  features: about half of the groups of ``m`` hold 1 to ``m - n`` of them (never
  more, so that no exact tie among dead features decides a mask).

  Returns ``x (nseq * seqlen, K)``, ``w (K, O)`` (float32) and ``dead (K,)``.
  """
  rng = np.random.default_rng(seed)
  x = rng.standard_t(3, (nseq * seqlen, k)) * np.exp(rng.normal(0.0, 1.5, k))
  x[:, 1::2] += 0.5 * x[:, ::2]
  dead = np.zeros(k, bool)
  for g in range(0, k, m):
    if rng.random() < 0.5:
      dead[g + rng.choice(m, rng.integers(1, m - n + 1), replace=False)] = True
  x[:, dead] = 0.0
  return x.astype(np.float32), rng.standard_normal((k, o)).astype(np.float32), dead


def _sq_error(x, w, w_hat):
  x = np.asarray(x, np.float64)
  return float(np.sum((x @ (np.asarray(w, np.float64) - np.asarray(w_hat, np.float64))) ** 2))


@pytest.mark.parametrize(
  "n,m,k,blocksize",
  [
    (2, 4, 256, 128),  # two full blocks
    (1, 4, 128, 128),
    (2, 8, 128, 64),
    (2, 4, 200, 128),  # K not a multiple of the block size: a short last block
    (2, 4, 72, 32),
  ],
)
def test_dead_features_match_the_authors_code(n, m, k, blocksize):
  nseq = 8
  x, w, dead = _dead_problem(k, 24, n, m, seed=k + m, nseq=nseq)
  x64 = x.astype(np.float64)
  h = (x64.T @ x64 / x.shape[0]).astype(np.float32)  # jasp's scale: X^T X / rows
  h_authors = 2.0 * x64.T @ x64 / nseq  # the authors' scale: 2 X^T X / n_sequences
  got, keep = cal.sparsegpt_layer(jnp.asarray(w), jnp.asarray(h), n, m, blocksize=blocksize)
  got, keep = np.asarray(got), np.asarray(keep)
  want, want_keep = authors_sparsegpt(w, h_authors, n, m, blocksize)
  old, old_keep = authors_sparsegpt(w, h_authors, n, m, blocksize, dead="old")
  # The same mask on every group, the same weights; dead rows are zero.
  np.testing.assert_array_equal(keep, want_keep)
  scale = np.abs(want).max()
  np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4 * scale)
  assert (got[dead] == 0).all() and (got[~keep] == 0).all()
  assert bool(jasp.is_nm(got, n, m, 0))
  # The data exercise the defect: the old rule keeps dead weights in some groups
  # (at live weights' expense) and reconstructs X W strictly worse.
  assert (old_keep[dead] & (old[dead] != 0)).any()
  e_new, e_old, e_jasp = _sq_error(x, w, want), _sq_error(x, w, old), _sq_error(x, w, got)
  assert e_old > e_new * (1 + 1e-4), (e_old, e_new)
  assert e_jasp <= e_old and e_jasp == pytest.approx(e_new, rel=1e-4), (e_jasp, e_new, e_old)


def test_all_zero_hessian_zeroes_the_layer():
  w = np.random.default_rng(3).standard_normal((40, 12)).astype(np.float32)
  h = jnp.zeros((40, 40), jnp.float32)
  np.testing.assert_array_equal(np.asarray(cal.inverse_hessian_factor(h)), np.eye(40))
  for dtype in (jnp.float32, jnp.bfloat16):
    got, keep = cal.sparsegpt_layer(jnp.asarray(w, dtype), h, 2, 4, blocksize=16)
    assert got.dtype == dtype
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.zeros_like(w))
    # All scores equal: the tie rule keeps the first n of every group.
    np.testing.assert_array_equal(np.asarray(keep), np.tile([[1], [1], [0], [0]], (10, 12)) > 0)
    assert bool(jasp.is_nm(keep, 2, 4, 0)) and bool(jasp.is_nm(got, 2, 4, 0))
  want, _ = authors_sparsegpt(w, np.zeros((40, 40)), 2, 4, 16)
  np.testing.assert_array_equal(want, 0.0)


def test_inverse_hessian_factor_with_dead_features():
  rng = np.random.default_rng(4)
  x = rng.standard_normal((64, 12)) * np.exp(rng.uniform(-1, 1, 12))
  dead = np.isin(np.arange(12), [0, 5, 6, 11])
  x[:, dead] = 0.0
  h = x.T @ x / 64
  u = np.asarray(cal.inverse_hessian_factor(jnp.asarray(h, jnp.float32), 0.01), np.float64)
  assert (np.tril(u, -1) == 0).all()
  h1 = h.copy()
  h1[dead, dead] = 1.0
  h1 += 0.01 * np.mean(np.diag(h)) * np.eye(12)  # dead features count 0 in the mean
  np.testing.assert_allclose(u.T @ u, np.linalg.inv(h1), rtol=1e-4, atol=1e-6)
  off = u - np.diag(np.diag(u))
  assert (off[dead] == 0).all() and (off[:, dead] == 0).all()


def test_dead_features_do_not_depend_on_the_hessian_scale():
  """The damping mean leaves the dead features out, so scaling H changes nothing
  (counting the inserted 1's would make the damping depend on the scale)."""
  x, w, dead = _dead_problem(64, 16, 2, 4, seed=6)
  x64 = x.astype(np.float64)
  base = None
  for s in (1e-6, 1.0, 1e4):
    h = jnp.asarray(s * x64.T @ x64 / x.shape[0], jnp.float32)
    got, keep = cal.sparsegpt_layer(jnp.asarray(w), h, 2, 4, blocksize=32)
    if base is None:
      base = (np.asarray(got), np.asarray(keep))
      continue
    np.testing.assert_array_equal(np.asarray(keep), base[1])
    np.testing.assert_allclose(np.asarray(got), base[0], rtol=1e-4, atol=1e-5)
  assert (base[0][dead] == 0).all()


def test_a_live_weight_always_beats_a_dead_one():
  """A live weight whose saliency w**2 / U_ii**2 underflows to 0 in float32 is
  still kept over the dead (zero) weights before it in its group."""
  w = np.array([[5.0], [-3.0], [1e-30], [2.0], [1.0], [1.0], [1.0], [1.0]], np.float32)
  h = np.diag(np.array([0.0, 0.0, 1.0, 1.0, 1.0, 2.0, 3.0, 4.0], np.float32))
  got, keep = cal.sparsegpt_layer(jnp.asarray(w), jnp.asarray(h), 2, 4, blocksize=8)
  np.testing.assert_array_equal(np.asarray(keep)[:4, 0], [False, False, True, True])
  np.testing.assert_array_equal(np.asarray(got)[:4, 0], np.float32([0.0, 0.0, 1e-30, 2.0]))


def test_pipeline_zeroes_dead_input_features():
  """sparsegpt_prune: a layer with always-zero input features gives the same
  result as sparsegpt_layer on its X^T X, dead rows zero."""
  x, w, dead = _dead_problem(32, 8, 2, 4, seed=7, nseq=2, seqlen=64)
  xs = [jnp.asarray(x[:64]), jnp.asarray(x[64:])]
  pruned, masks = cal.sparsegpt_prune(
    lambda p, b: b @ p["w"], {"w": jnp.asarray(w)}, xs, blocksize=16, progress=False
  )
  x64 = x.astype(np.float64)
  want, want_keep = authors_sparsegpt(w, 2.0 * x64.T @ x64 / 2, 2, 4, 16)
  np.testing.assert_array_equal(np.asarray(masks["w"]), want_keep)
  np.testing.assert_allclose(
    np.asarray(pruned["w"]), want, rtol=1e-3, atol=1e-4 * np.abs(want).max()
  )
  assert (np.asarray(pruned["w"])[dead] == 0).all()


def _hadamard(k):
  h = np.ones((1, 1))
  while h.shape[0] < k:
    h = np.block([[h, h], [h, -h]])
  return h


def test_whitened_inputs_make_the_pipeline_magnitude_pruning():
  """Inputs with X^T X = T * I exactly (Hadamard rows): SparseGPT = magnitude."""
  w = {"w": jnp.asarray(np.random.default_rng(2).standard_normal((32, 8)), jnp.float32)}
  x = jnp.asarray(_hadamard(64)[:, :32], jnp.float32)  # (64, 32), orthogonal columns
  pruned, masks = cal.sparsegpt_prune(lambda p, b: b @ p["w"], w, [x[:32], x[32:]], progress=False)
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
  return sum(
    float(cal.reconstruction_error(a[:, g], b[:, g], stats.hessian[g])) for g in range(s.groups)
  ) / float(stats.count)


@pytest.mark.parametrize("which", ["block", "cnn"])
@pytest.mark.slow
def test_sparsegpt_beats_wanda_beats_magnitude_on_every_layer(which):
  rng = np.random.default_rng(5)
  if which == "block":
    model = basic.TokenBlock()
    batches = [jnp.asarray(rng.integers(0, 32, (4, 16)), jnp.int32) for _ in range(2)]
  else:
    model = basic.DigitsCNN()
    pixel_scale = np.exp(rng.uniform(-2, 2, (8, 8, 1)))
    batches = [
      jnp.asarray(rng.standard_normal((32, 8, 8, 1)) * pixel_scale, jnp.float32) for _ in range(2)
    ]
  x = batches[0]
  variables = jax.jit(model.init)(jax.random.key(0), x)  # one compile, not op by op
  apply = jax.jit(model.apply)
  layouts = jasp.trace_layouts(model.apply, variables, x)
  variables = _spread(variables, layouts)
  # Every method sees the dense model's inputs (sequential=False), so the
  # per-layer errors are measured on the same X.
  mag, mag_masks = jasp.prune(variables, layouts=layouts)
  wanda, wanda_masks = cal.wanda_prune(
    model.apply, variables, batches, layouts=layouts, progress=False
  )
  results = []
  sgpt, sgpt_masks = cal.sparsegpt_prune(
    model.apply,
    variables,
    batches,
    layouts=layouts,
    sequential=False,
    progress=False,
    callback=results.append,
  )
  stats = cal.collect_stats(model.apply, variables, batches, hessian=True)
  dense = _tree.leaves_by_path(variables)
  leaves = [_tree.leaves_by_path(t) for t in (mag, wanda, sgpt)]
  pruned = [
    p for p, mk in _tree.leaves_by_path(sgpt_masks, keep_none=True).items() if mk is not None
  ]
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
  p = {
    k: jnp.asarray(rng.standard_normal(s), jnp.float32)
    for k, s in (("a", (16, 32)), ("b", (16, 32)), ("c", (32, 8)))
  }
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


def _stacked_block(h, w):
  return h + jax.nn.gelu(h @ w["up"]) @ w["down"]


@pytest.mark.parametrize("method", ["sparsegpt", "wanda"])
@pytest.mark.slow
def test_scan_stacked_layers_prune_like_the_unrolled_model(method):
  """Layer l+1 of a scan is calibrated on the output of pruned layer l, as when unrolled."""
  depth = 3

  def scanned(p, x):
    x = x @ p["emb"]
    x, _ = jax.lax.scan(lambda h, w: (jax.checkpoint(_stacked_block)(h, w), None), x, p["blocks"])
    return x @ p["head"]

  def unrolled(p, x):
    x = x @ p["emb"]
    for w in p["blocks"]:
      x = _stacked_block(x, w)
    return x @ p["head"]

  rng = np.random.default_rng(0)

  def r(*s):
    return jnp.asarray(rng.standard_normal(s) / np.sqrt(s[-2]), jnp.float32)

  ps = {
    "emb": r(8, 16),
    "blocks": {"up": r(depth, 16, 32), "down": r(depth, 32, 16)},
    "head": r(16, 8),
  }
  pu = {
    "emb": ps["emb"],
    "head": ps["head"],
    "blocks": [{k: ps["blocks"][k][i] for k in ("up", "down")} for i in range(depth)],
  }
  xs = [jnp.asarray(rng.standard_normal((16, 8)), jnp.float32) for _ in range(3)]
  prune = cal.sparsegpt_prune if method == "sparsegpt" else cal.wanda_prune
  kw = {"blocksize": 16} if method == "sparsegpt" else {}
  seen = []
  a, ma = prune(
    scanned,
    ps,
    xs,
    progress=False,
    sequential=True,
    callback=lambda res: seen.append((res.path, res.layer)),
    **kw,
  )
  b, mb = prune(unrolled, pu, xs, progress=False, sequential=True, **kw)
  assert seen[1:-1] == [("blocks/" + k, (i,)) for i in range(depth) for k in ("up", "down")]
  for i in range(depth):
    for k in ("up", "down"):
      np.testing.assert_array_equal(np.asarray(ma["blocks"][k][i]), np.asarray(mb["blocks"][i][k]))
      # Equal up to float32 reassociation (XLA fuses the scanned and unrolled programs
      # differently on GPUs: up to 1e-4 relative seen on an H200).
      np.testing.assert_allclose(
        np.asarray(a["blocks"][k][i]), np.asarray(b["blocks"][i][k]), rtol=1e-3, atol=1e-5
      )


_COMPILES: list[str] = []


def _count_compile(event, duration, **_):
  if event == "/jax/core/compile/backend_compile_duration":
    _COMPILES.append(event)


jax.monitoring.register_event_duration_secs_listener(_count_compile)


def _compilations(run) -> int:
  """XLA compilations while ``run()`` runs, from empty JAX caches (so that what other
  tests in the process compiled before cannot change the count)."""
  jax.clear_caches()
  before = len(_COMPILES)
  run()
  return len(_COMPILES) - before


@pytest.mark.parametrize("sequential", [True, False])
def test_a_deeper_stack_compiles_no_more_programs(sequential):
  """Every layer of a scanned stack of equal blocks reuses the programs of the
  first (statistics pass, layer slicing, the SparseGPT step): the number of
  compilations does not grow with the depth."""
  rng = np.random.default_rng(0)

  def scanned(p, x):
    x, _ = jax.lax.scan(lambda h, w: (_stacked_block(h, w), None), x @ p["emb"], p["blocks"])
    return x @ p["head"]

  def params(depth):
    def r(*s):
      return jnp.asarray(rng.standard_normal(s) / np.sqrt(s[-2]), jnp.float32)

    return {  # widths of their own: no other test compiles these shapes
      "emb": r(8, 12),
      "blocks": {"up": r(depth, 12, 20), "down": r(depth, 20, 12)},
      "head": r(12, 8),
    }

  xs = [jnp.asarray(rng.standard_normal((16, 8)), jnp.float32) for _ in range(2)]

  def prune(depth):
    p = params(depth)
    return lambda: jax.block_until_ready(
      cal.sparsegpt_prune(scanned, p, xs, blocksize=16, progress=False, sequential=sequential)
    )

  prune(2)()  # programs that do not depend on the depth
  shallow, deep = _compilations(prune(3)), _compilations(prune(7))
  assert deep == shallow, (shallow, deep)


_SPLIT_SOLVE = textwrap.dedent("""
    import sys
    import jax, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    sys.path.insert(0, "benchmarks")
    import jasp, llm_oneshot as lo
    from jasp.calibration import _driver, sparsegpt as sg
    params = lo.init_params(jax.random.key(0), 2, 64, 176, 4, 4, 256)
    mesh = jax.make_mesh((2,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    params = jax.device_put(params, NamedSharding(mesh, P()))
    batches = [jax.device_put(lo.bigram_tokens(s, 2, 32, 256), NamedSharding(mesh, P("data")))
               for s in range(2)]
    outs, shardings = [], []
    real_leaf = sg._sparsegpt_leaf
    def spy(*a):
      out = real_leaf(*a)
      shardings.append(out[0].sharding)
      return out
    sg._sparsegpt_leaf = spy
    got = jasp.sparsegpt_prune(lo.hidden_states, params, batches, sequential=True, progress=False)
    assert any(not s.is_fully_replicated for s in shardings)  # solves split over the devices
    assert all(x.sharding == NamedSharding(mesh, P()) for x in jax.tree.leaves(got[0]))
    _driver.solve_split = lambda data, site: None  # the same run, every solve on every device
    want = jasp.sparsegpt_prune(lo.hidden_states, params, batches, sequential=True, progress=False)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    print("ok")
""")


@pytest.mark.slow
def test_solve_split_over_the_batches_devices_changes_nothing():
  # Each output's OBS solve is independent given the Hessian: splitting the
  # outputs over devices gives the very same weights and masks, and the params
  # keep the layout they were given.
  r = testing.run_on_cpu_devices(_SPLIT_SOLVE, 2)
  assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-3000:]
