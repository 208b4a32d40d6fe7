"""Which axes of a weight a layer contracts: traced from the jaxpr, or by flax convention.

2:4 sparse tensor cores need the N:M groups along the *reduction* axis of the
matmul or convolution that consumes the weight. :func:`trace_layouts` finds it
for every parameter by tracing the model once (as apex uses ``torch.fx``): it
follows each parameter through layout-preserving ops (casts, transposes,
reshapes, broadcasts, flips, nested ``jit``/``remat``/``scan``/``cond``) to the
``dot_general`` or ``conv_general_dilated`` that consumes it and reads the
contracted axes there. A parameter with any other use (an embedding gather, an
add, a norm) is not a weight of a matmul and stays dense, with the reason.

Without a trace, :func:`convention_layout` applies flax's naming conventions
(``kernel`` leaves of ``Dense``/``Conv``/attention modules); ambiguous leaves
stay dense and say so.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

from jasp import _shapes
from jasp import _tree

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
  """
  axis: tuple[int, ...] | None
  out_axes: tuple[int, ...] = ()
  kind: str = "none"
  reason: str = ""
  source: str = "trace"


# ----------------------------------------------------------------------------
# Tracing.

_PASS = {
    "convert_element_type", "copy", "copy_p", "reduce_precision", "sharding_constraint",
    "optimization_barrier", "pvary", "device_put", "mul", "neg", "real", "name",
}
_CALLS = {"pjit", "jit", "closed_call", "core_call", "remat", "checkpoint", "remat2",
          "custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr", "custom_lin"}

# An axis map records, for each axis of a traced value, the parameter axes it
# holds: a tuple of parameter axes (several when reshape merged them) or None.
AxisMap = tuple


@dataclasses.dataclass
class _Use:
  kind: str  # "dot" | "conv" | "other"
  axes: tuple[int, ...] = ()
  out_axes: tuple[int, ...] = ()
  what: str = ""


def _sub_jaxprs(eqn):
  p = eqn.params
  for name in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
    if name in p:
      j = p[name]
      return j.jaxpr if hasattr(j, "jaxpr") else j
  return None


def _reshape_map(amap: AxisMap, old: Sequence[int], new: Sequence[int]):
  """Maps axes through a reshape that splits/merges; None if a traced axis splits."""
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


