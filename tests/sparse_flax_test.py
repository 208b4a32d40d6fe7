"""jasp.sparse Flax drop-ins: a pruned linen / nnx model with compressed weights equals the dense one.

On CPU the SparseWeights hold only their dense form, so these tests check the
plumbing (interception, DenseGeneral reshapes, bias, dtypes, module swap); the
``gpu`` variants force the sparse kernel (``MatmulPolicy(mode="sparse")``).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jasp
from jasp import sparse

BF16 = jnp.bfloat16


class LinenNet(nn.Module):
  """Dense layers, an attention block (DenseGeneral q/k/v/out) and a layer left dense."""

  dim: int = 64
  heads: int = 4

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(self.dim, dtype=BF16)(x)
    x = x + nn.MultiHeadDotProductAttention(num_heads=self.heads, dtype=BF16)(x, x)
    h = nn.DenseGeneral((2, self.dim), dtype=BF16)(x)
    x = x + nn.DenseGeneral(self.dim, axis=(-2, -1), dtype=BF16)(nn.gelu(h))
    return nn.Dense(10, dtype=BF16, name="head")(x)


class NNXNet(nnx.Module):
  def __init__(self, dim=64, heads=4, *, rngs):
    self.inp = nnx.Linear(32, dim, dtype=BF16, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(
      num_heads=heads, in_features=dim, decode=False, dtype=BF16, rngs=rngs
    )
    self.blocks = nnx.List([nnx.Linear(dim, dim, dtype=BF16, rngs=rngs) for _ in range(2)])
    self.head = nnx.Linear(dim, 10, dtype=BF16, rngs=rngs)

  def __call__(self, x):
    x = self.inp(x)
    x = x + self.attn(x)
    for b in self.blocks:
      x = x + nnx.relu(b(x))
    return self.head(x)


def _close(a, b, tol=2e-2):
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  err = np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-6)
  assert err < tol, err


def _linen(policy):
  model = LinenNet()
  x = jax.random.normal(jax.random.key(1), (2, 8, 32))
  variables = model.init(jax.random.key(0), x)
  layouts = jasp.trace_layouts(model.apply, variables, x)
  pruned, _ = jasp.prune(variables, layouts=layouts, policy=jasp.Policy(exclude=[r"head"]))
  sp_vars, report = sparse.sparsify(pruned, layouts=layouts, dtype=BF16)
  ref = model.apply(pruned, x)
  y = jax.jit(lambda v, x: sparse.apply(model, v, x, policy=policy))(sp_vars, x)
  return ref, y, report, sp_vars


def test_linen_sparsify_and_apply():
  ref, y, report, sp_vars = _linen(None)
  kernels = [p for p in report if p.endswith("kernel")]
  assert "params/head/kernel" in report and report["params/head/kernel"].startswith("kept: not 2:4")
  done = [p for p, r in report.items() if not r.startswith("kept")]
  # Dense_0, attention q/k/v/out, the two DenseGeneral layers.
  assert len(done) == 7, report
  assert len(kernels) == 8
  assert isinstance(sp_vars["params"]["Dense_0"]["kernel"], sparse.SparseWeight)
  assert isinstance(sp_vars["params"]["head"]["kernel"], jax.Array)
  assert y.shape == ref.shape and y.dtype == ref.dtype
  _close(y, ref)


class EinsumNet(nn.Module):
  """A Gemma-style gated MLP of ``nn.Einsum`` kernels, and an einsum that reorders its output."""

  @nn.compact
  def __call__(self, x):
    gate = nn.Einsum((32, 64), "btd,df->btf", use_bias=False, dtype=BF16, name="gate")(x)
    up = nn.Einsum((32, 64), "btd,df->btf", use_bias=False, dtype=BF16, name="up")(x)
    h = nn.Einsum((64, 32), "btf,fd->btd", use_bias=True, dtype=BF16, name="down")(
      nn.silu(gate) * up
    )
    return nn.Einsum((32, 2, 16), "btd,dhe->bhte", use_bias=True, dtype=BF16, name="heads")(h)


def test_linen_einsum_layers_run_sparse(monkeypatch):
  from jasp.sparse import autotune

  model = EinsumNet()
  x = jax.random.normal(jax.random.key(1), (2, 5, 32))
  variables = model.init(jax.random.key(0), x)
  variables = jax.tree.map(
    lambda a: a + 0.1 * jax.random.normal(jax.random.key(2), a.shape), variables
  )
  layouts = jasp.trace_layouts(model.apply, variables, x)
  pruned, _ = jasp.prune(variables, layouts=layouts)
  sp_vars, report = sparse.sparsify(pruned, layouts=layouts, dtype=BF16)
  names = ("gate", "up", "down", "heads")
  assert all(isinstance(sp_vars["params"][n]["kernel"], sparse.SparseWeight) for n in names)
  assert not any(r.startswith("kept") for r in report.values()), report
  calls = []
  real = autotune.matmul
  monkeypatch.setattr(autotune, "matmul", lambda *a, **k: calls.append(a[1].shape) or real(*a, **k))
  y = jax.jit(lambda v, x: sparse.apply(model, v, x))(sp_vars, x)
  assert sorted(calls) == sorted([(32, 64), (32, 64), (64, 32), (32, 2, 16)])
  ref = model.apply(pruned, x)  # flax's own einsums on the pruned kernels
  assert y.shape == ref.shape == (2, 2, 5, 16) and y.dtype == ref.dtype
  _close(y, ref)


class CallTimeEinsum(nn.Module):
  """An ``nn.Einsum`` given at call time an equation that contracts the kernel's last axis."""

  @nn.compact
  def __call__(self, x):
    return nn.Einsum((32, 32), use_bias=False, name="mix")(x, "btd,fd->btf")


