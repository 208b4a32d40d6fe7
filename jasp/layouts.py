"""Which axes of a weight a layer contracts: traced from the jaxpr, or by flax convention.

2:4 sparse tensor cores need the N:M groups along the *reduction* axis of the
matmul or convolution that consumes the weight. :func:`trace_layouts` finds it
for every parameter by tracing the model once (as apex uses ``torch.fx``), with
the analysis of :mod:`jasp.weights`: a parameter that reaches the weight operand
of a ``dot_general`` or ``conv_general_dilated`` through layout-preserving ops
(casts, transposes, reshapes, broadcasts, flips, nested ``jit``/``remat``, the
layer slices of a ``scan``) is pruned along the axes contracted there. A
parameter with any other use (an embedding gather, a bias add, a norm scale
multiplying an activation, a low-rank adapter factor) is not a weight of a
matmul and stays dense, with the reason.

Without a trace, :func:`convention_layout` applies flax's naming conventions
(``kernel`` leaves of ``Dense``/``Conv``/attention modules); ambiguous leaves
stay dense and say so.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from jasp import _model
from jasp import weights

__all__ = ["Layout", "trace_layouts", "convention_layout"]


@dataclasses.dataclass(frozen=True)
class Layout:
  """How a parameter is consumed.

  Attributes:
    axis: the group axes (the contracted input-channel axes, consecutive,
      flattened row-major), or None when the leaf is not a matmul/conv weight.
    out_axes: the output-channel axes (for a conv: the ``O`` axis; for a dot:
      the free axes of the weight).
    kind: ``"dot"``, ``"conv"`` or ``"none"``.
    reason: why the leaf is not a matmul/conv weight (empty otherwise).
    source: ``"trace"``, ``"convention"`` or ``"user"``.
    stack: the leaf's stacked-layer axes (a kernel ``(L, in, out)`` run by a
      ``scan`` over its layers: ``(0,)``); never group axes.
  """

  axis: tuple[int, ...] | None
  out_axes: tuple[int, ...] = ()
  kind: str = "none"
  reason: str = ""
  source: str = "trace"
  stack: tuple[int, ...] = ()


# ----------------------------------------------------------------------------
# Tracing.


def classify(uses: list[weights.Use]) -> Layout:
  """The layout of a leaf from its uses (see :mod:`jasp.weights` for the rules)."""
  if not uses:
    return Layout(None, reason="not used by the traced function")
  others = sorted({u.what for u in uses if u.kind == "other"})
  if others:
    reason = "used by " + "; ".join(others)
    contracted = sorted({u.axes for u in uses if u.kind != "other"})
    if contracted:  # e.g. an embedding also used as the output projection (attend)
      reason += (
        f"; also the weight of a matmul along axes {contracted[0]} (tied: pruning it "
        "would change its other uses too; force it with Policy(axes=...))"
      )
    return Layout(None, reason=reason)
  kinds = {u.kind for u in uses}
  axes = {u.axes for u in uses}
  if len(axes) > 1 or len(kinds) > 1:
    return Layout(None, reason=f"contracted along different axes by different uses: {sorted(axes)}")
  stacks = {u.stack for u in uses}
  if len(stacks) > 1:
    return Layout(None, reason=f"used both stacked and unstacked (stacked axes {sorted(stacks)})")
  (ax,) = axes
  if not ax:
    return Layout(None, reason="no axis of the weight is contracted")
  if list(ax) != list(range(ax[0], ax[0] + len(ax))):
    return Layout(None, reason=f"the contracted axes {ax} are not consecutive")
  outs = {u.out_axes for u in uses}
  return Layout(ax, out_axes=sorted(outs)[0], kind=kinds.pop(), source="trace", stack=stacks.pop())


def trace_layouts(
  fn: Callable[..., Any] | Any, params: Any = None, *args, **kwargs
) -> dict[str, Layout]:
  """Traces a model once and reports how each parameter is contracted.

  Two call forms:

  * linen or any function: ``trace_layouts(model.apply, variables, x)``, where
    ``fn(params, *args, **kwargs)`` runs the model;
  * nnx: ``trace_layouts(module, x)``: the module's ``nnx.Param`` state is traced
    through ``module(x)``.

  Nothing is computed: the function is traced abstractly (``jax.make_jaxpr``).
  Array leaves of ``args`` are the model's inputs (activations); the rules that
  decide what is a weight are in :mod:`jasp.weights`.

  Returns:
    ``{path string: Layout}`` for every leaf of ``params`` (for nnx: of
    ``nnx.state(module, nnx.Param)``); paths as :func:`jasp.compute_masks`
    names them (``params/Dense_0/kernel``, ``conv1/kernel``).

  Raises:
    TypeError: when ``params`` are missing for a function.
  """
  model, inputs = _model.adapt(fn, params, args, what="trace_layouts")
  return from_analysis(model, weights.analyse(model.trace(inputs, kwargs)))


def from_analysis(model: _model.Model, flow: weights.WeightFlow) -> dict[str, Layout]:
  """``{path: Layout}`` of a model's leaves from its :func:`jasp.weights.analyse`."""
  out = {}
  for k, (p, leaf) in enumerate(zip(model.paths, model.leaves)):
    dt = getattr(leaf, "dtype", None)
    if dt is None or not jnp.issubdtype(dt, jnp.inexact):
      out[p] = Layout(None, reason="not a floating-point array")
      continue
    out[p] = classify(list(flow.uses.get(k, {}).values()))
  return out


