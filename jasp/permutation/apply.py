"""Permuting a whole model's channels so that N:M pruning keeps more magnitude.

:func:`permute` traces the model (:func:`~jasp.permutation.graph.trace_channels`),
finds for every free channel dimension the N:M-pruned weights whose groups run
along it (its *consumers*), searches one permutation per dimension
(:func:`~jasp.permutation.search.search_permutation` on the consumers' joint
magnitudes) and applies it to every parameter axis that carries the dimension.
The permuted model computes the same function (checked on the sample inputs);
prune it afterwards with :func:`jasp.prune` and the same layouts.

Layers stacked along a leading axis and run by a scan (``nn.scan``,
``nnx.scan``, ``lax.scan``) are permuted per layer: each layer's internal
channels get their own permutation, searched on that layer's slice of the
stacked weights, exactly as if the layers were separate weights; a stacked
kernel ``(L, in, out)`` is a consumer (and a reported, checked layer) once per
layer.

Apply the permutation *before* creating the optimizer; for an optimizer state
that already exists, ``report.plan.apply(opt_state)`` permutes its moments the
same way.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import time
from collections.abc import Callable
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jasp import _model
from jasp import layouts as layouts_lib
from jasp import masks as masks_lib
from jasp import policy as policy_lib
from jasp.permutation import graph as graph_lib
from jasp.permutation import search as search_lib
from jasp.permutation.report import ClassReport
from jasp.permutation.report import LayerReport
from jasp.permutation.report import PermutationPlan
from jasp.permutation.report import PermutationReport
from jasp.permutation.report import permute_array
from jasp.typing import PyTree

__all__ = ["permute", "apply_permutation"]


def apply_permutation(tree: PyTree, plan: PermutationPlan) -> PyTree:
  """Permutes the leaves of ``tree`` by ``plan`` (see :meth:`PermutationPlan.apply`)."""
  return plan.apply(tree)


@dataclasses.dataclass(frozen=True)
class _Unit:
  """One N:M-pruned weight matrix: a leaf, or one layer of a stacked leaf."""

  path: str
  axes: tuple[int, ...]  # group axes of the leaf
  stack: tuple[int, ...] = ()  # the leaf's stacked axes (sorted), indexed by ``layer``
  layer: tuple[int, ...] = ()

  @property
  def where(self) -> dict[int, int]:
    return dict(zip(self.stack, self.layer))

  @property
  def local_axes(self) -> tuple[int, ...]:
    """``axes`` in the layer's slice (the stacked axes removed)."""
    return tuple(a - sum(s < a for s in self.stack) for a in self.axes)

  @property
  def name(self) -> str:
    if not self.layer:
      return self.path
    lay = self.layer[0] if len(self.layer) == 1 else self.layer
    return f"{self.path}@{lay}"

  def take(self, w: np.ndarray) -> np.ndarray:
    """The layer's slice of the leaf ``w``."""
    where = self.where
    return w[tuple(where.get(a, slice(None)) for a in range(np.ndim(w)))]


