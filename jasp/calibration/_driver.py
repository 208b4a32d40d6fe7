"""The loop shared by the calibration pruners: plan, tap, schedule, prune layer by layer.

A pruner supplies one jitted function per leaf,
``leaf_fn(w, site, stats, n, m) -> (new_w, mask, error or None)``; the driver
decides which leaves are pruned (:func:`jasp.plan`), finds their inputs
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

from jasp import _tree
from jasp import layouts as layouts_lib
from jasp import masks as masks_lib
from jasp import policy as policy_lib
from jasp.calibration import stats as stats_lib

__all__ = ["LayerResult", "run"]

PyTree = Any
Missing = Literal["error", "magnitude", "dense"]
log = logging.getLogger("jasp.calibration")


@dataclasses.dataclass(frozen=True)
class LayerResult:
  """What happened to one weight (passed to ``callback`` as soon as it is pruned).

  Attributes:
    path: the leaf's path string.
    shape: the leaf's shape.
    method: ``"wanda"``, ``"sparsegpt"``, or ``"magnitude"`` for a leaf that
      fell back (``missing="magnitude"``).
    stage: index of the calibration pass that produced its statistics.
    rows: calibration rows (tokens, or conv output positions) it saw.
    error: ``||X W - X W_hat||_F**2 / rows`` on its own calibration inputs, when
      the method has the Hessian to compute it (SparseGPT); else None.
    seconds: wall time of its prune step (statistics pass not included).
    stage_seconds: wall time of its stage's pass over the calibration batches.
    note: why it fell back, for a ``"magnitude"`` leaf.
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


def _is_module(fn) -> bool:
  try:
    from flax import nnx  # pylint: disable=g-import-not-at-top
  except ImportError:  # pragma: no cover
    return False
  return isinstance(fn, nnx.Module)


def split_args(fn, params, batches):
  """Accepts ``(apply_fn, params, batches)`` and ``(nnx_module, batches)``."""
  if _is_module(fn):
    if batches is not None and params is not None:
      raise TypeError("for an nnx.Module pass (module, batches): its nnx.Param state is pruned.")
    return None, params if batches is None else batches
  if batches is None:
    raise TypeError("batches are missing: pass (apply_fn, params, batches).")
  return params, batches


def schedule(sites: Mapping[int, stats_lib.Site], deps: Mapping[int, frozenset],
             sequential: bool, layers_per_pass: int | None) -> list[list[int]]:
  """Stages of leaves; a leaf comes after every leaf that influences its inputs.

  With ``sequential``, stage ``s`` holds the leaves whose inputs depend only on
  leaves of earlier stages (q/k/v of one attention share a stage); otherwise
  one stage holds all. ``layers_per_pass`` splits stages further (1 = one
  layer's statistics in memory at a time). Weights that feed each other's
  inputs in a cycle (shared across positions) go in one stage.
  """
  order = sorted(sites)
  if not sequential:
    stages = [order] if order else []
  else:
    pred = {k: {d for d in deps.get(k, ()) if d in sites and d != k} for k in order}
    stages, done, left = [], set(), list(order)
    while left:
      ready = [k for k in left if pred[k] <= done] or list(left)
      stages.append(ready)
      done |= set(ready)
      left = [k for k in left if k not in done]
  if layers_per_pass:
    stages = [s[i:i + layers_per_pass] for s in stages for i in range(0, len(s), layers_per_pass)]
  return stages


def _progress(total: int, enabled: bool, desc: str):
  if not enabled or not total:
    return None
  try:
    from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  return tqdm(total=total, desc=desc, unit="layer", disable=None)


@jax.jit
def _all_finite(leaves):
  return jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])


def _check_finite(method: str, model: stats_lib.Model, cand: Sequence[int]) -> None:
  """Raises ``ValueError`` naming the first weight to prune that holds NaN/Inf (one sync)."""
  if not cand:
    return
  ok = np.asarray(jax.device_get(_all_finite([model.leaves[k] for k in cand])))
  for k, good in zip(cand, ok):
    if not good:
      raise ValueError(f"{method}: the weight '{model.paths[k]}' (shape "
                       f"{tuple(np.shape(model.leaves[k]))}) holds NaN/Inf; N:M pruning of "
                       "non-finite weights is undefined.")


