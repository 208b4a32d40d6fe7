"""Params + masks + optimizer state round-trip through orbax-checkpoint.

apex's checkpointing test, as a pytest: train k steps sparse, save, restore
into a freshly built model and optimizer, continue; the result equals an
uninterrupted run bit for bit (CPU).
"""

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from zoo import basic

import jasp


def _build(seed=0):
  model, _, x = basic.token_block(0)  # the same data for both runs
  variables = model.init(jax.random.key(100 + seed), x)  # a different init
  params, masks = jasp.prune(variables["params"])
  tx = jasp.sparse_optimizer(optax.adamw(3e-3, weight_decay=0.01), masks)
  y = jax.random.randint(jax.random.key(9), x.shape, 0, 32)

  @jax.jit
  def step(params, opt_state):
    def loss(p):
      return optax.softmax_cross_entropy_with_integer_labels(
        model.apply({"params": p}, x), y
      ).mean()

    g = jax.grad(loss)(params)
    u, opt_state = tx.update(g, opt_state, params)
    return optax.apply_updates(params, u), opt_state

  return params, masks, tx, step


@pytest.mark.slow
def test_resume_is_bit_identical(tmp_path):
  params, masks, tx, step = _build()
  state = tx.init(params)
  for _ in range(3):
    params, state = step(params, state)
  ckpt = {"params": params, "masks": masks, "opt_state": state}
  with ocp.StandardCheckpointer() as cp:
    cp.save(tmp_path / "ckpt", ckpt)

  # Uninterrupted run.
  ref_params, ref_state = params, state
  for _ in range(3):
    ref_params, ref_state = step(ref_params, ref_state)

  # A fresh model and optimizer (different init), restored from disk.
  fresh_params, fresh_masks, fresh_tx, fresh_step = _build(seed=1)
  target = {"params": fresh_params, "masks": fresh_masks, "opt_state": fresh_tx.init(fresh_params)}
  with ocp.StandardCheckpointer() as cp:
    restored = cp.restore(tmp_path / "ckpt", target)
  assert jasp.get_masks(restored["opt_state"]) is not None
  p, s = restored["params"], restored["opt_state"]
  for a, b in zip(jax.tree.leaves(restored["masks"]), jax.tree.leaves(masks)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  for _ in range(3):
    p, s = fresh_step(p, s)
  for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(ref_params)):
    np.testing.assert_array_equal(np.asarray(a).view(np.uint8), np.asarray(b).view(np.uint8))
  for a, b in zip(jax.tree.leaves(s), jax.tree.leaves(ref_state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  r = jasp.sparsity_report({"params": p}, {"params": restored["masks"]})
  assert r.all_valid and len(r.pruned) == 5  # q, k, v, out, Dense_0 (by convention)
