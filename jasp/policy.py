"""Which leaves are pruned, along which axes: the pruning policy.

A :class:`Policy` turns each leaf's :class:`~jasp.layouts.Layout` into a
:class:`Decision`. The default prunes every matmul/conv weight whose group axis
divides by ``m``; options follow apex ASP's (``allowed_layer_names``,
``disallowed_layer_names``, its tensor-core size rule, custom rules) but are
pure data: no global state.
"""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any

import numpy as np

from jasp import _tree
from jasp import layouts as layouts_lib
from jasp._nm_core import group_axes

__all__ = ["Policy", "Decision", "plan", "as_patterns", "check_layouts"]


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

  A single string for ``include`` or ``exclude`` is one pattern (not a
  sequence of one-character patterns); both are stored as tuples. Every
  pattern is compiled when the policy is made.

  Raises:
    ValueError: a pattern of ``include``, ``exclude`` or a key of ``axes`` is
      not a valid regular expression (naming the field and the pattern).
    TypeError: a pattern is neither a string nor a compiled ``re.Pattern``,
      ``axes`` is not a mapping, or ``rule`` is not callable.
  """

  include: Sequence[str] = ()
  exclude: Sequence[str] = ()
  axes: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  tensor_core_sizes: bool = False
  rule: Rule | None = None

  def __post_init__(self):
    object.__setattr__(self, "include", as_patterns(self.include, "Policy.include"))
    object.__setattr__(self, "exclude", as_patterns(self.exclude, "Policy.exclude"))
    axes = {} if self.axes is None else self.axes
    if not isinstance(axes, Mapping):
      raise TypeError(
        f"Policy.axes must be a mapping {{regex: axis}}, got {type(axes).__name__} {axes!r}."
      )
    for pattern in axes:
      as_patterns(pattern, "Policy.axes")
    object.__setattr__(self, "axes", dict(axes))
    if self.rule is not None and not callable(self.rule):
      raise TypeError(
        f"Policy.rule must be a callable rule(path, leaf, decision) or None, "
        f"got {type(self.rule).__name__} {self.rule!r}."
      )


def as_patterns(
  value: str | re.Pattern | Iterable[str | re.Pattern] | None, field: str
) -> tuple[str | re.Pattern, ...]:
  """Normalises a regex option to a tuple of patterns, compiling each to check it.

  Args:
    value: None (no pattern), one pattern (a string or a compiled
      ``re.Pattern``: never read character by character) or an iterable of them.
    field: the option's name, for the error messages (``"Policy.include"``).

  Returns:
    A tuple of the patterns, as given.

  Raises:
    ValueError: naming ``field`` and the pattern that is not a valid regular expression.
    TypeError: naming ``field`` when an entry is neither a string nor an ``re.Pattern``.
  """
  if value is None:
    return ()
  if isinstance(value, (str, re.Pattern)):
    items = (value,)
  elif isinstance(value, Iterable) and not isinstance(value, (bytes, Mapping)):
    items = tuple(value)
  else:
    raise TypeError(
      f"{field} must be a regular expression or a sequence of them, got "
      f"{type(value).__name__} {value!r}."
    )
  for pattern in items:
    if isinstance(pattern, re.Pattern):
      continue
    if not isinstance(pattern, str):
      raise TypeError(
        f"{field} holds {pattern!r} ({type(pattern).__name__}); each pattern must "
        "be a string (a regular expression) or a compiled re.Pattern."
      )
    try:
      re.compile(pattern)
    except re.error as e:
      raise ValueError(
        f"{field} holds {pattern!r}, which is not a valid regular expression: {e}."
      ) from None
  return items


def _size(shape, axes) -> int:
  return math.prod(int(shape[a]) for a in axes) if axes else 1


def size_reason(shape: tuple[int, ...], axis: tuple[int, ...], m: int) -> str:
  """The reason a weight of ``shape`` stays dense when its input size is not a multiple of m."""
  return f"input size {_size(shape, axis)} (axes {axis}) is not a multiple of m={m}"


def skipped_for_size(d: Decision, shape: tuple[int, ...], m: int) -> bool:
  """Whether ``d`` keeps a weight dense only because its input size is not a multiple of ``m``."""
  return (
    not d.prune
    and d.axis is not None
    and _size(shape, d.axis) % m != 0
    and d.reason == size_reason(shape, d.axis, m)
  )


def _norm_axes(axis, nd: int) -> tuple[int, ...]:
  return group_axes(nd, axis)


def _check_layout(path: str, shape: tuple[int, ...], layout: Any) -> None:
  """Raises when ``layout`` is not a Layout or names axes that ``shape`` does not have."""
  if not isinstance(layout, layouts_lib.Layout):
    raise TypeError(
      f"layouts['{path}'] is {layout!r} ({type(layout).__name__}), not a jasp.Layout; pass "
      "layouts=jasp.trace_layouts(...), and choose axes with jasp.Policy(axes={regex: axis})."
    )
  if layout.axis is None:
    return
  nd = len(shape)
  named = tuple(layout.axis) + tuple(layout.out_axes)
  bad = [a for a in named if not isinstance(a, (int, np.integer)) or not -nd <= a < nd]
  if bad or not layout.axis:
    raise ValueError(
      f"the layout of '{path}' (axis {layout.axis}, out_axes {layout.out_axes}) does not fit "
      f"the leaf's shape {shape} (rank {nd}): the layouts describe another tree. Trace the "
      "tree you prune: layouts=jasp.trace_layouts(model.apply, variables, x)."
    )


def _tensor_core_ok(shape: tuple[int, ...], axis, out_axes) -> bool:
  """apex's size rule: ``out % 8 == 0`` and ``in % 16 == 0``."""
  return (_size(shape, out_axes) % 8 == 0) and (_size(shape, axis) % 16 == 0)


