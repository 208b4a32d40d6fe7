"""Which parameters are matmul/conv weights, along which axes, and what feeds them.

The analysis behind :func:`jasp.trace_layouts` and the calibration pruners
(:func:`jasp.wanda_prune`, :func:`jasp.sparsegpt_prune`): the model is traced
to a jaxpr and walked once (:mod:`jasp._jaxpr`), following every parameter
leaf forward.

**What a weight is.** A parameter is the weight of a matmul or convolution,
and may be pruned N:M along that operation's reduction axes, only if it
reaches the *weight operand* of a ``dot_general`` or ``conv_general_dilated``
through layout-preserving operations, and the other operand is not derived
from a parameter the same way. The layout-preserving operations are:

* casts and copies (``convert_element_type``, ``copy``, ``reduce_precision``,
  sharding annotations, ``optimization_barrier``, ``device_put``), ``neg``;
* ``transpose``, ``reshape``/``squeeze``/``expand_dims`` that do not split a
  weight axis, ``broadcast_in_dim``, ``rev`` (a flip: the reduction axis is
  read reversed, which :class:`Site` records);
* a product or quotient with a value that depends neither on the model's
  inputs nor on another parameter (a scalar, a constant mask);
* ``concatenate`` along an axis the matmul does not reduce (an LSTM's gate
  kernels concatenated along their output axis);
* calls (``jit``, ``remat``, ``custom_jvp``/``custom_vjp``), and the slicing of
  a stacked parameter by ``scan`` (``nn.scan``, ``nnx.scan``, ``lax.scan`` over
  layers): the slice is a weight of the layer it feeds, and the stacked
  axis is never a reduction axis.

Anything else is a *use* that keeps the leaf dense, with the reason: an
elementwise product with an activation (norm scales, ``1 + scale``, gates), an
add (a bias), a gather (an embedding lookup; also a tied embedding that is
used through ``attend``), a scan carry, the model's output. Two weights
multiplied in sequence with nothing non-linear between and a smaller inner
size (``x @ A @ B``, ``A (in, r)``, ``B (r, out)``, ``r < in, out``) are the
factors of a low-rank update (LoRA): both stay dense, since 2:4 factors do not
make ``A @ B`` 2:4 and the rank-``r`` products gain nothing from sparse tensor
cores (merge the adapter, then prune the merged kernel).

**What feeds a weight.** For each weight use the analysis records a
:class:`Site`: its ``(K, O)`` matrix view (``Y = X @ W``) and which operand is
``X``; for a stacked weight also which scans index its layer axis. Values also
carry their *dependencies*: the weights whose matmuls influence them, per
stacked layer (``same`` or ``before`` the current iteration of a scan), which
orders sequential calibration.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jasp import _jaxpr
from jasp import _model
from jasp import _shapes

__all__ = [
  "Origin",
  "Site",
  "SiteUse",
  "Use",
  "WeightFlow",
  "analyse",
  "from_matrix",
  "to_matrix",
  "reshape_axis_map",
]

# A value axis holds these parameter axes (several when a reshape merged them),
# or None (an axis the parameter does not span: a broadcast).
AxisMap = tuple

# A dependency: (leaf, ((relation, scan key), ...)): the leaf's matmuls at the
# layers related so to the current iteration of each enclosing scan
# ("same" or "before"); a scan not named means all of its layers.
Dep = tuple


@dataclasses.dataclass(frozen=True)
class Origin:
  """A parameter leaf held by a value, and how.

  Attributes:
    leaf: the leaf's index in flatten order.
    amap: per value axis, the leaf axes it holds (see ``AxisMap``).
    stack: ``((leaf axis, scan key), ...)``: leaf axes sliced away by
      enclosing scans, outermost first.
    flip: value axes read in reverse order of their leaf axis.
    part: value axes where the leaf fills only a part (a concatenation).
  """

  leaf: int
  amap: AxisMap
  stack: tuple = ()
  flip: frozenset = frozenset()
  part: frozenset = frozenset()


@dataclasses.dataclass(frozen=True)
class Val:
  """The analysis' value of a jaxpr variable.

  Attributes:
    origins: parameter leaves held through layout-preserving operations.
    tainted: depends on the model's inputs (an activation).
    deps: ``Dep`` entries of the weights whose matmuls influence the value.
    linear: leaves whose matmul produced this value with nothing non-linear
      after it (to spot low-rank factor pairs).
    lowrank: ``(A, B)`` leaf pairs whose product ``(x @ A) @ B`` this value is
      (linearly), with ``B``'s reduction a bottleneck.
  """

  origins: tuple[Origin, ...] = ()
  tainted: bool = False
  deps: frozenset = frozenset()
  linear: frozenset = frozenset()
  lowrank: frozenset = frozenset()


EMPTY = Val()


def _join(vals: Sequence[Val]) -> Val:
  """Taint and dependencies of a value computed from ``vals`` (no origins)."""
  return Val((), any(v.tainted for v in vals), frozenset().union(*[v.deps for v in vals]))


@dataclasses.dataclass(frozen=True)
class Site:
  """How a weight (one layer of it, if stacked) is consumed: its ``(K, O)`` matrix view.

  ``Y = X @ W`` with ``W = to_matrix(w, site)`` of shape ``(K, O)`` and ``X``
  of shape ``(T, K)`` the matmul's other operand (a convolution's im2col
  patches). Sites compare and hash by geometry only, so jitted code keyed on a
  Site is shared by weights of the same shapes and layout.

  Attributes:
    path: the leaf's path string.
    kind: ``"dot"`` or ``"conv"``.
    shape: the shape of one layer: the leaf's shape without its stacked axes.
    perm: axes (of ``shape``) in matrix order: the ``rows`` row axes
      (flattened row-major into ``K``), then the column axes (into ``O``).
    rows: how many leading entries of ``perm`` are row axes.
    groups: ``G``, the feature groups of a grouped convolution (1 otherwise);
      the ``O`` columns split into ``G`` consecutive blocks.
    group_axes: the axes (of ``shape``) along which the N:M groups run; the
      innermost row axes, so aligned groups of ``m`` rows are N:M groups.
    flip: axes (of ``shape``) that the matmul reads reversed (``jnp.flip``).
  """

  path: str = dataclasses.field(default="", compare=False)
  kind: str = "dot"
  shape: tuple[int, ...] = ()
  perm: tuple[int, ...] = ()
  rows: int = 0
  groups: int = 1
  group_axes: tuple[int, ...] = ()
  flip: tuple[int, ...] = ()

  @property
  def k(self) -> int:
    """Input features per group (rows of the matrix view)."""
    return int(np.prod([self.shape[a] for a in self.perm[: self.rows]], dtype=np.int64))

  @property
  def o(self) -> int:
    """Output features, all groups together (columns of the matrix view)."""
    return int(np.prod([self.shape[a] for a in self.perm[self.rows :]], dtype=np.int64))


def to_matrix(w: jax.Array, site: Site) -> jax.Array:
  """The ``(K, O)`` matrix view of a weight (one layer) of shape ``site.shape``."""
  if site.flip:
    w = jnp.flip(w, site.flip)
  return jnp.transpose(w, site.perm).reshape(site.k, site.o)


def from_matrix(wm: jax.Array, site: Site) -> jax.Array:
  """Inverse of :func:`to_matrix`: a ``(K, O)`` array back to ``site.shape``."""
  y = wm.reshape([site.shape[a] for a in site.perm])
  y = jnp.transpose(y, np.argsort(site.perm))
  return jnp.flip(y, site.flip) if site.flip else y


@dataclasses.dataclass(frozen=True)
class SiteUse:
  """One matmul/conv that reads a weight, as recorded by the analysis.

  Attributes:
    leaf: the weight's leaf index.
    site: its matrix view (one layer).
    operand: which operand of the equation is the weight (0 or 1).
    x_order: for a dot, the other operand's contracted dims in row order.
    stack: ``((leaf axis, scan key), ...)``: which scans index its stacked axes.
    deps: dependencies of the other operand (what its inputs depend on).
    eqn: the equation (a ``dot_general`` or ``conv_general_dilated``).
  """

  leaf: int
  site: Site
  operand: int
  x_order: tuple[int, ...]
  stack: tuple
  deps: frozenset
  eqn: Any = dataclasses.field(compare=False, repr=False)


@dataclasses.dataclass(frozen=True)
class Use:
  """One use of a leaf: ``kind`` ``"dot"``/``"conv"`` (with the reduced and free
  leaf axes) or ``"other"`` (with ``what`` it is)."""

  kind: str
  axes: tuple[int, ...] = ()
  out_axes: tuple[int, ...] = ()
  stack: tuple[int, ...] = ()
  what: str = ""


def reshape_axis_map(amap: AxisMap, old: Sequence[int], new: Sequence[int]) -> AxisMap | None:
  """Maps an axis map through a reshape that splits/merges; None if a traced axis splits."""
  runs = _shapes.reshape_runs(old, new)
  if runs is None:
    return None
  out: list = [None] * len(new)
  for ins, outs in runs:
    srcs = [amap[k] for k in ins if amap[k] is not None]
    if len(outs) == 1:  # merge (or identity); a new size-1 axis holds nothing
      merged = tuple(ax for s in srcs for ax in s)
      out[outs[0]] = merged or None
    elif len(outs) > 1 and srcs:  # a traced axis split in several
      return None
  return tuple(out)


# Value-preserving primitives with one operand per result.
_COPIES = frozenset(
  {
    "convert_element_type",
    "copy",
    "copy_p",
    "reduce_precision",
    "sharding_constraint",
    "mesh_cast",
    "reshard",
    "pvary",
    "device_put",
    "optimization_barrier",
    "neg",
  }
)


class WeightFlow(_jaxpr.Interpreter[Val]):
  """The analysis: walk a model's jaxpr, record each leaf's uses and each weight's sites.

  Results (after :func:`analyse`):
    uses: ``{leaf: {key: Use}}``.
    sites: ``{equation key: [SiteUse]}``.
    scans: ``{scan key: reverse}`` for every scan that slices a stacked weight.
  """

  def __init__(self, shapes: Sequence[tuple[int, ...]]):
    super().__init__()
    self.shapes = [tuple(s) for s in shapes]
    self.uses: dict[int, dict] = {}
    self.sites: dict[tuple, list[SiteUse]] = {}
    self.scans: dict[tuple, bool] = {}
    self._rank_k: dict[int, int] = {}  # leaf -> K of its matmul (low-rank factor check)
    self._in_while_cond = False

  # -- records ----------------------------------------------------------------
  def _use(self, leaf: int, key: Any, use: Use) -> None:
    self.uses.setdefault(leaf, {})[key] = use

  def other(self, eqn, vals: Sequence[Val], what: str) -> None:
    for v in vals:
      for o in v.origins:
        self._use(o.leaf, (self.key(eqn), "other", what), Use("other", what=what))

  # -- domain -----------------------------------------------------------------
  def literal(self, lit):
    return EMPTY

  def constant(self, var, value):
    return EMPTY

  def primitive(self, eqn, ins):
    name = eqn.primitive.name
    rule = _RULES.get(name)
    if rule is not None:
      return rule(self, eqn, ins)
    if name in _COPIES and len(eqn.invars) == len(eqn.outvars):
      return list(ins)
    if any(v.origins for v in ins):
      self.other(eqn, ins, f"'{name}'")
    return [_join(ins)] * len(eqn.outvars)

  # -- control flow -----------------------------------------------------------
  def scan(self, eqn, scan, ins):
    key = self.key(eqn)
    consts, init, xs = scan.split_in(ins)
    stacked_leaves: set[int] = set()
    sliced = [self._scan_slice(eqn, key, v, stacked_leaves) for v in xs]
    if stacked_leaves:
      self.scans[key] = scan.reverse
    for v in init:
      if v.origins:
        self.other(eqn, [v], "a scan carry")
    c_out, ys = self._scan_fixed_point(eqn, scan, key, consts, init, sliced)
    final = [Val((), v.tainted, frozenset(_leave(d, key) for d in v.deps)) for v in c_out]
    return final + [_scan_stack(v, key) for v in ys]

  def _scan_slice(self, eqn, key, v: Val, stacked_leaves: set[int]) -> Val:
    """The value of one scanned-over input inside the body: one slice of ``v``.

    Adds the leaves sliced along one of their axes to ``stacked_leaves``.
    """
    origins = []
    for o in v.origins:
      head = o.amap[0] if o.amap else None
      if 0 in o.part or 0 in o.flip or (head is not None and len(head) != 1):
        self._use(
          o.leaf,
          (key, "other", "scan"),
          Use("other", what="scanned over an axis that is not one of its own"),
        )
        continue
      if head is not None:
        stacked_leaves.add(o.leaf)
      stack = o.stack + ((head[0], key),) if head is not None else o.stack
      origins.append(
        Origin(
          o.leaf,
          o.amap[1:],
          stack,
          frozenset(a - 1 for a in o.flip),
          frozenset(a - 1 for a in o.part),
        )
      )
    deps = frozenset(_enter(d, key, stacked_leaves) for d in v.deps)
    return Val(tuple(origins), v.tainted, deps, frozenset())

  def _scan_fixed_point(self, eqn, scan, key, consts, init, sliced):
    """Walks the body until the carry's taint and dependencies stop growing.

    Returns the body's carry and stacked outputs of the last walk.
    """
    carry = [Val((), v.tainted, v.deps) for v in init]
    for _ in range(8):  # taint and dependencies grow monotonically to a fixed point
      outs = self.walk(eqn, "body", scan.body, consts + carry + sliced)
      c_out, ys = scan.split_out(outs)
      for v in c_out:
        if v.origins:
          self.other(eqn, [v], "a scan carry")
      new = [
        Val((), a.tainted or b.tainted, a.deps | frozenset(_shift(d, key) for d in b.deps))
        for a, b in zip(carry, c_out)
      ]
      if new == carry:
        break
      carry = new
    return c_out, ys

  def cond(self, eqn, cond, ins):
    index, ops = ins[0], ins[1:]
    if index.origins:
      self.other(eqn, [index], "a branch index")
    outs, *rest = self.walk_branches(eqn, cond, ops)
    for got in rest:
      outs = [
        Val(
          a.origins + tuple(o for o in b.origins if o not in a.origins),
          a.tainted or b.tainted,
          a.deps | b.deps,
        )
        for a, b in zip(outs, got)
      ]
    return [Val(v.origins, v.tainted or index.tainted, v.deps | index.deps) for v in outs]

  def while_loop(self, eqn, loop, ins):
    cconsts, bconsts, init = loop.split_in(ins)
    for v in init:
      if v.origins:
        self.other(eqn, [v], "a while-loop carry")
    carry = [Val((), v.tainted, v.deps) for v in init]
    for _ in range(8):
      outs = self.walk(eqn, "body", loop.body, bconsts + carry)
      new = [Val((), a.tainted or b.tainted, a.deps | b.deps) for a, b in zip(carry, outs)]
      if new == carry:
        break
      carry = new
    saved, self._in_while_cond = self._in_while_cond, True
    try:
      (pred,) = self.walk(eqn, "cond", loop.cond, cconsts + carry)
    finally:
      self._in_while_cond = saved
    return [Val((), v.tainted or pred.tainted, v.deps | pred.deps) for v in carry]

  # -- matmuls ----------------------------------------------------------------
  def weight_site(
    self,
    eqn,
    side: int,
    origin: Origin,
    x: Val,
    site: Site | None,
    x_order: tuple,
    why: str,
    axes: tuple,
    out_axes: tuple,
    kind: str,
  ) -> None:
    key = self.key(eqn)
    if site is None:
      self._use(origin.leaf, (key, side), Use("other", what=why))
      return
    if self._in_while_cond:
      self._use(origin.leaf, (key, side), Use("other", what="a matmul in a while-loop condition"))
      return
    stack_axes = tuple(a for a, _ in origin.stack)
    self._use(origin.leaf, (key, side), Use(kind, axes, out_axes, stack_axes))
    uses = self.sites.setdefault(key, [])
    su = SiteUse(origin.leaf, site, side, x_order, origin.stack, x.deps, eqn)
    uses[:] = [u for u in uses if (u.leaf, u.operand) != (origin.leaf, side)] + [su]
    self._rank_k[origin.leaf] = site.k

  def bottleneck(self, a: int, site: Site) -> bool:
    """Whether ``(z @ A) @ B`` (``B`` at ``site``) narrows to fewer features than both sides."""
    return site.k < self._rank_k.get(a, 0) and site.k < site.o // site.groups

  def lowrank(self, eqn, pair: tuple[int, int]) -> None:
    why = (
      "a low-rank factor: its matmul and another one run in sequence with nothing "
      "non-linear between, through a bottleneck, and are added to an activation (a LoRA "
      "adapter); kept dense, as 2:4 factors do not make their product 2:4 (merge the "
      "adapter, then prune the merged kernel)"
    )
    for leaf in pair:
      self._use(leaf, (self.key(eqn), "lowrank"), Use("other", what=why))


def _scan_stack(v: Val, key) -> Val:
  """A scan's stacked output: the body's value ``v`` with the layer axis in front."""
  origins = []
  for o in v.origins:
    ax = [a for a, k in o.stack if k == key]
    amap = ((ax[0],) if ax else None,) + tuple(o.amap)
    origins.append(
      Origin(
        o.leaf,
        amap,
        tuple(st for st in o.stack if st[1] != key),
        frozenset(a + 1 for a in o.flip),
        frozenset(a + 1 for a in o.part),
      )
    )
  return Val(tuple(origins), v.tainted, frozenset(_leave(d, key) for d in v.deps))


def _enter(dep: Dep, key, stacked: set) -> Dep:
  leaf, rel = dep
  return (leaf, rel + (("same", key),)) if leaf in stacked else dep


def _shift(dep: Dep, key) -> Dep:
  leaf, rel = dep
  return (leaf, tuple(("before", k) if k == key else (r, k) for r, k in rel))


def _leave(dep: Dep, key) -> Dep:
  leaf, rel = dep
  return (leaf, tuple((r, k) for r, k in rel if k != key))


# ----------------------------------------------------------------------------
# Rules for primitives that keep a weight's provenance or consume it.


def _map_origins(val: Val, fn) -> tuple[list[Origin], list[tuple[int, str]]]:
  """Applies ``fn(origin) -> Origin | str`` (a str: why it is not followed)."""
  keep, lost = [], []
  for o in val.origins:
    r = fn(o)
    if isinstance(r, str):
      lost.append((o.leaf, r))
    else:
      keep.append(r)
  return keep, lost


def _follow(flow: WeightFlow, eqn, val: Val, fn) -> list[Val]:
  keep, lost = _map_origins(val, fn)
  for leaf, why in lost:
    flow._use(leaf, (flow.key(eqn), "other", why), Use("other", what=why))
  return [Val(tuple(keep), val.tainted, val.deps, val.linear, val.lowrank)]


def _transpose(flow, eqn, ins):
  perm = eqn.params["permutation"]
  inv = {p: i for i, p in enumerate(perm)}

  def fn(o):
    return Origin(
      o.leaf,
      tuple(o.amap[p] for p in perm),
      o.stack,
      frozenset(inv[a] for a in o.flip),
      frozenset(inv[a] for a in o.part),
    )

  return _follow(flow, eqn, ins[0], fn)


def _reshape(flow, eqn, ins):
  old, new = eqn.invars[0].aval.shape, eqn.outvars[0].aval.shape
  runs = _shapes.reshape_runs(old, new)

  def fn(o):
    amap = reshape_axis_map(o.amap, old, new)
    if amap is None or runs is None:
      return "a reshape that splits a weight axis"
    flip, part = set(), set()
    for olds, news in runs:
      marked = [a for a in olds if a in o.flip or a in o.part]
      if not marked:
        continue
      if len(news) != 1 or len([a for a in olds if old[a] != 1]) != 1:
        return "a reshape of a reversed or concatenated weight axis"
      (flip if marked[0] in o.flip else part).add(news[0])
    return Origin(o.leaf, amap, o.stack, frozenset(flip), frozenset(part))

  return _follow(flow, eqn, ins[0], fn)


def _broadcast(flow, eqn, ins):
  dims = eqn.params["broadcast_dimensions"]
  nd = len(eqn.outvars[0].aval.shape)
  in_shape = eqn.invars[0].aval.shape
  out_shape = eqn.outvars[0].aval.shape

  def fn(o):
    amap = [None] * nd
    for k, d in enumerate(dims):
      if in_shape[k] != out_shape[d] and o.amap[k] is not None:
        return "a broadcast that repeats a weight axis"
      amap[d] = o.amap[k]
    return Origin(
      o.leaf,
      tuple(amap),
      o.stack,
      frozenset(dims[a] for a in o.flip),
      frozenset(dims[a] for a in o.part),
    )

  return _follow(flow, eqn, ins[0], fn)


def _rev(flow, eqn, ins):
  dims = set(eqn.params["dimensions"])

  def fn(o):
    return Origin(o.leaf, o.amap, o.stack, frozenset(o.flip ^ dims), o.part)

  return _follow(flow, eqn, ins[0], fn)


def _scale(flow, eqn, ins):
  """``mul``/``div``: a weight times a constant is the weight; times an activation it is not."""
  a, b = ins
  name = eqn.primitive.name
  if a.origins and b.origins:
    flow.other(eqn, ins, "a product of two parameters")
    return [_join(ins)]
  if not a.origins and not b.origins:
    # x * c and x / c stay linear in x; a product of two activations (a gate) does not.
    out = _join(ins)
    keep_a = not b.tainted
    keep_b = not a.tainted and name == "mul"
    return [
      Val(
        (),
        out.tainted,
        out.deps,
        (a.linear if keep_a else frozenset()) | (b.linear if keep_b else frozenset()),
        (a.lowrank if keep_a else frozenset()) | (b.lowrank if keep_b else frozenset()),
      )
    ]
  w, s = (a, b) if a.origins else (b, a)
  if name == "div" and w is b:
    flow.other(eqn, [w], "the divisor of a quotient")
    return [_join(ins)]
  if s.tainted:
    flow.other(eqn, [w], "an elementwise product with an activation (a norm scale or a gate)")
    return [_join(ins)]
  return [Val(w.origins, w.tainted, w.deps | s.deps, w.linear)]


def _select(flow, eqn, ins):
  """``select_n(pred, *cases)``: a weight chosen by a constant mask (``where(mask, w, 0)``)."""
  pred, cases = ins[0], ins[1:]
  holders = [v for v in cases if v.origins]
  if (
    len(holders) == 1
    and not pred.tainted
    and not pred.origins
    and not any(v.tainted for v in cases)
  ):
    w = holders[0]
    out = _join(ins)
    return [Val(w.origins, False, out.deps)]
  if any(v.origins for v in ins):
    flow.other(eqn, ins, "'select_n' (a where)")
  return [_join(ins)]


def _add(flow, eqn, ins):
  """Adds: a weight added to anything is not a matmul weight; spots LoRA updates."""
  if any(v.origins for v in ins):
    flow.other(eqn, ins, f"'{eqn.primitive.name}' (a bias or a sum with another value)")
  a, b = ins
  for u, v in ((a, b), (b, a)):
    if u.lowrank and v.tainted:  # base(x) + (x @ A) @ B: a low-rank update
      for pair in u.lowrank:
        flow.lowrank(eqn, pair)
  return [_join(ins)]


def _concatenate(flow, eqn, ins):
  d = eqn.params["dimension"]
  out = _join(ins)
  origins = []
  for v in ins:
    for o in v.origins:
      origins.append(Origin(o.leaf, o.amap, o.stack, o.flip, o.part | {d}))
  return [Val(tuple(origins), out.tainted, out.deps)]


def _no_site(why: str) -> tuple:
  """:func:`_dot_site`'s answer for a weight operand that is not read as a matrix."""
  return None, (), (), (), why