# ----------------------------------------------------------------------------
# Conventions (no trace).

_CONV = re.compile(r"(^|_)(conv|convtranspose|convlocal)(_?\d+)?$|conv", re.IGNORECASE)
_QKV = re.compile(r"^(query|key|value|q_proj|k_proj|v_proj|qkv)$", re.IGNORECASE)
_OUT = re.compile(r"^(out|o_proj|out_proj)$", re.IGNORECASE)


def convention_layout(path: str, leaf: Any) -> Layout:
  """Flax's conventions, used when no trace is given.

  * ``kernel`` of rank 2: a ``Dense``/``Linear`` kernel ``(in, out)``: axis 0.
  * ``kernel`` of rank >= 3 under a module whose name says conv (``Conv_0``,
    ``ConvTranspose_1``, ``conv1``): ``(*spatial, in, out)``: axis -2.
  * attention projections (``query``/``key``/``value`` ``(features, heads,
    head_dim)``: axis 0; ``out`` ``(heads, head_dim, features)``: axes 0..-2).
  * anything else stays dense; a rank >= 3 ``kernel`` of unknown kind says that
    its layout is ambiguous and that :func:`trace_layouts` resolves it.
  """
  parts = path.split("/")
  name = parts[-1]
  parent = parts[-2] if len(parts) > 1 else ""
  nd = np.ndim(leaf)
  dt = getattr(leaf, "dtype", None)
  if dt is None or not jnp.issubdtype(dt, jnp.inexact):
    return Layout(None, reason="not a floating-point array", source="convention")
  if name == "embedding":
    return Layout(None, reason="an embedding table (a lookup, not a matmul)", source="convention")
  if name != "kernel":
    return Layout(None, reason=f"a '{name}' leaf, not a kernel", source="convention")
  if nd < 2:
    return Layout(None, reason="a kernel of rank < 2", source="convention")
  if nd == 2:
    return Layout((0,), (1,), kind="dot", source="convention")
  if _CONV.search(parent):
    return Layout((nd - 2,), (nd - 1,), kind="conv", source="convention")
  if _QKV.match(parent):
    return Layout((0,), tuple(range(1, nd)), kind="dot", source="convention")
  if _OUT.match(parent):
    return Layout(tuple(range(nd - 1)), (nd - 1,), kind="dot", source="convention")
  return Layout(
    None,
    reason=(
      f"a rank-{nd} kernel whose layout the name '{parent}' does not tell (Conv or "
      "DenseGeneral?); pass layouts=jasp.trace_layouts(...) or an axis override"
    ),
    source="convention",
  )


def resolve(path: str, leaf: Any, layouts: Mapping[str, Layout] | None) -> Layout:
  """The layout of one leaf: from ``layouts`` when given, else by convention."""
  if layouts is None:
    return convention_layout(path, leaf)
  if path in layouts:
    return layouts[path]
  return Layout(None, reason="absent from the given layouts", source="user")