LeafFn = Callable[[jax.Array, stats_lib.Site, dict, int, int], tuple]


def run(method: str, leaf_fn: LeafFn, fn, params, batches, n: int, m: int, *,
        layouts: Mapping[str, layouts_lib.Layout] | None,
        policy: policy_lib.Policy | None, sequential: bool, layers_per_pass: int | None,
        hessian: bool, missing: Missing, progress: bool,
        callback: Callable[[LayerResult], Any] | None) -> tuple[PyTree, PyTree]:
  """Prunes every leaf that the policy selects with ``leaf_fn``; see the pruners' docs."""
  masks_lib._check_nm(n, m)  # pylint: disable=protected-access
  if missing not in ("error", "magnitude", "dense"):
    raise ValueError(f"missing must be 'error', 'magnitude' or 'dense', got {missing!r}.")
  params, batches = split_args(fn, params, batches)
  model = stats_lib.Model(fn, params)
  batches = list(batches)
  if not batches:
    raise ValueError("no calibration batches given.")
  if layouts is None:
    layouts = model.layouts(batches[0])
  decisions = policy_lib.plan(model.params, m, layouts=layouts, policy=policy)
  cand = [k for k, p in enumerate(model.paths) if decisions[p].prune]
  _check_finite(method, model, cand)
  tap = stats_lib.discover(model, batches[0], cand)

  sites: dict[int, stats_lib.Site] = {}
  fallback: dict[int, str] = {}
  for k in cand:
    d, found = decisions[model.paths[k]], tap.sites.get(k, [])
    if k in tap.missing:
      why = tap.missing[k]
    elif not found:
      why = "not consumed by a dot_general or convolution of the traced function"
    elif len(found) > 1:
      why = "consumed by matmuls of different layouts"
    elif tuple(d.axis) != found[0].group_axes:
      why = (f"the policy groups it along axes {tuple(d.axis)} but its matmul contracts "
             f"{found[0].group_axes}")
    else:
      sites[k] = found[0]
      continue
    fallback[k] = why
  if fallback and missing == "error":
    lines = "\n".join(f"  {model.paths[k]} (shape {tuple(np.shape(model.leaves[k]))}): {why}"
                      for k, why in fallback.items())
    raise ValueError(
        f"{method} found no calibration inputs for {len(fallback)} weight(s) to prune:\n{lines}\n"
        "Exclude them (jasp.Policy(exclude=...)) or pass missing='magnitude' or 'dense'.")

  leaves = list(model.leaves)
  masks: dict[int, jax.Array] = {}
  bar = _progress(len(sites) + (len(fallback) if missing == "magnitude" else 0), progress,
                  method)

  def report(res: LayerResult):
    log.info("%s %s %s: %s rows, error %s, %.3f s", method, res.path, res.shape, res.rows,
             res.error, res.seconds)
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
      report(LayerResult(model.paths[k], tuple(np.shape(leaves[k])), "magnitude", -1, 0, None,
                         time.perf_counter() - t0, 0.0, why))

    for si, stage in enumerate(schedule(sites, tap.deps, sequential, layers_per_pass)):
      t0 = time.perf_counter()
      acc = stats_lib.accumulate(model, leaves, batches, {k: sites[k] for k in stage},
                                 hessian=hessian)
      jax.block_until_ready(acc)
      stage_s = time.perf_counter() - t0
      for k in stage:
        t1 = time.perf_counter()
        a = acc.pop(k)
        new, mask, err = leaf_fn(leaves[k], sites[k], a, n, m)
        err, rows = jax.device_get((err, a["count"]))
        if err is not None and not np.isfinite(err):
          raise FloatingPointError(
              f"{method} produced non-finite weights for '{model.paths[k]}' (shape "
              f"{tuple(np.shape(new))}); raise the damping or check the calibration data.")
        leaves[k], masks[k] = new, mask
        report(LayerResult(model.paths[k], tuple(np.shape(new)), method, si, int(rows),
                           None if err is None else float(err), time.perf_counter() - t1,
                           stage_s))
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

