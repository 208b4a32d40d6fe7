"""An MLP of ``nnx.LoRALinear`` layers (nnx): base kernels plus rank-4 adapters.

Each layer computes ``x @ W + b + (x @ A) @ B``. The adapters' ``B`` factors
start at zero in flax; here they are randomised (an adapter already trained),
so the adapter path matters. Decision for the oracle: the base kernel ``W`` is
pruned along axis 0; the low-rank factors ``A (in, r)`` and ``B (r, out)`` stay
dense (2:4 on the factors does not make ``A @ B`` 2:4 and the rank-r matmuls
gain nothing), with a reason that says "low-rank".
"""

from __future__ import annotations

from flax import nnx

import zoo

IN, HIDDEN, CLASSES, RANK = 32, 64, 8, 4
BATCH = 16


class LoRAMLP(nnx.Module):
  """Three LoRALinear layers with gelu in between."""

  def __init__(self, *, rngs: nnx.Rngs):
    self.l1 = nnx.LoRALinear(IN, HIDDEN, lora_rank=RANK, rngs=rngs)
    self.l2 = nnx.LoRALinear(HIDDEN, HIDDEN, lora_rank=RANK, rngs=rngs)
    self.out = nnx.LoRALinear(HIDDEN, CLASSES, lora_rank=RANK, rngs=rngs)

  def __call__(self, x):
    x = nnx.gelu(self.l1(x))
    x = nnx.gelu(self.l2(x))
    return self.out(x)


def build() -> LoRAMLP:
  """The MLP (seed 0) with the adapters' B factors and the biases randomised, eval mode."""
  model = LoRAMLP(rngs=nnx.Rngs(0))
  nnx.update(model, zoo.randomise(nnx.state(model, nnx.Param), 13, [r"lora_b$", r"bias$"]))
  model.eval()
  return model


def loss(model, inputs, labels):
  """The training loss (see :class:`zoo.Case`)."""
  return zoo.xent(model(*inputs), labels)


def _train_batches():
  """Four ``(inputs, labels)`` batches, cycled by the fine-tuning steps."""
  out = []
  for s in range(4):
    x = zoo.features(100 + s, BATCH, IN)
    out.append(((x,), zoo.teacher_labels(x, CLASSES)))
  return out


expected_axis = zoo.rules(
  (r"(l1|l2|out)/kernel", zoo.dense_in),
  (r"(l1|l2|out)/bias", zoo.dense),
  (r"(l1|l2|out)/lora/(lora_a|lora_b)", zoo.dense),
)


def case() -> zoo.Case:
  """This family's :class:`zoo.Case`."""
  return zoo.Case(
    name="lora_mlp",
    framework="nnx",
    build=build,
    apply=None,
    sample=(zoo.features(10, BATCH, IN),),
    other=(zoo.features(11, BATCH, IN),),
    calib_batches=lambda: [(zoo.features(20 + s, BATCH, IN),) for s in range(4)],
    heldout=(zoo.features(30, BATCH, IN),),
    train_batches=_train_batches,
    loss=loss,
    expected_axis=expected_axis,
    expected_reason={r"lora/lora_[ab]$": "low-rank"},
    permuted_class=(r"l2/kernel", 0),
    permute_note="the first hidden layer's channels (l1 kernel/bias/lora_b outputs -> l2 "
    "kernel and lora_a inputs)",
  )
