"""Keeping params N:M through training: optax gradient transformations.

Three transformations, all carrying the masks as *state* (arguments of the
jitted step, never constants baked into its HLO):

* :func:`mask_updates` — last in a chain. Rewrites the updates so that
  ``optax.apply_updates`` leaves every masked entry exactly 0, whatever came
  before (weight decay, momentum) and even if the params were never pruned:
  ``u' = where(mask, u, -p)``, hence ``p + u' = where(mask, p + u, 0)``.
* :func:`mask_gradients` — first in a chain. Zeroes the gradients of pruned
  entries so that the inner optimizer's moments never see them (apex masks the
  gradients before ``optimizer.step`` for this reason). It matters for
  optimizers whose state couples entries or outlives a mask change: after
  :func:`update_masks` revives an entry, its moments start from zero instead
  of from stale values accumulated while it was pruned.
* :func:`sparse_optimizer` — both around an inner optimizer, with one copy of
  the masks in the state.

:func:`update_masks` replaces the masks inside an optimizer state (apex's
``allow_recompute_mask``) while keeping the inner optimizer's moments.
"""

from __future__ import annotations

from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from jasp import _tree
from jasp import packing

__all__ = [
    "MaskState",
    "SparseState",
    "mask_updates",
    "mask_gradients",
    "sparse_optimizer",
    "update_masks",
    "get_masks",
]

PyTree = Any


class MaskState(NamedTuple):
  """State of :func:`mask_updates` / :func:`mask_gradients`: the masks pytree."""
  masks: PyTree


class SparseState(NamedTuple):
  """State of :func:`sparse_optimizer`: the masks and the inner optimizer's state."""
  masks: PyTree
  inner_state: optax.OptState


def _pure_masks(masks: PyTree) -> PyTree:
  masks = _tree.unbox(masks)
  def one(x):
    if x is None or isinstance(x, packing.PackedMask):
      return x
    return jnp.asarray(x, bool)
  return jax.tree_util.tree_map(one, masks, is_leaf=_tree.is_mask_leaf)


def _mask_grads(grads, masks):
  flat, treedef = jax.tree_util.tree_flatten(grads)
  aligned = _tree.align(masks, grads, what="masks")
  out = [g if mk is None else jnp.where(packing.as_bool(mk), g, jnp.zeros((), g.dtype))
         for g, mk in zip(flat, aligned)]
  return jax.tree_util.tree_unflatten(treedef, out)


def _mask_upd(updates, params, masks):
  if params is None:
    raise ValueError("jasp.mask_updates needs the params: call tx.update(grads, state, params).")
  flat_u, treedef = jax.tree_util.tree_flatten(updates)
  flat_p = treedef.flatten_up_to(params)
  aligned = _tree.align(masks, updates, what="masks")
  out = []
  for u, p, mk in zip(flat_u, flat_p, aligned):
    if mk is None:
      out.append(u)
    else:
      # where(mask, u, -p) in the wider of the two dtypes, so that p + (-p) is
      # exactly 0 after apply_updates casts back to p's dtype.
      dt = jnp.promote_types(u.dtype, p.dtype)
      out.append(jnp.where(packing.as_bool(mk), u.astype(dt), -p.astype(dt)))
  return jax.tree_util.tree_unflatten(treedef, out)


def mask_updates(masks: PyTree) -> optax.GradientTransformation:
  """Keeps params N:M after every ``optax.apply_updates``; put it last in a chain.

  Example::

    tx = optax.chain(optax.adamw(1e-3), jasp.mask_updates(masks))

  Args:
    masks: pytree mirroring the params (bool arrays or :class:`jasp.PackedMask`,
      None for dense leaves), as :func:`jasp.prune` returns; matched to the updates by path, so masks of
      an ``nnx.State`` work with ``nnx.Optimizer(model, tx, wrt=nnx.Param)``.

  Returns:
    An ``optax.GradientTransformation`` whose state is :class:`MaskState`.
    ``update`` requires ``params``.
  """
  def init_fn(params):
    del params
    return MaskState(_pure_masks(masks))

  def update_fn(updates, state, params=None):
    return _mask_upd(updates, params, state.masks), state

  return optax.GradientTransformation(init_fn, update_fn)


