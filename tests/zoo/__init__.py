"""The tests' models: small models written the way the public flax families are.

Layout:

* ``basic``: a digits CNN and a token transformer block (linen and nnx), the
  unit tests' default models; ``finetuned``: those pruned and fine-tuned, for
  the export tests.
* ``permutation``: residual CNNs, pre-norm blocks, ``scan``-stacked RMSNorm
  decoders and an LSTM, every leaf perturbed so that a wrong channel
  permutation shows in the output.
* the conformance families (``resnet``, ``decoder_nnx``, ``decoder_linen``,
  ``encdec``, ``bilstm``, ``vae``, ``cnn_nnx``, ``lora_mlp``, ``mobilenet``),
  each building one :class:`Case`; :func:`all_cases` lists them.

Each family module builds one :class:`Case`: the model, inputs drawn from one
fixed distribution, a training loss with synthetic labels, and an oracle of the
layouts written from each layer's math (not from jasp). ``tests/zoo_test.py``
runs jasp's whole recipe on every case.

Call conventions (what jasp's entry points take):

* linen: ``fn = case.apply(model)`` is ``fn(variables, *inputs)`` in inference
  mode; ``jasp.trace_layouts(fn, variables, *case.sample)``, ``jasp.permute(fn,
  variables, *case.sample)``, ``jasp.export.to_onnx(fn, variables,
  *case.sample)``; calibration: ``jasp.wanda_prune(lambda v, b: fn(v, *b),
  variables, batches)`` with each batch a tuple of inputs.
* nnx: the module itself, in ``module.eval()`` mode for every step but the
  fine-tuning (``module.train()``); every nnx case takes one input, so
  ``jasp.trace_layouts(module, *case.sample)`` and calibration batches are
  ``[b[0] for b in case.calib_batches()]``.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

Axis = tuple[int, ...] | None
Batch = tuple[tuple, Any]  # (inputs, labels)


@dataclasses.dataclass(frozen=True)
class Case:
  """One model family of the zoo, with everything the recipe needs.

  Attributes:
    name: the case's id (``resnet``, ``decoder_nnx`` ...).
    framework: ``"linen"`` or ``"nnx"``.
    build: ``build()`` -> ``(model, variables)`` (linen) or a fresh module in
      eval mode (nnx); fixed seeds, so every call gives the same weights.
    apply: linen: ``apply(model)`` -> ``fn(variables, *inputs)`` in inference
      mode (extra arguments bound in a lambda); nnx: None (the module is the
      call form).
    sample: the sample inputs, a tuple of positional arrays.
    other: a different input tuple of the same distribution (the permuted model
      must compute the same function on it).
    calib_batches: ``calib_batches()`` -> a list of input tuples for Wanda and
      SparseGPT, from the sample's distribution.
    heldout: a held-out input tuple of that distribution.
    train_batches: ``train_batches()`` -> ``[(inputs, labels)]`` for the
      fine-tuning steps (cycled).
    loss: linen: ``loss(model, variables, inputs, labels, rng)`` ->
      ``(scalar, mutated collections)`` (the training call, e.g. BatchNorm with
      batch statistics; the dict is empty when nothing is mutated); nnx:
      ``loss(module, inputs, labels)`` -> scalar, the module in train mode.
    expected_axis: ``expected_axis(path, shape)`` -> the group axes jasp must
      trace for the leaf, or None where it must stay dense; raises ``KeyError``
      for a path the oracle does not know (so every leaf is covered).
    expected_reason: ``{path regex: text}``: a dense leaf's reason must contain
      the text.
    permuted_class: ``(path regex, axis)``: a member of a channel class that
      :func:`jasp.permute` must permute (None where no permutation is demanded).
    permute_note: that class in words.
  """

  name: str
  framework: str
  build: Callable[[], Any]
  apply: Callable[[Any], Callable[..., Any]] | None
  sample: tuple
  other: tuple
  calib_batches: Callable[[], list[tuple]]
  heldout: tuple
  train_batches: Callable[[], list[Batch]]
  loss: Callable[..., Any]
  expected_axis: Callable[[str, tuple[int, ...]], Axis]
  expected_reason: Mapping[str, str] = dataclasses.field(default_factory=dict)
  permuted_class: tuple[str, int] | None = None
  permute_note: str = ""


# ----------------------------------------------------------------------------
# Oracles.


def rules(
  *table: tuple[str, Callable[[tuple[int, ...]], Axis]],
) -> Callable[[str, tuple[int, ...]], Axis]:
  """An oracle from ``(path regex, shape -> axes)`` rows; the first full match wins.

  A path that no row matches raises ``KeyError``: the oracle must name every leaf.
  """
  compiled = [(re.compile(p), f) for p, f in table]

  def oracle(path: str, shape: tuple[int, ...]) -> Axis:
    for pat, f in compiled:
      if pat.fullmatch(path):
        return f(tuple(shape))
    raise KeyError(f"the oracle has no rule for the leaf '{path}' (shape {tuple(shape)})")

  return oracle


def dense_in(shape: tuple[int, ...]) -> Axis:
  """A Dense/Linear kernel ``(in, out)`` or DenseGeneral ``(in, *out)``: axis 0."""
  del shape
  return (0,)


def conv_in(shape: tuple[int, ...]) -> Axis:
  """A conv kernel ``(*spatial, in/groups, out)``: axis ndim - 2."""
  return (len(shape) - 2,)


def lead(k: int) -> Callable[[tuple[int, ...]], Axis]:
  """The first ``k`` axes contracted (an attention ``out`` ``(H, Dh, d)``: k=2)."""
  return lambda shape: tuple(range(k))


def stacked(f: Callable[[tuple[int, ...]], Axis]) -> Callable[[tuple[int, ...]], Axis]:
  """A kernel stacked for scan ``(L, *kernel)``: the same axes, shifted by one."""

  def g(shape):
    ax = f(shape[1:])
    return None if ax is None else tuple(a + 1 for a in ax)

  return g


def dense(shape: tuple[int, ...]) -> Axis:
  """Not a matmul/conv weight: stays dense."""
  del shape
  return None


# ----------------------------------------------------------------------------
# Data: fixed distributions, fixed seeds.


def images(seed: int, n: int, hw: int = 16, c: int = 3) -> jax.Array:
  """Smooth random images ``(n, hw, hw, c)`` float32: 4x4-pixel blobs plus noise."""
  rng = np.random.default_rng(seed)
  coarse = rng.standard_normal((n, hw // 4, hw // 4, c))
  up = np.repeat(np.repeat(coarse, 4, axis=1), 4, axis=2)
  return jnp.asarray(up + 0.3 * rng.standard_normal((n, hw, hw, c)), jnp.float32)


def features(seed: int, n: int, d: int) -> jax.Array:
  """Correlated Gaussian feature vectors ``(n, d)`` float32 (one fixed mixing matrix)."""
  mix = np.random.default_rng(1234).standard_normal((d, d)) / np.sqrt(d)
  x = np.random.default_rng(seed).standard_normal((n, d)) @ (np.eye(d) + mix)
  return jnp.asarray(x, jnp.float32)


def markov_tokens(seed: int, n: int, length: int, vocab: int, low: int = 0) -> jax.Array:
  """Token sequences ``(n, length)`` int32 from one fixed random bigram chain on [low, vocab)."""
  size = vocab - low
  logits = 3.0 * np.random.default_rng(4321).standard_normal((size, size))
  probs = np.exp(logits - logits.max(axis=1, keepdims=True))
  cdf = np.cumsum(probs / probs.sum(axis=1, keepdims=True), axis=1)
  rng = np.random.default_rng(seed)
  seq = np.empty((n, length), np.int64)
  seq[:, 0] = rng.integers(0, size, n)
  for t in range(1, length):
    u = rng.random(n)[:, None]
    seq[:, t] = np.minimum((u > cdf[seq[:, t - 1]]).sum(axis=1), size - 1)
  return jnp.asarray(seq + low, jnp.int32)


def teacher_labels(x: jax.Array, classes: int, seed: int = 99) -> jax.Array:
  """Labels from a fixed random linear teacher on the flattened inputs."""
  flat = np.asarray(x, np.float64).reshape(np.shape(x)[0], -1)
  w = np.random.default_rng(seed).standard_normal((flat.shape[1], classes))
  return jnp.asarray(np.argmax(flat @ w, axis=-1), jnp.int32)


def xent(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean softmax cross-entropy with integer labels."""
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def image_data(batch: int, classes: int) -> dict:
  """The inputs of an image-classifier case (``Case`` fields): the sample, another input,
  calibration and held-out batches, and four training batches labelled by a fixed teacher."""

  def train_batches():
    out = []
    for s in range(4):
      x = images(100 + s, batch)
      out.append(((x,), teacher_labels(x, classes)))
    return out

  return {
    "sample": (images(10, batch),),
    "other": (images(11, batch),),
    "calib_batches": lambda: [(images(20 + s, batch),) for s in range(4)],
    "heldout": (images(30, batch),),
    "train_batches": train_batches,
  }


