"""A VAE (linen), the way flax's MNIST VAE example is written.

An MLP encoder with mean and log-variance Dense heads, the reparameterisation
``z = mean + exp(logvar / 2) * eps`` with ``eps`` from ``self.make_rng("sample")``
when training, ``z = mean`` in the eval path (what tracing, permutation,
calibration and export use), and an MLP decoder to Bernoulli logits. The data:
8x8 binary images (64 pixels) sampled from a fixed mixture of prototypes.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import zoo

PIXELS, HIDDEN, LATENT, PROTOTYPES = 64, 32, 8, 6
BATCH = 16


class Encoder(nn.Module):
  """Dense -> relu, then the mean and log-variance heads."""

  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Dense(HIDDEN, name="hidden")(x))
    return nn.Dense(LATENT, name="mean")(h), nn.Dense(LATENT, name="logvar")(h)


class Decoder(nn.Module):
  """Dense -> relu -> Dense to Bernoulli logits."""

  @nn.compact
  def __call__(self, z):
    h = nn.relu(nn.Dense(HIDDEN, name="hidden")(z))
    return nn.Dense(PIXELS, name="out")(h)


class VAE(nn.Module):
  """Encoder -> reparameterisation (train) or the mean (eval) -> decoder."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    mean, logvar = Encoder(name="encoder")(x)
    if train:
      eps = jax.random.normal(self.make_rng("sample"), mean.shape)
      z = mean + jnp.exp(0.5 * logvar) * eps
    else:
      z = mean
    return Decoder(name="decoder")(z), mean, logvar


def binary_images(seed: int, n: int = BATCH) -> jax.Array:
  """8x8 binary images: each a noisy copy of one of a few fixed prototypes (float32 0/1)."""
  protos = np.random.default_rng(555).random((PROTOTYPES, PIXELS)) < 0.4
  rng = np.random.default_rng(seed)
  which = rng.integers(0, PROTOTYPES, n)
  flip = rng.random((n, PIXELS)) < 0.1
  return jnp.asarray(np.logical_xor(protos[which], flip), jnp.float32)


def build():
  """``(model, variables)`` with every bias randomised."""
  model = VAE()
  variables = zoo.init_linen(model, binary_images(1))
  return model, zoo.randomise(variables, 19, [r"bias$"])


def apply(model):
  """The inference call: ``fn(variables, *inputs)``."""
  return lambda variables, x: model.apply(variables, x, train=False)


def loss(model, variables, inputs, targets, rng):
  """The training loss (see :class:`zoo.Case`)."""
  logits, mean, logvar = model.apply(variables, *inputs, train=True, rngs={"sample": rng})
  bce = jnp.sum(jnp.logaddexp(0.0, logits) - targets * logits, axis=-1)
  kl = -0.5 * jnp.sum(1 + logvar - jnp.square(mean) - jnp.exp(logvar), axis=-1)
  return jnp.mean(bce + kl), {}


def _train_batches():
  """Four ``(inputs, labels)`` batches, cycled by the fine-tuning steps."""
  out = []
  for s in range(4):
    x = binary_images(100 + s)
    out.append(((x,), x))
  return out


expected_axis = zoo.rules(
  (r"params/(encoder/(hidden|mean|logvar)|decoder/(hidden|out))/kernel", zoo.dense_in),
  (r"params/(encoder/(hidden|mean|logvar)|decoder/(hidden|out))/bias", zoo.dense),
)


def case() -> zoo.Case:
  """This family's :class:`zoo.Case`."""
  return zoo.Case(
    name="vae",
    framework="linen",
    build=build,
    apply=apply,
    sample=(binary_images(10),),
    other=(binary_images(11),),
    calib_batches=lambda: [(binary_images(20 + s),) for s in range(4)],
    heldout=(binary_images(30),),
    train_batches=_train_batches,
    loss=loss,
    expected_axis=expected_axis,
    permuted_class=(r"params/decoder/out/kernel", 0),
    permute_note="the decoder's hidden channels (decoder/hidden output -> decoder/out input)",
  )
