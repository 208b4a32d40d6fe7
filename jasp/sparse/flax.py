"""Flax drop-ins: run a pruned linen or nnx model with compressed 2:4 weights.

linen (a params transform plus a method interceptor; the model code is
unchanged)::

    pruned, masks = jasp.prune(variables, layouts=layouts)
    sparse_vars, report = jasp.sparse.sparsify(pruned, layouts=layouts, dtype=jnp.bfloat16)
    y = jasp.sparse.apply(model, sparse_vars, x)   # model.apply, Dense/DenseGeneral/Einsum sparse

nnx (modules swapped in place)::

    report = jasp.sparse.sparsify_nnx(model, dtype=jnp.bfloat16)
    y = model(x)

Every ``Dense``/``DenseGeneral``/``Einsum`` (linen) or ``Linear``/``LinearGeneral``/
``Einsum`` (nnx) whose kernel is 2:4 along its input axes is compressed
(:func:`jasp.sparse.compress`); the others, and every other leaf, stay as
they are, and the report says why. Attention projections are
``DenseGeneral``/``LinearGeneral`` layers, so they are covered. linen's
:func:`sparsify` sees only the params, so it compresses any kernel whose
contracted axes lead; a module other than those three that reads such a
kernel as an array raises TypeError naming the way out (``exclude``). The
stacked kernel of scanned layers (``nn.scan``; ``nnx.vmap`` + ``nnx.scan``) is
compressed layer by layer into one stacked SparseWeight, which the scan
slices: each step runs its layer's. Each call then
goes through :func:`jasp.sparse.matmul`: the sparse tensor cores where the
policy measured them faster, the dense dot on the kept masked weight
otherwise, and on CPU.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jasp import _tree
from jasp import layouts as layouts_lib
from jasp import masks as masks_lib
from jasp import policy as pruning_policy
from jasp.kernels import decode24
from jasp.sparse import _compress as compress_lib
from jasp.sparse import autotune
from jasp.typing import PyTree

__all__ = ["sparsify", "apply", "intercept", "SparseEinsum", "SparseLinear", "sparsify_nnx"]

_SIXTEEN = ("bfloat16", "float16")


def _is_24(w: jax.Array, in_axes: int) -> bool:
  k = math.prod(w.shape[:in_axes])
  if k % 4:
    return False
  return bool(masks_lib.is_nm(w.reshape(k, -1), 2, 4, axis=0))


def _left_24(w: Any) -> bool:
  """Whether a parameter that no swapped layer reads is 2:4 along one of its axes (and not
  all zeros): most likely a pruned weight, which then runs dense."""
  if not isinstance(w, (jax.Array, np.ndarray)) or w.ndim < 2:
    return False
  axes = [a for a in range(w.ndim) if w.shape[a] % 4 == 0]
  if not axes or not jnp.issubdtype(w.dtype, jnp.floating):
    return False
  some_24 = jnp.stack([masks_lib.is_nm(w, 2, 4, axis=a) for a in axes]).any()
  return bool(some_24 & jnp.any(w != 0))  # one read back


_LEFT = (
  "kept dense: 2:4, but {what}; jasp.sparse swaps {layers} only "
  "(a module that reads its own parameter computes with it as it is)"
)


def _matches(path: str, include: Sequence[str] | None, exclude: Sequence[str] | None) -> str | None:
  if include and not any(re.search(p, path) for p in include):
    return "not matched by include"
  if exclude and any(re.search(p, path) for p in exclude):
    return "matched by exclude"
  return None


def _compress_leaf(
  path: str, w: jax.Array, in_axes: int, dtype, keep_dense: bool, a_order: int, compact: bool
) -> tuple[Any, str]:
  """(new leaf, report line) for one candidate kernel."""
  if not _is_24(w, in_axes):
    return w, "kept: not 2:4 along its input axes (prune it first, or it is meant dense)"
  if dtype is None and jnp.dtype(w.dtype).name not in _SIXTEEN:
    return w, (
      f"kept: a {jnp.dtype(w.dtype).name} kernel; pass dtype=jnp.bfloat16 (or float16) "
      "to run it on the 16-bit sparse tensor cores"
    )
  sw = compress_lib.compress(
    w,
    in_axes=in_axes,
    dtype=dtype,
    keep_dense=keep_dense,
    a_order=a_order,
    check=False,
    path=path,
    compact=compact,
  )
  with_compact = ", with the compact (decode) format" if sw.is_compact else ""
  if compact and not sw.is_compact:
    with_compact = f", no compact format ({decode24.shape_ok(sw.k, sw.n, sw.dtype)[1]})"
  if sw.is_compressed:
    return sw, f"compressed ({sw.k} in x {sw.n} out, {sw.dtype}){with_compact}"
  ok, why = compress_lib.sparse_shape_ok(sw.k, sw.n)
  return sw, ("dense path: " + (why if not ok else "no sparse runtime here") + with_compact)


def sparsify(
  params: PyTree,
  *,
  layouts: Mapping[str, layouts_lib.Layout] | None = None,
  dtype: Any = None,
  keep_dense: bool = True,
  include: Sequence[str] | None = None,
  exclude: Sequence[str] | None = None,
  a_order: int = compress_lib.DEFAULT_A_ORDER,
  compact: bool = False,
) -> tuple[PyTree, dict[str, str]]:
  """Replaces the 2:4 Dense/DenseGeneral/Einsum kernels of a params tree by SparseWeights.

  A kernel stacked over scanned layers (its layout's ``stack`` axes leading,
  e.g. ``(L, in, out)`` under ``nn.scan``) becomes one SparseWeight whose
  arrays carry the stack axes (:attr:`SparseWeight.stack`), compressed layer
  by layer; it is kept whole if any layer is not 2:4.

  Args:
    params: a linen variables dict (or any pytree of arrays), already pruned.
    layouts: ``{path: Layout}`` from :func:`jasp.trace_layouts` (exact); None
      uses flax's naming conventions.
    dtype: the compute dtype of the compressed layers (``jnp.bfloat16`` or
      ``jnp.float16``); None keeps each kernel's dtype, which must be 16-bit.
    keep_dense: keep the masked dense weight too, so the policy can take the
      dense path where it is faster (few tokens). False halves the memory of
      those layers but forces the sparse kernel at every token count.
    include, exclude: regular expressions on leaf paths (``re.search``); a
      single string is one pattern.
    a_order: the compressed layout (:data:`jasp.sparse.A_ROW` or ``A_COL``).
    compact: also keep each kernel's compact (decode) format for the
      decode-time kernel (see :func:`jasp.sparse.compress`).

  Returns:
    ``(params with SparseWeight leaves, {path: what happened})``: one report
    line per ``kernel`` leaf that is a matmul weight, and per other leaf that
    is 2:4 along an axis (a pruned weight kept dense: a convolution kernel, or
    a parameter its module reads itself).

  Raises:
    ValueError: a pattern of ``include``/``exclude`` is not a valid regular
      expression (naming the argument and the pattern).
    TypeError: a pattern is neither a string nor an ``re.Pattern``.
  """
  include = pruning_policy.as_patterns(include, "include")
  exclude = pruning_policy.as_patterns(exclude, "exclude")
  is_sw = lambda x: isinstance(x, compress_lib.SparseWeight)
  flat, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_sw)
  out, report = [], {}
  layers = "the kernels of Dense, DenseGeneral and Einsum layers"
  for p, leaf in flat:
    path = _tree.path_str(p)
    if is_sw(leaf):
      report[path] = "kept: already a SparseWeight"
      out.append(leaf)
      continue
    if not path.endswith("kernel") or not hasattr(leaf, "shape"):
      if _left_24(leaf):
        report[path] = _LEFT.format(what="not a layer's kernel", layers=layers)
      out.append(leaf)
      continue
    lay = layouts_lib.resolve(path, leaf, layouts)
    nd = leaf.ndim
    if lay.kind != "dot" or lay.axis is None:
      if _left_24(leaf):
        what = "a convolution kernel" if lay.kind == "conv" else "not a matmul kernel"
        report[path] = _LEFT.format(what=what, layers=layers)
      out.append(leaf)
      continue
    a, st = len(lay.axis), len(lay.stack)
    if (
      tuple(lay.stack) != tuple(range(st))
      or tuple(lay.axis) != tuple(range(st, st + a))
      or tuple(lay.out_axes) != tuple(range(st + a, nd))
    ):
      report[path] = (
        f"kept: contracted axes {lay.axis} do not lead the kernel {tuple(leaf.shape)}"
        + (f" after its stack axes {lay.stack}" if lay.stack else "")
        + " (not a Dense/DenseGeneral/Einsum kernel layout)"
      )
      out.append(leaf)
      continue
    skip = _matches(path, include, exclude)
    if skip:
      report[path] = f"kept: {skip}"
      out.append(leaf)
      continue
    if st:
      new, line = _compress_stack(path, leaf, st, a, dtype, keep_dense, a_order, compact)
    else:
      new, line = _compress_leaf(path, leaf, a, dtype, keep_dense, a_order, compact)
    report[path] = line
    out.append(new)
  return jax.tree_util.tree_unflatten(treedef, out), report


# ----------------------------------------------------------------------------
# linen: an interceptor for Dense / DenseGeneral.


def _norm_axes(axis, ndim: int) -> tuple[int, ...]:
  axes = (axis,) if isinstance(axis, int) else tuple(axis)
  return tuple(sorted(a % ndim for a in axes))


def _contract(
  x: jax.Array,
  w: compress_lib.SparseWeight,
  axes: tuple[int, ...],
  bias,
  out_dtype,
  policy,
  bias_epilogue,
) -> jax.Array:
  """``x`` contracted over ``axes`` with the kernel; output ``(*rest, *out_shape)``."""
  in_sizes = tuple(x.shape[a] for a in axes)
  if in_sizes != w.in_shape:
    raise ValueError(
      f"x of shape {tuple(x.shape)} contracts axes {axes} of sizes {in_sizes}, "
      f"but the compressed kernel {w.shape} expects {w.in_shape}."
    )
  trailing = tuple(range(x.ndim - len(axes), x.ndim))
  if axes != trailing:
    x = jnp.moveaxis(x, axes, trailing)
  lead = x.shape[: x.ndim - len(axes)]
  y = autotune.matmul(x.reshape(*lead, w.k), w, bias, policy=policy, bias_epilogue=bias_epilogue)
  return y.reshape(*lead, *w.out_shape).astype(out_dtype)


def _compress_stack(
  path: str,
  w: jax.Array,
  stack: int,
  in_axes: int,
  dtype,
  keep_dense: bool,
  a_order: int,
  compact: bool,
) -> tuple[Any, str]:
  """(new leaf, report line) for a kernel stacked over its ``stack`` leading axes (the
  kernels of scanned layers): each layer compressed alone, the layers' SparseWeights
  stacked along the same axes. Kept whole if any layer is kept."""
  lead = w.shape[:stack]
  layers = w.reshape(-1, *w.shape[stack:])
  results = [
    _compress_leaf(f"{path}[{i}]", layer, in_axes, dtype, keep_dense, a_order, compact)
    for i, layer in enumerate(layers)
  ]
  for i, (new, line) in enumerate(results):
    if not isinstance(new, compress_lib.SparseWeight):
      return w, f"{line} (layer {i} of a stack of {len(layers)})"
  sws = [new for new, _ in results]
  if len({jax.tree.structure(sw) for sw in sws}) != 1:
    return w, f"kept: the {len(layers)} stacked layers compressed to different forms"
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs).reshape(*lead, *xs[0].shape), *sws)
  return stacked, f"{results[0][1]}; a stack of {len(layers)} layers"


def _out_dtype(layer, x) -> Any:
  """The output dtype of a linen layer or a sparse nnx layer: its ``dtype``, else the
  promotion of ``x``'s and its ``param_dtype``, as flax does."""
  return layer.dtype if layer.dtype is not None else jnp.result_type(x.dtype, layer.param_dtype)


