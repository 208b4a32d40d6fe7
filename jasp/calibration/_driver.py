"""The loop shared by the calibration pruners: plan, tap, schedule, prune layer by layer.

A pruner supplies one jitted function per leaf,
``leaf_fn(w, site, stats, n, m, split) -> (new_w, mask, error or None)``; the driver
decides which leaves are pruned (:func:`jasp.policy.plan`), finds their inputs
(:mod:`jasp.calibration.stats`), orders them so that a layer is calibrated on the
outputs of the already-pruned layers before it, streams the calibration
batches once per stage, and reports each layer (progress bar, callback,
``logging``).

Batches sharded along their leading axis over a mesh (``jax.sharding``) make
the statistics data-parallel (the sums become all-reduces); ``split`` then
names how a weight's ``(G, K, O/G)`` matrix view may be split over the same
devices by output columns (:func:`solve_split`), for a pruner whose per-leaf
work is independent per output (SparseGPT's solve), or None.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
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


LeafFn = Callable[[jax.Array, stats_lib.Site, dict, int, int, Any], tuple]


def data_axes(batches: Sequence[Any]) -> tuple[Any, tuple[str, ...]] | None:
  """``(mesh, axes)`` the batches' leading axis is sharded along, or None.

  Read from the first array of the first batch that has a
  :class:`jax.sharding.NamedSharding` splitting its leading axis over more
  than one device.
  """
  for x in jax.tree_util.tree_leaves(batches[0] if batches else None):
    s = getattr(x, "sharding", None)
    if not isinstance(s, jax.sharding.NamedSharding) or not getattr(x, "ndim", 0):
      continue
    spec = tuple(s.spec) + (None,) * x.ndim
    axes = spec[0]
    if axes is None:
      continue
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    if math.prod(s.mesh.shape[a] for a in axes) > 1:
      return s.mesh, axes
  return None


def solve_split(data: Any, site: stats_lib.Site) -> jax.sharding.NamedSharding | None:
  """How to split a weight's ``(G, K, O/G)`` matrix view by output columns, or None.

  ``data``: :func:`data_axes` of the batches. None when the batches are not
  sharded, their mesh axes are explicit (``jax.sharding.AxisType.Explicit``:
  the program's shardings are then the user's to state), or ``O/G`` does not
  divide over the devices.
  """
  if data is None:
    return None
  mesh, axes = data
  types = dict(zip(mesh.axis_names, getattr(mesh, "axis_types", ()) or ()))
  if any(types.get(a) == jax.sharding.AxisType.Explicit for a in axes):
    return None
  if (site.o // site.groups) % math.prod(mesh.shape[a] for a in axes):
    return None
  spec = jax.sharding.PartitionSpec(None, None, axes if len(axes) > 1 else axes[0])
  return jax.sharding.NamedSharding(mesh, spec)


@functools.partial(jax.jit, static_argnames=("axes",))
def _take(x: jax.Array, layer: tuple, axes: tuple[int, ...]) -> jax.Array:
  """``x``'s layer ``layer`` along its stacked ``axes`` (those axes removed).

  The layer index is traced: one program per shape, whatever the layer.
  """
  for a, i in sorted(zip(axes, layer), reverse=True):
    x = jax.lax.dynamic_index_in_dim(x, i, a, keepdims=False)
  return x


@jax.jit
def _slot(acc: Mapping[str, jax.Array], slot) -> dict:
  """Slot ``slot`` (traced) of every accumulated statistic."""
  return {name: jax.lax.dynamic_index_in_dim(v, slot, 0, keepdims=False) for name, v in acc.items()}


def _put_layer(x, full, new, mask, layer, axes):
  """``x`` and the bool mask ``full`` (zeros when None) with layer ``layer`` set to ``new`` / ``mask``."""
  full = jnp.zeros(x.shape, bool) if full is None else full
  starts = [0] * x.ndim
  for a, i in zip(axes, layer):
    starts[a] = i
  expand = lambda v: jnp.expand_dims(v, tuple(sorted(axes)))
  x = jax.lax.dynamic_update_slice(x, expand(new).astype(x.dtype), starts)
  return x, jax.lax.dynamic_update_slice(full, expand(mask), starts)


# The first store of a leaf copies it (the user's array is never overwritten);
# later stores update the run's own copy in place (donated).
_put_copy = jax.jit(_put_layer, static_argnames=("axes",))
_put_in_place = jax.jit(_put_layer, static_argnames=("axes",), donate_argnums=(0, 1))


def _in_place_ok() -> bool:
  """Whether stores donate the run's own copies (XLA's CPU backend would warn that it cannot)."""
  return jax.default_backend() != "cpu"


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


def _is_array(x: Any) -> bool:
  """Whether ``x`` is an array the model's trace treats as an input (not a static value)."""
  return isinstance(x, (jax.Array, np.ndarray, jax.ShapeDtypeStruct))


