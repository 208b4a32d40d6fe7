"""jasp.pruning: compute_masks / apply_masks / prune on real linen and nnx models."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference as ref
from flax import nnx
from zoo import basic

import jasp
from jasp import _tree


def _check_pruned(params, pruned, masks, layouts):
  before = _tree.leaves_by_path(params)
  after = _tree.leaves_by_path(pruned)
  mk = _tree.leaves_by_path(masks, keep_none=True)
  assert set(mk) == set(before)
  n_pruned = 0
  for p, w in before.items():
    if mk[p] is None:
      np.testing.assert_array_equal(np.asarray(after[p]), np.asarray(w))
      continue
    n_pruned += 1
    axis = layouts[p].axis if layouts else None
    m, a = np.asarray(mk[p]), np.asarray(after[p])
    assert m.dtype == bool and m.shape == w.shape
    # Kept entries are bit-identical, dropped ones exactly 0.
    np.testing.assert_array_equal(a[m].view(np.uint8), np.asarray(w)[m].view(np.uint8))
    assert (a[~m] == 0).all()
    if axis is not None:
      np.testing.assert_array_equal(
        m, ref.nm_mask_ref(np.asarray(w, np.float64), 2, 4, axis if len(axis) > 1 else axis[0])
      )
      assert bool(jasp.is_nm(a, 2, 4, axis))
  return n_pruned


@pytest.mark.parametrize("which", ["cnn", "block"])
def test_prune_linen(which):
  model, variables, x = basic.digits_cnn() if which == "cnn" else basic.token_block()
  lay = jasp.trace_layouts(model.apply, variables, x)
  pruned, masks = jasp.prune(variables, layouts=lay)
  assert _check_pruned(variables, pruned, masks, lay) >= 4
  # The pruned model still runs and the embedding stays dense.
  model.apply(pruned, x)
  if which == "block":
    assert masks["params"]["Embed_0"]["embedding"] is None
    assert masks["params"]["MultiHeadDotProductAttention_0"]["out"]["kernel"] is not None


def test_prune_nnx_state_and_update_model():
  model, tokens = basic.nnx_token_block()
  state = nnx.state(model, nnx.Param)
  lay = jasp.trace_layouts(model, tokens)
  pruned, masks = jasp.prune(state, layouts=lay)
  assert isinstance(masks, nnx.State)
  assert _check_pruned(state, pruned, masks, lay) == 8  # conv, q, k, v, out, up, down, head
  nnx.update(model, pruned)
  assert bool(jasp.is_nm(model.up.kernel[...], 2, 4, 0))
  model(tokens)


def test_prune_without_trace_uses_conventions():
  _, variables, _ = basic.digits_cnn()
  pruned, masks = jasp.prune(variables)
  assert masks["params"]["Dense_0"]["kernel"] is not None
  assert masks["params"]["Conv_1"]["kernel"] is not None
  assert masks["params"]["Conv_0"]["kernel"] is None  # in=1


def test_idempotent():
  model, variables, x = basic.token_block()
  lay = jasp.trace_layouts(model.apply, variables, x)
  p1, m1 = jasp.prune(variables, layouts=lay)
  p2, m2 = jasp.prune(p1, layouts=lay)
  for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  for a, b in zip(jax.tree.leaves(m1), jax.tree.leaves(m2)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_params(dtype):
  model, variables, x = basic.digits_cnn()
  lay = jasp.trace_layouts(model.apply, variables, x)
  low = jax.tree.map(lambda a: a.astype(dtype), variables)
  pruned, masks = jasp.prune(low, layouts=lay)
  _check_pruned(low, pruned, masks, lay)


@pytest.mark.parametrize("bad", [jnp.nan, jnp.inf, -jnp.inf])
def test_non_finite_raises_with_path(bad):
  model, variables, x = basic.digits_cnn()
  variables = jax.tree.map(lambda a: a, variables)
  k = variables["params"]["Dense_0"]["kernel"]
  variables["params"]["Dense_0"]["kernel"] = k.at[3, 2].set(bad)
  with pytest.raises(ValueError, match="params/Dense_0/kernel"):
    jasp.prune(variables)
  # A NaN in a leaf that stays dense is not an error.
  variables["params"]["Dense_0"]["kernel"] = k
  variables["params"]["Dense_0"]["bias"] = variables["params"]["Dense_0"]["bias"].at[0].set(bad)
  jasp.prune(variables)


def test_apply_masks_mismatch_errors():
  _, variables, _ = basic.digits_cnn()
  masks = jasp.compute_masks(variables)
  bad = jax.tree.map(lambda a: a, masks, is_leaf=lambda x: x is None)
  del bad["params"]["Dense_1"]
  with pytest.raises(ValueError, match="params/Dense_1/bias"):
    jasp.apply_masks(variables, bad)
  bad = jax.tree.map(lambda a: a, masks, is_leaf=lambda x: x is None)
  bad["params"]["Dense_0"]["kernel"] = jnp.ones((4, 4), bool)
  with pytest.raises(ValueError, match="params/Dense_0/kernel.*shape"):
    jasp.apply_masks(variables, bad)
  bad = jax.tree.map(lambda a: a, masks, is_leaf=lambda x: x is None)
  bad["params"]["extra"] = None
  with pytest.raises(ValueError, match="params/extra"):
    jasp.apply_masks(variables, bad)


def test_apply_masks_jit_and_masks_as_arguments():
  _, variables, _ = basic.digits_cnn()
  masks = jasp.compute_masks(variables)
  f = jax.jit(jasp.apply_masks)
  out = f(variables, masks)
  for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(jasp.apply_masks(variables, masks))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  jaxpr = jax.make_jaxpr(jasp.apply_masks)(variables, masks)
  assert not any(np.size(c) > 1 for c in jaxpr.consts)


@pytest.mark.parametrize("pattern", ["2d_best", "2d_greedy"])
def test_transposable_patterns(pattern):
  model, variables, x = basic.token_block()
  lay = jasp.trace_layouts(model.apply, variables, x)
  pruned, masks = jasp.prune(
    variables, layouts=lay, pattern=pattern, policy=jasp.Policy(exclude=["Dense_0"])
  )  # 32 -> vocab 32 fine
  att = masks["params"]["MultiHeadDotProductAttention_0"]
  q = np.asarray(att["query"]["kernel"]).reshape(32, 32)
  assert bool(jasp.is_nm(q, 2, 4, 0)) and bool(jasp.is_nm(q, 2, 4, 1))
  o = np.asarray(att["out"]["kernel"]).reshape(32, 32)
  assert bool(jasp.is_nm(o, 2, 4, 0)) and bool(jasp.is_nm(o, 2, 4, 1))
  if pattern == "2d_best":
    np.testing.assert_array_equal(
      o,
      ref.nm_mask_2d_best_ref(
        np.asarray(variables["params"]["MultiHeadDotProductAttention_0"]["out"]["kernel"]).reshape(
          32, 32
        ),
        2,
        4,
      ),
    )


def test_transposable_needs_divisible_out():
  _, variables, _ = basic.digits_cnn()
  with pytest.raises(ValueError, match="Dense_1/kernel"):
    jasp.compute_masks(variables, pattern="2d_best")  # Dense_1 has out=10


def test_score_fn_and_custom_pattern():
  _, variables, _ = basic.digits_cnn()
  k = variables["params"]["Dense_0"]["kernel"]
  scale = jnp.linspace(0.1, 3.0, k.shape[0])[:, None]  # a per-input-channel statistic
  masks = jasp.compute_masks(
    variables, score_fn=lambda p, w: jnp.abs(w) * scale if "Dense_0" in p else jnp.abs(w)
  )
  np.testing.assert_array_equal(
    np.asarray(masks["params"]["Dense_0"]["kernel"]),
    ref.nm_mask_ref(np.abs(np.asarray(k)) * np.asarray(scale), 2, 4, 0),
  )
  calls = []

  def first_two(w, n, m, axis):
    calls.append(axis)
    idx = jnp.arange(w.shape[axis]) % m < n
    return jnp.broadcast_to(jnp.expand_dims(idx, [a for a in range(w.ndim) if a != axis]), w.shape)

  masks = jasp.compute_masks(variables, pattern=first_two)
  assert (
    calls
    and bool(masks["params"]["Dense_0"]["kernel"][0, 0])
    and not bool(masks["params"]["Dense_0"]["kernel"][2, 0])
  )


def test_other_nm():
  _, variables, _ = basic.digits_cnn()
  for n, m in [(1, 4), (4, 8), (2, 8)]:
    pruned, masks = jasp.prune(variables, n, m)
    k = pruned["params"]["Dense_0"]["kernel"]
    assert bool(jasp.is_nm(k, n, m, 0))
    if n > 1:  # exactly n kept: the weight is not (n-1):m
      assert not bool(jasp.is_nm(k, n - 1, m, 0))
    else:  # 1:m keeps a single non-zero per group, so it is not sparser than that
      assert bool((np.asarray(k).reshape(-1, m, k.shape[1]) != 0).sum(1).max() == 1)


# ----------------------------------------------------------------------------
# Misuse that must be an error, naming the leaf, the argument and the fix.


@pytest.mark.parametrize("fn", [jasp.prune, jasp.compute_masks])
def test_nothing_prunable_for_this_m_is_an_error(fn):
  # No input size of the CNN (1, 8, 32, 2048, 64) is a multiple of 3: every weight would
  # be skipped and the params returned unchanged.
  model, variables, x = basic.digits_cnn()
  lay = jasp.trace_layouts(model.apply, variables, x)
  with pytest.raises(
    ValueError,
    match=r"nothing can be pruned 2:3: 5 matmul/conv weight\(s\) "
    r"were skipped because their input size is not a multiple of m=3",
  ):
    fn(variables, 2, 3, layouts=lay)
  with pytest.raises(ValueError, match="'params/Conv_0/kernel' \\(shape \\(3, 3, 1, 16\\)"):
    fn(variables, 1, 3)
  # Some weights skipped and others pruned is the normal case (the 1-channel stem conv).
  _, masks = jasp.prune(variables, 2, 8, layouts=lay)
  assert (
    masks["params"]["Conv_0"]["kernel"] is None and masks["params"]["Conv_2"]["kernel"] is not None
  )
  # A policy that keeps every weight dense on purpose is no error.
  jasp.compute_masks(variables, 2, 3, policy=jasp.Policy(include=["nothing"]))


def test_under_jit_non_finite_weights_are_kept_not_checked():
  # On concrete arrays a NaN/Inf weight is an error; under jit its value cannot be read
  # back, and the masks rank it as the largest magnitude (kept), with or without a
  # score_fn, so it stays visible in the pruned params.
  _, variables, _ = basic.digits_cnn()
  k = variables["params"]["Dense_0"]["kernel"]
  k = k.at[0, 0].set(jnp.nan).at[1, 1].set(jnp.inf).at[2, 2].set(-jnp.inf)
  variables["params"]["Dense_0"]["kernel"] = k
  want = np.asarray(jasp.nm_mask(k, 2, 4, 0))
  assert want[0, 0] and want[1, 1] and want[2, 2]
  for kw in ({}, {"score_fn": lambda p, w: jnp.abs(w)}):
    with pytest.raises(ValueError, match="params/Dense_0/kernel"):
      jasp.prune(variables, **kw)
    pruned, masks = jax.jit(lambda v, kw=kw: jasp.prune(v, **kw))(variables)
    np.testing.assert_array_equal(np.asarray(masks["params"]["Dense_0"]["kernel"]), want)
    got = np.asarray(pruned["params"]["Dense_0"]["kernel"])
    assert np.isnan(got[0, 0]) and got[1, 1] == np.inf and got[2, 2] == -np.inf


def test_malformed_arguments_are_named():
  _, variables, _ = basic.digits_cnn()
  with pytest.raises(TypeError, match=r"n=True \(bool\)"):
    jasp.prune(variables, True, 4)
  with pytest.raises(ValueError, match="1 <= n < m"):
    jasp.compute_masks(variables, -1, 4)
  with pytest.raises(TypeError, match="score_fn must be a callable"):
    jasp.compute_masks(variables, score_fn=3)
  with pytest.raises(ValueError, match="pattern must be"):
    jasp.compute_masks({"bias": jnp.ones(4)}, pattern="2d")
  # A leaf that the layouts make a weight but that holds no real numbers.
  lay = {"flags": jasp.Layout((0,), (1,), kind="dot")}
  with pytest.raises(
    TypeError, match=r"'flags' \(shape \(8, 4\)\) is to be pruned but has dtype bool"
  ):
    jasp.prune({"flags": jnp.ones((8, 4), bool)}, layouts=lay)


def test_apply_masks_bad_mask_leaves_name_the_path():
  _, variables, _ = basic.digits_cnn()
  masks = jasp.compute_masks(variables)
  bad = jax.tree.map(lambda a: a, masks, is_leaf=lambda x: x is None)
  bad["params"]["Dense_0"]["kernel"] = "keep"
  with pytest.raises(TypeError, match=r"mask for 'params/Dense_0/kernel' is a str"):
    jasp.apply_masks(variables, bad)
  # A float mask is not silently read as "non-zero = kept".
  bad["params"]["Dense_0"]["kernel"] = masks["params"]["Dense_0"]["kernel"] * 0.5
  with pytest.raises(TypeError, match=r"mask for 'params/Dense_0/kernel' has dtype float32"):
    jasp.apply_masks(variables, bad)


def test_repeated_prunes_follow_each_calls_values_policy_and_layouts():
  # Calls on trees of one structure reuse the plan; every result is still that call's own:
  # new values, a new policy and layouts edited in place between calls all count.
  model, variables, x = basic.token_block()
  lay = dict(jasp.trace_layouts(model.apply, variables, x))
  for seed in range(3):
    _, v, _ = basic.token_block(seed)
    pruned, masks = jasp.prune(v, layouts=lay)
    assert _check_pruned(v, pruned, masks, lay) >= 4
  head = "params/Dense_0/kernel"
  for _ in range(2):  # an equal policy made anew on each call
    _, masks = jasp.prune(v, layouts=lay, policy=jasp.Policy(exclude=["Dense_0"]))
    assert _tree.leaves_by_path(masks, keep_none=True)[head] is None
  _, masks = jasp.prune(v, layouts=lay)
  assert _tree.leaves_by_path(masks, keep_none=True)[head] is not None
  lay[head] = jasp.Layout(None, reason="kept dense")  # the same dict, edited
  pruned, masks = jasp.prune(v, layouts=lay)
  assert _tree.leaves_by_path(masks, keep_none=True)[head] is None
  assert _check_pruned(v, pruned, masks, lay) >= 3


def test_non_finite_raises_after_clean_calls_on_the_same_tree():
  _, variables, _ = basic.digits_cnn()
  for _ in range(2):
    jasp.prune(variables)
  bad = jax.tree.map(lambda a: a, variables)
  bad["params"]["Conv_1"]["kernel"] = bad["params"]["Conv_1"]["kernel"].at[0, 0, 0, 0].set(jnp.nan)
  bad["params"]["Dense_1"]["kernel"] = bad["params"]["Dense_1"]["kernel"].at[0, 0].set(jnp.inf)
  for fn in (jasp.prune, jasp.compute_masks):
    # The first weight in flatten order is named, with its count of non-finite values.
    with pytest.raises(ValueError, match=r"'params/Conv_1/kernel' \(shape .*\) holds 1 NaN/Inf"):
      fn(bad)
  jasp.prune(variables)


def test_every_call_warns_about_weights_absent_from_the_layouts():
  model, variables, x = basic.token_block()
  lay = dict(jasp.trace_layouts(model.apply, variables, x))
  del lay["params/Dense_0/kernel"]
  for _ in range(2):
    with pytest.warns(UserWarning, match="absent from the given layouts"):
      _, masks = jasp.prune(variables, layouts=lay)
    assert _tree.leaves_by_path(masks, keep_none=True)["params/Dense_0/kernel"] is None