def test_linen_einsum_without_a_sparse_form_raises():
  model = CallTimeEinsum()
  x = jnp.ones((1, 3, 32))
  variables = model.init(jax.random.key(0), x)
  pruned, _ = jasp.prune(variables)  # naming conventions: groups along the kernel's axis 0
  sp_vars, _ = sparse.sparsify(pruned, dtype=BF16)
  assert isinstance(sp_vars["params"]["mix"]["kernel"], sparse.SparseWeight)
  with pytest.raises(ValueError, match=r"mix: einsum 'btd,fd->btf' has no sparse form"):
    sparse.apply(model, sp_vars, x)


class RawKernel(nn.Module):
  """A module that reads its kernel itself (no Dense/DenseGeneral/Einsum)."""

  @nn.compact
  def __call__(self, x):
    return x @ self.param("kernel", nn.initializers.lecun_normal(), (32, 16))


def test_a_sparse_weight_read_as_an_array_says_how_to_keep_it_dense():
  model = RawKernel()
  x = jnp.ones((2, 32))
  variables = model.init(jax.random.key(0), x)
  layouts = jasp.trace_layouts(model.apply, variables, x)
  pruned, _ = jasp.prune(variables, layouts=layouts)
  sp_vars, _ = sparse.sparsify(pruned, layouts=layouts, dtype=BF16)
  with pytest.raises(TypeError, match=r"exclude=\[<its path>\]"):
    sparse.apply(model, sp_vars, x)
  kept, report = sparse.sparsify(pruned, layouts=layouts, dtype=BF16, exclude=[r"kernel"])
  assert report["params/kernel"] == "kept: matched by exclude"
  np.testing.assert_array_equal(sparse.apply(model, kept, x), model.apply(pruned, x))


class ConvRawDense(nn.Module):
  """A conv stem, a hand-written einsum over its own parameter, a norm and a Dense head."""

  @nn.compact
  def __call__(self, x):  # x (B, H, W, C)
    h = nn.relu(nn.Conv(32, (3, 3))(x))
    w = self.param("mix", nn.initializers.lecun_normal(), (32, 4, 8))  # (in, heads, dim)
    h = jnp.einsum("bhwc,cnd->bhwnd", h, w).reshape(*h.shape[:-1], 32)
    h = nn.LayerNorm()(h).mean(axis=(1, 2))
    return nn.Dense(16)(h)


