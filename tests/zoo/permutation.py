"""Small flax models for the channel-permutation tests (linen and nnx).

Besides CNNs and a transformer block: blocks stacked along a layer axis and run
by ``lax.scan``, ``nn.scan`` and ``nnx.scan`` (with the same blocks unrolled as
a reference), and an LSTM scanned over time.

Every parameter and batch statistic is randomised after init (BatchNorm and
LayerNorm start as ones and zeros, which any permutation leaves unchanged), so
that a wrongly permuted leaf changes the model's output.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

C = 32  # channels everywhere: the searches share one compiled shape


class ResidualCNN(nn.Module):
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


class NNXResidualCNN(nnx.Module):
  """The nnx counterpart of :class:`ResidualCNN`."""

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


class PreNormBlock(nn.Module):
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


class NNXPreNormBlock(nnx.Module):
  """The nnx counterpart of :class:`PreNormBlock`."""

  def __init__(self, rngs: nnx.Rngs, din: int = 8, heads: int = 4, hidden: int = C):
    self.proj = nnx.Linear(din, C, rngs=rngs)
    self.ln1 = nnx.LayerNorm(C, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(
      num_heads=heads, in_features=C, qkv_features=C, decode=False, rngs=rngs
    )
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


def perturb(tree, seed: int):
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


def residual_cnn(seed: int = 0):
  model = ResidualCNN()
  x = jax.random.normal(jax.random.key(seed + 1), (2, 6, 6, 3))
  variables = perturb(model.init(jax.random.key(seed), x), seed + 2)
  return model, variables, x


def prenorm_block(seed: int = 0):
  model = PreNormBlock()
  x = jax.random.normal(jax.random.key(seed + 1), (2, 5, 8))
  variables = perturb(model.init(jax.random.key(seed), x), seed + 2)
  return model, variables, x


def _nnx_perturb(model, seed):
  graphdef, state = nnx.split(model)
  pure = jax.tree_util.tree_map(
    lambda v: v.get_value() if isinstance(v, nnx.Variable) else v,
    state,
    is_leaf=lambda v: isinstance(v, nnx.Variable),
  )
  return nnx.merge(graphdef, perturb(pure, seed))


def nnx_residual_cnn(seed: int = 0):
  model = _nnx_perturb(NNXResidualCNN(nnx.Rngs(seed)), seed + 2)
  x = jax.random.normal(jax.random.key(seed + 1), (2, 6, 6, 3))
  return model, x


def nnx_prenorm_block(seed: int = 0):
  model = _nnx_perturb(NNXPreNormBlock(nnx.Rngs(seed)), seed + 2)
  x = jax.random.normal(jax.random.key(seed + 1), (2, 5, 8))
  return model, x


# ----------------------------------------------------------------------------
# Stacked decoder-like blocks run by a scan, and the same blocks unrolled.
#
# Every form has the same parameters: ``proj (DIN, C)``, ``blocks/norm/scale
# (L, C)``, ``blocks/up/{kernel (L, C, C), bias (L, C)}``, ``blocks/down/{kernel
# (L, C, C), bias (L, C)}``, ``final_norm/scale (C,)``, ``head (C, 10)``; each
# block is ``x + down(gelu(up(rmsnorm(x))))``, the residual stream carried.

LAYERS, DIN = 4, 8


def _rms(x, scale, eps=1e-6):
  return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def _block(p, x):
  h = _rms(x, p["norm"]["scale"])
  h = jax.nn.gelu(h @ p["up"]["kernel"] + p["up"]["bias"])
  return x + h @ p["down"]["kernel"] + p["down"]["bias"]


def scan_apply(params, x):
  """``lax.scan`` over the stacked ``params["blocks"]``, ``jax.checkpoint`` inside."""
  x = x @ params["proj"]["kernel"]

  def body(x, p):
    return jax.checkpoint(_block)(p, x), None

  x, _ = jax.lax.scan(body, x, params["blocks"])
  return _rms(x, params["final_norm"]["scale"]) @ params["head"]["kernel"]


def unrolled_apply(params, x):
  """The same model with one leaf per layer: ``params["blocks_0"]``, ... (a Python loop)."""
  x = x @ params["proj"]["kernel"]
  for i in range(LAYERS):
    x = _block(params[f"blocks_{i}"], x)
  return _rms(x, params["final_norm"]["scale"]) @ params["head"]["kernel"]


def unstack(params):
  """The unrolled params of stacked ones (``blocks`` -> ``blocks_0``, ...)."""
  out = {k: v for k, v in params.items() if k != "blocks"}
  for i in range(LAYERS):
    out[f"blocks_{i}"] = jax.tree_util.tree_map(lambda a, i=i: a[i], params["blocks"])
  return out


def scan_params(seed: int = 0):
  ks = jax.random.split(jax.random.key(seed), 8)
  n = lambda k, s: 0.3 * jax.random.normal(k, s)
  return {
    "proj": {"kernel": n(ks[0], (DIN, C))},
    "blocks": {
      "norm": {"scale": 1.0 + n(ks[1], (LAYERS, C))},
      "up": {"kernel": n(ks[2], (LAYERS, C, C)), "bias": n(ks[3], (LAYERS, C))},
      "down": {"kernel": n(ks[4], (LAYERS, C, C)), "bias": n(ks[5], (LAYERS, C))},
    },
    "final_norm": {"scale": 1.0 + n(ks[6], (C,))},
    "head": {"kernel": n(ks[7], (C, 10))},
  }


class LinenScanBlock(nn.Module):
  """One block as the body of ``nn.scan``: ``(x, _) -> (x, None)``."""

  @nn.compact
  def __call__(self, x, _):
    h = nn.RMSNorm(name="norm")(x)
    h = nn.gelu(nn.Dense(C, name="up")(h))
    return x + nn.Dense(C, name="down")(h), None


class LinenScanModel(nn.Module):
  """``nn.scan(nn.remat(block), variable_axes={"params": 0})`` over ``LAYERS`` blocks."""

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(C, use_bias=False, name="proj")(x)
    blocks = nn.scan(
      nn.remat(LinenScanBlock),
      variable_axes={"params": 0},
      split_rngs={"params": True},
      length=LAYERS,
    )
    x, _ = blocks(name="blocks")(x, None)
    return nn.Dense(10, use_bias=False, name="head")(nn.RMSNorm(name="final_norm")(x))


class NNXScanBlock(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.norm = nnx.RMSNorm(C, rngs=rngs)
    self.up = nnx.Linear(C, C, rngs=rngs)
    self.down = nnx.Linear(C, C, rngs=rngs)

  def __call__(self, x):
    return x + self.down(nnx.gelu(self.up(self.norm(x))))


class NNXScanModel(nnx.Module):
  """Blocks created stacked by ``nnx.vmap``, run by ``nnx.scan``."""

  def __init__(self, rngs: nnx.Rngs):
    self.proj = nnx.Linear(DIN, C, use_bias=False, rngs=rngs)

    @nnx.split_rngs(splits=LAYERS)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(rngs):
      return NNXScanBlock(rngs)

    self.blocks = make(rngs)
    self.final_norm = nnx.RMSNorm(C, rngs=rngs)
    self.head = nnx.Linear(C, 10, use_bias=False, rngs=rngs)

  def __call__(self, x):
    x = self.proj(x)

    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def run(x, block):
      return block(x)

    return self.head(self.final_norm(run(x, self.blocks)))


def scan_input(seed: int = 1):
  return jax.random.normal(jax.random.key(seed), (2, 5, DIN))


def linen_scan(seed: int = 0):
  model = LinenScanModel()
  x = scan_input(seed + 1)
  variables = perturb(model.init(jax.random.key(seed), x), seed + 2)
  return model, variables, x


def nnx_scan(seed: int = 0):
  model = _nnx_perturb(NNXScanModel(nnx.Rngs(seed)), seed + 2)
  return model, scan_input(seed + 1)


class LinenLSTM(nn.Module):
  """``nn.scan(nn.OptimizedLSTMCell)`` over time (kernels broadcast: scan constants), a head."""

  hidden: int = C

  @nn.compact
  def __call__(self, x):  # (B, T, DIN)
    cell = nn.scan(
      nn.OptimizedLSTMCell,
      variable_broadcast="params",
      split_rngs={"params": False},
      in_axes=1,
      out_axes=1,
    )(self.hidden)
    carry = cell.initialize_carry(jax.random.key(0), x[:, 0].shape)
    _, ys = cell(carry, x)
    return nn.Dense(10)(ys[:, -1])


def linen_lstm(steps: int = 200, seed: int = 0):
  model = LinenLSTM()
  x = jax.random.normal(jax.random.key(seed + 1), (2, steps, DIN))
  variables = perturb(model.init(jax.random.key(seed), x), seed + 2)
  return model, variables, x
