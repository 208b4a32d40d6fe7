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

Where jasp goes in an optimizer (every docstring below refers to this):

* **Outermost: always correct.** ``sparse_optimizer(inner, masks)``, or
  ``mask_updates`` last in the outermost chain, runs at every step and has the
  last word on the updates, so the params are N:M after every
  ``optax.apply_updates`` from pruned or unpruned params, whatever ``inner``
  is: ``optax.MultiSteps`` (its accumulating steps return zeros),
  ``optax.apply_if_finite`` (a skipped step returns zeros), ``optax.lookahead``
  (fast and slow params are both masked), ``optax.contrib.sam``, and the
  schedule-free optimizers (``sparse_optimizer`` also keeps their ``z``
  sequence masked, so ``optax.contrib.schedule_free_eval_params`` gives N:M
  evaluation params; after ``mask_updates`` use :func:`schedule_free_eval_params`).
* **Inside a wrapper** (``optax.MultiSteps(sparse_optimizer(...), k)``,
  ``optax.apply_if_finite``, ``optax.lookahead``, ``schedule_free``): correct
  only if the params are pruned (:func:`jasp.apply_masks`) before the first
  step. A step the wrapper skips never reaches jasp and returns zeros, so
  unpruned params would stay dense (and take dense gradients) until the first
  step that goes through; ``lookahead`` would keep dense slow params.
* **Not supported:** a transformation after ``mask_updates`` that changes the
  updates, e.g. ``optax.chain(mask_updates(masks), optax.adam(lr))``: Adam
  turns the rewritten updates into steps that move the pruned entries again.

Two checks find a misplaced jasp: ``debug=True`` on :func:`mask_updates` or
:func:`sparse_optimizer` raises inside the jitted step when the params it is
given are non-zero at a pruned entry (a host callback, off by default), and
:func:`assert_masked` / :func:`count_unmasked` check the params after a step.

:func:`update_masks` replaces the masks inside an optimizer state (apex's
``allow_recompute_mask``) while keeping the inner optimizer's moments.

