"""SparseGPT: N:M pruning with optimal-brain-surgeon updates (Frantar & Alistarh,
"SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot", 2023).

For a layer ``Y = X @ W`` (``W`` of shape ``(K, O)``, as a flax kernel) with
calibration inputs ``X (T, K)``, SparseGPT approximately minimises
``||X W - X W_hat||_F`` over N:M-sparse ``W_hat``. With the Hessian
``H = X^T X`` (damped by ``damp`` times its mean diagonal) and ``U`` the upper
Cholesky factor of ``H^-1`` (``H^-1 = U^T U``), input features are visited in
order, in blocks of ``blocksize``:

* at the first feature of every aligned group of ``m``, each output column
  keeps the ``n`` features with the largest ``w**2 / U_ii**2`` (the OBS saliency
  of the *current*, already-updated weights);
* a pruned weight's error ``(w - 0) / U_ii`` is spread over the features not yet
  visited (``w_j -= err * U_ij``), within the block at once and to later blocks
  by one matmul per block.

The solve runs in float32 with ``Precision.HIGHEST`` matmuls (on GPUs JAX
would otherwise use TF32 or bf16 passes). The Hessian of bf16/fp16 inputs is
summed from their exact 16-bit products on the tensor cores, with float32
results over chunks of 2048 rows (as accurate against float64 as float32
``HIGHEST``, and 10x faster: ``benchmarks/hessian_bench.py``). It is all
jitted, one ``fori_loop`` over blocks and one over groups; the output columns are independent, so a weight sharded
along ``O`` stays sharded. Across devices: with calibration batches sharded
along their leading axis over a mesh (``jax.sharding``, automatic axes),
:func:`sparsegpt_prune` computes the Hessians data-parallel and splits each
weight's solve by output columns over the same devices, with the very same
result as solving on every device; the params keep the layout they were given.

Dead input features, as the reference code (``fasterprune``) handles them: a
feature whose diagonal ``H_ii`` is exactly 0 (always zero in the calibration
data) gets ``H_ii = 1`` (its row and column of ``H`` are otherwise zero) and
its weights are set to 0 before the loop. It is then independent of every other
feature, its zero weights are never changed by the updates, and they are the
first pruned in their group (a live weight is always kept over a dead one; when
a group has more than ``m - n`` dead features, the lowest-indexed of them fill
the remaining kept slots with zeros). An all-zero ``H`` (every feature dead)
thus gives an all-zero weight, with a valid N:M mask (the first ``n`` of each
group).

The damping is ``damp`` times the mean of the *original* diagonal (dead
features count 0 there, not 1). The reference accumulates
``H = 2 X^T X / n_sequences``, whose live diagonal entries are of order
``2 * seq_len * E[x^2]`` (thousands), so the 1's it inserts move the mean by a
negligible fraction; jasp's ``H = X^T X / rows`` has entries of order
``E[x^2]``, where inserted 1's could dominate the mean (and the damping) for
small activations. Leaving them out is the reference's behaviour in the limit
of its scale, and keeps the result independent of the scale of ``H``. The value
that the dead diagonal gets does not reach the output: the dead weights are zero
and independent of the rest.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from jasp import _tree
from jasp import layouts as layouts_lib
from jasp import masks as masks_lib
from jasp import policy as policy_lib
from jasp.calibration import _driver
from jasp.typing import PyTree

__all__ = ["sparsegpt_layer", "sparsegpt_prune", "reconstruction_error", "inverse_hessian_factor"]

HIGHEST = lax.Precision.HIGHEST

# XLA options of the SparseGPT programs when they are compiled on their own (not
# inside a caller's jit, where XLA takes options only from the outermost one).
# On GPUs XLA autotunes every new matmul shape (Triton configurations compiled
# and timed at the full size): seconds per layer shape, for a few milliseconds
# of matmuls per layer. cuBLAS with its own heuristics instead: no autotuning.
# The CPU backend ignores them.
COMPILER_OPTIONS = {"xla_gpu_autotune_level": 0, "xla_gpu_enable_triton_gemm": False}


def _unroll() -> int:
  """Columns per inner-loop step: 4 on accelerators (measured on an H200: the
  4096x4096 OBS loop 56 -> 42 ms), 1 on CPU (smaller programs, faster compiles)."""
  return 1 if jax.default_backend() == "cpu" else 4


def inverse_hessian_factor(h: jax.Array, damp: float = 0.01) -> jax.Array:
  """``U``, upper triangular with ``U^T U = (H' + damp * mean(diag H) * I)^-1``.

  ``H'`` is ``H`` with every dead feature (``H_ii == 0`` exactly) made
  independent with unit diagonal: its row and column are set to zero (they
  already are for a positive semi-definite ``H``) and ``H'_ii = 1``, as in the
  reference code. The damping mean is over ``H``'s own diagonal, dead features
  counting 0 (see the module docstring for why). An all-zero ``h`` therefore
  gives ``U = I`` (no damping, every feature dead).

  One Cholesky factorisation and one triangular inverse, without forming
  ``H^-1``: with ``J`` the reversal of the features and ``J H J = L L^T``,
  ``U = J L^-1 J`` (upper, positive diagonal: the Cholesky factor of ``H^-1``,
  which is unique).

  Args:
    h: ``(K, K)`` symmetric positive semi-definite float32 (``X^T X`` at any
      positive scale).
    damp: damping as a fraction of the mean diagonal (the paper's 1%).

  Returns:
    ``(K, K)`` float32, upper triangular (exact zeros below the diagonal); for a
    dead feature ``i``, row and column ``i`` are zero off the diagonal and
    ``U_ii = (1 + damp * mean(diag H))^-1/2``.
  """
  h = h.astype(jnp.float32)
  k = h.shape[-1]
  diag = jnp.diagonal(h)
  dead = diag == 0
  mean = jnp.mean(diag)  # dead features count 0
  h = jnp.where(dead[:, None] | dead[None, :], 0.0, h)
  h = h + jnp.diag(jnp.where(dead, 1.0, 0.0) + damp * mean)
  with jax.default_matmul_precision("highest"):
    low = lax.linalg.cholesky(h[::-1, ::-1])
    eye = jnp.eye(k, dtype=jnp.float32)
    low_inv = lax.linalg.triangular_solve(low, eye, left_side=True, lower=True)
  return jnp.triu(low_inv[::-1, ::-1])


def _obs(
  w: jax.Array, h: jax.Array, *, n: int, m: int, blocksize: int, damp: float, unroll: int = 1
):
  """SparseGPT on ``w (O, K)`` float32 (rows = outputs) with ``h (K, K)``.

  Dead features (``h_ii == 0``) have their weights zeroed first and score -1
  (below every live weight's ``w**2 / U_ii**2 >= 0``) when a group's mask is
  chosen; :func:`inverse_hessian_factor` makes them independent of the rest.

  ``unroll``: columns per iteration of the inner loop (fewer, larger loop
  steps on GPUs; a larger program to compile).

  Returns ``(w_hat (O, K), keep (O, K) bool)``.
  """
  o, k = w.shape
  bs = blocksize
  kp = -(-k // bs) * bs
  u = inverse_hessian_factor(h, damp)
  dead = jnp.diagonal(h) == 0  # (K,)
  w = jnp.where(dead[None, :], 0.0, w)
  if kp > k:  # pad with independent, zero-weight (dead) features: they change nothing
    u = jnp.pad(u, ((0, kp - k), (0, kp - k))) + jnp.diag(
      jnp.concatenate([jnp.zeros(k), jnp.ones(kp - k)]).astype(jnp.float32)
    )
    w = jnp.pad(w, ((0, 0), (0, kp - k)))
    dead = jnp.pad(dead, (0, kp - k), constant_values=True)

  def block(b, carry):
    w, keep = carry
    i1 = b * bs
    w1 = lax.dynamic_slice_in_dim(w, i1, bs, axis=1)  # (O, bs)
    u1 = lax.dynamic_slice(u, (i1, i1), (bs, bs))  # (bs, bs)
    d1 = jnp.diagonal(u1)
    dead1 = lax.dynamic_slice_in_dim(dead, i1, bs)  # (bs,)

    def column(c, carry):
      w1, q1, e1, k1 = carry
      # At the first column of a group, choose the group's mask from the
      # current (already updated) weights; later columns reuse it.
      j0 = (c // m) * m
      wg = lax.dynamic_slice_in_dim(w1, j0, m, axis=1)  # (O, m)
      dg = lax.dynamic_slice_in_dim(d1, j0, m)
      # Dead features score -1: pruned first, even against a live weight whose
      # saliency underflows to 0.
      deadg = lax.dynamic_slice_in_dim(dead1, j0, m)
      score = jnp.where(deadg[None, :], -1.0, jnp.square(wg) / jnp.square(dg))
      fresh = masks_lib.topn_mask(score, n, m, axis=1)
      k1 = jnp.where(c % m == 0, lax.dynamic_update_slice_in_dim(k1, fresh, j0, axis=1), k1)
      keep = lax.dynamic_index_in_dim(k1, c, axis=1, keepdims=False)  # (O,)
      wc = lax.dynamic_index_in_dim(w1, c, axis=1, keepdims=False)  # (O,)
      qc = jnp.where(keep, wc, 0.0)
      err = (wc - qc) / d1[c]
      urow = lax.dynamic_index_in_dim(u1, c, axis=0, keepdims=False)  # (bs,)
      w1 = w1 - err[:, None] * urow[None, :]
      q1 = lax.dynamic_update_index_in_dim(q1, qc, c, axis=1)
      e1 = lax.dynamic_update_index_in_dim(e1, err, c, axis=1)
      return w1, q1, e1, k1

    z = jnp.zeros_like(w1)
    _, q1, e1, k1 = lax.fori_loop(
      0, bs, column, (w1, z, z, jnp.zeros(w1.shape, bool)), unroll=unroll
    )
    # Later blocks: w[:, j] -= sum_i err_i * U[i, j]; U is upper triangular, so
    # earlier blocks get exact zeros, and this block is overwritten by q1.
    urows = lax.dynamic_slice_in_dim(u, i1, bs, axis=0)  # (bs, kp)
    w = w - jnp.matmul(e1, urows, precision=HIGHEST)
    w = lax.dynamic_update_slice_in_dim(w, q1, i1, axis=1)
    keep = lax.dynamic_update_slice_in_dim(keep, k1, i1, axis=1)
    return w, keep

  w, keep = lax.fori_loop(0, kp // bs, block, (w, jnp.zeros(w.shape, bool)))
  return w[:, :k], keep[:, :k]


def _check(n, m, blocksize):
  masks_lib.check_nm(n, m)
  if blocksize < m or blocksize % m:
    raise ValueError(f"blocksize must be a positive multiple of m={m}, got {blocksize}.")


def _layer_fn(w, h, n, m, blocksize, damp, unroll=1):
  q, keep = _obs(
    w.astype(jnp.float32).T, h, n=n, m=m, blocksize=blocksize, damp=damp, unroll=unroll
  )
  return q.T.astype(w.dtype), keep.T


_LAYER_STATIC = ("n", "m", "blocksize", "damp", "unroll")
# Traceable inside a caller's jit (which then owns the compile options).
_layer = jax.jit(_layer_fn, static_argnames=_LAYER_STATIC)
# Called eagerly: compiled on its own, with COMPILER_OPTIONS.
_layer_top = jax.jit(_layer_fn, static_argnames=_LAYER_STATIC, compiler_options=COMPILER_OPTIONS)


def sparsegpt_layer(
  w: jax.Array,
  hessian: jax.Array,
  n: int = 2,
  m: int = 4,
  *,
  blocksize: int = 128,
  damp: float = 0.01,
) -> tuple[jax.Array, jax.Array]:
  """SparseGPT on one weight matrix: N:M along its rows, with OBS updates.

  Args:
    w: ``(K, O)`` weight (a flax ``Dense`` kernel: ``y = x @ w``), any float
      dtype; computed in float32.
    hessian: ``(K, K)`` ``X^T X`` of the layer's inputs (any positive scale:
      the result does not depend on it).
    n, m: keep ``n`` of every aligned group of ``m`` rows (input features) in
      each column.
    blocksize: features per lazy-update block (the paper's 128; a multiple of
      ``m``; ``K`` need not divide by it).
    damp: Hessian damping, a fraction of its mean diagonal (dead features
      counting 0 in the mean).

  Returns:
    ``(w_hat, mask)``: ``w_hat`` of ``w``'s shape and dtype, N:M along axis 0,
    exactly 0 where ``mask`` (bool, ``(K, O)``) is False. With ``hessian``
    proportional to the identity, ``w_hat`` is magnitude pruning
    (``where(jasp.nm_mask(w, n, m, 0), w, 0)``).

    Dead input features (``hessian[i, i] == 0``: always zero in the
    calibration data) are treated as in the reference code: row ``i`` of
    ``w_hat`` is all zeros, and in every column those features are pruned
    before any live one; a group with more than ``m - n`` dead features keeps
    its lowest-indexed dead ones (as zeros) in the remaining slots. The live
    features are pruned as if the dead ones were absent. An all-zero
    ``hessian`` gives an all-zero ``w_hat`` and the mask that keeps the first
    ``n`` features of every group (finite, still exactly N:M).

  Raises:
    ValueError: ``n``/``m`` invalid, ``blocksize`` not a positive multiple of
      ``m``, shapes other than ``(K, O)`` and ``(K, K)``, or ``K`` not a
      multiple of ``m``.
  """
  _check(n, m, blocksize)
  if w.ndim != 2 or hessian.shape != (w.shape[0], w.shape[0]):
    raise ValueError(
      f"sparsegpt_layer needs w (K, O) and hessian (K, K), got {w.shape} and {hessian.shape}."
    )
  if w.shape[0] % m:
    raise ValueError(f"K={w.shape[0]} (rows of w) is not a multiple of m={m}.")
  layer = _layer if _tree.is_tracer(w) or _tree.is_tracer(hessian) else _layer_top
  return layer(w, hessian, n, m, blocksize, float(damp), _unroll())


def reconstruction_error(w: jax.Array, w_hat: jax.Array, hessian: jax.Array) -> jax.Array:
  """``||X w - X w_hat||_F**2`` from ``hessian = X^T X``, for ``(K, O)`` weights."""
  d = w.astype(jnp.float32) - w_hat.astype(jnp.float32)
  return jnp.sum(jnp.matmul(hessian, d, precision=HIGHEST) * d)


@functools.partial(
  jax.jit,
  static_argnames=("site", "n", "m", "blocksize", "damp", "unroll", "split"),
  compiler_options=COMPILER_OPTIONS,
)
def _sparsegpt_leaf(w, hessian, count, site, n, m, blocksize, damp, unroll, split=None):
  """One leaf's SparseGPT: ``(pruned w, mask, calibration error)``.

  ``split``: a ``NamedSharding`` of the ``(G, K, O/G)`` matrix view splitting it by
  output columns over devices, or None. Each output's OBS solve is independent
  given the (replicated) Hessian, so the split needs no communication.
  """
  wg = _driver.leaf_matrix_groups(w, site)  # (G, K, O/G)
  h = hessian / jnp.maximum(count, 1.0)
  if split is not None:
    wg = jax.lax.with_sharding_constraint(wg, split)
    h = jax.lax.with_sharding_constraint(h, jax.sharding.NamedSharding(split.mesh, P()))
  obs = functools.partial(_obs, n=n, m=m, blocksize=blocksize, damp=damp, unroll=unroll)
  if site.groups == 1:  # no vmap: a smaller program to compile
    q, keep = obs(wg[0].T, h[0])
    q, keep = q[None], keep[None]
  else:
    q, keep = jax.vmap(lambda a, b: obs(a.T, b))(wg, h)  # (G, O/G, K)
  q, keep = q.transpose(0, 2, 1), keep.transpose(0, 2, 1)
  d = wg - q
  err = jnp.sum(jnp.einsum("gkl,glo->gko", h, d, precision=HIGHEST) * d)
  new = _driver.leaf_from_groups(q, site).astype(w.dtype)
  mask = _driver.leaf_from_groups(keep, site)
  err = jnp.where(jnp.all(jnp.isfinite(q)), err, jnp.nan)  # NaN: the factorisation failed
  return jnp.where(mask, new, jnp.zeros((), w.dtype)), mask, err


def sparsegpt_prune(
  fn: Callable[..., Any] | Any,
  params: PyTree = None,
  batches: Iterable[Any] | None = None,
  *,
  n: int = 2,
  m: int = 4,
  blocksize: int = 128,
  damp: float = 0.01,
  layouts: Mapping[str, layouts_lib.Layout] | None = None,
  policy: policy_lib.Policy | None = None,
  sequential: bool = True,
  layers_per_pass: int | None = None,
  missing: _driver.Missing = "error",
  progress: bool = True,
  callback: Callable[[_driver.LayerResult], Any] | None = None,
) -> tuple[PyTree, PyTree]:
  """One-shot N:M pruning with SparseGPT from calibration batches.

  Two call forms::

    variables, masks = jasp.sparsegpt_prune(model.apply, variables, batches)   # linen / any fn
    state, masks = jasp.sparsegpt_prune(nnx_model, batches)                    # nnx
    nnx.update(nnx_model, state)

  Every weight the policy selects (matmul and convolution kernels, found by
  :func:`jasp.trace_layouts`) is pruned with :func:`sparsegpt_layer` on the
  Hessian of its own inputs; a convolution's inputs are its im2col patches
  (one Hessian per feature group).

  Args:
    fn, params, batches, n, m, layouts, policy, missing, progress, callback:
      as :func:`jasp.wanda_prune`. One batch is the model's one input, passed
      whole (``fn(params, batch)``; nnx: ``module(batch)``): an array or a
      pytree of arrays; ``batches`` is an iterable of them (``[x]`` for one
      batch; ``[x for x, _ in loader]`` for a loader of ``(inputs, labels)``).
    blocksize: features per lazy-update block (128, as the paper).
    damp: Hessian damping, a fraction of its mean diagonal (1%, as the paper).
    sequential: True (the paper's): the layers are pruned in stages, each
      calibrated on the outputs of the layers already pruned (the layers
      whose inputs do not depend on each other, such as q/k/v, share a stage
      and one pass over the batches). False: one pass over the dense model
      gives every layer's Hessian (all in memory at once).
    layers_per_pass: at most this many layers (Hessians) per pass; 1 keeps one
      layer's ``(K, K)`` Hessian in memory at a time.

  Returns:
    ``(params, masks)`` as :func:`jasp.prune`; each :class:`LayerResult`
    carries the layer's calibration error ``||X W - X W_hat||**2 / rows``.

  Raises:
    TypeError, ValueError: as :func:`jasp.wanda_prune` (a malformed batch
      argument is named by its index).
    FloatingPointError: if a layer's factorisation fails (non-finite weights).
  """
  _check(n, m, blocksize)

  def leaf(w, site, acc, n, m, split):
    return _sparsegpt_leaf(
      w, acc["hessian"], acc["count"], site, n, m, blocksize, float(damp), _unroll(), split
    )

  return _driver.run(
    "sparsegpt",
    leaf,
    fn,
    params,
    batches,
    n,
    m,
    layouts=layouts,
    policy=policy,
    sequential=sequential,
    layers_per_pass=layers_per_pass,
    hessian=True,
    missing=missing,
    progress=progress,
    callback=callback,
  )
