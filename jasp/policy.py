"""Which leaves are pruned, along which axes: the pruning policy.

A :class:`Policy` turns each leaf's :class:`~jasp.layouts.Layout` into a
:class:`Decision`. The default prunes every matmul/conv weight whose group axis
divides by ``m``; options follow apex ASP's (``allowed_layer_names``,
``disallowed_layer_names``, its tensor-core size rule, custom rules) but are
pure data: no global state.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any

import numpy as np

from jasp import layouts as layouts_lib

__all__ = ["Policy", "Decision", "plan"]


@dataclasses.dataclass(frozen=True)
class Decision:
  """What happens to one leaf.

  Attributes:
    path: the leaf's path string.
    prune: True when the leaf gets an N:M mask.
    axis: the group axes (consecutive, flattened row-major) when pruned.
    out_axes: the weight's output-channel axes (for transposable masks and the
      tensor-core size rule).
    reason: why the leaf stays dense, or notes on a pruned one.
    source: where the axis came from: ``trace``, ``convention``, ``override``
      or ``rule``.
    tensor_core_ok: whether apex's size rule (``out % 8 == 0`` and
      ``in % 16 == 0``) holds; None when not a weight.
  """
  path: str
  prune: bool
  axis: tuple[int, ...] | None = None
  out_axes: tuple[int, ...] = ()
  reason: str = ""
  source: str = ""
  tensor_core_ok: bool | None = None


Rule = Callable[[str, Any, Decision], "Decision | int | Sequence[int] | None | bool"]


@dataclasses.dataclass(frozen=True)
class Policy:
  """Options of the pruning policy (all optional).

  Attributes:
    include: regular expressions; when given, only leaves whose path matches
      one (``re.search``) are pruned (apex ``allowed_layer_names``).
    exclude: regular expressions; a leaf whose path matches one stays dense
      (apex ``disallowed_layer_names``).
    axes: ``{regex: axis}``: the group axis for matching leaves, overriding
      the trace or convention (an int or a run of consecutive ints).
    tensor_core_sizes: apex's eligibility rule: prune only weights with
      ``out % 8 == 0`` and ``in % 16 == 0`` (``in`` = the group axes' size,
      ``out`` = the output axes' size), the sizes sparse tensor cores
      accelerate. Off by default; the report always shows the verdict.
    rule: ``rule(path, leaf, decision)`` called last for every leaf. It may
      return a new :class:`Decision`, an axis (prune along it), ``False`` or
      ``None`` (keep dense), ``True`` (keep the decision).
  """
  include: Sequence[str] = ()
  exclude: Sequence[str] = ()
  axes: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  tensor_core_sizes: bool = False
  rule: Rule | None = None


def _size(shape, axes) -> int:
  return int(np.prod([shape[a] for a in axes], dtype=np.int64)) if axes else 1


def _norm_axes(axis, nd: int) -> tuple[int, ...]:
  from jasp.masks import group_axes  # pylint: disable=g-import-not-at-top
  return group_axes(nd, axis)


def decide(path: str, leaf: Any, m: int, layout: layouts_lib.Layout,
           policy: Policy) -> Decision:
  """The decision for one leaf (pure: looks only at shapes, dtypes and paths)."""
  shape = tuple(np.shape(leaf))
  nd = len(shape)
  axis, out_axes, source = layout.axis, tuple(layout.out_axes), layout.source
  reason = layout.reason
  for pattern, ax in policy.axes.items():
    if re.search(pattern, path):
      try:
        axis = _norm_axes(ax, nd)
      except (ValueError, TypeError) as e:
        raise ValueError(f"axis override {ax!r} for '{path}' (shape {shape}): {e}") from None
      if not out_axes or set(out_axes) & set(axis):
        out_axes = tuple(a for a in range(nd) if a not in axis)[-1:]
      source, reason = "override", ""
      break
  tc = None
  if axis is not None:
    k, o = _size(shape, axis), _size(shape, out_axes)
    tc = (o % 8 == 0) and (k % 16 == 0)
  d = Decision(path, axis is not None, axis, out_axes, reason, source, tc)
  if d.prune:
    k = _size(shape, axis)
    if policy.include and not any(re.search(p, path) for p in policy.include):
      d = dataclasses.replace(d, prune=False, reason="not matched by policy.include")
    elif any(re.search(p, path) for p in policy.exclude):
      d = dataclasses.replace(d, prune=False, reason="matched by policy.exclude")
    elif k % m:
      d = dataclasses.replace(
          d, prune=False,
          reason=f"input size {k} (axes {axis}) is not a multiple of m={m}")
    elif policy.tensor_core_sizes and not tc:
      d = dataclasses.replace(
          d, prune=False,
          reason=f"tensor-core size rule: out={_size(shape, out_axes)} (needs % 8), in={k} (needs % 16)")
  if policy.rule is not None:
    r = policy.rule(path, leaf, d)
    if isinstance(r, Decision):
      d = r
    elif r is False or r is None:
      d = dataclasses.replace(d, prune=False, reason=d.reason or "kept dense by policy.rule")
      if d.axis is not None and not d.reason:
        d = dataclasses.replace(d, reason="kept dense by policy.rule")
    elif r is True:
      pass
    else:
      ax = _norm_axes(r, nd)
      if _size(shape, ax) % m:
        raise ValueError(f"policy.rule chose axis {ax} for '{path}' (shape {shape}), whose "
                         f"size {_size(shape, ax)} is not a multiple of m={m}.")
      outs = tuple(a for a in range(nd) if a not in ax)[-1:]
      d = Decision(path, True, ax, outs, "", "rule",
                   (_size(shape, outs) % 8 == 0) and (_size(shape, ax) % 16 == 0))
  if d.prune and not d.reason and d.source == "":
    d = dataclasses.replace(d, source="trace")
  return d


def plan(params: Any, m: int = 4, *, layouts: Mapping[str, layouts_lib.Layout] | None = None,
         policy: Policy | None = None) -> dict[str, Decision]:
  """Decides, for every leaf of ``params``, whether and along which axes it is pruned.

  Args:
    params: a params pytree (flax linen variables, ``nnx.State``, any pytree).
    m: the group size.
    layouts: ``{path: Layout}`` from :func:`jasp.trace_layouts`; None uses flax's
      naming conventions (:func:`jasp.layouts.convention_layout`).
    policy: a :class:`Policy`; None for the default.

  Returns:
    ``{path string: Decision}`` in the params' flatten order.
  """
  from jasp import _tree  # pylint: disable=g-import-not-at-top
  policy = policy or Policy()
  out = {}
  for path, leaf in _tree.leaves_by_path(params).items():
    layout = layouts_lib.resolve(path, leaf, layouts)
    out[path] = decide(path, leaf, m, layout, policy)
  return out
