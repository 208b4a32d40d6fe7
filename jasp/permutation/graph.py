"""Which parameters share a channel dimension: traced from the jaxpr.

Permuting a channel dimension of a network keeps its function when every
tensor axis that carries that dimension is permuted the same way: the output
axis of the layer that produces the channels, the per-channel parameters on
the way (bias, BatchNorm scale/bias/mean/var, LayerNorm scale/bias, depthwise
kernels), the input axis of every layer that consumes them, and everything tied
to them by residual adds. apex finds these groups with ``torch.fx``; here the
jaxpr of the model's apply function shows the same data flow, walked by the
shared engine of :mod:`jasp._jaxpr` (calls such as ``jit``, ``remat`` and
``custom_jvp`` are inlined).

The analysis is a union-find over *axes*: every axis of every value in the
jaxpr (parameters included) is a node, and every equation either ties axes that
carry the same channel index (an element-wise op ties each axis of its operands
to the same axis of its result; a ``dot_general`` ties the contracted axes of
its two operands; a transpose ties an axis to where it moves) or *pins* them:
marks them as axes whose order matters (a slice, a gather, a reverse, a spatial
axis of a convolution, the model's inputs and outputs, any primitive the
analysis does not know). A class of tied axes can be permuted unless pinned.

Reshapes and grouped convolutions give an axis a *product structure*: flattening
``(H, W, C)`` into one axis makes ``C`` its innermost factor, so a permutation
of ``C`` moves the flattened axis' entries within each ``(h, w)`` block (a
flatten from a conv into a Dense maps one channel to many rows). A grouped
convolution splits its input channels into ``(groups, channels per group)``.
Concatenation gives a *sum structure*: the result's axis is its operands' axes
side by side, each permuted on its own.

**Control flow.** A ``cond`` walks every branch on the same operands and ties
the branches' outputs together; a ``while`` loop ties its carry in and out (one
permutation for every iteration) and shares its constants.

**Scans.** A ``scan`` iterates its body over the leading axis of its scanned
operands (``xs``), threading a carry from one iteration to the next. How it is
read depends on what it scans:

* *Over stacked layers* (some scanned operand holds a parameter axis:
  ``nn.scan(..., variable_axes={"params": 0})``, ``nnx.scan`` over
  ``nnx.vmap``-created blocks, ``lax.scan`` over a stacked params tree): the
  body is walked once per iteration, as if unrolled. The carry's axes flow from
  iteration ``l``'s outputs to iteration ``l + 1``'s inputs (the initial carry
  is the scan's init operands, the final one its results); the constants are
  the same nodes in every iteration; each iteration gets its own nodes for the
  slices of the scanned operands. An axis of a scanned operand then gets a
  *stack structure*: one child class per layer, indexed by the operand's
  leading (layer) axis. So the channels internal to one layer (an MLP's hidden
  channels: the ``out`` axis of ``up (L, d, f)``, the ``in`` axis of ``down
  (L, f, d)``) are permuted per layer, each layer its own permutation, while
  channels carried across iterations (the residual stream) or read from the
  scan's constants are one class, permuted the same way in every layer. The
  layer axis itself is pinned (its order is the iteration order). Stacked
  outputs (``ys``) get the same stack structure over their layer axis.
* *Over anything else* (a sequence: an RNN over time steps, whose kernels are
  the scan's constants; or more than 4,096 layers): the body is walked once, the
  carry in and out tied as for a ``while`` loop and each slice tied to the whole
  scanned axis, so every iteration shares one permutation. This costs one walk
  of the body however long the scan.

A stack structure holds only while every tensor that carries the class also has
the layer axis: a stacked output contracted as a whole against an unstacked
weight, or a stacked operand broadcast from an unstacked one, carries the same
channels in every layer, so the analysis then ties all the layers' classes into
one (which any later tie keeps). Two stacks of one class over different layer
axes are tied into one the same way. A stack meeting a product or sum structure
distributes over it (each factor becomes a stack over the layers).

Anything unknown pins every axis it touches, so the permutations that come out
can only ever be ones the traced computation is equivariant to.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any

import numpy as np
from jax.extend import core as jcore

from jasp import _jaxpr
from jasp import _model
from jasp import _shapes

__all__ = ["ChannelGraph", "ChannelClass", "trace_channels", "trace_model"]

# Element-wise primitives: each result axis carries the same index as the
# same axis of every (non-scalar) operand.
_ELEMENTWISE = frozenset(
  {
    "add",
    "add_any",
    "sub",
    "mul",
    "div",
    "rem",
    "pow",
    "max",
    "min",
    "neg",
    "sign",
    "floor",
    "ceil",
    "round",
    "is_finite",
    "exp",
    "exp2",
    "log",
    "log1p",
    "expm1",
    "tanh",
    "logistic",
    "sin",
    "cos",
    "tan",
    "asin",
    "acos",
    "atan",
    "atan2",
    "sinh",
    "cosh",
    "asinh",
    "acosh",
    "atanh",
    "sqrt",
    "rsqrt",
    "cbrt",
    "integer_pow",
    "square",
    "abs",
    "erf",
    "erfc",
    "erf_inv",
    "lgamma",
    "digamma",
    "select_n",
    "clamp",
    "convert_element_type",
    "copy",
    "copy_p",
    "reduce_precision",
    "eq",
    "ne",
    "lt",
    "le",
    "gt",
    "ge",
    "and",
    "or",
    "not",
    "xor",
    "nextafter",
    "real",
    "imag",
    "conj",
    "sharding_constraint",
    "optimization_barrier",
    "pvary",
    "stop_gradient",
    "population_count",
    "shift_left",
    "shift_right_logical",
    "shift_right_arithmetic",
    "mesh_cast",
    "device_put",
  }
)
# Reductions: kept axes map to the result in order; the reduced axes do not
# matter (a sum, max or product over channels does not depend on their order).
_REDUCE = frozenset(
  {"reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "reduce_and", "reduce_or", "reduce_xor"}
)
# Reductions whose result depends on the order of the reduced axis.
_ARG_REDUCE = frozenset({"argmax", "argmin"})
_CUMULATIVE = frozenset({"cumsum", "cumprod", "cummax", "cummin", "cumlogsumexp"})
_WINDOW = frozenset(
  {"reduce_window_sum", "reduce_window_max", "reduce_window_min", "reduce_window"}
)

# A scan over stacked parameters is unrolled (one walk of the body per
# iteration) up to this many iterations; longer ones share one permutation.
_MAX_UNROLL = 4096

_LAYER_AXIS = "the layer axis of a scan (its order is the iteration order)"

# A layer key: ((layer-axis class, index), ...) sorted; binds stack structures
# to one of their children.
Key = tuple


@dataclasses.dataclass
class _Node:
  size: int
  parent: int
  kind: str | None = None  # None (atomic), "prod", "sum" or "stack"
  children: tuple[int, ...] = ()
  layer: int = -1  # "stack": the node of the layer axis that indexes the children
  pinned: str = ""  # why the order of this class matters ("" when free)
  param: bool = False  # holds a parameter axis (or a layer's slice of one)


class _UnionFind:
  """Classes of tensor axes that carry the same channel index."""

  def __init__(self):
    self.nodes: list[_Node] = []

  def new(self, size: int) -> int:
    self.nodes.append(_Node(int(size), len(self.nodes)))
    return len(self.nodes) - 1

  def find(self, a: int) -> int:
    root = a
    while self.nodes[root].parent != root:
      root = self.nodes[root].parent
    while self.nodes[a].parent != root:
      self.nodes[a].parent, a = root, self.nodes[a].parent
    return root

  def node(self, a: int) -> _Node:
    return self.nodes[self.find(a)]

  def pin(self, a: int, why: str) -> None:
    todo = [a]
    while todo:
      nd = self.node(todo.pop())
      if not nd.pinned:
        nd.pinned = why
      todo.extend(c for c in nd.children if not self.node(c).pinned)

  def _reaches(self, a: int, target: int) -> bool:
    """Whether class ``target`` lies inside the structure of class ``a``."""
    seen, todo = set(), [self.find(a)]
    while todo:
      r = todo.pop()
      if r in seen:
        continue
      seen.add(r)
      for c in self.nodes[r].children:
        rc = self.find(c)
        if rc == target:
          return True
        todo.append(rc)
    return False

  def _stacks_within(self, a: int) -> list[int]:
    """The stack classes inside class ``a``'s structure (itself included)."""
    out, seen, todo = [], set(), [self.find(a)]
    while todo:
      r = todo.pop()
      if r in seen:
        continue
      seen.add(r)
      if self.nodes[r].kind == "stack":
        out.append(r)
      todo.extend(self.find(c) for c in self.nodes[r].children)
    return out

  def union(self, a: int, b: int) -> None:
    ra, rb = self.find(a), self.find(b)
    if ra == rb:
      return
    na, nb = self.nodes[ra], self.nodes[rb]
    if na.size != nb.size:
      why = f"tied to an axis of another size ({na.size} vs {nb.size})"
      self.pin(ra, why)
      self.pin(rb, why)
      return
    if (na.children or nb.children) and (self._reaches(ra, rb) or self._reaches(rb, ra)):
      # A class tied to a part of itself: a layer's channels tied to the whole
      # stacked axis. Every layer then carries the same channels.
      stacks = self._stacks_within(ra) + self._stacks_within(rb)
      if not stacks:
        why = "tied to a part of its own structure"
        self.pin(ra, why)
        self.pin(rb, why)
        return
      for s in stacks:
        self.collapse(s)
      self.union(a, b)
      return
    na.parent = rb
    nb.param = nb.param or na.param
    pinned = nb.pinned or na.pinned
    if na.kind is not None:
      self.structure(rb, na.kind, na.children, na.layer)
    if pinned:
      self.pin(rb, pinned)

  def collapse(self, s: int) -> None:
    """Drops the stack structure of class ``s``: every layer carries its channels."""
    root = self.find(s)
    nd = self.nodes[root]
    if nd.kind != "stack":
      return
    children = nd.children
    nd.kind, nd.children, nd.layer = None, (), -1
    for c in children:
      self.union(c, root)

  def structure(self, a: int, kind: str, children: Sequence[int], layer: int = -1) -> None:
    """Gives ``a``'s class the structure ``kind`` over ``children`` (or ties it).

    ``"prod"``: the axis is the row-major product of the children's axes;
    ``"sum"``: their concatenation; ``"stack"``: child ``l`` is what the axis
    carries at index ``l`` of the layer axis ``layer`` (of the same tensor).
    A class that already has a structure must match it child for child;
    otherwise the class is pinned (two stacks over different layer axes are
    tied into one class instead; a stack and a product or sum distribute).
    """
    children = tuple(children)
    root = self.find(a)
    nd = self.nodes[root]
    sizes = [self.nodes[self.find(c)].size for c in children]
    if not self._admits(root, kind, children, sizes, layer):
      return
    if nd.kind is None:
      self._set_structure(root, kind, children, layer)
    elif nd.kind == kind == "stack":
      self._merge_stacks(root, children, layer)
    elif kind == "stack":  # a product or sum of stacks: each factor becomes a stack
      self._distribute(nd.kind, nd.children, children, layer)
    elif nd.kind == "stack":
      old, old_layer = nd.children, nd.layer
      self._set_structure(root, kind, children, -1)
      self._distribute(kind, children, old, old_layer)
    else:
      self._merge_splits(root, kind, children, sizes)

  def _admits(
    self, root: int, kind: str, children: tuple[int, ...], sizes: list[int], layer: int
  ) -> bool:
    """Whether ``root`` can take the structure; if not, ties or pins as :meth:`structure` says.

    A stack whose children differ in size from the axis, or in number from the
    layer axis, or that contains the class itself, ties its children to the
    class. A product or sum whose size differs from the axis pins them all.
    """
    nd = self.nodes[root]
    if kind == "stack":
      if (
        any(s != nd.size for s in sizes)
        or len(children) != self.node(layer).size
        or any(self.find(c) == root or self._reaches(c, root) for c in children)
      ):
        for c in children:
          self.union(c, root)
        return False
      return True
    total = int(np.prod(sizes)) if kind == "prod" else int(sum(sizes))
    if total != nd.size:
      self.pin(root, f"a {kind} of sizes {sizes} does not match its axis of size {nd.size}")
      for c in children:
        self.pin(c, "part of a mismatched structure")
      return False
    return True

  def _set_structure(self, root: int, kind: str, children: tuple[int, ...], layer: int) -> None:
    """Sets the structure of ``root``; a pinned class pins its new children."""
    nd = self.nodes[root]
    nd.kind, nd.children, nd.layer = kind, children, layer
    if nd.pinned:
      for c in children:
        self.pin(c, nd.pinned)

  def _merge_stacks(self, root: int, children: tuple[int, ...], layer: int) -> None:
    """A second stack on a stacked class: tied child by child, or collapsed.

    Two stacks over one layer axis tie child by child; over different layer
    axes the class collapses (every layer carries the same channels).
    """
    nd = self.nodes[root]
    if self.find(nd.layer) == self.find(layer):
      for c, d in zip(nd.children, children):
        self.union(c, d)
      return
    self.collapse(root)
    for c in children:
      self.union(c, root)

  def _merge_splits(
    self, root: int, kind: str, children: tuple[int, ...], sizes: list[int]
  ) -> None:
    """A second product or sum: tied child by child when it matches, else pinned."""
    nd = self.nodes[root]
    old = [self.nodes[self.find(c)].size for c in nd.children]
    if nd.kind == kind and old == sizes:
      for c, d in zip(nd.children, children):
        self.union(c, d)
      return
    why = f"split two incompatible ways ({nd.kind} {old} and {kind} {sizes})"
    self.pin(root, why)
    for c in children:
      self.pin(c, why)

  def _distribute(self, kind: str, parts: Sequence[int], layers: Sequence[int], layer: int) -> None:
    """A class that is ``kind`` over ``parts`` and a stack over ``layers``."""
    per = [[self.new(self.node(p).size) for _ in layers] for p in parts]
    for p, row in zip(parts, per):
      self.structure(p, "stack", row, layer)
    for i, c in enumerate(layers):
      self.structure(c, kind, [row[i] for row in per])

  # -- reading the classes ---------------------------------------------------
  def resolve(self, a: int, key: Mapping[int, int]) -> int:
    """``a``'s class, descending into the child of every stack that ``key`` binds."""
    r = self.find(a)
    while True:
      nd = self.nodes[r]
      if nd.kind != "stack":
        return r
      lam = self.find(nd.layer)
      if lam not in key:
        return r
      r = self.find(nd.children[key[lam]])

  def open_stacks(self, a: int, key: Mapping[int, int], out: list[int]) -> None:
    """Appends the stacks inside ``a`` (through products and sums) ``key`` leaves unbound."""
    r = self.resolve(a, key)
    nd = self.nodes[r]
    if nd.kind == "stack":
      out.append(r)
    else:
      for c in nd.children:
        self.open_stacks(c, key, out)

  def atoms(self, a: int, key: Mapping[int, int] | None = None) -> list[int]:
    """The atomic classes (roots) inside ``a``'s structure, sizes > 1.

    Stacks that ``key`` binds contribute their bound child; others all.
    """
    key = key or {}
    out: list[int] = []
    seen: set[int] = set()
    todo = [a]
    while todo:
      root = self.resolve(todo.pop(), key)
      if root in seen:
        continue
      seen.add(root)
      nd = self.nodes[root]
      if nd.kind is None:
        if nd.size > 1:
          out.append(root)
      else:
        todo.extend(reversed(nd.children))
    return out

  def occurrences(self, a: int, atom: int, key: Mapping[int, int]) -> list[tuple[Key, np.ndarray]]:
    """Where the channels of ``atom`` sit along axis ``a``.

    Returns:
      ``[(layers, positions)]``: ``positions`` int ``(contexts, size of atom)``:
      row ``r`` lists the indices of ``a`` (row-major over its structure) that
      hold channels ``0, 1, ...`` of ``atom`` in one context (one value of
      every other factor), at the layers ``layers`` (``((layer class,
      index), ...)`` of the stacks that ``key`` leaves open; ``()``: all).
    """
    root = self.resolve(a, key)
    nd = self.nodes[root]
    if nd.kind is None:
      return [((), np.arange(nd.size)[None, :])] if root == atom else []
    out = []
    if nd.kind == "stack":
      lam = self.find(nd.layer)
      for i, c in enumerate(nd.children):
        for lk, pos in self.occurrences(c, atom, key):
          bound = dict(lk)
          if bound.get(lam, i) != i:
            continue
          bound[lam] = i
          out.append((tuple(sorted(bound.items())), pos))
      return out
    sizes = [self.node(c).size for c in nd.children]
    if nd.kind == "sum":
      off = 0
      for c, s in zip(nd.children, sizes):
        out.extend((lk, pos + off) for lk, pos in self.occurrences(c, atom, key))
        off += s
      return out
    strides = [int(np.prod(sizes[i + 1 :])) for i in range(len(sizes))]
    for i, c in enumerate(nd.children):
      for lk, pos in self.occurrences(c, atom, key):
        others = [np.arange(s) * st for j, (s, st) in enumerate(zip(sizes, strides)) if j != i]
        base = np.zeros(1, np.int64)
        for o in others:
          base = (base[:, None] + o[None, :]).reshape(-1)
        out.append((lk, (base[:, None, None] + pos[None] * strides[i]).reshape(-1, pos.shape[1])))
    return out

  def positions(self, a: int, atom: int) -> np.ndarray | None:
    """:meth:`occurrences` of an unstacked axis as one array (None: absent)."""
    found = [pos for _, pos in self.occurrences(a, atom, {})]
    return np.concatenate(found) if found else None

  def induced(
    self, a: int, perms: Mapping[int, np.ndarray], key: Mapping[int, int] | None = None
  ) -> np.ndarray | None:
    """The permutation of axis ``a`` (at the layers ``key`` binds) induced by ``perms``.

    None: the identity. Raises ValueError when a stack is left unbound.
    """
    key = key or {}
    root = self.resolve(a, key)
    nd = self.nodes[root]
    if nd.kind is None:
      return perms.get(root)
    if nd.kind == "stack":
      parts = [self.induced(c, perms, key) for c in nd.children]
      if all(p is None for p in parts):
        return None
      raise ValueError("a stacked axis read without its layer")
    parts = [self.induced(c, perms, key) for c in nd.children]
    if all(p is None for p in parts):
      return None
    sizes = [self.node(c).size for c in nd.children]
    parts = [np.arange(s) if p is None else p for p, s in zip(parts, sizes)]
    if nd.kind == "sum":
      offs = np.cumsum([0] + sizes[:-1])
      return np.concatenate([p + o for p, o in zip(parts, offs)])
    grid = np.ix_(*parts)
    idx = np.ravel_multi_index(grid, sizes) if len(sizes) > 1 else parts[0]
    return np.asarray(idx).reshape(-1)

  # -- stacks that lost their layer axis ------------------------------------
  def _check(self, axes: Sequence[int], key: dict[int, int], bad: set[int]) -> None:
    """Collects the stacks in a tensor (axes ``axes``) whose layer axis it lacks."""
    res = [self.resolve(n, key) for n in axes]
    opens: list[int] = []
    for r in res:
      self.open_stacks(r, key, opens)
    lams: dict[int, int] = {}
    for s in opens:
      lam = self.find(self.nodes[s].layer)
      if res.count(lam) != 1:
        bad.add(s)
      else:
        lams.setdefault(lam, len(self.nodes[s].children))
    if bad or not lams:
      return
    lam, n = next(iter(lams.items()))
    for i in range(n):
      self._check(axes, {**key, lam: i}, bad)
      if bad:
        return

  def settle(self, tensors: Sequence[Sequence[int]]) -> None:
    """Ties the layers of every stack that some tensor carries without its layer axis."""
    for _ in range(64):
      bad: set[int] = set()
      for t in tensors:
        if any(self.nodes[self.find(n)].children for n in t):
          self._check(t, {}, bad)
      if not bad:
        return
      for s in bad:
        self.collapse(s)
    for t in tensors:  # pragma: no cover - a safety net: drop every stack left
      for n in t:
        for s in self._stacks_within(n):
          self.collapse(s)