def mask_gradients(masks: PyTree) -> optax.GradientTransformation:
  """Zeroes the gradients of pruned entries; put it first in a chain.

  Does not by itself keep the params sparse (weight decay and momentum still
  move pruned entries): pair it with :func:`mask_updates`, or use
  :func:`sparse_optimizer`, which does both with one copy of the masks.
  """
  def init_fn(params):
    del params
    return MaskState(_pure_masks(masks))

  def update_fn(updates, state, params=None):
    del params
    return _mask_grads(updates, state.masks), state

  return optax.GradientTransformation(init_fn, update_fn)


def sparse_optimizer(inner: optax.GradientTransformation, masks: PyTree, *,
                     mask_gradients: bool = True) -> optax.GradientTransformation:  # pylint: disable=redefined-outer-name
  """apex ASP's enforcement around any optax optimizer.

  ``update`` masks the gradients (when ``mask_gradients``), runs ``inner``, and
  rewrites its updates as :func:`mask_updates` does, so the params stay N:M.

  Args:
    inner: any ``optax.GradientTransformation`` (``optax.adamw(...)``, a chain).
    masks: pytree mirroring the params (bool arrays or None).
    mask_gradients: zero pruned gradients before ``inner`` sees them.

  Returns:
    An ``optax.GradientTransformation`` with :class:`SparseState`.
  """
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    return SparseState(_pure_masks(masks), inner.init(params))

  def update_fn(updates, state, params=None, **extra):
    if mask_gradients:
      updates = _mask_grads(updates, state.masks)
    updates, inner_state = inner.update(updates, state.inner_state, params, **extra)
    return _mask_upd(updates, params, state.masks), SparseState(state.masks, inner_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _is_mask_state(x) -> bool:
  return isinstance(x, (MaskState, SparseState))


def update_masks(opt_state: optax.OptState, masks: PyTree) -> optax.OptState:
  """Replaces the masks in every jasp state inside ``opt_state``.

  Everything else (the inner optimizer's moments, counters) is kept, so masks
  can be recomputed mid-training without losing the optimizer's history::

    new_masks = jasp.compute_masks(params, layouts=layouts)
    opt_state = jasp.update_masks(opt_state, new_masks)
    params = jasp.apply_masks(params, new_masks)

  Works on the state of a bare jasp transformation, of an ``optax.chain``
  holding one, and on ``nnx.Optimizer.opt_state`` (pass the pure state that
  ``nnx.as_pure`` gives, or update the optimizer's state in place with
  ``nnx.update``).

  Raises:
    ValueError: if ``opt_state`` holds no jasp state, or the new masks'
      structure differs from the old ones'.
  """
  new = _pure_masks(masks)
  found = []
  def swap(x):
    if not _is_mask_state(x):
      return x
    found.append(x)
    old_paths = _tree.leaves_by_path(x.masks, keep_none=True)
    new_paths = _tree.leaves_by_path(new, keep_none=True)
    if set(old_paths) != set(new_paths):
      missing = sorted(set(old_paths) ^ set(new_paths))
      raise ValueError(f"the new masks do not mirror the old ones: '{missing[0]}' is on one side only.")
    return x._replace(masks=new)
  out = jax.tree_util.tree_map(swap, opt_state, is_leaf=_is_mask_state)
  if not found:
    raise ValueError("opt_state holds no jasp mask state (mask_updates, mask_gradients or "
                     "sparse_optimizer).")
  return out


def get_masks(opt_state: optax.OptState) -> PyTree:
  """The masks held by the first jasp state inside ``opt_state``."""
  found = []
  jax.tree_util.tree_map(lambda x: found.append(x) if _is_mask_state(x) else None,
                         opt_state, is_leaf=_is_mask_state)
  if not found:
    raise ValueError("opt_state holds no jasp mask state.")
  return found[0].masks
