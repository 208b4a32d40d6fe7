"""The calibration batch format: one batch is the model's one input; mistakes fail early."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jasp


class _PreNormMLP(nn.Module):
  """A pre-norm residual MLP block: ``x + W2 gelu(W1 rmsnorm(x))``."""

  @nn.compact
  def __call__(self, x):
    h = nn.RMSNorm()(x)
    h = nn.gelu(nn.Dense(32)(h))
    return x + nn.Dense(16)(h)


class _NnxMLP(nnx.Module):
  def __init__(self, rngs):
    self.norm = nnx.RMSNorm(16, rngs=rngs)
    self.up = nnx.Linear(16, 32, rngs=rngs)
    self.down = nnx.Linear(32, 16, rngs=rngs)

  def __call__(self, x):
    return x + self.down(nnx.gelu(self.up(self.norm(x))))


def _block():
  model = _PreNormMLP()
  x = jnp.asarray(np.random.default_rng(0).standard_normal((3, 8, 16)), jnp.float32)
  return model, model.init(jax.random.PRNGKey(0), x[0]), x


PRUNERS = [jasp.wanda_prune, jasp.sparsegpt_prune]


@pytest.mark.parametrize("prune", PRUNERS)
def test_a_list_of_arrays_is_a_list_of_batches(prune):
  model, variables, x = _block()
  pruned, masks = prune(model.apply, variables, [x[0], x[1]], progress=False)
  kernel = pruned["params"]["Dense_0"]["kernel"]
  assert bool(jasp.is_nm(kernel, 2, 4, 0))
  assert masks["params"]["RMSNorm_0"]["scale"] is None


@pytest.mark.parametrize("prune", PRUNERS)
def test_a_single_array_is_refused(prune):
  model, variables, x = _block()
  with pytest.raises(TypeError, match=r"single array of shape \(3, 8, 16\).*\[x\]"):
    prune(model.apply, variables, x, progress=False)


def test_a_single_array_is_refused_for_nnx():
  module = _NnxMLP(nnx.Rngs(0))
  x = jnp.ones((8, 16), jnp.float32)
  with pytest.raises(TypeError, match="single array of shape"):
    jasp.wanda_prune(module, x, progress=False)


@pytest.mark.parametrize("prune", PRUNERS)
def test_inputs_and_labels_pairs_name_the_batch(prune):
  model, variables, x = _block()
  labels = jnp.zeros((8,), jnp.int32)
  loader = [(x[0], labels), (x[1], labels)]
  with pytest.raises(TypeError, match=r"batch 0, a tuple of 2 items.*\[x for x, _ in loader\]"):
    prune(model.apply, variables, loader, progress=False)
  # Only the pair fails: the batch index is the first bad one.
  with pytest.raises(TypeError, match=r"batch 1, a tuple of 2 items"):
    prune(model.apply, variables, [x[0], (x[1], labels)], progress=False)


def test_a_model_that_takes_a_pytree_batch_gets_it_whole():
  model, variables, x = _block()

  def apply(v, batch):
    inputs, extra = batch
    return model.apply(v, inputs) + extra["bias"]

  batches = [(x[i], {"bias": jnp.zeros((16,))}) for i in range(2)]
  _, masks = jasp.wanda_prune(apply, variables, batches, progress=False)
  assert masks["params"]["Dense_1"]["kernel"] is not None


def test_a_mapping_or_a_batch_without_arrays_is_refused():
  model, variables, x = _block()
  with pytest.raises(TypeError, match="got a dict.*pass \\[batch\\]"):
    jasp.wanda_prune(model.apply, variables, {"x": x[0]}, progress=False)
  with pytest.raises(TypeError, match="batch 1 holds no array"):
    jasp.wanda_prune(model.apply, variables, [x[0], None], progress=False)
  with pytest.raises(ValueError, match="no calibration batches"):
    jasp.wanda_prune(model.apply, variables, [], progress=False)
