"""An encoder-decoder transformer (linen), the way flax's WMT example is written.

Post-embedding learned position embeddings, pre-LayerNorm encoder layers
(self-attention + MLP), decoder layers with causal self-attention and
cross-attention on the encoded source, ``nn.MultiHeadDotProductAttention``
everywhere, one embedding table shared by source and target, and a separate
output ``Dense`` for the logits. Token 0 is padding (none in the data: tokens
are drawn from [1, vocab)).
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

import zoo

VOCAB, D, HEADS, MLP, LAYERS = 48, 32, 4, 64, 2
BATCH, SRC_LEN, TGT_LEN = 4, 12, 10


class MlpBlock(nn.Module):
  """Dense -> relu -> Dense."""

  @nn.compact
  def __call__(self, x):
    return nn.Dense(D, name="wo")(nn.relu(nn.Dense(MLP, name="wi")(x)))


class EncoderLayer(nn.Module):
  """Pre-norm self-attention and MLP, each with a residual."""

  @nn.compact
  def __call__(self, x, mask):
    h = nn.LayerNorm(name="ln1")(x)
    x = x + nn.MultiHeadDotProductAttention(num_heads=HEADS, name="self_attn")(h, h, mask=mask)
    return x + MlpBlock(name="mlp")(nn.LayerNorm(name="ln2")(x))


class DecoderLayer(nn.Module):
  """Causal self-attention, cross-attention on the encoder output, MLP."""

  @nn.compact
  def __call__(self, y, encoded, self_mask, cross_mask):
    h = nn.LayerNorm(name="ln1")(y)
    y = y + nn.MultiHeadDotProductAttention(num_heads=HEADS, name="self_attn")(h, h, mask=self_mask)
    h = nn.LayerNorm(name="ln2")(y)
    y = y + nn.MultiHeadDotProductAttention(num_heads=HEADS, name="cross_attn")(
      h, encoded, mask=cross_mask
    )
    return y + MlpBlock(name="mlp")(nn.LayerNorm(name="ln3")(y))


class PositionEmbedding(nn.Module):
  """Learned position embeddings added to the inputs."""

  @nn.compact
  def __call__(self, x):
    pos = self.param("pos_embedding", nn.initializers.normal(0.02), (1, x.shape[1], D))
    return x + pos


def shift_right(tokens):
  """Teacher forcing: the decoder sees ``[0, y_0, ..., y_{T-2}]``."""
  return jnp.pad(tokens, ((0, 0), (1, 0)))[:, :-1]


class Transformer(nn.Module):
  """Shared embedding, encoder, decoder, output Dense."""

  @nn.compact
  def __call__(self, src, tgt):
    embed = nn.Embed(VOCAB, D, embedding_init=nn.initializers.normal(1.0), name="shared_embed")
    src_mask = nn.make_attention_mask(src > 0, src > 0)
    x = PositionEmbedding(name="enc_pos")(embed(src))
    for i in range(LAYERS):
      x = EncoderLayer(name=f"encoder_{i}")(x, src_mask)
    encoded = nn.LayerNorm(name="encoder_norm")(x)

    dec_in = shift_right(tgt)
    self_mask = nn.combine_masks(nn.make_attention_mask(tgt > 0, tgt > 0), nn.make_causal_mask(tgt))
    cross_mask = nn.make_attention_mask(tgt > 0, src > 0)
    y = PositionEmbedding(name="dec_pos")(embed(dec_in))
    for i in range(LAYERS):
      y = DecoderLayer(name=f"decoder_{i}")(y, encoded, self_mask, cross_mask)
    y = nn.LayerNorm(name="decoder_norm")(y)
    return nn.Dense(VOCAB, name="logits")(y)


_PERM = np.random.default_rng(77).permutation(VOCAB - 1) + 1  # a fixed token mapping


def pair(seed: int, n: int = BATCH):
  """``(src, tgt)``: the target is the reversed source through a fixed token mapping."""
  src = zoo.markov_tokens(seed, n, SRC_LEN, VOCAB, low=1)
  tgt = _PERM[np.asarray(src)[:, ::-1][:, :TGT_LEN] - 1]
  return src, jnp.asarray(tgt, jnp.int32)


def build():
  """``(model, variables)`` with LayerNorm scales and every bias randomised."""
  model = Transformer()
  variables = zoo.init_linen(model, *pair(1))
  variables = zoo.randomise(variables, 5, [r"(ln\d|_norm)/scale$", r"bias$"])
  return model, variables


def apply(model):
  """The inference call: ``fn(variables, *inputs)``."""
  return model.apply


def loss(model, variables, inputs, labels, rng):
  """The training loss (see :class:`zoo.Case`)."""
  del rng
  return zoo.xent(model.apply(variables, *inputs), labels), {}


def _train_batches():
  """Four ``(inputs, labels)`` batches, cycled by the fine-tuning steps."""
  out = []
  for s in range(4):
    src, tgt = pair(100 + s)
    out.append(((src, tgt), tgt))
  return out


_ATT = r"params/(encoder_\d/self_attn|decoder_\d/(self_attn|cross_attn))"
expected_axis = zoo.rules(
  (r"params/shared_embed/embedding", zoo.dense),
  (r"params/(enc_pos|dec_pos)/pos_embedding", zoo.dense),
  (_ATT + r"/(query|key|value)/kernel", zoo.dense_in),
  (_ATT + r"/out/kernel", zoo.lead(2)),
  (_ATT + r"/(query|key|value|out)/bias", zoo.dense),
  (r"params/(encoder|decoder)_\d/mlp/(wi|wo)/kernel", zoo.dense_in),
  (r"params/(encoder|decoder)_\d/mlp/(wi|wo)/bias", zoo.dense),
  (r"params/((encoder|decoder)_\d/ln\d|encoder_norm|decoder_norm)/(scale|bias)", zoo.dense),
  (r"params/logits/kernel", zoo.dense_in),
  (r"params/logits/bias", zoo.dense),
)


def case() -> zoo.Case:
  """This family's :class:`zoo.Case`."""
  return zoo.Case(
    name="encdec",
    framework="linen",
    build=build,
    apply=apply,
    sample=pair(10),
    other=pair(11),
    calib_batches=lambda: [pair(20 + s) for s in range(4)],
    heldout=pair(30),
    train_batches=_train_batches,
    loss=loss,
    expected_axis=expected_axis,
    permuted_class=(r"params/encoder_0/mlp/wo/kernel", 0),
    permute_note="an MLP block's hidden channels (wi output -> relu -> wo input)",
  )