def test_linen_report_names_the_pruned_weights_left_dense():
  model = ConvRawDense()
  x = jax.random.normal(jax.random.key(1), (2, 6, 6, 8))
  variables = model.init(jax.random.key(0), x)
  layouts = jasp.trace_layouts(model.apply, variables, x)
  pruned, masks = jasp.prune(variables, layouts=layouts)
  sp_vars, report = sparse.sparsify(pruned, layouts=layouts, dtype=BF16)
  # the oracle: the leaves jasp.prune masked, by path
  masked = sorted(
    "/".join(str(k.key) for k in p)
    for p, m in jax.tree_util.tree_leaves_with_path(masks)
    if m is not None
  )
  assert masked == ["params/Conv_0/kernel", "params/Dense_0/kernel", "params/mix"]
  assert sorted(report) == masked  # every pruned weight, and nothing else (bias, norm scale)
  assert report["params/Dense_0/kernel"].startswith(("compressed", "dense path"))
  assert report["params/Conv_0/kernel"].startswith("kept dense: 2:4, but a convolution kernel")
  assert report["params/mix"].startswith("kept dense: 2:4, but not a layer's kernel")
  assert isinstance(sp_vars["params"]["Dense_0"]["kernel"], sparse.SparseWeight)
  _close(sparse.apply(model, sp_vars, x), model.apply(pruned, x))
  # sparsified again: the SparseWeight is kept whole, not read as its child arrays
  again, report2 = sparse.sparsify(sp_vars, layouts=layouts, dtype=BF16)
  assert report2["params/Dense_0/kernel"] == "kept: already a SparseWeight"
  assert sorted(report2) == masked
  assert again["params"]["Dense_0"]["kernel"] is sp_vars["params"]["Dense_0"]["kernel"]
  # a leaf that is 2:4 only because it is all zeros (a LoRA B at init, say) is not reported
  zeros = jax.tree.map(lambda a: a, pruned)
  zeros["params"]["mix"] = jnp.zeros_like(pruned["params"]["mix"])
  assert "params/mix" not in sparse.sparsify(zeros, layouts=layouts, dtype=BF16)[1]


def _nnx(policy, **kw):
  model = NNXNet(rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (2, 8, 32))
  pruned, _ = jasp.prune(
    nnx.state(model, nnx.Param),
    layouts=jasp.trace_layouts(model, x),
    policy=jasp.Policy(exclude=(r"^head/",)),
  )
  nnx.update(model, pruned)
  ref = model(x)
  report = sparse.sparsify_nnx(model, dtype=BF16, policy=policy, **kw)
  y = nnx.jit(lambda m, x: m(x))(model, x)
  return ref, y, report, model


def test_nnx_sparsify_in_place():
  ref, y, report, model = _nnx(None)
  assert isinstance(model.inp, sparse.SparseLinear)
  assert isinstance(model.attn.query, sparse.SparseLinear)
  assert isinstance(model.attn.out, sparse.SparseLinear)
  assert isinstance(model.blocks[1], sparse.SparseLinear)
  assert isinstance(model.head, nnx.Linear)  # not 2:4: kept
  assert report["head/kernel"].startswith("kept: not 2:4")
  assert y.shape == ref.shape and y.dtype == ref.dtype
  _close(y, ref)
  # The swapped model's state still splits and merges (checkpointable).
  graphdef, state = nnx.split(model)
  _close(nnx.merge(graphdef, state)(jnp.ones((1, 3, 32))), model(jnp.ones((1, 3, 32))))


def test_sparsify_include_exclude_and_fp32():
  model = LinenNet()
  x = jnp.ones((1, 4, 32))
  variables = model.init(jax.random.key(0), x)
  pruned, _ = jasp.prune(variables)
  _, rep = sparse.sparsify(pruned, include=[r"Dense_0"], dtype=BF16)
  assert rep["params/Dense_0/kernel"].startswith(("compressed", "dense path"))
  assert rep["params/MultiHeadDotProductAttention_0/query/kernel"] == "kept: not matched by include"
  _, rep = sparse.sparsify(pruned, include=[r"Dense_0"], dtype=None)
  # fp32 params without a compute dtype are left alone, saying how to opt in.
  assert "dtype=jnp.bfloat16" in rep["params/Dense_0/kernel"]


@pytest.mark.gpu
def test_linen_sparse_kernel_gpu():
  ref, y, report, sp_vars = _linen(sparse.MatmulPolicy(mode="sparse"))
  assert sp_vars["params"]["Dense_0"]["kernel"].is_compressed, report
  _close(y, ref)


