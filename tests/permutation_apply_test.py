"""Tests of model-level channel permutation: same function, more magnitude kept."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import testing
from flax import nnx
from zoo import permutation as pm

import jasp
from jasp.permutation.apply import permute

KW = dict(escapes=3, time_limit=None)


def kept_by_mask(tree, layers, n=2, m=4):
  """{path: sum |w| kept by nm_mask} using the library's own mask."""
  leaves = jasp._tree.leaves_by_path(tree)
  out = {}
  for lr in layers:
    w = leaves[lr.path]
    mask = jasp.nm_mask(w, n, m, lr.axis)
    out[lr.path] = float(jnp.sum(jnp.abs(w) * mask))
  return out


def check(report, before_tree, after_tree, expect_permuted):
  assert report.max_rel_error is not None and report.max_rel_error <= 1e-5
  permuted = [lr for lr in report.layers if lr.permuted]
  assert {lr.path for lr in permuted} >= set(expect_permuted)
  k0 = kept_by_mask(before_tree, report.layers)
  k1 = kept_by_mask(after_tree, report.layers)
  for lr in report.layers:
    if lr.permuted:
      assert k1[lr.path] > k0[lr.path], lr.path  # strictly more on every permuted layer
      assert lr.kept_after > lr.kept_before
    else:
      assert np.isclose(k1[lr.path], k0[lr.path], rtol=1e-6), lr.path


@pytest.mark.slow
def test_linen_cnn_batchnorm_residual_flatten():
  model, v, x = pm.residual_cnn()
  new, rep = permute(model.apply, v, x, **KW)
  assert testing.rel_err(model.apply(new, x), model.apply(v, x)) <= 1e-5
  check(
    rep,
    v,
    new,
    [
      "params/Conv_1/kernel",
      "params/Conv_2/kernel",
      "params/Conv_3/kernel",
      "params/Dense_0/kernel",
      "params/Dense_1/kernel",
    ],
  )
  # BatchNorm statistics moved with their channels.
  (res,) = [c for c in rep.classes if ("batch_stats/BatchNorm_0/mean", 0) in c.members]
  assert res.status == "permuted"
  assert ("batch_stats/BatchNorm_1/var", 0) in res.members
  assert ("params/Dense_0/kernel", 0) in res.members  # the flatten
  assert not np.array_equal(
    np.asarray(new["batch_stats"]["BatchNorm_0"]["mean"]),
    np.asarray(v["batch_stats"]["BatchNorm_0"]["mean"]),
  )
  assert any("input" in c.reason for c in rep.classes)
  assert "permuted" in str(rep)


def test_nnx_cnn():
  model, x = pm.nnx_residual_cnn()
  y0 = model(x)
  new, rep = permute(model, x, **KW)
  assert testing.rel_err(new(x), y0) <= 1e-5
  assert testing.rel_err(model(x), y0) == 0.0  # the argument is untouched
  before = jasp._tree.unbox(nnx.state(model))
  after = jasp._tree.unbox(nnx.state(new))
  check(rep, before, after, ["c1/kernel", "c2/kernel", "c3/kernel", "fc/kernel", "head/kernel"])


@pytest.mark.slow
def test_linen_transformer_block():
  model, v, x = pm.prenorm_block()
  new, rep = permute(model.apply, v, x, **KW)
  assert testing.rel_err(model.apply(new, x), model.apply(v, x)) <= 1e-5
  att = "params/MultiHeadDotProductAttention_0/"
  check(rep, v, new, ["params/Dense_2/kernel", att + "out/kernel", att + "query/kernel"])


def test_nnx_transformer_block():
  model, x = pm.nnx_prenorm_block()
  y0 = model(x)
  new, rep = permute(model, x, **KW)
  assert testing.rel_err(new(x), y0) <= 1e-5
  before = jasp._tree.unbox(nnx.state(model))
  after = jasp._tree.unbox(nnx.state(new))
  check(rep, before, after, ["down/kernel", "attn/out/kernel"])