def _from_layout(path: str, shape: tuple[int, ...], layout: Any, policy: Policy) -> Decision:
  """The decision the (checked) layout gives, with the first matching ``policy.axes`` override."""
  _check_layout(path, shape, layout)
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
  tc = None if axis is None else _tensor_core_ok(shape, axis, out_axes)
  return Decision(path, axis is not None, axis, out_axes, reason, source, tc)


# The rules that keep dense a weight its layout would prune, tried in order: each gives the
# reason, or "" when it does not apply.


def _not_included(path: str, shape: tuple, d: Decision, m: int, policy: Policy) -> str:
  if policy.include and not any(re.search(p, path) for p in policy.include):
    return "not matched by policy.include"
  return ""


def _excluded(path: str, shape: tuple, d: Decision, m: int, policy: Policy) -> str:
  return "matched by policy.exclude" if any(re.search(p, path) for p in policy.exclude) else ""


def _input_size(path: str, shape: tuple, d: Decision, m: int, policy: Policy) -> str:
  return size_reason(shape, d.axis, m) if _size(shape, d.axis) % m else ""


def _tensor_core_size(path: str, shape: tuple, d: Decision, m: int, policy: Policy) -> str:
  if policy.tensor_core_sizes and not d.tensor_core_ok:
    return (
      f"tensor-core size rule: out={_size(shape, d.out_axes)} (needs % 8), "
      f"in={_size(shape, d.axis)} (needs % 16)"
    )
  return ""


_KEEP_DENSE = (_not_included, _excluded, _input_size, _tensor_core_size)


def _filtered(d: Decision, shape: tuple[int, ...], m: int, policy: Policy) -> Decision:
  """``d``, kept dense by the first rule of :data:`_KEEP_DENSE` that applies to it."""
  if not d.prune:
    return d
  for rule in _KEEP_DENSE:
    reason = rule(d.path, shape, d, m, policy)
    if reason:
      return dataclasses.replace(d, prune=False, reason=reason)
  return d


def _rule_axis(r: Any, path: str, shape: tuple[int, ...], m: int) -> Decision:
  """The decision when ``policy.rule`` returned an axis: prune along it."""
  nd = len(shape)
  try:
    ax = _norm_axes(r, nd)
  except ValueError as e:
    raise ValueError(
      f"policy.rule returned the axis {r!r} for '{path}' (shape {shape}): {e}"
    ) from None
  except TypeError:
    raise TypeError(
      f"policy.rule returned {r!r} ({type(r).__name__}) for '{path}' (shape "
      f"{shape}); a rule returns a jasp.Decision, an axis (an int or a run of "
      "ints), True (keep the decision), or False/None (keep dense)."
    ) from None
  if _size(shape, ax) % m:
    raise ValueError(
      f"policy.rule chose axis {ax} for '{path}' (shape {shape}), whose "
      f"size {_size(shape, ax)} is not a multiple of m={m}."
    )
  outs = tuple(a for a in range(nd) if a not in ax)[-1:]
  return Decision(path, True, ax, outs, "", "rule", _tensor_core_ok(shape, ax, outs))