def lm_data(tokens: Callable[[int], jax.Array]) -> dict:
  """The inputs of a language-model case (``Case`` fields) from ``tokens(seed)``; the
  training labels are the next tokens."""

  def train_batches():
    out = []
    for s in range(4):
      t = tokens(100 + s)
      out.append(((t,), t[:, 1:]))
    return out

  return {
    "sample": (tokens(10),),
    "other": (tokens(11),),
    "calib_batches": lambda: [(tokens(20 + s),) for s in range(4)],
    "heldout": (tokens(30),),
    "train_batches": train_batches,
  }


def eval_apply(model) -> Callable[..., Any]:
  """A linen model with a ``train`` flag, in inference mode: ``fn(variables, x)``."""
  return lambda variables, x: model.apply(variables, x, train=False)


def batchnorm_loss(model, variables, inputs, labels, rng):
  """Cross-entropy of a linen classifier trained with BatchNorm batch statistics."""
  del rng
  logits, updates = model.apply(variables, *inputs, train=True, mutable=["batch_stats"])
  return xent(logits, labels), updates


def randomise(tree: Any, seed: int, patterns: Sequence[str]) -> Any:
  """Replaces leaves whose path matches a pattern with random, non-trivial values.

  ``scale``/``var`` leaves get values in [0.5, 1.5]; ``bias``/``mean`` and
  anything else get N(0, 0.3). Used so that BatchNorm statistics, norm scales
  or LoRA factors matter: a wrong permutation of them changes the outputs.
  """
  flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
  rng = np.random.default_rng(seed)
  out = []
  for path, x in flat:
    keys = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
    p = "/".join(keys[:-1] if keys and keys[-1] == "value" else keys)  # nnx Variables
    if any(re.search(pat, p) for pat in patterns):
      if re.search(r"(scale|var)$", p):
        x = jnp.asarray(rng.uniform(0.5, 1.5, x.shape), x.dtype)
      else:
        x = jnp.asarray(0.3 * rng.standard_normal(x.shape), x.dtype)
    out.append(x)
  return jax.tree_util.tree_unflatten(treedef, out)


def init_linen(model, *inputs) -> Any:
  """``model.init`` with seed 0, jitted (eager init of convs is slow on CPU)."""
  return jax.jit(model.init)(jax.random.key(0), *inputs)


def all_cases() -> list[Case]:
  """Every case of the zoo, in a fixed order."""
  from zoo import bilstm
  from zoo import cnn_nnx
  from zoo import decoder_linen
  from zoo import decoder_nnx
  from zoo import encdec
  from zoo import lora_mlp
  from zoo import mobilenet
  from zoo import resnet
  from zoo import vae

  return [
    resnet.case(),
    decoder_nnx.case(),
    decoder_linen.case(),
    encdec.case(),
    bilstm.case(),
    vae.case(),
    cnn_nnx.case(),
    lora_mlp.case(),
    mobilenet.case(),
  ]
