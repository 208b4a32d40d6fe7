"""One traversal of a jaxpr, shared by every analysis of a model.

jasp reads a model by tracing it to a jaxpr (``jax.make_jaxpr``) and walking
the equations: :mod:`jasp.graph` to find which parameters are matmul/conv
weights and what their inputs are (layouts, calibration), and
:mod:`jasp.permutation.graph` to find which parameter axes carry the same
channels. This module is the walk they share, written once:

* **Sub-jaxprs.** :func:`call_body` is the one lookup of a call primitive's
  body (``pjit``/``jit``, ``closed_call``, ``core_call``, ``remat``/
  ``checkpoint``, ``custom_jvp_call``, ``custom_vjp_call``), with its constants;
  a body is inlined only when its inputs and outputs match the equation's one
  to one.
* **Control flow.** :class:`Scan`, :class:`Cond` and :class:`While` split a
  loop's or branch's operands and results into their roles (constants, carry,
  scanned inputs, stacked outputs; branch index and operands; loop constants
  and carry), so that every analysis aligns the outer and inner variables the
  same way.
* **Outputs.** An interpreter returns the values of a jaxpr's outputs to its
  caller; what reaches the *top-level* outputs is the caller's business, never
  a nested body's.

An analysis subclasses :class:`Interpreter` and supplies a value for literals
and constants, a rule for plain primitives (:meth:`Interpreter.primitive`,
usually a table keyed by primitive name) and, where its semantics of loops
differ from the default, :meth:`Interpreter.scan`, :meth:`Interpreter.cond` and
:meth:`Interpreter.while_loop`. Every nested body is visited with a *context*:
the tuple of ``(id(equation), part)`` of the equations that enclose it, so
that an analysis can name an equation inside a body that is shared by several
call sites (``jax.jit`` reuses one jaxpr for identical calls).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any
from typing import Generic
from typing import TypeVar

from jax.extend import core as jcore

__all__ = ["CALL_PRIMITIVES", "Body", "Cond", "Interpreter", "Scan", "While", "call_body"]

V = TypeVar("V")

# Primitives whose body computes their result from their operands, one to one.
CALL_PRIMITIVES = frozenset(
  {
    "pjit",
    "jit",
    "closed_call",
    "core_call",
    "remat",
    "remat2",
    "checkpoint",
    "custom_jvp_call",
    "custom_vjp_call",
    "custom_vjp_call_jaxpr",
  }
)

Context = tuple  # ((id(eqn), part), ...) from the outermost equation inwards


@dataclasses.dataclass(frozen=True)
class Body:
  """A nested jaxpr with the constants its ``constvars`` take."""

  jaxpr: jcore.Jaxpr
  consts: tuple = ()


def _body(j: Any) -> Body | None:
  if isinstance(j, jcore.ClosedJaxpr):
    return Body(j.jaxpr, tuple(j.consts))
  if isinstance(j, jcore.Jaxpr):
    return Body(j, ())
  return None


def call_body(eqn: jcore.JaxprEqn) -> Body | None:
  """The body of a call primitive, or None.

  None when ``eqn`` is not in :data:`CALL_PRIMITIVES`, holds no jaxpr, or its
  body's inputs or outputs do not match the equation's one to one.
  """
  if eqn.primitive.name not in CALL_PRIMITIVES:
    return None
  for name in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
    if name in eqn.params:
      b = _body(eqn.params[name])
      if b is None:
        return None
      if len(b.jaxpr.invars) == len(eqn.invars) and len(b.jaxpr.outvars) == len(eqn.outvars):
        return b
      return None
  return None


@dataclasses.dataclass(frozen=True)
class Scan:
  """The roles of a ``scan`` equation's operands and results.

  Operands are ``consts + carry + xs``; results ``carry + ys``; the body takes
  ``consts + carry + x`` (one slice of each ``xs`` along its leading axis) and
  returns ``carry + y``. With ``reverse`` the iterations run from the last
  slice to the first.
  """

  body: Body
  num_consts: int
  num_carry: int
  length: int
  reverse: bool

  @classmethod
  def of(cls, eqn: jcore.JaxprEqn) -> Scan:
    p = eqn.params
    if "num_consts" in p:  # jax <= 0.10
      nc, nk = int(p["num_consts"]), int(p["num_carry"])
    else:  # jax 0.11: the operands' grouping is a flat tree (consts, carry, xs)
      groups = p["ft_in"].update(list(range(len(eqn.invars)))).unpack()
      nc, nk = len(groups[0]), len(groups[1])
    return cls(_body(p["jaxpr"]), nc, nk, int(p["length"]), bool(p.get("reverse", False)))

  def split_in(self, seq: Sequence[V]) -> tuple[list[V], list[V], list[V]]:
    """``(consts, carry, xs)`` of the operands (or of the body's inputs)."""
    c, k = self.num_consts, self.num_carry
    return list(seq[:c]), list(seq[c : c + k]), list(seq[c + k :])

  def split_out(self, seq: Sequence[V]) -> tuple[list[V], list[V]]:
    """``(carry, ys)`` of the results (or of the body's outputs)."""
    return list(seq[: self.num_carry]), list(seq[self.num_carry :])


@dataclasses.dataclass(frozen=True)
class Cond:
  """A ``cond``/``switch``: operand 0 picks a branch; each branch takes the rest."""

  branches: tuple[Body, ...]

  @classmethod
  def of(cls, eqn: jcore.JaxprEqn) -> Cond:
    return cls(tuple(_body(b) for b in eqn.params["branches"]))


@dataclasses.dataclass(frozen=True)
class While:
  """A ``while``: operands ``cond_consts + body_consts + carry``; results ``carry``."""

  cond: Body
  body: Body
  cond_nconsts: int
  body_nconsts: int

  @classmethod
  def of(cls, eqn: jcore.JaxprEqn) -> While:
    p = eqn.params
    return cls(
      _body(p["cond_jaxpr"]), _body(p["body_jaxpr"]), int(p["cond_nconsts"]), int(p["body_nconsts"])
    )

  def split_in(self, seq: Sequence[V]) -> tuple[list[V], list[V], list[V]]:
    """``(cond_consts, body_consts, carry)`` of the operands."""
    a, b = self.cond_nconsts, self.body_nconsts
    return list(seq[:a]), list(seq[a : a + b]), list(seq[a + b :])


class Interpreter(Generic[V]):
  """Walks a jaxpr, giving every variable a value of the analysis' domain ``V``.

  Subclasses implement :meth:`literal`, :meth:`constant` and
  :meth:`primitive`; the defaults inline call bodies and hand loops and
  branches to :meth:`scan`, :meth:`cond` and :meth:`while_loop`, which
  subclasses override (the base versions treat them as plain primitives).
  ``self.context`` names the enclosing equations while a body is walked.
  """

  def __init__(self):
    self.context: Context = ()

  # -- the analysis' domain ---------------------------------------------------
  def literal(self, lit: jcore.Literal) -> V:
    raise NotImplementedError

  def constant(self, var: jcore.Var, value: Any) -> V:
    raise NotImplementedError

  def primitive(self, eqn: jcore.JaxprEqn, ins: list[V]) -> list[V]:
    raise NotImplementedError

  # -- structure ------------------------------------------------------------------
  def call(self, eqn: jcore.JaxprEqn, body: Body, ins: list[V]) -> list[V]:
    """A call primitive: its body, walked on the operands (inlined)."""
    return self.walk(eqn, "call", body, ins)

  def scan(self, eqn: jcore.JaxprEqn, scan: Scan, ins: list[V]) -> list[V]:
    return self.primitive(eqn, ins)

  def cond(self, eqn: jcore.JaxprEqn, cond: Cond, ins: list[V]) -> list[V]:
    return self.primitive(eqn, ins)

  def while_loop(self, eqn: jcore.JaxprEqn, loop: While, ins: list[V]) -> list[V]:
    return self.primitive(eqn, ins)

  def walk(self, eqn: jcore.JaxprEqn, part: Any, body: Body, ins: Sequence[V]) -> list[V]:
    """Runs ``body`` on ``ins`` inside ``eqn``'s context; returns its outputs' values."""
    saved = self.context
    self.context = saved + ((id(eqn), part),)
    try:
      return self.run(body.jaxpr, body.consts, ins)
    finally:
      self.context = saved

  def walk_branches(self, eqn: jcore.JaxprEqn, cond: Cond, ops: Sequence[V]) -> list[list[V]]:
    """Runs every branch of a ``cond`` on its operands; one list of outputs per branch."""
    return [self.walk(eqn, i, br, ops) for i, br in enumerate(cond.branches)]

  def key(self, eqn: jcore.JaxprEqn) -> Context:
    """A name for ``eqn`` that is unique across call sites of shared bodies."""
    return self.context + ((id(eqn), None),)

  def equation(self, eqn: jcore.JaxprEqn, ins: list[V]) -> list[V]:
    name = eqn.primitive.name
    body = call_body(eqn)
    if body is not None:
      return self.call(eqn, body, ins)
    if name == "scan":
      return self.scan(eqn, Scan.of(eqn), ins)
    if name == "cond":
      return self.cond(eqn, Cond.of(eqn), ins)
    if name == "while":
      return self.while_loop(eqn, While.of(eqn), ins)
    return self.primitive(eqn, ins)

  def run(self, jaxpr: jcore.Jaxpr, consts: Sequence[Any], args: Sequence[V]) -> list[V]:
    """Walks ``jaxpr``; returns the values of its outputs."""
    env: dict = {}
    for v, c in zip(jaxpr.constvars, consts):
      env[v] = self.constant(v, c)
    for v, a in zip(jaxpr.invars, args, strict=True):
      env[v] = a

    def read(v):
      return self.literal(v) if isinstance(v, jcore.Literal) else env[v]

    for eqn in jaxpr.eqns:
      outs = self.equation(eqn, [read(v) for v in eqn.invars])
      for v, o in zip(eqn.outvars, outs, strict=True):
        env[v] = o
    return [read(v) for v in jaxpr.outvars]
