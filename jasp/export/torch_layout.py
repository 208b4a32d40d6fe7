"""Flax params <-> a PyTorch-layout state dict (numpy), and ``.safetensors`` files.

No PyTorch is needed: the state dict holds numpy arrays in PyTorch's layouts,
and files are written with ``safetensors.numpy``. Layouts:

| flax | PyTorch | N:M groups |
| --- | --- | --- |
| ``Dense`` kernel ``(in, out)`` | ``Linear.weight (out, in)`` | axis 1 |
| ``Conv`` kernel ``(*spatial, in/groups, out)`` (1-, 2-, 3-D) | ``Conv{1,2,3}d.weight (out, in/groups, *spatial)`` (``KCRS``) | axis 1 |
| ``DenseGeneral``/attention kernel ``(*in_axes, *out_axes)`` | ``(prod(out_axes), prod(in_axes))`` | axis 1 |
| anything else (bias, norm scale, embedding ``(num, dim)``) | unchanged | – |

Which leaf is which comes from its :class:`jasp.Layout` (pass
``layouts=jasp.trace_layouts(...)``; without, flax's naming conventions).
Names follow PyTorch's: ``params/Dense_0/kernel`` -> ``Dense_0.weight``
(``kernel``, ``scale`` and ``embedding`` become ``weight``; BatchNorm's
``mean``/``var`` become ``running_mean``/``running_var``; the linen
``params``/``batch_stats`` collection prefix is dropped). Masks travel with
their weights, converted the same way, as ``<module>.weight_mask`` (the name
``torch.nn.utils.prune`` uses) or, with ``apex_masks=True``, as apex ASP's
``<module>.__weight_mma_mask`` buffers.

The conversion is exactly invertible (:func:`from_torch_state_dict`), given
the flax params (or their shapes) as a template.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from jasp import _tree
from jasp import layouts as layouts_lib
from jasp import masks as masks_lib
from jasp import packing
from jasp import policy as policy_lib
from jasp.export._deps import require
from jasp.typing import PyTree

__all__ = [
  "torch_weight",
  "flax_weight",
  "torch_key",
  "to_torch_state_dict",
  "from_torch_state_dict",
  "save_safetensors",
  "load_safetensors",
  "SAFETENSORS_METADATA_KEY",
]

SAFETENSORS_METADATA_KEY = "jasp"
_RENAME = {"kernel": "weight", "scale": "weight", "embedding": "weight"}
_STATS = {"mean": "running_mean", "var": "running_var"}
_COLLECTIONS = ("params", "batch_stats")


@dataclasses.dataclass(frozen=True)
class _Plan:
  """How one leaf maps to PyTorch: ``torch = reshape(transpose(w, perm), shape)``."""

  kind: str  # "dot" | "conv" | "none"
  perm: tuple[int, ...]
  shape: tuple[int, ...]


def _plan_axes(
  shape: tuple[int, ...], layout: layouts_lib.Layout, what: str
) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """``(input axes, output axes)`` of ``layout``, normalised; raises unless they fit ``shape``."""
  nd = len(shape)
  axis, out = tuple(layout.axis), tuple(layout.out_axes)
  bad = [a for a in axis + out if not isinstance(a, (int, np.integer)) or not -nd <= a < nd]
  if bad or len(set(a % nd for a in axis + out)) != len(axis + out):
    raise ValueError(
      f"the layout of {what} (axis {axis}, out_axes {out}) does not fit its "
      f"shape {shape}: the axes must be distinct axes of a rank-{nd} array. Pass "
      "the layouts traced on these params (jasp.trace_layouts)."
    )
  axis, out = tuple(a % nd for a in axis), tuple(a % nd for a in out)
  if not out:
    raise ValueError(
      f"the {layout.kind} weight {what} (shape {shape}) has no output axes "
      "in its layout; PyTorch's (out, in) layout needs them."
    )
  return axis, out


def _plan(shape: tuple[int, ...], layout: layouts_lib.Layout | None, path: str = "") -> _Plan:
  """How a leaf of ``shape`` with ``layout`` maps to PyTorch's layout.

  Raises:
    ValueError: the layout's axes do not fit ``shape``, it has no output
      axes, or a dot weight has batch axes.
  """
  nd = len(shape)
  what = f"'{path}'" if path else "the weight"
  if layout is None or layout.axis is None or layout.kind not in ("dot", "conv"):
    return _Plan("none", tuple(range(nd)), tuple(shape))
  axis, out = _plan_axes(shape, layout, what)
  rest = tuple(a for a in range(nd) if a not in axis and a not in out)
  if layout.kind == "dot" and rest:
    raise ValueError(
      f"the dot weight {what} (shape {shape}) has batch axes {rest} besides "
      f"its input axes {axis} and output axes {out}; it has no PyTorch layout."
    )
  size = lambda axes: int(np.prod([shape[a] for a in axes], dtype=np.int64))
  perm = out + axis + rest
  tshape = (size(out), size(axis)) + tuple(shape[a] for a in rest)
  return _Plan(layout.kind, perm, tshape)


def torch_weight(w: np.ndarray, layout: layouts_lib.Layout | None) -> np.ndarray:
  """One flax array in PyTorch's layout (see the module table).

  Args:
    w: the flax leaf (any dtype), e.g. a Dense kernel ``(in, out)``.
    layout: its :class:`jasp.Layout` (``axis`` = input axes, ``out_axes``);
      None or a non-weight layout returns ``w`` unchanged.

  Returns:
    ``(out, in)`` for a dot weight (input and output axes each flattened
    row-major), ``(out, in, *spatial)`` for a conv weight; a numpy array.
  """
  w = np.asarray(w)
  p = _plan(w.shape, layout)
  return np.ascontiguousarray(np.transpose(w, p.perm).reshape(p.shape))


def flax_weight(
  t: np.ndarray, shape: tuple[int, ...], layout: layouts_lib.Layout | None
) -> np.ndarray:
  """The inverse of :func:`torch_weight`: a PyTorch-layout array back to flax's ``shape``."""
  t = np.asarray(t)
  shape = tuple(shape)
  p = _plan(shape, layout)
  if tuple(t.shape) != p.shape:
    raise ValueError(
      f"expected a PyTorch-layout array of shape {p.shape} for the flax shape "
      f"{shape}, got {tuple(t.shape)}."
    )
  mid = tuple(shape[a] for a in p.perm)
  inv = tuple(int(i) for i in np.argsort(p.perm))
  return np.ascontiguousarray(np.transpose(t.reshape(mid), inv))


