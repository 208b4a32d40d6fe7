"""ONNX export of flax (linen and nnx) models with their sparse params.

The exporter is `jax2onnx <https://pypi.org/project/jax2onnx/>`_: it converts
the jaxpr directly, primitive by primitive, into plain ONNX ops (``Conv``,
``MatMul``, ``Softmax``, norms as elementwise ops ...) and exports symbolic
batch sizes. Why not ``jax2tf`` -> ``tf2onnx``, and what the dependency costs
(it pins ``orbax-checkpoint<0.11.37`` and pulls ``onnx-ir``, ``equinox``,
``dm-pix``, ``huggingface-hub`` and ``netron``): docs/design/onnx-export.md.

jax2onnx registers its converters by importing every module of its
``plugins`` tree on the first export, equinox, dm-pix and example models
included. jasp imports only the ``plugins/jax`` and ``plugins/flax`` subtrees
(a fraction of the import time), which hold every converter a flax model
needs; if that internal layout changes, it falls back to the full import.

jax2onnx is given the model's own jaxpr, re-evaluated by
:mod:`jasp.export._lower` rather than the model's Python code, which works
around what jax2onnx 0.17.1 cannot take (positional ``nn.max_pool`` windows,
linen ``nn.scan``, reverse scans) and writes each weight as its consumer reads
it: a 2-D ``(K, O)`` initializer for ``MatMul``, ``KCRS`` for ``Conv``, and one
initializer per layer for blocks stacked under a ``scan``. A scan over
anything else (an RNN over time) stays an ONNX ``Loop``, its kernels passed in
as loop operands.

Initializers get the exporter's names (``const_10``, ``kernel2d_3``); jasp
records, in the model's ``metadata_props["jasp"]`` (JSON), the flax path of
every weight initializer (matched by value, so transposes and reshapes are
seen through; ``"layer"`` names one layer of a stacked kernel) and whether it
was pruned, which :func:`jasp.export.check_file` reads to know which weights
must carry the pattern.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from jasp import _tree
from jasp.export import _check
from jasp.export import _lower
from jasp.export import _model
from jasp.export import _validate
from jasp.export._deps import MissingDependencyError
from jasp.export._deps import require
from jasp.export._format import METADATA_KEY
from jasp.typing import PyTree

__all__ = ["to_onnx", "run_onnx", "METADATA_KEY"]

# Above this many bytes of initializers the model is saved with external data
# (protobuf's 2 GiB limit).
_EXTERNAL_BYTES = 1 << 30


def _fingerprint(a: np.ndarray) -> tuple:
  """A key invariant under transposes and reshapes: size, dtype, sorted values."""
  a = np.asarray(a)
  digest = hashlib.sha1(np.sort(a.reshape(-1)).tobytes()).hexdigest()
  return (a.size, str(a.dtype), digest)


def _initializer_paths(
  model, params: PyTree, weight_paths: Sequence[str], layouts: dict
) -> dict[str, tuple[str, tuple[int, ...]]]:
  """``{initializer name: (params path, layer)}`` for the weights found by value.

  A weight stacked for a scan over layers (``Layout.stack``) is exported one
  initializer per layer; ``layer`` is its index (``()`` for a whole leaf).
  """
  from onnx import numpy_helper

  leaves = _tree.leaves_by_path(params)
  by_key: dict[tuple, list] = {}
  sizes = set()
  for p in weight_paths:
    w = np.asarray(jax.device_get(leaves[p]))
    stack = tuple(layouts[p].stack)
    parts = [((), w)]
    if stack:
      shape = [w.shape[a] for a in stack]
      moved = np.moveaxis(w, stack, range(len(stack)))
      parts += [(tuple(int(i) for i in idx), moved[idx]) for idx in np.ndindex(*shape)]
    for layer, part in parts:
      if part.ndim < 2:
        continue
      by_key.setdefault(_fingerprint(part), []).append((p, layer))
      sizes.add(part.size)
  out, used = {}, set()
  for init in model.graph.initializer:
    n_el = int(np.prod(init.dims, dtype=np.int64)) if len(init.dims) else 1
    if len(init.dims) < 2 or n_el not in sizes:
      continue
    cands = by_key.get(_fingerprint(numpy_helper.to_array(init)), [])
    if cands:
      fresh = [c for c in cands if c not in used] or cands
      out[init.name] = fresh[0]
      used.add(fresh[0])
  return out


def _weight_entry(path: str, layer: tuple[int, ...], pruned: bool, layout) -> dict:
  """The metadata of one weight initializer (a whole leaf, or one layer of a stacked one)."""
  stack = tuple(layout.stack)
  axis = [a - sum(1 for s in stack if s < a) for a in layout.axis] if layer else list(layout.axis)
  entry = {"path": path, "pruned": pruned, "axis": axis}
  if layer:
    entry["layer"] = list(layer)
  return entry


def _import_plugins() -> None:
  """Registers jax2onnx's jax and flax converters only (see the module doc)."""
  try:
    from pathlib import Path

    from jax2onnx.plugins import plugin_system as ps

    if getattr(ps, "_already_imported_plugins", True):
      return
    root = Path(ps.__file__).parent
    subtrees = [root / "jax", root / "flax"]
    if not all(d.is_dir() for d in subtrees):
      return
    for d in subtrees:
      ps._import_tree(d, f"jax2onnx.plugins.{d.name}")
    ps._already_imported_plugins = True
  except Exception:
    return  # jax2onnx imports everything itself


