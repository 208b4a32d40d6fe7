"""jasp.calibration.stats: the jaxpr tap that collects each weight's input statistics."""

import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import testing
from zoo import basic

import jasp
from jasp import calibration as cal
from jasp.calibration import stats as stats_lib

HI = jax.lax.Precision.HIGHEST


def test_dot_stats_match_numpy_for_every_layout():
  """Dense, a transposed (out, in) weight and a 3-D kernel contracted on two axes."""

  def f(p, x):  # x (B, S, 8); HIGHEST so that a GPU's TF32 does not blur the reference
    h = jnp.matmul(x, p["dense"], precision=HI)  # (B, S, 12)
    h = jnp.matmul(jnp.tanh(h), p["torch_style"].T, precision=HI)  # stored (out=16, in=12)
    h = h.reshape(h.shape[:-1] + (2, 8))
    return jnp.einsum("bshd,hdo->bso", h, p["general"], precision=HI)

  p = {
    "dense": testing.normal((8, 12), 0),
    "torch_style": testing.normal((16, 12), 1),
    "general": testing.normal((2, 8, 4), 2),
  }
  xs = [testing.normal((3, 5, 8), 10 + i) for i in range(3)]
  st = cal.collect_stats(f, p, xs, hessian=True)
  assert set(st) == {"dense", "torch_style", "general"}
  assert st["torch_style"].site.group_axes == (1,)
  assert st["general"].site.group_axes == (0, 1)

  x = np.concatenate([np.asarray(b).reshape(-1, 8) for b in xs]).astype(np.float64)
  h1 = np.tanh(x @ np.asarray(p["dense"], np.float64))
  h2 = h1 @ np.asarray(p["torch_style"], np.float64).T
  for name, xin in [("dense", x), ("torch_style", h1), ("general", h2)]:
    s = st[name]
    assert float(s.count) == xin.shape[0]
    np.testing.assert_allclose(np.asarray(s.sumsq)[0], (xin**2).sum(0), rtol=1e-4)
    np.testing.assert_allclose(np.asarray(s.hessian)[0], xin.T @ xin, rtol=1e-4, atol=1e-3)
    # The matrix view reproduces the layer: y = X @ to_matrix(w).
    w = cal.to_matrix(p[name], s.site)
    assert w.shape == (s.site.k, s.site.o)
    np.testing.assert_array_equal(np.asarray(cal.from_matrix(w, s.site)), np.asarray(p[name]))
  np.testing.assert_allclose(
    np.asarray(cal.to_matrix(p["torch_style"], st["torch_style"].site)),
    np.asarray(p["torch_style"]).T,
  )


