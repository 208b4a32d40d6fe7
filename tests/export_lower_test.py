"""jasp.export._lower: what jax2onnx is given (the model's jaxpr, re-evaluated)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
import testing

import jasp
from jasp import export

pytest.importorskip("jax2onnx")

pytestmark = pytest.mark.slow  # exports trace, convert and run whole models


class _Pools(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(8, (3, 3))(x))
    x = nn.max_pool(x, (3, 3), strides=(1, 1), padding="SAME")  # positional window
    x = nn.max_pool(x, (2, 2), (2, 2), ((0, 1), (0, 1)))  # explicit, uneven padding
    x = nn.avg_pool(x, (2, 2), (2, 2))
    return nn.Dense(4)(x.reshape(x.shape[0], -1))


def test_positional_pooling_exports_and_runs_like_jax():
  x = testing.normal((2, 9, 9, 3))
  model = _Pools()
  v = model.init(jax.random.key(0), x)
  onx = export.to_onnx(model.apply, v, x)
  assert testing.rel_err(export.run_onnx(onx, x)[0], model.apply(v, x)) < 1e-5
  ops = {n.op_type for n in onx.graph.node}
  assert "MaxPool" in ops and "Conv" in ops


class _Block(nn.Module):
  @nn.compact
  def __call__(self, h, _):
    y = nn.Dense(16, use_bias=False, name="up")(nn.RMSNorm()(h))
    return h + nn.Dense(8, use_bias=False, name="down")(nn.gelu(y)), None


class _Stacked(nn.Module):
  @nn.compact
  def __call__(self, x):
    blocks = nn.scan(
      nn.remat(_Block), variable_axes={"params": 0}, split_rngs={"params": True}, length=3
    )
    x, _ = blocks(name="blocks")(nn.Dense(8)(x), None)
    return nn.Dense(4)(x)


def test_linen_scan_blocks_become_one_initializer_per_layer():
  x = testing.normal((2, 5, 8))
  model = _Stacked()
  v = model.init(jax.random.key(0), x)
  layouts = jasp.trace_layouts(model.apply, v, x)
  assert layouts["params/blocks/up/kernel"].stack == (0,)
  pruned, masks = jasp.prune(v, layouts=layouts)
  onx = export.to_onnx(model.apply, pruned, x, masks=masks)
  assert "Loop" not in {n.op_type for n in onx.graph.node}
  assert testing.rel_err(export.run_onnx(onx, x)[0], model.apply(pruned, x)) < 1e-5
  by = export.check_onnx(onx).by_param()
  for name in ("up", "down"):
    for layer in range(3):
      w = by[f"params/blocks/{name}/kernel[{layer}]"]
      assert w.nm and w.expected_by == "metadata" and w.consumer == "MatMul[B]", w


def test_reverse_scan_with_constant_kernels_exports():
  """A backward RNN: jax2onnx does not convert a reverse scan; jasp runs it forward on
  reversed inputs. Its kernels stay loop operands, followed into the Loop body."""

  def rnn(p, xs):  # xs (T, B, 8)
    def cell(h, x):
      h = jnp.tanh(x @ p["wx"] + h @ p["wh"])
      return h, h

    h, ys = jax.lax.scan(cell, jnp.zeros((xs.shape[1], 8)), xs, reverse=True)
    return ys.sum(0) + h

  p = {"wx": testing.normal((8, 8), 1), "wh": testing.normal((8, 8), 2)}
  lay = jasp.trace_layouts(rnn, p, testing.normal((6, 2, 8)))
  pruned, masks = jasp.prune(p, layouts=lay)
  xs = testing.normal((6, 2, 8), 3)
  onx = export.to_onnx(rnn, pruned, xs, masks=masks)
  assert testing.rel_err(export.run_onnx(onx, xs)[0], rnn(pruned, xs)) < 1e-5
  by = export.check_onnx(onx).by_param()
  assert by["wx"].nm and by["wh"].nm and by["wh"].expected_by == "metadata"


def test_dense_general_kernel_is_a_2d_matmul_weight():
  model = nn.DenseGeneral((4, 6), axis=(-2, -1))
  x = testing.normal((3, 2, 8))
  v = model.init(jax.random.key(0), x)
  onx = export.to_onnx(model.apply, v, x)
  (w,) = [c for c in export.check_onnx(onx).weights if c.param == "params/kernel"]
  assert w.shape == (16, 24) and w.consumer == "MatMul[B]" and w.axis == (0,)
  assert testing.rel_err(export.run_onnx(onx, x)[0], model.apply(v, x)) < 1e-5


class _ResBlock(nn.Module):
  features: int
  strides: int = 1

  @nn.compact
  def __call__(self, x):
    y = nn.Conv(self.features, (3, 3), self.strides, use_bias=False)(x)
    y = nn.relu(nn.BatchNorm(use_running_average=True)(y))
    y = nn.BatchNorm(use_running_average=True)(nn.Conv(self.features, (3, 3), use_bias=False)(y))
    if x.shape != y.shape:
      x = nn.Conv(self.features, (1, 1), self.strides, use_bias=False)(x)
      x = nn.BatchNorm(use_running_average=True)(x)
    return nn.relu(x + y)


class _ResNet18Shape(nn.Module):
  """ResNet-18's layout with 8 filters: 7x7/2 stem, keyword max_pool, four stages of two blocks."""

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(8, (7, 7), (2, 2), padding=[(3, 3), (3, 3)], use_bias=False)(x)
    x = nn.relu(nn.BatchNorm(use_running_average=True)(x))
    x = nn.max_pool(x, window_shape=(3, 3), strides=(2, 2), padding="SAME")
    for i, f in enumerate((8, 16, 32, 64)):
      for j in range(2):
        x = _ResBlock(f, 2 if i and not j else 1)(x)
    return nn.Dense(10)(jnp.mean(x, axis=(1, 2)))


