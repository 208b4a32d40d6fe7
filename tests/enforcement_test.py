"""jasp.enforcement: params stay N:M through optax updates, masks travel as state."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import testing
from flax import nnx
from zoo import basic

import jasp
from jasp import _tree


def _setup():
  model, variables, x = basic.token_block()
  lay = jasp.trace_layouts(model.apply, variables, x)
  params = variables["params"]
  masks = jasp.compute_masks({"params": params}, layouts=lay)["params"]
  y = jax.random.randint(jax.random.key(7), x.shape, 0, 32)

  def loss(p):
    logits = model.apply({"params": p}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  return params, masks, loss


@pytest.mark.parametrize(
  "inner",
  [
    optax.adamw(1e-2, weight_decay=0.5),
    optax.sgd(1e-1, momentum=0.9),
    optax.chain(optax.add_decayed_weights(1.0), optax.lion(1e-3)),
  ],
  ids=["adamw_decay", "sgd_momentum", "decay_then_lion"],
)
def test_mask_updates_keeps_params_sparse_from_dense_start(inner):
  params, masks, loss = _setup()  # params NOT pruned beforehand
  tx = optax.chain(inner, jasp.mask_updates(masks))
  state = tx.init(params)

  @jax.jit
  def step(p, s):
    g = jax.grad(loss)(p)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  for _ in range(3):
    params, state = step(params, state)
    testing.assert_masked(params, masks)


@pytest.mark.slow
def test_kept_entries_follow_the_inner_optimizer_exactly():
  params, masks, loss = _setup()
  params = jasp.apply_masks(params, masks)
  inner = optax.adam(1e-2)
  tx = optax.chain(inner, jasp.mask_updates(masks))
  g = jax.grad(loss)(params)
  u_ref, _ = inner.update(g, inner.init(params), params)
  u, _ = tx.update(g, tx.init(params), params)
  mk = _tree.leaves_by_path(masks, keep_none=True)
  ur, uu = _tree.leaves_by_path(u_ref), _tree.leaves_by_path(u)
  for p in ur:
    keep = np.ones(ur[p].shape, bool) if mk[p] is None else np.asarray(mk[p])
    np.testing.assert_array_equal(np.asarray(uu[p])[keep], np.asarray(ur[p])[keep])


def test_bf16_params_become_exact_zeros():
  params, masks, _ = _setup()
  params = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
  tx = optax.chain(optax.sgd(1.0), jasp.mask_updates(masks))
  g = jax.tree.map(lambda a: jnp.full(a.shape, 0.3, jnp.float32), params)
  u, _ = tx.update(g, tx.init(params), params)
  new = optax.apply_updates(params, u)
  testing.assert_masked(new, masks)


def test_needs_params():
  params, masks, _ = _setup()
  tx = jasp.mask_updates(masks)
  with pytest.raises(ValueError, match="needs the params"):
    tx.update(params, tx.init(params))


def test_masks_are_state_not_constants():
  params, masks, loss = _setup()
  tx = optax.chain(optax.adam(1e-3), jasp.mask_updates(masks))
  state = tx.init(params)
  jaxpr = jax.make_jaxpr(lambda g, s, p: tx.update(g, s, p))(params, state, params)
  assert not any(np.size(c) > 1 for c in jaxpr.consts)
  assert jasp.get_masks(state) is not None


def test_mask_gradients_keeps_moments_clean():
  params, masks, loss = _setup()
  tx = jasp.sparse_optimizer(optax.adam(1e-2), masks)
  state = tx.init(params)
  for _ in range(2):
    g = jax.grad(loss)(params)
    u, state = tx.update(g, state, params)
    params = optax.apply_updates(params, u)
  testing.assert_masked(params, masks)
  mu = _tree.leaves_by_path(state.inner_state[0].mu)
  mk = _tree.leaves_by_path(masks, keep_none=True)
  for p, v in mu.items():
    if mk[p] is not None:
      assert (np.asarray(v)[~np.asarray(mk[p])] == 0).all()
      assert (np.asarray(v)[np.asarray(mk[p])] != 0).any()
  # The chain form does the same.
  tx2 = optax.chain(jasp.mask_gradients(masks), optax.adam(1e-2), jasp.mask_updates(masks))
  s2 = tx2.init(params)
  u, s2 = tx2.update(jax.grad(loss)(params), s2, params)
  mu2 = _tree.leaves_by_path(s2[1][0].mu)
  for p, v in mu2.items():
    if mk[p] is not None:
      assert (np.asarray(v)[~np.asarray(mk[p])] == 0).all()


def test_update_masks_keeps_moments():
  params, masks, loss = _setup()
  tx = optax.chain(optax.adam(1e-2), jasp.mask_updates(masks))
  state = tx.init(params)
  for _ in range(2):
    u, state = tx.update(jax.grad(loss)(params), state, params)
    params = optax.apply_updates(params, u)
  moments = state[0]
  new_masks = jasp.compute_masks({"params": params}, n=1, m=4)["params"]
  new_state = jasp.update_masks(state, new_masks)
  for a, b in zip(jax.tree.leaves(new_state[0]), jax.tree.leaves(moments)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  u, new_state = tx.update(jax.grad(loss)(params), new_state, params)
  params = optax.apply_updates(params, u)
  testing.assert_masked(params, new_masks)
  with pytest.raises(ValueError, match="no jasp"):
    jasp.update_masks(optax.adam(1e-3).init(params), new_masks)


@pytest.mark.slow
def test_nnx_optimizer():
  model, tokens = basic.nnx_token_block()
  lay = jasp.trace_layouts(model, tokens)
  state = nnx.state(model, nnx.Param)
  masks = jasp.compute_masks(state, layouts=lay)
  y = jax.random.randint(jax.random.key(3), tokens.shape, 0, 32)
  for tx in (
    optax.chain(optax.adamw(1e-2, weight_decay=0.1), jasp.mask_updates(masks)),
    jasp.sparse_optimizer(optax.adamw(1e-2), masks),
  ):
    l0, l1, _ = testing.nnx_token_steps(model, tx, tokens, y, steps=3)
    assert l1 < l0
    testing.assert_masked(nnx.state(model, nnx.Param), masks)
