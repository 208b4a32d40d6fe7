"""Which parameters share a channel dimension: traced from the jaxpr.

Permuting a channel dimension of a network keeps its function when every
tensor axis that carries that dimension is permuted the same way: the output
axis of the layer that produces the channels, the per-channel parameters on
the way (bias, BatchNorm scale/bias/mean/var, LayerNorm scale/bias, depthwise
kernels), the input axis of every layer that consumes them, and everything tied
to them by residual adds. apex finds these groups with ``torch.fx``; here the
jaxpr of the model's apply function shows the same data flow.

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

Anything unknown pins every axis it touches, so the permutations that come out
can only ever be ones the traced computation is equivariant to.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.extend import core as jcore

from jasp import _shapes
from jasp import _tree

__all__ = ["ChannelGraph", "ChannelClass", "trace_channels"]

# Element-wise primitives: each result axis carries the same index as the
# same axis of every (non-scalar) operand.
_ELEMENTWISE = frozenset({
    "add", "add_any", "sub", "mul", "div", "rem", "pow", "max", "min", "neg", "sign", "floor",
    "ceil", "round", "is_finite", "exp", "exp2", "log", "log1p", "expm1", "tanh", "logistic",
    "sin", "cos", "tan", "asin", "acos", "atan", "atan2", "sinh", "cosh", "asinh", "acosh",
    "atanh", "sqrt", "rsqrt", "cbrt", "integer_pow", "square", "abs", "erf", "erfc", "erf_inv",
    "lgamma", "digamma", "select_n", "clamp", "convert_element_type", "copy", "copy_p",
    "reduce_precision", "eq", "ne", "lt", "le", "gt", "ge", "and", "or", "not", "xor",
    "nextafter", "real", "imag", "conj", "sharding_constraint", "optimization_barrier", "pvary",
    "stop_gradient", "population_count", "shift_left", "shift_right_logical",
    "shift_right_arithmetic", "mesh_cast", "device_put",
})
# Reductions: kept axes map to the result in order; the reduced axes do not
# matter (a sum, max or product over channels does not depend on their order).
_REDUCE = frozenset({"reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "reduce_and",
                     "reduce_or", "reduce_xor"})
# Reductions whose result depends on the order of the reduced axis.
_ARG_REDUCE = frozenset({"argmax", "argmin"})
_CUMULATIVE = frozenset({"cumsum", "cumprod", "cummax", "cummin", "cumlogsumexp"})
_WINDOW = frozenset({"reduce_window_sum", "reduce_window_max", "reduce_window_min",
                     "reduce_window"})
# Calls whose body is traced with the call's operands.
_CALLS = frozenset({"pjit", "jit", "closed_call", "core_call", "remat", "checkpoint", "remat2",
                    "custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr", "custom_lin"})


@dataclasses.dataclass
class _Node:
  size: int
  parent: int
  kind: str | None = None  # None (atomic), "prod" or "sum"
  children: tuple[int, ...] = ()
  pinned: str = ""  # why the order of this class matters ("" when free)
  names: list = dataclasses.field(default_factory=list)  # (leaf, axis) members


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
    root = self.find(a)
    nd = self.nodes[root]
    if not nd.pinned:
      nd.pinned = why
    for c in nd.children:
      if not self.node(c).pinned:
        self.pin(c, why)

  def union(self, a: int, b: int) -> None:
    ra, rb = self.find(a), self.find(b)
    if ra == rb:
      return
    na, nb = self.nodes[ra], self.nodes[rb]
    if na.size != nb.size:
      self.pin(ra, f"tied to an axis of another size ({na.size} vs {nb.size})")
      self.pin(rb, f"tied to an axis of another size ({na.size} vs {nb.size})")
      return
    na.parent = rb
    nb.names.extend(na.names)
    na.names = []
    pinned = nb.pinned or na.pinned
    if na.kind is not None:
      self.structure(rb, na.kind, na.children)
    if pinned:
      self.pin(rb, pinned)

  def structure(self, a: int, kind: str, children: Sequence[int]) -> None:
    """Gives ``a``'s class the structure ``kind`` over ``children`` (or ties it).

    ``"prod"``: the axis is the row-major product of the children's axes;
    ``"sum"``: their concatenation. A class that already has a structure must
    match it child for child; otherwise the class is pinned.
    """
    children = tuple(children)
    root = self.find(a)
    nd = self.nodes[root]
    sizes = [self.nodes[self.find(c)].size for c in children]
    total = int(np.prod(sizes)) if kind == "prod" else int(sum(sizes))
    if total != nd.size:
      self.pin(root, f"a {kind} of sizes {sizes} does not match its axis of size {nd.size}")
      for c in children:
        self.pin(c, "part of a mismatched structure")
      return
    if nd.kind is None:
      nd.kind, nd.children = kind, children
      if nd.pinned:
        for c in children:
          self.pin(c, nd.pinned)
      return
    old = [self.nodes[self.find(c)].size for c in nd.children]
    if nd.kind == kind and old == sizes:
      for c, d in zip(nd.children, children):
        self.union(c, d)
      return
    why = f"split two incompatible ways ({nd.kind} {old} and {kind} {sizes})"
    self.pin(root, why)
    for c in children:
      self.pin(c, why)

  def atoms(self, a: int) -> list[int]:
    """The atomic classes (roots) inside ``a``'s structure, sizes > 1."""
    root = self.find(a)
    nd = self.nodes[root]
    if nd.kind is None:
      return [root] if nd.size > 1 else []
    out = []
    for c in nd.children:
      out.extend(x for x in self.atoms(c) if x not in out)
    return out

  def positions(self, a: int, atom: int) -> np.ndarray | None:
    """Where the channels of ``atom`` sit along axis ``a``.

    Returns:
      int ``(contexts, size of atom)``: row ``r`` lists the indices of ``a``
      (row-major over its structure) that hold channels ``0, 1, ...`` of
      ``atom`` in one context (one value of every other factor); None when the
      atom is not part of ``a``.
    """
    root = self.find(a)
    nd = self.nodes[root]
    if nd.kind is None:
      return np.arange(nd.size)[None, :] if root == atom else None
    sizes = [self.node(c).size for c in nd.children]
    found = []
    if nd.kind == "sum":
      off = 0
      for c, s in zip(nd.children, sizes):
        pos = self.positions(c, atom)
        if pos is not None:
          found.append(pos + off)
        off += s
    else:
      strides = [int(np.prod(sizes[i + 1:])) for i in range(len(sizes))]
      for i, c in enumerate(nd.children):
        pos = self.positions(c, atom)
        if pos is None:
          continue
        others = [np.arange(s) * st for j, (s, st) in enumerate(zip(sizes, strides)) if j != i]
        base = np.zeros(1, np.int64)
        for o in others:
          base = (base[:, None] + o[None, :]).reshape(-1)
        found.append((base[:, None, None] + pos[None] * strides[i]).reshape(-1, pos.shape[1]))
    return np.concatenate(found) if found else None

  def induced(self, a: int, perms: dict[int, np.ndarray]) -> np.ndarray | None:
    """The permutation of axis ``a`` induced by the atomic ``perms`` (None: identity)."""
    root = self.find(a)
    nd = self.nodes[root]
    if nd.kind is None:
      return perms.get(root)
    parts = [self.induced(c, perms) for c in nd.children]
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


