"""Permuting a whole model's channels so that N:M pruning keeps more magnitude.

:func:`permute` traces the model (:func:`~jasp.permutation.graph.trace_channels`),
finds for every free channel dimension the N:M-pruned weights whose groups run
along it (its *consumers*), searches one permutation per dimension
(:func:`~jasp.permutation.search.search_permutation` on the consumers' joint
magnitudes) and applies it to every parameter axis that carries the dimension.
The permuted model computes the same function (checked on the sample inputs);
prune it afterwards with :func:`jasp.prune` and the same layouts.

Apply the permutation *before* creating the optimizer; for an optimizer state
that already exists, ``report.plan.apply(opt_state)`` permutes its moments the
same way.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jasp import _tree
from jasp import layouts as layouts_lib
from jasp import masks as masks_lib
from jasp import policy as policy_lib
from jasp.permutation import graph as graph_lib
from jasp.permutation import search as search_lib
from jasp.permutation.report import ClassReport
from jasp.permutation.report import LayerReport
from jasp.permutation.report import PermutationPlan
from jasp.permutation.report import PermutationReport

__all__ = ["permute", "apply_permutation"]

PyTree = Any


def apply_permutation(tree: PyTree, plan: PermutationPlan) -> PyTree:
  """Permutes the leaves of ``tree`` by ``plan`` (see :meth:`PermutationPlan.apply`)."""
  return plan.apply(tree)


def _kept(w: np.ndarray, axis: tuple[int, ...], n: int, m: int) -> float:
  """Fraction of ``sum |w|`` kept by the N:M mask along ``axis`` (float64)."""
  w = np.abs(np.asarray(w, np.float64))
  total = w.sum()
  if total == 0:
    return 1.0
  a0, a1 = axis[0], axis[-1]
  k = int(np.prod([w.shape[a] for a in axis]))
  x = np.moveaxis(w.reshape(w.shape[:a0] + (k,) + w.shape[a1 + 1:]), a0, 0)
  x = np.sort(x.reshape(k // m, m, -1), axis=1)[:, m - n:]
  return float(x.sum() / total)


def _take(x, perms):
  for ax, p in enumerate(perms):
    if p is not None:
      x = jnp.take(x, jnp.asarray(p), axis=ax)
  return x


def _consumer_matrix(w, axes: tuple[int, ...], pos: np.ndarray) -> np.ndarray:
  """``|w|`` of one consumer as ``(channels, rows)`` float32, mean-normalised."""
  w = np.abs(np.asarray(jax.device_get(w), np.float32))
  a0, a1 = axes[0], axes[-1]
  k = int(np.prod([w.shape[a] for a in axes]))
  flat = np.moveaxis(w.reshape(w.shape[:a0] + (k,) + w.shape[a1 + 1:]), a0, 0)
  flat = flat.reshape(k, -1)
  mat = flat[pos]  # (contexts, channels, rows)
  mat = np.swapaxes(mat, 0, 1).reshape(pos.shape[1], -1)
  mean = mat.mean()
  return mat / mean if mean > 0 else mat


def _aligned(pos: np.ndarray, m: int) -> bool:
  """Each context holds the channels contiguously, starting on a group boundary."""
  c = pos.shape[1]
  return bool(c % m == 0 and np.all(pos[:, 0] % m == 0)
              and np.all(pos == pos[:, :1] + np.arange(c)[None, :]))


def _group_kept(mat: np.ndarray, perm: np.ndarray, n: int, m: int) -> float:
  x = np.sort(np.asarray(mat, np.float64)[perm].reshape(mat.shape[0] // m, m, -1), axis=1)
  return float(x[:, m - n:].sum())


def _whole_groups(pos: np.ndarray, m: int) -> bool:
  """No N:M group holds two of the channels (permuting them moves whole groups)."""
  g = pos // m
  return all(len(set(row.tolist())) == len(row) for row in g)


def _split_model(fn, variables, args):
  """(pure function, variables tree, call args, rebuild) for linen or nnx."""
  try:
    from flax import nnx  # pylint: disable=g-import-not-at-top
  except ImportError:  # pragma: no cover
    nnx = None
  if nnx is not None and isinstance(fn, nnx.Module):
    call_args = ((variables,) if variables is not None else ()) + tuple(args)
    graphdef, state = nnx.split(fn)
    tree = _tree.unbox(state)

    def run(t, *a, **k):
      return nnx.merge(graphdef, t)(*a, **k)

    return run, tree, call_args, lambda t: nnx.merge(graphdef, t), True
  if variables is None:
    raise TypeError("permute(apply_fn, variables, *args): variables are missing.")
  return fn, variables, tuple(args), lambda t: t, False


def permute(fn: Callable[..., Any] | Any, variables: PyTree = None, *args,
            n: int = 2, m: int = 4,
            layouts: Mapping[str, layouts_lib.Layout] | None = None,
            policy: policy_lib.Policy | None = None,
            model_kwargs: Mapping[str, Any] | None = None,
            strategy: search_lib.Strategy = "auto", window: int | None = None,
            escapes: int = 100, time_limit: float | None = 10.0,
            max_rounds: int | None = None, seed: int = 0,
            allow_layer_loss: bool = False, verify: bool = True,
            rtol: float = 1e-4) -> tuple[Any, PermutationReport]:
  """Permutes a model's channels so that N:M pruning keeps more magnitude.

  Two call forms, as :func:`jasp.trace_layouts`:

  * flax linen or any function: ``permute(model.apply, variables, x)``, where
    ``fn(variables, *args, **model_kwargs)`` runs the model in inference mode;
    returns permuted ``variables`` (every collection: ``params``,
    ``batch_stats``, ...);
  * nnx: ``permute(module, x)``: returns a permuted copy of the module (the
    argument is left untouched; ``nnx.update(module, nnx.state(new))`` updates
    it in place).

  A channel dimension stays as it is, with the reason in the report, when the
  trace shows an operation whose result depends on its order (the model's
  inputs and outputs, slicing, gathers, reversal, convolution taps, anything
  unknown), when no N:M-pruned weight groups along it, or when its size does not
  divide into groups of ``m``. Unless ``allow_layer_loss``, no pruned weight
  keeps less magnitude than before: a dimension whose permutation would lower
  one is left alone.
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
  masks_lib._check_nm(n, m)  # pylint: disable=protected-access
  t0 = time.perf_counter()
  kwargs = dict(model_kwargs or {})
  run, tree, call_args, rebuild, is_nnx = _split_model(fn, variables, args)
  graph = graph_lib.trace_channels(run, tree, *call_args, **kwargs)
  if layouts is None:
    if is_nnx:
      layouts = layouts_lib.trace_layouts(fn, *call_args, **kwargs)
    else:
      layouts = layouts_lib.trace_layouts(fn, variables, *call_args, **kwargs)
  decisions = policy_lib.plan(tree, m, layouts=layouts, policy=policy)
  leaves = _tree.leaves_by_path(tree)
  pruned = {p: tuple(d.axis) for p, d in decisions.items() if d.prune and d.axis}

  # Consumers of every free channel class.
  classes = graph.classes()
  reports: dict[int, ClassReport] = {}
  todo = []
  for cls in classes:
    base = ClassReport(cls.id, cls.size, cls.members, (), "skipped")
    if cls.pinned:
      reports[cls.id] = dataclasses.replace(base, reason=f"its order matters: {cls.pinned}")
      continue
    cons, other = [], []
    for path, axes in pruned.items():
      pos = graph.positions(path, axes, cls.id)
      if pos is None:
        continue
      (cons if _aligned(pos, m) else other).append((path, axes, pos))
    if not cons:
      whole = [p for p, _, pos in other if _whole_groups(pos, m)]
      if not other:
        why = "no N:M-pruned weight groups along these channels"
      elif len(whole) == len(other):
        why = (f"the pruned weights that read them ({', '.join(whole)}) never hold two of "
               f"them in one group of {m}: a permutation only moves whole groups")
      else:
        why = ("the pruned weights that read them do not hold them in aligned runs of "
               f"{m} ({', '.join(p for p, _, _ in other if p not in whole)})")
      reports[cls.id] = dataclasses.replace(base, reason=why)
      continue
    if cls.size < 2 * m:
      reports[cls.id] = dataclasses.replace(
          base, consumers=tuple(p for p, _, _ in cons),
          reason=f"{cls.size} channels: fewer than two groups of {m}")
      continue
    todo.append((cls, cons))

  # Search: one permutation for the consumers jointly. If it would lower what
  # one of them keeps, weigh the losers more and search again (a few times),
  # and keep the candidate with the largest joint gain that lowers none.
  perms: dict[int, np.ndarray] = {}
  search = functools.partial(search_lib.search_permutation, n=n, m=m, axis=0,
                             strategy=strategy, window=window, escapes=escapes,
                             time_limit=time_limit, max_rounds=max_rounds, seed=seed,
                             return_info=True)
  # Layers with the same number of channels share one compiled search: their
  # (small) matrices are padded with zero rows, which change no score.
  all_mats = [[_consumer_matrix(leaves[p], axes, pos) for p, axes, pos in cons]
              for _, cons in todo]
  rows: dict[int, int] = {}
  for (cls, _), mats in zip(todo, all_mats):
    r = sum(mt.shape[1] for mt in mats)
    if r <= 4096:
      rows[cls.size] = max(rows.get(cls.size, 0), r)
  for (cls, cons), mats in zip(todo, all_mats):
    names = tuple(p for p, _, _ in cons)
    pad = rows.get(cls.size, 0) - sum(mt.shape[1] for mt in mats)
    ident = np.arange(cls.size)
    base = [_group_kept(mt, ident, n, m) for mt in mats]
    weights = np.ones(len(mats))
    best, best_gain, seconds, eff = None, 0.0, 0.0, 0.0
    for _ in range(1 if allow_layer_loss or len(mats) == 1 else 4):
      mat = np.concatenate([wt * mt for wt, mt in zip(weights, mats)]
                           + [np.zeros((cls.size, max(pad, 0)), np.float32)], axis=1)
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
          cls.id, cls.size, cls.members, names, "identity",
          "no permutation found keeps more without lowering a consumer", sum(base), sum(base),
          0.0, seconds)
      continue
    perms[cls.id] = best
    reports[cls.id] = ClassReport(cls.id, cls.size, cls.members, names, "permuted", "",
                                  sum(base), sum(base) + best_gain, eff, seconds)

  # No pruned weight may lose: undo the classes of any weight that would.
  before = {p: _kept(jax.device_get(leaves[p]), axes, n, m) for p, axes in pruned.items()}
  while True:
    leaf_perms = graph.leaf_perms(perms)
    after = {}
    worse = None
    for p, axes in pruned.items():
      if p not in leaf_perms:
        after[p] = before[p]
        continue
      after[p] = _kept(_take(np.asarray(jax.device_get(leaves[p])), leaf_perms[p]), axes, n, m)
      if after[p] < before[p] - 1e-7 and worse is None and not allow_layer_loss:
        worse = p
    if worse is None:
      break
    for cid in graph.axis_atoms(worse, pruned[worse]):
      if cid in perms:
        del perms[cid]
        r = reports[cid]
        reports[cid] = dataclasses.replace(
            r, status="identity", kept_after=r.kept_before,
            reason=f"its best permutation lowers what {worse} keeps")

  plan = PermutationPlan({p: tuple(v) for p, v in leaf_perms.items()})
  new_tree = plan.apply(tree, exact=True) if perms else tree

  # Check: same outputs.
  abs_err = rel_err = None
  if verify and perms:
    y0 = run(tree, *call_args, **kwargs)
    y1 = run(new_tree, *call_args, **kwargs)
    d = [np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)), initial=0.0)
         for a, b in zip(jax.tree_util.tree_leaves(y0), jax.tree_util.tree_leaves(y1))]
    s = [np.max(np.abs(np.asarray(a, np.float64)), initial=0.0)
         for a in jax.tree_util.tree_leaves(y0)]
    abs_err = float(max(d, default=0.0))
    rel_err = float(abs_err / max(max(s, default=0.0), 1e-30))
    if not rel_err <= rtol:
      for cid in list(perms):
        r = reports[cid]
        reports[cid] = dataclasses.replace(
            r, status="skipped", kept_after=r.kept_before,
            reason=f"the permuted model's outputs differ (relative error {rel_err:.3g}); "
                   "nothing was permuted")
      perms = {}
      plan = PermutationPlan({})
      new_tree = tree
      after = dict(before)

  permuted_leaves = set(plan.leaves)
  layers = tuple(LayerReport(p, axes, before[p], after[p],
                             p in permuted_leaves and any(
                                 c in perms for c in graph.axis_atoms(p, axes)))
                 for p, axes in pruned.items())
  ordered = tuple(sorted(reports.values(), key=lambda r: (r.status != "permuted", -r.size,
                                                          r.members[:1])))
  report = PermutationReport(ordered, layers, plan, abs_err, rel_err, n, m,
                             time.perf_counter() - t0)
  return rebuild(new_tree), report
