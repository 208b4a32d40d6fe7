"""Which ONNX ops consume a weight initializer, and along which of its axes they reduce.

:func:`jasp.export.check_file` reads the N:M pattern of a weight along the axis
that its consumer reduces over (what TensorRT reads). :class:`WeightUses`
follows an initializer (or a ``Constant``) forward through the ops that keep
its layout (``Identity``, ``Cast``, ``Transpose``, ``Reshape``/``Squeeze``/
``Unsqueeze``/``Flatten``, ``Concat`` along another axis) to the op that
consumes it:

* ``MatMul`` (B reduces along its rows, A along its last axis), ``Gemm``
  (``transA``/``transB``), ``Conv`` (``KCRS``: along ``C``; depthwise: no
  groups), ``ConvTranspose`` (along its first axis), ``Einsum`` (the letters of
  its term that the output drops);
* into control flow: a ``Loop``'s or ``Scan``'s operand continues as the body's
  input of the same position (a ``Scan`` input loses its scanned axis), and a
  name a body reads from the enclosing graph is followed inside it.

Names are resolved per graph (bodies of different loops reuse input names), and
each ``(graph, name)`` is visited once per initializer, so a graph whose nodes
share outputs cannot make the walk explode.
"""

from __future__ import annotations

import numpy as np

from jasp import weights

__all__ = ["WeightUses", "all_graphs", "attr", "int_list", "subgraphs"]

_PASS_OPS = {"Identity", "Cast", "CastLike", "DequantizeLinear"}
_MAX_DEPTH = 64


def attr(node, name: str, default=None):
  """The value of a node's attribute ``name`` (``default`` when absent)."""
  from onnx import helper  # pylint: disable=g-import-not-at-top
  for a in node.attribute:
    if a.name == name:
      return helper.get_attribute_value(a)
  return default


def int_list(consts, node, idx: int, name: str):
  """An int list given as input ``idx`` (a constant) or as attribute ``name``; None if dynamic."""
  from onnx import numpy_helper  # pylint: disable=g-import-not-at-top
  if len(node.input) > idx and node.input[idx]:
    t = consts.get(node.input[idx])
    return None if t is None else [int(v) for v in numpy_helper.to_array(t).reshape(-1)]
  v = attr(node, name, None)
  return [] if v is None else [int(x) for x in v]


def subgraphs(node) -> list:
  """The graphs held by a node's attributes (a Loop's body, an If's branches)."""
  from onnx import AttributeProto  # pylint: disable=g-import-not-at-top
  out = []
  for a in node.attribute:
    if a.type == AttributeProto.GRAPH:
      out.append(a.g)
    elif a.type == AttributeProto.GRAPHS:
      out.extend(a.graphs)
  return out


def all_graphs(graph) -> list:
  """``graph`` and every graph nested in its nodes (Loop/Scan bodies, If branches)."""
  out = [graph]
  for node in graph.node:
    for g in subgraphs(node):
      out.extend(all_graphs(g))
  return out


def _reshape_target(shape, target, allowzero: bool):
  out = [shape[i] if (d == 0 and not allowzero and i < len(shape)) else d
         for i, d in enumerate(target)]
  if -1 in out:
    known = int(np.prod([d for d in out if d != -1], dtype=np.int64))
    total = int(np.prod(shape, dtype=np.int64))
    out[out.index(-1)] = total // known if known else 0
  return tuple(int(d) for d in out)


def _einsum_reduced(equation: str, idx: int, ndim: int) -> list[int] | None:
  """Axes of operand ``idx`` whose letters the einsum's output drops."""
  eq = equation.replace(" ", "")
  if "->" not in eq:
    return None
  lhs, out = eq.split("->")
  terms = lhs.split(",")
  if idx >= len(terms):
    return None
  term = terms[idx]
  if "..." in term:
    left, right = term.split("...")
    letters = {i: c for i, c in enumerate(left)}
    letters.update({ndim - len(right) + i: c for i, c in enumerate(right)})
  else:
    if len(term) != ndim:
      return None
    letters = dict(enumerate(term))
  return sorted(d for d, c in letters.items() if c not in out)


class _Node:
  """One ONNX node, with its subgraphs wrapped once (protobuf hands out new wrappers)."""

  def __init__(self, proto):
    self.proto = proto
    self.op_type = proto.op_type
    self.input = list(proto.input)
    self.output = list(proto.output)
    self.graphs = [_Graph(g) for g in subgraphs(proto)]
    # A Loop's or Scan's only graph attribute is its body.
    self.body = self.graphs[0] if self.op_type in ("Loop", "Scan") and self.graphs else None