@dataclasses.dataclass(frozen=True)
class ChannelClass:
  """One channel dimension of the network (an atomic class of tied axes).

  Attributes:
    id: the class id (a union-find root).
    size: its number of channels.
    members: ``(path, axis)`` of every parameter axis that carries it, directly
      or as a factor of a flattened/grouped axis.
    pinned: why its order must stay as it is ("" when it may be permuted).
    layers: for each member, the layer of a stacked leaf that carries it (a
      tuple of indices along the leaf's :meth:`ChannelGraph.stack_axes`), or
      None when every layer does (and for unstacked leaves).
  """

  id: int
  size: int
  members: tuple[tuple[str, int], ...]
  pinned: str
  layers: tuple[tuple[int, ...] | None, ...] = ()


class ChannelGraph:
  """The result of :func:`trace_channels`: channel classes of a model's parameters.

  A leaf stacked along a layer axis and run by a scan (``(L, d, f)``) may carry
  a different class in each layer (see the module doc): such a leaf has
  :meth:`stack_axes`, and the per-layer methods take a ``layer``: ``{leaf
  axis: index}`` (or a tuple of indices along :meth:`stack_axes`).

  Attributes:
    paths: path strings of the traced leaves, in flatten order.
    shapes: their shapes.
  """

  def __init__(
    self,
    uf: _UnionFind,
    paths: list[str],
    shapes: list[tuple[int, ...]],
    leaf_axes: list[list[int]],
  ):
    self._uf = uf
    self.paths = paths
    self.shapes = shapes
    self._leaf_axes = leaf_axes
    self._index = {p: i for i, p in enumerate(paths)}
    self._stacks: dict[int, tuple[int, ...]] = {}

  # -- layers ------------------------------------------------------------------
  def _leaf_key(self, i: int, layer: Mapping[int, int]) -> tuple[dict[int, int], dict[int, int]]:
    """``(key, axis_of)``: the stacks of leaf ``i`` bound by ``layer``, and for
    every layer class reached, the leaf axis that indexes it."""
    nodes = self._leaf_axes[i]
    key: dict[int, int] = {}
    axis_of: dict[int, int] = {}
    while True:
      res = [self._uf.resolve(n, key) for n in nodes]
      opens: list[int] = []
      for r in res:
        self._uf.open_stacks(r, key, opens)
      grew = False
      for s in opens:
        lam = self._uf.find(self._uf.nodes[s].layer)
        if lam in key or lam in axis_of:
          continue
        hits = [k for k, r in enumerate(res) if r == lam]
        if len(hits) != 1:
          continue
        axis_of[lam] = hits[0]
        if hits[0] in layer:
          key[lam] = int(layer[hits[0]])
          grew = True
      if not grew:
        return key, axis_of

  def stack_axes(self, path: str) -> tuple[int, ...]:
    """The leaf's axes that index per-layer classes (``(0,)`` for ``(L, d, f)``), sorted.

    Empty for an unstacked leaf, and for a stacked one whose every layer carries
    the same classes.
    """
    i = self._index[path]
    if i not in self._stacks:
      found: set[int] = set()
      todo: list[dict[int, int]] = [{}]
      shape = self.shapes[i]
      while todo:
        layer = todo.pop()
        _, axis_of = self._leaf_key(i, layer)
        new = sorted(set(axis_of.values()) - set(layer))
        found.update(new)
        if new:
          todo.extend(
            {**layer, **dict(zip(new, idx))}
            for idx in itertools.product(*[range(shape[a]) for a in new])
          )
      self._stacks[i] = tuple(sorted(found))
    return self._stacks[i]

  def _layer(self, path: str, layer) -> dict[int, int]:
    if layer is None:
      return {}
    if isinstance(layer, Mapping):
      return {int(k): int(v) for k, v in layer.items()}
    return dict(zip(self.stack_axes(path), (int(x) for x in layer)))

  def layers(self, path: str) -> list[tuple[int, ...]]:
    """Every layer of a leaf: index tuples along :meth:`stack_axes` (``[()]`` if none)."""
    shape = self.shapes[self._index[path]]
    return list(itertools.product(*[range(shape[a]) for a in self.stack_axes(path)]))

  # -- classes -----------------------------------------------------------------
  def axis_atoms(self, path: str, axes: Sequence[int], layer=None) -> list[int]:
    """Atomic class ids of the row-major flattening of ``axes`` of a leaf.

    ``layer``: only the classes of that layer of a stacked leaf (None: of all).
    """
    i = self._index[path]
    key, _ = self._leaf_key(i, self._layer(path, layer))
    nodes = self._leaf_axes[i]
    out = []
    for a in axes:
      out.extend(x for x in self._uf.atoms(nodes[a], key) if x not in out)
    return out

  def positions(self, path: str, axes: Sequence[int], cid: int, layer=None) -> np.ndarray | None:
    """Where class ``cid``'s channels sit in the row-major flattening of ``axes``.

    Args:
      path: the leaf.
      axes: some of its axes (an N:M group axis run).
      cid: a class id.
      layer: for a leaf with :meth:`stack_axes`, the layer (``{axis: index}``
        or indices along the stack axes not in ``axes``); the positions are
        then those in that layer's slice of the leaf. None for an unstacked
        leaf, or for a class that every layer carries at the same positions.

    Returns:
      int ``(contexts, size)`` indices into the flattened axes, or None when
      the class is not there (in that layer).

    Raises:
      ValueError: ``layer`` is None but the positions differ between layers.
    """
    i = self._index[path]
    lay = self._layer(path, layer)
    outer = [a for a in self.stack_axes(path) if a not in axes]
    if layer is None and outer:
      shape = self.shapes[i]
      got = [
        self._positions(i, axes, cid, dict(zip(outer, idx)))
        for idx in itertools.product(*[range(shape[a]) for a in outer])
      ]
      first = got[0]
      same = all(
        (g is None and first is None)
        or (g is not None and first is not None and np.array_equal(g, first))
        for g in got
      )
      if not same:
        raise ValueError(f"class {cid} sits differently in the layers of '{path}': pass layer=")
      return first
    return self._positions(i, axes, cid, lay)

  def _positions(
    self, i: int, axes: Sequence[int], cid: int, layer: Mapping[int, int]
  ) -> np.ndarray | None:
    nodes = self._leaf_axes[i]
    shape = self.shapes[i]
    key, axis_of = self._leaf_key(i, layer)
    sizes = [shape[a] for a in axes]
    strides = [int(np.prod(sizes[j + 1 :])) for j in range(len(sizes))]
    found = []
    for j, a in enumerate(axes):
      for lk, pos in self._uf.occurrences(nodes[a], cid, key):
        fixed: dict[int, int] = {}
        ok = True
        for lam, idx in lk:  # a stack over a layer axis inside the group axes
          ax = axis_of.get(lam)
          if ax is None or ax not in axes:
            ok = False
            break
          fixed[ax] = idx
        if not ok:
          continue
        base = np.zeros(1, np.int64)
        for k, (b, s, st) in enumerate(zip(axes, sizes, strides)):
          if k == j:
            continue
          rng = np.array([fixed[b]]) if b in fixed else np.arange(s)
          base = (base[:, None] + rng[None, :] * st).reshape(-1)
        found.append((base[:, None, None] + pos[None] * strides[j]).reshape(-1, pos.shape[1]))
    return np.concatenate(found) if found else None

  def pinned(self, cid: int) -> str:
    return self._uf.node(cid).pinned

  def size(self, cid: int) -> int:
    return self._uf.node(cid).size

  def classes(self) -> list[ChannelClass]:
    """Every atomic class that holds at least one parameter axis.

    A class that a stacked leaf carries in some of its layers only lists that
    leaf axis once per layer, with the layer in :attr:`ChannelClass.layers`.
    """
    found: dict[int, dict[tuple[str, int], list]] = {}
    for p, nodes in zip(self.paths, self._leaf_axes):
      all_layers = self.layers(p)
      for lay in all_layers:
        key, _ = self._leaf_key(self._index[p], self._layer(p, lay))
        for ax, nd in enumerate(nodes):
          for cid in self._uf.atoms(nd, key):
            found.setdefault(cid, {}).setdefault((p, ax), []).append(lay)
    out = []
    for cid, mems in found.items():
      members, layers = [], []
      for (p, ax), lays in mems.items():
        if len(lays) == len(self.layers(p)):
          members.append((p, ax))
          layers.append(None)
        else:
          for lay in lays:
            members.append((p, ax))
            layers.append(tuple(lay))
      out.append(ChannelClass(cid, self.size(cid), tuple(members), self.pinned(cid), tuple(layers)))
    return out

  def leaf_perms(self, perms: Mapping[int, np.ndarray]) -> dict[str, list[np.ndarray | None]]:
    """For each leaf, the induced permutation of each axis (None: identity).

    A permutation is ``(size,)`` when every layer of the leaf has it, else
    ``(*layer sizes, size)``: one per layer, the leading dimensions indexed by
    the leaf's :meth:`stack_axes` in order.
    """
    out = {}
    for p, nodes in zip(self.paths, self._leaf_axes):
      stack = self.stack_axes(p)
      if not stack:
        per_axis = [self._uf.induced(nd, perms) for nd in nodes]
      else:
        shape = self.shapes[self._index[p]]
        grid = [s for a, s in enumerate(shape) if a in stack]
        per_axis = []
        for ax, nd in enumerate(nodes):
          if ax in stack:
            per_axis.append(None)
            continue
          got = []
          for lay in self.layers(p):
            key, _ = self._leaf_key(self._index[p], dict(zip(stack, lay)))
            got.append(self._uf.induced(nd, perms, key))
          if all(g is None for g in got):
            per_axis.append(None)
            continue
          full = np.stack([np.arange(shape[ax]) if g is None else g for g in got])
          if all(np.array_equal(full[0], f) for f in full[1:]):
            per_axis.append(full[0])
          else:
            per_axis.append(full.reshape(grid + [shape[ax]]))
      if any(x is not None for x in per_axis):
        out[p] = per_axis
    return out