@pytest.mark.gpu
def test_nnx_sparse_kernel_gpu():
  ref, y, report, model = _nnx(sparse.MatmulPolicy(mode="sparse"))
  assert model.inp.kernel.get_value().is_compressed, report
  _close(y, ref)


def _compact_first():
  """A policy whose injected timings make the compact kernel the fastest path."""
  return sparse.MatmulPolicy(
    measure=lambda k, n, t, d: (1e-3, 2e-3),
    measure_compact=lambda k, n, t, d: (1e-3, 5e-4),
    cache_file="",
  )


def test_nnx_sparsify_with_the_compact_format(monkeypatch):
  """compact=True: every swapped layer holds the compact format and runs the decode-time kernel."""
  from jasp.kernels import decode24

  monkeypatch.setattr(
    decode24, "native", lambda layout="kn": True
  )  # as on a GPU: the kernel interprets here
  calls = []
  real = decode24.matmul_24
  monkeypatch.setattr(decode24, "matmul_24", lambda *a, **k: calls.append(1) or real(*a, **k))
  ref, y, report, model = _nnx(_compact_first(), compact=True)
  assert model.inp.kernel.get_value().is_compact
  assert model.attn.out.kernel.get_value().is_compact  # LinearGeneral (heads, head_dim) -> dim
  assert "with the compact (decode) format" in report["inp/kernel"]
  assert len(calls) == 7  # inp, q, k, v, out, blocks[0], blocks[1]: one trace each
  _close(y, ref)


@pytest.mark.gpu
def test_nnx_compact_kernel_gpu():
  ref, y, report, model = _nnx(_compact_first(), compact=True)
  assert model.inp.kernel.get_value().is_compact, report
  _close(y, ref)


def test_linen_scanned_decoder_runs_sparse_layer_by_layer(monkeypatch):
  """The zoo's Llama-style linen decoder: nn.scan over nn.remat blocks, DenseGeneral
  attention and an nn.Einsum gated MLP, every kernel stacked on a layer axis."""
  from zoo import decoder_linen

  from jasp.sparse import autotune

  model, variables = decoder_linen.build()
  tokens = decoder_linen.tokens(0)
  layouts = jasp.trace_layouts(model.apply, variables, tokens)
  pruned, _ = jasp.prune(variables, layouts=layouts)
  sp_vars, report = sparse.sparsify(pruned, layouts=layouts, dtype=BF16)
  names = ("down", "gate", "k", "o", "q", "up", "v")
  assert sorted(p for p in report if p.startswith("params/layers/")) == [
    f"params/layers/{n}/kernel" for n in names
  ]
  for n in names:
    assert report[f"params/layers/{n}/kernel"].endswith("; a stack of 2 layers"), report
    sw = sp_vars["params"]["layers"][n]["kernel"]
    kernel = pruned["params"]["layers"][n]["kernel"]
    assert isinstance(sw, sparse.SparseWeight) and sw.stack == (2,)
    assert sw.shape == kernel.shape[1:]
    for layer in range(2):  # layer i's weight is layer i's kernel, flattened to (K, N)
      np.testing.assert_array_equal(
        np.asarray(sw.dense[layer], np.float32),
        np.asarray(kernel[layer].astype(BF16), np.float32).reshape(sw.k, sw.n),
      )
  seen = set()
  real = autotune.matmul
  monkeypatch.setattr(autotune, "matmul", lambda *a, **k: seen.add(a[1].shape) or real(*a, **k))
  y = jax.jit(lambda v, t: sparse.apply(model, v, t))(sp_vars, tokens)
  assert seen == {sp_vars["params"]["layers"][n]["kernel"].shape for n in names}
  ref = model.apply(pruned, tokens)
  assert y.shape == ref.shape
  _close(y, ref)
  with pytest.raises(ValueError, match=r"holds a stack of \(2,\) layers' weights"):
    sparse.matmul(jnp.ones((1, 32), BF16), sp_vars["params"]["layers"]["q"]["kernel"])