def _einsum_split(lhs: str, rhs: str, out: str) -> tuple[str, str] | None:
  """``(contracted, free)`` kernel letters of the equation ``lhs,rhs->out``, or None when
  it has no sparse form: it must contract the kernel's leading axes with axes of the
  input and keep every other axis of either operand."""
  contracted = [c for c in rhs if c not in out]
  free = [c for c in rhs if c in out]
  kept = [c for c in lhs if c not in contracted]
  if (
    rhs[: len(contracted)] != "".join(contracted)
    or any(c not in lhs for c in contracted)
    or any(c in lhs for c in free)
    or sorted(kept + free) != sorted(out)
    or len(set(lhs)) != len(lhs)
    or len(set(rhs)) != len(rhs)
  ):
    return None
  return "".join(contracted), "".join(free)


def _no_sparse_form(name: str, eq: str) -> str:
  return (
    f"{name}: einsum {eq!r} has no sparse form (jasp.sparse runs equations that contract "
    "the kernel's leading axes with input axes and keep every other axis, e.g. "
    "'btd,df->btf'); keep this kernel dense (sparsify(..., exclude=[...]))."
  )


def _einsum(name, x, eq, kernel, bias, out_dtype, policy, bias_epilogue) -> jax.Array:
  """An ``Einsum`` layer (linen or nnx) with a SparseWeight kernel; see :func:`_einsum_split`."""
  import opt_einsum  # a dependency of jax

  eq = eq.replace(" ", "")
  shapes = (jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct(kernel.shape, x.dtype))
  try:
    operands, out, _ = opt_einsum.parser.parse_einsum_input((eq, *shapes))
    lhs, rhs = operands.split(",")
  except ValueError as e:
    raise ValueError(f"{name}: einsum {eq!r} with the input {x.shape}: {e}") from None
  split = _einsum_split(lhs, rhs, out)
  if split is None:
    raise ValueError(_no_sparse_form(name, eq))
  contracted, free = split
  axes = tuple(lhs.index(c) for c in contracted)
  y = _contract(x, kernel, axes, None, out_dtype, policy, bias_epilogue)
  have = [c for c in lhs if c not in contracted] + list(free)
  y = jnp.transpose(y, [have.index(c) for c in out])
  if bias is not None:
    shape = [kernel.shape[rhs.index(c)] if c in free else 1 for c in out]
    y = y + jnp.asarray(bias).reshape(shape).astype(y.dtype)
  return y