@dataclasses.dataclass(frozen=True)
class ChannelClass:
  """One channel dimension of the network (an atomic class of tied axes).

  Attributes:
    id: the class id (a union-find root).
    size: its number of channels.
    members: ``(path, axis)`` of every parameter axis that carries it, directly
      or as a factor of a flattened/grouped axis.
    pinned: why its order must stay as it is ("" when it may be permuted).
  """
  id: int
  size: int
  members: tuple[tuple[str, int], ...]
  pinned: str


class ChannelGraph:
  """The result of :func:`trace_channels`: channel classes of a model's parameters.

  Attributes:
    paths: path strings of the traced leaves, in flatten order.
    shapes: their shapes.
  """

  def __init__(self, uf: _UnionFind, paths: list[str], shapes: list[tuple[int, ...]],
               leaf_axes: list[list[int]]):
    self._uf = uf
    self.paths = paths
    self.shapes = shapes
    self._leaf_axes = leaf_axes
    self._index = {p: i for i, p in enumerate(paths)}

  def axis_atoms(self, path: str, axes: Sequence[int]) -> list[int]:
    """Atomic class ids of the row-major flattening of ``axes`` of a leaf."""
    nodes = self._leaf_axes[self._index[path]]
    out = []
    for a in axes:
      out.extend(self._uf.atoms(nodes[a]))
    return out

  def positions(self, path: str, axes: Sequence[int], cid: int) -> np.ndarray | None:
    """Where class ``cid``'s channels sit in the row-major flattening of ``axes``.

    Returns:
      int ``(contexts, size)`` indices into the flattened axes, or None.
    """
    nodes = self._leaf_axes[self._index[path]]
    sizes = [self.shapes[self._index[path]][a] for a in axes]
    found = []
    for i, a in enumerate(axes):
      pos = self._uf.positions(nodes[a], cid)
      if pos is None:
        continue
      stride = int(np.prod(sizes[i + 1:]))
      outer = int(np.prod(sizes[:i]))
      inner = np.arange(stride)
      base = (np.arange(outer)[:, None] * (sizes[i] * stride) + inner[None, :]).reshape(-1)
      found.append((base[:, None, None] + pos[None] * stride).reshape(-1, pos.shape[1]))
    return np.concatenate(found) if found else None

  def pinned(self, cid: int) -> str:
    return self._uf.node(cid).pinned

  def size(self, cid: int) -> int:
    return self._uf.node(cid).size

  def classes(self) -> list[ChannelClass]:
    """Every atomic class that holds at least one parameter axis."""
    members: dict[int, list[tuple[str, int]]] = {}
    for p, nodes in zip(self.paths, self._leaf_axes):
      for ax, nd in enumerate(nodes):
        for cid in self._uf.atoms(nd):
          members.setdefault(cid, [])
          if (p, ax) not in members[cid]:
            members[cid].append((p, ax))
    return [ChannelClass(c, self.size(c), tuple(ms), self.pinned(c))
            for c, ms in members.items()]

  def leaf_perms(self, perms: dict[int, np.ndarray]) -> dict[str, list[np.ndarray | None]]:
    """For each leaf, the induced permutation of each axis (None: identity)."""
    out = {}
    for p, nodes in zip(self.paths, self._leaf_axes):
      per_axis = [self._uf.induced(nd, perms) for nd in nodes]
      if any(x is not None for x in per_axis):
        out[p] = per_axis
    return out