def _input_specs(inputs: Sequence[Any], dynamic_batch: bool) -> list:
  specs = []
  for x in inputs:
    shape, dtype = tuple(np.shape(x)), getattr(x, "dtype", np.asarray(x).dtype)
    if dynamic_batch and shape:
      dims = ", ".join(["B"] + [str(d) for d in shape[1:]])
      shape = jax.export.symbolic_shape(dims)
    specs.append(jax.ShapeDtypeStruct(shape, dtype))
  return specs


def to_onnx(
  fn: Callable[..., Any] | Any,
  params: PyTree = None,
  *args: Any,
  path: str | os.PathLike | None = None,
  masks: PyTree | None = None,
  n: int = 2,
  m: int = 4,
  dynamic_batch: bool = False,
  opset: int | None = None,
  model_name: str = "jasp_model",
  validate: bool = True,
  rtol: float | None = None,
):
  """Exports a flax model (with sparse params baked in as initializers) to ONNX.

  Call forms, as :func:`jasp.trace_layouts`:

  * linen / any function: ``to_onnx(model.apply, variables, x, path="m.onnx")``
    (``fn(params, *inputs)`` runs the model; ``model`` itself works too);
  * nnx: ``to_onnx(module, x, path="m.onnx")``.

  Example::

    variables, masks = jasp.prune(variables, layouts=layouts)
    ...  # fine-tune with jasp.mask_updates(masks)
    jasp.export.to_onnx(model.apply, variables, x, path="model.onnx", masks=masks)
    print(jasp.export.check_file("model.onnx"))

  Args:
    fn: a linen ``apply`` (or module), any ``fn(params, *inputs)``, or an nnx
      module.
    params: the variables/params pytree (for nnx: the first example input).
    *args: example inputs; their shapes and dtypes fix the ONNX inputs'.
    path: where to write the ``.onnx`` file (None: only return the model).
    masks: the masks from :func:`jasp.prune`: which weights the metadata marks
      as pruned. None: a weight counts as pruned when it *is* N:M along its
      traced axes and holds zeros.
    n, m: the pattern recorded in the metadata.
    dynamic_batch: make the leading axis of every input symbolic (``B``).
    opset: ONNX opset (default: the exporter's, 23 for jax2onnx 0.17).
    model_name: the ONNX graph's name.
    validate: check the file before handing it over (default): ``onnx.checker``
      (full check), a run in onnxruntime on the example inputs against the JAX
      model at full precision, and the N:M pattern of every pruned weight read
      back by :func:`jasp.export.check_file` (see :mod:`jasp.export._validate`).
      With ``path``, the file is written aside and moved into place only when
      it passes: a failed export leaves no file behind.
    rtol: largest accepted ``max |y_onnx - y_jax| / max |y_jax|`` (default 1e-4
      for float32 outputs, 2e-2 for 16-bit ones).

  Returns:
    The ``onnx.ModelProto`` (also written to ``path`` when given).

  Raises:
    ExportError: the file failed a check (the message names which); nothing
      was written at ``path``.
    ValueError: ``masks`` that do not mirror the params (a shape differs, or no
      path matches).
    MissingDependencyError: without ``jax2onnx``/``onnx``/``onnxruntime``
      (``pip install 'jasp[onnx]'``).
  """
  j2o = require("jax2onnx")
  require("onnx")
  _import_plugins()
  bound = _model.bind(fn, params, args)
  model = _convert(j2o, bound, dynamic_batch, opset, model_name)
  pruned = _model.pruned_paths(bound, masks, n, m)
  _set_metadata(model, bound, pruned, n, m)
  if not validate:
    if path is not None:
      _save(model, os.fspath(path))
    return model
  want = _validate.reference(bound.apply, bound.params, bound.inputs)
  rtol = _validate.default_rtol(want) if rtol is None else rtol
  check = lambda src: _validated(src, model, bound.inputs, want, rtol, pruned)
  if path is None:
    check(model)
  else:
    _validate.deliver(path, lambda tmp: _save(model, tmp), check)
  return model


