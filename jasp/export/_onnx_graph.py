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
share outputs cannot make the walk explode; the walk as a whole stops with a
:class:`~jasp.export.CheckError` after :data:`MAX_VISITS` steps (a name reached, or
one use of it followed). The graph is
untrusted input: an attribute of the wrong type or out of range (a ``perm``
that is no permutation, an axis past the rank, a reshape whose sizes do not
match) ends the walk along that path as "not followed", never with an error.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from jasp import weights
from jasp.export._safe_read import CheckError

__all__ = [
  "WeightUses",
  "all_graphs",
  "attr",
  "int_list",
  "non_text_name",
  "subgraphs",
  "tensors",
  "MAX_VISITS",
]

_PASS_OPS = {"Identity", "Cast", "CastLike", "DequantizeLinear"}
_MAX_DEPTH = 64
MAX_VISITS = 1_000_000  # names and uses followed, over all initializers of one model


class _Malformed(Exception):
  """An attribute of the wrong type or value: the walk does not follow that node."""


def attr(node, name: str, default=None):
  """The value of a node's attribute ``name`` (``default`` when absent).

  Raises:
    _Malformed: the attribute's type is not one ONNX defines.
  """
  from onnx import helper

  for a in node.attribute:
    if a.name == name:
      try:
        return helper.get_attribute_value(a)
      except ValueError:
        raise _Malformed(name) from None
  return default


def _int_attr(node, name: str, default: int) -> int:
  v = attr(node, name, default)
  if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
    raise _Malformed(name)
  return int(v)


def _ints_attr(node, name: str) -> list[int] | None:
  v = attr(node, name, None)
  if v is None:
    return None
  if not isinstance(v, (list, tuple)) or not all(isinstance(x, (int, np.integer)) for x in v):
    raise _Malformed(name)
  return [int(x) for x in v]


def int_list(consts, node, idx: int, name: str):
  """An int list given as input ``idx`` (a constant) or as attribute ``name``; None if dynamic.

  Raises:
    _Malformed: the attribute is not a list of integers.
  """
  from onnx import TensorProto
  from onnx import numpy_helper

  if len(node.input) > idx and node.input[idx]:
    t = consts.get(node.input[idx])
    if t is None or t.data_type not in (TensorProto.INT64, TensorProto.INT32) or len(t.dims) > 1:
      return None
    return [int(v) for v in numpy_helper.to_array(t).reshape(-1)]
  v = _ints_attr(node, name)
  return [] if v is None else v


def non_text_name(graph) -> bytes | None:
  """The first name or op type of ``graph`` (nested graphs included) that is not UTF-8 text.

  protobuf hands a ``string`` field holding invalid UTF-8 back as ``bytes``; ONNX requires
  text. None when every one is text.
  """
  for g in all_graphs(graph):
    names = [vi.name for vi in (*g.input, *g.output, *g.value_info)]
    names += [t.name for t in g.initializer]
    for node in g.node:
      names += [node.op_type, *node.input, *node.output, *(a.name for a in node.attribute)]
    for x in names:
      if not isinstance(x, str):
        return x
  return None


def tensors(graph):
  """Every ``TensorProto`` of ``graph`` and its nested graphs: initializers, tensor attributes."""
  from onnx import AttributeProto

  for g in all_graphs(graph):
    yield from g.initializer
    for node in g.node:
      for a in node.attribute:
        if a.type == AttributeProto.TENSOR:
          yield a.t
        elif a.type == AttributeProto.TENSORS:
          yield from a.tensors


