"""Checks the N:M pattern on the weights stored in an exported file.

What each format tells about the axis a consumer reduces over:

* ``.onnx``: the graph itself. Every initializer (or ``Constant``) is followed
  through ``Identity``/``Cast``/``Transpose``/``Reshape``/``Squeeze``/
  ``Unsqueeze``/``Flatten``/``DequantizeLinear`` to the ``MatMul``, ``Gemm`` or
  ``Conv`` that consumes it, and the reduction axis is read there, mapped back
  to the stored tensor's own axes: ``MatMul`` reduces its B operand ``(..., K,
  N)`` along ``-2`` and its A operand ``(..., M, K)`` along ``-1``; ``Gemm``
  its B along 0, or along 1 with ``transB=1`` (A: 1, or 0 with ``transA=1``);
  ``Conv`` its ``W (K, C/group, R, S ...)`` along ``C/group`` (axis 1; apex's
  and TensorRT's ``KCRS`` rule: for each ``k, r, s``, every ``m`` consecutive
  ``c``); ``ConvTranspose`` its ``W (C, K/group, ...)`` along axis 0.
* TensorFlow SavedModel (written by :func:`jasp.export.to_saved_model`): the
  variables in flax layouts, with the traced axes recorded in
  ``assets.extra/jasp.json``; other SavedModels use flax's/Keras's naming
  conventions (``kernel (in, out)``, conv ``(*spatial, in, out)``).
* ``.safetensors``: PyTorch layouts (``weight (out, in)`` / ``(K, C, R, S)``:
  axis 1), or the layouts recorded by :func:`jasp.export.save_safetensors`.
* flax ``msgpack`` and orbax checkpoints: the leaf paths, by flax's
  conventions (:func:`jasp.convention_layout`); ``opt_state`` subtrees are
  skipped.

Which weights are *expected* to be N:M (the exit status depends on them):

1. with ``expect_sparse`` (regular expressions, ``re.search`` on the weight's
   name or its flax path): exactly the weights that match;
2. otherwise the union of: the weights the file's jasp metadata marks as
   pruned; the weights that carry a mask in the file (apex's
   ``__weight_mma_mask`` or ``weight_mask`` tensors; a ``masks`` subtree of a
   checkpoint); and every weight with at least ``min_zeros`` exact zeros
   (default ``0.8 * (m - n) / m``, 40% for 2:4): a weight that looks pruned
   must carry the pattern.

A weight whose reduction size is not a multiple of ``m`` (or a depthwise
conv) cannot hold the pattern: it is reported ``n/a``, and fails only if
expected.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any

import numpy as np

from jasp.export import _nm
from jasp.export import _onnx_graph
from jasp.export._deps import MissingDependencyError
from jasp.export._deps import require

__all__ = ["CheckError", "WeightCheck", "CheckReport", "check_file", "check_onnx",
           "check_params", "detect_format", "FORMATS"]

FORMATS = ("onnx", "savedmodel", "safetensors", "msgpack", "orbax")


class CheckError(ValueError):
  """The file cannot be checked: missing, corrupt or of an unsupported format."""


@dataclasses.dataclass(frozen=True)
class WeightCheck:
  """One weight of a checked file.

  Attributes:
    name: its name in the file (ONNX initializer, variable path, tensor key).
    param: the flax path it came from, when the file records it.
    shape, dtype: as stored in the file.
    consumer: what reads it (``Gemm(transB=1)``, ``MatMul[B]``,
      ``Conv(group=2)``, ``linear``, ``conv``, ``dot`` ...).
    axis: the reduction axes in the stored tensor (consecutive, flattened
      row-major); None when unknown.
    applicable: whether the axes' size is a multiple of ``m``.
    nm: whether the weight is N:M along ``axis`` (along every consumer's axes).
    groups, bad_groups: groups of ``m`` and those over ``n`` non-zeros.
    zero_fraction: fraction of exact zeros.
    expected: whether the weight must be N:M (see the module doc).
    expected_by: why: ``regex``, ``metadata``, ``mask`` or ``zeros``.
    note: diagnosis (e.g. the axes it *is* N:M along, when not the consumer's).
  """
  name: str
  param: str | None
  shape: tuple[int, ...]
  dtype: str
  consumer: str
  axis: tuple[int, ...] | None
  applicable: bool
  nm: bool
  groups: int
  bad_groups: int
  zero_fraction: float
  expected: bool
  expected_by: str
  note: str = ""

  @property
  def ok(self) -> bool:
    return self.nm or not self.expected

  @property
  def status(self) -> str:
    if self.expected and not self.nm:
      return "FAIL"
    if self.nm:
      return "N:M"
    return "dense" if self.applicable else "n/a"


@dataclasses.dataclass(frozen=True)
class CheckReport:
  """The checker's verdict on one file; ``str()`` is a table, ``to_json()`` for machines."""
  path: str
  format: str
  n: int
  m: int
  weights: tuple[WeightCheck, ...]
  rule: str

  @property
  def ok(self) -> bool:
    """Every expected weight is N:M along its consumer's reduction axis."""
    return all(w.ok for w in self.weights)

  @property
  def failures(self) -> tuple[WeightCheck, ...]:
    return tuple(w for w in self.weights if not w.ok)

  def by_name(self) -> dict[str, WeightCheck]:
    return {w.name: w for w in self.weights}

  def by_param(self) -> dict[str, WeightCheck]:
    return {w.param: w for w in self.weights if w.param}

  def summary(self) -> str:
    nm = sum(w.nm for w in self.weights)
    exp = sum(w.expected for w in self.weights)
    verdict = "OK" if self.ok else f"FAILED: {len(self.failures)} expected weight(s) not {self.n}:{self.m}"
    return (f"{self.path} ({self.format}): {len(self.weights)} weight(s), {nm} {self.n}:{self.m} "
            f"along the consumer's reduction axis, {exp} expected sparse; {verdict}")

  def format_table(self) -> str:
    head = ("weight", "param", "shape", "consumer", "axis", f"{self.n}:{self.m}", "zeros",
            "expected", "status", "note")
    rows = []
    for w in self.weights:
      nm = "yes" if w.nm else ("-" if not w.applicable else f"no ({w.bad_groups}/{w.groups} groups)")
      rows.append((w.name, w.param or "-", "x".join(map(str, w.shape)) or "()", w.consumer,
                   "-" if w.axis is None else ",".join(map(str, w.axis)), nm,
                   f"{100 * w.zero_fraction:.1f}%",
                   f"yes ({w.expected_by})" if w.expected else "no", w.status, w.note))
    lines = [self.summary(), f"expected sparse: {self.rule}"]
    if rows:
      widths = [max(len(str(r[i])) for r in rows + [head]) for i in range(len(head))]
      fmt = lambda r: "  ".join(str(c).ljust(wd) for c, wd in zip(r, widths)).rstrip()
      lines += [fmt(head), fmt(tuple("-" * wd for wd in widths))] + [fmt(r) for r in rows]
    return "\n".join(lines)

  def __str__(self) -> str:
    return self.format_table()

  def to_dict(self) -> dict:
    return {"path": self.path, "format": self.format, "n": self.n, "m": self.m,
            "ok": self.ok, "rule": self.rule,
            "weights": [dict(dataclasses.asdict(w), status=w.status, ok=w.ok)
                        for w in self.weights]}

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=1)


@dataclasses.dataclass
class _Candidate:
  """A weight found in a file, before the N:M verdict."""
  name: str
  array: np.ndarray
  consumer: str
  axes: list[tuple[int, ...]]  # one entry per consumer (empty: unknown)
  param: str | None = None
  marked: str = ""  # "metadata" | "mask" when the file says it was pruned
  note: str = ""
  mask: np.ndarray | None = None


def _verdict(c: _Candidate, n: int, m: int, regexes: Sequence[str],
             min_zeros: float) -> WeightCheck:
  w = c.array
  z = _nm.zero_fraction(w)
  notes = [c.note] if c.note else []
  axes_list = list(dict.fromkeys(c.axes))
  applicable, nm, groups, bad = False, False, 0, 0
  if axes_list:
    stats = [_nm.nm_stats(w, ax, n, m) for ax in axes_list]
    applicable = all(s.applicable for s in stats)
    nm = applicable and all(s.nm for s in stats)
    groups = sum(s.groups for s in stats)
    bad = sum(s.bad_groups for s in stats)
    if len(axes_list) > 1:
      notes.append("consumed along several axes: " + "; ".join(
          ",".join(map(str, a)) for a in axes_list))
    if not applicable:
      k = [int(np.prod([w.shape[a] for a in ax])) for ax in axes_list]
      notes.append(f"reduction size {k[0] if len(k) == 1 else k} is not a multiple of {m}")
    elif not nm and z > 0:
      other = _nm.nm_axes(w, n, m, skip=[a for ax in axes_list for a in ax])
      if other:
        notes.append(f"{n}:{m} along axis {','.join(map(str, other))} instead: "
                     "the wrong axis for this consumer")
  if c.mask is not None:
    outside = int(np.count_nonzero((w != 0) & ~c.mask.astype(bool)))
    if outside:
      nm = False
      notes.append(f"{outside} non-zero(s) where its mask is False")
  if regexes:
    expected = any(re.search(r, c.name) or (c.param and re.search(r, c.param)) for r in regexes)
    by = "regex" if expected else ""
  elif c.marked:
    expected, by = True, c.marked
  elif z >= min_zeros:
    expected, by = True, "zeros"
  else:
    expected, by = False, ""
  return WeightCheck(
      name=c.name, param=c.param, shape=tuple(int(d) for d in w.shape), dtype=str(w.dtype),
      consumer=c.consumer, axis=axes_list[0] if axes_list else None, applicable=applicable,
      nm=bool(nm), groups=groups, bad_groups=bad, zero_fraction=z, expected=bool(expected),
      expected_by=by, note="; ".join(notes))


def _report(path: str, fmt: str, cands: list[_Candidate], n: int, m: int,
            expect_sparse: str | Sequence[str] | None, min_zeros: float | None) -> CheckReport:
  from jasp.masks import _check_nm  # pylint: disable=g-import-not-at-top
  try:
    _check_nm(n, m)
  except (TypeError, ValueError) as e:
    raise CheckError(str(e)) from None
  regexes = [expect_sparse] if isinstance(expect_sparse, str) else list(expect_sparse or ())
  for r in regexes:
    try:
      re.compile(r)
    except re.error as e:
      raise CheckError(f"--expect-sparse {r!r} is not a valid regular expression: {e}") from None
  if min_zeros is None:
    min_zeros = 0.8 * (m - n) / m
  if regexes:
    rule = "weights matching " + " or ".join(repr(r) for r in regexes)
  else:
    rule = (f"weights the file marks as pruned (metadata or masks), and any weight with "
            f">= {100 * min_zeros:.0f}% zeros")
  weights = tuple(_verdict(c, n, m, regexes, min_zeros) for c in cands)
  return CheckReport(path, fmt, n, m, weights, rule)


# ----------------------------------------------------------------------------
# ONNX.

def _onnx_candidates(model) -> tuple[list[_Candidate], dict]:
  from onnx import numpy_helper  # pylint: disable=g-import-not-at-top
  from onnx import shape_inference  # pylint: disable=g-import-not-at-top
  shapes = {}
  try:
    inferred = shape_inference.infer_shapes(model).graph
    for g in _onnx_graph.all_graphs(inferred):
      for vi in list(g.value_info) + list(g.output) + list(g.input):
        dims = [d.dim_value if d.HasField("dim_value") else None
                for d in vi.type.tensor_type.shape.dim]
        shapes.setdefault(vi.name, dims)
  except Exception:  # pylint: disable=broad-except
    pass  # shapes of intermediate values stay unknown: a Concat of them is not followed
  meta = {}
  for e in model.metadata_props:
    if e.key == "jasp":
      try:
        meta = json.loads(e.value)
      except ValueError:
        meta = {}
  recorded = meta.get("weights", {}) if isinstance(meta, dict) else {}
  walker = _onnx_graph.WeightUses(model.graph, shapes)
  cands = []
  for graph, name, t in walker.constants():
    if len(t.dims) < 1:
      continue
    shape = tuple(int(d) for d in t.dims)
    uses = walker.follow(graph, name, shape)
    mm = [(lbl, ax) for lbl, ax in uses if ax is not None]
    if not mm:
      continue
    others = sorted({lbl for lbl, ax in uses if ax is None})
    arr = numpy_helper.to_array(t)
    axes = [tuple(sorted(ax)) for _, ax in mm if ax]
    labels = list(dict.fromkeys(lbl for lbl, _ in mm))
    rec = recorded.get(name, {})
    param = rec.get("path")
    if param is not None and rec.get("layer"):
      param = f"{param}[{','.join(str(i) for i in rec['layer'])}]"
    note = ("also used by " + ", ".join(others)) if others else ""
    if any(not ax for _, ax in mm):
      note = "; ".join(x for x in (note, "depthwise: no channel groups") if x)
    cands.append(_Candidate(name, arr, ", ".join(labels), axes, param,
                            "metadata" if rec.get("pruned") else "", note))
  return cands, meta


def check_onnx(model_or_path: Any, *, n: int | None = None, m: int | None = None,
               expect_sparse: str | Sequence[str] | None = None,
               min_zeros: float | None = None) -> CheckReport:
  """Checks every weight that feeds a MatMul/Gemm/Conv of an ONNX model (see the module doc).

  Args:
    model_or_path: an ``onnx.ModelProto`` or a path to a ``.onnx`` file.
    n, m: the pattern (default: the file's jasp metadata, else 2:4).
    expect_sparse: regular expression(s) naming the weights that must be N:M.
    min_zeros: the zero fraction from which a weight must be N:M.

  Returns:
    A :class:`CheckReport`.
  """
  if isinstance(model_or_path, (str, os.PathLike)):
    return check_file(model_or_path, n=n, m=m, expect_sparse=expect_sparse,
                      min_zeros=min_zeros, format="onnx")
  require("onnx")
  path = "<model>"
  cands, meta = _onnx_candidates(model_or_path)
  n = n if n is not None else int(meta.get("n", 2))
  m = m if m is not None else int(meta.get("m", 4))
  return _report(path, "onnx", cands, n, m, expect_sparse, min_zeros)


# ----------------------------------------------------------------------------
# Pytrees (flax checkpoints), safetensors, SavedModel.

def _tree_candidates(flat: Mapping[str, Any], *,
                     layouts: Mapping[str, Any] | None = None) -> list[_Candidate]:
  from jasp import layouts as layouts_lib  # pylint: disable=g-import-not-at-top
  marks: dict[str, np.ndarray] = {}
  for p, x in flat.items():
    parts = p.split("/")
    if parts[0] == "masks" and np.asarray(x).dtype == np.bool_:
      marks["/".join(parts[1:])] = np.asarray(x)
  cands = []
  for p, x in flat.items():
    parts = p.split("/")
    if "opt_state" in parts or parts[0] == "masks":
      continue
    arr = np.asarray(x)
    if arr.dtype.kind not in "fV" or arr.ndim < 2:
      continue
    lay = layouts.get(p) if layouts is not None else None
    if lay is None:
      lay = layouts_lib.convention_layout(p, arr)
    if lay.axis is None:
      continue
    rel = "/".join(parts[1:]) if parts[0] == "params" else p
    mk = marks.get(rel, marks.get(p))
    if mk is not None and mk.shape != arr.shape:
      mk = None
    cands.append(_Candidate(p, arr, lay.kind, [tuple(lay.axis)], p,
                            "mask" if mk is not None else "", mask=mk))
  return cands


def check_params(params: Any, *, layouts: Mapping[str, Any] | None = None,
                 n: int = 2, m: int = 4, expect_sparse: str | Sequence[str] | None = None,
                 min_zeros: float | None = None, name: str = "<params>") -> CheckReport:
  """Checks a flax params pytree (or a restored checkpoint) by its leaf paths.

  Weights are the leaves that :func:`jasp.convention_layout` (or ``layouts``)
  says are matmul/conv kernels; ``opt_state`` subtrees are skipped; a
  ``masks`` subtree next to ``params`` marks the masked weights as expected.
  """
  from jasp import _tree  # pylint: disable=g-import-not-at-top
  flat = {p: np.asarray(x) for p, x in _tree.leaves_by_path(params).items()}
  return _report(name, "pytree", _tree_candidates(flat, layouts=layouts), n, m,
                 expect_sparse, min_zeros)


def _safetensors_candidates(path: str, layout: str | None):
  from jasp.export import torch_layout  # pylint: disable=g-import-not-at-top
  tensors, header = torch_layout.read_safetensors(path)
  meta = {}
  if torch_layout.SAFETENSORS_METADATA_KEY in header:
    try:
      meta = json.loads(header[torch_layout.SAFETENSORS_METADATA_KEY])
    except ValueError:
      meta = {}
  info = meta.get("weights", {}) if isinstance(meta, dict) else {}
  layout = layout or meta.get("layout", "torch")
  if layout == "flax":
    flat = {k.replace(".", "/"): v for k, v in tensors.items()}
    return _tree_candidates(flat), meta
  masks = {}
  for k, v in tensors.items():
    mod, _, leaf = k.rpartition(".")
    mm = re.fullmatch(r"__(.+)_mma_mask", leaf) or re.fullmatch(r"(.+)_mask", leaf)
    if mm:
      masks[f"{mod}.{mm.group(1)}" if mod else mm.group(1)] = v
  mask_keys = {k for k in tensors if k.endswith("_mask")}
  cands = []
  for k, v in tensors.items():
    if k in mask_keys:
      continue
    arr = np.asarray(v)
    rec = info.get(k)
    if rec is not None:
      if rec.get("kind", "none") == "none":
        continue
      kind = "linear" if rec["kind"] == "dot" else f"conv{arr.ndim - 2}d"
      param = rec.get("path")
    else:
      leaf = k.rpartition(".")[2]
      if arr.ndim < 2 or arr.dtype.kind not in "fV" or leaf != "weight" or "embed" in k.lower():
        continue
      kind = "linear" if arr.ndim == 2 else f"conv{arr.ndim - 2}d"
      param = None
    mk = masks.get(k)
    if mk is not None and tuple(mk.shape) != arr.shape:
      mk = None
    marked = "metadata" if (rec or {}).get("pruned") else ("mask" if mk is not None else "")
    cands.append(_Candidate(k, arr, kind, [(1,)], param, marked, mask=mk))
  return cands, meta


def _unescape_tf(name: str) -> str:
  # TF object-graph keys escape "/" as ".S" and "." as "..".
  return re.sub(r"\.(S|\.)", lambda mt: "/" if mt.group(1) == "S" else ".", name)


def _savedmodel_candidates(path: str):
  tf = require("tensorflow")
  from jasp import layouts as layouts_lib  # pylint: disable=g-import-not-at-top
  from jasp.export._saved_model import JASP_JSON  # pylint: disable=g-import-not-at-top
  meta = {}
  jp = os.path.join(path, JASP_JSON)
  if os.path.exists(jp):
    with open(jp) as f:
      meta = json.load(f)
  prefix = meta.get("var_prefix")
  recorded = meta.get("weights", {})
  reader = tf.train.load_checkpoint(os.path.join(path, "variables", "variables"))
  suffix = "/.ATTRIBUTES/VARIABLE_VALUE"
  cands = []
  for key in sorted(reader.get_variable_to_shape_map()):
    if not key.endswith(suffix):
      continue
    name = key[:-len(suffix)]
    p = _unescape_tf(name)
    if prefix and p.startswith(prefix + "/"):
      p = p[len(prefix) + 1:]
    arr = np.asarray(reader.get_tensor(key))
    rec = recorded.get(p)
    if rec is not None:
      cands.append(_Candidate(name, arr, rec.get("kind", "dot"), [tuple(rec["axis"])], p,
                              "metadata" if rec.get("pruned") else ""))
      continue
    if arr.ndim < 2 or arr.dtype.kind != "f":
      continue
    lay = layouts_lib.convention_layout(p, arr)
    if lay.axis is not None:
      cands.append(_Candidate(name, arr, lay.kind, [tuple(lay.axis)], p))
  return cands, meta


def _read_msgpack(path: str):
  from flax import serialization  # pylint: disable=g-import-not-at-top

  from jasp import _tree  # pylint: disable=g-import-not-at-top
  with open(path, "rb") as f:
    data = f.read()
  tree = serialization.msgpack_restore(data)
  if not isinstance(tree, dict):
    raise CheckError(f"{path}: the msgpack data is a {type(tree).__name__}, not a flax state dict.")
  return {p: np.asarray(x) for p, x in _tree.leaves_by_path(tree).items()
          if hasattr(x, "dtype")}


_ORBAX_MARKERS = ("_CHECKPOINT_METADATA", "_METADATA", "manifest.ocdbt", "_sharding")


def _orbax_dir(path: str) -> str | None:
  """The orbax checkpoint directory at or under ``path`` (latest step, single item)."""
  if any(os.path.exists(os.path.join(path, mk)) for mk in _ORBAX_MARKERS):
    items = [d for d in sorted(os.listdir(path))
             if os.path.isdir(os.path.join(path, d)) and
             any(os.path.exists(os.path.join(path, d, mk)) for mk in _ORBAX_MARKERS[1:])]
    if not os.path.exists(os.path.join(path, "_METADATA")) and len(items) == 1:
      return os.path.join(path, items[0])  # a step directory holding one item
    return path
  steps = [d for d in os.listdir(path) if d.isdigit() and os.path.isdir(os.path.join(path, d))]
  if steps:
    return _orbax_dir(os.path.join(path, max(steps, key=int)))
  return None


def _read_orbax(path: str):
  ocp = require("orbax.checkpoint")
  from jasp import _tree  # pylint: disable=g-import-not-at-top
  d = _orbax_dir(path)
  if d is None:
    raise CheckError(f"{path}: not an orbax checkpoint directory (no _CHECKPOINT_METADATA, "
                     "_METADATA or step sub-directories).")
  import jax  # pylint: disable=g-import-not-at-top
  d = os.path.abspath(d)
  if not any(os.path.exists(os.path.join(d, mk)) for mk in _ORBAX_MARKERS[1:]):
    items = sorted(x for x in os.listdir(d) if os.path.isdir(os.path.join(d, x)))
    raise CheckError(f"{d}: an orbax step directory without one tree item to read "
                     f"(items: {', '.join(items) or 'none'}); pass the item's directory.")
  with ocp.PyTreeCheckpointer() as ckptr:
    try:  # restore as host numpy arrays: no devices, no sharding needed
      meta = ckptr.metadata(d)
      meta = getattr(meta, "item_metadata", None) or meta
      args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
                          getattr(meta, "tree", meta))
      tree = ckptr.restore(d, restore_args=args)
    except Exception:  # pylint: disable=broad-except
      tree = ckptr.restore(d)
  flat = {p: np.asarray(x) for p, x in _tree.leaves_by_path(tree).items() if hasattr(x, "dtype")}
  return flat, d