# ----------------------------------------------------------------------------
# Tracing.


def _shape(v) -> tuple[int, ...]:
  return tuple(getattr(v.aval, "shape", ()))


class _Channels(_jaxpr.Interpreter[list]):
  """The walk: every value is the list of its axes' nodes."""

  def __init__(self, uf: _UnionFind):
    super().__init__()
    self.uf = uf
    self.tensors: list[list[int]] = []  # every value with axes (to settle stacks)

  def value(self, shape: Sequence[int]) -> list[int]:
    nodes = [self.uf.new(s) for s in shape]
    if nodes:
      self.tensors.append(nodes)
    return nodes

  def pin_all(self, vals, why: str) -> None:
    for nodes in vals:
      for nd in nodes or ():
        self.uf.pin(nd, why)

  # -- domain -----------------------------------------------------------------
  def literal(self, lit):
    return self.value(_shape(lit))

  def constant(self, var, value):
    nodes = self.value(_shape(var))
    self.pin_all([nodes], "a constant captured by the traced function")
    return nodes

  def primitive(self, eqn, ins):
    outs = [self.value(_shape(v)) for v in eqn.outvars]
    name = eqn.primitive.name
    rule = _RULES.get(name)
    if rule is None:
      for group, fn in _GROUP_RULES:
        if name in group:
          rule = fn
          break
    if rule is None:
      self.pin_all(ins + outs, f"used by '{name}' (not known to commute with a permutation)")
    else:
      rule(self, eqn, ins, outs)
    return outs

  # -- control flow -----------------------------------------------------------
  def cond(self, eqn, cond, ins):
    index, ops = ins[0], ins[1:]
    self.pin_all([index], "a branch index")
    outs, *rest = self.walk_branches(eqn, cond, ops)
    for got in rest:
      for a, b in zip(outs, got):
        for x, y in zip(a, b):
          self.uf.union(x, y)
    return outs

  def while_loop(self, eqn, loop, ins):
    cconsts, bconsts, init = loop.split_in(ins)
    outs = self.walk(eqn, "body", loop.body, bconsts + init)
    for a, b in zip(init, outs):
      for x, y in zip(a, b):
        self.uf.union(x, y)
    self.walk(eqn, "cond", loop.cond, cconsts + init)
    return init

  def scan(self, eqn, scan, ins):
    consts, init, xs = scan.split_in(ins)
    length = scan.length
    x_shapes = [_shape(v) for v in scan.split_in(eqn.invars)[2]]
    y_shapes = [_shape(v) for v in scan.split_out(eqn.outvars)[1]]
    layer = self.uf.new(length)
    self.uf.pin(layer, _LAYER_AXIS)
    stacked = any(x and self.uf.node(x[0]).param for x in xs)
    for x in xs:
      if x:
        self.uf.union(x[0], layer)
    ys = [self.value(s) for s in y_shapes]
    for y in ys:
      self.uf.union(y[0], layer)
    if stacked and 0 < length <= _MAX_UNROLL:
      carry = self._scan_unrolled(eqn, scan, consts, init, xs, ys, x_shapes, layer)
      return carry + ys
    self._scan_shared(eqn, scan, consts, init, xs, ys, x_shapes)
    return init + ys

  def _scan_unrolled(self, eqn, scan, consts, init, xs, ys, x_shapes, layer):
    """Walks a scan over stacked parameters once per layer; returns the final carry.

    Each stacked axis of ``xs`` and ``ys`` becomes a ``"stack"`` over the
    layers' slices along the layer axis class ``layer``.
    """
    length = scan.length
    slices = [[self.value(s[1:]) for s in x_shapes] for _ in range(length)]
    for per in slices:  # a layer's slice of a parameter is one (nested scans)
      for x, s in zip(xs, per):
        for a, b in zip(x[1:], s):
          self.uf.nodes[b].param = self.uf.node(a).param
    per_y: list = [None] * length
    carry = init
    order = range(length - 1, -1, -1) if scan.reverse else range(length)
    for i in order:
      outs = self.walk(eqn, ("body", i), scan.body, consts + carry + slices[i])
      carry, per_y[i] = scan.split_out(outs)
    for j, x in enumerate(xs):
      for a in range(1, len(x)):
        self.uf.structure(x[a], "stack", [slices[i][j][a - 1] for i in range(length)], layer)
    for k, y in enumerate(ys):
      for a in range(1, len(y)):
        self.uf.structure(y[a], "stack", [per_y[i][k][a - 1] for i in range(length)], layer)
    return carry

  def _scan_shared(self, eqn, scan, consts, init, xs, ys, x_shapes) -> None:
    """Walks a scan once for every iteration.

    The carry is tied as a loop's; the slices are tied to their whole axis.
    """
    sl = [self.value(s[1:]) for s in x_shapes]
    for x, s in zip(xs, sl):
      self._tie_all(x[1:], s)
    outs = self.walk(eqn, "body", scan.body, consts + init + sl)
    c_out, y_out = scan.split_out(outs)
    for a, b in zip(init, c_out):
      self._tie_all(a, b)
    for y, yb in zip(ys, y_out):
      self._tie_all(y[1:], yb)

  def _tie_all(self, xs: Sequence[int], ys: Sequence[int]) -> None:
    """Ties the axes ``xs`` and ``ys`` pairwise."""
    for a, b in zip(xs, ys):
      self.uf.union(a, b)


