"""The models of ``basic``, 2:4-pruned and fine-tuned, shared by the export tests (built once per process)."""

import functools

import jax
import optax
from flax import nnx

import jasp
from zoo import basic


def _finetune(apply, variables, masks, x, labels, steps=3):
  """A few Adam steps on the "params" collection, enforced by jasp.mask_updates."""
  params, rest = variables["params"], {k: v for k, v in variables.items() if k != "params"}
  tx = optax.chain(optax.adam(1e-2), jasp.mask_updates(masks["params"]))
  state = tx.init(params)

  @jax.jit
  def step(params, state):
    def loss(p):
      logits = apply({"params": p, **rest}, x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    g = jax.grad(loss)(params)
    u, state = tx.update(g, state, params)
    return optax.apply_updates(params, u), state

  for _ in range(steps):
    params, state = step(params, state)
  return {"params": params, **rest}


@functools.lru_cache(maxsize=None)
def pruned_cnn():
  """(model, variables, masks, layouts, x): the digits-style CNN, 2:4-pruned, fine-tuned."""
  model, variables, x = basic.digits_cnn()
  layouts = jasp.trace_layouts(model.apply, variables, x)
  pruned, masks = jasp.prune(variables, layouts=layouts)
  labels = jax.random.randint(jax.random.key(7), (x.shape[0],), 0, 10)
  tuned = _finetune(model.apply, pruned, masks, x, labels)
  return model, tuned, masks, layouts, x


@functools.lru_cache(maxsize=None)
def pruned_block():
  """(model, variables, masks, layouts, tokens): the linen transformer block, 2:4 except its head."""
  model, variables, tokens = basic.token_block()
  layouts = jasp.trace_layouts(model.apply, variables, tokens)
  pruned, masks = jasp.prune(
    variables, layouts=layouts, policy=jasp.Policy(exclude=[r"Dense_0/kernel"])
  )
  labels = jax.random.randint(jax.random.key(8), tokens.shape, 0, 32)
  tuned = _finetune(model.apply, pruned, masks, tokens, labels)
  return model, tuned, masks, layouts, tokens


def pruned_nnx_block():
  """(module, masks, tokens): the nnx block, 2:4-pruned in place (a fresh module each call)."""
  module, tokens = basic.nnx_token_block()
  layouts = jasp.trace_layouts(module, tokens)
  state, masks = jasp.prune(nnx.state(module, nnx.Param), layouts=layouts)
  nnx.update(module, state)
  return module, masks, tokens


PRUNED_CNN = (
  "params/Conv_1/kernel",
  "params/Conv_2/kernel",
  "params/Dense_0/kernel",
  "params/Dense_1/kernel",
)
DENSE_CNN = ("params/Conv_0/kernel",)  # in = 1 channel: not a multiple of 4
PRUNED_BLOCK = tuple(
  f"params/MultiHeadDotProductAttention_0/{k}/kernel" for k in ("query", "key", "value", "out")
) + ("params/DenseGeneral_0/kernel", "params/DenseGeneral_1/kernel")
DENSE_BLOCK = ("params/Dense_0/kernel",)