def detect_format(path: str) -> str:
  """The format of ``path``: one of :data:`FORMATS` (by name, then by content).

  Raises:
    CheckError: if the path does not exist or its format is not recognised.
  """
  if not os.path.exists(path):
    raise CheckError(f"{path}: no such file or directory.")
  if os.path.isdir(path):
    if os.path.exists(os.path.join(path, "saved_model.pb")) or os.path.exists(
        os.path.join(path, "saved_model.pbtxt")):
      return "savedmodel"
    if _orbax_dir(path) is not None:
      return "orbax"
    raise CheckError(f"{path}: a directory that is neither a TensorFlow SavedModel "
                     "(saved_model.pb) nor an orbax checkpoint.")
  ext = os.path.splitext(path)[1].lower()
  by_ext = {".onnx": "onnx", ".safetensors": "safetensors", ".msgpack": "msgpack",
            ".flax": "msgpack"}
  if ext in by_ext:
    return by_ext[ext]
  with open(path, "rb") as f:
    head = f.read(16)
  if len(head) >= 9 and head[8:9] == b"{":
    return "safetensors"
  if head[:1] in (b"\x80", b"\x81", b"\x82", b"\x83", b"\xde", b"\xdf"):
    return "msgpack"
  if head[:1] == b"\x08":  # an ONNX ModelProto starts with ir_version (field 1, varint)
    return "onnx"
  raise CheckError(f"{path}: unsupported file format (expected .onnx, a SavedModel directory, "
                   ".safetensors, a flax .msgpack or an orbax checkpoint directory).")