# ----------------------------------------------------------------------------
# Rules: rule(walker, eqn, ins, outs) ties or pins the nodes of ins and outs.


def _why(eqn) -> str:
  return f"used by '{eqn.primitive.name}'"


def _elementwise(t: _Channels, eqn, ins, outs):
  uf = t.uf
  why = _why(eqn)
  in_shapes = [_shape(v) for v in eqn.invars]
  for o, v in zip(outs, eqn.outvars):
    os_ = _shape(v)
    for x, xs in zip(ins, in_shapes):
      if len(xs) == 0:
        continue
      if len(xs) != len(os_):
        t.pin_all([x, o], why + " with operands of different ranks")
        continue
      for a, (xa, oa) in enumerate(zip(xs, os_)):
        if xa == oa:
          uf.union(x[a], o[a])
        elif xa != 1:
          uf.pin(x[a], why)
          uf.pin(o[a], why)


def _broadcast(t: _Channels, eqn, ins, outs):
  x, o = ins[0], outs[0]
  in_shape, out_shape = _shape(eqn.invars[0]), _shape(eqn.outvars[0])
  for a, d in enumerate(eqn.params["broadcast_dimensions"]):
    if in_shape[a] == out_shape[d]:
      t.uf.union(x[a], o[d])


def _reshape(t: _Channels, eqn, ins, outs):
  uf = t.uf
  x, o = ins[0], outs[0]
  in_shape, out_shape = _shape(eqn.invars[0]), _shape(eqn.outvars[0])
  runs = None
  if eqn.params.get("dimensions") is None:
    runs = _shapes.reshape_runs(in_shape, out_shape)
  if runs is None:
    t.pin_all([x, o], _why(eqn))
    return
  for olds, news in runs:
    if len(olds) == 1 and len(news) == 1:
      uf.union(x[olds[0]], o[news[0]])
    elif len(olds) > 1 and len(news) == 1:
      uf.structure(o[news[0]], "prod", [x[a] for a in olds])
    elif len(olds) == 1 and len(news) > 1:
      uf.structure(x[olds[0]], "prod", [o[a] for a in news])
    elif olds and news:
      t.pin_all([[x[a] for a in olds], [o[a] for a in news]], "a reshape that regroups axes")


