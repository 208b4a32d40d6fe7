"""A Gemma/Llama-style decoder (nnx): RMSNorm pre-norm blocks, RoPE, GQA, gated MLP, tied logits.

The attention projections are explicit ``nnx.Param`` kernels used by
``jnp.einsum`` (q ``(d, H, Dh)``, k/v ``(d, KV, Dh)``, o ``(H, Dh, d)``), the
gated MLP uses ``nnx.Einsum``. The blocks are created stacked along a leading
layer axis with ``nnx.vmap`` and run with ``nnx.scan`` over ``nnx.remat``; the
output logits come from the embedding table (``embed.attend``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

import zoo

VOCAB, D, HEADS, KV_HEADS, HEAD_DIM, HIDDEN, LAYERS = 64, 32, 4, 2, 8, 64, 2
BATCH, LENGTH = 4, 16


def rope(x: jax.Array, positions: jax.Array, base: float = 10_000.0) -> jax.Array:
  """Rotary position embedding on ``x (B, T, N, Dh)`` (rotate-half form)."""
  half = x.shape[-1] // 2
  inv_freq = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angle = positions[:, None].astype(jnp.float32) * inv_freq[None, :]  # (T, half)
  sin, cos = jnp.sin(angle)[None, :, None, :], jnp.cos(angle)[None, :, None, :]
  x1, x2 = x[..., :half], x[..., half:]
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def causal_gqa(q, k, v):
  """Causal grouped-query attention: q ``(B, T, H, Dh)``, k/v ``(B, S, KV, Dh)``."""
  b, t, h, dh = q.shape
  kv = k.shape[2]
  q = q.reshape(b, t, kv, h // kv, dh) * dh**-0.5
  logits = jnp.einsum("btkgh,bskh->bkgts", q, k)
  mask = jnp.tril(jnp.ones((t, k.shape[1]), bool))
  logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
  probs = jax.nn.softmax(logits, axis=-1)
  out = jnp.einsum("bkgts,bskh->btkgh", probs, v)
  return out.reshape(b, t, h, dh)


class Attention(nnx.Module):
  """GQA self-attention with einsum projections on explicit Param kernels."""

  def __init__(self, *, rngs: nnx.Rngs):
    init_in = jax.nn.initializers.variance_scaling(
      1.0, "fan_in", "truncated_normal", in_axis=0, out_axis=(1, 2)
    )
    init_out = jax.nn.initializers.variance_scaling(
      1.0, "fan_in", "truncated_normal", in_axis=(0, 1), out_axis=2
    )
    self.q = nnx.Param(init_in(rngs.params(), (D, HEADS, HEAD_DIM)))
    self.k = nnx.Param(init_in(rngs.params(), (D, KV_HEADS, HEAD_DIM)))
    self.v = nnx.Param(init_in(rngs.params(), (D, KV_HEADS, HEAD_DIM)))
    self.o = nnx.Param(init_out(rngs.params(), (HEADS, HEAD_DIM, D)))

  def __call__(self, x, positions):
    q = rope(jnp.einsum("btd,dnh->btnh", x, self.q[...]), positions)
    k = rope(jnp.einsum("btd,dnh->btnh", x, self.k[...]), positions)
    v = jnp.einsum("btd,dnh->btnh", x, self.v[...])
    return jnp.einsum("btnh,nhd->btd", causal_gqa(q, k, v), self.o[...])


class GatedMLP(nnx.Module):
  """``down(silu(gate(x)) * up(x))`` with ``nnx.Einsum`` kernels gate/up ``(d, f)``, down ``(f, d)``."""

  def __init__(self, *, rngs: nnx.Rngs):
    self.gate = nnx.Einsum("btd,df->btf", (D, HIDDEN), rngs=rngs)
    self.up = nnx.Einsum("btd,df->btf", (D, HIDDEN), rngs=rngs)
    self.down = nnx.Einsum("btf,fd->btd", (HIDDEN, D), rngs=rngs)

  def __call__(self, x):
    return self.down(nnx.silu(self.gate(x)) * self.up(x))


class Block(nnx.Module):
  """Pre-norm residual block: attention, then the gated MLP."""

  def __init__(self, *, rngs: nnx.Rngs):
    self.attn_norm = nnx.RMSNorm(D, rngs=rngs)
    self.attn = Attention(rngs=rngs)
    self.mlp_norm = nnx.RMSNorm(D, rngs=rngs)
    self.mlp = GatedMLP(rngs=rngs)

  def __call__(self, x, positions):
    x = x + self.attn(self.attn_norm(x), positions)
    return x + self.mlp(self.mlp_norm(x))


class Decoder(nnx.Module):
  """Embedding, ``LAYERS`` stacked blocks (scan + remat), final RMSNorm, tied logits."""

  def __init__(self, *, rngs: nnx.Rngs):
    self.embed = nnx.Embed(VOCAB, D, rngs=rngs)

    @nnx.split_rngs(splits=LAYERS)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make_blocks(rngs: nnx.Rngs):
      return Block(rngs=rngs)

    self.blocks = make_blocks(rngs)
    self.final_norm = nnx.RMSNorm(D, rngs=rngs)

  def __call__(self, tokens):
    x = self.embed(tokens) * jnp.sqrt(jnp.float32(D))
    positions = jnp.arange(tokens.shape[1])

    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    @nnx.remat
    def run(x, block):
      return block(x, positions)

    x = run(x, self.blocks)
    return self.embed.attend(self.final_norm(x))


def build() -> Decoder:
  """The decoder (seed 0) with its RMSNorm scales randomised, in eval mode."""
  model = Decoder(rngs=nnx.Rngs(0))
  norms = nnx.state(model, nnx.Param)
  nnx.update(model, zoo.randomise(norms, 3, [r"norm/scale"]))
  model.eval()
  return model


def tokens(seed: int, n: int = BATCH) -> jax.Array:
  """``(n, LENGTH)`` int32 tokens from the zoo's fixed bigram chain."""
  return zoo.markov_tokens(seed, n, LENGTH, VOCAB)


def loss(model, inputs, labels):
  """The training loss (see :class:`zoo.Case`)."""
  (toks,) = inputs
  return zoo.xent(model(toks)[:, :-1], labels)


expected_axis = zoo.rules(
  (r"embed/embedding", zoo.dense),
  (r"blocks/(attn_norm|mlp_norm)/scale", zoo.dense),
  (r"blocks/attn/(q|k|v)", zoo.stacked(zoo.dense_in)),
  (r"blocks/attn/o", zoo.stacked(zoo.lead(2))),
  (r"blocks/mlp/(gate|up|down)/kernel", zoo.stacked(zoo.dense_in)),
  (r"final_norm/scale", zoo.dense),
)


def case() -> zoo.Case:
  """This family's :class:`zoo.Case`."""
  return zoo.Case(
    name="decoder_nnx",
    framework="nnx",
    build=build,
    apply=None,
    loss=loss,
    **zoo.lm_data(tokens),
    expected_axis=expected_axis,
    permuted_class=(r"blocks/mlp/down/kernel", 1),
    permute_note="the gated MLP's hidden channels (gate/up outputs -> down input)",
  )