def _ruled(d: Decision, r: Any, shape: tuple[int, ...], m: int) -> Decision:
  """The decision after ``policy.rule`` returned ``r`` for ``d``."""
  if isinstance(r, Decision):
    return r
  if r is False or r is None:
    return dataclasses.replace(d, prune=False, reason=d.reason or "kept dense by policy.rule")
  if r is True:
    return d
  return _rule_axis(r, d.path, shape, m)


def decide(path: str, leaf: Any, m: int, layout: layouts_lib.Layout, policy: Policy) -> Decision:
  """The decision for one leaf (pure: looks only at shapes, dtypes and paths).

  Raises:
    TypeError: ``layout`` is not a :class:`jasp.Layout`, or ``policy.rule``
      returned something that is not a decision, a bool, None or an axis.
    ValueError: the layout, an axis override or the rule's axis does not fit
      the leaf's shape (naming the path and shape).
  """
  shape = tuple(np.shape(leaf))
  d = _filtered(_from_layout(path, shape, layout, policy), shape, m, policy)
  if policy.rule is not None:
    d = _ruled(d, policy.rule(path, leaf, d), shape, m)
  if d.prune and not d.reason and d.source == "":
    d = dataclasses.replace(d, source="trace")
  return d


def check_layouts(leaves: Mapping[str, Any], layouts: Any, *, warn: bool = True) -> None:
  """Checks that ``layouts`` describes the tree whose leaves are ``leaves``.

  Layouts are matched to leaves by path string. When no leaf matches (the
  layouts were traced on another tree, e.g. the whole linen variables dict
  while ``variables["params"]`` is pruned, or ``layouts={}``), nothing would be
  pruned; that is an error. When only some leaves match, the others stay dense
  ("absent from the given layouts"), which is right for state outside the
  traced collection (an nnx module's ``BatchStat`` or RNG state when the
  layouts come from ``trace_layouts(module, x)``); a warning is issued only
  when an unmatched leaf looks like a matmul/conv weight by flax's naming
  conventions (a ``kernel``), since leaving it dense is then probably a
  mistake. Extra layout entries (leaves of the traced model that are not in
  this tree) are fine.

  Args:
    leaves: ``{path string: leaf}`` of the tree (``jasp._tree.leaves_by_path``).
    layouts: None (nothing to check) or a ``{path: Layout}`` mapping.
    warn: whether to warn about unmatched leaves that look like weights (off
      where such leaves fall back to the conventions instead of staying dense).

  Raises:
    TypeError: ``layouts`` is not a mapping.
    ValueError: no leaf path of the tree is a key of ``layouts``; the message
      says which leading path component differs when one does.
  """
  if layouts is None:
    return
  if not isinstance(layouts, Mapping):
    raise TypeError(
      f"layouts must be a {{path: Layout}} mapping (from jasp.trace_layouts), got "
      f"{type(layouts).__name__}; pass layouts=None to use flax's naming conventions."
    )
  if not leaves:
    return
  missing = [p for p in leaves if p not in layouts]
  if len(missing) < len(leaves):
    weights = [p for p in missing if layouts_lib.convention_layout(p, leaves[p]).axis is not None]
    if weights and warn:
      warnings.warn(
        f"{len(weights)} leaf(s) that look like matmul/conv weights are absent from the given "
        f"layouts and stay dense: {_some(weights)}. Trace the tree you prune "
        "(jasp.trace_layouts(model.apply, variables, x)) so that every weight has a layout.",
        stacklevel=3,
      )
    return
  first = next(iter(leaves))
  if not layouts:
    raise ValueError(
      f"layouts is empty, so none of the {len(leaves)} leaves (e.g. '{first}') has a layout "
      "and nothing would be pruned. Pass layouts=jasp.trace_layouts(...) of this model, or "
      "layouts=None to use flax's naming conventions."
    )
  hint = _prefix_hint(list(leaves), [k for k in layouts if isinstance(k, str)])
  raise ValueError(
    f"none of the {len(leaves)} leaf paths of the tree is a key of layouts ({len(layouts)} "
    f"entries), so nothing would be pruned: the tree has e.g. '{first}', the layouts "
    f"'{next(iter(layouts))}'. {hint}"
  )