def subgraphs(node) -> list:
  """The graphs held by a node's attributes (a Loop's body, an If's branches)."""
  from onnx import AttributeProto

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
  """The shape a ``Reshape`` to ``target`` gives; None if the sizes do not match."""
  if any(d == 0 and not allowzero and i >= len(shape) for i, d in enumerate(target)):
    return None
  out = [shape[i] if (d == 0 and not allowzero) else d for i, d in enumerate(target)]
  if out.count(-1) > 1 or any(d < -1 for d in out):
    return None
  total = math.prod(shape)
  if -1 in out:
    known = math.prod(d for d in out if d != -1)
    if not known or total % known:
      return None
    out[out.index(-1)] = total // known
  if math.prod(out) != total:
    return None
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
    if term.count("...") > 1:
      return None
    left, right = term.split("...")
    if len(left) + len(right) > ndim:
      return None
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
    # Names read here or in nested graphs without being defined here (read from the
    # enclosing scope), and for each name the subgraphs of this graph's nodes that read it so.
    self.inner: dict[str, list] = {}
    for node in self.nodes:
      for g in node.graphs:
        for name in g.free:
          self.inner.setdefault(name, []).append(g)
    self.free = (set(self.uses) | set(self.inner)) - self.defined

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
    self.visits = 0
    self._concat: dict = {}
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
          for a in node.proto.attribute:
            if a.name == "value" and a.HasField("t"):
              yield g, node.output[0], a.t
              break

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
    # One step per name and per use of it followed, over all initializers: bounds the work.
    self.visits += 1 + len(graph.inner.get(name, ())) + len(graph.uses.get(name, ()))
    if self.visits > MAX_VISITS:
      raise CheckError(
        f"the graph takes more than {MAX_VISITS} steps to follow its weights to "
        "their consumers; refusing to check it."
      )
    if depth > _MAX_DEPTH:
      out.append(("a chain too long to follow", None))
      return
    for g in graph.inner.get(name, ()):  # subgraphs reading it from this scope
      self._follow(g, name, amap, shape, parts, seen, out, depth + 1)
    for node, idx in graph.uses.get(name, []):
      try:
        self._node(graph, node, idx, amap, shape, parts, seen, out, depth)
      except _Malformed as e:
        out.append((f"{node.op_type} (attribute {e} malformed)", None))

  def _node(self, graph, wrapped, idx, amap, shape, parts, seen, out, depth) -> None:
    use = _Use(self, graph, wrapped, idx, amap, shape, parts, seen, out, depth)
    handler = _ON_OP.get(wrapped.op_type)
    if handler is None or not handler(use):
      use.stop(wrapped.op_type)

  def _concat_size(self, graph, wrapped, ax: int) -> int | None:
    key = (id(wrapped), ax)  # a Concat of many weights is sized once
    if key not in self._concat:
      total = 0
      for name in wrapped.input:
        dims = self._shape(graph, name)
        if dims is None or ax >= len(dims) or dims[ax] < 0:
          total = None
          break
        total += int(dims[ax])
      self._concat[key] = total
    return self._concat[key]

  def _new_shape(self, node, op, shape):
    """The result shape of a Reshape/Squeeze/Unsqueeze/Flatten; None if not understood."""
    return _NEW_SHAPE[op](self.consts, node, tuple(shape))


@dataclasses.dataclass(slots=True)
class _Use:
  """One use of a followed value: ``node`` reads it as its input ``idx``.

  ``amap[d]`` are the initializer's axes that the value's axis ``d`` holds
  (None: none of them); ``parts`` are the value's axes along which it was
  concatenated with other values.
  """

  walker: WeightUses
  graph: _Graph
  node: _Node
  idx: int
  amap: tuple
  shape: tuple
  parts: frozenset
  seen: set
  out: list
  depth: int

  @property
  def nd(self) -> int:
    return len(self.shape)

  @property
  def proto(self):
    return self.node.proto

  @property
  def result(self) -> str:
    return self.node.output[0] if self.node.output else ""

  def go(self, name: str, amap, shape, parts=None, graph=None) -> None:
    """Follows the value ``name`` (of ``graph``, default this one) one step deeper."""
    parts = self.parts if parts is None else parts
    graph = self.graph if graph is None else graph
    self.walker._follow(graph, name, amap, shape, parts, self.seen, self.out, self.depth + 1)

  def stop(self, label: str) -> None:
    """Records a consumer the walk does not follow past (no reduction axes)."""
    self.out.append((label, None))

  def reduce(self, label: str, dims) -> None:
    """Records a consumer that reduces the value along ``dims`` (mapped to the initializer)."""
    nd = self.nd
    if any(not 0 <= d < nd for d in dims):
      self.stop(f"{label} ({nd}-D operand: not understood)")
    elif any(d in self.parts for d in dims):
      self.stop(f"{label} (concatenated along its reduction axis)")
    else:
      self.out.append(
        (label, tuple(a for d in dims if self.amap[d] is not None for a in self.amap[d]))
      )