Masks in the state are 1 bit per weight, whatever form they are given in. A
bool mask is packed (:func:`jasp.packing.pack`) along its innermost axis whose
size divides by 8, also on each shard of a sharded mask (no padding; the bits
keep the mask's sharding), else along its last axis, padded; a
:class:`jasp.PackedMask` is kept as it is. The unpacking is a bitwise ``and``
and a compare that XLA fuses into the ``where`` of the update, so a step reads
1/8 byte per weight for the mask instead of a bool's 1 byte. Two kinds of leaf
stay bool: a scalar or empty mask (nothing to pack along), and a mask sharded
along its last axis with no axis that divides by 8 on every shard (packing it
would reshard it). :func:`get_masks` returns the masks in the form they were
given (each leaf's pytree node type records it, a static fact, never a traced
value), or all packed or all bool when asked.

Checkpoints: the state is a pytree of arrays (``uint8`` bits under each packed
leaf), so orbax saves and restores it. A state saved by a jasp that held bool
masks restores into the layout that :func:`with_bool_masks` gives::

  target = jasp.with_bool_masks(tx.init(params))
  opt_state = ocp.StandardCheckpointer().restore(path, target)
  opt_state = jasp.update_masks(opt_state, jasp.get_masks(opt_state))  # packed again

The transformations run on either layout (the same updates bit for bit); the
last line only brings the state back to 1 bit per weight.
"""

from __future__ import annotations

import functools
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from optax import contrib as optax_contrib

from jasp import _tree
from jasp import packing
from jasp.typing import PyTree

__all__ = [
  "MaskState",
  "SparseState",
  "mask_updates",
  "mask_gradients",
  "sparse_optimizer",
  "update_masks",
  "get_masks",
  "with_bool_masks",
  "count_unmasked",
  "assert_masked",
  "schedule_free_eval_params",
]


_ScheduleFreeState = optax_contrib.ScheduleFreeState


class MaskState(NamedTuple):
  """State of :func:`mask_updates` / :func:`mask_gradients`: the masks pytree.

  Its leaves are :class:`jasp.PackedMask` (1 bit per weight; see the module
  docstring for the leaves that stay bool arrays) or None; read them with
  :func:`get_masks`, which gives them back in the form they were given in.
  """

  masks: PyTree


class SparseState(NamedTuple):
  """State of :func:`sparse_optimizer`: the masks (as in :class:`MaskState`) and the inner state."""

  masks: PyTree
  inner_state: optax.OptState


@jax.tree_util.register_pytree_node_class
class _PackedFromBool(packing.PackedMask):
  """A mask given as a bool array, held packed in a jasp state.

  The node type, part of the state's tree structure, is what records the form
  the mask was given in: :func:`get_masks` unpacks it. Children and aux data
  are :class:`jasp.PackedMask`'s (the bits; shape and axis).
  """


def _pure_masks(masks: PyTree) -> PyTree:
  masks = _tree.unbox(masks)

  def one(x):
    if x is None or isinstance(x, packing.PackedMask):
      return x
    return jnp.asarray(x, bool)

  return jax.tree_util.tree_map(one, masks, is_leaf=_tree.is_mask_leaf)


def _shard_shape(x) -> tuple[int, ...]:
  """The shape of each shard of ``x``: its shape unless it is a sharded concrete array."""
  shape = tuple(x.shape)
  if _tree.is_tracer(x):
    return shape
  try:
    return tuple(x.sharding.shard_shape(shape))
  except (AttributeError, TypeError, ValueError):
    return shape


def _pack_axis(mask) -> int | None:
  """The axis a bool mask is packed along in a jasp state; None keeps it bool.

  The innermost axis whose size divides by 8, on every shard too; else the
  last axis (padded), unless the mask is sharded along it. None for a scalar
  or empty mask and for a mask sharded along its last axis with no axis that
  fits (packing would reshard it).
  """
  shape = tuple(mask.shape)
  if not shape or 0 in shape:
    return None
  shard = _shard_shape(mask)
  for a in reversed(range(len(shape))):
    if shape[a] % 8 == 0 and shard[a] % 8 == 0:
      return a
  return len(shape) - 1 if shard[-1] == shape[-1] else None


def _hold(mask):
  """One mask leaf as a jasp state holds it: a bool array packed, if it can be."""
  if mask is None or isinstance(mask, packing.PackedMask):
    return mask
  mask = jnp.asarray(mask, bool)
  axis = _pack_axis(mask)
  if axis is None:
    return mask
  p = packing.pack(mask, axis)
  return _PackedFromBool(p.bits, p.shape, p.axis)


def _held_masks(masks: PyTree) -> PyTree:
  """The masks as a jasp state holds them (see the module docstring)."""
  return jax.tree_util.tree_map(_hold, _pure_masks(masks), is_leaf=_tree.is_mask_leaf)


def _in_form(masks: PyTree, packed: bool | None) -> PyTree:
  """Held masks in the form given (``packed=None``), all packed (True) or all bool (False)."""
  if packed is not None and not isinstance(packed, bool):
    raise ValueError(f"packed must be None (the form given), True or False; got {packed!r}.")

  def one(x):
    if x is None:
      return x
    if packed is None:
      return packing.unpack(x) if isinstance(x, _PackedFromBool) else x
    if not packed:
      return packing.as_bool(x)
    if isinstance(x, _PackedFromBool):
      return packing.PackedMask(x.bits, x.shape, x.axis)
    if isinstance(x, packing.PackedMask) or _pack_axis(x) is None:
      return x
    return packing.pack(x, _pack_axis(x))

  return jax.tree_util.tree_map(one, masks, is_leaf=_tree.is_mask_leaf)


def _copies(params: PyTree, masks: PyTree) -> list[tuple[str, PyTree]]:
  """The copies of the params that ``masks`` apply to, each with a path prefix.

  ``optax.lookahead`` trains an ``optax.LookaheadParams`` pair: the masks of the
  plain params apply to its fast and to its slow copy.
  """
  if isinstance(params, optax.LookaheadParams) and not isinstance(masks, optax.LookaheadParams):
    return [("fast/", params.fast), ("slow/", params.slow)]
  return [("", params)]


def _zero_pruned(x: jax.Array, mask: Any) -> jax.Array:
  return jnp.where(packing.as_bool(mask), x, jnp.zeros((), x.dtype))


def _zero_pruned_tree(tree, masks):
  """``tree`` (gradients, evaluation params) with every pruned entry set to 0."""
  flat, treedef = jax.tree_util.tree_flatten(tree)
  aligned = _tree.align(masks, tree, what="masks")
  out = [x if mk is None else _zero_pruned(x, mk) for x, mk in zip(flat, aligned)]
  return jax.tree_util.tree_unflatten(treedef, out)


def _mask_upd(updates, params, masks):
  if isinstance(updates, optax.LookaheadParams) and not isinstance(masks, optax.LookaheadParams):
    if not isinstance(params, optax.LookaheadParams):
      raise ValueError(
        "the updates are an optax.LookaheadParams pair but the params are not: pass "
        "the LookaheadParams that optax.lookahead trains as params."
      )
    return optax.LookaheadParams(
      fast=_mask_upd(updates.fast, params.fast, masks),
      slow=_mask_upd(updates.slow, params.slow, masks),
    )
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


def _mask_schedule_free(opt_state: optax.OptState, masks: PyTree) -> optax.OptState:
  """Zeroes the pruned entries of ``z`` in every schedule-free state inside ``opt_state``.

  ``z`` mirrors the params the schedule-free optimizer was given (all of them,
  or a part under ``optax.multi_transform``), so its leaves are matched to the
  masks by path and a leaf without a mask of its shape is left as it is.
  """
  by_path = _tree.leaves_by_path(masks, keep_none=True)

  def one_z(path, z):
    mk = by_path.get(_tree.path_str(path))
    if mk is None or tuple(mk.shape) != tuple(jnp.shape(z)):
      return z
    return _zero_pruned(z, mk)

  def one(x):
    if not isinstance(x, _ScheduleFreeState):
      return x
    return x._replace(z=jax.tree_util.tree_map_with_path(one_z, x.z))

  return jax.tree_util.tree_map(one, opt_state, is_leaf=lambda x: isinstance(x, _ScheduleFreeState))


def _unmasked_counts(params: PyTree, masks: PyTree) -> tuple[list[str], list[jax.Array]]:
  """Per masked leaf of every copy of ``params``: its path and its non-zeros at pruned entries."""
  paths, counts = [], []
  for prefix, copy in _copies(params, masks):
    flat = jax.tree_util.tree_flatten_with_path(copy)[0]
    aligned = _tree.align(masks, copy, what="masks")
    for (path, p), mk in zip(flat, aligned):
      if mk is not None:
        paths.append(prefix + _tree.path_str(path))
        counts.append(
          jnp.sum(jnp.logical_and(jnp.logical_not(packing.as_bool(mk)), p != 0), dtype=jnp.int32)
        )
  return paths, counts


def _misuse_hint() -> str:
  return (
    "Either the params were never pruned (prune them before the first step with "
    "jasp.apply_masks: required when jasp sits inside optax.MultiSteps, apply_if_finite, "
    "lookahead or schedule_free, whose skipped steps never reach it, and in debug mode), or "
    "something changed them after jasp: mask_updates is not last in its chain, or a wrapper "
    "around jasp replaced its updates. jasp.sparse_optimizer outermost is always correct."
  )


def _raise_if_unmasked(who: str, paths: tuple[str, ...], counts: np.ndarray) -> None:
  counts = np.asarray(counts)
  bad = np.flatnonzero(counts)
  if bad.size:
    first = bad[0]
    raise ValueError(
      f"{who}(debug=True): the params passed to update hold {int(counts.sum())} non-zero "
      f"entries where the masks prune them ('{paths[first]}': {int(counts[first])}"
      + (f"; {bad.size - 1} more leaves" if bad.size > 1 else "")
      + "). "
      + _misuse_hint()
    )


def _debug_check(who: str, params: PyTree, masks: PyTree) -> None:
  paths, counts = _unmasked_counts(params, masks)
  if paths:
    jax.debug.callback(functools.partial(_raise_if_unmasked, who, tuple(paths)), jnp.stack(counts))


def _need_params(who: str, params) -> None:
  if params is None:
    raise ValueError(f"jasp.{who} needs the params: call tx.update(grads, state, params).")


def mask_updates(masks: PyTree, *, debug: bool = False) -> optax.GradientTransformation:
  """Keeps params N:M after every ``optax.apply_updates``; put it last in a chain.

  Example::

    tx = optax.chain(optax.adamw(1e-3), jasp.mask_updates(masks))

  Safe compositions: last in the outermost chain, around anything, from
  pruned or unpruned params: ``optax.chain(optax.MultiSteps(opt, k)
  .gradient_transformation(), jasp.mask_updates(masks))``, likewise
  ``optax.apply_if_finite``, ``optax.lookahead`` (both the fast and the slow
  params come out N:M) and ``optax.contrib.sam``. After a schedule-free optimizer the training params are N:M
  but its ``z`` is not: take evaluation params from
  :func:`schedule_free_eval_params`, or use :func:`sparse_optimizer`, which
  keeps ``z`` masked. Inside a wrapper that can skip it (``MultiSteps``,
  ``apply_if_finite``, ``lookahead``, ``schedule_free``), prune the params
  before the first step.

  Not supported: anything after it in a chain that changes the updates
  (``optax.chain(jasp.mask_updates(masks), optax.adam(lr))`` moves pruned
  entries again); ``debug=True`` or :func:`assert_masked` finds it.

  Args:
    masks: pytree mirroring the params (bool arrays or :class:`jasp.PackedMask`,
      None for dense leaves), as :func:`jasp.prune` returns; matched to the updates by path, so masks of
      an ``nnx.State`` work with ``nnx.Optimizer(model, tx, wrt=nnx.Param)``. Held packed in the
      state, 1 bit per weight, whatever the form (module docstring); :func:`get_masks` gives
      them back in this form.
    debug: check in every ``update`` that the params it is given are zero at
      every pruned entry, through a host callback (a sync per step; off by
      default). It requires the params to be pruned before the first step.

  Returns:
    An ``optax.GradientTransformation`` whose state is :class:`MaskState`.
    ``update`` requires ``params``.

  Raises:
    ValueError: from ``update``, if ``params`` is None or the masks do not
      mirror the params; with ``debug=True``, when the jitted step runs with
      params that are non-zero at a pruned entry (under ``jit`` it reaches
      the caller as a ``jax.errors.JaxRuntimeError`` carrying the message).
  """

  def init_fn(params):
    del params
    return MaskState(_held_masks(masks))

  def update_fn(updates, state, params=None):
    _need_params("mask_updates", params)
    if debug:
      _debug_check("jasp.mask_updates", params, state.masks)
    return _mask_upd(updates, params, state.masks), state

  return optax.GradientTransformation(init_fn, update_fn)


def mask_gradients(masks: PyTree) -> optax.GradientTransformation:
  """Zeroes the gradients of pruned entries; put it first in a chain.

  Does not by itself keep the params sparse (weight decay and momentum still
  move pruned entries): pair it with :func:`mask_updates` last in the same
  chain, or use :func:`sparse_optimizer`, which does both with one copy of the
  masks::

    tx = optax.chain(jasp.mask_gradients(masks), optax.adam(1e-3), jasp.mask_updates(masks))

  The gradients are those of the params the optimizer trains; with
  ``optax.lookahead`` they are the fast params' gradients, which these masks
  fit. Not supported: anything before it in a chain (it would mask that
  transformation's output instead of the gradients).

  Args:
    masks: pytree mirroring the params (bool arrays, :class:`jasp.PackedMask`
      or None), matched to the gradients by path; held packed, as in :func:`mask_updates`.

  Returns:
    An ``optax.GradientTransformation`` whose state is :class:`MaskState`.

  Raises:
    ValueError: from ``update``, if the masks do not mirror the gradients.
  """

  def init_fn(params):
    del params
    return MaskState(_held_masks(masks))

  def update_fn(updates, state, params=None):
    del params
    return _zero_pruned_tree(updates, state.masks), state

  return optax.GradientTransformation(init_fn, update_fn)


def sparse_optimizer(
  inner: optax.GradientTransformation,
  masks: PyTree,
  *,
  mask_gradients: bool = True,
  debug: bool = False,
) -> optax.GradientTransformationExtraArgs:
  """apex ASP's enforcement around any optax optimizer; the composition that cannot go wrong.

  ``update`` masks the gradients (when ``mask_gradients``), runs ``inner``,
  zeroes the pruned entries of any schedule-free ``z`` in ``inner``'s state,
  and rewrites ``inner``'s updates as :func:`mask_updates` does, so the params
  are N:M after every ``optax.apply_updates``.

  Keep it outermost and put every wrapper inside it; then it is correct from
  pruned or unpruned params::

    tx = jasp.sparse_optimizer(optax.MultiSteps(optax.adamw(1e-3), 4), masks)
    tx = jasp.sparse_optimizer(optax.apply_if_finite(optax.adamw(1e-3), 5), masks)
    tx = jasp.sparse_optimizer(optax.lookahead(optax.adam(1e-3), 5, 0.5), masks)
    tx = jasp.sparse_optimizer(optax.contrib.schedule_free_adamw(1e-3), masks)
    eval_params = optax.contrib.schedule_free_eval_params(opt_state.inner_state, params)

  ``MultiSteps`` accumulating and ``apply_if_finite`` skipping return zeros,
  which it masks like any update; with ``lookahead`` the params are an
  ``optax.LookaheadParams`` pair and both copies stay N:M (the masks mirror
  the plain params); with schedule-free the training params, ``z`` and the
  evaluation params are all N:M. Wrapped the other way round
  (``optax.MultiSteps(jasp.sparse_optimizer(...), k)`` and the like), a
  skipped step never reaches it: prune the params before the first step.

  Args:
    inner: any ``optax.GradientTransformation`` (``optax.adamw(...)``, a chain,
      a wrapper).
    masks: pytree mirroring the params (bool arrays, :class:`jasp.PackedMask`
      or None); held packed, as in :func:`mask_updates`.
    mask_gradients: zero pruned gradients before ``inner`` sees them.
    debug: as in :func:`mask_updates`: raise from the jitted step when the
      params it is given are non-zero at a pruned entry (a host callback; off
      by default; requires params pruned before the first step).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with :class:`SparseState`;
    extra keyword arguments of ``update`` go to ``inner``.

  Raises:
    ValueError: from ``update``, if ``params`` is None or the masks do not
      mirror the params; with ``debug=True`` as in :func:`mask_updates`.
  """
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    return SparseState(_held_masks(masks), inner.init(params))

  def update_fn(updates, state, params=None, **extra):
    _need_params("sparse_optimizer", params)
    if debug:
      _debug_check("jasp.sparse_optimizer", params, state.masks)
    if mask_gradients:
      updates = _zero_pruned_tree(updates, state.masks)
    updates, inner_state = inner.update(updates, state.inner_state, params, **extra)
    inner_state = _mask_schedule_free(inner_state, state.masks)
    return _mask_upd(updates, params, state.masks), SparseState(state.masks, inner_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _is_mask_state(x) -> bool:
  return isinstance(x, (MaskState, SparseState))


def _find(tree: PyTree, pred) -> list:
  found = []
  jax.tree_util.tree_map(lambda x: found.append(x) if pred(x) else None, tree, is_leaf=pred)
  return found


def update_masks(opt_state: optax.OptState, masks: PyTree) -> optax.OptState:
  """Replaces the masks in every jasp state inside ``opt_state``.

  Everything else (the inner optimizer's moments, counters) is kept, so masks
  can be recomputed mid-training without losing the optimizer's history::

    new_masks = jasp.compute_masks(params, layouts=layouts)
    opt_state = jasp.update_masks(opt_state, new_masks)
    params = jasp.apply_masks(params, new_masks)

  The one exception: the ``z`` sequence of a schedule-free optimizer inside a
  :func:`sparse_optimizer` is masked with the new masks at once, so that its
  evaluation params are N:M before the next step too.

  Works on the state of a bare jasp transformation, of an ``optax.chain``
  holding one, and on ``nnx.Optimizer.opt_state`` (pass the pure state that
  ``nnx.as_pure`` gives, or update the optimizer's state in place with
  ``nnx.update``).

  The new masks may be bool arrays or :class:`jasp.PackedMask` (any mix); they
  are held packed as in :func:`mask_updates`, and
  :func:`get_masks` then returns them in this new form. The state's tree
  structure changes when the form does (a bool leaf given where a packed one
  was), so a jitted step retraces once.

  Raises:
    ValueError: if ``opt_state`` holds no jasp state, or the new masks'
      structure differs from the old ones'.
  """
  new = _held_masks(masks)
  found = []

  def swap(x):
    if not _is_mask_state(x):
      return x
    found.append(x)
    old_paths = _tree.leaves_by_path(x.masks, keep_none=True)
    new_paths = _tree.leaves_by_path(new, keep_none=True)
    if set(old_paths) != set(new_paths):
      missing = sorted(set(old_paths) ^ set(new_paths))
      raise ValueError(
        f"the new masks do not mirror the old ones: '{missing[0]}' is on one side only."
      )
    if isinstance(x, SparseState):
      return SparseState(new, _mask_schedule_free(x.inner_state, new))
    return x._replace(masks=new)

  out = jax.tree_util.tree_map(swap, opt_state, is_leaf=_is_mask_state)
  if not found:
    raise ValueError(
      "opt_state holds no jasp mask state (mask_updates, mask_gradients or sparse_optimizer)."
    )
  return out


def _state_masks(opt_state: optax.OptState) -> PyTree:
  """The masks of the first jasp state inside ``opt_state``, as held (packed)."""
  found = _find(opt_state, _is_mask_state)
  if not found:
    raise ValueError("opt_state holds no jasp mask state.")
  return found[0].masks


def get_masks(opt_state: optax.OptState, *, packed: bool | None = None) -> PyTree:
  """The masks held by the first jasp state inside ``opt_state``.

  Args:
    opt_state: an optimizer state holding a jasp state (anywhere inside).
    packed: None (default): each leaf in the form it was given in to the
      transformation or to :func:`update_masks` (a bool array, unpacked here,
      or a :class:`jasp.PackedMask`); True: every leaf a ``PackedMask``
      (except those a state keeps bool, see the module docstring); False:
      every leaf a bool array.

  Returns:
    The masks pytree (None for dense leaves). Jittable.

  Raises:
    ValueError: if ``opt_state`` holds no jasp state, or ``packed`` is not
      None, True or False.
  """
  return _in_form(_state_masks(opt_state), packed)


def with_bool_masks(opt_state: optax.OptState) -> optax.OptState:
  """``opt_state`` with the masks of every jasp state inside as bool arrays.

  The layout of the states that jasp wrote before it held masks packed: build
  the orbax restore target of such a checkpoint with it (module docstring).
  The transformations accept this layout too; :func:`update_masks` with
  :func:`get_masks` packs it again.

  Raises:
    ValueError: if ``opt_state`` holds no jasp state.
  """
  if not _find(opt_state, _is_mask_state):
    raise ValueError("opt_state holds no jasp mask state.")

  def one(x):
    return x._replace(masks=_in_form(x.masks, False)) if _is_mask_state(x) else x

  return jax.tree_util.tree_map(one, opt_state, is_leaf=_is_mask_state)


def _masks_of(masks_or_state: PyTree) -> PyTree:
  if _find(masks_or_state, _is_mask_state):
    return _state_masks(masks_or_state)
  return _pure_masks(masks_or_state)


def count_unmasked(params: PyTree, masks: PyTree) -> dict[str, int]:
  """Non-zero entries at pruned positions, per leaf of ``params`` that has any.

  A host-side check to run after a step (one transfer of a few integers; not
  for use under ``jit``)::

    params = optax.apply_updates(params, updates)
    assert not jasp.count_unmasked(params, opt_state)

  Args:
    params: the params, or the ``optax.LookaheadParams`` pair that
      ``optax.lookahead`` trains (both copies are checked, named
      ``fast/...`` and ``slow/...``).
    masks: the masks pytree, or an optimizer state holding a jasp state (its
      masks are used).

  Returns:
    ``{path: count}`` for the leaves with non-zeros where their mask prunes;
    empty when the params are zero at every pruned entry.

  Raises:
    ValueError: if the masks do not mirror the params, or ``masks`` is an
      optimizer state without a jasp state in it.
  """
  masks = _masks_of(masks)
  paths, counts = _unmasked_counts(params, masks)
  counts = jax.device_get(counts)
  return {p: int(c) for p, c in zip(paths, counts) if c}


def assert_masked(params: PyTree, masks: PyTree) -> None:
  """Raises unless ``params`` are zero at every entry the masks prune.

  The check for a training loop, after ``optax.apply_updates``::

    jasp.assert_masked(params, opt_state)

  It catches every composition that lets params leave N:M (see the module
  docstring): ``mask_updates`` not last in its chain, a wrapper around jasp
  that skipped steps on params that were never pruned, dense ``lookahead``
  slow params. Arguments as in :func:`count_unmasked`.

  Raises:
    ValueError: naming the first offending leaf and how many entries it holds
      at pruned positions; or if the masks do not mirror the params.
  """
  bad = count_unmasked(params, masks)
  if bad:
    first, n = next(iter(bad.items()))
    raise ValueError(
      f"the params are not zero where the masks prune them: '{first}' holds {n} non-zero pruned "
      f"entries"
      + (f" ({len(bad) - 1} more leaves too)" if len(bad) > 1 else "")
      + ". "
      + _misuse_hint()
    )


def schedule_free_eval_params(
  opt_state: optax.OptState, params: PyTree, *, masks: PyTree = None
) -> PyTree:
  """Evaluation params of a schedule-free optimizer, with the masks applied.

  ``optax.contrib.schedule_free_eval_params(state, params)`` computes
  ``x = (y - (1 - b1) z) / b1`` from the training params ``y`` and the state's
  ``z``. After ``optax.chain(optax.contrib.schedule_free_adamw(lr),
  jasp.mask_updates(masks))`` the training params are N:M but ``z`` is not, so
  optax's ``x`` is non-zero at pruned entries; this function returns ``x``
  with them zeroed (the kept entries are optax's, bit for bit)::

    eval_params = jasp.schedule_free_eval_params(opt_state, params)

  Under :func:`sparse_optimizer` ``z`` is kept masked and optax's function is
  exact too. Jittable.

  Args:
    opt_state: the whole optimizer state; it holds one schedule-free state
      (found anywhere inside: a chain, a :class:`SparseState`).
    params: the training params.
    masks: the masks; by default those of the jasp state in ``opt_state``.

  Returns:
    The evaluation params, zero at every pruned entry.

  Raises:
    ValueError: if ``opt_state`` holds no schedule-free state or more than
      one, or no jasp state when ``masks`` is not given, or the masks do not
      mirror the params.
  """
  states = _find(opt_state, lambda x: isinstance(x, _ScheduleFreeState))
  if len(states) != 1:
    raise ValueError(
      f"opt_state holds {len(states)} schedule-free states "
      "(optax.contrib.schedule_free and its aliases); one is needed."
    )
  masks = _state_masks(opt_state) if masks is None else _pure_masks(masks)
  x = optax_contrib.schedule_free_eval_params(states[0], params)
  return _zero_pruned_tree(x, masks)