def _kept(w: np.ndarray, axis: tuple[int, ...], n: int, m: int) -> float:
  """Fraction of ``sum |w|`` kept by the N:M mask along ``axis`` (float64)."""
  w = np.abs(np.asarray(w, np.float64))
  total = w.sum()
  if total == 0:
    return 1.0
  a0, a1 = axis[0], axis[-1]
  k = int(np.prod([w.shape[a] for a in axis]))
  x = np.moveaxis(w.reshape(w.shape[:a0] + (k,) + w.shape[a1 + 1 :]), a0, 0)
  x = np.sort(x.reshape(k // m, m, -1), axis=1)[:, m - n :]
  return float(x.sum() / total)


def _consumer_matrix(w, axes: tuple[int, ...], pos: np.ndarray) -> np.ndarray:
  """``|w|`` of one consumer as ``(channels, rows)`` float32, mean-normalised."""
  w = np.abs(np.asarray(jax.device_get(w), np.float32))
  a0, a1 = axes[0], axes[-1]
  k = int(np.prod([w.shape[a] for a in axes]))
  flat = np.moveaxis(w.reshape(w.shape[:a0] + (k,) + w.shape[a1 + 1 :]), a0, 0)
  flat = flat.reshape(k, -1)
  mat = flat[pos]  # (contexts, channels, rows)
  mat = np.swapaxes(mat, 0, 1).reshape(pos.shape[1], -1)
  mean = mat.mean()
  return mat / mean if mean > 0 else mat


def _aligned(pos: np.ndarray, m: int) -> bool:
  """Each context holds the channels contiguously, starting on a group boundary."""
  c = pos.shape[1]
  return bool(
    c % m == 0 and np.all(pos[:, 0] % m == 0) and np.all(pos == pos[:, :1] + np.arange(c)[None, :])
  )


def _group_kept(mat: np.ndarray, perm: np.ndarray, n: int, m: int) -> float:
  x = np.sort(np.asarray(mat, np.float64)[perm].reshape(mat.shape[0] // m, m, -1), axis=1)
  return float(x[:, m - n :].sum())


def _unstructured_kept(mat: np.ndarray, n: int, m: int) -> float:
  """``sum |w|`` of the largest ``C*n/m`` channels of each row of ``mat (C, rows)``.

  The unstructured bound: no permutation makes N:M keep more.
  """
  c = mat.shape[0]
  return float(np.sort(np.asarray(mat, np.float64), axis=0)[c - (c * n) // m :].sum())


def _whole_groups(pos: np.ndarray, m: int) -> bool:
  """No N:M group holds two of the channels (permuting them moves whole groups)."""
  g = pos // m
  return all(len(set(row.tolist())) == len(row) for row in g)


class _HostLeaves:
  """The model's leaves by path, copied to host memory (numpy) on first use."""

  def __init__(self, leaves: Mapping[str, Any]):
    self.leaves = leaves
    self._host: dict[str, np.ndarray] = {}

  def __getitem__(self, path: str) -> np.ndarray:
    if path not in self._host:
      self._host[path] = np.asarray(jax.device_get(self.leaves[path]))
    return self._host[path]


def _units(
  graph: graph_lib.ChannelGraph,
  pruned: Mapping[str, tuple[int, ...]],
  layouts: Any,
  leaves: Mapping[str, Any],
) -> list[_Unit]:
  """The pruned matrices: every pruned leaf, or every layer of a stacked one."""
  units: list[_Unit] = []
  for p, axes in pruned.items():
    lay_stack = getattr(layouts.get(p), "stack", ()) if isinstance(layouts, Mapping) else ()
    stack = tuple(sorted((set(graph.stack_axes(p)) | set(lay_stack or ())) - set(axes)))
    shape = np.shape(leaves[p])
    for lay in itertools.product(*[range(shape[s]) for s in stack]):
      units.append(_Unit(p, axes, stack, tuple(lay)))
  return units


def _readers(unit_atoms: Mapping[_Unit, Any]) -> dict[int, list[_Unit]]:
  """``{class id: the units whose group axes carry the class}``."""
  readers: dict[int, list[_Unit]] = {}
  for u, atoms in unit_atoms.items():
    for cid in atoms:
      readers.setdefault(cid, []).append(u)
  return readers


_Read = tuple  # (_Unit, positions (contexts, channels) of the class in its group axis)


def _no_consumer_reason(other: list[_Read], m: int) -> str:
  """Why a class that no pruned weight holds in aligned runs of ``m`` is skipped."""
  if not other:
    return "no N:M-pruned weight groups along these channels"
  whole = [u.name for u, pos in other if _whole_groups(pos, m)]
  if len(whole) == len(other):
    return (
      f"the pruned weights that read them ({', '.join(whole)}) never hold two of "
      f"them in one group of {m}: a permutation only moves whole groups"
    )
  return (
    "the pruned weights that read them do not hold them in aligned runs of "
    f"{m} ({', '.join(u.name for u, _ in other if u.name not in whole)})"
  )


def _triage(
  graph: graph_lib.ChannelGraph, cls: Any, readers: Mapping[int, list[_Unit]], m: int
) -> tuple[ClassReport | None, list[_Read]]:
  """``(report of a skipped class, None to search)`` and the class's consumers."""
  base = ClassReport(cls.id, cls.size, cls.members, (), "skipped", layers=cls.layers)
  if cls.pinned:
    return dataclasses.replace(base, reason=f"its order matters: {cls.pinned}"), []
  cons, other = [], []
  for u in readers.get(cls.id, ()):
    pos = graph.positions(u.path, u.axes, cls.id, u.where)
    if pos is not None:
      (cons if _aligned(pos, m) else other).append((u, pos))
  if not cons:
    return dataclasses.replace(base, reason=_no_consumer_reason(other, m)), []
  if cls.size < 2 * m:
    skipped = dataclasses.replace(
      base,
      consumers=tuple(u.path for u, _ in cons),
      consumer_layers=tuple(u.layer for u, _ in cons),
      reason=f"{cls.size} channels: fewer than two groups of {m}",
    )
    return skipped, cons
  return None, cons


def _triage_all(
  graph: graph_lib.ChannelGraph, readers: Mapping[int, list[_Unit]], m: int
) -> tuple[dict[int, ClassReport], list]:
  """``(reports of the skipped classes, [(class, consumers)] to search)``."""
  reports: dict[int, ClassReport] = {}
  todo = []
  for cls in graph.classes():
    skipped, cons = _triage(graph, cls, readers, m)
    if skipped is None:
      todo.append((cls, cons))
    else:
      reports[cls.id] = skipped
  return reports, todo


def _shared_rows(todo: list, all_mats: list[list[np.ndarray]]) -> dict[int, int]:
  """``{channels: rows}``: classes of one size share one compiled (zero-padded) search."""
  rows: dict[int, int] = {}
  for (cls, _), mats in zip(todo, all_mats):
    r = sum(mt.shape[1] for mt in mats)
    if r <= 4096:
      rows[cls.size] = max(rows.get(cls.size, 0), r)
  return rows


@dataclasses.dataclass(frozen=True)
class _Found:
  """The outcome of the joint search of one class."""

  perm: np.ndarray | None  # None: nothing better that lowers no consumer
  kept_before: float
  gain: float
  efficacy: float
  seconds: float
  bound: float  # the unstructured bound of the consumers jointly


def _joint_search(
  mats: list[np.ndarray],
  size: int,
  pad: int,
  search: Callable[..., Any],
  n: int,
  m: int,
  allow_layer_loss: bool,
) -> _Found:
  """One permutation for the consumers ``mats`` (each ``(size, rows)``) jointly.

  If it would lower what one of them keeps, weigh the losers more and search
  again (a few times), and keep the candidate with the largest joint gain that
  lowers none.
  """
  ident = np.arange(size)
  base = [_group_kept(mt, ident, n, m) for mt in mats]
  weights = np.ones(len(mats))
  best, best_gain, seconds, eff = None, 0.0, 0.0, 0.0
  for _ in range(1 if allow_layer_loss or len(mats) == 1 else 4):
    mat = np.concatenate(
      [wt * mt for wt, mt in zip(weights, mats)] + [np.zeros((size, max(pad, 0)), np.float32)],
      axis=1,
    )
    perm, info = search(jnp.asarray(mat))
    perm = np.asarray(perm)
    seconds += info.seconds
    kept = [_group_kept(mt, perm, n, m) for mt in mats]
    losers = [i for i, (a, b) in enumerate(zip(kept, base)) if a < b * (1 - 1e-9)]
    gain = sum(kept) - sum(base)
    if gain > best_gain + 1e-9 * sum(base) and (allow_layer_loss or not losers):
      best, best_gain, eff = perm, gain, info.score.efficacy
    if not losers:
      break
    weights[losers] *= 4.0
  bound = sum(_unstructured_kept(mt, n, m) for mt in mats)
  return _Found(best, sum(base), best_gain, eff, seconds, bound)


def _found_report(cls: Any, cons: list[_Read], found: _Found) -> ClassReport:
  """The :class:`ClassReport` of a searched class."""
  ok = found.perm is not None
  return ClassReport(
    cls.id,
    cls.size,
    cls.members,
    tuple(u.path for u, _ in cons),
    "permuted" if ok else "identity",
    "" if ok else "no permutation found keeps more without lowering a consumer",
    found.kept_before,
    found.kept_before + (found.gain if ok else 0.0),
    found.efficacy if ok else 0.0,
    found.seconds,
    cls.layers,
    tuple(u.layer for u, _ in cons),
    bound=found.bound,
  )


def _search_classes(
  todo: list, host: _HostLeaves, search: Callable[..., Any], n: int, m: int, allow_layer_loss: bool
) -> tuple[dict[int, np.ndarray], dict[int, ClassReport]]:
  """Searches every class of ``todo`` (``(class, consumers)``): ``(perms, reports)``."""
  all_mats = [
    [_consumer_matrix(u.take(host[u.path]), u.local_axes, pos) for u, pos in cons]
    for _, cons in todo
  ]
  rows = _shared_rows(todo, all_mats)
  perms: dict[int, np.ndarray] = {}
  reports: dict[int, ClassReport] = {}
  for (cls, cons), mats in zip(todo, all_mats):
    pad = rows.get(cls.size, 0) - sum(mt.shape[1] for mt in mats)
    found = _joint_search(mats, cls.size, pad, search, n, m, allow_layer_loss)
    if found.perm is not None:
      perms[cls.id] = found.perm
    reports[cls.id] = _found_report(cls, cons, found)
  return perms, reports


def _kept_after(
  graph: graph_lib.ChannelGraph,
  units: list[_Unit],
  leaf_perms: Mapping[str, Any],
  before: Mapping[_Unit, float],
  host: _HostLeaves,
  n: int,
  m: int,
) -> dict[_Unit, float]:
  """Fraction of ``sum |w|`` each unit keeps under N:M after ``leaf_perms``."""
  moved: dict[str, np.ndarray] = {}
  after = {}
  for u in units:
    if u.path not in leaf_perms:
      after[u] = before[u]
      continue
    if u.path not in moved:
      moved[u.path] = permute_array(
        host[u.path], leaf_perms[u.path], graph.stack_axes(u.path), xp=np
      )
    after[u] = _kept(u.take(moved[u.path]), u.local_axes, n, m)
  return after


def _undo_losses(
  graph: graph_lib.ChannelGraph,
  units: list[_Unit],
  unit_atoms: Mapping[_Unit, Any],
  perms: dict[int, np.ndarray],
  reports: dict[int, ClassReport],
  before: Mapping[_Unit, float],
  kept_after: Callable[[Mapping[str, Any]], dict[_Unit, float]],
  allow_layer_loss: bool,
) -> tuple[dict[str, Any], dict[_Unit, float]]:
  """Undoes (in ``perms``, ``reports``) the classes of any unit that would keep less.

  Returns the leaf permutations of what is left and what each unit keeps then.
  """
  while True:
    leaf_perms = graph.leaf_perms(perms)
    after = kept_after(leaf_perms)
    worse = None
    if not allow_layer_loss:
      worse = next((u for u in units if after[u] < before[u] - 1e-7), None)
    if worse is None:
      return leaf_perms, after
    undone = [cid for cid in unit_atoms[worse] if cid in perms]
    if not undone:  # pragma: no cover - a loss no class of its own explains
      undone = list(perms)
    for cid in undone:
      del perms[cid]
      r = reports[cid]
      reports[cid] = dataclasses.replace(
        r,
        status="identity",
        kept_after=r.kept_before,
        reason=f"its best permutation lowers what {worse.name} keeps",
      )


def _output_error(model: _model.Model, tree, new_tree, inputs, kwargs) -> tuple[float, float]:
  """``(max |y' - y|, that / max |y|)`` between the two models' outputs (float64)."""
  y0 = model.apply(tree, *inputs, **kwargs)
  y1 = model.apply(new_tree, *inputs, **kwargs)
  d = [
    np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)), initial=0.0)
    for a, b in zip(jax.tree_util.tree_leaves(y0), jax.tree_util.tree_leaves(y1))
  ]
  s = [
    np.max(np.abs(np.asarray(a, np.float64)), initial=0.0) for a in jax.tree_util.tree_leaves(y0)
  ]
  abs_err = float(max(d, default=0.0))
  return abs_err, float(abs_err / max(max(s, default=0.0), 1e-30))


def _rejected(reports: dict[int, ClassReport], perms: Mapping[int, Any], rel_err: float) -> None:
  """Marks every permuted class skipped in ``reports``: the outputs changed."""
  for cid in list(perms):
    r = reports[cid]
    reports[cid] = dataclasses.replace(
      r,
      status="skipped",
      kept_after=r.kept_before,
      reason=f"the permuted model's outputs differ (relative error {rel_err:.3g}); "
      "nothing was permuted",
    )


def _layer_reports(
  units: list[_Unit],
  before: Mapping[_Unit, float],
  after: Mapping[_Unit, float],
  plan: PermutationPlan,
  perms: Mapping[int, Any],
  unit_atoms: Mapping[_Unit, Any],
) -> tuple[LayerReport, ...]:
  """One :class:`LayerReport` per unit."""
  return tuple(
    LayerReport(
      u.path,
      u.axes,
      before[u],
      after[u],
      u.path in plan.leaves and any(c in perms for c in unit_atoms[u]),
      u.layer,
      u.stack,
    )
    for u in units
  )


def _class_order(r: ClassReport):
  """Sort key of the report's classes: permuted first, then the widest."""
  first = tuple(() if x is None else x for x in r.layers[:1])
  return (r.status != "permuted", -r.size, r.members[:1], first)


def permute(
  fn: Callable[..., Any] | Any,
  params: PyTree = None,
  *args,
  n: int = 2,
  m: int = 4,
  layouts: Mapping[str, layouts_lib.Layout] | None = None,
  policy: policy_lib.Policy | None = None,
  model_kwargs: Mapping[str, Any] | None = None,
  strategy: search_lib.Strategy = "auto",
  window: int | None = None,
  escapes: int = 100,
  time_limit: float | None = 10.0,
  max_rounds: int | None = None,
  seed: int = 0,
  allow_layer_loss: bool = False,
  verify: bool = True,
  rtol: float = 1e-4,
) -> tuple[Any, PermutationReport]:
  """Permutes a model's channels so that N:M pruning keeps more magnitude.

  Two call forms, as :func:`jasp.trace_layouts`:

  * flax linen or any function: ``permute(model.apply, variables, x)``, where
    ``fn(params, *args, **model_kwargs)`` runs the model in inference mode
    (``params`` is everything ``model.apply`` takes: all collections); returns
    them permuted (every collection: ``params``, ``batch_stats``, ...);
  * nnx: ``permute(module, x)``: returns a permuted copy of the module, all of
    its state (the argument is left untouched; ``nnx.update(module,
    nnx.state(new))`` updates it in place).

  Blocks stacked along a layer axis and run by a scan are permuted per layer
  (see :mod:`jasp.permutation.graph` for the scan semantics): each layer's
  internal channels get their own permutation, channels carried across layers
  (the residual stream) one shared by all.

  A channel dimension stays as it is, with the reason in the report, when the
  trace shows an operation whose result depends on its order (the model's
  inputs and outputs, slicing, gathers, reversal, convolution taps, a scan's
  layer axis, anything unknown), when no N:M-pruned weight groups along it, or
  when its size does not divide into groups of ``m``. Unless
  ``allow_layer_loss``, no pruned weight (no layer of a stacked one) keeps less
  magnitude than before: a dimension whose permutation would lower one is left
  alone.
  With ``verify`` the permuted model is run on the sample inputs and compared
  with the original; on a mismatch the original is returned and the report
  says so.

  Args:
    fn: ``model.apply`` (or any ``fn(params, *args)``), or an nnx module.
    params: the tree ``fn`` takes first (linen: the whole variables dict); for
      nnx, the first input.
    *args: sample inputs (only their shapes and dtypes matter for the trace).
    n, m: the N:M pattern that pruning will use.
    layouts: ``{path: Layout}`` (:func:`jasp.trace_layouts`); None traces them.
      Use the same layouts (and policy) for :func:`jasp.prune` afterwards.
    policy: the pruning :class:`jasp.Policy` (which weights will be pruned).
    model_kwargs: keyword arguments for the model call (``train=False``).
    strategy, window, escapes, max_rounds, seed: passed to
      :func:`jasp.search_permutation` for each channel dimension.
    time_limit: seconds of search per channel dimension (None: no limit; the
      result is then deterministic for a seed).
    allow_layer_loss: accept a permutation that raises the consumers' joint
      kept magnitude even when it lowers one of them (default: never lower a
      pruned weight).
    verify: run both models on ``args`` and compare.
    rtol: largest accepted ``max |y' - y| / max |y|``.

  Returns:
    ``(permuted, report)``: permuted variables (linen) or module (nnx), and a
    :class:`PermutationReport` whose ``plan`` can permute other trees (an
    optimizer state) the same way.

  Example::

    variables, report = jasp.permute(model.apply, variables, x)
    print(report)
    sparse, masks = jasp.prune(variables, 2, 4, layouts=layouts)
  """
  masks_lib.check_nm(n, m)
  t0 = time.perf_counter()
  kwargs = dict(model_kwargs or {})
  model, inputs = _model.adapt(fn, params, args, state=True, what="permute")
  graph = graph_lib.trace_model(model, model.trace(inputs, kwargs))
  if layouts is None:
    layouts = layouts_lib.trace_layouts(fn, params, *args, **kwargs)
  tree = model.tree
  decisions = policy_lib.plan(tree, m, layouts=layouts, policy=policy)
  host = _HostLeaves(dict(zip(model.paths, model.leaves)))
  pruned = {p: tuple(d.axis) for p, d in decisions.items() if d.prune and d.axis}
  units = _units(graph, pruned, layouts, host.leaves)
  unit_atoms = {u: graph.axis_atoms(u.path, u.axes, u.where) for u in units}
  readers = _readers(unit_atoms)

  reports, todo = _triage_all(graph, readers, m)

  search = functools.partial(
    search_lib.search_permutation,
    n=n,
    m=m,
    axis=0,
    strategy=strategy,
    window=window,
    escapes=escapes,
    time_limit=time_limit,
    max_rounds=max_rounds,
    seed=seed,
    return_info=True,
  )
  perms, searched = _search_classes(todo, host, search, n, m, allow_layer_loss)
  reports.update(searched)

  # No pruned weight (no layer of a stacked one) may lose: undo the classes of
  # any that would.
  before = {u: _kept(u.take(host[u.path]), u.local_axes, n, m) for u in units}
  kept_after = functools.partial(_kept_after, graph, units, before=before, host=host, n=n, m=m)
  leaf_perms, after = _undo_losses(
    graph, units, unit_atoms, perms, reports, before, kept_after, allow_layer_loss
  )
  plan = PermutationPlan(
    {p: tuple(v) for p, v in leaf_perms.items()},
    {p: graph.stack_axes(p) for p in leaf_perms if graph.stack_axes(p)},
  )
  new_tree = plan.apply(tree, exact=True) if perms else tree

  # Check: same outputs.
  abs_err = rel_err = None
  if verify and perms:
    abs_err, rel_err = _output_error(model, tree, new_tree, inputs, kwargs)
    if not rel_err <= rtol:
      _rejected(reports, perms, rel_err)
      perms, plan, new_tree, after = {}, PermutationPlan({}), tree, dict(before)

  layers = _layer_reports(units, before, after, plan, perms, unit_atoms)
  ordered = tuple(sorted(reports.values(), key=_class_order))
  report = PermutationReport(
    ordered, layers, plan, abs_err, rel_err, n, m, time.perf_counter() - t0
  )
  if model.module is not None:
    return model.to_module(new_tree), report
  return new_tree, report
