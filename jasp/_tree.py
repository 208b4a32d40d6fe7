"""Pytree helpers shared by the tree-level modules: leaf paths and alignment.

A *path string* names a leaf as its keys joined by ``/`` (``params/Dense_0/kernel``).
The trailing ``value`` attribute of an ``nnx.Variable`` is dropped, so a flax
``linen`` variables dict, an ``nnx.State`` of Variables and the pure state that
``nnx.Optimizer`` hands to optax all name a kernel the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.tree_util import DictKey
from jax.tree_util import FlattenedIndexKey
from jax.tree_util import GetAttrKey
from jax.tree_util import SequenceKey

from jasp.typing import PyTree


def _key_str(k) -> str:
  if isinstance(k, DictKey):
    return str(k.key)
  if isinstance(k, GetAttrKey):
    return k.name
  if isinstance(k, SequenceKey):
    return str(k.idx)
  if isinstance(k, FlattenedIndexKey):
    return str(k.key)
  return str(k)


def path_str(path) -> str:
  """``(DictKey('params'), DictKey('Dense_0'), DictKey('kernel'))`` -> ``params/Dense_0/kernel``."""
  keys = [_key_str(k) for k in path]
  if len(path) and isinstance(path[-1], GetAttrKey) and keys[-1] == "value":
    keys = keys[:-1]
  return "/".join(keys)


try:
  _Tracer = jax.core.Tracer
except AttributeError:  # pragma: no cover - newer JAX
  from jax._src.core import Tracer as _Tracer


def is_tracer(x) -> bool:
  """True for abstract values inside ``jit``/``grad`` traces."""
  return isinstance(x, _Tracer)


def is_none(x) -> bool:
  return x is None


def is_bool_dtype(dtype) -> bool:
  """Whether ``dtype`` is bool (False for None and for extended dtypes such as PRNG keys)."""
  if dtype is None:
    return False
  try:
    return np.dtype(dtype) == np.dtype(np.bool_)
  except TypeError:
    return False


class MaskLeaf:
  """Base of the pytree nodes that a masks tree holds as one mask leaf.

  :class:`jasp.packing.PackedMask` derives from it, so that the tree helpers
  here treat it as a leaf without this module importing the packing layer.
  A subclass has ``shape`` (the mask's shape).
  """

  __slots__ = ()


def is_mask_leaf(x) -> bool:
  """None or a :class:`MaskLeaf` (a :class:`jasp.packing.PackedMask`): leaves of a
  masks pytree besides arrays."""
  return x is None or isinstance(x, MaskLeaf)


def leaves_by_path(tree: PyTree, *, keep_none: bool = False) -> dict[str, Any]:
  """Flattens ``tree`` to ``{path string: leaf}`` (None leaves kept when asked)."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_mask_leaf if keep_none else None)
  out = {}
  for path, leaf in flat:
    out[path_str(path)] = leaf
  return out


def map_with_path(fn: Callable[[str, Any], Any], tree: PyTree) -> PyTree:
  """``tree_map`` that passes each leaf's path string; keeps ``tree``'s structure."""
  return jax.tree_util.tree_map_with_path(lambda p, x: fn(path_str(p), x), tree)


def align(masks: PyTree, target: PyTree, *, what: str = "masks") -> list:
  """The mask for each leaf of ``target``, in ``target``'s flatten order.

  Matching is by path string, so masks built from an ``nnx.State`` of Variables
  align with the pure arrays that optax sees. Every leaf of ``target`` needs an
  entry (``None`` for dense) and every mask needs a leaf of the same shape.

  Raises:
    ValueError: naming the first path that is missing on either side, or whose
      shapes differ.
    TypeError: naming the path of a mask that is not a bool array or a
      :class:`jasp.PackedMask`, or of a masked leaf that is not an array.
  """
  by_path = leaves_by_path(masks, keep_none=True)
  flat = jax.tree_util.tree_flatten_with_path(target)[0]
  seen = set()
  out = []
  for path, leaf in flat:
    p = path_str(path)
    if p not in by_path:
      raise ValueError(
        f"{what} have no entry for the leaf '{p}' (shape {getattr(leaf, 'shape', None)}); "
        f"the {what} tree must mirror the params tree (None for dense leaves)."
      )
    mask = by_path[p]
    seen.add(p)
    if mask is not None and not isinstance(mask, MaskLeaf):
      dtype = getattr(mask, "dtype", None)
      if dtype is None or not hasattr(mask, "shape"):
        raise TypeError(
          f"the mask for '{p}' is a {type(mask).__name__}, not an array; a mask is "
          "a bool array, a jasp.PackedMask or None (dense)."
        )
      if not is_bool_dtype(dtype):
        raise TypeError(
          f"the mask for '{p}' has dtype {dtype}; masks are bool arrays (True = "
          "kept): pass mask.astype(bool), or the masks from jasp.compute_masks."
        )
    if mask is not None and not (hasattr(leaf, "shape") and hasattr(leaf, "dtype")):
      raise TypeError(f"the leaf '{p}' has a mask but is a {type(leaf).__name__}, not an array.")
    if mask is not None and tuple(mask.shape) != tuple(getattr(leaf, "shape", ())):
      raise ValueError(
        f"the mask for '{p}' has shape {tuple(mask.shape)} but the leaf has shape "
        f"{tuple(getattr(leaf, 'shape', ()))}."
      )
    out.append(mask)
  extra = [p for p in by_path if p not in seen]
  if extra:
    raise ValueError(
      f"{what} have an entry '{extra[0]}' with no matching leaf in the params tree"
      + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
      + "."
    )
  return out


def unbox(tree: PyTree) -> PyTree:
  """Replaces ``nnx.Variable`` nodes by their values (a no-op for plain trees)."""
  try:
    from flax import nnx
  except ImportError:  # pragma: no cover
    return tree
  return jax.tree_util.tree_map(
    lambda x: x.get_value() if isinstance(x, nnx.Variable) else x,
    tree,
    is_leaf=lambda x: is_mask_leaf(x) or isinstance(x, nnx.Variable),
  )
