"""Packed masks: 1 bit per weight, behind the same API as bool masks.

A :class:`PackedMask` stores a mask as bits along its group axis: 8
consecutive entries of the (flattened) group axis share one ``uint8``. It works
for any N:M (no assumption on the pattern) and keeps the mask's layout: the
packed axis is the group axis, so a weight sharded along any axis gives a
packed mask sharded the same way (a group-axis shard needs a multiple of 8
entries).

Every jasp function that takes masks (``apply_masks``, ``mask_updates``,
``mask_gradients``, ``sparse_optimizer``, ``update_masks``, the report, orbax
checkpoints) accepts ``PackedMask`` leaves. Inside a jitted step the unpacking
is element-wise (shift, and, compare) and fuses into the ``where`` that uses
it, so no bool array of the weight's size is ever materialised.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jasp import _tree
from jasp._nm_core import group_axes
from jasp._nm_core import innermost_group_axes
from jasp._tree import is_mask_leaf

__all__ = [
  "PackedMask",
  "pack",
  "packed_axes",
  "unpack",
  "pack_masks",
  "unpack_masks",
  "is_mask_leaf",
]


@jax.tree_util.register_pytree_node_class
class PackedMask(_tree.MaskLeaf):
  """A bool mask of ``shape`` packed 8 entries per byte along ``axis``.

  Attributes:
    bits: ``uint8`` array of shape ``shape[:a0] + (ceil(K / 8),) + shape[a1+1:]``
      where ``a0..a1`` are the group axes and ``K`` their flattened size. Bit
      ``j`` of byte ``b`` is entry ``8 * b + j`` of the flattened group axis.
    shape: the mask's (and weight's) shape.
    axis: the group axes (consecutive).

  Raises:
    ValueError: ``axis`` is not a run of consecutive axes of ``shape``.
  """

  def __init__(self, bits: jax.Array, shape: tuple[int, ...], axis: tuple[int, ...]):
    self.bits = bits
    self.shape = tuple(int(s) for s in shape)
    try:
      self.axis = group_axes(len(self.shape), axis)
    except (ValueError, TypeError) as e:
      raise ValueError(
        f"PackedMask of shape {self.shape}: axis {axis!r} is not a run of its axes ({e})"
      ) from None

  def tree_flatten(self):
    return (self.bits,), (self.shape, self.axis)

  @classmethod
  def tree_unflatten(cls, aux, children):
    return cls(children[0], *aux)

  @property
  def dtype(self):
    return jnp.dtype(bool)

  @property
  def ndim(self) -> int:
    return len(self.shape)

  @property
  def bits_per_weight(self) -> float:
    size = int(np.prod(self.shape, dtype=np.int64))
    return 8.0 * int(np.prod(np.shape(self.bits), dtype=np.int64)) / max(size, 1)

  def unpack(self) -> jax.Array:
    return unpack(self)

  def __repr__(self) -> str:
    return (
      f"PackedMask(shape={self.shape}, axis={self.axis}, bits={getattr(self.bits, 'shape', None)})"
    )


def _k(shape, axis) -> int:
  return int(np.prod([shape[a] for a in axis], dtype=np.int64))


def packed_axes(shape: tuple[int, ...], axis: int | tuple[int, ...]) -> tuple[int, ...]:
  """The axes :func:`pack` packs a mask of ``shape`` along, for group ``axis``.

  The group axes, or only the innermost of them when its size divides by 8.

  Raises:
    ValueError: ``axis`` is out of range or not a run of consecutive axes.
  """
  return innermost_group_axes(tuple(shape), group_axes(len(shape), axis), 8)


def pack(mask: jax.Array, axis: int | tuple[int, ...] = 0) -> PackedMask:
  """Packs a bool ``mask`` 8 entries per byte along its (flattened) group ``axis``.

  When the innermost of several group axes divides by 8 the bits are packed
  along it alone (the same bit order, no reshape merging axes).

  Jittable; under ``jit`` the packed bits keep the mask's sharding on the other
  axes (and on the group axis when each shard holds a multiple of 8 entries).

  Raises:
    TypeError: ``mask`` is not a bool array.
    ValueError: ``axis`` is out of range or not a run of consecutive axes.
  """
  if not _tree.is_bool_dtype(getattr(mask, "dtype", None)):
    raise TypeError(
      f"pack() takes a bool mask, got {type(mask).__name__} of dtype "
      f"{getattr(mask, 'dtype', None)}; pass mask.astype(bool)."
    )
  mask = jnp.asarray(mask)
  if mask.ndim == 0:
    raise ValueError("pack() needs a mask of rank >= 1, got a scalar.")
  axes = packed_axes(mask.shape, axis)
  a0, a1 = axes[0], axes[-1]
  k = _k(mask.shape, axes)
  kb = -(-k // 8)
  x = mask.reshape(mask.shape[:a0] + (k,) + mask.shape[a1 + 1 :]).astype(jnp.uint8)
  if kb * 8 != k:
    pad = [(0, 0)] * x.ndim
    pad[a0] = (0, kb * 8 - k)
    x = jnp.pad(x, pad)
  x = x.reshape(x.shape[:a0] + (kb, 8) + x.shape[a0 + 1 :])
  weights = (jnp.uint8(1) << jnp.arange(8, dtype=jnp.uint8)).reshape(
    (8,) + (1,) * (x.ndim - a0 - 2)
  )
  bits = jnp.sum(x * weights, axis=a0 + 1, dtype=jnp.uint8)
  return PackedMask(bits, mask.shape, axes)


def unpack(p: PackedMask) -> jax.Array:
  """The bool mask of a :class:`PackedMask` (element-wise; fuses into consumers)."""
  a0 = p.axis[0]
  k = _k(p.shape, p.axis)
  bits = jnp.asarray(p.bits)
  # Shift, and, cast: XLA on GPUs fuses this (and the reshapes, bitcasts) into
  # the consumer at no measurable cost; an ``and`` against constant bits
  # followed by a compare costs more in an optimizer step on an H200.
  shifts = jnp.arange(8, dtype=jnp.uint8).reshape((8,) + (1,) * (bits.ndim - a0 - 1))
  x = (jnp.expand_dims(bits, a0 + 1) >> shifts) & jnp.uint8(1)
  x = x.reshape(bits.shape[:a0] + (bits.shape[a0] * 8,) + bits.shape[a0 + 1 :])
  if x.shape[a0] != k:
    x = jax.lax.slice_in_dim(x, 0, k, axis=a0)
  return x.reshape(p.shape).astype(bool)


def as_bool(mask: Any) -> jax.Array | None:
  """A mask leaf as a bool array (None stays None)."""
  if mask is None:
    return None
  if isinstance(mask, PackedMask):
    return unpack(mask)
  return jnp.asarray(mask, bool) if jnp.asarray(mask).dtype != bool else mask


def pack_masks(masks: Any, axes: Any = None) -> Any:
  """Packs every bool leaf of a masks pytree.

  Args:
    masks: masks pytree (bool arrays or None; PackedMask leaves pass through).
    axes: ``{path: group axes}`` (e.g. from :func:`jasp.policy.plan`: ``{p: d.axis}``);
      leaves without an entry are packed along axis 0. The packed axis does not
      change the mask's meaning, only its memory layout and sharding.

  Returns:
    The same structure with :class:`PackedMask` leaves.

  Raises:
    TypeError: ``axes`` is not a mapping, or a leaf is not a bool mask (naming its path).
    ValueError: a leaf's axis does not fit its shape (naming its path).
  """
  axes = {} if axes is None else axes
  if not isinstance(axes, Mapping):
    raise TypeError(
      f"axes must be a {{path: group axes}} mapping, got {type(axes).__name__}; "
      "e.g. {p: d.axis for p, d in jasp.policy.plan(params).items() if d.prune}."
    )

  def one(path, x):
    if x is None or isinstance(x, PackedMask):
      return x
    try:
      return pack(x, axes.get(path, 0))
    except (TypeError, ValueError) as e:
      raise type(e)(f"the mask for '{path}' (shape {getattr(x, 'shape', None)}): {e}") from None

  return jax.tree_util.tree_map_with_path(
    lambda p, x: one(_tree.path_str(p), x), masks, is_leaf=is_mask_leaf
  )


def unpack_masks(masks: Any) -> Any:
  """Unpacks every :class:`PackedMask` leaf to a bool array."""
  return jax.tree_util.tree_map(as_bool, masks, is_leaf=is_mask_leaf)
