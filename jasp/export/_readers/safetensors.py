"""Reads a ``.safetensors`` file: its header checked against the file, its weights by layout.

PyTorch layouts (``weight (out, in)`` / ``(K, C, R, S)``: reduced along axis
1) and apex's mask tensors (``__weight_mma_mask``, ``weight_mask``), or the
layouts recorded by :func:`jasp.export.save_safetensors`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from jasp.export import _safe_read
from jasp.export import torch_layout
from jasp.export._deps import require
from jasp.export._meta import is_int
from jasp.export._meta import jasp_meta
from jasp.export._meta import short
from jasp.export._meta import unverified
from jasp.export._readers import Found
from jasp.export._readers import tree as _tree_reader
from jasp.export._safe_read import Budget
from jasp.export._safe_read import CheckError
from jasp.export._verdict import Candidate

__all__ = ["header", "read"]

# safetensors dtypes and their sizes in bytes.
_ITEMSIZE = {
  "BOOL": 1,
  "U8": 1,
  "I8": 1,
  "F8_E5M2": 1,
  "F8_E4M3": 1,
  "I16": 2,
  "U16": 2,
  "F16": 2,
  "BF16": 2,
  "I32": 4,
  "U32": 4,
  "F32": 4,
  "I64": 8,
  "U64": 8,
  "F64": 8,
}
_MAX_HEADER = 100 << 20  # the format's own limit on the JSON header


def _header_json(path: str, budget: Budget) -> tuple[Any, int]:
  """``(decoded JSON header, number of data bytes after it)``."""
  size = _safe_read.regular_size(path)
  if size < 8:
    raise CheckError(
      f"{path}: {size} byte(s), shorter than a safetensors header's length field (8)."
    )
  hlen = int.from_bytes(_safe_read.read_bytes(path, budget, length=8, exact=True), "little")
  if hlen > size - 8 or hlen > _MAX_HEADER:
    raise CheckError(
      f"{path}: the safetensors header declares {hlen} bytes, but the file holds "
      f"{size - 8} after its length field (and at most {_MAX_HEADER} are "
      "allowed)."
    )
  decoded = _safe_read.loads_json(
    _safe_read.read_bytes(path, budget, offset=8, length=hlen, exact=True),
    f"{path}: safetensors header",
  )
  return decoded, size - 8 - hlen


def _check_entry(ent: Any, at: str, data: int) -> None:
  """One tensor's header entry: a known dtype, and offsets inside the data that fit its shape."""
  if not (
    isinstance(ent, dict)
    and isinstance(ent.get("dtype"), str)
    and isinstance(ent.get("shape"), list)
    and isinstance(ent.get("data_offsets"), list)
  ):
    raise CheckError(f"{at}: its header entry needs dtype, shape and data_offsets.")
  size_of = _ITEMSIZE.get(ent["dtype"])
  if size_of is None:
    raise CheckError(f"{at}: unknown dtype {short(ent['dtype'])}.")
  want = _safe_read.nbytes_of(ent["shape"], size_of, at)
  offs = ent["data_offsets"]
  if not (len(offs) == 2 and all(is_int(o) for o in offs) and 0 <= offs[0] <= offs[1] <= data):
    raise CheckError(f"{at}: data_offsets {short(offs)} are not inside the {data} data bytes.")
  if offs[1] - offs[0] != want:
    raise CheckError(
      f"{at}: shape {ent['shape']} of {ent['dtype']} needs {want} bytes, "
      f"data_offsets give {offs[1] - offs[0]}."
    )


def header(path: str, budget: Budget) -> tuple[dict, dict]:
  """``(tensor entries, __metadata__)`` of a ``.safetensors`` header, checked against the file."""
  entries, data = _header_json(path, budget)
  if not isinstance(entries, dict):
    raise CheckError(f"{path}: the safetensors header is not a JSON object.")
  meta = entries.pop("__metadata__", None)
  if meta is None:
    meta = {}
  if not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
    raise CheckError(f"{path}: the safetensors header's __metadata__ must map names to strings.")
  for key, ent in entries.items():
    _check_entry(ent, f"{path}: tensor {key!r}", data)
  return entries, meta


def _jasp_meta(path: str, raw_meta: Mapping[str, str]) -> dict:
  """jasp's metadata in the header's ``__metadata__`` (``{}`` when none)."""

  if torch_layout.SAFETENSORS_METADATA_KEY not in raw_meta:
    return {}
  text = raw_meta[torch_layout.SAFETENSORS_METADATA_KEY]
  return jasp_meta(_safe_read.loads_json(text, f"{path}: jasp metadata"), path)


