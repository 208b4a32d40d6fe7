"""The Gemma/Llama-style decoder in linen: ``nn.scan`` over ``nn.remat(Block)``.

Projections are ``nn.DenseGeneral`` (q ``(d, H, Dh)``, k/v ``(d, KV, Dh)``, o
``(H, Dh, d)`` contracting two axes) and ``nn.Einsum`` (the gated MLP); the
norms are ``nn.RMSNorm``; the blocks' params are stacked on a leading layer
axis by ``nn.scan(..., variable_axes={"params": 0})``; logits come from the
embedding table through ``nn.Embed.attend``.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

import zoo
from zoo.decoder_nnx import BATCH
from zoo.decoder_nnx import HEAD_DIM
from zoo.decoder_nnx import HEADS
from zoo.decoder_nnx import HIDDEN
from zoo.decoder_nnx import KV_HEADS
from zoo.decoder_nnx import LAYERS
from zoo.decoder_nnx import LENGTH
from zoo.decoder_nnx import VOCAB
from zoo.decoder_nnx import D
from zoo.decoder_nnx import causal_gqa
from zoo.decoder_nnx import rope


class Block(nn.Module):
  """Pre-norm block; the scan body: ``(x, _) -> (x, None)``."""

  @nn.compact
  def __call__(self, x, _):
    positions = jnp.arange(x.shape[1])
    h = nn.RMSNorm(name="attn_norm")(x)
    q = nn.DenseGeneral((HEADS, HEAD_DIM), use_bias=False, name="q")(h)
    k = nn.DenseGeneral((KV_HEADS, HEAD_DIM), use_bias=False, name="k")(h)
    v = nn.DenseGeneral((KV_HEADS, HEAD_DIM), use_bias=False, name="v")(h)
    a = causal_gqa(rope(q, positions), rope(k, positions), v)
    x = x + nn.DenseGeneral(D, axis=(-2, -1), use_bias=False, name="o")(a)
    h = nn.RMSNorm(name="mlp_norm")(x)
    gate = nn.Einsum((D, HIDDEN), "btd,df->btf", use_bias=False, name="gate")(h)
    up = nn.Einsum((D, HIDDEN), "btd,df->btf", use_bias=False, name="up")(h)
    down = nn.Einsum((HIDDEN, D), "btf,fd->btd", use_bias=False, name="down")
    return x + down(nn.silu(gate) * up), None


class Decoder(nn.Module):
  """Embedding, scanned rematerialised blocks, final RMSNorm, tied logits."""

  @nn.compact
  def __call__(self, tokens):
    embed = nn.Embed(VOCAB, D, name="embed")
    x = embed(tokens) * jnp.sqrt(jnp.float32(D))
    stack = nn.scan(
      nn.remat(Block), variable_axes={"params": 0}, split_rngs={"params": True}, length=LAYERS
    )
    x, _ = stack(name="layers")(x, None)
    return embed.attend(nn.RMSNorm(name="final_norm")(x))


def build():
  """``(model, variables)`` with the RMSNorm scales randomised."""
  model = Decoder()
  variables = zoo.init_linen(model, tokens(1))
  variables = zoo.randomise(variables, 3, [r"norm/scale$"])
  return model, variables


def apply(model):
  """The inference call: ``fn(variables, *inputs)``."""
  return model.apply


def tokens(seed: int, n: int = BATCH) -> jax.Array:
  """``(n, LENGTH)`` int32 tokens from the zoo's fixed bigram chain."""
  return zoo.markov_tokens(seed, n, LENGTH, VOCAB)


def loss(model, variables, inputs, labels, rng):
  """The training loss (see :class:`zoo.Case`)."""
  del rng
  return zoo.xent(model.apply(variables, *inputs)[:, :-1], labels), {}


expected_axis = zoo.rules(
  (r"params/embed/embedding", zoo.dense),
  (r"params/layers/(attn_norm|mlp_norm)/scale", zoo.dense),
  (r"params/layers/(q|k|v)/kernel", zoo.stacked(zoo.dense_in)),
  (r"params/layers/o/kernel", zoo.stacked(zoo.lead(2))),
  (r"params/layers/(gate|up|down)/kernel", zoo.stacked(zoo.dense_in)),
  (r"params/final_norm/scale", zoo.dense),
)


def case() -> zoo.Case:
  """This family's :class:`zoo.Case`."""
  return zoo.Case(
    name="decoder_linen",
    framework="linen",
    build=build,
    apply=apply,
    loss=loss,
    **zoo.lm_data(tokens),
    expected_axis=expected_axis,
    permuted_class=(r"params/layers/down/kernel", 1),
    permute_note="the gated MLP's hidden channels (gate/up outputs -> down input)",
  )
