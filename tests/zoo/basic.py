"""Small flax models shared by the unit tests (linen and nnx).

A CNN shaped for 8x8 digits (convolutions of every kind jasp handles: BatchNorm,
grouped, 1-D over a reshape) and a token transformer block with embeddings, in
linen and nnx. ``finetuned`` holds them pruned and fine-tuned.
"""

import flax.linen as nn
import jax
from flax import nnx


class DigitsCNN(nn.Module):
  """Conv + BatchNorm + grouped conv + flatten + Dense, on 8x8x1 images."""

  classes: int = 10

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(16, (3, 3))(x)
    x = nn.BatchNorm(use_running_average=not train)(x)
    x = nn.relu(x)
    x = nn.Conv(32, (3, 3), feature_group_count=2)(x)
    x = nn.relu(x)
    x = nn.Conv(32, (3,), padding="SAME")(x.reshape(x.shape[0], -1, 32))  # 1-D conv
    x = x.reshape(x.shape[0], -1)
    x = nn.Dense(64)(x)
    x = nn.relu(x)
    return nn.Dense(self.classes)(x)


class TokenBlock(nn.Module):
  """A transformer block: attention + MLP + LayerNorm + residuals, with embeddings."""

  vocab: int = 32
  dim: int = 32
  heads: int = 4

  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(self.vocab, self.dim)(tokens)
    h = nn.LayerNorm()(x)
    x = x + nn.MultiHeadDotProductAttention(num_heads=self.heads)(h, h)
    h = nn.LayerNorm()(x)
    h = nn.DenseGeneral((2, 2 * self.dim))(h)
    x = x + nn.DenseGeneral(self.dim, axis=(-2, -1))(nn.gelu(h))
    return nn.Dense(self.vocab)(nn.LayerNorm()(x))


class NNXTokenBlock(nnx.Module):
  """The nnx counterpart: attention + MLP + LayerNorm + residuals + a conv stem."""

  def __init__(self, dim: int = 32, heads: int = 4, vocab: int = 32, *, rngs: nnx.Rngs):
    self.embed = nnx.Embed(vocab, dim, rngs=rngs)
    self.conv = nnx.Conv(dim, dim, (3,), rngs=rngs)
    self.ln1 = nnx.LayerNorm(dim, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(num_heads=heads, in_features=dim, decode=False, rngs=rngs)
    self.ln2 = nnx.LayerNorm(dim, rngs=rngs)
    self.up = nnx.Linear(dim, 4 * dim, rngs=rngs)
    self.down = nnx.Linear(4 * dim, dim, rngs=rngs)
    self.head = nnx.Linear(dim, vocab, rngs=rngs)

  def __call__(self, tokens):
    x = self.conv(self.embed(tokens))
    h = self.ln1(x)
    x = x + self.attn(h)
    x = x + self.down(nnx.gelu(self.up(self.ln2(x))))
    return self.head(x)


def digits_cnn(seed: int = 0):
  model = DigitsCNN()
  x = jax.random.normal(jax.random.key(seed + 1), (4, 8, 8, 1))
  variables = model.init(jax.random.key(seed), x)
  return model, variables, x


def token_block(seed: int = 0):
  model = TokenBlock()
  tokens = jax.random.randint(jax.random.key(seed + 1), (2, 8), 0, 32)
  variables = model.init(jax.random.key(seed), tokens)
  return model, variables, tokens


def nnx_token_block(seed: int = 0):
  model = NNXTokenBlock(rngs=nnx.Rngs(seed))
  tokens = jax.random.randint(jax.random.key(seed + 1), (2, 8), 0, 32)
  return model, tokens
