"""Input statistics of every prunable weight, tapped from the model's jaxpr.

Calibration-based pruning (Wanda, SparseGPT) needs, for each weight, the inputs
``X`` that the matmul or convolution consuming it sees. Nothing here asks the
user to rewrite the model: the model is traced to a jaxpr once per batch shape,
:mod:`jasp.weights` finds every weight's :class:`Site` (which equation, which
operand, its ``(K, O)`` matrix view), and a small evaluator (:class:`_Tap`)
runs the jaxpr as JAX would while reducing, at each site, the *other* operand
to statistics:

* ``sumsq``: the squared norm of each input feature, ``sum_t X[t, k]**2``
  (Wanda's ``||X_k||_2**2``);
* ``hessian``: ``X^T X`` (SparseGPT's ``H`` up to the factor 2, which cancels).

The evaluator runs inside ``jax.jit``; statistics stream over batches as
running sums, so no activation ever leaves the device and batches may be
sharded (the sums become all-reduces). A convolution's inputs are its im2col
patches, obtained exactly by convolving with a one-hot kernel at
``Precision.HIGHEST``.

**Stacked layers.** A kernel ``(L, in, out)`` that a ``scan`` slices layer by
layer (``nn.scan``, ``nnx.scan``, ``lax.scan``; ``remat`` inside or not) gets
statistics per layer, each from that layer's own inputs: the evaluator
rebuilds such a scan with the running sums in its carry and adds each
iteration's statistics to its layer's slot. Weights used at every iteration
(an RNN cell's kernels) sum over the iterations; ``cond`` branches and
``while`` loops are rebuilt the same way.

**Matrix view.** Every weight (one layer of it) is seen as a ``(K, O)`` matrix
``W`` with ``Y = X @ W`` for ``X`` of shape ``(T, K)`` (a flax ``Dense`` kernel
already is one); a grouped convolution (``feature_group_count=G``) has one
``(K, O/G)`` matrix and one set of statistics per group.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jasp import _jaxpr
from jasp import _model
from jasp import weights
from jasp.typing import PyTree
from jasp.weights import Site
from jasp.weights import from_matrix
from jasp.weights import to_matrix

__all__ = [
  "Site",
  "LayerStats",
  "Window",
  "collect_stats",
  "to_matrix",
  "from_matrix",
  "conv_patches",
]

HIGHEST = jax.lax.Precision.HIGHEST

#: How ``X^T X`` is summed when the weight's input is bf16 or fp16. Every
#: product of two such numbers is exact in float32, so only the summation
#: differs: an int ``c`` (default 2048) multiplies the 16-bit operands on the
#: tensor cores with float32 results over chunks of ``c`` rows and adds the
#: chunks in float32 (``0``: all rows in one product); ``None`` sums float32
#: copies at ``Precision.HIGHEST``, as do float32 inputs, convolutions (their
#: patches are float32) and rows sharded over explicit mesh axes. Measured
#: against a float64 Hessian at LLaMA-7B widths over 16384 tokens
#: (``benchmarks/hessian_bench.py``, H100): relative error 5.2e-6 / 4.9e-6
#: (K 4096 / 11008) against 5.5e-6 / 4.7e-6 for float32 HIGHEST; SparseGPT's
#: masks from it equal the float64 Hessian's in 99.99952% / 99.99980% of
#: entries (float32 HIGHEST: 99.99995% / 99.9987%); a tenth of the time (one
#: product of all rows: error 6e-5). Part of the statistics programs' cache key.
_HESSIAN_TC_CHUNK: int | None = 2048


@dataclasses.dataclass
class LayerStats:
  """Running input statistics of one weight (sums over calibration rows).

  For a stacked weight (``stack`` non-empty) every array has a leading axis
  per stacked axis: one set of statistics per layer.

  Attributes:
    site: the weight's :class:`Site` (one layer).
    count: number of input rows ``T`` summed (float32; ``stack_shape``).
    sumsq: ``(*stack_shape, G, K)`` float32, ``sum_t X[t, k]**2`` per group.
    hessian: ``(*stack_shape, G, K, K)`` float32, ``X^T X`` per group, or None
      when not asked.
    stack: the leaf's stacked axes (indexed by scans), outermost first.
  """

  site: Site
  count: jax.Array
  sumsq: jax.Array
  hessian: jax.Array | None = None
  stack: tuple[int, ...] = ()


def conv_patches(x: jax.Array, params: Mapping[str, Any], rhs_shape: Sequence[int]) -> jax.Array:
  """im2col patches of a convolution's input, in the kernel's matrix-view row order.

  Args:
    x: the convolution's lhs, any float dtype.
    params: the ``conv_general_dilated`` equation's params.
    rhs_shape: the shape of the convolution's kernel operand.

  Returns:
    float32 ``(N, *out_spatial, G, K)``: one row per output position, exact
    copies of the inputs (a one-hot kernel at ``Precision.HIGHEST``); ``K``
    runs over the kernel's spatial axes (in ``rhs_spec`` order) then its input
    channels, row-major.
  """
  dn = params["dimension_numbers"]
  g = params["feature_group_count"]
  o_ax, i_ax, spatial = dn.rhs_spec[0], dn.rhs_spec[1], dn.rhs_spec[2:]
  sizes = [rhs_shape[a] for a in spatial] + [rhs_shape[i_ax]]
  k = int(np.prod(sizes))
  onehot = jnp.eye(k, dtype=jnp.float32).reshape(*sizes, k)  # (*spatial, I, K)
  onehot = jnp.tile(onehot, (1,) * len(sizes) + (g,))  # out feature = g * K + k
  src = [0] * len(rhs_shape)
  for j, a in enumerate(spatial):
    src[a] = j
  src[i_ax], src[o_ax] = len(spatial), len(spatial) + 1
  kernel = jnp.transpose(onehot, src)
  y = jax.lax.conv_general_dilated(
    x.astype(jnp.float32),
    kernel,
    params["window_strides"],
    params["padding"],
    lhs_dilation=params["lhs_dilation"],
    rhs_dilation=params["rhs_dilation"],
    dimension_numbers=dn,
    feature_group_count=g,
    precision=HIGHEST,
  )
  y = jnp.moveaxis(y, dn.out_spec[1], -1)
  return y.reshape(y.shape[:-1] + (g, k))


def _explicit(x) -> bool:
  """Whether ``x`` is sharded over a mesh with explicit axes (``jax.set_mesh``)."""
  s = getattr(jax.typeof(x), "sharding", None)
  types = getattr(getattr(s, "mesh", None), "axis_types", None) or ()
  return any(t == jax.sharding.AxisType.Explicit for t in types)


def _tc_hessian(x16: jax.Array, chunk: int) -> jax.Array:
  """``X^T X`` per group of 16-bit ``x16`` ``(T, G, K)`` on the tensor cores, float32 ``(G, K, K)``."""
  dims = (((0,), (0,)), ((1,), (1,)))

  def gram(xc):
    return jax.lax.dot_general(
      xc, xc, dims, precision=jax.lax.Precision.DEFAULT, preferred_element_type=jnp.float32
    )

  t = x16.shape[0]
  if not chunk or t <= chunk:
    return gram(x16)
  whole = t - t % chunk
  xs = x16[:whole].reshape(whole // chunk, chunk, *x16.shape[1:])
  h, _ = jax.lax.scan(lambda h, xc: (h + gram(xc), None), gram(xs[0]), xs[1:])
  return h + gram(x16[whole:]) if whole < t else h


def _row_stats(x: jax.Array, hessian: bool) -> dict:
  """``x`` ``(*rows, G, K)`` -> float32 count, sumsq ``(G, K)``, hessian ``(G, K, K)``.

  bf16/fp16 rows give the tensor-core Hessian of :data:`_HESSIAN_TC_CHUNK`;
  everything else is summed from float32 copies.
  """
  x16 = x if x.dtype in (jnp.bfloat16, jnp.float16) else None
  x = x.astype(jnp.float32)
  rows = tuple(range(x.ndim - 2))
  out = {"count": jnp.float32(np.prod(x.shape[:-2])), "sumsq": jnp.sum(jnp.square(x), axis=rows)}
  if hessian and x16 is not None and _HESSIAN_TC_CHUNK is not None and not _explicit(x):
    out["hessian"] = _tc_hessian(x16.reshape(-1, *x16.shape[-2:]), _HESSIAN_TC_CHUNK)
  elif hessian:
    # Under explicit sharding the contracted rows may be sharded: ask for a
    # replicated result (an all-reduce), never a gather of X.
    kw = {"out_sharding": jax.sharding.PartitionSpec()} if _explicit(x) else {}
    g = x.ndim - 2
    out["hessian"] = jax.lax.dot_general(
      x, x, ((rows, rows), ((g,), (g,))), precision=HIGHEST, **kw
    )
  return out


# ----------------------------------------------------------------------------
# Which weights to tap, and where their statistics go.


@dataclasses.dataclass(frozen=True)
class Target:
  """A weight to tap: its site and which of its layers (slots) to collect.

  Attributes:
    site: its :class:`Site` (one layer).
    stack_shape: sizes of its stacked axes (``()`` when not stacked).
    layers: the layer indices (tuples over the stacked axes) to collect, in
      slot order; ``((),)`` for an unstacked weight.
  """

  site: Site
  stack_shape: tuple[int, ...] = ()
  layers: tuple[tuple[int, ...], ...] = ((),)

  def table(self) -> np.ndarray:
    """Slot of every layer (flat, row-major over ``stack_shape``); -1 where not collected."""
    t = np.full(int(np.prod(self.stack_shape, dtype=np.int64)), -1, np.int32)
    for s, idx in enumerate(self.layers):
      t[np.ravel_multi_index(idx, self.stack_shape)] = s
    return t


def zeros(target: Target, hessian: bool) -> dict:
  """Empty running sums for ``target``: ``count (S,)``, ``sumsq (S, G, K)``, ``hessian``."""
  s, site = len(target.layers), target.site
  a = {
    "count": jnp.zeros((s,), jnp.float32),
    "sumsq": jnp.zeros((s, site.groups, site.k), jnp.float32),
  }
  if hessian:
    a["hessian"] = jnp.zeros((s, site.groups, site.k, site.k), jnp.float32)
  return a


@dataclasses.dataclass(frozen=True)
class Window:
  """Run only ``length`` iterations of one stacked scan, then stop (block streaming).

  Attributes:
    key: the scan's equation key (a :class:`~jasp.weights.SiteUse` ``stack``
      key); the scan must be reached through calls only (no enclosing loop or
      branch) and run forward.
    length: iterations to run, from a start given at run time.
  """

  key: tuple
  length: int


class _Stop(Exception):  # noqa: N818 - control flow, not an error
  """Ends a windowed evaluation at the stacked scan, carrying its final carry."""

  def __init__(self, carry: list):
    super().__init__()
    self.carry = carry


class _Tap(_jaxpr.Interpreter):
  """Evaluates a jaxpr, adding the input statistics of ``targets`` to ``acc``.

  ``sites`` are the analysis' :class:`~jasp.weights.SiteUse` lists keyed by
  equation key; ``acc`` maps each target leaf to its running sums; ``tables``
  each stacked target's :meth:`Target.table` (an array: which layers it
  collects is data, so that one program serves every choice of layers).
  """

  def __init__(
    self,
    sites: Mapping[tuple, list],
    targets: Mapping[int, Target],
    acc: dict,
    hessian: bool,
    tables: Mapping[int, jax.Array],
    window: Window | None = None,
    start: jax.Array | None = None,
    carry: list | None = None,
  ):
    super().__init__()
    self.window, self.start, self.carry = window, start, carry
    self.sites = {key: [u for u in us if u.leaf in targets] for key, us in sites.items()}
    self.sites = {key: us for key, us in self.sites.items() if us}
    self.prefixes = {key[:i] for key in self.sites for i in range(len(key))}
    self.targets = targets
    self.tables = tables
    self.acc = acc
    self.hessian = hessian
    self.iters: dict[tuple, jax.Array] = {}

  def literal(self, lit):
    return lit.val

  def constant(self, var, value):
    return value

  def _inside(self, eqn, parts) -> bool:
    return any(self.context + ((id(eqn), p),) in self.prefixes for p in parts)

  def primitive(self, eqn, ins):
    bind_params = eqn.primitive.get_bind_params(eqn.params)
    subfuns = []
    if isinstance(bind_params, tuple):  # older jax: (subfuns, params)
      subfuns, bind_params = bind_params
    ctx = getattr(getattr(eqn, "ctx", None), "manager", None)
    if ctx is None:
      ans = eqn.primitive.bind(*subfuns, *ins, **bind_params)
    else:
      with ctx:
        ans = eqn.primitive.bind(*subfuns, *ins, **bind_params)
    for use in self.sites.get(self.key(eqn), ()):
      self._record(use, eqn, ins)
    return list(ans) if eqn.primitive.multiple_results else [ans]

  def _record(self, use: weights.SiteUse, eqn, ins) -> None:
    x = ins[1 - use.operand]
    if use.site.kind == "conv":
      x = conv_patches(x, eqn.params, ins[1].shape)
    else:
      rest = [d for d in range(x.ndim) if d not in use.x_order]
      x = jnp.transpose(x, rest + list(use.x_order))
      x = x.reshape(x.shape[: len(rest)] + (1, use.site.k))
    st = _row_stats(x, self.hessian)
    a = self.acc[use.leaf]
    target = self.targets[use.leaf]
    if not target.stack_shape:
      self.acc[use.leaf] = {k: a[k].at[0].add(st[k]) for k in a}
      return
    idx = [self.iters[key] for _, key in use.stack]
    flat = jnp.ravel_multi_index(tuple(idx), target.stack_shape, mode="clip")
    slot = self.tables[use.leaf][flat]
    if len(target.layers) == int(np.prod(target.stack_shape)):
      self.acc[use.leaf] = {k: a[k].at[slot].add(st[k]) for k in a}
      return
    self.acc[use.leaf] = lax.cond(
      slot >= 0, lambda a, st: {k: a[k].at[slot].add(st[k]) for k in a}, lambda a, st: a, a, st
    )

  # -- loops and branches that hold a tapped weight are rebuilt ---------------
  def scan(self, eqn, scan, ins):
    key = self.key(eqn)
    if self.window is not None and key == self.window.key:
      return self._window(eqn, scan, ins)
    if not self._inside(eqn, ("body",)):
      return self.primitive(eqn, ins)
    return self._rebuilt(eqn, scan, ins, key)

  def _window(self, eqn, scan, ins):
    """Iterations ``[start, start + length)`` of the stacked scan, from the cached carry; stops."""
    consts, init, xs = scan.split_in(ins)
    if self.carry is not None:
      init = self.carry
    n = self.window.length
    xs = [lax.dynamic_slice_in_dim(x, self.start, n, axis=0) for x in xs]
    windowed = dataclasses.replace(scan, length=n)
    outs = self._rebuilt(eqn, windowed, list(consts) + list(init) + xs, self.key(eqn), self.start)
    raise _Stop(scan.split_out(outs)[0])

  def _rebuilt(self, eqn, scan, ins, key, offset=0):
    consts, init, xs = scan.split_in(ins)
    n = scan.length

    def body(carry, x):
      c, acc, i = carry
      outer = self.acc
      self.acc = acc
      self.iters[key] = n - 1 - i if scan.reverse else i + offset
      try:
        outs = self.walk(eqn, "body", scan.body, list(consts) + list(c) + list(x))
        acc = self.acc
      finally:
        self.acc = outer
        del self.iters[key]
      c_out, ys = scan.split_out(outs)
      return (c_out, acc, i + 1), ys

    (c, acc, _), ys = lax.scan(
      body, (list(init), self.acc, jnp.int32(0)), list(xs), length=n, reverse=scan.reverse
    )
    self.acc = acc
    return list(c) + list(ys)

  def cond(self, eqn, cond, ins):
    parts = tuple(range(len(cond.branches)))
    if not self._inside(eqn, parts):
      return self.primitive(eqn, ins)

    def branch(i, br):
      def fn(acc, ops):
        outer = self.acc
        self.acc = acc
        try:
          outs = self.walk(eqn, i, br, ops)
          return outs, self.acc
        finally:
          self.acc = outer

      return fn

    outs, self.acc = lax.switch(
      ins[0], [branch(i, b) for i, b in enumerate(cond.branches)], self.acc, list(ins[1:])
    )
    return list(outs)

  def while_loop(self, eqn, loop, ins):
    if not self._inside(eqn, ("body", "cond")):
      return self.primitive(eqn, ins)
    cconsts, bconsts, init = loop.split_in(ins)

    def cond_fn(carry):
      c, _ = carry
      (pred,) = self.walk(eqn, "cond", loop.cond, list(cconsts) + list(c))
      return pred

    def body_fn(carry):
      c, acc = carry
      outer = self.acc
      self.acc = acc
      try:
        outs = self.walk(eqn, "body", loop.body, list(bconsts) + list(c))
        return outs, self.acc
      finally:
        self.acc = outer

    c, self.acc = lax.while_loop(cond_fn, body_fn, (list(init), self.acc))
    return list(c)


# ----------------------------------------------------------------------------
# Tracing once per batch shape, and streaming batches.


class Tapper:
  """A model's calibration taps: trace per batch shape, analyse, evaluate under jit.

  ``fn(params, batch)`` (linen, any function) or ``module(batch)`` (nnx): the
  model is called with one batch (a pytree of arrays).
  """

  def __init__(self, model: _model.Model):
    self.model = model
    self._cache: dict = {}

  def _signature(self, batch):
    leaves, treedef = jax.tree_util.tree_flatten(batch)
    return treedef, tuple((tuple(np.shape(x)), str(getattr(x, "dtype", type(x)))) for x in leaves)

  def traced(self, batch) -> tuple[_model.Traced, weights.WeightFlow]:
    """The jaxpr of the model on ``batch``'s shapes and its analysis (cached)."""
    sig = self._signature(batch)
    if sig not in self._cache:
      traced = self.model.trace((batch,))
      self._cache[sig] = (traced, weights.analyse(traced), {})
    traced, flow, _ = self._cache[sig]
    return traced, flow

  def _step(self, sig, targets: Mapping[int, Target], hessian: bool, window: Window | None = None):
    """The jitted step for ``targets``' shapes: which layers they collect is an
    argument (the tables), so the stages of a stacked model share one program.
    With a ``window``, the step also takes the scan's start and carry and
    returns the carry after the window (and stops the model there)."""
    traced, flow, steps = self._cache[sig]
    shapes = tuple(
      sorted((leaf, t.site, t.stack_shape, len(t.layers)) for leaf, t in targets.items())
    )
    tkey = (shapes, hessian, window, _HESSIAN_TC_CHUNK)
    if tkey not in steps:
      closed = traced.closed
      first = dict(targets)  # the same sites, stack shapes and slot counts as later calls

      def step(acc, leaves, extra, batch, tables, start=None, carry=None):
        tap = _Tap(flow.sites, first, dict(acc), hessian, tables, window, start, carry)
        args = (
          list(leaves)
          + jax.tree_util.tree_leaves(extra)
          + [x for x in jax.tree_util.tree_leaves(batch) if isinstance(x, (jax.Array, np.ndarray))]
        )
        try:
          with jax.default_matmul_precision("highest"):
            tap.run(closed.jaxpr, closed.consts, args)
        except _Stop as stop:
          return tap.acc, stop.carry
        if window is not None:
          raise ValueError(f"the model never reached the stacked scan {window.key}")
        return tap.acc

      donate = (0,) if jax.default_backend() != "cpu" else ()
      steps[tkey] = jax.jit(step, donate_argnums=donate)
    return steps[tkey]

  def single_trace(self, batches: Sequence[Any]) -> weights.WeightFlow | None:
    """The analysis all ``batches`` share, or None when their shapes differ."""
    sigs = {self._signature(b) for b in batches}
    if len(sigs) != 1:
      return None
    self.traced(batches[0])
    return self._cache[next(iter(sigs))][1]

  def accumulate_window(
    self,
    leaves: Sequence[jax.Array],
    batches: Sequence[Any],
    targets: Mapping[int, Target],
    window: Window,
    start: int,
    carries: Sequence[Any] | None,
    *,
    hessian: bool,
  ) -> tuple[dict[int, dict], list]:
    """:meth:`accumulate` over ``window.length`` iterations of the stacked scan only.

    Each batch enters the scan at iteration ``start`` with its carry from
    ``carries`` (``None``: the model's own carry, computed from its input,
    which must then be at ``start=0``); nothing after the scan runs. Returns
    the running sums and every batch's carry after the window: the inputs of
    iteration ``start + window.length``. Batches must share one shape
    (:meth:`single_trace`).
    """
    acc = {leaf: zeros(t, hessian) for leaf, t in targets.items()}
    tables = {leaf: np.asarray(t.table()) for leaf, t in targets.items() if t.stack_shape}
    out = []
    for b, batch in enumerate(batches):
      self.traced(batch)
      step = self._step(self._signature(batch), targets, hessian, window)
      carry = None if carries is None else carries[b]
      acc, c = step(acc, list(leaves), self.model.extra, batch, tables, jnp.int32(start), carry)
      out.append(c)
    return acc, out

  def accumulate(
    self,
    leaves: Sequence[jax.Array],
    batches: Iterable[Any],
    targets: Mapping[int, Target],
    *,
    hessian: bool,
  ) -> dict[int, dict]:
    """Streams ``batches`` through the model; returns running sums per target leaf.

    One jitted step per batch shape (compiled once): the leaves and the batch
    are arguments, never constants. Returns ``{leaf: {"count": (S,), "sumsq":
    (S, G, K), "hessian": (S, G, K, K)}}`` with one slot per collected layer.
    """
    acc = {leaf: zeros(t, hessian) for leaf, t in targets.items()}
    tables = {leaf: np.asarray(t.table()) for leaf, t in targets.items() if t.stack_shape}
    for batch in batches:
      self.traced(batch)
      step = self._step(self._signature(batch), targets, hessian)
      acc = step(acc, list(leaves), self.model.extra, batch, tables)
    return acc