def calibration_batches(method: str, batches: Any) -> list:
  """The calibration batches as a list, with the common mistakes caught early.

  One batch is the model's one input: the driver calls ``fn(params, batch)``
  (``module(batch)`` for nnx); a batch is an array or any pytree of arrays
  that the model takes as that single argument.

  Raises:
    TypeError: if ``batches`` is a single array or a mapping (one batch, not
      an iterable of batches), or a batch holds no array.
    ValueError: if there are no batches.
  """
  if _is_array(batches):
    raise TypeError(
      f"{method}: batches must be an iterable of batches, got a single array of shape "
      f"{tuple(np.shape(batches))}. Each batch is the model's input (fn(params, batch)); "
      "for one batch pass [x], or split the data into a list of batches."
    )
  if isinstance(batches, (Mapping, str, bytes)):
    raise TypeError(
      f"{method}: batches must be an iterable of batches, got a {type(batches).__name__}. "
      "Each batch is the model's input (fn(params, batch)); for one batch pass [batch]."
    )
  batches = list(batches)
  if not batches:
    raise ValueError("no calibration batches given.")
  for i, batch in enumerate(batches):
    if not any(_is_array(x) for x in jax.tree_util.tree_leaves(batch)):
      raise TypeError(
        f"{method}: batch {i} holds no array (got {type(batch).__name__}); each batch "
        "is the model's input (fn(params, batch)): an array or a pytree of arrays."
      )
  return batches


def _trace_batches(method: str, tapper: stats_lib.Tapper, batches: Sequence[Any]):
  """Traces the model on every batch shape; returns the first batch's analysis.

  Raises:
    TypeError: naming the batch, when the model fails on a batch that is a
      tuple or list (a data loader's ``(inputs, labels)`` pair passed whole);
      other failures propagate unchanged.
  """
  for i, batch in enumerate(batches):
    try:
      tapper.traced(batch)
    except Exception as e:
      if not isinstance(batch, (tuple, list)) or len(batch) < 2:
        raise
      raise TypeError(
        f"{method}: the model fails on batch {i}, a {type(batch).__name__} of "
        f"{len(batch)} items. Each batch is passed whole as the model's one input "
        "(fn(params, batch)); for a data loader of (inputs, labels) pairs pass the "
        "inputs alone: [x for x, _ in loader]. The model raised "
        f"{type(e).__name__}: {e}"
      ) from e
  return tapper.traced(batches[0])[1]


def _raise_untapped(method: str, model: _model.Model, fallback: Mapping[int, str]) -> None:
  """Raises ``ValueError`` listing the weights to prune without calibration inputs."""
  lines = "\n".join(
    f"  {model.paths[k]} (shape {tuple(np.shape(model.leaves[k]))}): {why}"
    for k, why in fallback.items()
  )
  raise ValueError(
    f"{method} found no calibration inputs for {len(fallback)} weight(s) to prune:\n{lines}\n"
    "Exclude them (jasp.Policy(exclude=...)) or pass missing='magnitude' or 'dense'."
  )


class _Reporter:
  """Reports each pruned layer: ``logging``, the progress bar, the user's callback."""

  def __init__(self, method: str, bar: Any, callback: Callable[[LayerResult], Any] | None):
    self.method, self.bar, self.callback = method, bar, callback

  def __call__(self, res: LayerResult) -> None:
    log.info(
      "%s %s%s %s: %s rows, error %s, %.3f s",
      self.method,
      res.path,
      list(res.layer) if res.layer else "",
      res.shape,
      res.rows,
      res.error,
      res.seconds,
    )
    if self.bar is not None:
      self.bar.update(1)
      self.bar.set_postfix_str(res.path[-40:])
    if self.callback is not None:
      self.callback(res)

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()


