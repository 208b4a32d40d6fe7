"""One-shot pruning of a whole params pytree: masks, application, both at once.

``params`` is any pytree: a flax ``linen`` variables dict (``{"params": ...,
"batch_stats": ...}``), an ``nnx.State`` (``nnx.state(model, nnx.Param)``) or a
plain dict. ``masks`` mirrors it: a bool array of the leaf's shape where the
leaf is pruned, ``None`` where it stays dense.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from jasp import _dispatch
from jasp import _tree
from jasp import layouts as layouts_lib
from jasp import masks as masks_lib
from jasp import packing
from jasp import policy as policy_lib
from jasp import sharding
from jasp.typing import Pattern
from jasp.typing import PyTree
from jasp.typing import ScoreFn

__all__ = ["compute_masks", "apply_masks", "prune"]


# The per-leaf helpers are jitted so that leaves of one shape share one traced and lowered
# mask computation; ``in_force`` (the mask implementation in force when ``impl`` is None,
# which the helpers read at trace time) only keys their trace caches.


@functools.partial(jax.jit, static_argnames=("n", "m", "axis", "impl", "in_force"))
def _nm(w, n, m, axis, impl, in_force):
  del in_force
  return masks_lib.nm_mask(w, n, m, axis, impl=impl)


@functools.partial(jax.jit, static_argnames=("n", "m", "axis", "impl", "in_force"))
def _nm_prune(w, n, m, axis, impl, in_force):
  del in_force
  return masks_lib.nm_prune(w, n, m, axis, impl=impl, with_mask=True)


@functools.partial(jax.jit, static_argnames=("n", "m", "axis"))
def _nm_scores(s, n, m, axis):
  # A NaN score ranks as the largest (kept), as a NaN weight does in jasp.nm_mask: a
  # non-finite weight that reaches this point (under jit) stays visible in the pruned params.
  s = jnp.asarray(s)
  return masks_lib.topn_mask(jnp.where(jnp.isnan(s), jnp.inf, s), n, m, axis)


@functools.partial(jax.jit, static_argnames=("n", "m", "axis", "out_axes", "method", "in_force"))
def _nm2d(w, n, m, axis, out_axes, method, in_force):
  del in_force
  # View the weight as (..., K, ..., O, ...) with each run of axes merged by a
  # free reshape, then cut m x m blocks over (K, O).
  shape = w.shape
  runs = sorted([axis, out_axes], key=lambda r: r[0])
  new_shape, pos, i = [], {}, 0
  while i < len(shape):
    run = next((r for r in runs if r[0] == i), None)
    if run is not None:
      pos[run] = len(new_shape)
      new_shape.append(int(np.prod([shape[a] for a in run])))
      i = run[-1] + 1
    else:
      new_shape.append(shape[i])
      i += 1
  mask = masks_lib.nm_mask_2d(w.reshape(new_shape), n, m, pos[axis], pos[out_axes], method=method)
  return mask.reshape(shape)


def _is_traced(x) -> bool:
  return _tree.is_tracer(x)


def _leaf_mask(
  path: str,
  w: jax.Array,
  d: policy_lib.Decision,
  n: int,
  m: int,
  pattern: Pattern,
  score_fn: ScoreFn | None,
  impl,
  in_force,
) -> jax.Array:
  axis = d.axis
  if callable(pattern):
    mask = jnp.asarray(pattern(w, n, m, axis if len(axis) > 1 else axis[0]))
    if mask.shape != w.shape:
      raise ValueError(
        f"the custom pattern returned shape {mask.shape} for '{path}' (shape {w.shape})."
      )
    return mask.astype(bool)
  if pattern == "nm":
    if score_fn is not None:
      s = jnp.asarray(score_fn(path, w))
      if s.shape != w.shape:
        raise ValueError(f"score_fn returned shape {s.shape} for '{path}' (shape {w.shape}).")
      return _nm_scores(s, n, m, axis)
    return _nm(w, n, m, axis, impl, in_force)
  if pattern in ("2d_best", "2d_greedy"):
    out = tuple(d.out_axes)
    if not out or set(out) & set(axis) or out != tuple(range(out[0], out[0] + len(out))):
      raise ValueError(
        f"'{path}' (shape {w.shape}) has no single run of output axes "
        f"({out}) to form {m}x{m} transposable blocks with axes {axis}."
      )
    osize = int(np.prod([w.shape[a] for a in out]))
    if osize % m:
      raise ValueError(
        f"transposable masks need the output size of '{path}' (shape "
        f"{w.shape}, axes {out}) = {osize} to be a multiple of m={m}."
      )
    return _nm2d(w, n, m, axis, out, pattern[3:], in_force)
  raise ValueError(f"pattern must be 'nm', '2d_best', '2d_greedy' or a callable, got {pattern!r}.")


def compute_masks(
  params: PyTree,
  n: int = 2,
  m: int = 4,
  *,
  layouts: Mapping[str, layouts_lib.Layout] | None = None,
  policy: policy_lib.Policy | None = None,
  pattern: Pattern = "nm",
  score_fn: ScoreFn | None = None,
  impl: Literal["xla", "pallas"] | None = None,
  packed: bool = False,
) -> PyTree:
  """N:M masks for every prunable leaf of ``params``.

  Args:
    params: params pytree (linen variables, ``nnx.State``, any pytree of arrays).
    n, m: keep ``n`` of every ``m`` along each weight's reduction axis.
    layouts: ``{path: Layout}`` from :func:`jasp.trace_layouts` (recommended:
      exact for any module) of this very tree, matched by path: layouts that
      match no leaf are an error, leaves absent from them stay dense (with a
      warning when they look like weights; see :func:`jasp.policy.plan`). None uses
      flax's naming conventions.
    policy: which leaves to prune and along which axes (:class:`jasp.Policy`).
    pattern: ``"nm"`` (magnitude, :func:`jasp.nm_mask`), ``"2d_best"`` /
      ``"2d_greedy"`` (transposable, :func:`jasp.nm_mask_2d`), or a callable
      ``pattern(w, n, m, axis) -> bool mask`` (apex's ``mask_calculator``).
    score_fn: with ``pattern="nm"``: ``score_fn(path, w) -> scores`` of ``w``'s
      shape; the ``n`` largest scores per group are kept (e.g. Wanda's
      ``|W| * ||X||``). Default: ``|w|``.
    impl: mask implementation for ``"nm"`` (see :func:`jasp.nm_mask`).
    packed: return :class:`jasp.PackedMask` leaves (1 bit per weight, packed
      along each leaf's group axis) instead of bool arrays (1 byte per weight).

  Returns:
    A pytree with ``params``' structure: bool arrays (same shape as the leaf)
    or PackedMasks for pruned leaves, ``None`` for dense ones.

  Non-finite weights. Called on concrete arrays, a leaf to be pruned that
  holds NaN or Inf is an error (its values are read back to the host once,
  for the whole tree). Under ``jax.jit`` (or any trace) the values cannot be
  read, so there is no check and no error; the masks are then defined by the
  ranking rules of :mod:`jasp.masks`: NaN and +-Inf rank as the largest
  magnitudes and are kept (ties go to the lower index), and with
  ``score_fn`` a NaN score ranks largest too. A non-finite weight therefore
  stays in the pruned params, where it is visible, instead of being zeroed.
  The transposable patterns rank NaN as Inf, and blocks holding Inf keep the
  first candidate pattern that includes one.

  Raises:
    ValueError: a leaf to be pruned holds NaN or Inf (naming its path; concrete
      inputs only); no weight can be pruned because none has an input size
      that is a multiple of ``m`` (naming how many were skipped); invalid
      ``n``/``m`` or ``pattern``; a mismatch between ``layouts`` and
      ``params`` (see :func:`jasp.policy.plan`).
    TypeError: ``n``/``m`` are not ints; see :func:`jasp.policy.plan`.
  """
  masks, _ = _run(
    params,
    n,
    m,
    layouts=layouts,
    policy=policy,
    pattern=pattern,
    score_fn=score_fn,
    impl=impl,
    packed=packed,
    want_pruned=False,
  )
  return masks


def _body(cfg, n, m, pattern, score_fn, impl, packed, want_pruned, in_force, group, leaves):
  """The whole tree in one pass: masks, pruned weights (if wanted) and finiteness flags.

  Returns ``(masks, pruned, finite)``: ``finite`` is a bool vector with one entry
  per inexact leaf (in ``cfg`` order), True where the leaf holds no NaN/Inf.
  """
  masks, pruned, finite = [], [], []
  fused_at = _fused(cfg, leaves, n, m, impl, packed, want_pruned, pattern, score_fn, group)
  for k, ((path, d), w) in enumerate(zip(cfg, leaves)):
    fused = fused_at.get(k)
    if fused is not None:  # one kernel pass: pruned weight, mask and finiteness
      *pw, mask, ok = fused
      pruned += pw
      masks.append(mask)
      finite.append(jnp.all(ok != 0))  # the kernel's per-tile flags
      continue
    if jnp.issubdtype(w.dtype, jnp.inexact):
      finite.append(jnp.all(jnp.isfinite(w)))
    if want_pruned and pattern == "nm" and score_fn is None:
      # One pass: the pruned weight and its mask together (the Pallas kernel on a GPU).
      pw, mask = _nm_prune(w, n, m, d.axis, impl, in_force)
      pruned.append(pw)
    else:
      mask = _leaf_mask(path, w, d, n, m, pattern, score_fn, impl, in_force)
      if want_pruned:
        pruned.append(jnp.where(mask, w, jnp.zeros((), w.dtype)))
    masks.append(packing.pack(mask, d.axis) if packed else mask)
  return masks, pruned, jnp.stack(finite) if finite else jnp.ones((0,), bool)


#: Same-shaped leaves share kernel launches (:func:`jasp.kernels.nm_mosaic.nm_mosaic_many`)
#: when True. Exact (tests); off until its GPU timing shows fewer launches pay for
#: the kernel's one branch per leaf (``benchmarks/prune_bench.py``, "grouped").
_GROUP_SAME_SHAPES = False


def _fused(cfg, leaves, n, m, impl, packed, want_pruned, pattern, score_fn, group) -> dict:
  """``{position: ([pruned,] mask, finite)}`` for the leaves a kernel prunes in one pass.

  Each leaf is its own launch; with ``group``, leaves of one shape, dtype and
  group axis share launches.
  """
  if pattern != "nm" or score_fn is not None:
    return {}
  launches: dict = {}
  for k, ((_, d), w) in enumerate(zip(cfg, leaves)):
    axis = tuple(d.axis) if isinstance(d.axis, (list, tuple)) else d.axis
    key = (tuple(w.shape), jnp.dtype(w.dtype), axis) if group else k
    launches.setdefault(key, (axis, []))[1].append(k)
  out = {}
  for axis, ks in launches.values():
    ws = [leaves[k] for k in ks]
    fn = _dispatch.pallas_nm_fused_many(ws, n, m, axis, impl, weight=want_pruned, packed=packed)
    if fn is None:
      continue
    for k, o in zip(ks, fn()):
      o = list(o)
      if packed:
        shape = tuple(leaves[k].shape)
        o[-2] = packing.PackedMask(o[-2], shape, packing.packed_axes(shape, axis))
      out[k] = o
  return out


@functools.lru_cache(maxsize=32)
def _cached_program(cfg, n, m, pattern, score_fn, impl, packed, want_pruned, in_force, group):
  return jax.jit(
    functools.partial(
      _body, cfg, n, m, pattern, score_fn, impl, packed, want_pruned, in_force, group
    )
  )


def _program(cfg, n, m, pattern, score_fn, impl, packed, want_pruned, in_force, group):
  """One jitted XLA program for the whole tree (shared by plans of equal configuration).

  ``in_force`` is the mask implementation in force when ``impl`` is None (the context's
  choice, read where the masks are traced), so that each choice gets its own program;
  ``group``: :data:`_GROUP_SAME_SHAPES` when the plan was made.
  """
  args = (cfg, n, m, pattern, score_fn, impl, packed, want_pruned, in_force, group)
  try:
    return _cached_program(*args)
  except TypeError:  # an unhashable custom pattern, score_fn or rule-made Decision
    return jax.jit(functools.partial(_body, *args))


def _check_some_pruned(
  decisions: Mapping[str, policy_lib.Decision], shapes: Mapping[str, tuple], n: int, m: int
) -> None:
  """Raises when nothing is pruned and some weights were skipped for their input size.

  A policy that keeps every weight dense on purpose (``include``/``exclude``,
  the tensor-core rule, a rule) is not an error.
  """
  if any(d.prune for d in decisions.values()):
    return
  skipped = []
  for path, d in decisions.items():
    if policy_lib.skipped_for_size(d, shapes[path], m):
      k = int(np.prod([shapes[path][a] for a in d.axis], dtype=np.int64))
      skipped.append(f"'{path}' (shape {shapes[path]}, input size {k})")
  if skipped:
    shown = ", ".join(skipped[:3]) + (f" and {len(skipped) - 3} more" if len(skipped) > 3 else "")
    raise ValueError(
      f"nothing can be pruned {n}:{m}: {len(skipped)} matmul/conv weight(s) were skipped "
      f"because their input size is not a multiple of m={m}, and no other leaf is pruned: "
      f"{shown}. Choose an m that divides their input sizes (2:4 for sparse tensor cores)."
    )


def _check_options(pattern: Any, score_fn: Any) -> None:
  """Raises unless ``pattern`` is a known name or a callable and ``score_fn`` None or a callable."""
  if not (callable(pattern) or pattern in ("nm", "2d_best", "2d_greedy")):
    raise ValueError(
      f"pattern must be 'nm', '2d_best', '2d_greedy' or a callable, got {pattern!r}."
    )
  if score_fn is not None and not callable(score_fn):
    raise TypeError(
      f"score_fn must be a callable score_fn(path, w) -> scores, got "
      f"{type(score_fn).__name__} {score_fn!r}."
    )


def _check_prunable(path: str, leaf: Any) -> None:
  """Raises unless the leaf to prune is a jax or numpy array of real numbers."""
  if not hasattr(leaf, "shape") or not hasattr(leaf, "dtype"):
    raise TypeError(
      f"the leaf '{path}' is to be pruned but is a {type(leaf).__name__}, "
      "not an array; N:M masks need a jax or numpy array."
    )
  if not jnp.issubdtype(leaf.dtype, jnp.number) or jnp.issubdtype(leaf.dtype, jnp.complexfloating):
    raise TypeError(
      f"the leaf '{path}' (shape {tuple(leaf.shape)}) is to be pruned but "
      f"has dtype {leaf.dtype}; N:M masks rank real numbers."
    )


@dataclasses.dataclass(frozen=True, eq=False)
class _Plan:
  """What a call prunes, made once per tree structure, shapes and options.

  Attributes:
    todo: the flat indices of the leaves to prune.
    paths: their path strings.
    inexact: the positions in ``todo`` of the floating leaves (one finiteness flag each).
    program: the jitted program over ``[leaves[i] for i in todo]``.
    layout_items: the ``(path, Layout)`` pairs of the ``layouts`` the plan was made from
      (a later call's ``layouts`` must hold the very same objects to reuse the plan).
    reusable: False when making the plan warned (leaves absent from ``layouts``): such a
      plan is made again on every call, so that every call warns.
  """

  todo: tuple[int, ...]
  paths: tuple[str, ...]
  inexact: tuple[int, ...]
  program: Any
  layout_items: tuple | None
  reusable: bool


# Plans of recent calls, the newest last, keyed by :func:`_plan_key`.
_PLANS: dict = {}
_MAX_PLANS = 16


def _policy_key(policy: Any) -> Any:
  """A hashable summary of ``policy`` (raises TypeError when it has none)."""
  if policy is None:
    return None
  if type(policy) is not policy_lib.Policy or policy.rule is not None:
    raise TypeError("not cached: a rule sees the leaves themselves")
  axes = tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in policy.axes.items())
  return (policy.include, policy.exclude, axes, policy.tensor_core_sizes)


def _plan_key(treedef, leaves: list, layouts: Any, policy: Any, options: tuple) -> Any:
  """Everything a plan depends on besides the layouts' entries; None when not cacheable.

  Each leaf contributes its type, shape, dtype and sharding (the checks and decisions
  look at nothing else); ``layouts`` by identity (its entries are compared on a hit).
  """
  try:
    policy_key = _policy_key(policy)
  except TypeError:
    return None
  sig = tuple(
    (type(x), getattr(x, "shape", None), getattr(x, "dtype", None), getattr(x, "sharding", None))
    for x in leaves
  )
  return (treedef, sig, id(layouts), policy_key, options)


def _layout_items(layouts: Any) -> tuple | None:
  return None if layouts is None else tuple(layouts.items())


def _same_layouts(items: tuple | None, layouts: Any) -> bool:
  """Whether ``layouts`` still holds exactly the entries ``items`` (by identity)."""
  if items is None or layouts is None:
    return items is None and layouts is None
  missing = object()
  return len(layouts) == len(items) and all(layouts.get(k, missing) is v for k, v in items)


def _make_plan(params, leaves: list, n: int, m: int, layouts, policy, options: tuple) -> _Plan:
  """Decides every leaf, runs the checks that look at shapes, dtypes and shardings only.

  Raises as :func:`compute_masks` (all but the NaN/Inf check).
  """
  decisions = policy_lib.plan(params, m, layouts=layouts, policy=policy)
  paths = [_tree.path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  _check_some_pruned(decisions, {p: tuple(np.shape(x)) for p, x in zip(paths, leaves)}, n, m)
  todo = [i for i, p in enumerate(paths) if decisions[p].prune]
  for i in todo:
    _check_prunable(paths[i], leaves[i])
  for i in todo:
    sharding.check_groups_unsplit(leaves[i], decisions[paths[i]].axis, m, path=paths[i])
  cfg = tuple((paths[i], decisions[paths[i]]) for i in todo)
  inexact = [k for k, i in enumerate(todo) if jnp.issubdtype(leaves[i].dtype, jnp.inexact)]
  return _Plan(
    todo=tuple(todo),
    paths=tuple(paths[i] for i in todo),
    inexact=tuple(inexact),
    program=_program(cfg, n, m, *options),
    layout_items=_layout_items(layouts),
    reusable=layouts is None or all(p in layouts for p in paths),
  )


def _get_plan(params, leaves, treedef, n, m, layouts, policy, options) -> _Plan:
  """The cached plan for this call, or a new one (cached when the call allows)."""
  key = _plan_key(treedef, leaves, layouts, policy, (n, m, *options))
  try:
    plan = None if key is None else _PLANS.get(key)
  except TypeError:  # an unhashable option (a custom pattern or score_fn object)
    key = plan = None
  if plan is not None and _same_layouts(plan.layout_items, layouts):
    return plan
  plan = _make_plan(params, leaves, n, m, layouts, policy, options)
  if key is not None and plan.reusable:
    _PLANS[key] = plan
    while len(_PLANS) > _MAX_PLANS:  # the oldest first
      _PLANS.pop(next(iter(_PLANS)), None)
  return plan


def _check_finite(plan: _Plan, sub: list, finite: jax.Array) -> None:
  """Raises naming the first weight whose finiteness flag is False (one host transfer)."""
  if not plan.inexact:
    return
  flags = np.asarray(finite)
  if flags.all():
    return
  k = plan.inexact[int(np.argmin(flags))]
  x = sub[k]
  bad = int(jnp.sum(~jnp.isfinite(x)))
  raise ValueError(
    f"the weight '{plan.paths[k]}' (shape {tuple(x.shape)}) holds {bad} NaN/Inf "
    "value(s); fix or exclude it before pruning (under jax.jit, where values cannot be "
    "checked, non-finite entries are kept as the largest magnitudes)."
  )


def _impl_in_force(impl: str | None) -> str | None:
  """``impl``, or for None the context's / environment's choice now (None if invalid).

  It only keys the plan: the program still gets ``impl``, so a context's choice stays a
  preference (see :func:`jasp.mask_impl`), and an invalid ``JASP_MASK_IMPL`` is raised
  where a mask is traced.
  """
  if impl is not None:
    return impl
  try:
    return _dispatch.get_mask_impl()
  except ValueError:
    return None


def _run(params, n, m, *, layouts, policy, pattern, score_fn, impl, packed, want_pruned):
  """Masks (and pruned params when ``want_pruned``) of ``params``: one program, one sync.

  The plan (decisions, checks, the jitted program) is reused across calls on trees of the
  same structure, shapes, dtypes and shardings with the same options; the NaN/Inf check
  runs on the device inside the program and reads back one small flag vector.
  """
  masks_lib.check_nm(n, m)
  _check_options(pattern, score_fn)
  leaves, treedef = jax.tree_util.tree_flatten(params)
  options = (pattern, score_fn, impl, packed, want_pruned, _impl_in_force(impl), _GROUP_SAME_SHAPES)
  if any(_is_traced(x) for x in leaves):  # under a trace: no values to check, nothing cached
    plan = _make_plan(params, leaves, n, m, layouts, policy, options)
    masks, pruned, _ = plan.program([leaves[i] for i in plan.todo])
  else:
    plan = _get_plan(params, leaves, treedef, n, m, layouts, policy, options)
    sub = [leaves[i] for i in plan.todo]
    masks, pruned, finite = plan.program(sub)
    _check_finite(plan, sub, finite)
  mask_tree = jax.tree_util.tree_unflatten(
    treedef, _scatter([None] * len(leaves), plan.todo, masks)
  )
  if not want_pruned:
    return mask_tree, None
  return mask_tree, jax.tree_util.tree_unflatten(treedef, _scatter(list(leaves), plan.todo, pruned))


def _scatter(out: list, at: list[int], values: list) -> list:
  """``out`` with ``out[at[k]] = values[k]``."""
  for i, v in zip(at, values):
    out[i] = v
  return out


def apply_masks(params: PyTree, masks: PyTree) -> PyTree:
  """Zeroes the pruned entries: ``where(mask, w, 0)`` on every masked leaf.

  Kept entries are bit-identical to the input; dropped ones are exactly 0.
  Leaves whose mask is None pass through untouched. Jittable.

  Args:
    params: params pytree.
    masks: pytree mirroring ``params`` (bool arrays, :class:`jasp.PackedMask`
      or None), matched by path,
      so masks of an ``nnx.State`` apply to its pure form and back.

  Raises:
    ValueError: when the trees' paths or a leaf's shape disagree (naming it).
  """
  flat, treedef = jax.tree_util.tree_flatten(params)
  aligned = _tree.align(masks, params)
  todo = [i for i, mk in enumerate(aligned) if mk is not None]
  out = list(flat)
  for i, w in zip(todo, _apply_program([flat[i] for i in todo], [aligned[i] for i in todo])):
    out[i] = w
  return jax.tree_util.tree_unflatten(treedef, out)


@jax.jit
def _apply_program(leaves, masks):
  return [jnp.where(packing.as_bool(mk), x, jnp.zeros((), x.dtype)) for x, mk in zip(leaves, masks)]


def prune(
  params: PyTree,
  n: int = 2,
  m: int = 4,
  *,
  layouts: Mapping[str, layouts_lib.Layout] | None = None,
  policy: policy_lib.Policy | None = None,
  pattern: Pattern = "nm",
  score_fn: ScoreFn | None = None,
  impl: Literal["xla", "pallas"] | None = None,
  packed: bool = False,
) -> tuple[PyTree, PyTree]:
  """One-shot N:M magnitude pruning: ``compute_masks`` then ``apply_masks``.

  Example::

    variables = model.init(key, x)
    layouts = jasp.trace_layouts(model.apply, variables, x)
    variables, masks = jasp.prune(variables, layouts=layouts)

  Args:
    params: params pytree (linen variables, ``nnx.State``, any pytree of arrays).
    n, m: the N:M pattern (2:4 by default).
    layouts, policy, pattern, score_fn, impl, packed: as :func:`compute_masks`.

  The whole tree is pruned by one jitted XLA program: each weight is read once
  and its mask and pruned copy written in the same pass.

  Returns:
    ``(pruned_params, masks)``. Idempotent: pruning the result again returns
    the same params and masks.

  Raises:
    ValueError, TypeError: as :func:`compute_masks`. A NaN/Inf in a weight to
      prune is an error on concrete inputs only; under ``jax.jit`` the
      non-finite entries are kept (see :func:`compute_masks`).
  """
  masks, pruned = _run(
    params,
    n,
    m,
    layouts=layouts,
    policy=policy,
    pattern=pattern,
    score_fn=score_fn,
    impl=impl,
    packed=packed,
    want_pruned=True,
  )
  return pruned, masks