def torch_key(path: str) -> str:
  """The PyTorch state-dict key of a flax path (``params/Dense_0/kernel`` -> ``Dense_0.weight``).

  Raises:
    TypeError: ``path`` is not a string.
  """
  if not isinstance(path, str):
    raise TypeError(
      f"torch_key takes a path string such as 'params/Dense_0/kernel', got "
      f"{type(path).__name__} {path!r}."
    )
  parts = path.split("/")
  stats = False
  if len(parts) > 1 and parts[0] in _COLLECTIONS:
    stats = parts[0] == "batch_stats"
    parts = parts[1:]
  leaf = parts[-1]
  if leaf in _STATS and (stats or len(parts) > 1):
    leaf = _STATS[leaf]
  else:
    leaf = _RENAME.get(leaf, leaf)
  return ".".join(parts[:-1] + [leaf])


def _mask_key(key: str, apex: bool) -> str:
  module, _, name = key.rpartition(".")
  name = f"__{name}_mma_mask" if apex else f"{name}_mask"
  return f"{module}.{name}" if module else name


def _layout(path: str, leaf: Any, layouts: Mapping[str, layouts_lib.Layout] | None):
  if layouts is not None and path in layouts:
    layout = layouts[path]
    if not isinstance(layout, layouts_lib.Layout):
      raise TypeError(
        f"layouts['{path}'] is {layout!r} ({type(layout).__name__}), not a "
        "jasp.Layout; pass layouts=jasp.trace_layouts(...)."
      )
    return layout
  return layouts_lib.convention_layout(path, leaf)