class _Graph:
  """One ONNX graph: its nodes, what it defines, and who reads each name."""

  def __init__(self, proto):
    self.proto = proto
    self.input = [i.name for i in proto.input]
    self.nodes = [_Node(nd) for nd in proto.node]
    self.defined = set(self.input) | {t.name for t in proto.initializer}
    self.shapes = {}  # declared shapes (inputs, value_info, outputs); None for a symbolic dim
    for vi in list(proto.input) + list(proto.value_info) + list(proto.output):
      dims = vi.type.tensor_type.shape.dim
      self.shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    self.uses: dict[str, list] = {}
    for node in self.nodes:
      self.defined.update(node.output)
      for i, name in enumerate(node.input):
        if name:
          self.uses.setdefault(name, []).append((node, i))

  def walk(self):
    yield self
    for node in self.nodes:
      for g in node.graphs:
        yield from g.walk()


class WeightUses:
  """Follows initializers through a model's graphs (see the module doc).

  Args:
    root: the model's main ``GraphProto``.
    shapes: ``{name: shape}`` known for intermediate values (shape inference).
  """

  def __init__(self, root, shapes: dict | None = None):
    self.root = _Graph(root)
    self.shapes = shapes or {}
    self.consts = {name: t for _, name, t in self.constants()}
    self._carry_shapes(self.root)

  def _shape(self, graph, name):
    if name in self.consts:
      return [int(d) for d in self.consts[name].dims]
    got = graph.shapes.get(name) or self.shapes.get(name)
    return got if got and all(d is not None for d in got) else None

  def _carry_shapes(self, graph) -> None:
    """A Loop body's carried inputs have the shapes of the Loop's operands."""
    for node in graph.nodes:
      if node.op_type == "Loop" and node.body is not None:
        for outer, inner in list(zip(node.input, node.body.input))[2:]:
          known = self._shape(graph, outer)
          if known is not None and not self._shape(node.body, inner):
            node.body.shapes[inner] = known
      for g in node.graphs:
        self._carry_shapes(g)

  def constants(self):
    """``(graph, name, TensorProto)`` of every initializer and ``Constant`` output."""
    for g in self.root.walk():
      for t in g.proto.initializer:
        yield g, t.name, t
      for node in g.nodes:
        if node.op_type == "Constant" and node.output:
          val = attr(node.proto, "value", None)
          if val is not None and hasattr(val, "dims"):
            yield g, node.output[0], val

  def _outer_reads(self, graph, name: str):
    """Subgraphs of ``graph``'s nodes that read ``name`` from the enclosing scope."""
    for node in graph.nodes:
      for g in node.graphs:
        if name not in g.defined and self._reads(g, name):
          yield g

  def _reads(self, graph, name: str) -> bool:
    if name in graph.uses:
      return True
    return any(name not in g.defined and self._reads(g, name)
               for node in graph.nodes for g in node.graphs)

  def follow(self, graph, name: str, shape: tuple) -> list[tuple[str, tuple | None]]:
    """``[(consumer label, reduction axes of the initializer or None)]`` of one initializer."""
    out: list = []
    amap = tuple((a,) for a in range(len(shape)))
    self._follow(graph, name, amap, tuple(shape), frozenset(), set(), out, 0)
    return out

  def _follow(self, graph, name, amap, shape, parts, seen, out, depth) -> None:
    key = (id(graph), name)  # graph: a _Graph, built once
    if key in seen:
      return
    seen.add(key)
    if depth > _MAX_DEPTH:
      out.append(("a chain too long to follow", None))
      return
    for g in self._outer_reads(graph, name):
      self._follow(g, name, amap, shape, parts, seen, out, depth + 1)
    for node, idx in graph.uses.get(name, []):
      self._node(graph, node, idx, amap, shape, parts, seen, out, depth)

  def _node(self, graph, wrapped, idx, amap, shape, parts, seen, out, depth) -> None:
    node = wrapped.proto
    op = node.op_type
    res = node.output[0] if node.output else ""
    nd = len(shape)

    def go(name, amap, shape, parts=parts, graph=graph):
      self._follow(graph, name, amap, shape, parts, seen, out, depth + 1)

    def reduce(label, dims):
      if any(d in parts for d in dims):
        out.append((f"{label} (concatenated along its reduction axis)", None))
        return
      axes = tuple(a for d in dims if amap[d] is not None for a in amap[d])
      out.append((label, axes))

    if op in _PASS_OPS and idx == 0:
      go(res, amap, shape)
    elif op == "Transpose" and idx == 0:
      perm = list(attr(node, "perm", None) or reversed(range(nd)))
      inv = {p: i for i, p in enumerate(perm)}
      go(res, tuple(amap[p] for p in perm), tuple(shape[p] for p in perm),
         frozenset(inv[p] for p in parts))
    elif op in ("Reshape", "Squeeze", "Unsqueeze", "Flatten") and idx == 0:
      new = self._new_shape(node, op, shape)
      nm = None if new is None or parts else weights.reshape_axis_map(amap, shape, new)
      if nm is None:
        out.append((f"{op} (not followed)", None))
      else:
        go(res, nm, new)
    elif op == "Concat":
      ax = int(attr(node, "axis", 0)) % max(nd, 1)
      total = self._concat_size(graph, node, ax)
      if total is None:
        out.append(("Concat (sizes unknown)", None))
        return
      go(res, amap, shape[:ax] + (total,) + shape[ax + 1:], parts | {ax})
    elif op == "MatMul" and idx in (0, 1):
      if idx == 1:
        reduce("MatMul[B]", [0 if nd == 1 else nd - 2])
      else:
        reduce("MatMul[A]", [nd - 1])
    elif op == "Gemm" and idx in (0, 1):
      if idx == 1:
        t = int(attr(node, "transB", 0))
        reduce(f"Gemm(transB={t})", [1 if t else 0])
      else:
        t = int(attr(node, "transA", 0))
        reduce(f"Gemm[A](transA={t})", [0 if t else 1])
    elif op == "Conv" and idx == 1:
      g = int(attr(node, "group", 1))
      cg = shape[1] if nd > 1 else 0
      label = f"Conv(group={g})" if g > 1 else "Conv"
      if g > 1 and cg == 1:
        out.append((label + " depthwise", ()))
      else:
        reduce(label, [1])
    elif op == "ConvTranspose" and idx == 1:
      reduce("ConvTranspose", [0])
    elif op in ("Gemm", "Conv", "ConvTranspose") and idx == 2:
      return  # a bias
    elif op == "Einsum":
      eq = attr(node, "equation", b"")
      eq = eq.decode() if isinstance(eq, bytes) else str(eq)
      dims = _einsum_reduced(eq, idx, nd)
      if dims is None:
        out.append((f"Einsum({eq}) (not understood)", None))
      else:
        reduce(f"Einsum({eq})", dims)
    elif op == "Loop" and idx >= 2:
      body = wrapped.body
      if body is not None and idx < len(body.input):
        go(body.input[idx], amap, shape, graph=body)
    elif op == "Scan":
      body = wrapped.body
      n_scan = int(attr(node, "num_scan_inputs", 0))
      if body is None or idx >= len(body.input):
        out.append(("Scan", None))
        return
      if idx >= len(node.input) - n_scan:  # a scanned input: one slice per step
        axes = list(attr(node, "scan_input_axes", None) or [0] * n_scan)
        ax = axes[idx - (len(node.input) - n_scan)] % max(nd, 1)
        if ax in parts or (amap[ax] is not None and shape[ax] > 1):
          out.append(("Scan over a weight axis", None))
          return
        keep = [d for d in range(nd) if d != ax]
        go(body.input[idx], tuple(amap[d] for d in keep), tuple(shape[d] for d in keep),
           frozenset(keep.index(d) for d in parts), graph=body)
      else:
        go(body.input[idx], amap, shape, graph=body)
    else:
      out.append((op, None))

  def _concat_size(self, graph, node, ax: int) -> int | None:
    total = 0
    for name in node.input:
      dims = self._shape(graph, name)
      if dims is None or ax >= len(dims) or dims[ax] < 0:
        return None
      total += int(dims[ax])
    return total

  def _new_shape(self, node, op, shape):
    if op == "Reshape":
      target = int_list(self.consts, node, 1, "shape")
      if target is None:
        return None
      return _reshape_target(shape, target, bool(attr(node, "allowzero", 0)))
    if op == "Flatten":
      ax = int(attr(node, "axis", 1)) % (len(shape) + 1)
      return (int(np.prod(shape[:ax], dtype=np.int64)), int(np.prod(shape[ax:], dtype=np.int64)))
    axes = int_list(self.consts, node, 1, "axes")
    if axes is None:
      return None
    if op == "Squeeze":
      axes = [a % len(shape) for a in axes] if axes else [i for i, d in enumerate(shape) if d == 1]
      return tuple(d for i, d in enumerate(shape) if i not in axes)
    nd = len(shape) + len(axes)
    axes = sorted(a % nd for a in axes)
    it = iter(shape)
    return tuple(1 if i in axes else next(it) for i in range(nd))
