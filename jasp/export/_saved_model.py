"""TensorFlow SavedModel export through ``jax.experimental.jax2tf``.

The params become ``tf.Variable`` objects (not constants folded into the
program), stored in the SavedModel's checkpoint under their flax path:
``params/<path>/.ATTRIBUTES/VARIABLE_VALUE`` (``params/params/Dense_0/kernel``
for a linen model), in flax's own layout (``Dense (in, out)``, ``Conv (*spatial,
in, out)``). The computation is jax2tf's native serialization: one
``XlaCallModule`` op holding the StableHLO program, which TensorFlow runs on
CPU and GPU (and TF Serving serves).

jasp writes ``assets.extra/jasp.json`` next to ``saved_model.pb`` (the
directory TF Serving reserves for extra files; TensorFlow ignores it): the
pattern, and for every traced matmul/conv weight its axes and whether it was
pruned. :func:`jasp.export.check_file` reads it; without it, the checker
falls back to flax's naming conventions.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from jasp import _tree
from jasp.export import _check
from jasp.export import _model
from jasp.export import _validate
from jasp.export._deps import require
from jasp.export._format import JASP_JSON
from jasp.typing import PyTree

__all__ = ["to_saved_model", "run_saved_model", "JASP_JSON", "VAR_PREFIX"]

VAR_PREFIX = "params"


def _var_name(path: str) -> str:
  return re.sub(r"[^A-Za-z0-9_.\-]", "_", path.split("/")[-1]) or "param"


def to_saved_model(
  fn: Callable[..., Any] | Any,
  params: PyTree = None,
  *args: Any,
  path: str | os.PathLike,
  masks: PyTree | None = None,
  n: int = 2,
  m: int = 4,
  dynamic_batch: bool = False,
  validate: bool = True,
  rtol: float | None = None,
) -> str:
  """Exports a flax model to a TensorFlow SavedModel with its (sparse) params as variables.

  Call forms as :func:`jasp.export.to_onnx` (``(model.apply, variables, x)``
  or ``(nnx_module, x)``). The SavedModel's ``serving_default`` signature (and
  its ``serve`` method) take the inputs positionally and return the model's
  outputs.

  Args:
    fn, params, *args: the model, its params and example inputs.
    path: the SavedModel directory to write.
    masks: the masks from :func:`jasp.prune` (which weights are pruned, for the
      checker's metadata); None: weights that are N:M and hold zeros.
    n, m: the pattern recorded in the metadata.
    dynamic_batch: accept any leading (batch) size.
    validate: check the SavedModel before handing it over (default): TensorFlow
      loads it and runs it on the example inputs, compared with the JAX model
      at full precision, and :func:`jasp.export.check_file` finds every pruned
      weight N:M. It is written aside and moved into place only when it passes
      (always whole: an existing directory at ``path`` is replaced, or left as
      it was).
    rtol: largest accepted ``max |y_tf - y_jax| / max |y_jax|`` (default 1e-4
      for float32 outputs, 2e-2 for 16-bit ones).

  Returns:
    ``path`` as a string.

  Raises:
    ExportError: the SavedModel failed a check (the message names which);
      nothing was written at ``path``.
    ValueError: ``masks`` that do not mirror the params.
    MissingDependencyError: without TensorFlow (``pip install 'jasp[tf]'``).
  """
  tf = require("tensorflow")
  bound = _model.bind(fn, params, args)
  path = os.fspath(path)
  module, serve = _tf_module(tf, bound, dynamic_batch)
  pruned = _model.pruned_paths(bound, masks, n, m)
  meta = {
    "producer": "jasp.export.to_saved_model",
    "n": n,
    "m": m,
    "var_prefix": VAR_PREFIX,
    "weights": {
      p: {"pruned": pruned[p], "axis": list(bound.layouts[p].axis), "kind": bound.layouts[p].kind}
      for p in pruned
    },
  }

  def write(tmp: str) -> None:
    tf.saved_model.save(module, tmp, signatures={"serving_default": serve})
    os.makedirs(os.path.join(tmp, "assets.extra"), exist_ok=True)
    with open(os.path.join(tmp, JASP_JSON), "w") as f:
      json.dump(meta, f, indent=1, sort_keys=True)

  check = None
  if validate:
    want = _validate.reference(bound.apply, bound.params, bound.inputs)
    rtol = _validate.default_rtol(want) if rtol is None else rtol
    check = lambda tmp: _validated(tmp, bound.inputs, want, rtol, pruned)
  _validate.deliver(path, write, check)
  return path


def _tf_variables(tf, params: PyTree) -> tuple[dict, list, Any]:
  """``(nested dict of tf.Variables by flax path, the variables in leaf order, treedef)``."""
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  nested: dict = {}
  tf_vars = []
  for p, leaf in flat:
    keys = _tree.path_str(p).split("/")
    v = tf.Variable(np.asarray(jax.device_get(leaf)), trainable=False, name=_var_name(keys[-1]))
    node = nested
    for k in keys[:-1]:
      node = node.setdefault(k, {})
    node[keys[-1]] = v
    tf_vars.append(v)
  return nested, tf_vars, treedef


def _tf_module(tf, bound, dynamic_batch: bool):
  """``(tf.Module holding the params as variables, its serve tf.function)``."""
  from jax.experimental import jax2tf

  nested, tf_vars, treedef = _tf_variables(tf, bound.params)

  def apply_flat(leaves, *xs):
    return bound.apply(jax.tree_util.tree_unflatten(treedef, leaves), *xs)

  poly = None
  if dynamic_batch:
    poly = [None] + ["(b, ...)" if np.ndim(x) else None for x in bound.inputs]
  converted = jax2tf.convert(apply_flat, with_gradient=False, polymorphic_shapes=poly)
  sig = []
  for x in bound.inputs:
    shape = list(np.shape(x))
    if dynamic_batch and shape:
      shape[0] = None
    sig.append(tf.TensorSpec(shape, tf.as_dtype(np.dtype(x.dtype))))

  module = tf.Module()
  setattr(module, VAR_PREFIX, nested)

  @tf.function(autograph=False, input_signature=sig)
  def serve(*xs):
    return converted(tf_vars, *xs)

  module.serve = serve
  return module, serve


def _validated(tmp: str, inputs, want, rtol: float, pruned: dict[str, bool]) -> None:
  """The checks of :mod:`jasp.export._validate` on the SavedModel written at ``tmp``."""
  try:
    got = run_saved_model(tmp, *inputs)
  except Exception as e:  # noqa: BLE001 - TensorFlow raises many error classes
    raise _validate.ExportError(
      f"TensorFlow cannot load or run the SavedModel: {type(e).__name__}: {e}"
    ) from None
  _validate.compare_outputs("TensorFlow", got, want, rtol)
  _validate.check_pruned(_check.check_file(tmp, format="savedmodel", require_weights=False), pruned)


def run_saved_model(path: str | os.PathLike, *inputs: Any) -> list[np.ndarray]:
  """Loads a SavedModel written by :func:`to_saved_model` and runs its ``serve`` on ``inputs``.

  Returns:
    The outputs as a list of numpy arrays (flattened in pytree order).
  """
  tf = require("tensorflow")
  loaded = tf.saved_model.load(os.fspath(path))
  out = loaded.serve(*[tf.constant(np.asarray(x)) for x in inputs])
  return [np.asarray(o) for o in tf.nest.flatten(out)]
