"""Wanda: N:M masks from ``|W| * ||X||_2`` (Sun et al., "A Simple and Effective
Pruning Approach for Large Language Models", 2023).

Each weight entry is scored by its magnitude times the L2 norm, over the
calibration rows, of the input feature it multiplies; the ``n`` best scores of
every aligned group of ``m`` along the reduction axis are kept. Kept weights are
not changed (no update, unlike SparseGPT). With equal input norms Wanda is
magnitude pruning.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from jasp import layouts as layouts_lib
from jasp import masks as masks_lib
from jasp import policy as policy_lib
from jasp.calibration import _driver
from jasp.calibration import stats as stats_lib
from jasp.typing import PyTree

__all__ = ["wanda_scores", "wanda_prune"]


def _scores(w: jax.Array, sumsq: jax.Array, site: stats_lib.Site) -> jax.Array:
  norm = jnp.sqrt(sumsq.astype(jnp.float32))  # (G, K)
  wg = jnp.abs(_driver.leaf_matrix_groups(w, site))  # (G, K, O/G)
  return _driver.leaf_from_groups(wg * norm[:, :, None], site)


@functools.partial(jax.jit, static_argnames=("site", "stack"))
def _scores_jit(w, sumsq, site, stack):
  if not stack:
    return _scores(w, sumsq, site)
  lead = tuple(range(len(stack)))
  moved = jnp.moveaxis(w, stack, lead)
  layers = moved.shape[: len(stack)]
  flat = moved.reshape((-1,) + site.shape)
  out = jax.vmap(lambda a, b: _scores(a, b, site))(flat, sumsq.reshape((-1,) + sumsq.shape[-2:]))
  return jnp.moveaxis(out.reshape(layers + site.shape), lead, stack)


def wanda_scores(w: jax.Array, stats: stats_lib.LayerStats) -> jax.Array:
  """Wanda's score ``|W_kj| * ||X_k||_2`` for every entry of a weight.

  Args:
    w: the weight, any float dtype: shape ``stats.site.shape``, or for a weight
      stacked for a scan over layers (``stats.stack``) the whole stacked leaf,
      each layer scored with its own statistics.
    stats: its input statistics (:func:`jasp.calibration.collect_stats`).

  Returns:
    float32 scores of ``w``'s shape; pass them to :func:`jasp.compute_masks`
    (``score_fn``) or :func:`jasp.masks.topn_mask` along the weight's group
    axes (``stats.site.group_axes`` within one layer).
  """
  return _scores_jit(w, stats.sumsq, stats.site, tuple(stats.stack))


@functools.partial(jax.jit, static_argnames=("site", "n", "m"))
def _wanda_leaf(w, sumsq, site, n, m):
  mask = masks_lib.topn_mask(_scores(w, sumsq, site), n, m, site.group_axes)
  return jnp.where(mask, w, jnp.zeros((), w.dtype)), mask


def _leaf(w, site, acc, n, m, split):
  del split  # element-wise per weight: nothing to split
  new, mask = _wanda_leaf(w, acc["sumsq"], site, n, m)
  return new, mask, None


def wanda_prune(
  fn: Callable[..., Any] | Any,
  params: PyTree = None,
  batches: Iterable[Any] | None = None,
  *,
  n: int = 2,
  m: int = 4,
  layouts: Mapping[str, layouts_lib.Layout] | None = None,
  policy: policy_lib.Policy | None = None,
  sequential: bool = False,
  layers_per_pass: int | None = None,
  missing: _driver.Missing = "error",
  progress: bool = True,
  callback: Callable[[_driver.LayerResult], Any] | None = None,
) -> tuple[PyTree, PyTree]:
  """One-shot N:M pruning with Wanda scores from calibration batches.

  Two call forms::

    variables, masks = jasp.wanda_prune(model.apply, variables, batches)   # linen / any fn
    state, masks = jasp.wanda_prune(nnx_model, batches)                    # nnx
    nnx.update(nnx_model, state)

  Args:
    fn: ``apply_fn`` (called as ``fn(params, batch)``; wrap extra arguments in
      a lambda) or an ``nnx.Module`` (called as ``module(batch)``).
    params: the params pytree for ``fn`` (linen variables); omitted for nnx.
    batches: an iterable of calibration batches (a list, or a generator read
      into a list; every batch is read once per pass). One batch is the
      model's one input, passed whole: ``fn(params, batch)`` (nnx:
      ``module(batch)``); an array (``(batch, seq, features)`` for a
      transformer) or any pytree of arrays that the model takes as that single
      argument, possibly sharded. Not a single array (``[x]`` is one batch)
      and not a data loader's ``(inputs, labels)`` pairs (pass ``[x for x, _
      in loader]``). Batches may differ in shape (one trace per shape).
    n, m: keep ``n`` of every ``m`` along each weight's reduction axis.
    layouts: ``{path: Layout}`` (default: :func:`jasp.trace_layouts` on the
      first batch).
    policy: which leaves to prune (:class:`jasp.Policy`).
    sequential: False (Wanda's cheap default here): one pass over the batches
      collects every layer's input norms from the dense model. True: layer
      after layer, each on the outputs of the already-pruned layers before it
      (as Wanda's reference code does per transformer block); layer ``l + 1``
      of a stacked ``scan`` after layer ``l``.
    layers_per_pass: with ``sequential``, at most this many layers (or layers
      of a stacked kernel) per pass.
    missing: what to do with a weight the policy selects but whose inputs are
      not tapped (a policy axis override that no matmul contracts, matmuls of
      different layouts sharing one weight): ``"error"`` (default, listing
      them), ``"magnitude"`` (magnitude N:M, logged) or ``"dense"`` (left
      dense). Weights inside ``scan``/``cond``/``while`` are tapped; a kernel
      stacked for a ``scan`` over layers is pruned layer by layer.
    progress: a tqdm bar over layers when tqdm is installed and stderr is a
      terminal.
    callback: called with a :class:`LayerResult` after each layer.

  Returns:
    ``(params, masks)`` as :func:`jasp.prune`: the pruned params (same tree
    type; for nnx an ``nnx.State`` of the ``nnx.Param`` leaves) and masks
    mirroring them (``None`` for dense leaves).

  Raises:
    TypeError: if ``batches`` is a single array or a mapping instead of an
      iterable of batches, if a batch holds no array, or if the model fails on
      a batch that is a tuple or list (an ``(inputs, labels)`` pair); the
      message names the batch.
    ValueError: if there are no batches, a weight to prune holds NaN/Inf, or
      (``missing="error"``) a weight to prune has no tapped inputs.
  """
  return _driver.run(
    "wanda",
    _leaf,
    fn,
    params,
    batches,
    n,
    m,
    layouts=layouts,
    policy=policy,
    sequential=sequential,
    layers_per_pass=layers_per_pass,
    hessian=False,
    missing=missing,
    progress=progress,
    callback=callback,
  )
