"""Small flax models for the channel-permutation tests (linen and nnx).

Every parameter and batch statistic is randomised after init (BatchNorm and
LayerNorm start as ones and zeros, which any permutation leaves unchanged), so
that a wrongly permuted leaf changes the model's output.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

C = 32  # channels everywhere: the searches share one compiled shape


class LinenCNN(nn.Module):
  """Stem conv, a residual block with BatchNorm, a flatten into Dense + LayerNorm."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.BatchNorm(use_running_average=True)(nn.Conv(C, (3, 3))(x)))
    r = x
    h = nn.relu(nn.Conv(C, (3, 3))(x))
    h = nn.BatchNorm(use_running_average=True)(nn.Conv(C, (3, 3))(h))
    x = nn.relu(h + r)
    x = nn.relu(x + nn.Conv(C, (1, 1))(x))  # a second residual on the same channels
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.LayerNorm()(nn.Dense(C)(x)))
    return nn.Dense(10)(x)


class NNXCNN(nnx.Module):
  """The nnx counterpart of :class:`LinenCNN`."""

  def __init__(self, rngs: nnx.Rngs, cin: int = 3, hw: int = 6):
    self.stem = nnx.Conv(cin, C, (3, 3), rngs=rngs)
    self.bn0 = nnx.BatchNorm(C, use_running_average=True, rngs=rngs)
    self.c1 = nnx.Conv(C, C, (3, 3), rngs=rngs)
    self.c2 = nnx.Conv(C, C, (3, 3), rngs=rngs)
    self.bn2 = nnx.BatchNorm(C, use_running_average=True, rngs=rngs)
    self.c3 = nnx.Conv(C, C, (1, 1), rngs=rngs)
    self.fc = nnx.Linear(hw * hw * C, C, rngs=rngs)
    self.ln = nnx.LayerNorm(C, rngs=rngs)
    self.head = nnx.Linear(C, 10, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.bn0(self.stem(x)))
    h = self.bn2(self.c2(nnx.relu(self.c1(x))))
    x = nnx.relu(h + x)
    x = nnx.relu(x + self.c3(x))
    x = x.reshape(x.shape[0], -1)
    return self.head(nnx.relu(self.ln(self.fc(x))))


class LinenBlock(nn.Module):
  """Input projection, then attention + MLP with pre-LayerNorm and residuals."""
  heads: int = 4
  hidden: int = C

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(C)(x)
    h = nn.LayerNorm()(x)
    x = x + nn.MultiHeadDotProductAttention(num_heads=self.heads, qkv_features=C)(h, h)
    h = nn.LayerNorm()(x)
    x = x + nn.Dense(C)(nn.gelu(nn.Dense(self.hidden)(h)))
    return nn.Dense(10)(nn.LayerNorm()(x))


class NNXBlock(nnx.Module):
  """The nnx counterpart of :class:`LinenBlock`."""

  def __init__(self, rngs: nnx.Rngs, din: int = 8, heads: int = 4, hidden: int = C):
    self.proj = nnx.Linear(din, C, rngs=rngs)
    self.ln1 = nnx.LayerNorm(C, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(num_heads=heads, in_features=C, qkv_features=C,
                                       decode=False, rngs=rngs)
    self.ln2 = nnx.LayerNorm(C, rngs=rngs)
    self.up = nnx.Linear(C, hidden, rngs=rngs)
    self.down = nnx.Linear(hidden, C, rngs=rngs)
    self.ln3 = nnx.LayerNorm(C, rngs=rngs)
    self.head = nnx.Linear(C, 10, rngs=rngs)

  def __call__(self, x):
    x = self.proj(x)
    x = x + self.attn(self.ln1(x))
    x = x + self.down(nnx.gelu(self.up(self.ln2(x))))
    return self.head(self.ln3(x))


def randomise(tree, seed: int):
  """Adds noise to every floating leaf; leaves named ``var`` stay positive."""
  flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
  keys = jax.random.split(jax.random.key(seed), max(1, len(flat)))
  out = []
  for (path, x), k in zip(flat, keys):
    if not jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating):
      out.append(x)
      continue
    name = str(path[-1])
    noise = 0.5 * jax.random.normal(k, jnp.shape(x), jnp.asarray(x).dtype)
    x = jnp.abs(x + noise) + 0.1 if "var" in name else x + noise
    out.append(x)
  return jax.tree_util.tree_unflatten(treedef, out)


def linen_cnn(seed: int = 0):
  model = LinenCNN()
  x = jax.random.normal(jax.random.key(seed + 1), (2, 6, 6, 3))
  variables = randomise(model.init(jax.random.key(seed), x), seed + 2)
  return model, variables, x


def linen_block(seed: int = 0):
  model = LinenBlock()
  x = jax.random.normal(jax.random.key(seed + 1), (2, 5, 8))
  variables = randomise(model.init(jax.random.key(seed), x), seed + 2)
  return model, variables, x


def _nnx_randomise(model, seed):
  graphdef, state = nnx.split(model)
  pure = jax.tree_util.tree_map(
      lambda v: v.get_value() if isinstance(v, nnx.Variable) else v, state,
      is_leaf=lambda v: isinstance(v, nnx.Variable))
  return nnx.merge(graphdef, randomise(pure, seed))


def nnx_cnn(seed: int = 0):
  model = _nnx_randomise(NNXCNN(nnx.Rngs(seed)), seed + 2)
  x = jax.random.normal(jax.random.key(seed + 1), (2, 6, 6, 3))
  return model, x


def nnx_block(seed: int = 0):
  model = _nnx_randomise(NNXBlock(nnx.Rngs(seed)), seed + 2)
  x = jax.random.normal(jax.random.key(seed + 1), (2, 5, 8))
  return model, x
