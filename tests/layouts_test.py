"""jasp.layouts: the contracted axes of real flax modules, traced and by convention."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
import testing
from flax import nnx
from zoo import basic

import jasp


def test_linen_cnn_trace():
  model, variables, x = basic.digits_cnn()
  lay = jasp.trace_layouts(model.apply, variables, x)
  assert lay["params/Conv_0/kernel"].axis == (2,) and lay["params/Conv_0/kernel"].kind == "conv"
  assert lay["params/Conv_1/kernel"].axis == (2,)  # grouped: in/groups axis
  assert lay["params/Conv_2/kernel"].axis == (1,)  # 1-D conv (w, in, out)
  assert lay["params/Dense_0/kernel"].axis == (0,) and lay["params/Dense_0/kernel"].out_axes == (1,)
  for p in ["params/Conv_0/bias", "params/BatchNorm_0/scale", "batch_stats/BatchNorm_0/mean"]:
    assert lay[p].axis is None and lay[p].reason


def test_linen_block_trace():
  model, variables, tokens = basic.token_block()
  lay = jasp.trace_layouts(model.apply, variables, tokens)
  att = "params/MultiHeadDotProductAttention_0/"
  for k in ("query", "key", "value"):
    assert lay[att + k + "/kernel"].axis == (0,)
    assert lay[att + k + "/kernel"].out_axes == (1, 2)
  assert lay[att + "out/kernel"].axis == (0, 1)
  assert lay["params/DenseGeneral_0/kernel"].axis == (0,)
  assert lay["params/DenseGeneral_1/kernel"].axis == (0, 1)
  emb = lay["params/Embed_0/embedding"]
  assert emb.axis is None and "gather" in emb.reason
  assert lay["params/LayerNorm_0/scale"].axis is None


def test_nnx_trace():
  model, tokens = basic.nnx_token_block()
  lay = jasp.trace_layouts(model, tokens)
  assert lay["conv/kernel"].axis == (1,) and lay["conv/kernel"].kind == "conv"
  assert lay["up/kernel"].axis == (0,)
  assert lay["attn/out/kernel"].axis == (0, 1)
  assert lay["attn/query/kernel"].axis == (0,)
  assert lay["embed/embedding"].axis is None
  assert set(lay) == set(jasp._tree.leaves_by_path(nnx.state(model, nnx.Param)))


class Odd(nn.Module):
  """Weights used in ways that must not be pruned, or pruned along unusual axes."""

  @nn.compact
  def __call__(self, x):
    w = self.param("w_t", nn.initializers.normal(), (8, 16))  # used as x @ w.T
    tied = self.param("tied", nn.initializers.normal(), (8, 16))
    unused = self.param("unused", nn.initializers.normal(), (16, 16))
    del unused
    y = x @ w.T
    y = y @ tied + tied[0]  # a matmul and an add: mixed use
    z = nn.ConvTranspose(8, (3, 3))(y.reshape(-1, 4, 4, 1))
    return z


def test_unusual_uses():
  model = Odd()
  x = jnp.ones((2, 16))
  v = model.init(jax.random.key(0), x)
  lay = jasp.trace_layouts(model.apply, v, x)
  assert lay["params/w_t"].axis == (1,)  # contracted along its axis 1 after the transpose
  assert lay["params/tied"].axis is None and "slice" in lay["params/tied"].reason
  assert lay["params/unused"].axis is None and "not used" in lay["params/unused"].reason
  assert lay["params/ConvTranspose_0/kernel"].axis == (2,)


def test_scan_over_layers():
  class Layer(nn.Module):
    @nn.compact
    def __call__(self, x, _):
      return nn.relu(nn.Dense(16)(x)), None

  class Stack(nn.Module):
    @nn.compact
    def __call__(self, x):
      scan = nn.scan(Layer, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
      return scan()(x, None)[0]

  x = jnp.ones((2, 16))
  model = Stack()
  v = model.init(jax.random.key(0), x)
  lay = jasp.trace_layouts(model.apply, v, x)
  (path,) = [p for p in lay if p.endswith("kernel")]
  assert v["params"]["ScanLayer_0"]["Dense_0"]["kernel"].shape == (3, 16, 16)
  assert lay[path].axis == (1,)  # the stacked leading axis is not a group axis


@pytest.mark.parametrize(
  "path,shape,axis",
  [
    ("params/Dense_0/kernel", (16, 8), (0,)),
    ("params/Conv_0/kernel", (3, 3, 16, 8), (2,)),
    ("params/ConvTranspose_1/kernel", (3, 16, 8), (1,)),
    ("conv1/kernel", (3, 3, 3, 16, 8), (3,)),
    ("params/MultiHeadDotProductAttention_0/query/kernel", (16, 2, 8), (0,)),
    ("attn/out/kernel", (2, 8, 16), (0, 1)),
    ("params/DenseGeneral_0/kernel", (16, 2, 8), None),  # ambiguous without a trace
    ("params/Embed_0/embedding", (32, 16), None),
    ("params/Dense_0/bias", (16,), None),
  ],
  ids=testing.param_id,
)
def test_convention_layout(path, shape, axis):
  lay = jasp.convention_layout(path, jnp.zeros(shape))
  assert lay.axis == axis
  if axis is None:
    assert lay.reason


def test_convention_agrees_with_trace_on_auto_named_modules():
  model, variables, x = basic.digits_cnn()
  traced = jasp.trace_layouts(model.apply, variables, x)
  for path, leaf in testing.kernels_of(variables).items():
    assert jasp.convention_layout(path, leaf).axis == traced[path].axis, path


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_params_are_traced(dtype):
  model, variables, x = basic.digits_cnn()
  low = jax.tree.map(lambda a: a.astype(dtype), variables)
  lay = jasp.trace_layouts(model.apply, low, x.astype(dtype))
  assert lay["params/Dense_0/kernel"].axis == (0,)
  assert jasp.convention_layout(
    "params/Dense_0/kernel", low["params"]["Dense_0"]["kernel"]
  ).axis == (0,)