_PARAMS = "params/"


def _match_masks(masks: PyTree | None, paths: list[str]) -> dict[str, Any]:
  """``{param path: mask}`` for ``paths``, from masks of the same tree or of its ``params``.

  Masks of a linen variables dict match params that are its ``params``
  collection, and the other way round (the paths differ by ``params/``).

  Raises:
    ValueError: a mask (not None) matches no leaf of the params, naming the
      unmatched mask paths.
  """
  if masks is None:
    return {}
  by_path = _tree.leaves_by_path(masks, keep_none=True)
  out, used = {}, set()
  for path in paths:
    cands = [path, _PARAMS + path]
    if path.startswith(_PARAMS):
      cands.append(path[len(_PARAMS) :])
    key = next((c for c in cands if c in by_path), None)
    if key is not None:
      used.add(key)
      out[path] = by_path[key]
  unmatched = [p for p, mk in by_path.items() if mk is not None and p not in used]
  if unmatched:
    shown = ", ".join(f"'{p}'" for p in unmatched[:3])
    more = f" and {len(unmatched) - 3} more" if len(unmatched) > 3 else ""
    raise ValueError(
      f"{len(unmatched)} mask(s) match no leaf of the params: {shown}{more} (the params have "
      f"e.g. {', '.join(repr(p) for p in paths[:2]) or 'no leaves'}). Pass the masks that "
      "jasp.prune returned for these params (of the whole variables dict or of its 'params' "
      "collection)."
    )
  return out


def _host_mask(path: str, mask: Any, shape: tuple[int, ...]) -> np.ndarray:
  """A mask leaf as a numpy bool array of ``shape``, checked."""
  if isinstance(mask, packing.PackedMask):
    mask = packing.unpack(mask)
  dtype = getattr(mask, "dtype", None)
  if dtype is None:
    raise TypeError(
      f"the mask for '{path}' is a {type(mask).__name__}, not an array; a mask is "
      "a bool array, a jasp.PackedMask or None (dense)."
    )
  if not _tree.is_bool_dtype(dtype):
    raise TypeError(
      f"the mask for '{path}' has dtype {dtype}; masks are bool arrays (True = "
      "kept): pass mask.astype(bool), or the masks from jasp.prune."
    )
  mw = np.asarray(jax.device_get(mask))
  if mw.shape != tuple(shape):
    raise ValueError(
      f"the mask for '{path}' has shape {mw.shape} but the leaf has shape {tuple(shape)}."
    )
  return mw


def _numeric(leaf) -> bool:
  dt = getattr(leaf, "dtype", None)
  if dt is None:
    return False
  try:
    return np.dtype(dt).kind in "biuf" or str(dt) in ("bfloat16", "float8_e4m3fn", "float8_e5m2")
  except TypeError:  # extended dtypes (PRNG keys)
    return False