def _interceptor(policy, bias_epilogue):
  def intercept_fn(next_fun, args, kwargs, context):
    mod = context.module
    if (
      context.method_name != "__call__"
      or not isinstance(mod, (nn.Dense, nn.DenseGeneral, nn.Einsum))
      or not mod.has_variable("params", "kernel")
    ):
      return next_fun(*args, **kwargs)
    kernel = mod.get_variable("params", "kernel")
    if not isinstance(kernel, compress_lib.SparseWeight):
      return next_fun(*args, **kwargs)
    x = jnp.asarray(args[0] if args else kwargs["inputs"])
    bias = mod.get_variable("params", "bias") if mod.use_bias else None
    out_dtype = _out_dtype(mod, x)
    if isinstance(mod, nn.Einsum):
      eq = args[1] if len(args) > 1 else kwargs.get("einsum_str")
      return _einsum(
        mod.name, x, eq or mod.einsum_str, kernel, bias, out_dtype, policy, bias_epilogue
      )
    if isinstance(mod, nn.Dense):
      axes = (x.ndim - 1,)
    else:
      if mod.batch_dims:
        raise ValueError(
          f"{mod.name}: DenseGeneral with batch_dims={mod.batch_dims} has no "
          "sparse form; keep it dense (sparsify(..., exclude=[...]))."
        )
      axes = _norm_axes(mod.axis, x.ndim)
    return _contract(x, kernel, axes, bias, out_dtype, policy, bias_epilogue)

  return intercept_fn


