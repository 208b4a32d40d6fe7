"""One adapter for every entry point: a model as a pure function of its leaves.

jasp's model-level functions (:func:`jasp.trace_layouts`, the calibration
pruners, :func:`jasp.permute`, the exporters) take a model in one of two
forms:

* a function and its variables: ``(model.apply, variables, *inputs)`` for
  flax linen (a linen ``Module`` instance stands for its ``apply``), or any
  ``fn(params, *inputs)``;
* an ``nnx.Module``: ``(module, *inputs)``.

:func:`adapt` turns either into a :class:`Model`: the pytree that jasp reads
and rewrites (``tree``: the linen variables; for nnx the ``nnx.Param`` state, or
all of the module's state when asked), the rest of an nnx module's state
(``extra``, riding along unchanged), and ``run(leaves, extra, *inputs)``.
Leaves are named by the path strings of :mod:`jasp._tree`, so an
``nnx.State`` and the pure arrays that optax sees name a kernel the same way.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from flax import nnx
from jax.extend import core as jcore

from jasp import _tree
from jasp.typing import PyTree

__all__ = ["Model", "Traced", "adapt", "is_module"]


def is_module(fn: Any) -> bool:
  """Whether ``fn`` is an ``nnx.Module``."""
  return isinstance(fn, nnx.Module)


@dataclasses.dataclass
class Traced:
  """A model traced to a jaxpr whose inputs are ``leaves + extra + input arrays``.

  Attributes:
    closed: the closed jaxpr.
    n_leaves: how many of its inputs are the model's leaves.
    n_extra: how many after them are other state (an nnx module's non-traced
      variables).
    shapes: the leaves' shapes.
  """

  closed: jcore.ClosedJaxpr
  n_leaves: int
  n_extra: int
  shapes: list[tuple[int, ...]]


class Model:
  """A model as a pure function of its flat leaves (see the module doc).

  Attributes:
    tree: the pytree jasp reads and rewrites, as given (a dict, an
      ``nnx.State``).
    extra: the rest of an nnx module's state, as pure arrays (``()`` otherwise).
    paths: path string of every leaf of ``tree``, in flatten order.
    leaves: the leaves (arrays).
    module: the nnx module, or None.
  """

  def __init__(
    self,
    call: Callable[..., Any],
    tree: PyTree,
    extra: PyTree = (),
    graphdef: Any = None,
    module: Any = None,
  ):
    self._call = call
    self.tree = tree
    self.extra = extra
    self.graphdef = graphdef
    self.module = module
    flat, self._treedef = jax.tree_util.tree_flatten_with_path(tree)
    self.paths = [_tree.path_str(p) for p, _ in flat]
    self.leaves = [x for _, x in flat]
    self._pure_def = jax.tree_util.tree_structure(_tree.unbox(tree))

  def run(self, leaves: Sequence[Any], extra: PyTree, *inputs, **kwargs) -> Any:
    """Runs the model on ``leaves`` (flatten order of ``tree``) and ``extra``."""
    return self._call(
      jax.tree_util.tree_unflatten(self._pure_def, list(leaves)), extra, *inputs, **kwargs
    )

  def apply(self, tree: PyTree, *inputs, **kwargs) -> Any:
    """Runs the model on a whole tree (of ``tree``'s structure; boxed or pure)."""
    return self._call(_tree.unbox(tree), self.extra, *inputs, **kwargs)

  def rebuild(self, leaves: Sequence[Any]) -> PyTree:
    """A tree of ``tree``'s type (an ``nnx.State`` stays one) holding ``leaves``."""
    return jax.tree_util.tree_unflatten(self._treedef, list(leaves))

  def to_module(self, tree: PyTree) -> Any:
    """nnx only: a new module holding ``tree`` (and ``extra``)."""
    if self.graphdef is None:
      raise TypeError("to_module: not an nnx model.")
    if self.extra == ():
      return nnx.merge(self.graphdef, tree)
    return nnx.merge(self.graphdef, tree, self.extra)

  def trace(
    self, inputs: Sequence[Any], kwargs: dict | None = None, leaves: Sequence[Any] | None = None
  ) -> Traced:
    """Traces the model once (abstractly) on ``inputs``.

    Array leaves of ``inputs`` become inputs of the jaxpr (what the analyses
    treat as activations); anything else (Python scalars, strings) stays
    static.
    """
    kwargs = dict(kwargs or {})
    leaves = list(self.leaves if leaves is None else leaves)
    arg_leaves, arg_def = jax.tree_util.tree_flatten(tuple(inputs))
    is_arr = [isinstance(x, (jax.Array, np.ndarray, jax.ShapeDtypeStruct)) for x in arg_leaves]
    traced = [x for x, t in zip(arg_leaves, is_arr) if t]

    def run(ls, extra, tr):
      it = iter(tr)
      full = [next(it) if t else x for x, t in zip(arg_leaves, is_arr)]
      return self.run(ls, extra, *jax.tree_util.tree_unflatten(arg_def, full), **kwargs)

    closed = jax.make_jaxpr(run)(leaves, self.extra, traced)
    n_extra = len(jax.tree_util.tree_leaves(self.extra))
    return Traced(closed, len(leaves), n_extra, [tuple(np.shape(x)) for x in leaves])


def adapt(
  fn: Callable[..., Any] | Any,
  params: PyTree,
  inputs: Sequence[Any],
  *,
  state: bool = False,
  what: str = "jasp",
) -> tuple[Model, tuple]:
  """The :class:`Model` and the inputs of a ``(fn, params, *inputs)`` call.

  Args:
    fn: ``model.apply`` (or a linen ``Module``, or any ``fn(params, *inputs)``),
      or an ``nnx.Module``.
    params: the variables for ``fn``; for an nnx module, its first input (or
      None).
    inputs: the remaining inputs.
    state: nnx only: read and rewrite all of the module's state (batch
      statistics too) instead of its ``nnx.Param`` state.
    what: the caller's name, for error messages.

  Returns:
    ``(model, inputs)``.

  Raises:
    TypeError: when the variables of a function are missing.
  """
  if is_module(fn):
    inputs = ((params,) if params is not None else ()) + tuple(inputs)
    if state:
      graphdef, tree = nnx.split(fn)

      def call(p, extra, *xs, **kw):
        del extra
        return nnx.merge(graphdef, p)(*xs, **kw)

      return Model(call, tree, (), graphdef, fn), inputs
    graphdef, tree, rest = nnx.split(fn, nnx.Param, ...)

    def call_params(p, extra, *xs, **kw):
      return nnx.merge(graphdef, p, extra)(*xs, **kw)

    return Model(call_params, tree, _tree.unbox(rest), graphdef, fn), inputs
  if isinstance(fn, nn.Module):
    fn = fn.apply
  if params is None:
    raise TypeError(f"{what}(fn, params, ...): the params (variables) of fn are missing.")

  def call_fn(p, extra, *xs, **kw):
    del extra
    return fn(p, *xs, **kw)

  return Model(call_fn, params, (), None, None), tuple(inputs)