# ----------------------------------------------------------------------------
# Tracing.


def _sub_jaxpr(eqn):
  p = eqn.params
  for name in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
    if name in p:
      j = p[name]
      if hasattr(j, "jaxpr"):
        return j.jaxpr, list(getattr(j, "consts", ()))
      return j, []
  return None, []




class _Tracer:
  def __init__(self, uf: _UnionFind):
    self.uf = uf

  def axes(self, env, v) -> list[int] | None:
    if isinstance(v, jcore.Literal):
      return None
    if v not in env:
      shape = getattr(v.aval, "shape", ())
      env[v] = [self.uf.new(s) for s in shape]
    return env[v]

  def pin_all(self, nodes_list, why):
    for nodes in nodes_list:
      for nd in nodes or ():
        self.uf.pin(nd, why)

  def run(self, jaxpr, env: dict, consts: Sequence[Any] = ()):
    uf = self.uf
    for v in jaxpr.constvars:
      self.pin_all([self.axes(env, v)], "a constant captured by the traced function")
    del consts
    for eqn in jaxpr.eqns:
      prim = eqn.primitive.name
      ins = [self.axes(env, v) for v in eqn.invars]
      in_shapes = [tuple(getattr(v.aval, "shape", ())) for v in eqn.invars]
      outs = [self.axes(env, v) for v in eqn.outvars]
      out_shapes = [tuple(getattr(v.aval, "shape", ())) for v in eqn.outvars]
      p = eqn.params
      why = f"used by '{prim}'"
      if prim in _ELEMENTWISE:
        for o, os_ in zip(outs, out_shapes):
          for x, xs in zip(ins, in_shapes):
            if x is None or len(xs) == 0:
              continue
            if len(xs) != len(os_):
              self.pin_all([x, o], why + " with operands of different ranks")
              continue
            for a, (xa, oa) in enumerate(zip(xs, os_)):
              if xa == oa:
                uf.union(x[a], o[a])
              elif xa != 1:
                uf.pin(x[a], why)
                uf.pin(o[a], why)
      elif prim == "broadcast_in_dim":
        x, o = ins[0], outs[0]
        for a, d in enumerate(p["broadcast_dimensions"]):
          if in_shapes[0][a] == out_shapes[0][d]:
            uf.union(x[a], o[d])
      elif prim == "reshape":
        x, o = ins[0], outs[0]
        runs = None if p.get("dimensions") is not None else _shapes.reshape_runs(in_shapes[0], out_shapes[0])
        if runs is None:
          self.pin_all([x, o], why)
        else:
          for olds, news in runs:
            if len(olds) == 1 and len(news) == 1:
              uf.union(x[olds[0]], o[news[0]])
            elif len(olds) > 1 and len(news) == 1:
              uf.structure(o[news[0]], "prod", [x[a] for a in olds])
            elif len(olds) == 1 and len(news) > 1:
              uf.structure(x[olds[0]], "prod", [o[a] for a in news])
            elif olds and news:
              self.pin_all([[x[a] for a in olds], [o[a] for a in news]],
                           "a reshape that regroups axes")
      elif prim == "squeeze":
        x, o = ins[0], outs[0]
        dims = {d % len(in_shapes[0]) for d in p["dimensions"]}
        kept = [a for a in range(len(in_shapes[0])) if a not in dims]
        for a, b in zip(kept, range(len(o))):
          uf.union(x[a], o[b])
      elif prim == "expand_dims":
        x, o = ins[0], outs[0]
        dims = {d % len(out_shapes[0]) for d in p["dimensions"]}
        kept = [b for b in range(len(out_shapes[0])) if b not in dims]
        for a, b in zip(range(len(x)), kept):
          uf.union(x[a], o[b])
      elif prim == "transpose":
        for b, a in enumerate(p["permutation"]):
          uf.union(ins[0][a], outs[0][b])
      elif prim in _REDUCE or prim in _ARG_REDUCE:
        x, o = ins[0], outs[0]
        red = {a % len(in_shapes[0]) for a in p["axes"]}
        kept = [a for a in range(len(in_shapes[0])) if a not in red]
        for a, b in zip(kept, range(len(o))):
          uf.union(x[a], o[b])
        if prim in _ARG_REDUCE:
          self.pin_all([[x[a] for a in red]], why + " (its result depends on the order)")
        if len(ins) > 1:  # variadic reduce: pin the rest
          self.pin_all(ins[1:] + outs[1:], why)
      elif prim in _CUMULATIVE:
        x, o = ins[0], outs[0]
        ax = p["axis"] % len(in_shapes[0])
        for a in range(len(x)):
          if a == ax:
            uf.pin(x[a], why)
            uf.pin(o[a], why)
          else:
            uf.union(x[a], o[a])
      elif prim == "dot_general":
        self._dot(ins, outs, p)
      elif prim == "conv_general_dilated":
        self._conv(ins, outs, in_shapes, p, why)
      elif prim == "concatenate":
        d = p["dimension"]
        o = outs[0]
        for x in ins:
          for a in range(len(o)):
            if a != d:
              uf.union(x[a], o[a])
        uf.structure(o[d], "sum", [x[d] for x in ins])
      elif prim == "split":
        d = p["axis"]
        x = ins[0]
        for o in outs:
          for a in range(len(x)):
            if a != d:
              uf.union(x[a], o[a])
        uf.structure(x[d], "sum", [o[d] for o in outs])
      elif prim == "gather":
        self._gather(ins, outs, in_shapes, p, why)
      elif prim in ("pad", "rev", "slice") or prim in _WINDOW:
        self._axiswise(prim, ins, outs, in_shapes, p, why)
      elif prim in _CALLS:
        sub, sub_consts = _sub_jaxpr(eqn)
        if sub is None:
          self.pin_all(ins + outs, why)
          continue
        inner = sub.invars[-len(eqn.invars):] if eqn.invars else []
        if len(sub.invars) < len(eqn.invars):
          self.pin_all(ins + outs, why + " (unexpected signature)")
          continue
        sub_env = {}
        for v, x in zip(inner, ins):
          if x is not None:
            sub_env[v] = x
        for v in sub.invars[:len(sub.invars) - len(eqn.invars)]:
          self.pin_all([self.axes(sub_env, v)], why)
        self.run(sub, sub_env, sub_consts)
        for ov, o in zip(sub.outvars, outs):
          if isinstance(ov, jcore.Literal):
            self.pin_all([o], why)
            continue
          inner_axes = self.axes(sub_env, ov)
          for a, b in zip(inner_axes, o):
            uf.union(a, b)
      else:
        self.pin_all(ins + outs, why + " (not known to commute with a permutation)")
    return env

  def _dot(self, ins, outs, p):
    uf = self.uf
    (lc, rc), (lb, rb) = p["dimension_numbers"]
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

  def _conv(self, ins, outs, in_shapes, p, why):
    uf = self.uf
    lhs, rhs, o = ins[0], ins[1], outs[0]
    dn = p["dimension_numbers"]
    lspec, rspec, ospec = dn.lhs_spec, dn.rhs_spec, dn.out_spec
    if p.get("batch_group_count", 1) != 1:
      self.pin_all([lhs, rhs, o], why + " with batch groups")
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
    cin = in_shapes[0][lf]
    cg = in_shapes[1][ri]
    og = in_shapes[1][ro] // g
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
    del cin

  def _gather(self, ins, outs, in_shapes, p, why):
    """An embedding lookup: operand axes taken whole pass through to the result."""
    uf = self.uf
    x, idx, o = ins[0], ins[1], outs[0]
    dn = p["dimension_numbers"]
    sizes = p["slice_sizes"]
    batching = tuple(getattr(dn, "operand_batching_dims", ()))
    kept = [a for a in range(len(x)) if a not in dn.collapsed_slice_dims and a not in batching]
    offset = list(dn.offset_dims)
    self.pin_all([idx], why + " (indices)")
    tied = set()
    for a, d in zip(kept, offset):
      if a not in dn.start_index_map and sizes[a] == in_shapes[0][a]:
        uf.union(x[a], o[d])
        tied.add(a)
        tied.add(("out", d))
    for a in range(len(x)):
      if a not in tied:
        uf.pin(x[a], why + " (an indexed axis)")
    for d in range(len(o)):
      if ("out", d) not in tied:
        uf.pin(o[d], why + " (an indexed axis)")

  def _axiswise(self, prim, ins, outs, in_shapes, p, why):
    """pad / rev / slice / reduce_window: axes they leave alone are tied."""
    uf = self.uf
    x, o = ins[0], outs[0]
    shape = in_shapes[0]
    nd = len(shape)
    same = [True] * nd
    if prim == "pad":
      for a, (lo, hi, interior) in enumerate(p["padding_config"]):
        same[a] = (lo, hi, interior) == (0, 0, 0)
      self.pin_all(ins[1:], why)
    elif prim == "rev":
      for a in p["dimensions"]:
        same[a] = False
    elif prim == "slice":
      strides = p.get("strides") or (1,) * nd
      for a in range(nd):
        same[a] = (p["start_indices"][a] == 0 and p["limit_indices"][a] == shape[a]
                   and strides[a] == 1)
    else:  # reduce_window*
      wd = p["window_dimensions"]
      ws = p["window_strides"]
      pad = p["padding"]
      bd = p.get("base_dilation") or (1,) * nd
      wdl = p.get("window_dilation") or (1,) * nd
      for a in range(nd):
        same[a] = wd[a] == 1 and ws[a] == 1 and tuple(pad[a]) == (0, 0) and bd[a] == 1 \
            and wdl[a] == 1
      if len(ins) > 1 or len(outs) > 1:
        self.pin_all(ins + outs, why)
        return
    for a in range(nd):
      if same[a]:
        uf.union(x[a], o[a])
      else:
        uf.pin(x[a], why + " along this axis")
        uf.pin(o[a], why + " along this axis")