# Each handler follows or records one use and returns True; False: the use is not one the
# walk understands, recorded by the op type alone.


def _pass(u: _Use) -> bool:
  if u.idx != 0:
    return False
  u.go(u.result, u.amap, u.shape)
  return True


def _transpose(u: _Use) -> bool:
  if u.idx != 0:
    return False
  nd = u.nd
  perm = _ints_attr(u.proto, "perm") or list(reversed(range(nd)))
  if sorted(perm) != list(range(nd)):
    u.stop("Transpose (perm is not a permutation of the axes)")
    return True
  inv = {p: i for i, p in enumerate(perm)}
  u.go(
    u.result,
    tuple(u.amap[p] for p in perm),
    tuple(u.shape[p] for p in perm),
    frozenset(inv[p] for p in u.parts),
  )
  return True


def _reshape(u: _Use) -> bool:
  if u.idx != 0:
    return False
  op = u.node.op_type
  new = u.walker._new_shape(u.proto, op, u.shape)
  nm = None if new is None or u.parts else weights.reshape_axis_map(u.amap, u.shape, new)
  if nm is None:
    u.stop(f"{op} (not followed)")
  else:
    u.go(u.result, nm, new)
  return True


def _concat(u: _Use) -> bool:
  nd = u.nd
  ax = _int_attr(u.proto, "axis", 0)
  if not -nd <= ax < nd:
    u.stop("Concat (axis out of range)")
    return True
  ax %= nd
  total = u.walker._concat_size(u.graph, u.node, ax)
  if total is None:
    u.stop("Concat (sizes unknown)")
    return True
  u.go(u.result, u.amap, u.shape[:ax] + (total,) + u.shape[ax + 1 :], u.parts | {ax})
  return True


def _matmul(u: _Use) -> bool:
  if u.idx == 1:
    u.reduce("MatMul[B]", [0 if u.nd == 1 else u.nd - 2])
  elif u.idx == 0:
    u.reduce("MatMul[A]", [u.nd - 1])
  return u.idx in (0, 1)


def _gemm(u: _Use) -> bool:
  if u.idx not in (0, 1):
    return u.idx == 2  # a bias
  key = "transB" if u.idx == 1 else "transA"
  t = _int_attr(u.proto, key, 0)
  if u.nd != 2 or t not in (0, 1):
    u.stop(f"Gemm ({u.nd}-D operand, {key}={t}: not understood)")
  elif u.idx == 1:
    u.reduce(f"Gemm(transB={t})", [1 if t else 0])
  else:
    u.reduce(f"Gemm[A](transA={t})", [0 if t else 1])
  return True


def _conv(u: _Use) -> bool:
  if u.idx != 1:
    return u.idx == 2  # a bias
  g = _int_attr(u.proto, "group", 1)
  label = f"Conv(group={g})" if g > 1 else "Conv"
  if u.nd < 3 or g < 1:
    u.stop(f"{label} ({u.nd}-D weight: not understood)")
  elif g > 1 and u.shape[1] == 1:
    u.out.append((label + " depthwise", ()))
  else:
    u.reduce(label, [1])
  return True


def _conv_transpose(u: _Use) -> bool:
  if u.idx != 1:
    return u.idx == 2  # a bias
  if u.nd < 3:
    u.stop(f"ConvTranspose ({u.nd}-D weight: not understood)")
  else:
    u.reduce("ConvTranspose", [0])
  return True


def _einsum(u: _Use) -> bool:
  eq = attr(u.proto, "equation", b"")
  if not isinstance(eq, (bytes, str)):
    raise _Malformed("equation")
  eq = eq.decode("utf-8", "replace") if isinstance(eq, bytes) else eq
  dims = _einsum_reduced(eq, u.idx, u.nd)
  if dims is None:
    u.stop(f"Einsum({eq[:40]}) (not understood)")
  else:
    u.reduce(f"Einsum({eq})", dims)
  return True


