"""One calling convention for the exporters: a pure ``apply(params, *inputs)``.

The exporters accept what :func:`jasp.trace_layouts` accepts:

* linen or any function: ``(model.apply, variables, *inputs)`` (a linen
  ``Module`` instance stands for its ``apply``);
* nnx: ``(module, *inputs)``: the module is split into its graph and its state,
  and the state (every variable, ``nnx.Param`` and the rest) becomes the params.

Either way the result names each leaf by the path string that
:func:`jasp.prune` and :func:`jasp.trace_layouts` use.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from jasp import _model as model_lib
from jasp import _tree
from jasp import layouts as layouts_lib
from jasp.export import _nm
from jasp.typing import PyTree

__all__ = ["Bound", "bind"]


@dataclasses.dataclass(frozen=True)
class Bound:
  """A model reduced to a pure function of (params, inputs).

  Attributes:
    apply: ``apply(params, *inputs) -> outputs`` (jittable, no side effects).
    params: the params pytree (arrays only).
    inputs: the example inputs.
    layouts: ``{path: Layout}`` traced from the model (see
      :func:`jasp.trace_layouts`); leaves outside the traced collection (an nnx
      module's non-``Param`` state) are absent.
  """

  apply: Callable[..., Any]
  params: PyTree
  inputs: tuple
  layouts: dict[str, layouts_lib.Layout]

  def paths(self) -> list[str]:
    return list(_tree.leaves_by_path(self.params))


def bind(fn: Callable[..., Any] | Any, params: PyTree, args: tuple) -> Bound:
  """Normalises the exporters' ``(fn, params, *args)`` call forms (see the module doc)."""
  model, inputs = model_lib.adapt(fn, params, args, state=True, what="export")
  if not inputs:
    raise TypeError(
      "export needs example inputs: export(fn, params, *inputs) or export(nnx_module, *inputs)."
    )
  layouts = layouts_lib.trace_layouts(fn, params, *args)
  return Bound(lambda p, *xs: model.apply(p, *xs), _tree.unbox(model.tree), inputs, layouts)


def pruned_paths(bound: Bound, masks: PyTree | None, n: int, m: int) -> dict[str, bool]:
  """``{path: pruned}`` for the traced matmul/conv weights of ``bound``.

  With ``masks``, a weight is pruned when its mask is not None (masks of the
  whole variables dict or of its ``params`` collection; masks of an
  ``nnx.State`` of ``Param`` match the module's paths). Without, when it *is*
  N:M along its traced axes and holds zeros (what :func:`jasp.prune` left).

  Raises:
    ValueError: a mask whose shape differs from its weight's, or masks none of
      whose paths name a leaf of the model.
  """
  leaves = _tree.leaves_by_path(bound.params)
  by_mask = _tree.leaves_by_path(masks, keep_none=True) if masks is not None else None
  if by_mask is not None:
    _check_masks(by_mask, leaves)
  out = {}
  for path, layout in bound.layouts.items():
    if layout.axis is None or path not in leaves:
      continue
    if by_mask is not None:
      mk = by_mask.get(path, by_mask.get(path.split("/", 1)[-1]))
      out[path] = mk is not None
      continue
    w = jax.device_get(leaves[path])
    s = _nm.nm_stats(w, layout.axis, n, m)
    out[path] = bool(s.applicable and s.nm and _nm.zero_fraction(w) > 0)
  return out


def _check_masks(by_mask: dict, leaves: dict) -> None:
  """Masks must name the model's leaves (whole tree or ``params`` collection), shapes equal."""

  def leaf_of(path):
    if path in leaves:
      return leaves[path]
    return leaves.get("params/" + path)

  matched = 0
  for path, mk in by_mask.items():
    leaf = leaf_of(path)
    if leaf is None:
      continue
    matched += 1
    if mk is not None and tuple(np.shape(mk)) != tuple(np.shape(leaf)):
      raise ValueError(
        f"the mask for '{path}' has shape {tuple(np.shape(mk))} but the weight "
        f"has shape {tuple(np.shape(leaf))}: pass the masks that jasp.prune "
        "returned for these params."
      )
  if by_mask and not matched:
    some = ", ".join(list(by_mask)[:3])
    raise ValueError(
      f"none of the masks' paths ({some}, ...) names a leaf of the exported "
      f"model (e.g. {next(iter(leaves), '-')}): pass the masks of these params."
    )