class _Tracer:
  def __init__(self, n_leaves: int):
    self.uses: list[list[_Use]] = [[] for _ in range(n_leaves)]

  def other(self, origins, what):
    for leaf, _ in origins:
      self.uses[leaf].append(_Use("other", what=what))

  def run(self, jaxpr, env: dict):
    """Walks ``jaxpr``; ``env`` maps vars to lists of (leaf, axis map)."""
    def get(v):
      if isinstance(v, jcore.Literal):
        return []
      return env.get(v, [])

    for eqn in jaxpr.eqns:
      prim = eqn.primitive.name
      ins = [get(v) for v in eqn.invars]
      if not any(ins):
        continue
      outs: list[list] = [[] for _ in eqn.outvars]
      if prim in _PASS and len(eqn.outvars) == 1:
        if prim == "mul" and sum(bool(x) for x in ins) > 1:
          self.other([o for x in ins for o in x], "a product of two parameters")
        else:
          for x in ins:
            for leaf, amap in x:
              outs[0].append((leaf, amap))
      elif prim == "transpose":
        perm = eqn.params["permutation"]
        outs[0] = [(leaf, tuple(amap[p] for p in perm)) for leaf, amap in ins[0]]
      elif prim in ("reshape", "squeeze", "expand_dims"):
        old, new = eqn.invars[0].aval.shape, eqn.outvars[0].aval.shape
        for leaf, amap in ins[0]:
          nm = _reshape_map(amap, old, new)
          if nm is None:
            self.uses[leaf].append(_Use("other", what="a reshape that splits a weight axis"))
          else:
            outs[0].append((leaf, nm))
      elif prim == "broadcast_in_dim":
        dims = eqn.params["broadcast_dimensions"]
        nd = len(eqn.outvars[0].aval.shape)
        for leaf, amap in ins[0]:
          new = [None] * nd
          for k, d in enumerate(dims):
            new[d] = amap[k]
          outs[0].append((leaf, tuple(new)))
      elif prim == "rev":
        outs[0] = list(ins[0])
      elif prim == "dot_general":
        (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
        for side, (contract, batch) in enumerate(((lc, lb), (rc, rb))):
          for leaf, amap in ins[side]:
            axes = tuple(sorted(a for d in contract if amap[d] is not None for a in amap[d]))
            free = [d for d in range(len(amap)) if d not in contract and d not in batch]
            out_axes = tuple(sorted(a for d in free if amap[d] is not None for a in amap[d]))
            self.uses[leaf].append(_Use("dot", axes, out_axes))
        if len(eqn.invars) > 2:
          self.other([o for x in ins[2:] for o in x], "dot_general")
      elif prim == "conv_general_dilated":
        dn = eqn.params["dimension_numbers"]
        self.other(ins[0], "the input (not the kernel) of a convolution")
        ok = eqn.params.get("batch_group_count", 1) == 1
        for leaf, amap in ins[1]:
          if not ok:
            self.uses[leaf].append(_Use("other", what="a batch-grouped convolution"))
            continue
          i_ax, o_ax = amap[dn.rhs_spec[1]], amap[dn.rhs_spec[0]]
          self.uses[leaf].append(_Use("conv", tuple(i_ax or ()), tuple(o_ax or ())))
      elif prim in _CALLS or (prim.startswith("custom_") and _sub_jaxprs(eqn) is not None):
        sub = _sub_jaxprs(eqn)
        if sub is None:
          self.other([o for x in ins for o in x], prim)
          continue
        inner = sub.invars[-len(eqn.invars):] if len(sub.invars) >= len(eqn.invars) else sub.invars
        sub_env = {v: x for v, x in zip(inner, ins) if x}
        self.run(sub, sub_env)
        for k, ov in enumerate(sub.outvars):
          if not isinstance(ov, jcore.Literal) and ov in sub_env and k < len(outs):
            outs[k] = sub_env[ov]
      elif prim == "scan":
        sub = eqn.params["jaxpr"]
        sub = sub.jaxpr if hasattr(sub, "jaxpr") else sub
        nc, ncar = eqn.params.get("num_consts"), eqn.params.get("num_carry")
        sub_env = {}
        for k, (v, outer, x) in enumerate(zip(sub.invars, eqn.invars, ins)):
          if not x:
            continue
          if nc is not None and ncar is not None:
            scanned, carried = k >= nc + ncar, nc <= k < nc + ncar
          else:  # parameter names differ across JAX versions: read the shapes
            oshape, ishape = tuple(outer.aval.shape), tuple(v.aval.shape)
            scanned, carried = oshape[1:] == ishape and oshape != ishape, False
          if carried:
            self.other(x, "a scan carry")
          elif scanned:  # sliced along the leading axis
            sub_env[v] = [(leaf, amap[1:]) for leaf, amap in x]
          else:
            sub_env[v] = x
        self.run(sub, sub_env)
      elif prim == "cond":
        for br in eqn.params["branches"]:
          sub = br.jaxpr
          self.run(sub, {v: x for v, x in zip(sub.invars, ins[1:]) if x})
        self.other(ins[0], "a cond predicate")
      elif prim == "while":
        self.other([o for x in ins for o in x], "a while loop")
      else:
        self.other([o for x in ins for o in x], prim)
      for v, o in zip(eqn.outvars, outs):
        if o:
          env[v] = env.get(v, []) + o
    for v in jaxpr.outvars:
      if not isinstance(v, jcore.Literal) and v in env:
        for leaf, _ in env[v]:
          self.uses[leaf].append(_Use("output", what="returned as an output"))
    return env


def _classify(uses: list[_Use], ndim: int) -> Layout:
  if not uses:
    return Layout(None, reason="not used by the traced function")
  others = sorted({u.what for u in uses if u.kind not in ("dot", "conv")})
  if others:
    return Layout(None, reason="used by " + ", ".join(others))
  kinds = {u.kind for u in uses}
  axes = {u.axes for u in uses}
  if len(axes) > 1 or len(kinds) > 1:
    return Layout(None, reason=f"contracted along different axes by different uses: {sorted(axes)}")
  (ax,) = axes
  if not ax:
    return Layout(None, reason="no axis of the weight is contracted")
  if list(ax) != list(range(ax[0], ax[0] + len(ax))):
    return Layout(None, reason=f"the contracted axes {ax} are not consecutive")
  outs = {u.out_axes for u in uses}
  return Layout(ax, out_axes=sorted(outs)[0], kind=kinds.pop(), source="trace")


def trace_layouts(fn: Callable[..., Any] | Any, params: Any = None, *args, **kwargs
                  ) -> dict[str, Layout]:
  """Traces a model once and reports how each parameter is contracted.

  Two call forms:

  * linen or any function: ``trace_layouts(model.apply, variables, x)``, where
    ``fn(params, *args, **kwargs)`` runs the model;
  * nnx: ``trace_layouts(module, x)``: the module's ``nnx.Param`` state is traced
    through ``module(x)``.

  Nothing is computed: the function is traced abstractly (``jax.make_jaxpr``).

  Returns:
    ``{path string: Layout}`` for every floating leaf of ``params`` (for nnx:
    of ``nnx.state(module, nnx.Param)``); paths as :func:`jasp.compute_masks`
    names them (``params/Dense_0/kernel``, ``conv1/kernel``).
  """
  try:
    from flax import nnx  # pylint: disable=g-import-not-at-top
  except ImportError:  # pragma: no cover
    nnx = None
  extra: Any = ()
  if nnx is not None and isinstance(fn, nnx.Module):
    call_args = (params,) + args if params is not None else args
    graphdef, state, rest = nnx.split(fn, nnx.Param, ...)
    target, extra = _tree.unbox(state), _tree.unbox(rest)
    def run(p, r):
      return nnx.merge(graphdef, p, r)(*call_args, **kwargs)
  else:
    if params is None:
      raise TypeError("trace_layouts(fn, params, *args): params are missing.")
    run = lambda p, r: fn(p, *args, **kwargs)
    target = params
  flat, treedef = jax.tree_util.tree_flatten_with_path(target)
  paths = [_tree.path_str(p) for p, _ in flat]
  leaves = [x for _, x in flat]
  closed = jax.make_jaxpr(
      lambda ls, r: run(jax.tree_util.tree_unflatten(treedef, ls), r))(leaves, extra)
  jaxpr = closed.jaxpr
  tracer = _Tracer(len(leaves))
  env = {}
  for k, (v, leaf) in enumerate(zip(jaxpr.invars, leaves)):
    nd = np.ndim(leaf)
    env[v] = [(k, tuple((a,) for a in range(nd)))]
  tracer.run(jaxpr, env)
  out = {}
  for k, (p, leaf) in enumerate(zip(paths, leaves)):
    dt = getattr(leaf, "dtype", None)
    if dt is None or not jnp.issubdtype(dt, jnp.inexact):
      out[p] = Layout(None, reason="not a floating-point array")
      continue
    out[p] = _classify(tracer.uses[k], np.ndim(leaf))
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
  return Layout(None, reason=(
      f"a rank-{nd} kernel whose layout the name '{parent}' does not tell (Conv or "
      "DenseGeneral?); pass layouts=jasp.trace_layouts(...) or an axis override"),
                source="convention")


def resolve(path: str, leaf: Any, layouts: Mapping[str, Layout] | None) -> Layout:
  """The layout of one leaf: from ``layouts`` when given, else by convention."""
  if layouts is None:
    return convention_layout(path, leaf)
  if path in layouts:
    return layouts[path]
  return Layout(None, reason="absent from the given layouts", source="user")