def leaf_sites(flow: weights.WeightFlow, leaf: int) -> list[weights.SiteUse]:
  """Every site of ``leaf`` found by the analysis."""
  return [u for us in flow.sites.values() for u in us if u.leaf == leaf]


def site_of(
  flow: weights.WeightFlow, leaf: int, shape: Sequence[int]
) -> tuple[Target | None, list[weights.SiteUse], str]:
  """``(target with every layer, site uses, "")`` or ``(None, [], reason)``."""
  uses = leaf_sites(flow, leaf)
  if not uses:
    others = sorted({u.what for u in flow.uses.get(leaf, {}).values() if u.kind == "other"})
    why = (
      ("used by " + "; ".join(others))
      if others
      else ("not consumed by a dot_general or convolution of the traced function")
    )
    return None, [], why
  geoms = {(u.site, tuple(a for a, _ in u.stack)) for u in uses}
  if len(geoms) > 1:
    return None, [], f"consumed by matmuls of different layouts: {sorted(map(str, geoms))}"
  ((site, stack_axes),) = geoms
  stack_shape = tuple(int(shape[a]) for a in stack_axes)
  layers = tuple(np.ndindex(*stack_shape)) if stack_shape else ((),)
  return Target(site, stack_shape, layers), uses, ""


def collect_stats(
  fn: Callable[..., Any] | Any,
  params: PyTree = None,
  batches: Iterable[Any] = (),
  *,
  paths: Iterable[str] | None = None,
  hessian: bool = False,
) -> dict[str, LayerStats]:
  """Input statistics of the weights of a model over calibration batches.

  Two call forms: ``collect_stats(model.apply, variables, batches)`` (linen, or
  any ``fn(params, batch)``) and ``collect_stats(nnx_module, batches=batches)``.

  Args:
    fn: the apply function, or an ``nnx.Module``.
    params: the params pytree for ``fn`` (None for nnx).
    batches: iterable of batches; each is passed as ``fn(params, batch)``.
    paths: the leaves to tap (path strings); default: every leaf that
      :mod:`jasp.weights` finds to be a matmul or convolution weight.
    hessian: also accumulate ``X^T X`` (``(G, K, K)`` float32 per weight and layer).

  Returns:
    ``{path: LayerStats}`` (sums over all rows of all batches). A weight used
    by several matmuls (tied weights) sums the inputs of all of them; a stacked
    weight has one set of statistics per layer.

  Raises:
    ValueError: when a requested path is not tapped (naming why), or uses
      differ in their matrix view.
  """
  if _model.is_module(fn) and params is not None:
    raise TypeError("for an nnx.Module, pass collect_stats(module, batches=...).")
  model, _ = _model.adapt(fn, params, (), what="collect_stats")
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
  tapper = Tapper(model)
  _, flow = tapper.traced(batches[0])
  targets = {}
  for leaf in cand:
    target, _, why = site_of(flow, leaf, np.shape(model.leaves[leaf]))
    if target is None:
      if paths is not None:
        raise ValueError(f"'{model.paths[leaf]}' is not tapped: {why}.")
      continue
    if paths is None and any(u.kind == "other" for u in flow.uses.get(leaf, {}).values()):
      continue  # not a weight by the rules (a tied embedding, a low-rank factor)
    targets[leaf] = target
  acc = tapper.accumulate(model.leaves, batches, targets, hessian=hessian)
  out = {}
  for leaf, a in acc.items():
    t = targets[leaf]
    site = dataclasses.replace(t.site, path=model.paths[leaf])
    shape = t.stack_shape

    def unslot(x, shape=shape):
      return x.reshape(shape + x.shape[1:]) if shape else x[0]

    stack_axes = tuple(a for a, _ in leaf_sites(flow, leaf)[0].stack)
    out[model.paths[leaf]] = LayerStats(
      site,
      unslot(a["count"]),
      unslot(a["sumsq"]),
      unslot(a["hessian"]) if hessian else None,
      stack_axes,
    )
  return out
