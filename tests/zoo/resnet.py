"""ResNet (linen): Conv + BatchNorm stem, max pools, residual blocks, global pool, Dense head.

Written the way flax's ImageNet ResNet is: a block is conv-BN-relu-conv-BN, a
strided 1x1 conv (with its BatchNorm) projects the shortcut when the shape
changes, BatchNorm keeps running statistics in ``batch_stats`` and uses them
with ``train=False``.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax.numpy as jnp

import zoo

CLASSES = 10
BATCH = 8


class ResidualBlock(nn.Module):
  """conv3x3-BN-relu-conv3x3-BN, plus the shortcut (projected when needed), relu."""

  features: int
  strides: int = 1

  @nn.compact
  def __call__(self, x, train: bool):
    norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9)
    y = nn.Conv(self.features, (3, 3), (self.strides, self.strides), use_bias=False, name="conv1")(
      x
    )
    y = nn.relu(norm(name="bn1")(y))
    y = nn.Conv(self.features, (3, 3), use_bias=False, name="conv2")(y)
    y = norm(name="bn2")(y)
    if x.shape[-1] != self.features or self.strides != 1:
      x = nn.Conv(self.features, (1, 1), (self.strides, self.strides), use_bias=False, name="proj")(
        x
      )
      x = norm(name="proj_bn")(x)
    return nn.relu(x + y)


class ResNet(nn.Module):
  """A two-stage ResNet for 16x16 RGB images."""

  widths: tuple[int, ...] = (16, 32)
  classes: int = CLASSES

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(self.widths[0], (3, 3), use_bias=False, name="stem")(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9, name="stem_bn")(x)
    x = nn.relu(x)
    x = nn.max_pool(x, window_shape=(2, 2), strides=(2, 2), padding="SAME")
    x = ResidualBlock(self.widths[0], name="block1")(x, train)
    x = ResidualBlock(self.widths[1], strides=2, name="block2")(x, train)
    x = nn.max_pool(x, (3, 3), strides=(1, 1), padding="SAME")
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.classes, name="head")(x)


def build():
  """``(model, variables)``: BatchNorm scales and statistics and all biases randomised."""
  model = ResNet()
  variables = zoo.init_linen(model, zoo.images(1, 2))
  variables = zoo.randomise(variables, 7, [r"bn\d*/(scale|mean|var)$", r"bias$"])
  return model, variables


expected_axis = zoo.rules(
  (r"params/.*(stem|conv1|conv2|proj)/kernel", zoo.conv_in),
  (r"params/head/kernel", zoo.dense_in),
  (r"params/head/bias", zoo.dense),
  (r"params/.*bn\d*/(scale|bias)", zoo.dense),
  (r"batch_stats/.*bn\d*/(mean|var)", zoo.dense),
)


def case() -> zoo.Case:
  """This family's :class:`zoo.Case`."""
  return zoo.Case(
    name="resnet",
    framework="linen",
    build=build,
    apply=zoo.eval_apply,
    loss=zoo.batchnorm_loss,
    **zoo.image_data(BATCH, CLASSES),
    expected_axis=expected_axis,
    permuted_class=(r"params/block1/conv1/kernel", 3),
    permute_note="the internal channels of a residual block (conv1 -> bn1 -> conv2)",
  )
