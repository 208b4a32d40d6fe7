"""A BiLSTM text classifier (linen), the way flax's SST-2 example is written.

Token embeddings, one ``nn.OptimizedLSTMCell`` scanned forward over time and
one scanned backward (``reverse=True``), both with ``variable_broadcast="params"``
and ``split_rngs={"params": False}`` (one set of weights for every step), the
two final hidden states concatenated, and a Dense classifier.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

import zoo

VOCAB, EMBED, HIDDEN, CLASSES = 64, 32, 32, 4
BATCH, LENGTH = 8, 12


def _scanned_lstm(reverse: bool):
  """An ``OptimizedLSTMCell`` scanned over time (axis 1), one set of weights for all steps."""
  return nn.scan(
    nn.OptimizedLSTMCell,
    variable_broadcast="params",
    split_rngs={"params": False},
    in_axes=1,
    out_axes=1,
    reverse=reverse,
  )


class BiLSTMClassifier(nn.Module):
  """Embed -> forward and backward LSTMs -> concat final hidden states -> Dense."""

  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(VOCAB, EMBED, name="embed")(tokens)
    zeros = jnp.zeros((x.shape[0], HIDDEN), x.dtype)
    (_, h_fwd), _ = _scanned_lstm(False)(HIDDEN, name="forward")((zeros, zeros), x)
    (_, h_bwd), _ = _scanned_lstm(True)(HIDDEN, name="backward")((zeros, zeros), x)
    return nn.Dense(CLASSES, name="classifier")(jnp.concatenate([h_fwd, h_bwd], axis=-1))


def tokens(seed: int, n: int = BATCH) -> jax.Array:
  """``(n, LENGTH)`` int32 tokens from the zoo's fixed bigram chain."""
  return zoo.markov_tokens(seed, n, LENGTH, VOCAB)


def labels(toks: jax.Array) -> jax.Array:
  """A fixed random teacher on the bag of tokens."""
  return zoo.teacher_labels(jax.nn.one_hot(toks, VOCAB).sum(axis=1), CLASSES)


def build():
  """``(model, variables)`` with every bias randomised."""
  model = BiLSTMClassifier()
  variables = zoo.init_linen(model, tokens(1))
  variables = zoo.randomise(variables, 9, [r"bias$"])
  return model, variables


def apply(model):
  """The inference call: ``fn(variables, *inputs)``."""
  return model.apply


def loss(model, variables, inputs, y, rng):
  """The training loss (see :class:`zoo.Case`)."""
  del rng
  return zoo.xent(model.apply(variables, *inputs), y), {}


def _train_batches():
  """Four ``(inputs, labels)`` batches, cycled by the fine-tuning steps."""
  out = []
  for s in range(4):
    t = tokens(100 + s)
    out.append(((t,), labels(t)))
  return out


expected_axis = zoo.rules(
  (r"params/embed/embedding", zoo.dense),
  (r"params/(forward|backward)/(i[ifgo]|h[ifgo])/kernel", zoo.dense_in),
  (r"params/(forward|backward)/h[ifgo]/bias", zoo.dense),
  (r"params/classifier/kernel", zoo.dense_in),
  (r"params/classifier/bias", zoo.dense),
)


def case() -> zoo.Case:
  """This family's :class:`zoo.Case`."""
  return zoo.Case(
    name="bilstm",
    framework="linen",
    build=build,
    apply=apply,
    sample=(tokens(10),),
    other=(tokens(11),),
    calib_batches=lambda: [(tokens(20 + s),) for s in range(4)],
    heldout=(tokens(30),),
    train_batches=_train_batches,
    loss=loss,
    expected_axis=expected_axis,
    permuted_class=None,
    permute_note="none demanded: the hidden channels are carried through the recurrence",
  )