@dataclasses.dataclass
class _Stream:
  """Block streaming of a sequential run over a scan-stacked model.

  Keeps, for every calibration batch, the carry entering one iteration (layer)
  of the stacked scan: the block's input activations, computed with the layers
  before it already pruned. A stage whose units all sit in that scan then runs
  only its own layers from those carries (nothing before the scan is
  re-evaluated past its input, nothing after it at all); moving on to a later
  layer runs the layers in between once. Without it each stage would run the
  whole model. Memory: one carry per batch.
  """

  tapper: stats_lib.Tapper
  batches: Sequence[Any]
  tapped: Mapping[int, _Tapped]
  flow: Any
  key: tuple | None = None
  at: int = 0
  carries: list | None = None

  @classmethod
  def of(cls, tapper, batches, tapped) -> _Stream | None:
    """A stream for these batches, or None when their shapes differ (one trace each)."""
    flow = tapper.single_trace(batches)
    return None if flow is None else cls(tapper, batches, tapped, flow)

  def window(self, stage: Sequence[Unit]) -> tuple[tuple, int, int] | None:
    """``(scan key, first layer, end layer)`` when every unit of ``stage`` is one
    layer of the same forward, top-level stacked scan; else None."""
    keys, layers = set(), []
    for k, idx in stage:
      stacks = {use.stack for use in self.tapped[k].uses}
      if len(stacks) != 1 or len(next(iter(stacks))) != 1:
        return None
      ((_, key),) = next(iter(stacks))
      keys.add(key)
      layers.append(idx[0])
    if len(keys) != 1:
      return None
    key = keys.pop()
    if self.flow.scans.get(key, True) or any(part != "call" for _, part in key[:-1]):
      return None  # a reverse scan, or one inside a loop or branch
    return key, min(layers), max(layers) + 1

  def accumulate(self, leaves, targets, key: tuple, start: int, end: int, hessian: bool):
    """The statistics of ``targets`` (layers ``start`` to ``end`` - 1) from the cached carries."""
    if self.key != key or self.at > start:
      self.reset()
      self.key = key
    if self.carries is None or self.at < start:
      _, self.carries = self.tapper.accumulate_window(
        leaves,
        self.batches,
        {},
        stats_lib.Window(key, start - self.at),
        self.at,
        self.carries,
        hessian=False,
      )
      self.at = start
    acc, _ = self.tapper.accumulate_window(
      leaves,
      self.batches,
      targets,
      stats_lib.Window(key, end - start),
      start,
      self.carries,
      hessian=hessian,
    )
    return acc

  def reset(self) -> None:
    self.key, self.at, self.carries = None, 0, None


