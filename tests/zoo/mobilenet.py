"""A MobileNet-style CNN (linen): depthwise-separable blocks and a grouped conv.

Each depthwise-separable block is a 3x3 depthwise conv (``feature_group_count``
= channels) -> BatchNorm -> relu6, then a 1x1 pointwise conv -> BatchNorm ->
relu6; between the blocks a 3x3 conv with 4 groups (as in ShuffleNet/ResNeXt
stages). Global average pool, Dense head.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax.numpy as jnp

import zoo

CLASSES = 10
BATCH = 8


class SeparableBlock(nn.Module):
  """Depthwise 3x3 (one filter per channel), then pointwise 1x1."""

  features: int
  strides: int = 1

  @nn.compact
  def __call__(self, x, train: bool):
    norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9)
    c = x.shape[-1]
    x = nn.Conv(
      c,
      (3, 3),
      (self.strides, self.strides),
      feature_group_count=c,
      use_bias=False,
      name="depthwise",
    )(x)
    x = nn.relu6(norm(name="dw_bn")(x))
    x = nn.Conv(self.features, (1, 1), use_bias=False, name="pointwise")(x)
    return nn.relu6(norm(name="pw_bn")(x))


class MobileNet(nn.Module):
  """Stem (stride 2) -> separable block -> grouped conv -> separable block (stride 2) -> head."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9)
    x = nn.Conv(16, (3, 3), (2, 2), use_bias=False, name="stem")(x)
    x = nn.relu6(norm(name="stem_bn")(x))
    x = SeparableBlock(32, name="block1")(x, train)
    x = nn.Conv(32, (3, 3), feature_group_count=4, use_bias=False, name="grouped")(x)
    x = nn.relu6(norm(name="grouped_bn")(x))
    x = SeparableBlock(64, strides=2, name="block2")(x, train)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(CLASSES, name="head")(x)


def build():
  """``(model, variables)``: BatchNorm scales and statistics and all biases randomised."""
  model = MobileNet()
  variables = zoo.init_linen(model, zoo.images(1, 2))
  variables = zoo.randomise(variables, 17, [r"bn/(scale|mean|var)$", r"bias$"])
  return model, variables


expected_axis = zoo.rules(
  # Depthwise kernels (3, 3, 1, C): the layout is axis 2 (size 1, so the policy keeps it dense).
  (r"params/(stem|grouped|block\d/(depthwise|pointwise))/kernel", zoo.conv_in),
  (r"params/head/kernel", zoo.dense_in),
  (r"params/head/bias", zoo.dense),
  (r"params/.*bn/(scale|bias)", zoo.dense),
  (r"batch_stats/.*bn/(mean|var)", zoo.dense),
)


def case() -> zoo.Case:
  """This family's :class:`zoo.Case`."""
  return zoo.Case(
    name="mobilenet",
    framework="linen",
    build=build,
    apply=zoo.eval_apply,
    loss=zoo.batchnorm_loss,
    **zoo.image_data(BATCH, CLASSES),
    expected_axis=expected_axis,
    permuted_class=(r"params/block1/pointwise/kernel", 2),
    permute_note="the stem's output channels (stem -> BN -> depthwise -> BN -> pointwise)",
  )