@contextlib.contextmanager
def intercept(*, policy: autotune.MatmulPolicy | None = None, bias_epilogue: bool = False):
  """Within this context, linen ``Dense``/``DenseGeneral``/``Einsum`` layers whose kernel
  is a :class:`jasp.sparse.SparseWeight` run :func:`jasp.sparse.matmul`.

  An ``Einsum`` runs sparse when its equation contracts the kernel's leading
  axes with input axes and keeps every other axis (``"btd,df->btf"``,
  ``"btnh,nhd->btd"``); with another equation it raises ValueError.

  Layers with array kernels run unchanged. Usable around ``model.apply`` and
  inside ``jax.jit``.
  """
  with nn.intercept_methods(_interceptor(policy, bias_epilogue)):
    yield


def apply(
  model: nn.Module,
  variables: PyTree,
  *args,
  policy: autotune.MatmulPolicy | None = None,
  bias_epilogue: bool = False,
  **kwargs,
):
  """``model.apply(variables, *args, **kwargs)`` with the sparse Dense layers.

  ``variables`` comes from :func:`sparsify`. Returns what ``model.apply`` returns.
  """
  with intercept(policy=policy, bias_epilogue=bias_epilogue):
    return model.apply(variables, *args, **kwargs)


# ----------------------------------------------------------------------------
# nnx: a module that replaces Linear / LinearGeneral.


class _SparseLayer(nnx.Module):
  """What :class:`SparseLinear` and :class:`SparseEinsum` share: the kernel, the bias,
  the output dtype rule and the matmul policy."""

  def __init__(self, kernel, bias, *, dtype, param_dtype, policy, bias_epilogue):
    self.kernel = nnx.Param(kernel)
    self.bias = nnx.Param(bias) if bias is not None else None
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.policy = policy
    self.bias_epilogue = bias_epilogue

  def _operands(self, x: jax.Array) -> tuple[compress_lib.SparseWeight, Any, Any]:
    """``(kernel, bias or None, output dtype)`` for the input ``x``."""
    bias = self.bias.get_value() if self.bias is not None else None
    return self.kernel.get_value(), bias, _out_dtype(self, x)


