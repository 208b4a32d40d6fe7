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


def _whole_groups(pos: np.ndarray, m: int) -> bool:
  """No N:M group holds two of the channels (permuting them moves whole groups)."""
  g = pos // m
  return all(len(set(row.tolist())) == len(row) for row in g)


def permute(
  fn: Callable[..., Any] | Any,
  variables: PyTree = None,
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
    ``fn(variables, *args, **model_kwargs)`` runs the model in inference mode;
    returns permuted ``variables`` (every collection: ``params``,
    ``batch_stats``, ...);
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
    fn: ``model.apply`` (or any ``fn(variables, *args)``), or an nnx module.
    variables: the variables pytree (linen); for nnx, the first input.
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
  model, inputs = _model.adapt(fn, variables, args, state=True, what="permute")
  graph = graph_lib.trace_model(model, model.trace(inputs, kwargs))
  if layouts is None:
    layouts = layouts_lib.trace_layouts(fn, variables, *args, **kwargs)
  tree = model.tree
  decisions = policy_lib.plan(tree, m, layouts=layouts, policy=policy)
  leaves = dict(zip(model.paths, model.leaves))
  pruned = {p: tuple(d.axis) for p, d in decisions.items() if d.prune and d.axis}

  # The pruned matrices: every pruned leaf, or every layer of a stacked one.
  host: dict[str, np.ndarray] = {}

  def host_leaf(p: str) -> np.ndarray:
    if p not in host:
      host[p] = np.asarray(jax.device_get(leaves[p]))
    return host[p]

  units: list[_Unit] = []
  for p, axes in pruned.items():
    lay_stack = getattr(layouts.get(p), "stack", ()) if isinstance(layouts, Mapping) else ()
    stack = tuple(sorted((set(graph.stack_axes(p)) | set(lay_stack or ())) - set(axes)))
    shape = np.shape(leaves[p])
    for lay in itertools.product(*[range(shape[s]) for s in stack]):
      units.append(_Unit(p, axes, stack, tuple(lay)))
  unit_atoms = {u: graph.axis_atoms(u.path, u.axes, u.where) for u in units}
  readers: dict[int, list[_Unit]] = {}
  for u in units:
    for cid in unit_atoms[u]:
      readers.setdefault(cid, []).append(u)

  # Consumers of every free channel class.
  classes = graph.classes()
  reports: dict[int, ClassReport] = {}
  todo = []
  for cls in classes:
    base = ClassReport(cls.id, cls.size, cls.members, (), "skipped", layers=cls.layers)
    if cls.pinned:
      reports[cls.id] = dataclasses.replace(base, reason=f"its order matters: {cls.pinned}")
      continue
    cons, other = [], []
    for u in readers.get(cls.id, ()):
      pos = graph.positions(u.path, u.axes, cls.id, u.where)
      if pos is None:
        continue
      (cons if _aligned(pos, m) else other).append((u, pos))
    if not cons:
      whole = [u.name for u, pos in other if _whole_groups(pos, m)]
      if not other:
        why = "no N:M-pruned weight groups along these channels"
      elif len(whole) == len(other):
        why = (
          f"the pruned weights that read them ({', '.join(whole)}) never hold two of "
          f"them in one group of {m}: a permutation only moves whole groups"
        )
      else:
        why = (
          "the pruned weights that read them do not hold them in aligned runs of "
          f"{m} ({', '.join(u.name for u, _ in other if u.name not in whole)})"
        )
      reports[cls.id] = dataclasses.replace(base, reason=why)
      continue
    if cls.size < 2 * m:
      reports[cls.id] = dataclasses.replace(
        base,
        consumers=tuple(u.path for u, _ in cons),
        consumer_layers=tuple(u.layer for u, _ in cons),
        reason=f"{cls.size} channels: fewer than two groups of {m}",
      )
      continue
    todo.append((cls, cons))

  # Search: one permutation for the consumers jointly. If it would lower what
  # one of them keeps, weigh the losers more and search again (a few times),
  # and keep the candidate with the largest joint gain that lowers none.
  perms: dict[int, np.ndarray] = {}
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
  # Layers with the same number of channels share one compiled search: their
  # (small) matrices are padded with zero rows, which change no score.
  all_mats = [
    [_consumer_matrix(u.take(host_leaf(u.path)), u.local_axes, pos) for u, pos in cons]
    for _, cons in todo
  ]
  rows: dict[int, int] = {}
  for (cls, _), mats in zip(todo, all_mats):
    r = sum(mt.shape[1] for mt in mats)
    if r <= 4096:
      rows[cls.size] = max(rows.get(cls.size, 0), r)
  for (cls, cons), mats in zip(todo, all_mats):
    names = tuple(u.path for u, _ in cons)
    name_layers = tuple(u.layer for u, _ in cons)
    pad = rows.get(cls.size, 0) - sum(mt.shape[1] for mt in mats)
    ident = np.arange(cls.size)
    base = [_group_kept(mt, ident, n, m) for mt in mats]
    weights = np.ones(len(mats))
    best, best_gain, seconds, eff = None, 0.0, 0.0, 0.0
    for _ in range(1 if allow_layer_loss or len(mats) == 1 else 4):
      mat = np.concatenate(
        [wt * mt for wt, mt in zip(weights, mats)]
        + [np.zeros((cls.size, max(pad, 0)), np.float32)],
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
    if best is None:
      reports[cls.id] = ClassReport(
        cls.id,
        cls.size,
        cls.members,
        names,
        "identity",
        "no permutation found keeps more without lowering a consumer",
        sum(base),
        sum(base),
        0.0,
        seconds,
        cls.layers,
        name_layers,
      )
      continue
    perms[cls.id] = best
    reports[cls.id] = ClassReport(
      cls.id,
      cls.size,
      cls.members,
      names,
      "permuted",
      "",
      sum(base),
      sum(base) + best_gain,
      eff,
      seconds,
      cls.layers,
      name_layers,
    )

  # No pruned weight (no layer of a stacked one) may lose: undo the classes of
  # any that would.
  before = {u: _kept(u.take(host_leaf(u.path)), u.local_axes, n, m) for u in units}
  while True:
    leaf_perms = graph.leaf_perms(perms)
    moved: dict[str, np.ndarray] = {}
    after = {}
    worse = None
    for u in units:
      if u.path not in leaf_perms:
        after[u] = before[u]
        continue
      if u.path not in moved:
        moved[u.path] = permute_array(
          host_leaf(u.path), leaf_perms[u.path], graph.stack_axes(u.path), xp=np
        )
      after[u] = _kept(u.take(moved[u.path]), u.local_axes, n, m)
      if after[u] < before[u] - 1e-7 and worse is None and not allow_layer_loss:
        worse = u
    if worse is None:
      break
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

  plan = PermutationPlan(
    {p: tuple(v) for p, v in leaf_perms.items()},
    {p: graph.stack_axes(p) for p in leaf_perms if graph.stack_axes(p)},
  )
  new_tree = plan.apply(tree, exact=True) if perms else tree

  # Check: same outputs.
  abs_err = rel_err = None
  if verify and perms:
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
    rel_err = float(abs_err / max(max(s, default=0.0), 1e-30))
    if not rel_err <= rtol:
      for cid in list(perms):
        r = reports[cid]
        reports[cid] = dataclasses.replace(
          r,
          status="skipped",
          kept_after=r.kept_before,
          reason=f"the permuted model's outputs differ (relative error {rel_err:.3g}); "
          "nothing was permuted",
        )
      perms = {}
      plan = PermutationPlan({})
      new_tree = tree
      after = dict(before)

  layers = tuple(
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

  def order(r: ClassReport):
    first = tuple(() if x is None else x for x in r.layers[:1])
    return (r.status != "permuted", -r.size, r.members[:1], first)

  ordered = tuple(sorted(reports.values(), key=order))
  report = PermutationReport(
    ordered, layers, plan, abs_err, rel_err, n, m, time.perf_counter() - t0
  )
  if model.module is not None:
    return model.to_module(new_tree), report
  return new_tree, report