def _local_axes(flow: WeightFlow, o: Origin) -> tuple[list[int], dict[int, int]]:
  """The leaf axes of one layer's slice (stacked axes removed), and leaf -> slice axis."""
  stack = [a for a, _ in o.stack]
  local = [a for a in range(len(flow.shapes[o.leaf])) if a not in stack]
  return local, {a: i for i, a in enumerate(local)}


def _contracted_pairs(o: Origin, contract_w, batch_w, contract_x) -> tuple[list, str]:
  """The contracted axes of a dot_general's weight operand, or why it is no matrix.

  Returns:
    ``(pairs, "")`` with ``pairs`` the sorted ``(leaf axes, x axis, reversed)``
    of every contracted weight axis, or ``([], why)``.
  """
  if any(o.amap[d] is not None for d in batch_w):
    return [], "a batched dot_general (one weight per batch entry)"
  pairs = []
  for dw, dx in zip(contract_w, contract_x):
    if o.amap[dw] is None:
      return [], "a dot_general contracting a broadcast axis of the weight"
    if dw in o.part:
      return [], "concatenated with other operands along its contracted axis"
    if dw in o.flip and len(o.amap[dw]) != 1:
      return [], "a reversed axis merged with others"
    pairs.append((o.amap[dw], dx, dw in o.flip))
  return sorted(pairs), ""