def test_order_dependent_op_leaves_layers_unpermuted():
  model, v, x = pm.prenorm_block()

  def apply(variables, x):  # reverses the hidden channels of the MLP: order matters
    p = variables["params"]
    h = jax.nn.gelu(x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"])
    h = jnp.flip(h, axis=-1)
    return h @ p["Dense_3"]["kernel"]

  new, rep = permute(apply, v, x, **KW)
  assert testing.rel_err(apply(new, x), apply(v, x)) <= 1e-5
  (c,) = [c for c in rep.classes if ("params/Dense_0/kernel", 1) in c.members]
  assert c.status == "skipped" and "rev" in c.reason
  assert not rep.permuted


def test_plan_permutes_optimizer_state_and_prune_follows():
  model, v, x = pm.residual_cnn()
  tx = optax.adam(1e-3)
  opt_state = tx.init(v["params"])
  grads = jax.grad(lambda p: jnp.sum(model.apply({**v, "params": p}, x) ** 2))(v["params"])
  _, opt_state = tx.update(grads, opt_state, v["params"])
  new, rep = permute(model.apply, v, x, **KW)
  moved = rep.plan.apply(opt_state)
  mu0 = opt_state[0].mu["Conv_1"]["kernel"]
  mu1 = moved[0].mu["Conv_1"]["kernel"]
  perms = rep.plan.leaves["params/Conv_1/kernel"]
  expect = mu0
  for ax, p in enumerate(perms):
    if p is not None:
      expect = jnp.take(expect, jnp.asarray(p), axis=ax)
  assert np.array_equal(np.asarray(mu1), np.asarray(expect))
  # The inverse plan restores the variables.
  back = rep.plan.inverse().apply(new)
  for a, b in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(v)):
    assert np.array_equal(np.asarray(a), np.asarray(b))
  # Pruning the permuted variables keeps more than pruning the original.
  layouts = jasp.trace_layouts(model.apply, v, x)
  s0, _ = jasp.prune(v, 2, 4, layouts=layouts)
  s1, _ = jasp.prune(new, 2, 4, layouts=layouts)
  mag = lambda t: sum(
    float(jnp.abs(t["params"][k]["kernel"]).sum())
    for k in ("Conv_1", "Conv_2", "Conv_3", "Dense_0", "Dense_1")
  )
  assert mag(s1) > mag(s0)


@pytest.mark.slow
def test_shared_cnn_grouped_and_1d_convs_keep_function():
  """The shared test CNN (grouped conv, 1-D conv over a reshape) keeps its function."""
  from zoo import basic

  model, v, x = basic.digits_cnn()
  v = pm.perturb(v, 5)
  new, rep = permute(model.apply, v, x, **KW)
  assert testing.rel_err(model.apply(new, x), model.apply(v, x)) <= 1e-5
  for lr in rep.layers:
    assert lr.kept_after >= lr.kept_before - 1e-9


def test_report_text_leads_with_a_summary_defines_efficacy_and_repeats_nothing():
  model, v, x = pm.residual_cnn()
  _, rep = permute(model.apply, v, x, escapes=1, max_rounds=200, time_limit=None)
  searched = [c for c in rep.classes if c.status in ("permuted", "identity")]
  assert rep.permuted and len(rep.searched) == len(searched)

  # Efficacy: the share of the gap to the unstructured bound won back.
  for c in searched:
    assert c.kept_before <= c.kept_after <= c.bound * (1 + 1e-6)
  gap = sum(c.bound - c.kept_before for c in searched)
  won = sum(c.kept_after - c.kept_before for c in searched)
  assert np.isclose(rep.efficacy, 100 * won / gap) and 0 < rep.efficacy <= 100
  for c in rep.permuted:
    if len(c.consumers) == 1:  # one consumer: the search's matrix is the report's
      own = 100 * (c.kept_after - c.kept_before) / (c.bound - c.kept_before)
      assert np.isclose(own, c.efficacy, atol=0.05)

  text = rep.format(3)
  lines = text.splitlines()
  assert lines[0].startswith(
    f"channel permutation for 2:4: {len(rep.permuted)} of {len(rep.classes)} channel "
    f"dimension(s) permuted ({len(searched)} searched, {len(rep.classes) - len(searched)} "
    "skipped)"
  )
  assert lines[1].startswith(f"  efficacy {rep.efficacy:.1f}% over the {len(searched)} searched")
  assert "100 * (kept after - kept before) / (bound - kept before)" in text
  assert len(lines) == len(set(lines))  # the two 6-tap classes of the flatten print once
  assert "a spatial axis of a convolution: params/Dense_0/kernel[0] (x2)" in text
  assert lines.index("  permuted:") < lines.index("  skipped:")
  assert str(rep) == rep.format(2) and "  permuted:" not in rep.format(1)