def trace_channels(fn: Callable[..., Any], variables: Any, *args, **kwargs) -> ChannelGraph:
  """Traces ``fn(variables, *args, **kwargs)`` and finds its channel classes.

  ``variables`` is any pytree (a flax linen variables dict, an ``nnx.State``);
  every leaf is a node of the analysis, so the permutations found apply to all
  of them (params, batch statistics, ...). ``args`` are the model's inputs: their
  axes and the outputs' axes are pinned.

  Nothing is computed: the function is traced abstractly (``jax.make_jaxpr``).

  Returns:
    a :class:`ChannelGraph` over the leaves of ``variables``.
  """
  flat, treedef = jax.tree_util.tree_flatten_with_path(variables)
  paths = [_tree.path_str(p) for p, _ in flat]
  leaves = [x for _, x in flat]
  arg_leaves, arg_def = jax.tree_util.tree_flatten(args)
  is_arr = [isinstance(x, (jax.Array, np.ndarray)) for x in arg_leaves]
  traced = [x for x, t in zip(arg_leaves, is_arr) if t]

  def run(ls, tr):
    it = iter(tr)
    full = [next(it) if t else x for x, t in zip(arg_leaves, is_arr)]
    a = jax.tree_util.tree_unflatten(arg_def, full)
    return fn(jax.tree_util.tree_unflatten(treedef, ls), *a, **kwargs)

  closed = jax.make_jaxpr(run)(leaves, traced)
  jaxpr = closed.jaxpr
  uf = _UnionFind()
  tracer = _Tracer(uf)
  env: dict = {}
  leaf_axes = []
  for v in jaxpr.invars[:len(leaves)]:
    nodes = tracer.axes(env, v)
    leaf_axes.append(nodes)
  for k, (p, nodes) in enumerate(zip(paths, leaf_axes)):
    for ax, nd in enumerate(nodes):
      uf.nodes[nd].names.append((p, ax))
    del k
  for v in jaxpr.invars[len(leaves):]:
    tracer.pin_all([tracer.axes(env, v)], "an axis of the model's input")
  tracer.run(jaxpr, env, closed.consts)
  for v in jaxpr.outvars:
    if not isinstance(v, jcore.Literal):
      tracer.pin_all([tracer.axes(env, v)], "an axis of the model's output")
  shapes = [tuple(np.shape(x)) for x in leaves]
  return ChannelGraph(uf, paths, shapes, leaf_axes)