def _squeeze(t: _Channels, eqn, ins, outs):
  x, o = ins[0], outs[0]
  nd = len(_shape(eqn.invars[0]))
  dims = {d % nd for d in eqn.params["dimensions"]}
  kept = [a for a in range(nd) if a not in dims]
  for a, b in zip(kept, range(len(o))):
    t.uf.union(x[a], o[b])


def _expand_dims(t: _Channels, eqn, ins, outs):
  x, o = ins[0], outs[0]
  nd = len(_shape(eqn.outvars[0]))
  dims = {d % nd for d in eqn.params["dimensions"]}
  kept = [b for b in range(nd) if b not in dims]
  for a, b in zip(range(len(x)), kept):
    t.uf.union(x[a], o[b])


def _transpose(t: _Channels, eqn, ins, outs):
  for b, a in enumerate(eqn.params["permutation"]):
    t.uf.union(ins[0][a], outs[0][b])


def _reduce(t: _Channels, eqn, ins, outs):
  x, o = ins[0], outs[0]
  nd = len(_shape(eqn.invars[0]))
  red = {a % nd for a in eqn.params["axes"]}
  kept = [a for a in range(nd) if a not in red]
  for a, b in zip(kept, range(len(o))):
    t.uf.union(x[a], o[b])
  if eqn.primitive.name in _ARG_REDUCE:
    t.pin_all([[x[a] for a in red]], _why(eqn) + " (its result depends on the order)")
  if len(ins) > 1:  # variadic reduce: pin the rest
    t.pin_all(ins[1:] + outs[1:], _why(eqn))


