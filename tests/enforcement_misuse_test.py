"""jasp.enforcement under optimizer compositions that could break N:M silently.

Every N:M check here is independent of jasp: NumPy counts the non-zeros in each
group of 4 along a kernel's input axis. The model is a two-layer MLP written in
plain JAX, kernels ``(in, out)`` pruned 2:4 along axis 0, biases dense.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jasp
from jasp import _tree
from jasp import enforcement

KERNELS = ("dense1", "dense2")
# What debug=True raises from inside the jitted step (a JaxRuntimeError carrying the message).
MASK_UPDATES_DEBUG = r"jasp\.mask_updates\(debug=True\): the params .*'dense1/kernel'.*not last"
SPARSE_OPTIMIZER_DEBUG = (
  r"jasp\.sparse_optimizer\(debug=True\): the params .*'dense1/kernel'.*prune"
)


def _mlp(seed=0):
  k1, k2, k3, k4 = jax.random.split(jax.random.key(seed), 4)
  params = {
    "dense1": {"kernel": jax.random.normal(k1, (16, 32)) * 0.3, "bias": jnp.zeros(32)},
    "dense2": {"kernel": jax.random.normal(k2, (32, 8)) * 0.3, "bias": jnp.zeros(8)},
  }
  masks = {
    name: {"kernel": jasp.nm_mask(params[name]["kernel"], 2, 4, axis=0), "bias": None}
    for name in KERNELS
  }
  x = jax.random.normal(k3, (64, 16))
  y = jax.random.randint(k4, (64,), 0, 8)

  def loss(p):
    h = jnp.tanh(x @ p["dense1"]["kernel"] + p["dense1"]["bias"])
    logits = h @ p["dense2"]["kernel"] + p["dense2"]["bias"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  return params, masks, loss


def _max_nonzeros_per_group(params) -> int:
  """The most non-zeros in any aligned group of 4 along a kernel's axis 0 (NumPy only)."""
  worst = 0
  for name in KERNELS:
    w = np.asarray(params[name]["kernel"], np.float64)
    groups = w.reshape(w.shape[0] // 4, 4, w.shape[1])
    worst = max(worst, int(np.count_nonzero(groups, axis=1).max()))
  return worst


def _assert_nm(params, what="params"):
  worst = _max_nonzeros_per_group(params)
  assert worst <= 2, f"{what}: a group of 4 holds {worst} non-zeros"


def _pruned(params, masks):
  return jax.tree.map(
    lambda p, mk: p if mk is None else jnp.where(mk, p, 0),
    params,
    masks,
    is_leaf=lambda x: x is None,
  )


def _stepper(tx):
  @jax.jit
  def step(p, s, g):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  return step


def _nan_like(tree):
  return jax.tree.map(lambda a: jnp.full_like(a, jnp.nan), tree)


# The wrappers: how each is built around an inner optimizer, the params it trains
# (lookahead trains a fast/slow pair), and the gradients it gets at step i.
def _multisteps(inner):
  return optax.MultiSteps(inner, every_k_schedule=3).gradient_transformation()


def _if_finite(inner):
  return optax.apply_if_finite(inner, max_consecutive_errors=2)


def _lookahead(inner):
  return optax.lookahead(inner, sync_period=2, slow_step_size=0.5)


def _schedule_free(inner):
  return optax.contrib.schedule_free(inner, learning_rate=1e-2)


def _sam(inner):
  adversary = optax.chain(optax.contrib.normalize(), optax.sgd(0.05))
  return optax.contrib.sam(inner, adversary, sync_period=2)


WRAPPERS = {
  "MultiSteps": _multisteps,
  "apply_if_finite": _if_finite,
  "lookahead": _lookahead,
  "schedule_free": _schedule_free,
}
# SAM moves the params to adversarial points on its own steps: only outermost jasp masks those.
OUTER_WRAPPERS = dict(WRAPPERS, sam=_sam)


def _train_params(kind, params):
  return optax.LookaheadParams.init_synced(params) if kind == "lookahead" else params


def _grads(kind, loss, p, i):
  g = jax.grad(loss)(p.fast if kind == "lookahead" else p)
  # apply_if_finite: the first step and every third one are skipped.
  return _nan_like(g) if kind == "apply_if_finite" and i % 3 == 0 else g


def _copies(kind, p):
  """Every copy of the params that the run must keep N:M."""
  return {"fast": p.fast, "slow": p.slow} if kind == "lookahead" else {"params": p}


# Case 1: mask_updates first in a chain.


@pytest.mark.slow
def test_mask_updates_first_in_a_chain_leaves_params_dense_and_is_caught():
  params, masks, loss = _mlp()
  tx = optax.chain(jasp.mask_updates(masks), optax.adam(1e-2))
  state, step = tx.init(params), _stepper(tx)
  p = params
  for _ in range(2):
    p, state = step(p, state, jax.grad(loss)(p))
  assert _max_nonzeros_per_group(p) > 2  # the misuse itself: Adam moves the pruned entries
  with pytest.raises(ValueError, match="dense1/kernel"):
    enforcement.assert_masked(p, state)
  assert set(enforcement.count_unmasked(p, masks)) == {"dense1/kernel", "dense2/kernel"}

  # debug=True raises inside the jitted step: at the first update from unpruned params...
  tx = optax.chain(jasp.mask_updates(masks, debug=True), optax.adam(1e-2))
  with pytest.raises(Exception, match=MASK_UPDATES_DEBUG):
    jax.block_until_ready(_stepper(tx)(params, tx.init(params), jax.grad(loss)(params)))
  # ...and, from pruned params, at the first update after a later transformation moved them.
  pruned = _pruned(params, masks)
  tx = optax.chain(
    jasp.mask_updates(masks, debug=True), optax.add_noise(0.1, 0.0, 0), optax.sgd(1e-2)
  )
  state, step = tx.init(pruned), _stepper(tx)
  p, state = step(pruned, state, jax.grad(loss)(pruned))
  with pytest.raises(Exception, match=MASK_UPDATES_DEBUG):
    jax.block_until_ready(step(p, state, jax.grad(loss)(p)))


def test_mask_updates_last_in_debug_mode_runs_clean():
  params, masks, loss = _mlp()
  p = _pruned(params, masks)
  tx = optax.chain(
    optax.add_noise(0.1, 0.0, 0),
    optax.adamw(1e-2, weight_decay=0.1),
    jasp.mask_updates(masks, debug=True),
  )
  state, step = tx.init(p), _stepper(tx)
  for _ in range(4):
    p, state = step(p, state, jax.grad(loss)(p))
    _assert_nm(p)
  enforcement.assert_masked(p, state)
  assert enforcement.count_unmasked(p, masks) == {}


# Case 2: wrappers that skip, accumulate or replace the inner update.


@pytest.mark.parametrize("form", ["sparse_optimizer", "chain"])
@pytest.mark.parametrize("kind", sorted(OUTER_WRAPPERS))
def test_jasp_outermost_keeps_every_copy_nm_from_unpruned_params(kind, form):
  params, masks, loss = _mlp()  # never pruned
  inner = OUTER_WRAPPERS[kind](optax.adam(1e-2))
  tx = (
    jasp.sparse_optimizer(inner, masks)
    if form == "sparse_optimizer"
    else optax.chain(inner, jasp.mask_updates(masks))
  )
  p = _train_params(kind, params)
  state, step = tx.init(p), _stepper(tx)
  for i in range(7):
    p, state = step(p, state, _grads(kind, loss, p, i))
    for what, copy in _copies(kind, p).items():
      _assert_nm(copy, f"step {i}: {what}")
      assert np.isfinite(np.asarray(copy["dense1"]["kernel"])).all()
  enforcement.assert_masked(p, state)


@pytest.mark.parametrize("kind", sorted(WRAPPERS))
def test_jasp_inside_a_wrapper_keeps_pruned_params_nm(kind):
  params, masks, loss = _mlp()
  p = _train_params(kind, _pruned(params, masks))
  tx = WRAPPERS[kind](jasp.sparse_optimizer(optax.adam(1e-2), masks, debug=True))
  state, step = tx.init(p), _stepper(tx)
  for i in range(7):
    p, state = step(p, state, _grads(kind, loss, p, i))
    for what, copy in _copies(kind, p).items():
      _assert_nm(copy, f"step {i}: {what}")


@pytest.mark.parametrize("kind", ["MultiSteps", "apply_if_finite"])
def test_jasp_inside_a_skipping_wrapper_on_unpruned_params_is_caught(kind):
  params, masks, loss = _mlp()  # never pruned
  tx = WRAPPERS[kind](jasp.sparse_optimizer(optax.adam(1e-2), masks))
  state, step = tx.init(params), _stepper(tx)
  p, state = step(params, state, _grads(kind, loss, params, 0))
  assert _max_nonzeros_per_group(p) > 2  # the skipped step returned zeros: still dense
  with pytest.raises(ValueError, match="pruned"):
    enforcement.assert_masked(p, state)
  # debug=True names the problem at the first update the wrapper lets through.
  tx = WRAPPERS[kind](jasp.sparse_optimizer(optax.adam(1e-2), masks, debug=True))
  with pytest.raises(Exception, match=SPARSE_OPTIMIZER_DEBUG):
    jax.block_until_ready(_stepper(tx)(params, tx.init(params), jax.grad(loss)(params)))


def test_lookahead_params_are_checked_copy_by_copy():
  params, masks, _ = _mlp()
  pair = optax.LookaheadParams(fast=_pruned(params, masks), slow=params)
  with pytest.raises(ValueError, match="slow/dense1/kernel"):
    enforcement.assert_masked(pair, masks)
  assert set(enforcement.count_unmasked(pair, masks)) == {
    "slow/dense1/kernel",
    "slow/dense2/kernel",
  }


# Case 3: schedule-free evaluation params.


def test_schedule_free_eval_params_are_nm_under_sparse_optimizer():
  params, masks, loss = _mlp()  # never pruned: z starts dense
  tx = jasp.sparse_optimizer(optax.contrib.schedule_free_adamw(1e-2, weight_decay=0.1), masks)
  state, step = tx.init(params), _stepper(tx)
  p = params
  for i in range(5):
    p, state = step(p, state, jax.grad(loss)(p))
    _assert_nm(p, f"step {i}: training params")
    # optax's own evaluation params, read off the inner state, are exact.
    _assert_nm(
      optax.contrib.schedule_free_eval_params(state.inner_state, p), f"step {i}: optax eval params"
    )
    _assert_nm(enforcement.schedule_free_eval_params(state, p), f"step {i}: jasp eval params")


def test_schedule_free_eval_params_of_a_chain():
  params, masks, loss = _mlp()
  p = _pruned(params, masks)
  tx = optax.chain(optax.contrib.schedule_free_adamw(1e-2), jasp.mask_updates(masks))
  state, step = tx.init(p), _stepper(tx)
  ref_tx = jasp.sparse_optimizer(
    optax.contrib.schedule_free_adamw(1e-2), masks, mask_gradients=False
  )
  ref_state, ref_step = ref_tx.init(p), _stepper(ref_tx)
  ref_p = p
  for _ in range(4):
    p, state = step(p, state, jax.grad(loss)(p))
    ref_p, ref_state = ref_step(ref_p, ref_state, jax.grad(loss)(ref_p))
  _assert_nm(p, "training params")
  # The misuse: optax's formula on the chain's state puts the gradient-fed z back.
  assert _max_nonzeros_per_group(optax.contrib.schedule_free_eval_params(state[0], p)) > 2
  ev = enforcement.schedule_free_eval_params(state, p)
  _assert_nm(ev, "jasp eval params")
  # Kept entries are optax's, bit for bit, and the same as sparse_optimizer's.
  raw = optax.contrib.schedule_free_eval_params(state[0], p)
  ref = optax.contrib.schedule_free_eval_params(ref_state.inner_state, ref_p)
  for name in KERNELS:
    mk = np.asarray(masks[name]["kernel"])
    np.testing.assert_array_equal(
      np.asarray(ev[name]["kernel"])[mk], np.asarray(raw[name]["kernel"])[mk]
    )
    np.testing.assert_allclose(
      np.asarray(ev[name]["kernel"]), np.asarray(ref[name]["kernel"]), rtol=1e-6, atol=1e-7
    )
  with pytest.raises(ValueError, match="schedule-free"):
    enforcement.schedule_free_eval_params(
      optax.chain(optax.adam(1e-2), jasp.mask_updates(masks)).init(p), p
    )


def test_update_masks_remasks_schedule_free_z():
  params, masks, loss = _mlp()
  tx = jasp.sparse_optimizer(optax.contrib.schedule_free_sgd(1e-2), masks)
  state, step = tx.init(params), _stepper(tx)
  p, state = step(params, state, jax.grad(loss)(params))
  new_masks = jax.tree.map(
    lambda w, mk: None if mk is None else jasp.nm_mask(w, 1, 4, axis=0),
    params,
    masks,
    is_leaf=lambda x: x is None,
  )
  state = jasp.update_masks(state, new_masks)
  p = jasp.apply_masks(p, new_masks)
  ev = optax.contrib.schedule_free_eval_params(state.inner_state, p)
  for name in KERNELS:
    w = np.asarray(ev[name]["kernel"]).reshape(-1, 4, np.shape(ev[name]["kernel"])[1])
    assert np.count_nonzero(w, axis=1).max() <= 1


# Everything stays jittable, with masks as state and no host callback unless asked.


@pytest.mark.parametrize("kind", sorted(WRAPPERS))
def test_masks_are_state_and_no_callback_without_debug(kind):
  params, masks, loss = _mlp()
  p = _train_params(kind, params)
  g = jax.grad(loss)(params)
  for debug in (False, True):
    tx = jasp.sparse_optimizer(WRAPPERS[kind](optax.adam(1e-2)), masks, debug=debug)
    state = tx.init(p)
    jaxpr = jax.make_jaxpr(lambda g, s, p, tx=tx: tx.update(g, s, p))(g, state, p)
    assert not any(np.size(c) > 1 for c in jaxpr.consts)
    assert ("callback" in str(jaxpr)) == debug


@pytest.mark.slow
def test_packed_masks_and_nnx_optimizer_with_schedule_free():
  from flax import nnx
  from zoo import basic

  model, tokens = basic.nnx_token_block()
  params = nnx.state(model, nnx.Param)
  masks = jasp.compute_masks(params, layouts=jasp.trace_layouts(model, tokens), packed=True)
  y = jax.random.randint(jax.random.key(3), tokens.shape, 0, 32)
  tx = jasp.sparse_optimizer(optax.contrib.schedule_free_adamw(1e-2), masks)
  opt = nnx.Optimizer(model, tx, wrt=nnx.Param)  # params never pruned

  @nnx.jit
  def step(model, opt):
    def loss(m):
      return optax.softmax_cross_entropy_with_integer_labels(m(tokens), y).mean()

    opt.update(model, nnx.grad(loss)(model))

  for _ in range(3):
    step(model, opt)
  params = nnx.as_pure(nnx.state(model, nnx.Param))
  state = nnx.as_pure(opt.opt_state)
  by_path = _tree.leaves_by_path(masks, keep_none=True)

  def assert_nm(copy, what):  # NumPy: at most 2 non-zeros per group of 4 along the packed axis
    for path, w in _tree.leaves_by_path(copy).items():
      mk = by_path[path]
      if mk is not None:
        w = np.moveaxis(np.asarray(w), mk.axis[0], 0)
        assert len(mk.axis) == 1 and w.shape[0] % 4 == 0, path
        worst = np.count_nonzero(w.reshape(w.shape[0] // 4, 4, -1), axis=1).max()
        assert worst <= 2, f"{what}: {path} has {worst} non-zeros in a group of 4"

  assert_nm(params, "training params")
  assert_nm(optax.contrib.schedule_free_eval_params(state.inner_state, params), "optax eval params")
  assert_nm(enforcement.schedule_free_eval_params(state, params), "jasp eval params")
  enforcement.assert_masked(params, state)
