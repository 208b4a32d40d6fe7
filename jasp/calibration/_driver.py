"""The loop shared by the calibration pruners: plan, tap, schedule, prune layer by layer.

A pruner supplies one jitted function per leaf,
``leaf_fn(w, site, stats, n, m) -> (new_w, mask, error or None)``; the driver
decides which leaves are pruned (:func:`jasp.policy.plan`), finds their inputs
(:mod:`jasp.calibration.stats`), orders them so that a layer is calibrated on the
outputs of the already-pruned layers before it, streams the calibration
batches once per stage, and reports each layer (progress bar, callback,
``logging``).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from jasp import _model
from jasp import _tree
from jasp import layouts as layouts_lib
from jasp import masks as masks_lib
from jasp import policy as policy_lib
from jasp.calibration import stats as stats_lib
from jasp.typing import PyTree

__all__ = ["LayerResult", "run"]

Missing = Literal["error", "magnitude", "dense"]
log = logging.getLogger("jasp.calibration")


@dataclasses.dataclass(frozen=True)
class LayerResult:
  """What happened to one weight, or one layer of a stacked weight (passed to
  ``callback`` as soon as it is pruned).

  Attributes:
    path: the leaf's path string.
    shape: the shape of what was pruned (one layer of a stacked weight).
    method: ``"wanda"``, ``"sparsegpt"``, or ``"magnitude"`` for a leaf that
      fell back (``missing="magnitude"``).
    stage: index of the calibration pass that produced its statistics.
    rows: calibration rows (tokens, or conv output positions) it saw.
    error: ``||X W - X W_hat||_F**2 / rows`` on its own calibration inputs, when
      the method has the Hessian to compute it (SparseGPT); else None.
    seconds: wall time of its prune step (statistics pass not included).
    stage_seconds: wall time of its stage's pass over the calibration batches.
    note: why it fell back, for a ``"magnitude"`` leaf.
    layer: the layer's index along the stacked axes of a weight run by a
      ``scan`` (``()`` for an unstacked weight).
  """

  path: str
  shape: tuple[int, ...]
  method: str
  stage: int
  rows: int
  error: float | None
  seconds: float
  stage_seconds: float
  note: str = ""
  layer: tuple[int, ...] = ()


def split_args(fn, params, batches):
  """Accepts ``(apply_fn, params, batches)`` and ``(nnx_module, batches)``."""
  if _model.is_module(fn):
    if batches is not None and params is not None:
      raise TypeError("for an nnx.Module pass (module, batches): its nnx.Param state is pruned.")
    return None, params if batches is None else batches
  if batches is None:
    raise TypeError("batches are missing: pass (apply_fn, params, batches).")
  return params, batches


Unit = tuple  # (leaf, layer index tuple): one weight, or one layer of a stacked weight


@dataclasses.dataclass(frozen=True)
class _Tapped:
  """A weight to calibrate: its target (site, layers) and site uses (stack, deps)."""

  target: stats_lib.Target
  uses: tuple


def _predecessors(
  unit: Unit, tapped: Mapping[int, _Tapped], reverse: Mapping[tuple, bool]
) -> set[Unit]:
  """The units whose pruning changes ``unit``'s inputs (from the analysis' dependencies)."""
  leaf, idx = unit
  me = tapped[leaf]
  keys = [k for _, k in me.uses[0].stack]
  at = dict(zip(keys, idx))
  out = set()
  for use in me.uses:
    for dleaf, rel in use.deps:
      if dleaf not in tapped:
        continue
      other = tapped[dleaf]
      okeys = [k for _, k in other.uses[0].stack]
      relation = {k: r for r, k in rel}
      for oidx in other.target.layers:
        ok = True
        for k, j in zip(okeys, oidx):
          r = relation.get(k)
          if r is None or k not in at:
            continue
          i = at[k]
          if r == "same":
            ok = j == i
          else:  # "before" in the scan's iteration order
            ok = j > i if reverse.get(k, False) else j < i
          if not ok:
            break
        if ok and (dleaf, oidx) != unit:
          out.add((dleaf, oidx))
  return out


def _components(units: Sequence[Unit], preds: Mapping[Unit, set]) -> dict[Unit, int]:
  """Strongly connected components of the dependency graph (Kosaraju, iterative)."""
  succ: dict[Unit, list] = {u: [] for u in units}
  for u in units:
    for p in preds[u]:
      if p in succ:
        succ[p].append(u)
  order, seen = [], set()
  for root in units:
    if root in seen:
      continue
    seen.add(root)
    stack = [(root, iter(succ[root]))]
    while stack:
      node, it = stack[-1]
      nxt = next((v for v in it if v not in seen), None)
      if nxt is None:
        order.append(node)
        stack.pop()
      else:
        seen.add(nxt)
        stack.append((nxt, iter(succ[nxt])))
  comp: dict[Unit, int] = {}
  for root in reversed(order):
    if root in comp:
      continue
    cid = len(set(comp.values()))
    comp[root] = cid
    todo = [root]
    while todo:
      node = todo.pop()
      for p in preds[node]:
        if p in succ and p not in comp:
          comp[p] = cid
          todo.append(p)
  return comp


def schedule(
  units: Sequence[Unit], preds: Mapping[Unit, set], sequential: bool, layers_per_pass: int | None
) -> list[list[Unit]]:
  """Stages of units; a unit comes after every unit that influences its inputs.

  With ``sequential``, stage ``s`` holds the units whose inputs depend only on
  units of earlier stages (q/k/v of one attention share a stage; layer ``l+1``
  of a scan comes after layer ``l``); otherwise one stage holds all. Units that
  feed each other's inputs in a cycle (an RNN's recurrent kernels) share a
  stage. ``layers_per_pass`` splits stages further (1 = one unit's statistics
  in memory at a time).
  """
  order = list(units)
  if not sequential:
    stages = [order] if order else []
  else:
    comp = _components(order, preds)
    cpreds: dict[int, set] = {c: set() for c in comp.values()}
    for u in order:
      cpreds[comp[u]] |= {comp[p] for p in preds[u] if p in comp} - {comp[u]}
    stages, done, left = [], set(), set(cpreds)
    while left:
      ready = {c for c in left if cpreds[c] <= done}
      stages.append([u for u in order if comp[u] in ready])
      done |= ready
      left -= ready
  if layers_per_pass:
    stages = [s[i : i + layers_per_pass] for s in stages for i in range(0, len(s), layers_per_pass)]
  return stages


def _progress(total: int, enabled: bool, desc: str):
  if not enabled or not total:
    return None
  try:
    from tqdm.auto import tqdm
  except ImportError:
    return None
  return tqdm(total=total, desc=desc, unit="layer", disable=None)


@jax.jit
def _all_finite(leaves):
  return jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])


def _check_finite(method: str, model: _model.Model, cand: Sequence[int]) -> None:
  """Raises ``ValueError`` naming the first weight to prune that holds NaN/Inf (one sync)."""
  if not cand:
    return
  ok = np.asarray(jax.device_get(_all_finite([model.leaves[k] for k in cand])))
  for k, good in zip(cand, ok):
    if not good:
      raise ValueError(
        f"{method}: the weight '{model.paths[k]}' (shape "
        f"{tuple(np.shape(model.leaves[k]))}) holds NaN/Inf; N:M pruning of "
        "non-finite weights is undefined."
      )


LeafFn = Callable[[jax.Array, stats_lib.Site, dict, int, int], tuple]


def _index(stack_axes: Sequence[int], layer: Sequence[int], ndim: int) -> tuple:
  """The numpy index that selects ``layer`` along ``stack_axes`` of an ``ndim`` array."""
  idx: list = [slice(None)] * ndim
  for a, i in zip(stack_axes, layer):
    idx[a] = int(i)
  return tuple(idx)


def _local_axes(axes: Sequence[int], stack_axes: Sequence[int]) -> tuple[int, ...]:
  """Leaf axes -> axes of one layer (the stacked axes removed)."""
  return tuple(a - sum(1 for s in stack_axes if s < a) for a in axes)


def _tap_plan(model, flow, decisions, cand):
  """``({leaf: _Tapped}, {leaf: reason it has no usable site})``."""
  tapped, fallback = {}, {}
  for k in cand:
    d = decisions[model.paths[k]]
    target, uses, why = stats_lib.site_of(flow, k, np.shape(model.leaves[k]))
    if target is not None:
      stack_axes = tuple(a for a, _ in uses[0].stack)
      if _local_axes(d.axis, stack_axes) != target.site.group_axes or set(d.axis) & set(stack_axes):
        why = (
          f"the policy groups it along axes {tuple(d.axis)} but its matmul contracts "
          f"{target.site.group_axes} of each layer (stacked axes {stack_axes})"
        )
      else:
        tapped[k] = _Tapped(target, tuple(uses))
        continue
    fallback[k] = why
  return tapped, fallback


def run(
  method: str,
  leaf_fn: LeafFn,
  fn,
  params,
  batches,
  n: int,
  m: int,
  *,
  layouts: Mapping[str, layouts_lib.Layout] | None,
  policy: policy_lib.Policy | None,
  sequential: bool,
  layers_per_pass: int | None,
  hessian: bool,
  missing: Missing,
  progress: bool,
  callback: Callable[[LayerResult], Any] | None,
) -> tuple[PyTree, PyTree]:
  """Prunes every leaf that the policy selects with ``leaf_fn``; see the pruners' docs."""
  masks_lib.check_nm(n, m)
  if missing not in ("error", "magnitude", "dense"):
    raise ValueError(f"missing must be 'error', 'magnitude' or 'dense', got {missing!r}.")
  params, batches = split_args(fn, params, batches)
  model, _ = _model.adapt(fn, params, (), what=method)
  batches = list(batches)
  if not batches:
    raise ValueError("no calibration batches given.")
  tapper = stats_lib.Tapper(model)
  _, flow = tapper.traced(batches[0])
  if layouts is None:
    layouts = layouts_lib.from_analysis(model, flow)
  decisions = policy_lib.plan(model.tree, m, layouts=layouts, policy=policy)
  cand = [k for k, p in enumerate(model.paths) if decisions[p].prune]
  _check_finite(method, model, cand)
  tapped, fallback = _tap_plan(model, flow, decisions, cand)
  if fallback and missing == "error":
    lines = "\n".join(
      f"  {model.paths[k]} (shape {tuple(np.shape(model.leaves[k]))}): {why}"
      for k, why in fallback.items()
    )
    raise ValueError(
      f"{method} found no calibration inputs for {len(fallback)} weight(s) to prune:\n{lines}\n"
      "Exclude them (jasp.Policy(exclude=...)) or pass missing='magnitude' or 'dense'."
    )

  units = [(k, idx) for k, t in tapped.items() for idx in t.target.layers]
  preds = {u: _predecessors(u, tapped, flow.scans) for u in units}
  leaves = list(model.leaves)
  masks: dict[int, jax.Array] = {}
  bar = _progress(len(units) + (len(fallback) if missing == "magnitude" else 0), progress, method)

  def report(res: LayerResult):
    log.info(
      "%s %s%s %s: %s rows, error %s, %.3f s",
      method,
      res.path,
      list(res.layer) if res.layer else "",
      res.shape,
      res.rows,
      res.error,
      res.seconds,
    )
    if bar is not None:
      bar.update(1)
      bar.set_postfix_str(res.path[-40:])
    if callback is not None:
      callback(res)

  try:
    for k, why in fallback.items():
      log.warning("%s: '%s' falls back to %s: %s", method, model.paths[k], missing, why)
      if missing != "magnitude":
        continue
      t0 = time.perf_counter()
      axis = decisions[model.paths[k]].axis
      mask = masks_lib.nm_mask(leaves[k], n, m, axis)
      leaves[k] = jnp.where(mask, leaves[k], jnp.zeros((), leaves[k].dtype))
      masks[k] = jax.block_until_ready(mask)
      report(
        LayerResult(
          model.paths[k],
          tuple(np.shape(leaves[k])),
          "magnitude",
          -1,
          0,
          None,
          time.perf_counter() - t0,
          0.0,
          why,
        )
      )

    for si, stage in enumerate(schedule(units, preds, sequential, layers_per_pass)):
      t0 = time.perf_counter()
      want: dict[int, list] = {}
      for k, idx in stage:
        want.setdefault(k, []).append(idx)
      targets = {
        k: dataclasses.replace(tapped[k].target, layers=tuple(idxs)) for k, idxs in want.items()
      }
      acc = tapper.accumulate(leaves, batches, targets, hessian=hessian)
      jax.block_until_ready(acc)
      stage_s = time.perf_counter() - t0
      for k, idx in stage:
        t1 = time.perf_counter()
        slot = targets[k].layers.index(idx)
        a = {name: v[slot] for name, v in acc[k].items()}
        stack_axes = tuple(ax for ax, _ in tapped[k].uses[0].stack)
        sel = _index(stack_axes, idx, np.ndim(leaves[k]))
        w = leaves[k][sel] if stack_axes else leaves[k]
        new, mask, err = leaf_fn(w, targets[k].site, a, n, m)
        err, rows = jax.device_get((err, a["count"]))
        if err is not None and not np.isfinite(err):
          raise FloatingPointError(
            f"{method} produced non-finite weights for '{model.paths[k]}'"
            f"{list(idx) if idx else ''} (shape {tuple(np.shape(new))}); raise the damping or "
            "check the calibration data."
          )
        if stack_axes:
          leaves[k] = leaves[k].at[sel].set(new)
          full = masks.get(k, jnp.zeros(np.shape(leaves[k]), bool))
          masks[k] = full.at[sel].set(mask)
        else:
          leaves[k], masks[k] = new, mask
        report(
          LayerResult(
            model.paths[k],
            tuple(np.shape(new)),
            method,
            si,
            int(rows),
            None if err is None else float(err),
            time.perf_counter() - t1,
            stage_s,
            layer=tuple(int(i) for i in idx),
          )
        )
  finally:
    if bar is not None:
      bar.close()

  new_params = model.rebuild(leaves)
  by_path = {model.paths[k]: mk for k, mk in masks.items()}
  mask_tree = _tree.map_with_path(lambda p, x: by_path.get(p), new_params)
  return new_params, mask_tree


def leaf_matrix_groups(w: jax.Array, site: stats_lib.Site) -> jax.Array:
  """``(G, K, O/G)`` float32: the matrix view split into the conv's feature groups."""
  wm = stats_lib.to_matrix(w.astype(jnp.float32), site)
  g = site.groups
  return wm.reshape(site.k, g, site.o // g).transpose(1, 0, 2)


def leaf_from_groups(wg: jax.Array, site: stats_lib.Site) -> jax.Array:
  """Inverse of :func:`leaf_matrix_groups`."""
  return stats_lib.from_matrix(wg.transpose(1, 0, 2).reshape(site.k, site.o), site)