@dataclasses.dataclass
class _Pruning:
  """The state of one calibration run: the leaves as pruned so far and their masks."""

  method: str
  model: _model.Model
  leaf_fn: LeafFn
  n: int
  m: int
  report: _Reporter
  leaves: list = dataclasses.field(default_factory=list)
  masks: dict[int, jax.Array] = dataclasses.field(default_factory=dict)
  stream: _Stream | None = None
  data: Any = None  # data_axes(batches)
  owned: set[int] = dataclasses.field(default_factory=set)  # stacked leaves copied by the run

  def magnitude(self, k: int, axis: Sequence[int], why: str) -> None:
    """Prunes leaf ``k`` by magnitude (a fallback without calibration inputs)."""
    t0 = time.perf_counter()
    leaves = self.leaves
    mask = masks_lib.nm_mask(leaves[k], self.n, self.m, axis)
    leaves[k] = jnp.where(mask, leaves[k], jnp.zeros((), leaves[k].dtype))
    self.masks[k] = jax.block_until_ready(mask)
    self.report(
      LayerResult(
        self.model.paths[k],
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

  def unit(self, stage: int, k: int, idx: tuple, target, acc: Mapping, stack_axes, stage_s):
    """Prunes one unit (leaf ``k``, layer ``idx``) on its accumulated statistics."""
    t1 = time.perf_counter()
    a = _slot(acc, target.layers.index(idx))
    w = _take(self.leaves[k], idx, stack_axes) if stack_axes else self.leaves[k]
    split = solve_split(self.data, target.site)
    new, mask, err = self.leaf_fn(w, target.site, a, self.n, self.m, split)
    err, rows = jax.device_get((err, a["count"]))
    if err is not None and not np.isfinite(err):
      raise FloatingPointError(
        f"{self.method} produced non-finite weights for '{self.model.paths[k]}'"
        f"{list(idx) if idx else ''} (shape {tuple(np.shape(new))}); raise the damping or "
        "check the calibration data."
      )
    self._store(k, (idx, stack_axes) if stack_axes else None, new, mask)
    self.report(
      LayerResult(
        self.model.paths[k],
        tuple(np.shape(new)),
        self.method,
        stage,
        int(rows),
        None if err is None else float(err),
        time.perf_counter() - t1,
        stage_s,
        layer=tuple(int(i) for i in idx),
      )
    )

  def _store(self, k: int, layer: tuple | None, new: jax.Array, mask: jax.Array) -> None:
    """Writes a pruned leaf (``layer``: ``(index, stacked axes)`` of one layer of it)
    and its mask, in the leaf's sharding.

    A stacked leaf is copied at its first store and updated in place after
    that. A solve split over devices returns its result split too; a leaf laid
    out over a mesh (``NamedSharding``) keeps that layout, so the later stages'
    forward passes run as the user laid the params out.
    """
    old, full = self.leaves[k], mask
    sharding = getattr(old, "sharding", None)  # read before ``old`` is donated
    if layer is not None:
      idx, axes = layer
      put = _put_in_place if k in self.owned and _in_place_ok() else _put_copy
      new, full = put(old, self.masks.get(k), new, mask, idx, axes=axes)
      self.owned.add(k)
    if isinstance(sharding, jax.sharding.NamedSharding) and new.sharding != sharding:
      new, full = jax.device_put((new, full), sharding)
    self.leaves[k], self.masks[k] = new, full

  def stage(self, si: int, stage: Sequence[Unit], tapped, tapper, batches, hessian) -> None:
    """One pass over the batches for the units of ``stage``, then prunes each."""
    t0 = time.perf_counter()
    want: dict[int, list] = {}
    for k, idx in stage:
      want.setdefault(k, []).append(idx)
    targets = {
      k: dataclasses.replace(tapped[k].target, layers=tuple(idxs)) for k, idxs in want.items()
    }
    window = None if self.stream is None else self.stream.window(stage)
    if window is not None:
      acc = self.stream.accumulate(self.leaves, targets, *window, hessian)
    else:
      if self.stream is not None:
        self.stream.reset()  # this stage may change what the cached carries came from
      acc = tapper.accumulate(self.leaves, batches, targets, hessian=hessian)
    jax.block_until_ready(acc)
    stage_s = time.perf_counter() - t0
    for k, idx in stage:
      stack_axes = tuple(ax for ax, _ in tapped[k].uses[0].stack)
      self.unit(si, k, idx, targets[k], acc[k], stack_axes, stage_s)


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
  """Prunes every leaf that the policy selects with ``leaf_fn``; see the pruners' docs.

  ``batches`` is an iterable of batches, each the model's one input (see
  :func:`calibration_batches`).
  """
  masks_lib.check_nm(n, m)
  if missing not in ("error", "magnitude", "dense"):
    raise ValueError(f"missing must be 'error', 'magnitude' or 'dense', got {missing!r}.")
  params, batches = split_args(fn, params, batches)
  model, _ = _model.adapt(fn, params, (), what=method)
  batches = calibration_batches(method, batches)
  tapper = stats_lib.Tapper(model)
  flow = _trace_batches(method, tapper, batches)
  if layouts is None:
    layouts = layouts_lib.from_analysis(model, flow)
  decisions = policy_lib.plan(model.tree, m, layouts=layouts, policy=policy)
  cand = [k for k, p in enumerate(model.paths) if decisions[p].prune]
  _check_finite(method, model, cand)
  tapped, fallback = _tap_plan(model, flow, decisions, cand)
  if fallback and missing == "error":
    _raise_untapped(method, model, fallback)

  units = [(k, idx) for k, t in tapped.items() for idx in t.target.layers]
  preds = {u: _predecessors(u, tapped, flow.scans) for u in units}
  total = len(units) + (len(fallback) if missing == "magnitude" else 0)
  reporter = _Reporter(method, _progress(total, progress, method), callback)
  stream = _Stream.of(tapper, batches, tapped) if sequential else None
  state = _Pruning(
    method,
    model,
    leaf_fn,
    n,
    m,
    reporter,
    list(model.leaves),
    stream=stream,
    data=data_axes(batches),
  )
  try:
    for k, why in fallback.items():
      log.warning("%s: '%s' falls back to %s: %s", method, model.paths[k], missing, why)
      if missing == "magnitude":
        state.magnitude(k, decisions[model.paths[k]].axis, why)
    for si, stage in enumerate(schedule(units, preds, sequential, layers_per_pass)):
      state.stage(si, stage, tapped, tapper, batches, hessian)
  finally:
    reporter.close()

  new_params = model.rebuild(state.leaves)
  by_path = {model.paths[k]: mk for k, mk in state.masks.items()}
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
