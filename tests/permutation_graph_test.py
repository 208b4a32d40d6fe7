"""Tests of the jaxpr channel analysis: which axes are tied, which are pinned."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import testing

from jasp.permutation.graph import trace_channels


def classes_by_member(graph):
  """{(path, axis): class} for every parameter axis (sizes > 1)."""
  out = {}
  for c in graph.classes():
    for mem in c.members:
      out.setdefault(mem, []).append(c)
  return out


def mlp(p, x):
  h = jax.nn.relu(x @ p["w1"] + p["b1"])
  return h @ p["w2"] + p["b2"]


def test_dense_relu_dense_ties_producer_bias_and_consumer():
  w1, b1, w2, b2 = testing.normals((8, 16), (16,), (16, 4), (4,))
  g = trace_channels(mlp, {"w1": w1, "b1": b1, "w2": w2, "b2": b2}, jnp.ones((2, 8)))
  by = classes_by_member(g)
  (hidden,) = by[("w1", 1)]
  assert set(hidden.members) == {("w1", 1), ("b1", 0), ("w2", 0)}
  assert hidden.pinned == ""
  assert "input" in by[("w1", 0)][0].pinned
  assert "output" in by[("w2", 1)][0].pinned


def test_order_dependent_ops_pin_the_channels():
  w1, b1, w2 = testing.normals((8, 16), (16,), (16, 4))
  cases = {
    "rev": lambda h: h[:, ::-1],
    "slice": lambda h: jnp.concatenate([h[:, :8] * 2.0, h[:, 8:]], axis=1),
    "cumsum": lambda h: jnp.cumsum(h, axis=1),
    "argmax": lambda h: h + jnp.argmax(h, axis=1, keepdims=True).astype(h.dtype),
    "sort": lambda h: jnp.sort(h, axis=1),
    "roll": lambda h: jnp.roll(h, 1, axis=1),
    "iota": lambda h: h * jnp.arange(16.0),
    "gather": lambda h: h[:, jnp.array([3, 1, 2, 0] * 4)],
  }
  for name, op in cases.items():

    def f(p, x, op=op):
      return op(x @ p["w1"] + p["b1"]) @ p["w2"]

    g = trace_channels(f, {"w1": w1, "b1": b1, "w2": w2}, jnp.ones((2, 8)))
    (hidden,) = classes_by_member(g)[("w1", 1)]
    assert hidden.pinned, name


def test_channel_reductions_and_scalars_are_fine():
  w1, b1, w2 = testing.normals((8, 16), (16,), (16, 4))

  def f(p, x):
    h = x @ p["w1"] + p["b1"]
    h = h - jnp.mean(h, axis=-1, keepdims=True)  # LayerNorm-like
    h = h / jnp.sqrt(jnp.var(h, axis=-1, keepdims=True) + 1e-5)
    h = jnp.where(h > 0, h, 0.1 * h) + jnp.max(h, axis=-1, keepdims=True)
    return h @ p["w2"]

  g = trace_channels(f, {"w1": w1, "b1": b1, "w2": w2}, jnp.ones((2, 8)))
  (hidden,) = classes_by_member(g)[("w1", 1)]
  assert hidden.pinned == ""


def test_residual_add_ties_two_producers():
  w0, w1, w2, w3 = testing.normals((8, 16), (16, 16), (16, 16), (16, 4))

  def f(p, x):
    a = x @ p["w0"]
    b = jax.nn.relu(a @ p["w1"]) @ p["w2"]
    return (a + b) @ p["w3"]

  g = trace_channels(f, {"w0": w0, "w1": w1, "w2": w2, "w3": w3}, jnp.ones((2, 8)))
  (res,) = classes_by_member(g)[("w0", 1)]
  assert set(res.members) == {("w0", 1), ("w2", 1), ("w1", 0), ("w3", 0)}


def test_concat_is_a_sum_and_flatten_a_product():
  wa, wb, wc = testing.normals((8, 8), (8, 12), (20, 4))

  def cat(p, x):
    return jnp.concatenate([x @ p["wa"], x @ p["wb"]], axis=-1) @ p["wc"]

  g = trace_channels(cat, {"wa": wa, "wb": wb, "wc": wc}, jnp.ones((2, 8)))
  (a,) = classes_by_member(g)[("wa", 1)]
  (b,) = classes_by_member(g)[("wb", 1)]
  assert a.id != b.id and ("wc", 0) in a.members and ("wc", 0) in b.members
  assert np.array_equal(g.positions("wc", (0,), a.id), np.arange(8)[None])
  assert np.array_equal(g.positions("wc", (0,), b.id), 8 + np.arange(12)[None])

  k, d = testing.normals((3, 3, 2, 8), (3 * 3 * 8, 4))

  def flat(p, x):
    y = jax.lax.conv_general_dilated(
      x, p["k"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    return y.reshape(y.shape[0], -1) @ p["d"]

  g = trace_channels(flat, {"k": k, "d": d}, jnp.ones((1, 3, 3, 2)))
  (ch,) = classes_by_member(g)[("k", 3)]
  assert ch.pinned == "" and ("d", 0) in ch.members
  pos = g.positions("d", (0,), ch.id)
  assert pos.shape == (9, 8) and np.array_equal(pos[1], 8 + np.arange(8))


def test_grouped_and_depthwise_convs():
  k1, kd, k2 = testing.normals((1, 1, 4, 16), (3, 3, 1, 16), (1, 1, 16, 8))

  def f(p, x):
    conv = lambda x, k, g=1: jax.lax.conv_general_dilated(
      x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=g
    )
    h = conv(x, p["k1"])
    h = conv(h, p["kd"], 16)  # depthwise
    return conv(h, p["k2"])

  g = trace_channels(f, {"k1": k1, "kd": kd, "k2": k2}, jnp.ones((1, 4, 4, 4)))
  (ch,) = classes_by_member(g)[("k1", 3)]
  assert ch.pinned == ""
  assert {("kd", 3), ("k2", 2)} <= set(ch.members)


def test_multi_dim_layernorm_maps_the_right_axis():
  """apex permutes a LayerNorm over (W, C) along the wrong axis; here scale[1] is C."""

  class M(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.Dense(8)(x)  # (B, W=4, C=8)
      x = nn.LayerNorm(reduction_axes=(-2, -1), feature_axes=(-2, -1))(x)
      return nn.Dense(3)(x)

  x = jnp.ones((2, 4, 5))
  v = M().init(jax.random.key(0), x)
  g = trace_channels(M().apply, v, x)
  by = classes_by_member(g)
  (ch,) = by[("params/Dense_0/kernel", 1)]
  assert ("params/LayerNorm_0/scale", 1) in ch.members
  assert ("params/LayerNorm_0/scale", 0) not in ch.members
  assert by[("params/LayerNorm_0/scale", 0)][0].pinned  # W comes from the input


def test_cond_ties_the_branches_outputs():
  """Each branch is walked on the same operands; the outputs of all branches are one value."""
  wa, wb, w2 = testing.normals((8, 16), (8, 16), (16, 4))

  def f(p, x):
    h = jax.lax.cond(x.sum() > 0, lambda x: x @ p["wa"], lambda x: jnp.tanh(x @ p["wb"]), x)
    return h @ p["w2"]

  g = trace_channels(f, {"wa": wa, "wb": wb, "w2": w2}, jnp.ones((2, 8)))
  (hidden,) = classes_by_member(g)[("wa", 1)]
  assert set(hidden.members) == {("wa", 1), ("wb", 1), ("w2", 0)}
  assert hidden.pinned == ""

  def g_rev(p, x):  # one branch reverses the channels: the tied class is pinned
    h = jax.lax.cond(x.sum() > 0, lambda x: x @ p["wa"], lambda x: (x @ p["wb"])[:, ::-1], x)
    return h @ p["w2"]

  g = trace_channels(g_rev, {"wa": wa, "wb": wb, "w2": w2}, jnp.ones((2, 8)))
  (hidden,) = classes_by_member(g)[("wa", 1)]
  assert "rev" in hidden.pinned


def test_while_loop_ties_its_carry_in_and_out():
  """A while loop's carry is one class in every iteration: w's input and output axes tie."""
  w0, w, w2 = testing.normals((8, 16), (16, 16), (16, 4))

  def f(p, x):
    h = x @ p["w0"]
    h, _ = jax.lax.while_loop(
      lambda s: s[1] < 3, lambda s: (jnp.tanh(s[0] @ p["w"]), s[1] + 1), (h, 0)
    )
    return h @ p["w2"]

  g = trace_channels(f, {"w0": w0, "w": w, "w2": w2}, jnp.ones((2, 8)))
  (c,) = classes_by_member(g)[("w0", 1)]
  assert {("w", 0), ("w", 1), ("w2", 0)} <= set(c.members) and c.pinned == ""


def test_scan_over_time_shares_one_class_and_pins_time():
  """A scan over a sequence (kernels as constants): one class for all steps, time pinned."""
  wx, wh, w2 = testing.normals((8, 16), (16, 16), (16, 4))

  def f(p, xs):  # xs (T, B, 8)
    def step(h, x):
      h = jnp.tanh(x @ p["wx"] + h @ p["wh"])
      return h, h

    _, hs = jax.lax.scan(step, jnp.zeros((xs.shape[1], 16)), xs)
    return hs.sum(0) @ p["w2"]

  g = trace_channels(f, {"wx": wx, "wh": wh, "w2": w2}, jnp.ones((50, 2, 8)))
  (c,) = classes_by_member(g)[("wh", 0)]
  assert {("wx", 1), ("wh", 1), ("w2", 0)} <= set(c.members)
  assert c.pinned == "" and c.layers == (None,) * len(c.members)
