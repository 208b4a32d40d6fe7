"""jasp._model: one adapter for a linen apply function or an nnx module."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jasp import _model


def test_linen_module_and_apply_function_give_the_same_model():
  mod = nn.Dense(4)
  x = jnp.ones((2, 8))
  v = mod.init(jax.random.key(0), x)
  for fn in (mod, mod.apply):
    model, inputs = _model.adapt(fn, v, (x,))
    assert model.paths == ["params/bias", "params/kernel"] and inputs == (x,)
    np.testing.assert_array_equal(
      np.asarray(model.run(model.leaves, model.extra, x)), np.asarray(mod.apply(v, x))
    )
    traced = model.trace(inputs)
    assert (traced.n_leaves, traced.n_extra) == (2, 0)
    assert len(traced.closed.jaxpr.invars) == 3  # the leaves, then the input array


def test_nnx_params_only_or_all_state():
  class M(nnx.Module):
    def __init__(self, rngs):
      self.lin = nnx.Linear(8, 4, rngs=rngs)
      self.bn = nnx.BatchNorm(4, use_running_average=True, rngs=rngs)

    def __call__(self, x):
      return self.bn(self.lin(x))

  m = M(nnx.Rngs(0))
  x = jnp.ones((2, 8))
  params, inputs = _model.adapt(m, x, ())
  assert inputs == (x,) and set(params.paths) == {"lin/kernel", "lin/bias", "bn/scale", "bn/bias"}
  state, _ = _model.adapt(m, x, (), state=True)
  assert {"bn/mean", "bn/var"} <= set(state.paths)
  new = state.to_module(state.rebuild([a * 2 for a in state.leaves]))
  assert isinstance(new, M)
  np.testing.assert_allclose(np.asarray(new.lin.kernel[...]), 2 * np.asarray(m.lin.kernel[...]))
  np.testing.assert_allclose(np.asarray(params.apply(params.tree, x)), np.asarray(m(x)))


def test_missing_params_for_a_function_is_a_clear_error():
  with pytest.raises(TypeError, match="params"):
    _model.adapt(lambda p, x: x, None, (jnp.ones(2),), what="trace_layouts")