def to_torch_state_dict(
  params: PyTree,
  *,
  layouts: Mapping[str, layouts_lib.Layout] | None = None,
  masks: PyTree | None = None,
  apex_masks: bool = False,
) -> tuple[dict[str, np.ndarray], dict[str, dict]]:
  """Converts a flax params pytree to a PyTorch-layout state dict.

  Args:
    params: linen variables (``{"params": ..., "batch_stats": ...}``), an
      ``nnx.State`` or any pytree of arrays. Non-numeric leaves (PRNG keys)
      are left out.
    layouts: ``{path: Layout}`` (from :func:`jasp.trace_layouts`); leaves not in
      it use flax's conventions (:func:`jasp.convention_layout`).
    masks: the masks pytree from :func:`jasp.prune` (None: no masks written),
      of ``params`` itself or, when ``params`` is a linen variables dict, of its
      ``params`` collection (or the other way round); bool arrays or
      :class:`jasp.PackedMask` leaves.
    apex_masks: name masks ``<module>.__weight_mma_mask`` (apex ASP) instead of
      ``<module>.weight_mask``.

  Returns:
    ``(state_dict, info)``: ``{key: numpy array}`` in PyTorch layouts (masks
    as bool arrays), and ``{key: {"path", "shape", "kind", "axis", "out_axes",
    "pruned"}}`` describing each converted leaf (``shape`` is the flax shape).

  Raises:
    ValueError: if two leaves map to the same key, a weight has no PyTorch
      layout or its layout does not fit it (naming the path and shape), a mask
      matches no leaf (naming the mask paths) or has another shape than its
      leaf, or ``layouts`` matches no leaf (see :func:`jasp.policy.plan`).
    TypeError: ``layouts`` is not a mapping of Layouts, or a mask is not a
      bool array or PackedMask (naming the path).
  """
  leaves = _tree.leaves_by_path(params)
  policy_lib.check_layouts(leaves, layouts, warn=False)
  mask_by_path = _match_masks(masks, list(leaves))
  state: dict[str, np.ndarray] = {}
  info: dict[str, dict] = {}
  origin: dict[str, str] = {}
  for path, leaf in leaves.items():
    if not _numeric(leaf):
      continue
    key = torch_key(path)
    if key in origin:
      raise ValueError(
        f"the leaves '{origin[key]}' and '{path}' both map to the PyTorch key '{key}'."
      )
    origin[key] = path
    w = np.asarray(jax.device_get(leaf))
    layout = _layout(path, leaf, layouts)
    p = _plan(w.shape, layout, path)
    state[key] = np.ascontiguousarray(np.transpose(w, p.perm).reshape(p.shape))
    mk = mask_by_path.get(path)
    info[key] = {
      "path": path,
      "shape": list(w.shape),
      "kind": p.kind,
      "axis": list(layout.axis) if p.kind != "none" else None,
      "out_axes": list(layout.out_axes) if p.kind != "none" else None,
      "pruned": mk is not None,
    }
    if mk is not None:
      mkey = _mask_key(key, apex_masks)
      if mkey in origin:
        raise ValueError(
          f"the mask of '{path}' maps to '{mkey}', which is taken by '{origin[mkey]}'."
        )
      origin[mkey] = path
      mw = _host_mask(path, mk, w.shape)
      state[mkey] = np.ascontiguousarray(np.transpose(mw, p.perm).reshape(p.shape))
  return state, info


def _layout_of(key: str, entry: Mapping[str, Any]) -> layouts_lib.Layout | None:
  if not isinstance(entry, Mapping):
    raise ValueError(
      f"the info of '{key}' is {entry!r}, not a mapping with 'kind', 'axis' and "
      "'out_axes' (as to_torch_state_dict returns)."
    )
  if entry.get("kind", "none") == "none":
    return None
  try:
    return layouts_lib.Layout(tuple(entry["axis"]), tuple(entry["out_axes"]), kind=entry["kind"])
  except (KeyError, TypeError):
    raise ValueError(
      f"the info of '{key}' ({dict(entry)}) lacks a list 'axis' or 'out_axes' for "
      f"its kind '{entry['kind']}'; pass the info that to_torch_state_dict "
      "returned (or the file's metadata)."
    ) from None