def _consecutive(axes: tuple[int, ...]) -> bool:
  """Whether ``axes`` is a non-empty run ``a, a+1, ...``."""
  return bool(axes) and list(axes) == list(range(axes[0], axes[0] + len(axes)))


def _dot_site(flow: WeightFlow, o: Origin, contract_w, batch_w, contract_x):
  """``(site, x_order, axes, out_axes, why)`` of a weight operand of a dot_general."""
  pairs, why = _contracted_pairs(o, contract_w, batch_w, contract_x)
  if why:
    return _no_site(why)
  shape = flow.shapes[o.leaf]
  local, to_local = _local_axes(flow, o)
  rows = tuple(a for ax, _, _ in pairs for a in ax)
  if not _consecutive(rows):
    return _no_site(f"a dot_general contracting the weight axes {rows} out of order")
  lrows = tuple(to_local[a] for a in rows)
  if not _consecutive(lrows):
    return _no_site("its contracted axes are not consecutive in one layer")
  cols = tuple(i for i in range(len(local)) if i not in lrows)
  flip = tuple(sorted(to_local[ax[0]] for ax, _, f in pairs if f))
  site = Site("", "dot", tuple(shape[a] for a in local), lrows + cols, len(lrows), 1, lrows, flip)
  free = tuple(sorted(a for a in local if a not in rows))
  return site, tuple(dx for _, dx, _ in pairs), rows, free, ""