def test_resnet18_shaped_model_exports_a_file_onnx_accepts():
  x = testing.normal((2, 32, 32, 3))
  model = _ResNet18Shape()
  v = model.init(jax.random.key(0), x)
  lay = jasp.trace_layouts(model.apply, v, x)
  pruned, masks = jasp.prune(v, layouts=lay)
  onx = export.to_onnx(model.apply, pruned, x, masks=masks)  # validates: checker, run, pattern
  import onnx

  onnx.checker.check_model(onx, full_check=True)
  assert export.check_onnx(onx).ok


def test_nnx_idioms_export():
  """Gemma-style calls with out_sharding; Dropout(rngs=...) at call time in eval mode;
  Dropout rng streams inside nnx.scan over nnx.vmap-made blocks."""
  from flax import nnx

  class Gemma(nnx.Module):
    def __init__(self, rngs):
      self.embed = nnx.Embed(32, 16, rngs=rngs)
      self.proj = nnx.Linear(16, 16, rngs=rngs)
      self.ein = nnx.Einsum("btd,dh->bth", (16, 16), rngs=rngs)
      self.drop = nnx.Dropout(0.2)
      self.rngs = rngs

    def __call__(self, tokens):
      x = self.embed(tokens)
      x = self.drop(self.proj(x, out_sharding=None), rngs=self.rngs)
      return self.embed.attend(self.ein(x, out_sharding=None))

  class Block(nnx.Module):
    def __init__(self, rngs):
      self.lin = nnx.Linear(16, 16, rngs=rngs)
      self.drop = nnx.Dropout(0.1, rngs=rngs)

    def __call__(self, x):
      return x + self.drop(nnx.relu(self.lin(x)))

  class Stack(nnx.Module):
    def __init__(self, rngs):
      @nnx.split_rngs(splits=3)
      @nnx.vmap(in_axes=(0,), out_axes=0)
      def make(rngs):
        return Block(rngs)

      self.blocks = make(rngs)

    def __call__(self, x):
      @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
      def body(x, blk):
        return blk(x)

      return body(x, self.blocks)

  for module, x in (
    (Gemma(nnx.Rngs(0)), jnp.zeros((2, 5), jnp.int32)),
    (Stack(nnx.Rngs(0)), testing.normal((2, 16))),
  ):
    module.eval()
    onx = export.to_onnx(module, x)
    assert testing.rel_err(export.run_onnx(onx, x)[0], module(x)) < 1e-5