class _UntypedValueInfo(logging.Filter):
  """Drops onnx_ir's "The value type for shape ... is not known" serializer warning.

  The converter annotates a few intermediate values with a shape but no element
  type; the serializer skips those optional annotations and the model is
  complete without them (every export is then checked with ``onnx.checker``,
  run in onnxruntime and compared with JAX). Every other record passes.
  """

  def filter(self, record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("The value type for shape")


@contextlib.contextmanager
def _quiet_untyped_value_info():
  """Installs :class:`_UntypedValueInfo` on the ``onnx_ir.serde`` logger for a block."""
  logger = logging.getLogger("onnx_ir.serde")
  f = _UntypedValueInfo()
  logger.addFilter(f)
  try:
    yield
  finally:
    logger.removeFilter(f)


def _convert(j2o, bound, dynamic_batch: bool, opset: int | None, model_name: str):
  """The ``ModelProto`` of a bound model, lowered by jasp and converted by jax2onnx."""
  p = bound.params
  specs = _input_specs(bound.inputs, dynamic_batch)
  closed, out_tree = jax.make_jaxpr(lambda p, *xs: bound.apply(p, *xs), return_shape=True)(
    p, *specs
  )
  out_tree = jax.tree_util.tree_structure(out_tree)
  p_leaves = jax.tree_util.tree_leaves(p)

  def forward(*xs):
    outs = _lower.Lowering().run(closed.jaxpr, closed.consts, p_leaves + list(xs))
    return jax.tree_util.tree_unflatten(out_tree, outs)

  kwargs = {"model_name": model_name}
  if opset is not None:
    kwargs["opset"] = opset
  with _quiet_untyped_value_info():
    return j2o.to_onnx(forward, specs, **kwargs)


def _set_metadata(model, bound, pruned: dict[str, bool], n: int, m: int) -> None:
  """Records jasp's metadata (the pattern; per initializer its path, axes, pruned) in ``model``."""
  names = _initializer_paths(model, bound.params, list(pruned), bound.layouts)
  meta = {
    "producer": "jasp.export.to_onnx",
    "n": n,
    "m": m,
    "weights": {
      name: _weight_entry(pth, layer, pruned[pth], bound.layouts[pth])
      for name, (pth, layer) in names.items()
    },
  }
  entry = next((e for e in model.metadata_props if e.key == METADATA_KEY), None)
  if entry is None:
    entry = model.metadata_props.add()
    entry.key = METADATA_KEY
  entry.value = json.dumps(meta, sort_keys=True)


def _validated(src, model, inputs, want, rtol: float, pruned: dict) -> None:
  """The checks of :mod:`jasp.export._validate` on an ONNX model (a proto or a file path)."""
  onnx = require("onnx")
  try:
    onnx.checker.check_model(src, full_check=True)
  except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
    raise _validate.ExportError(f"onnx.checker rejects the exported model: {e}") from None
  try:
    got = run_onnx(src, *inputs)
  except Exception as e:  # noqa: BLE001 - onnxruntime raises its own error classes
    if isinstance(e, MissingDependencyError):
      raise
    raise _validate.ExportError(
      f"onnxruntime cannot run the exported model: {type(e).__name__}: {e}"
    ) from None
  _validate.compare_outputs("onnxruntime", got, want, rtol)
  if isinstance(src, str):  # the written file (its weights may live in external data)
    report = _check.check_file(src, format="onnx", require_weights=False)
  else:
    report = _check.check_onnx(model, require_weights=False)
  _validate.check_pruned(report, pruned)


def _save(model, path: str) -> None:
  onnx = require("onnx")
  size = sum(len(t.raw_data) for t in model.graph.initializer)
  if size > _EXTERNAL_BYTES:
    onnx.save_model(
      model,
      path,
      save_as_external_data=True,
      all_tensors_to_one_file=True,
      location=os.path.basename(path) + ".data",
    )
  else:
    onnx.save_model(model, path)


def run_onnx(model_or_path: Any, *inputs: Any) -> list[np.ndarray]:
  """Runs an ONNX model in onnxruntime (CPU) on ``inputs`` (positional, numpy-able).

  Returns:
    The model's outputs as numpy arrays, in order.
  """
  ort = require("onnxruntime")
  src = model_or_path
  if not isinstance(src, (str, os.PathLike)):
    src = src.SerializeToString()
  else:
    src = os.fspath(src)
  opts = ort.SessionOptions()
  opts.log_severity_level = 3  # errors only: no shape-merge warnings on stderr
  sess = ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])
  feeds = {i.name: np.asarray(x) for i, x in zip(sess.get_inputs(), inputs)}
  return sess.run(None, feeds)