def from_torch_state_dict(
  state_dict: Mapping[str, Any],
  like: PyTree,
  *,
  layouts: Mapping[str, layouts_lib.Layout] | None = None,
  info: Mapping[str, Mapping[str, Any]] | None = None,
) -> PyTree:
  """The inverse of :func:`to_torch_state_dict`: PyTorch-layout arrays back into flax's tree.

  Args:
    state_dict: ``{key: array}`` as written by :func:`to_torch_state_dict`
      (extra keys such as masks are ignored).
    like: a params pytree with the target structure and shapes (arrays or
      ``jax.ShapeDtypeStruct``); its leaves are replaced.
    layouts: as given to :func:`to_torch_state_dict`.
    info: the ``info`` it returned (or a file's metadata); when given, its
      recorded layouts win over ``layouts``.

  Returns:
    A pytree with ``like``'s structure holding numpy arrays in flax layouts
    (cast to ``like``'s dtypes).

  Raises:
    KeyError: naming the first leaf whose key is missing.
  """

  def one(path, leaf):
    if not _numeric(leaf):
      return leaf
    key = torch_key(path)
    if key not in state_dict:
      raise KeyError(
        f"the state dict has no '{key}' (for the leaf '{path}', shape {tuple(leaf.shape)})."
      )
    if info is not None and key in info:
      layout = _layout_of(key, info[key])
    else:
      layout = _layout(path, leaf, layouts)
    w = flax_weight(np.asarray(state_dict[key]), tuple(leaf.shape), layout)
    return w.astype(leaf.dtype)

  return _tree.map_with_path(one, like)


def save_safetensors(
  path: str | os.PathLike,
  params: PyTree,
  *,
  layouts: Mapping[str, layouts_lib.Layout] | None = None,
  masks: PyTree | None = None,
  apex_masks: bool = False,
  n: int = 2,
  m: int = 4,
) -> dict[str, dict]:
  """Writes :func:`to_torch_state_dict` to a ``.safetensors`` file.

  The header's metadata holds ``{"format": "pt"}`` (what PyTorch loaders
  expect) and, under ``"jasp"``, JSON with the pattern and the ``info`` of
  each key, so :func:`load_safetensors` restores exactly and
  :func:`jasp.export.check_file` knows which weights must be N:M.

  Returns:
    The ``info`` dict (see :func:`to_torch_state_dict`).

  Raises:
    MissingDependencyError: without ``safetensors`` (``pip install 'jasp[safetensors]'``).
    ValueError, TypeError: as :func:`to_torch_state_dict` (masks that match no
      leaf, a mismatch between ``layouts`` and ``params``), or invalid ``n``/``m``.
  """
  masks_lib.check_nm(n, m)
  st = require("safetensors.numpy")
  state, info = to_torch_state_dict(params, layouts=layouts, masks=masks, apex_masks=apex_masks)
  meta = {
    "format": "pt",
    SAFETENSORS_METADATA_KEY: json.dumps(
      {
        "producer": "jasp.export.save_safetensors",
        "n": n,
        "m": m,
        "layout": "torch",
        "mask_naming": "apex" if apex_masks else "torch",
        "weights": info,
      },
      sort_keys=True,
    ),
  }
  st.save_file(state, os.fspath(path), metadata=meta)
  return info


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """``(tensors, header metadata)`` of a ``.safetensors`` file, as numpy."""
  safetensors = require("safetensors")
  path = os.fspath(path)
  with safetensors.safe_open(path, framework="numpy") as f:
    meta = dict(f.metadata() or {})
    tensors = {k: f.get_tensor(k) for k in f.keys()}
  return tensors, meta


def load_safetensors(
  path: str | os.PathLike,
  like: PyTree = None,
  *,
  layouts: Mapping[str, layouts_lib.Layout] | None = None,
) -> Any:
  """Reads a ``.safetensors`` state dict.

  Args:
    path: the file.
    like: a flax params template: when given, the result is that pytree in
      flax layouts (:func:`from_torch_state_dict`, using the file's recorded
      layouts when it was written by :func:`save_safetensors`).
    layouts: layouts for files without jasp's metadata.

  Returns:
    ``{key: numpy array}`` (PyTorch layouts) when ``like`` is None, else the
    flax pytree.
  """
  tensors, meta = read_safetensors(path)
  if like is None:
    return tensors
  info = None
  if SAFETENSORS_METADATA_KEY in meta:
    info = json.loads(meta[SAFETENSORS_METADATA_KEY]).get("weights")
  return from_torch_state_dict(tensors, like, layouts=layouts, info=info)