@pytest.mark.parametrize(
  "feats,kernel,groups,strides,dilation",
  [
    (32, (3, 3), 2, (1, 1), (1, 1)),
    (8, (3,), 4, (2,), (2,)),
  ],
  ids=["2d_groups2", "1d_groups4_stride2_dilation2"],
)
def test_conv_patches_reproduce_the_convolution(feats, kernel, groups, strides, dilation):
  conv = nn.Conv(
    feats,
    kernel,
    feature_group_count=groups,
    strides=strides,
    kernel_dilation=dilation,
    use_bias=False,
    padding="SAME",
  )
  x = testing.normal((2,) + (7,) * len(kernel) + (8,), 0)
  v = {"params": {"kernel": testing.normal(kernel + (8 // groups, feats), 1)}}
  (st,) = cal.collect_stats(conv.apply, v, [x]).values()
  site = st.site
  assert site.kind == "conv" and site.groups == groups and site.group_axes == (len(kernel),)

  eqn = next(
    e
    for e in jax.make_jaxpr(conv.apply)(v, x).jaxpr.eqns
    if e.primitive.name == "conv_general_dilated"
  )
  patches = jax.jit(lambda a: stats_lib.conv_patches(a, eqn.params, site.shape))(x)
  patches = patches.reshape(-1, groups, site.k)
  wm = cal.to_matrix(v["params"]["kernel"], site).reshape(site.k, groups, -1)
  y = jnp.einsum("tgk,kgo->tgo", patches, wm, precision=HI).reshape(patches.shape[0], -1)
  np.testing.assert_allclose(
    np.asarray(y), np.asarray(conv.apply(v, x)).reshape(-1, feats), atol=1e-5
  )


@pytest.mark.slow
def test_streaming_equals_one_big_batch_and_models_need_no_change():
  model = basic.DigitsCNN()
  xs = [testing.normal((4, 8, 8, 1), i) for i in range(3)]
  variables = jax.jit(model.init)(jax.random.key(0), xs[0])
  a = cal.collect_stats(model.apply, variables, xs, hessian=True)
  b = cal.collect_stats(model.apply, variables, [jnp.concatenate(xs)], hessian=True)
  assert set(a) == {
    f"params/{n}/kernel" for n in ("Conv_0", "Conv_1", "Conv_2", "Dense_0", "Dense_1")
  }
  assert a["params/Conv_1/kernel"].sumsq.shape == (2, 72)  # 2 groups of 3*3*4 patches
  for p in a:
    assert float(a[p].count) == float(b[p].count)
    np.testing.assert_allclose(
      np.asarray(a[p].hessian), np.asarray(b[p].hessian), rtol=1e-4, atol=1e-3
    )


def test_nnx_module():
  model, tokens = basic.nnx_token_block()
  st = cal.collect_stats(model, batches=[tokens, tokens])
  assert set(st) == {
    "conv/kernel",
    "attn/query/kernel",
    "attn/key/kernel",
    "attn/value/kernel",
    "attn/out/kernel",
    "up/kernel",
    "down/kernel",
    "head/kernel",
  }
  assert float(st["up/kernel"].count) == 2 * tokens.size
  assert st["up/kernel"].hessian is None


def _np(x):
  return np.asarray(x, np.float64)


def test_scan_stacked_weights_get_per_layer_statistics():
  """A user's lax.scan over stacked layers (remat inside), reversed too: each layer's own inputs."""

  def f(p, x):
    x = x @ p["first"]

    @jax.checkpoint
    def layer(h, w):
      return jnp.tanh(h @ w), None

    x, _ = jax.lax.scan(layer, x, p["stack"])
    x, _ = jax.lax.scan(layer, x, p["back"], reverse=True)
    return x

  p = {
    "first": testing.normal((8, 8), 0),
    "stack": testing.normal((3, 8, 8), 1),
    "back": testing.normal((2, 8, 8), 5),
  }
  xs = [testing.normal((4, 8), 2), testing.normal((4, 8), 3)]
  st = cal.collect_stats(f, p, xs, hessian=True)
  assert st["stack"].stack == (0,) and st["stack"].hessian.shape == (3, 1, 8, 8)
  assert st["stack"].site.shape == (8, 8) and st["stack"].site.group_axes == (0,)
  # Oracle: the unrolled model in float64.
  x = np.concatenate([_np(b) for b in xs]) @ _np(p["first"])
  ins = {}
  for name, order in (("stack", range(3)), ("back", reversed(range(2)))):
    for i in order:
      ins[(name, i)] = x
      x = np.tanh(x @ _np(p[name][i]))
  for (name, i), xin in ins.items():
    np.testing.assert_allclose(_np(st[name].hessian[i, 0]), xin.T @ xin, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(_np(st[name].sumsq[i, 0]), (xin**2).sum(0), rtol=1e-4)
    assert float(st[name].count[i]) == 8


def test_flipped_and_jitted_weights_map_statistics_to_their_rows():
  """A weight read through a nested jit that flips it: row k of the leaf meets feature K-1-k."""

  def f(p, x):
    w = jax.jit(lambda a: jnp.flip(a.astype(jnp.bfloat16), 0).astype(jnp.float32))(p["w"])
    return x @ w

  p = {"w": testing.normal((8, 4), 0)}
  xs = [testing.normal((5, 8), 1) * jnp.arange(1.0, 9.0)]
  assert jasp.trace_layouts(f, p, xs[0])["w"].axis == (0,)
  st = cal.collect_stats(f, p, xs, hessian=True)["w"]
  assert st.site.flip == (0,)
  x = _np(xs[0])
  np.testing.assert_allclose(_np(st.sumsq[0]), (x**2).sum(0), rtol=1e-5)
  # The matrix view reads the leaf flipped, so X @ to_matrix(w) is the layer.
  y = x @ _np(cal.to_matrix(p["w"], st.site))
  np.testing.assert_allclose(y, _np(f(p, xs[0])), rtol=1e-2, atol=1e-2)


_SHARDED = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from jasp import calibration as cal
    assert len(jax.devices()) == 8
    f = lambda p, x: x @ p["w"]
    p = {"w": jax.random.normal(jax.random.key(0), (32, 64))}
    xs = [jax.random.normal(jax.random.key(i), (16, 4, 32)) * jnp.exp(jnp.linspace(-2, 2, 32))
          for i in range(2)]
    ref = cal.sparsegpt_prune(f, p, xs, blocksize=16)
    # Auto mesh: batch over 'data', the weight's outputs over 'model'.
    mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))
    ps = {"w": jax.device_put(p["w"], NamedSharding(mesh, P(None, "model")))}
    xss = [jax.device_put(x, NamedSharding(mesh, P("data"))) for x in xs]
    got = cal.sparsegpt_prune(f, ps, xss, blocksize=16)
    assert got[0]["w"].sharding.spec == P(None, "model"), got[0]["w"].sharding
    np.testing.assert_array_equal(np.asarray(got[1]["w"]), np.asarray(ref[1]["w"]))
    np.testing.assert_allclose(np.asarray(got[0]["w"]), np.asarray(ref[0]["w"]), atol=1e-4)
    # Explicit-axes mesh (jax.set_mesh): the Hessian contracts sharded rows.
    emesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
    with jax.set_mesh(emesh):
      xss = [jax.device_put(x, NamedSharding(emesh, P("data"))) for x in xs]
      got = cal.sparsegpt_prune(f, p, xss, blocksize=16)
    np.testing.assert_array_equal(np.asarray(got[1]["w"]), np.asarray(ref[1]["w"]))
    print("ok")
""")


@pytest.mark.slow
def test_sharded_calibration_matches_single_device():
  r = testing.run_on_cpu_devices(_SHARDED, 8)
  assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-3000:]


@pytest.mark.parametrize("chunk", [0, 5, 64])
def test_tensor_core_hessian_of_16_bit_inputs(monkeypatch, chunk):
  """The tensor-core switch: bf16 inputs' X^T X from the 16-bit operands, chunked or not.

  Every product of two bf16 numbers is exact in float32, so the result is the
  float64 Gram matrix up to float32 summation; float32 inputs keep the float32
  path whatever the switch says.
  """

  def f(p, x):
    h = jnp.einsum("btd,dh->bth", x, p["up"])
    return jnp.einsum("bth,ho->bto", jnp.tanh(h).astype(x.dtype), p["down"])

  p = {"up": testing.normal((16, 24), 0), "down": testing.normal((24, 8), 1)}
  p16 = jax.tree.map(lambda w: w.astype(jnp.bfloat16), p)
  xs = [testing.normal((2, 13, 16), 10 + i).astype(jnp.bfloat16) for i in range(2)]
  monkeypatch.setattr(stats_lib, "_HESSIAN_TC_CHUNK", chunk)
  calls = []
  tc = stats_lib._tc_hessian
  monkeypatch.setattr(
    stats_lib, "_tc_hessian", lambda x16, c: calls.append(x16.dtype) or tc(x16, c)
  )
  st = cal.collect_stats(f, p16, xs, hessian=True)
  assert calls == [jnp.bfloat16, jnp.bfloat16]  # both weights, traced once
  x = np.concatenate([_np(b).reshape(-1, 16) for b in xs])
  np.testing.assert_allclose(_np(st["up"].hessian[0]), x.T @ x, rtol=1e-5, atol=1e-4)
  # The second weight's input is the model's own bf16 activation: compare with
  # the float32 path on the same run (the switch off).
  monkeypatch.setattr(stats_lib, "_HESSIAN_TC_CHUNK", None)
  ref = cal.collect_stats(f, p16, xs, hessian=True)
  np.testing.assert_allclose(
    _np(st["down"].hessian[0]), _np(ref["down"].hessian[0]), rtol=1e-5, atol=1e-4
  )
  # float32 inputs: unchanged by the switch.
  monkeypatch.setattr(stats_lib, "_HESSIAN_TC_CHUNK", chunk)
  xs32 = [b.astype(jnp.float32) for b in xs]
  a = cal.collect_stats(f, p, xs32, hessian=True)["up"].hessian
  assert len(calls) == 2
  monkeypatch.setattr(stats_lib, "_HESSIAN_TC_CHUNK", None)
  b = cal.collect_stats(f, p, xs32, hessian=True)["up"].hessian
  np.testing.assert_array_equal(_np(a), _np(b))
