"""A CNN classifier (nnx), the way flax's nnx MNIST tutorial model is written, with BatchNorm.

``nnx.Conv`` -> ``nnx.BatchNorm`` -> relu -> max pool, twice, flatten,
``nnx.Dropout``, ``nnx.Linear`` -> relu -> ``nnx.Dropout`` -> ``nnx.Linear``.
Trained in ``model.train()`` mode (batch statistics, dropout on); every other
step uses ``model.eval()`` (running statistics, no dropout).
"""

from __future__ import annotations

from flax import nnx

import zoo

CLASSES, C1, C2, HIDDEN = 10, 16, 32, 64
BATCH = 8


class CNN(nnx.Module):
  """Two conv stages on 16x16x3 images, then a two-layer MLP head."""

  def __init__(self, *, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(3, C1, (3, 3), rngs=rngs)
    self.bn1 = nnx.BatchNorm(C1, rngs=rngs)
    self.conv2 = nnx.Conv(C1, C2, (3, 3), rngs=rngs)
    self.bn2 = nnx.BatchNorm(C2, rngs=rngs)
    self.dropout1 = nnx.Dropout(0.25, rngs=rngs)
    self.fc1 = nnx.Linear(4 * 4 * C2, HIDDEN, rngs=rngs)
    self.dropout2 = nnx.Dropout(0.25, rngs=rngs)
    self.fc2 = nnx.Linear(HIDDEN, CLASSES, rngs=rngs)

  def __call__(self, x):
    x = nnx.max_pool(nnx.relu(self.bn1(self.conv1(x))), window_shape=(2, 2), strides=(2, 2))
    x = nnx.max_pool(nnx.relu(self.bn2(self.conv2(x))), window_shape=(2, 2), strides=(2, 2))
    x = self.dropout1(x.reshape(x.shape[0], -1))
    x = self.dropout2(nnx.relu(self.fc1(x)))
    return self.fc2(x)


def build() -> CNN:
  """The CNN (seed 0) with BatchNorm scales and statistics and all biases randomised, eval mode."""
  model = CNN(rngs=nnx.Rngs(0))
  state = nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat))
  nnx.update(model, zoo.randomise(state, 11, [r"bn\d/(scale|mean|var)$", r"bias$"]))
  model.eval()
  return model


def loss(model, inputs, labels):
  """The training loss (see :class:`zoo.Case`)."""
  return zoo.xent(model(*inputs), labels)


expected_axis = zoo.rules(
  (r"conv[12]/kernel", zoo.conv_in),
  (r"fc[12]/kernel", zoo.dense_in),
  (r"(conv[12]|fc[12])/bias", zoo.dense),
  (r"bn[12]/(scale|bias|mean|var)", zoo.dense),
  (r"dropout[12]/rngs/(key|count)", zoo.dense),
)


def case() -> zoo.Case:
  """This family's :class:`zoo.Case`."""
  return zoo.Case(
    name="cnn_nnx",
    framework="nnx",
    build=build,
    apply=None,
    loss=loss,
    **zoo.image_data(BATCH, CLASSES),
    expected_axis=expected_axis,
    permuted_class=(r"conv2/kernel", 2),
    permute_note="conv1's output channels (conv1 -> bn1 -> relu -> pool -> conv2)",
  )