def _some(paths: Sequence[str], k: int = 3) -> str:
  shown = ", ".join(f"'{p}'" for p in paths[:k])
  return shown + (f" and {len(paths) - k} more" if len(paths) > k else "")


def _prefix_hint(tree_paths: list[str], layout_paths: list[str]) -> str:
  """How the two sets of paths differ when one is the other under a common prefix."""
  tree_set, layout_set = set(tree_paths), set(layout_paths)

  def prefix(longer: list[str], shorter: set[str]) -> str | None:
    for p in longer:
      parts = p.split("/")
      for k in range(1, len(parts)):
        if "/".join(parts[k:]) in shorter:
          return "/".join(parts[:k]) + "/"
    return None

  extra = prefix(layout_paths, tree_set)
  if extra is not None:
    return (
      f"The layouts' paths start with '{extra}' and the tree's do not: the layouts were "
      f"traced on a larger tree (e.g. the whole linen variables dict while "
      f"variables['{extra[:-1]}'] is pruned). Prune the tree you traced, or trace the "
      "tree you prune."
    )
  missing = prefix(tree_paths, layout_set)
  if missing is not None:
    return (
      f"The tree's paths start with '{missing}' and the layouts' do not: the layouts were "
      f"traced on a sub-tree (e.g. variables['{missing[:-1]}']) while the whole tree is "
      "pruned. Prune the tree you traced, or trace the tree you prune."
    )
  return (
    "The layouts come from another model or tree; trace the tree you prune: "
    "layouts=jasp.trace_layouts(model.apply, variables, x) (nnx: "
    "jasp.trace_layouts(module, x) with nnx.state(module, nnx.Param))."
  )


def plan(
  params: Any,
  m: int = 4,
  *,
  layouts: Mapping[str, layouts_lib.Layout] | None = None,
  policy: Policy | None = None,
) -> dict[str, Decision]:
  """Decides, for every leaf of ``params``, whether and along which axes it is pruned.

  Args:
    params: a params pytree (flax linen variables, ``nnx.State``, any pytree).
    m: the group size.
    layouts: ``{path: Layout}`` from :func:`jasp.trace_layouts`; None uses flax's
      naming conventions (:func:`jasp.layouts.convention_layout`). Matched to
      the leaves by path (see :func:`check_layouts`): it must describe this
      tree; leaves absent from it stay dense.
    policy: a :class:`Policy`; None for the default.

  Returns:
    ``{path string: Decision}`` in the params' flatten order.

  Raises:
    ValueError: ``m < 2``; no leaf path of ``params`` is a key of ``layouts``
      (naming the prefix that differs, when one does); a layout or axis
      override does not fit its leaf (naming the path).
    TypeError: ``m`` is not an int, ``policy`` is not a :class:`Policy`,
      ``layouts`` is not a mapping or one of its values is not a Layout.
  """
  if isinstance(m, bool) or not isinstance(m, (int, np.integer)):
    raise TypeError(f"m must be an int, got {m!r} ({type(m).__name__}).")
  if m < 2:
    raise ValueError(f"N:M sparsity needs m >= 2, got m={m}.")
  policy = Policy() if policy is None else policy
  if not isinstance(policy, Policy):
    raise TypeError(
      f"policy must be a jasp.Policy, got {type(policy).__name__} {policy!r}; "
      "e.g. policy=jasp.Policy(exclude=['head'])."
    )
  leaves = _tree.leaves_by_path(params)
  check_layouts(leaves, layouts)
  out = {}
  for path, leaf in leaves.items():
    layout = layouts_lib.resolve(path, leaf, layouts)
    out[path] = decide(path, leaf, m, layout, policy)
  return out