def _cumulative(t: _Channels, eqn, ins, outs):
  x, o = ins[0], outs[0]
  ax = eqn.params["axis"] % len(x)
  for a in range(len(x)):
    if a == ax:
      t.uf.pin(x[a], _why(eqn))
      t.uf.pin(o[a], _why(eqn))
    else:
      t.uf.union(x[a], o[a])


def _dot(t: _Channels, eqn, ins, outs):
  uf = t.uf
  (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
  lhs, rhs, o = ins[0], ins[1], outs[0]
  for a, b in zip(lc, rc):
    uf.union(lhs[a], rhs[b])
  k = 0
  for a, b in zip(lb, rb):
    uf.union(lhs[a], rhs[b])
    uf.union(lhs[a], o[k])
    k += 1
  for a in range(len(lhs)):
    if a not in lc and a not in lb:
      uf.union(lhs[a], o[k])
      k += 1
  for b in range(len(rhs)):
    if b not in rc and b not in rb:
      uf.union(rhs[b], o[k])
      k += 1
  if len(ins) > 2:
    t.pin_all(ins[2:], _why(eqn))


def _conv(t: _Channels, eqn, ins, outs):
  uf = t.uf
  p = eqn.params
  why = _why(eqn)
  lhs, rhs, o = ins[0], ins[1], outs[0]
  dn = p["dimension_numbers"]
  lspec, rspec, ospec = dn.lhs_spec, dn.rhs_spec, dn.out_spec
  if p.get("batch_group_count", 1) != 1:
    t.pin_all([lhs, rhs, o], why + " with batch groups")
    return
  uf.union(lhs[lspec[0]], o[ospec[0]])
  for a in lspec[2:]:
    uf.pin(lhs[a], "a spatial axis of a convolution")
  for a in rspec[2:]:
    uf.pin(rhs[a], "a spatial axis of a convolution")
  for a in ospec[2:]:
    uf.pin(o[a], "a spatial axis of a convolution")
  g = p.get("feature_group_count", 1)
  lf, ri, ro, of = lspec[1], rspec[1], rspec[0], ospec[1]
  if g == 1:
    uf.union(lhs[lf], rhs[ri])
    uf.union(rhs[ro], o[of])
    return
  cg = _shape(eqn.invars[1])[ri]
  og = _shape(eqn.invars[1])[ro] // g
  g_in, c_in = uf.new(g), uf.new(cg)
  uf.structure(lhs[lf], "prod", [g_in, c_in])
  uf.union(c_in, rhs[ri])
  g_w, o_w = uf.new(g), uf.new(og)
  uf.structure(rhs[ro], "prod", [g_w, o_w])
  g_o, o_o = uf.new(g), uf.new(og)
  uf.structure(o[of], "prod", [g_o, o_o])
  uf.union(g_in, g_w)
  uf.union(g_w, g_o)
  uf.union(o_w, o_o)


def _concatenate(t: _Channels, eqn, ins, outs):
  d = eqn.params["dimension"]
  o = outs[0]
  for x in ins:
    for a in range(len(o)):
      if a != d:
        t.uf.union(x[a], o[a])
  t.uf.structure(o[d], "sum", [x[d] for x in ins])


def _split(t: _Channels, eqn, ins, outs):
  d = eqn.params["axis"]
  x = ins[0]
  for o in outs:
    for a in range(len(x)):
      if a != d:
        t.uf.union(x[a], o[a])
  t.uf.structure(x[d], "sum", [o[d] for o in outs])


def _gather(t: _Channels, eqn, ins, outs):
  """An embedding lookup: operand axes taken whole pass through to the result."""
  uf = t.uf
  why = _why(eqn)
  x, idx, o = ins[0], ins[1], outs[0]
  in_shape = _shape(eqn.invars[0])
  dn = eqn.params["dimension_numbers"]
  sizes = eqn.params["slice_sizes"]
  batching = tuple(getattr(dn, "operand_batching_dims", ()))
  kept = [a for a in range(len(x)) if a not in dn.collapsed_slice_dims and a not in batching]
  offset = list(dn.offset_dims)
  t.pin_all([idx], why + " (indices)")
  tied = set()
  for a, d in zip(kept, offset):
    if a not in dn.start_index_map and sizes[a] == in_shape[a]:
      uf.union(x[a], o[d])
      tied.add(a)
      tied.add(("out", d))
  for a in range(len(x)):
    if a not in tied:
      uf.pin(x[a], why + " (an indexed axis)")
  for d in range(len(o)):
    if ("out", d) not in tied:
      uf.pin(o[d], why + " (an indexed axis)")


def _pad_keeps(p: Mapping[str, Any], shape: tuple[int, ...]) -> list[bool]:
  return [tuple(cfg) == (0, 0, 0) for cfg in p["padding_config"]]


def _rev_keeps(p: Mapping[str, Any], shape: tuple[int, ...]) -> list[bool]:
  return [a not in p["dimensions"] for a in range(len(shape))]


def _slice_keeps(p: Mapping[str, Any], shape: tuple[int, ...]) -> list[bool]:
  strides = p.get("strides") or (1,) * len(shape)
  return [
    p["start_indices"][a] == 0 and p["limit_indices"][a] == shape[a] and strides[a] == 1
    for a in range(len(shape))
  ]


def _window_keeps(p: Mapping[str, Any], shape: tuple[int, ...]) -> list[bool]:
  nd = len(shape)
  unit = (
    p["window_dimensions"],
    p["window_strides"],
    p.get("base_dilation") or (1,) * nd,
    p.get("window_dilation") or (1,) * nd,
  )
  return [all(u[a] == 1 for u in unit) and tuple(p["padding"][a]) == (0, 0) for a in range(nd)]


# Per primitive: which axes of the operand the result keeps as they are.
_KEEPS: dict[str, Callable[[Mapping[str, Any], tuple[int, ...]], list[bool]]] = {
  "pad": _pad_keeps,
  "rev": _rev_keeps,
  "slice": _slice_keeps,
}


def _axiswise(t: _Channels, eqn, ins, outs):
  """pad / rev / slice / reduce_window: axes they leave alone are tied."""
  uf = t.uf
  prim = eqn.primitive.name
  why = _why(eqn)
  x, o = ins[0], outs[0]
  same = _KEEPS.get(prim, _window_keeps)(eqn.params, _shape(eqn.invars[0]))
  if prim == "pad":
    t.pin_all(ins[1:], why)
  elif prim not in _KEEPS and (len(ins) > 1 or len(outs) > 1):  # a variadic reduce_window
    t.pin_all(ins + outs, why)
    return
  for a, keep in enumerate(same):
    if keep:
      uf.union(x[a], o[a])
    else:
      uf.pin(x[a], why + " along this axis")
      uf.pin(o[a], why + " along this axis")


_RULES: dict[str, Callable] = {
  "broadcast_in_dim": _broadcast,
  "reshape": _reshape,
  "squeeze": _squeeze,
  "expand_dims": _expand_dims,
  "transpose": _transpose,
  "dot_general": _dot,
  "conv_general_dilated": _conv,
  "concatenate": _concatenate,
  "split": _split,
  "gather": _gather,
  "pad": _axiswise,
  "rev": _axiswise,
  "slice": _axiswise,
}
_GROUP_RULES = (
  (_ELEMENTWISE, _elementwise),
  (_REDUCE | _ARG_REDUCE, _reduce),
  (_CUMULATIVE, _cumulative),
  (_WINDOW, _axiswise),
)


def trace_model(model: _model.Model, traced: _model.Traced) -> ChannelGraph:
  """The channel classes of a traced model (:meth:`jasp._model.Model.trace`).

  The jaxpr's inputs are the model's leaves (the nodes the classes report),
  other state (pinned: it is not permuted) and the model's inputs (pinned);
  the top-level outputs are pinned.
  """
  closed = traced.closed
  jaxpr = closed.jaxpr
  uf = _UnionFind()
  walker = _Channels(uf)
  args = [walker.value(_shape(v)) for v in jaxpr.invars]
  n, e = traced.n_leaves, traced.n_extra
  leaf_axes = args[:n]
  for nodes in leaf_axes:
    for nd in nodes:
      uf.nodes[nd].param = True
  walker.pin_all(args[n : n + e], "model state that is not permuted")
  walker.pin_all(args[n + e :], "an axis of the model's input")
  outs = walker.run(jaxpr, closed.consts, args)
  for v, o in zip(jaxpr.outvars, outs):
    if not isinstance(v, jcore.Literal):
      walker.pin_all([o], "an axis of the model's output")
  uf.settle(walker.tensors)
  return ChannelGraph(uf, list(model.paths), [tuple(s) for s in traced.shapes], leaf_axes)


def trace_channels(
  fn: Callable[..., Any] | Any, params: Any = None, *args, **kwargs
) -> ChannelGraph:
  """Traces ``fn(params, *args, **kwargs)`` and finds its channel classes.

  ``params`` is the tree ``fn`` takes first, any pytree (a flax linen variables
  dict with all of its collections, an ``nnx.State``); every leaf is a node of
  the analysis, so the permutations found apply to all of them (params, batch
  statistics, ...). ``args`` are the model's inputs: their axes and the
  outputs' axes are pinned. ``fn`` may also be an ``nnx.Module``
  (``trace_channels(module, *inputs)``: all of its state).

  Nothing is computed: the function is traced abstractly (``jax.make_jaxpr``).

  Returns:
    a :class:`ChannelGraph` over the leaves of ``params``.
  """
  model, inputs = _model.adapt(fn, params, args, state=True, what="trace_channels")
  return trace_model(model, model.trace(inputs, kwargs))