def _loop(u: _Use) -> bool:
  if u.idx < 2:
    return False
  body = u.node.body
  if body is not None and u.idx < len(body.input):
    u.go(body.input[u.idx], u.amap, u.shape, graph=body)
  return True


def _scan(u: _Use) -> bool:
  body = u.node.body
  n_scan = _int_attr(u.proto, "num_scan_inputs", 0)
  n_in = len(u.node.input)
  if body is None or u.idx >= len(body.input) or not 0 <= n_scan <= n_in:
    u.stop("Scan")
  elif u.idx >= n_in - n_scan:  # a scanned input: one slice per step
    _scanned(u, body, n_scan, u.idx - (n_in - n_scan))
  else:
    u.go(body.input[u.idx], u.amap, u.shape, graph=body)
  return True


def _scanned(u: _Use, body: _Graph, n_scan: int, pos: int) -> None:
  """A Scan's scanned input ``pos``: the body sees one slice of it, without the scanned axis."""
  nd = u.nd
  axes = _ints_attr(u.proto, "scan_input_axes") or [0] * n_scan
  if nd == 0 or pos >= len(axes) or not -nd <= axes[pos] < nd:
    u.stop("Scan (scan_input_axes not understood)")
    return
  ax = axes[pos] % nd
  if ax in u.parts or (u.amap[ax] is not None and u.shape[ax] > 1):
    u.stop("Scan over a weight axis")
    return
  keep = [d for d in range(nd) if d != ax]
  u.go(
    body.input[u.idx],
    tuple(u.amap[d] for d in keep),
    tuple(u.shape[d] for d in keep),
    frozenset(keep.index(d) for d in u.parts),
    graph=body,
  )


_ON_OP = {
  **dict.fromkeys(_PASS_OPS, _pass),
  "Transpose": _transpose,
  **dict.fromkeys(("Reshape", "Squeeze", "Unsqueeze", "Flatten"), _reshape),
  "Concat": _concat,
  "MatMul": _matmul,
  "Gemm": _gemm,
  "Conv": _conv,
  "ConvTranspose": _conv_transpose,
  "Einsum": _einsum,
  "Loop": _loop,
  "Scan": _scan,
}


# The result shape of each reshaping op, ``(consts, node, shape) -> shape``; None if not
# understood.


def _reshape_shape(consts, node, shape):
  target = int_list(consts, node, 1, "shape")
  if target is None:
    return None
  return _reshape_target(shape, target, bool(_int_attr(node, "allowzero", 0)))


def _flatten_shape(consts, node, shape):
  nd = len(shape)
  ax = _int_attr(node, "axis", 1)
  if not -nd <= ax <= nd:
    return None
  ax %= nd + 1
  return (math.prod(shape[:ax]), math.prod(shape[ax:]))


def _squeeze_shape(consts, node, shape):
  nd = len(shape)
  axes = int_list(consts, node, 1, "axes")
  if axes is None:
    return None
  if not axes:
    axes = [i for i, d in enumerate(shape) if d == 1]
  if any(not -nd <= a < nd for a in axes):
    return None
  axes = {a % nd for a in axes}
  if any(shape[a] != 1 for a in axes):
    return None
  return tuple(d for i, d in enumerate(shape) if i not in axes)


def _unsqueeze_shape(consts, node, shape):
  axes = int_list(consts, node, 1, "axes")
  if axes is None:
    return None
  out_nd = len(shape) + len(axes)
  if any(not -out_nd <= a < out_nd for a in axes) or len({a % out_nd for a in axes}) != len(axes):
    return None
  axes = {a % out_nd for a in axes}
  it = iter(shape)
  return tuple(1 if i in axes else next(it) for i in range(out_nd))


_NEW_SHAPE = {
  "Reshape": _reshape_shape,
  "Flatten": _flatten_shape,
  "Squeeze": _squeeze_shape,
  "Unsqueeze": _unsqueeze_shape,
}