def _tensors(path: str, entries: dict, budget: Budget) -> dict[str, Any]:
  """Every tensor of the file (charged to ``budget`` first)."""

  safetensors = require("safetensors")
  nbytes = sum(e["data_offsets"][1] - e["data_offsets"][0] for e in entries.values())
  budget.charge(nbytes, f"{path} (tensors)")
  try:
    tensors, _ = torch_layout.read_safetensors(path)
  except safetensors.SafetensorError as e:
    raise CheckError(f"{path}: safetensors cannot read it ({e}).") from None
  return tensors


def _masks(tensors: Mapping[str, Any]) -> dict[str, Any]:
  """``{weight key: mask}`` of apex's ``__<name>_mma_mask`` and ``<name>_mask`` tensors."""
  masks = {}
  for k, v in tensors.items():
    mod, _, leaf = k.rpartition(".")
    mm = re.fullmatch(r"__(.+)_mma_mask", leaf) or re.fullmatch(r"(.+)_mask", leaf)
    if mm:
      masks[f"{mod}.{mm.group(1)}" if mod else mm.group(1)] = v
  return masks


def _consumer(k: str, arr: np.ndarray, rec: dict | None) -> tuple[str, str | None] | str | None:
  """``(kind, flax path)`` of the tensor ``k``; a reason when its metadata says it is no weight.

  None for a tensor without metadata that is not a ``weight`` of rank >= 2.
  """
  if rec is None:
    leaf = k.rpartition(".")[2]
    if arr.ndim < 2 or arr.dtype.kind not in "fV" or leaf != "weight" or "embed" in k.lower():
      return None
    return ("linear" if arr.ndim == 2 else f"conv{arr.ndim - 2}d"), None
  if rec.get("kind", "none") == "none":
    return "its metadata says it feeds no matmul/conv (kind 'none')"
  if arr.ndim < 2:
    return f"a {arr.ndim}-D tensor, not a matmul/conv weight"
  return ("linear" if rec["kind"] == "dot" else f"conv{arr.ndim - 2}d"), rec.get("path")


def _torch_candidates(path: str, tensors: Mapping[str, Any], info: dict) -> list[Candidate]:
  """The weights of a file in PyTorch layouts, checked against the metadata's ``info``."""
  masks = _masks(tensors)
  mask_keys = {k for k in tensors if k.endswith("_mask")}
  cands, why = [], {}
  for k, v in tensors.items():
    if k in mask_keys:
      continue
    arr = np.asarray(v)
    rec = info.get(k)
    got = _consumer(k, arr, rec)
    if got is None:
      continue
    if isinstance(got, str):
      why[k] = got
      continue
    kind, param = got
    mk = masks.get(k)
    if mk is not None and tuple(mk.shape) != arr.shape:
      mk = None
    marked = "metadata" if (rec or {}).get("pruned") else ("mask" if mk is not None else "")
    cands.append(Candidate(k, arr, kind, [(1,)], param, marked, mask=mk))
  for k in info:
    if k in mask_keys:
      why.setdefault(k, "a mask tensor, not a weight")
  unverified(path, info, {c.name for c in cands}, why)
  return cands


def read(path: str, layout: str | None, budget: Budget) -> Found:
  """The weights of the ``.safetensors`` file ``path``.

  Args:
    path: the file.
    layout: ``"torch"`` or ``"flax"``; None: the metadata's, else ``"torch"``.
    budget: what the read may cost.
  """
  entries, raw_meta = header(path, budget)
  meta = _jasp_meta(path, raw_meta)
  tensors = _tensors(path, entries, budget)
  info = meta.get("weights", {})
  if (layout or meta.get("layout", "torch")) == "flax":
    flat = {k.replace(".", "/"): v for k, v in tensors.items()}
    cands = _tree_reader.candidates(flat)
    unverified(path, info, {c.name.replace("/", ".") for c in cands}, {})
    return Found(cands, meta, _tree_reader.none_found(flat), path)
  return Found(
    _torch_candidates(path, tensors, info),
    meta,
    (
      f"none of its {len(tensors)} tensor(s) is a matmul/conv weight "
      "(a 'weight' of rank >= 2, or one jasp's metadata names)"
    ),
    path,
  )