def _dot(flow, eqn, ins):
  (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
  dims = ((lc, lb), (rc, rb))
  out = _join(ins)
  deps, linear, lowrank = out.deps, frozenset(), frozenset()
  if ins[0].origins and ins[1].origins:
    flow.other(eqn, ins[:2], "a product of two parameters")
  else:
    for side in (0, 1):
      x = ins[1 - side]
      for o in ins[side].origins:
        site, x_order, axes, free, why = _dot_site(
          flow, o, dims[side][0], dims[side][1], dims[1 - side][0]
        )
        flow.weight_site(eqn, side, o, x, site, x_order, why, axes, free, "dot")
        if site is None:
          continue
        linear = linear | {o.leaf}
        deps = deps | {(o.leaf, tuple(("same", k) for _, k in o.stack))}
        lowrank = lowrank | {
          (a, o.leaf) for a in x.linear if a != o.leaf and flow.bottleneck(a, site)
        }
  if len(ins) > 2 and any(v.origins for v in ins[2:]):
    flow.other(eqn, ins[2:], "'dot_general'")
  return [Val((), out.tainted, deps, linear, lowrank)]


def _conv_refusal(p: dict[str, Any], o: Origin, spec: list[int]) -> str:
  """Why a convolution's kernel operand is not read as a plain kernel ("" when it is)."""
  dn = p["dimension_numbers"]
  if p.get("batch_group_count", 1) != 1:
    return "a batch-grouped convolution"
  if o.part:
    return "a kernel concatenated with other operands"
  if any(o.amap[d] is not None and len(o.amap[d]) != 1 for d in spec):
    return "a kernel reshaped before the convolution"
  if o.amap[dn.rhs_spec[1]] is None or o.amap[dn.rhs_spec[0]] is None:
    return "a kernel broadcast along its input or output channels"
  return ""


def _conv_site(flow: WeightFlow, p: dict[str, Any], o: Origin, spec: list[int]) -> Site:
  """The :class:`Site` of a convolution's kernel (``spec``: its spatial, in, out axes)."""
  dn = p["dimension_numbers"]
  shape = flow.shapes[o.leaf]
  local, to_local = _local_axes(flow, o)
  perm = tuple(to_local[o.amap[d][0]] for d in spec if o.amap[d] is not None)
  lone = tuple(i for i in range(len(local)) if i not in perm)  # size-1 axes squeezed away
  perm = lone + perm
  flip = tuple(sorted(to_local[o.amap[d][0]] for d in spec if d in o.flip))
  i_ax = to_local[o.amap[dn.rhs_spec[1]][0]]
  return Site(
    "",
    "conv",
    tuple(shape[a] for a in local),
    perm,
    len(perm) - 1,
    int(p.get("feature_group_count", 1)),
    (i_ax,),
    flip,
  )


def _conv(flow, eqn, ins):
  lhs, rhs = ins[0], ins[1]
  out = _join(ins)
  p = eqn.params
  if lhs.origins:
    flow.other(eqn, [lhs], "the input (not the kernel) of a convolution")
  if lhs.origins and rhs.origins:
    flow.other(eqn, [rhs], "a product of two parameters")
    return [out]
  dn = p["dimension_numbers"]
  spec = list(dn.rhs_spec[2:]) + [dn.rhs_spec[1], dn.rhs_spec[0]]
  linear = frozenset()
  for o in rhs.origins:
    why = _conv_refusal(p, o, spec)
    if why:
      flow.weight_site(eqn, 1, o, lhs, None, (), why, (), (), "conv")
      continue
    site = _conv_site(flow, p, o, spec)
    local, _ = _local_axes(flow, o)
    in_axis = (local[site.group_axes[0]],)
    out_axis = (o.amap[dn.rhs_spec[0]][0],)
    flow.weight_site(eqn, 1, o, lhs, site, (), "", in_axis, out_axis, "conv")
    linear = linear | {o.leaf}
    out = Val((), out.tainted, out.deps | {(o.leaf, tuple(("same", k) for _, k in o.stack))})
  return [Val((), out.tainted, out.deps, linear)]


def _gather(flow, eqn, ins):
  if ins[0].origins:
    flow.other(eqn, [ins[0]], "a gather (an embedding lookup or an indexed read)")
  if len(ins) > 1 and ins[1].origins:
    flow.other(eqn, ins[1:], "gather indices")
  return [_join(ins)]


_RULES = {
  "transpose": _transpose,
  "reshape": _reshape,
  "squeeze": _reshape,
  "expand_dims": _reshape,
  "broadcast_in_dim": _broadcast,
  "rev": _rev,
  "mul": _scale,
  "div": _scale,
  "select_n": _select,
  "add": _add,
  "add_any": _add,
  "sub": _add,
  "concatenate": _concatenate,
  "dot_general": _dot,
  "conv_general_dilated": _conv,
  "gather": _gather,
}


def analyse(traced: _model.Traced) -> WeightFlow:
  """Runs the analysis over a traced model.

  The first ``n_leaves`` inputs of the jaxpr are the parameter leaves (each
  its own origin and dependency), the next ``n_extra`` other state (no
  origins, not activations), the rest the model's inputs (activations).
  """
  jaxpr = traced.closed.jaxpr
  flow = WeightFlow(traced.shapes)
  args = []
  for k in range(len(jaxpr.invars)):
    if k < traced.n_leaves:
      nd = len(traced.shapes[k])
      args.append(Val((Origin(k, tuple((a,) for a in range(nd))),), False, frozenset({(k, ())})))
    elif k < traced.n_leaves + traced.n_extra:
      args.append(EMPTY)
    else:
      args.append(Val((), True))
  outs = flow.run(jaxpr, traced.closed.consts, args)
  for v in outs:
    for o in v.origins:
      flow._use(o.leaf, ("output",), Use("other", what="returned as an output"))
  return flow