def _constrain(y: jax.Array, out_sharding) -> jax.Array:
  return y if out_sharding is None else jax.lax.with_sharding_constraint(y, out_sharding)


class SparseLinear(_SparseLayer):
  """An nnx ``Linear``/``LinearGeneral`` whose kernel is a :class:`jasp.sparse.SparseWeight`.

  Contracts ``axis`` of the input (sizes ``kernel.in_shape``) and returns
  ``(*other axes, *kernel.out_shape)``. Built by :func:`sparsify_nnx`.

  Attributes:
    kernel: ``nnx.Param`` holding the SparseWeight.
    bias: ``nnx.Param`` of shape ``out_shape``, or None.
    axis: the contracted input axes (negative: from the end).
    dtype: the output dtype (None: promote the input with ``param_dtype``).
    param_dtype: the original layer's parameter dtype.
    policy, bias_epilogue: as :func:`jasp.sparse.matmul`.
  """

  def __init__(
    self,
    kernel: compress_lib.SparseWeight,
    bias: jax.Array | None,
    *,
    axis: Sequence[int] = (-1,),
    dtype: Any = None,
    param_dtype: Any = jnp.float32,
    policy: autotune.MatmulPolicy | None = None,
    bias_epilogue: bool = False,
  ):
    super().__init__(
      kernel,
      bias,
      dtype=dtype,
      param_dtype=param_dtype,
      policy=policy,
      bias_epilogue=bias_epilogue,
    )
    self.axis = tuple(int(a) for a in axis)

  def __call__(self, x: jax.Array, out_sharding=None) -> jax.Array:
    """``x`` contracted over ``axis``; ``out_sharding`` as in ``nnx.Linear`` (a constraint)."""
    x = jnp.asarray(x)
    w, bias, out_dtype = self._operands(x)
    axes = _norm_axes(self.axis, x.ndim)
    y = _contract(x, w, axes, bias, out_dtype, self.policy, self.bias_epilogue)
    return _constrain(y, out_sharding)


class SparseEinsum(_SparseLayer):
  """An ``nnx.Einsum`` whose kernel is a :class:`jasp.sparse.SparseWeight`.

  Runs the equations whose kernel contraction is sparse (the kernel's leading
  axes contracted with input axes, every other axis kept, as in
  ``"btd,df->btf"``); another equation raises ValueError. Built by
  :func:`sparsify_nnx`.

  Attributes:
    kernel: ``nnx.Param`` holding the SparseWeight.
    bias: ``nnx.Param`` of the kernel's free axes, or None.
    einsum_str: the equation (a call may pass another).
    dtype, param_dtype: as ``nnx.Einsum``'s.
    policy, bias_epilogue: as :func:`jasp.sparse.matmul`.
  """

  def __init__(
    self,
    kernel: compress_lib.SparseWeight,
    bias: jax.Array | None,
    *,
    einsum_str: str,
    dtype: Any = None,
    param_dtype: Any = jnp.float32,
    policy: autotune.MatmulPolicy | None = None,
    bias_epilogue: bool = False,
  ):
    super().__init__(
      kernel,
      bias,
      dtype=dtype,
      param_dtype=param_dtype,
      policy=policy,
      bias_epilogue=bias_epilogue,
    )
    self.einsum_str = einsum_str

  def __call__(self, inputs: jax.Array, einsum_str: str | None = None, out_sharding=None):
    """``einsum(einsum_str, inputs, kernel) (+ bias)``; ``out_sharding`` a constraint."""
    x = jnp.asarray(inputs)
    w, bias, out_dtype = self._operands(x)
    eq = einsum_str or self.einsum_str
    y = _einsum("SparseEinsum", x, eq, w, bias, out_dtype, self.policy, self.bias_epilogue)
    return _constrain(y, out_sharding)


def _nnx_parent(root, path: tuple) -> Any:
  node = root
  for key in path:
    node = getattr(node, key) if isinstance(key, str) else node[key]
  return node


def _nnx_set(parent, key, value) -> None:
  if isinstance(key, str):
    setattr(parent, key, value)
  else:
    parent[key] = value