def check_file(path: str | os.PathLike, *, n: int | None = None, m: int | None = None,
               expect_sparse: str | Sequence[str] | None = None,
               min_zeros: float | None = None, format: str | None = None,
               layout: str | None = None) -> CheckReport:
  """Checks the N:M pattern of the weights stored in an exported file.

  Lists each weight that feeds a matmul/conv (or each kernel leaf of a
  checkpoint), the axis its consumer reduces over, whether it is N:M along it
  and its sparsity; see the module doc for the per-format rules and for what
  makes a weight *expected* sparse.

  Example::

    report = jasp.export.check_file("model.onnx")
    print(report)            # a table
    assert report.ok, report.failures

  Args:
    path: a ``.onnx`` file, a SavedModel directory, a ``.safetensors`` file, a
      flax ``.msgpack`` file or an orbax checkpoint directory.
    n, m: the pattern (default: the file's jasp metadata, else 2:4).
    expect_sparse: regular expression(s); when given, exactly the weights
      whose name or flax path matches must be N:M.
    min_zeros: without ``expect_sparse``, a weight with at least this fraction
      of zeros must be N:M (default ``0.8 * (m - n) / m``).
    format: force one of :data:`FORMATS` instead of detecting it.
    layout: for ``.safetensors`` without jasp metadata: ``"torch"`` (default)
      or ``"flax"``.

  Returns:
    A :class:`CheckReport` (``.ok``, ``.failures``, ``str()``, ``.to_json()``).

  Raises:
    CheckError: missing, corrupt or unsupported file (a clear message).
    MissingDependencyError: the format needs an optional package (the message
      names the pip extra).
  """
  path = os.fspath(path)
  fmt = format or detect_format(path)
  if fmt not in FORMATS:
    raise CheckError(f"unknown format {fmt!r}; one of {', '.join(FORMATS)}.")
  if not os.path.exists(path):
    raise CheckError(f"{path}: no such file or directory.")
  meta: dict = {}
  try:
    if fmt == "onnx":
      onnx = require("onnx")
      model = onnx.load(path)
      cands, meta = _onnx_candidates(model)
    elif fmt == "safetensors":
      cands, meta = _safetensors_candidates(path, layout)
    elif fmt == "savedmodel":
      cands, meta = _savedmodel_candidates(path)
    elif fmt == "msgpack":
      cands = _tree_candidates(_read_msgpack(path))
    else:
      flat, resolved = _read_orbax(path)
      cands = _tree_candidates(flat)
      if resolved != os.path.abspath(path):
        path = f"{path} ({os.path.relpath(resolved, path)})"
  except (CheckError, MissingDependencyError):
    raise
  except Exception as e:  # pylint: disable=broad-except
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    raise CheckError(f"{path}: cannot read it as {fmt} ({type(e).__name__}"
                     + (f": {msg[:300]}" if msg else "") + ").") from None
  n = n if n is not None else int(meta.get("n", 2))
  m = m if m is not None else int(meta.get("m", 4))
  return _report(path, fmt, cands, n, m, expect_sparse, min_zeros)
