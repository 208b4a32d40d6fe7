"""Input statistics of every prunable weight, tapped from the model's jaxpr.

Calibration-based pruning (Wanda, SparseGPT) needs, for each weight, the inputs
``X`` that the matmul or convolution consuming it sees. Nothing here asks the
user to rewrite the model: the model is traced to a jaxpr and evaluated by a
small interpreter (:class:`_Tap`) that binds every equation as JAX would, and at
each ``dot_general`` / ``conv_general_dilated`` whose weight operand comes from
a parameter (through casts, transposes, reshapes, broadcasts, nested ``jit`` /
``remat`` / ``custom_jvp``), also reduces the *other* operand to statistics:

* ``sumsq``: the squared norm of each input feature, ``sum_t X[t, k]**2``
  (Wanda's ``||X_k||_2**2``);
* ``hessian``: ``X^T X`` (SparseGPT's ``H`` up to the factor 2, which cancels).

The interpreter runs inside ``jax.jit``; statistics stream over batches as
running sums, so no activation ever leaves the device and batches may be
sharded (the sums become all-reduces). A convolution's inputs are its im2col
patches, obtained exactly by convolving with a one-hot kernel at
``Precision.HIGHEST``.

**Matrix view.** Every weight is seen as a ``(K, O)`` matrix ``W`` with
``Y = X @ W`` for ``X`` of shape ``(T, K)`` (a flax ``Dense`` kernel already is
one): :class:`Site` says which parameter axes are flattened into the rows (the
input features, the N:M group axes innermost) and which into the columns. A
grouped convolution (``feature_group_count=G``) has one ``(K, O/G)`` matrix and
one set of statistics per group.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

from jasp import _tree
from jasp import layouts as layouts_lib

__all__ = ["Site", "LayerStats", "collect_stats", "to_matrix", "from_matrix"]

PyTree = Any
HIGHEST = jax.lax.Precision.HIGHEST

# Ops that keep a parameter's values (up to a cast or a scalar factor) and its
# axes; the provenance of their output is the provenance of their input.
_PASS = {"convert_element_type", "copy", "copy_p", "reduce_precision", "sharding_constraint",
         "optimization_barrier", "pvary", "device_put", "mul", "neg", "name"}
# Call-like primitives whose sub-jaxpr takes the equation's operands one to one:
# the interpreter descends into them (their taps are inlined).
_CALLS = {"pjit", "jit", "closed_call", "core_call", "remat", "checkpoint", "remat2",
          "custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr"}


@dataclasses.dataclass(frozen=True)
class Site:
  """How a weight is consumed, and its ``(K, O)`` matrix view.

  Sites compare (and hash) by geometry alone, not by path, so jitted code
  keyed on a Site is shared by weights of the same shapes and layout.

  Attributes:
    path: the leaf's path string (``params/Dense_0/kernel``).
    kind: ``"dot"`` or ``"conv"``.
    shape: the leaf's shape.
    perm: parameter axes in matrix order: the ``rows`` row axes (flattened
      row-major into ``K``), then the column axes (flattened into ``O``).
    rows: how many leading entries of ``perm`` are row axes.
    groups: ``G``, the feature groups of a grouped convolution (1 otherwise);
      the ``O`` columns split into ``G`` consecutive blocks.
    group_axes: the parameter axes along which the N:M groups run (the
      contracted axes of a dot, the input-channel axis of a conv); they are the
      innermost row axes, so aligned groups of ``m`` rows are N:M groups.
  """
  path: str = dataclasses.field(compare=False)
  kind: str = "dot"
  shape: tuple[int, ...] = ()
  perm: tuple[int, ...] = ()
  rows: int = 0
  groups: int = 1
  group_axes: tuple[int, ...] = ()

  @property
  def k(self) -> int:
    """Input features per group (rows of the matrix view)."""
    return int(np.prod([self.shape[a] for a in self.perm[:self.rows]], dtype=np.int64))

  @property
  def o(self) -> int:
    """Output features, all groups together (columns of the matrix view)."""
    return int(np.prod([self.shape[a] for a in self.perm[self.rows:]], dtype=np.int64))


def to_matrix(w: jax.Array, site: Site) -> jax.Array:
  """The ``(K, O)`` matrix view of a weight of shape ``site.shape``."""
  return jnp.transpose(w, site.perm).reshape(site.k, site.o)


def from_matrix(wm: jax.Array, site: Site) -> jax.Array:
  """Inverse of :func:`to_matrix`: a ``(K, O)`` array back to ``site.shape``."""
  y = wm.reshape([site.shape[a] for a in site.perm])
  return jnp.transpose(y, np.argsort(site.perm))


@dataclasses.dataclass
class LayerStats:
  """Running input statistics of one weight (sums over calibration rows).

  Attributes:
    site: the weight's :class:`Site`.
    count: number of input rows ``T`` summed (float32 scalar array).
    sumsq: ``(G, K)`` float32, ``sum_t X[t, k]**2`` per group.
    hessian: ``(G, K, K)`` float32, ``X^T X`` per group, or None when not asked.
  """
  site: Site
  count: jax.Array
  sumsq: jax.Array
  hessian: jax.Array | None = None


# ----------------------------------------------------------------------------
# The tap interpreter.


def _dot_site(path, shape, amap, contract_w, batch_w, contract_x):
  """The Site of a weight in a dot_general and the order of the input's contracted dims.

  Returns ``(site, x_contract_order, "")`` or ``(None, None, reason)``.
  """
  if any(amap[d] is not None for d in batch_w):
    return None, None, "a batched dot_general (one weight per batch entry)"
  pairs = []
  for dw, dx in zip(contract_w, contract_x):
    if amap[dw] is None:
      return None, None, "a dot_general contracting a broadcast axis of the weight"
    pairs.append((amap[dw], dx))
  pairs.sort()
  rows = tuple(a for ax, _ in pairs for a in ax)
  if not rows or list(rows) != list(range(rows[0], rows[0] + len(rows))):
    return None, None, f"a dot_general contracting the weight axes {rows} out of order"
  cols = tuple(a for a in range(len(shape)) if a not in rows)
  site = Site(path, "dot", tuple(shape), rows + cols, len(rows), 1, rows)
  return site, tuple(dx for _, dx in pairs), ""


def _conv_site(path, shape, amap, dn, groups):
  if any(amap[d] != (d,) for d in range(len(shape))):
    return None, "a kernel transposed or reshaped before the convolution"
  o_ax, i_ax, spatial = dn.rhs_spec[0], dn.rhs_spec[1], tuple(dn.rhs_spec[2:])
  return Site(path, "conv", tuple(shape), spatial + (i_ax, o_ax), len(spatial) + 1, groups,
              (i_ax,)), ""


def conv_patches(x: jax.Array, site: Site, params: dict) -> jax.Array:
  """im2col patches of a convolution's input, in the kernel's matrix-view row order.

  Args:
    x: the convolution's lhs, any float dtype.
    site: the kernel's :class:`Site` (kind ``"conv"``).
    params: the ``conv_general_dilated`` equation's params.

  Returns:
    float32 ``(N, *out_spatial, G, K)``: one row per output position, exact
    copies of the inputs (a one-hot kernel at ``Precision.HIGHEST``).
  """
  dn = params["dimension_numbers"]
  g = params["feature_group_count"]
  o_ax, i_ax, spatial = dn.rhs_spec[0], dn.rhs_spec[1], dn.rhs_spec[2:]
  sizes = [site.shape[a] for a in spatial] + [site.shape[i_ax]]
  k = int(np.prod(sizes))
  onehot = jnp.eye(k, dtype=jnp.float32).reshape(*sizes, k)  # (*spatial, I, K)
  onehot = jnp.tile(onehot, (1,) * len(sizes) + (g,))  # out feature = g * K + k
  src = [0] * len(site.shape)
  for j, a in enumerate(spatial):
    src[a] = j
  src[i_ax], src[o_ax] = len(spatial), len(spatial) + 1
  kernel = jnp.transpose(onehot, src)
  y = jax.lax.conv_general_dilated(
      x.astype(jnp.float32), kernel, params["window_strides"], params["padding"],
      lhs_dilation=params["lhs_dilation"], rhs_dilation=params["rhs_dilation"],
      dimension_numbers=dn, feature_group_count=g, precision=HIGHEST)
  y = jnp.moveaxis(y, dn.out_spec[1], -1)
  return y.reshape(y.shape[:-1] + (g, k))


def _explicit(x) -> bool:
  """Whether ``x`` is sharded over a mesh with explicit axes (``jax.set_mesh``)."""
  s = getattr(jax.typeof(x), "sharding", None)
  types = getattr(getattr(s, "mesh", None), "axis_types", None) or ()
  return any(t == jax.sharding.AxisType.Explicit for t in types)


def _sub_jaxpr(eqn):
  for name in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
    if name in eqn.params:
      j = eqn.params[name]
      if isinstance(j, jcore.ClosedJaxpr):
        return j.jaxpr, list(j.consts)
      if isinstance(j, jcore.Jaxpr):
        return j, []
  return None, None


class _Tap:
  """Evaluates a jaxpr while tapping the inputs of the weights in ``targets``.

  Values carry two extra facts: their *provenance* (the parameter leaves they
  hold, with an axis map as in :mod:`jasp.layouts`) and their *dependencies*
  (the candidate leaves that influence them, for scheduling sequential
  pruning).

  After :meth:`run`, ``sites[leaf]`` lists the Sites found, ``deps[leaf]`` the
  leaves that influence its inputs, ``missing[leaf]`` why a candidate has no
  usable site, and ``acc[leaf]`` the statistics of this evaluation (when
  ``want`` asks for them).
  """

  def __init__(self, paths: Sequence[str], shapes: Sequence[tuple[int, ...]],
               candidates: Iterable[int], targets: Iterable[int] = (), hessian: bool = False):
    self.paths, self.shapes = list(paths), [tuple(s) for s in shapes]
    self.candidates = frozenset(candidates)
    self.targets = frozenset(targets)
    self.hessian = hessian
    self.sites: dict[int, list[Site]] = {}
    self.deps: dict[int, frozenset] = {}
    self.missing: dict[int, str] = {}
    self.acc: dict[int, dict] = {}

  # -- records --------------------------------------------------------------
  def _miss(self, leaf, reason):
    if leaf in self.candidates:
      self.missing.setdefault(leaf, reason)

  def _record(self, leaf, site, x, deps):
    """``x``: float32 ``(*rows, G, K)`` inputs of ``leaf``'s matmul (no merge of the row
    axes, which may be sharded)."""
    self.sites.setdefault(leaf, [])
    if site not in self.sites[leaf]:
      self.sites[leaf].append(site)
    self.deps[leaf] = self.deps.get(leaf, frozenset()) | (deps - {leaf})
    if leaf not in self.targets:
      return
    rows = tuple(range(x.ndim - 2))
    a = self.acc.setdefault(leaf, {"count": jnp.zeros((), jnp.float32), "sumsq": 0.0,
                                   "hessian": 0.0})
    a["count"] = a["count"] + jnp.float32(np.prod(x.shape[:-2]))
    a["sumsq"] = a["sumsq"] + jnp.sum(jnp.square(x), axis=rows)
    if self.hessian:
      # Under explicit sharding the contracted rows may be sharded: ask for a
      # replicated result (an all-reduce), never a gather of X.
      kw = {"out_sharding": jax.sharding.PartitionSpec()} if _explicit(x) else {}
      g = x.ndim - 2
      a["hessian"] = a["hessian"] + jax.lax.dot_general(
          x, x, ((rows, rows), ((g,), (g,))), precision=HIGHEST, **kw)

  # -- equations ------------------------------------------------------------
  def _dot(self, eqn, vals, provs, deps):
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    dims = ((lc, lb), (rc, rb))
    for side in (0, 1):
      other = 1 - side
      for leaf, amap in provs[side]:
        if leaf not in self.candidates:
          continue
        site, x_order, why = _dot_site(self.paths[leaf], self.shapes[leaf], amap,
                                       dims[side][0], dims[side][1], dims[other][0])
        if site is None:
          self._miss(leaf, why)
          continue
        x = vals[other]
        rest = [d for d in range(x.ndim) if d not in x_order]
        x = jnp.transpose(x.astype(jnp.float32), rest + list(x_order))
        x = x.reshape(x.shape[:len(rest)] + (1, site.k))
        self._record(leaf, site, x, deps[other])

  def _conv(self, eqn, vals, provs, deps):
    for leaf, _ in provs[0]:
      self._miss(leaf, "the input (not the kernel) of a convolution")
    if eqn.params.get("batch_group_count", 1) != 1:
      for leaf, _ in provs[1]:
        self._miss(leaf, "a batch-grouped convolution")
      return
    for leaf, amap in provs[1]:
      if leaf not in self.candidates:
        continue
      site, why = _conv_site(self.paths[leaf], self.shapes[leaf], amap,
                             eqn.params["dimension_numbers"], eqn.params["feature_group_count"])
      if site is None:
        self._miss(leaf, why)
        continue
      x = conv_patches(vals[0], site, eqn.params) if leaf in self.targets else jnp.zeros(
          (1, site.groups, site.k), jnp.float32)
      self._record(leaf, site, x, deps[0])

  def _propagate(self, eqn, provs):
    """Provenance of the outputs of a pass-through op (a list per output)."""
    prim = eqn.primitive.name
    outs: list[list] = [[] for _ in eqn.outvars]
    if prim in _PASS and len(eqn.outvars) == 1:
      if prim == "mul" and sum(bool(p) for p in provs) > 1:
        return outs
      outs[0] = [x for p in provs for x in p]
    elif prim == "transpose":
      perm = eqn.params["permutation"]
      outs[0] = [(leaf, tuple(amap[p] for p in perm)) for leaf, amap in provs[0]]
    elif prim in ("reshape", "squeeze"):
      old, new = eqn.invars[0].aval.shape, eqn.outvars[0].aval.shape
      for leaf, amap in provs[0]:
        nm = layouts_lib._reshape_map(amap, old, new)  # pylint: disable=protected-access
        if nm is not None:
          outs[0].append((leaf, nm))
    elif prim == "broadcast_in_dim":
      dims = eqn.params["broadcast_dimensions"]
      nd = len(eqn.outvars[0].aval.shape)
      for leaf, amap in provs[0]:
        new = [None] * nd
        for k, d in enumerate(dims):
          new[d] = amap[k]
        outs[0].append((leaf, tuple(new)))
    return outs

  def run(self, jaxpr, consts, args, provs, deps):
    """Evaluates ``jaxpr``; returns ``(outs, out_provs, out_deps)``."""
    env: dict = {}
    penv: dict = {}
    denv: dict = {}
    empty = frozenset()
    for v, c in zip(jaxpr.constvars, consts):
      env[v] = c
    for v, a, p, d in zip(jaxpr.invars, args, provs, deps):
      env[v], penv[v], denv[v] = a, p, d

    def read(v):
      if isinstance(v, jcore.Literal):
        return v.val, [], empty
      return env[v], penv.get(v, []), denv.get(v, empty)

    for eqn in jaxpr.eqns:
      got = [read(v) for v in eqn.invars]
      vals = [g[0] for g in got]
      ps = [g[1] for g in got]
      ds = [g[2] for g in got]
      dep_all = frozenset().union(*ds) if ds else empty
      prim = eqn.primitive.name
      sub, sub_consts = _sub_jaxpr(eqn)
      if (prim in _CALLS and sub is not None and len(sub.invars) == len(eqn.invars)):
        outs, out_p, out_d = self.run(sub, sub_consts, vals, ps, ds)
      else:
        if prim == "dot_general":
          self._dot(eqn, vals, ps, ds)
        elif prim == "conv_general_dilated":
          self._conv(eqn, vals, ps, ds)
        elif sub is not None or "branches" in eqn.params:
          for p in ps:
            for leaf, _ in p:
              self._miss(leaf, f"consumed inside a '{prim}' (not tapped yet: unroll it)")
        bind_params = eqn.primitive.get_bind_params(eqn.params)
        subfuns = []
        if isinstance(bind_params, tuple):  # older jax: (subfuns, params)
          subfuns, bind_params = bind_params
        ctx = getattr(getattr(eqn, "ctx", None), "manager", None)
        if ctx is None:
          ans = eqn.primitive.bind(*subfuns, *vals, **bind_params)
        else:
          with ctx:
            ans = eqn.primitive.bind(*subfuns, *vals, **bind_params)
        outs = list(ans) if eqn.primitive.multiple_results else [ans]
        out_p = self._propagate(eqn, ps)
        out_d = [dep_all] * len(outs)
      for v, x, p, d in zip(eqn.outvars, outs, out_p, out_d):
        env[v] = x
        if p:
          penv[v] = p
        if d:
          denv[v] = d
    outs = [read(v) for v in jaxpr.outvars]
    return [o[0] for o in outs], [o[1] for o in outs], [o[2] for o in outs]


# ----------------------------------------------------------------------------
# Models as functions of their flat leaves.


class Model:
  """A model as ``run(leaves, extra, batch)`` over its flat parameter leaves.

  Two forms, as :func:`jasp.trace_layouts`: ``Model(fn, params)`` for linen
  (``fn = model.apply``, ``params`` = the variables) or any
  ``fn(params, batch)``; ``Model(module)`` for an ``nnx.Module`` (its
  ``nnx.Param`` state; other state such as batch statistics rides along).
  """

  def __init__(self, fn: Callable[..., Any] | Any, params: PyTree = None):
    try:
      from flax import nnx  # pylint: disable=g-import-not-at-top
    except ImportError:  # pragma: no cover
      nnx = None
    self.module = None
    if nnx is not None and isinstance(fn, nnx.Module):
      if params is not None:
        raise TypeError("for an nnx.Module, pass the module alone: its nnx.Param state is pruned.")
      graphdef, state, rest = nnx.split(fn, nnx.Param, ...)
      self.module, self.params, self.extra = fn, state, _tree.unbox(rest)
      def call(p, r, batch):
        return nnx.merge(graphdef, p, r)(batch)
    else:
      if params is None:
        raise TypeError("params are missing: pass (apply_fn, params, batches) or (nnx_module, "
                        "batches).")
      self.params, self.extra = params, ()
      call = lambda p, r, batch: fn(p, batch)
    flat, self.treedef = jax.tree_util.tree_flatten_with_path(self.params)
    self.paths = [_tree.path_str(p) for p, _ in flat]
    self.leaves = [x for _, x in flat]
    pure = _tree.unbox(self.params) if self.module is not None else None
    self._pure_def = jax.tree_util.tree_structure(pure) if pure is not None else self.treedef
    self.call = call

  def run(self, leaves, extra, batch):
    return self.call(jax.tree_util.tree_unflatten(self._pure_def, list(leaves)), extra, batch)

  def layouts(self, batch) -> dict[str, layouts_lib.Layout]:
    if self.module is not None:
      return layouts_lib.trace_layouts(self.module, batch)
    return layouts_lib.trace_layouts(lambda p, b: self.call(p, (), b), self.params, batch)

  def rebuild(self, leaves) -> PyTree:
    """The params tree (same type as given) holding ``leaves``."""
    return jax.tree_util.tree_unflatten(self.treedef, list(leaves))


def _tap_eval(model: Model, leaves, extra, batch, tap: _Tap):
  closed = jax.make_jaxpr(model.run)(leaves, extra, batch)
  args = list(leaves) + jax.tree_util.tree_leaves(extra) + jax.tree_util.tree_leaves(batch)
  nl = len(leaves)
  provs = [[(k, tuple((a,) for a in range(np.ndim(x))))] if k < nl else []
           for k, x in enumerate(args)]
  deps = [frozenset([k]) if k < nl and k in tap.candidates else frozenset()
          for k in range(len(args))]
  with jax.default_matmul_precision("highest"):
    tap.run(closed.jaxpr, list(closed.consts), args, provs, deps)


def discover(model: Model, batch, candidates: Iterable[int]) -> _Tap:
  """Finds the sites and input dependencies of ``candidates`` (abstract: computes nothing)."""
  tap = _Tap(model.paths, [np.shape(x) for x in model.leaves], candidates)
  jax.eval_shape(lambda ls, e, b: _tap_eval(model, ls, e, b, tap), model.leaves, model.extra,
                 batch)
  return tap


def _step(acc, leaves, extra, batch, *, model, paths, shapes, candidates, targets, hessian):
  tap = _Tap(paths, shapes, candidates, targets, hessian)
  _tap_eval(model, leaves, extra, batch, tap)
  out = {}
  for leaf, a in acc.items():
    got = tap.acc.get(leaf)
    if got is None:
      out[leaf] = a
      continue
    out[leaf] = {k: a[k] + got[k] for k in a}
  return out


def accumulate(model: Model, leaves: Sequence[jax.Array], batches: Sequence[Any],
               sites: dict[int, Site], *, hessian: bool) -> dict[int, dict]:
  """Streams ``batches`` through the model; returns running sums for the leaves in ``sites``.

  One jitted step per batch (compiled once per batch shape): the leaves and
  the batch are arguments, never constants.
  """
  targets = tuple(sorted(sites))
  acc = {}
  for leaf in targets:
    s = sites[leaf]
    a = {"count": jnp.zeros((), jnp.float32), "sumsq": jnp.zeros((s.groups, s.k), jnp.float32)}
    if hessian:
      a["hessian"] = jnp.zeros((s.groups, s.k, s.k), jnp.float32)
    acc[leaf] = a
  donate = (0,) if jax.default_backend() != "cpu" else ()
  step = jax.jit(functools.partial(
      _step, model=model, paths=tuple(model.paths), shapes=tuple(np.shape(x) for x in leaves),
      candidates=targets, targets=targets, hessian=hessian), donate_argnums=donate)
  for batch in batches:
    acc = step(acc, list(leaves), model.extra, batch)
  return acc


def collect_stats(fn: Callable[..., Any] | Any, params: PyTree = None,
                  batches: Iterable[Any] = (), *, paths: Iterable[str] | None = None,
                  hessian: bool = False) -> dict[str, LayerStats]:
  """Input statistics of the weights of a model over calibration batches.

  Two call forms: ``collect_stats(model.apply, variables, batches)`` (linen, or
  any ``fn(params, batch)``) and ``collect_stats(nnx_module, batches=batches)``.

  Args:
    fn: the apply function, or an ``nnx.Module``.
    params: the params pytree for ``fn`` (None for nnx).
    batches: iterable of batches; each is passed as ``fn(params, batch)``.
    paths: the leaves to tap (path strings); default: every leaf consumed by a
      dot_general or convolution.
    hessian: also accumulate ``X^T X`` (``(G, K, K)`` float32 per weight).

  Returns:
    ``{path: LayerStats}`` (sums over all rows of all batches). A weight used
    by several matmuls (tied weights) sums the inputs of all of them.

  Raises:
    ValueError: when a requested path is not tapped (naming why), or uses
      differ in their matrix view.
  """
  model = Model(fn, params)
  batches = list(batches)
  if not batches:
    raise ValueError("no calibration batches given.")
  index = {p: k for k, p in enumerate(model.paths)}
  if paths is None:
    cand = range(len(model.paths))
  else:
    paths = list(paths)
    bad = [p for p in paths if p not in index]
    if bad:
      raise ValueError(f"no leaf '{bad[0]}' in params.")
    cand = [index[p] for p in paths]
  tap = discover(model, batches[0], cand)
  sites = {}
  for leaf in cand:
    s = tap.sites.get(leaf)
    if not s:
      if paths is not None:
        raise ValueError(f"'{model.paths[leaf]}' is not tapped: "
                         f"{tap.missing.get(leaf, 'not consumed by a dot_general or convolution')}.")
      continue
    if len(s) > 1:
      raise ValueError(f"'{model.paths[leaf]}' is consumed by matmuls of different layouts: {s}.")
    sites[leaf] = s[0]
  acc = accumulate(model, model.leaves, batches, sites, hessian=hessian)
  return {model.paths[leaf]: LayerStats(sites[leaf], a["count"], a["sumsq"], a.get("hessian"))
          for leaf, a in acc.items()}
