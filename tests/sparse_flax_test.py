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