@pytest.mark.gpu
def test_linen_scanned_decoder_sparse_kernel_gpu():
  """cuSPARSELt's compressed bytes stacked per layer, sliced by nn.scan into the FFI call."""
  from zoo import decoder_linen

  model, variables = decoder_linen.build()
  tokens = decoder_linen.tokens(0)
  layouts = jasp.trace_layouts(model.apply, variables, tokens)
  pruned, _ = jasp.prune(variables, layouts=layouts)
  sp_vars, report = sparse.sparsify(pruned, layouts=layouts, dtype=BF16)
  q = sp_vars["params"]["layers"]["q"]["kernel"]
  assert q.is_compressed and q.stack == (2,) and q.compressed.ndim == 2, report
  policy = sparse.MatmulPolicy(mode="sparse")
  y = jax.jit(lambda v, t: sparse.apply(model, v, t, policy=policy))(sp_vars, tokens)
  _close(y, model.apply(pruned, tokens))


class ScannedMLP(nnx.Module):
  """nnx blocks of ``nnx.Linear`` layers stacked by ``nnx.vmap`` and run by ``nnx.scan``."""

  def __init__(self, layers=3, dim=32, *, rngs):
    @nnx.split_rngs(splits=layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(rngs):
      return ScannedMLP.Block(dim, rngs)

    self.blocks = make(rngs)

  class Block(nnx.Module):
    def __init__(self, dim, rngs):
      self.norm = nnx.RMSNorm(dim, rngs=rngs)
      self.up = nnx.Linear(dim, 2 * dim, rngs=rngs)
      self.down = nnx.Linear(2 * dim, dim, use_bias=False, rngs=rngs)

    def __call__(self, x):
      return x + self.down(nnx.gelu(self.up(self.norm(x))))

  def __call__(self, x):
    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def run(x, block):
      return block(x)

    return run(x, self.blocks)


def test_nnx_scanned_blocks_run_sparse_layer_by_layer():
  model = ScannedMLP(rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (2, 5, 32))
  pruned, _ = jasp.prune(nnx.state(model, nnx.Param), layouts=jasp.trace_layouts(model, x))
  nnx.update(model, pruned)
  ref = model(x)
  report = sparse.sparsify_nnx(model, dtype=BF16)
  assert sorted(report) == ["blocks/down/kernel", "blocks/up/kernel"]
  for line in report.values():  # "dense path: ..." here, "compressed (...)" on a GPU
    assert not line.startswith("kept") and line.endswith("; a stack of 3 layers"), report
  assert isinstance(model.blocks.up, sparse.SparseLinear)
  assert model.blocks.up.kernel.get_value().stack == (3,)
  assert model.blocks.up.bias.get_value().shape == (3, 64)
  y = nnx.jit(lambda m, x: m(x))(model, x)
  assert y.shape == ref.shape
  _close(y, ref)


def test_a_stack_with_a_layer_not_2_of_4_stays_dense():
  model = ScannedMLP(layers=2, rngs=nnx.Rngs(0))
  x = jnp.ones((1, 3, 32))
  pruned, _ = jasp.prune(nnx.state(model, nnx.Param), layouts=jasp.trace_layouts(model, x))
  dense = pruned["blocks"]["up"]["kernel"].get_value()
  pruned["blocks"]["up"]["kernel"].set_value(dense.at[1].set(1.0))  # layer 1: all nonzero
  nnx.update(model, pruned)
  report = sparse.sparsify_nnx(model, dtype=BF16)
  assert report["blocks/up/kernel"].startswith("kept: not 2:4"), report
  assert report["blocks/up/kernel"].endswith("(layer 1 of a stack of 2)")
  assert isinstance(model.blocks.up, nnx.Linear)
  assert isinstance(model.blocks.down, sparse.SparseLinear)


def test_nnx_scanned_blocks_with_the_compact_format(monkeypatch):
  """The compact (decode) format stacks too; the scan hands each step one layer's."""
  from jasp.kernels import decode24

  monkeypatch.setattr(decode24, "native", lambda layout="kn": True)  # interprets here
  shapes = []
  real = decode24.matmul_24
  monkeypatch.setattr(
    decode24, "matmul_24", lambda x, c, **k: shapes.append(c.values.shape) or real(x, c, **k)
  )
  model = ScannedMLP(rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (2, 5, 32))
  pruned, _ = jasp.prune(nnx.state(model, nnx.Param), layouts=jasp.trace_layouts(model, x))
  nnx.update(model, pruned)
  ref = model(x)
  report = sparse.sparsify_nnx(model, dtype=BF16, policy=_compact_first(), compact=True)
  assert "with the compact (decode) format; a stack of 3 layers" in report["blocks/up/kernel"]
  assert model.blocks.up.kernel.get_value().compact.values.shape == (3, 2, 8, 64)
  y = model(x)
  assert sorted(set(shapes)) == [(2, 8, 64), (2, 16, 32)]  # one layer's up and down
  _close(y, ref)


def test_nnx_scanned_decoder_einsum_mlp_runs_sparse(monkeypatch):
  """The zoo's nnx decoder: its gated MLP's nnx.Einsum kernels (stacked by nnx.vmap, run by
  nnx.scan) become SparseEinsum layers; the attention's raw einsum Params stay as they are."""
  from zoo import decoder_nnx

  from jasp.sparse import autotune

  model = decoder_nnx.build()
  tokens = decoder_nnx.tokens(0)
  pruned, _ = jasp.prune(nnx.state(model, nnx.Param), layouts=jasp.trace_layouts(model, tokens))
  nnx.update(model, pruned)
  ref = model(tokens)
  report = sparse.sparsify_nnx(model, dtype=BF16)
  mlp = [f"blocks/mlp/{n}/kernel" for n in ("down", "gate", "up")]
  # the attention's own Params were pruned (2:4 along d, or along (heads, head_dim) for o) and
  # stay dense: the report names each; norms, embeddings and the head are not 2:4
  raw = [f"blocks/attn/{n}" for n in ("k", "o", "q", "v")]
  assert sorted(report) == sorted(mlp + raw), sorted(report)
  assert all(report[n].endswith("; a stack of 2 layers") for n in mlp), report
  for n in raw:
    assert report[n].startswith("kept dense: 2:4, but a parameter its module reads itself"), n
    w = np.asarray(getattr(model.blocks.attn, n[-1]).get_value(), np.float64)
    axis = 2 if n.endswith("o") else 1  # stacked (2, ...): d of q/k/v, head_dim (inner) of o
    groups = np.moveaxis(w, axis, -1).reshape(*np.moveaxis(w, axis, -1).shape[:-1], -1, 4)
    assert ((groups != 0).sum(-1) <= 2).all() and (w != 0).any()  # the oracle: it is 2:4
  for n in ("gate", "up", "down"):
    layer = getattr(model.blocks.mlp, n)
    assert isinstance(layer, sparse.SparseEinsum) and layer.kernel.get_value().stack == (2,)
  assert isinstance(model.blocks.attn.q, nnx.Param)
  seen = set()
  real = autotune.matmul
  monkeypatch.setattr(autotune, "matmul", lambda *a, **k: seen.add(a[1].shape) or real(*a, **k))
  y = nnx.jit(lambda m, t: m(t))(model, tokens)
  assert seen == {(32, 64), (64, 32)}
  _close(y, ref)


class EinsumNNX(nnx.Module):
  def __init__(self, rngs):
    self.heads = nnx.Einsum("btd,dhe->bhte", (32, 2, 16), (2, 16), dtype=BF16, rngs=rngs)
    self.back = nnx.Einsum("btf,df->btd", (32, 32), rngs=rngs)  # contracts the kernel's axis 1

  def __call__(self, x):
    h = self.heads(x).reshape(x.shape[0], x.shape[1], 32)
    return self.back(h)


def test_nnx_einsum_forms():
  model = EinsumNNX(nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (2, 2, 32))
  state = nnx.state(model, nnx.Param)
  state = jax.tree.map(lambda a: a + 0.1 * jax.random.normal(jax.random.key(2), a.shape), state)
  nnx.update(model, state)
  pruned, _ = jasp.prune(nnx.state(model, nnx.Param), layouts=jasp.trace_layouts(model, x))
  nnx.update(model, pruned)
  ref = model(x)
  report = sparse.sparsify_nnx(model, dtype=BF16)
  assert isinstance(model.heads, sparse.SparseEinsum)  # bias (2, 16), output reordered
  assert report["back/kernel"].startswith("kept: einsum 'btf,df->btd' has no sparse form")
  assert isinstance(model.back, nnx.Einsum)
  _close(model(x), ref)