def _nnx_einsum_form(node) -> tuple[str, int]:
  """``(why not, contracted kernel axes)`` of an ``nnx.Einsum`` (``why`` empty: it has a sparse form)."""
  eq = node.einsum_str
  lhs, _, out = eq.partition("->")
  lhs, _, rhs = lhs.partition(",")
  split = None if "." in rhs else _einsum_split(lhs.replace("...", ""), rhs, out.replace("...", ""))
  if split is None or not split[0]:
    return "kept: " + _no_sparse_form("einsum", eq).split(": ", 1)[1], 0
  return "", len(split[0])


def sparsify_nnx(
  model: nnx.Module,
  *,
  dtype: Any = None,
  keep_dense: bool = True,
  include: Sequence[str] | None = None,
  exclude: Sequence[str] | None = None,
  policy: autotune.MatmulPolicy | None = None,
  bias_epilogue: bool = False,
  a_order: int = compress_lib.DEFAULT_A_ORDER,
  compact: bool = False,
) -> dict[str, str]:
  """Replaces, in place, every 2:4 ``nnx.Linear``/``LinearGeneral`` by a :class:`SparseLinear`,
  and every 2:4 ``nnx.Einsum`` whose equation has a sparse form by a :class:`SparseEinsum`.

  A layer whose kernel carries leading layer axes (blocks stacked by
  ``nnx.vmap`` and run by ``nnx.scan``) gets a stacked SparseWeight, compressed
  layer by layer, as :func:`sparsify` does.

  Args:
    model: an nnx module, already pruned (its kernels 2:4 along the input axes).
    dtype, keep_dense, include, exclude, a_order, compact: as :func:`sparsify`.
    policy, bias_epilogue: stored on each SparseLinear (see :func:`jasp.sparse.matmul`).

  Returns:
    ``{kernel path: what happened}`` for every Linear/LinearGeneral/Einsum,
    and for every other ``nnx.Param`` that is 2:4 along an axis (a pruned
    weight that its module reads itself: it stays dense, and the report says
    so).

  Raises:
    ValueError, TypeError: for ``include``/``exclude`` as :func:`sparsify`.
  """
  include = pruning_policy.as_patterns(include, "include")
  exclude = pruning_policy.as_patterns(exclude, "exclude")
  found, seen = [], set()
  for path, node in nnx.iter_graph(model):
    kinds = (nnx.Linear, nnx.LinearGeneral, nnx.Einsum)
    if isinstance(node, kinds) and id(node) not in seen and path:
      seen.add(id(node))
      found.append((tuple(path), node))
  report = {}
  for path, node in found:
    name = "/".join(str(p) for p in path) + "/kernel"
    skip = _matches(name, include, exclude)
    if skip:
      report[name] = f"kept: {skip}"
      continue
    w = node.kernel.get_value()
    if isinstance(node, nnx.Einsum):
      why, in_axes = _nnx_einsum_form(node)
      if why:
        report[name] = why
        continue
      axis, layer_ndim = (), len(node.kernel_shape)
    elif isinstance(node, nnx.Linear):
      in_axes, axis, layer_ndim = 1, (-1,), 2
    else:
      if node.batch_axis:
        report[name] = "kept: LinearGeneral with batch_axis has no sparse form"
        continue
      in_axes = len(node.in_features)
      axis = tuple(node.axis)
      layer_ndim = in_axes + len(node.out_features)
    if w.ndim > layer_ndim:  # the kernels of layers stacked by nnx.vmap, run by nnx.scan
      stack = w.ndim - layer_ndim
      new, line = _compress_stack(name, w, stack, in_axes, dtype, keep_dense, a_order, compact)
    else:
      new, line = _compress_leaf(name, w, in_axes, dtype, keep_dense, a_order, compact)
    report[name] = line
    if not isinstance(new, compress_lib.SparseWeight):
      continue
    bias = node.bias.get_value() if node.bias is not None else None
    common = dict(
      dtype=node.dtype, param_dtype=node.param_dtype, policy=policy, bias_epilogue=bias_epilogue
    )
    if isinstance(node, nnx.Einsum):
      layer = SparseEinsum(new, bias, einsum_str=node.einsum_str, **common)
    else:
      layer = SparseLinear(new, bias, axis=axis, **common)
    _nnx_set(_nnx_parent(model, path[:-1]), path[-1], layer)
  layers = "nnx.Linear, LinearGeneral and Einsum layers"
  for path, node in nnx.iter_graph(model):
    name = "/".join(str(p) for p in path)
    if isinstance(node, nnx.Param) and name not in report and _left_24(node.get_value()):
      report[name] = _LEFT.format(what="a parameter its module reads itself", layers=layers)
  return report
