"""Reads a flax ``.msgpack`` state dict (flax's encoding, every size checked)."""

from __future__ import annotations

from typing import Any

import numpy as np

from jasp.export import _safe_read
from jasp.export._meta import first_line
from jasp.export._meta import short
from jasp.export._readers import Found
from jasp.export._readers import tree
from jasp.export._safe_read import Budget
from jasp.export._safe_read import CheckError

__all__ = ["read", "read_tree"]

# flax's msgpack extension codes (flax.serialization): an ndarray, a complex, a numpy scalar.
_MP_NDARRAY, _MP_COMPLEX, _MP_SCALAR = 1, 2, 3
_MP_DTYPES = (
  "bool",
  "int8",
  "int16",
  "int32",
  "int64",
  "uint8",
  "uint16",
  "uint32",
  "uint64",
  "float16",
  "float32",
  "float64",
  "complex64",
  "complex128",
  "bfloat16",
  "float8_e4m3fn",
  "float8_e5m2",
  "float8_e4m3fnuz",
  "float8_e5m2fnuz",
  "float8_e4m3b11fnuz",
)
_MAX_TREE_DEPTH = 64


def _dtype(name: Any, where: str) -> np.dtype:
  if isinstance(name, bytes):
    name = name.decode("ascii", "replace")
  if name not in _MP_DTYPES:
    raise CheckError(f"{where}: an array of dtype {short(name)}, not a numeric dtype.")
  if name in ("bfloat16",) or name.startswith("float8"):
    import ml_dtypes

    return np.dtype(getattr(ml_dtypes, name))
  return np.dtype(name)


def _array(payload: bytes, where: str, budget: Budget) -> np.ndarray:
  """One array of flax's msgpack encoding ``(shape, dtype name, bytes)``, checked."""
  import msgpack

  try:
    parts = msgpack.unpackb(payload, raw=True, use_list=True)
  except (ValueError, TypeError) as e:  # msgpack's errors subclass ValueError
    raise CheckError(f"{where}: an array record that does not decode ({e}).") from None
  if not (
    isinstance(parts, list)
    and len(parts) == 3
    and isinstance(parts[2], bytes)
    and isinstance(parts[0], list)
  ):
    raise CheckError(f"{where}: an array record that is not (shape, dtype, bytes).")
  shape, dtype = parts[0], _dtype(parts[1], where)
  want = _safe_read.nbytes_of(shape, dtype.itemsize, where)
  if want != len(parts[2]):
    raise CheckError(
      f"{where}: an array of shape {short(shape)} {dtype.name} needs {want} "
      f"bytes, the record holds {len(parts[2])}."
    )
  budget.charge(want, where)
  return np.frombuffer(parts[2], dtype=dtype).reshape(shape)


def _chunked(node: dict, where: str, budget: Budget) -> np.ndarray:
  """A large array that flax wrote in chunks (``{"chunks": {...}, "shape": {...}}``)."""
  chunks, shape = node.get("chunks"), node.get("shape")
  if not (isinstance(chunks, dict) and isinstance(shape, dict)):
    raise CheckError(f"{where}: a chunked array without its chunks and shape.")
  order = sorted(chunks, key=lambda k: int(k) if str(k).isdigit() else -1)
  dims = [shape[k] for k in sorted(shape, key=lambda k: int(k) if str(k).isdigit() else -1)]
  parts = [chunks[k] for k in order]
  if (
    not parts
    or not all(isinstance(p, np.ndarray) and p.ndim == 1 for p in parts)
    or len({p.dtype for p in parts}) != 1
  ):
    raise CheckError(f"{where}: a chunked array whose chunks are not 1-D arrays of one dtype.")
  want = _safe_read.nbytes_of(dims, 1, where)
  have = sum(p.size for p in parts)
  if want != have:
    raise CheckError(
      f"{where}: a chunked array of shape {short(dims)} ({want} elements) holds {have}."
    )
  budget.charge(have * parts[0].dtype.itemsize, where)
  return np.concatenate(parts).reshape(dims)


def _decode(path: str, budget: Budget) -> dict:
  """The file's msgpack data, arrays decoded (and charged) as they are met."""
  import msgpack

  data = _safe_read.read_bytes(path, budget)

  def ext(code, payload):
    if code in (_MP_NDARRAY, _MP_SCALAR):
      return _array(payload, path, budget)
    return None  # a complex number or an unknown extension: not a weight

  try:
    decoded = msgpack.unpackb(data, ext_hook=ext, raw=False, strict_map_key=False, use_list=False)
  except CheckError:
    raise
  except (ValueError, TypeError) as e:  # msgpack's errors; TypeError: a map used as a map key
    raise CheckError(f"{path}: not msgpack data ({first_line(e)}).") from None
  if not isinstance(decoded, dict):
    raise CheckError(
      f"{path}: the msgpack data is a {type(decoded).__name__}, not a flax state dict."
    )
  return decoded


def read_tree(path: str, budget: Budget) -> dict[str, np.ndarray]:
  """``{path: array}`` of a flax msgpack file (flax's encoding, every size checked)."""
  flat: dict[str, np.ndarray] = {}
  stack = [((), _decode(path, budget))]
  while stack:
    keys, node = stack.pop()
    if len(keys) > _MAX_TREE_DEPTH:
      raise CheckError(f"{path}: the state dict is nested more than {_MAX_TREE_DEPTH} levels deep.")
    if isinstance(node, dict) and "__msgpack_chunked_array__" in node:
      node = _chunked(node, f"{path}: {'/'.join(keys)}", budget)
    if isinstance(node, dict):
      stack.extend((keys + (str(k),), v) for k, v in node.items())
    elif isinstance(node, np.ndarray):
      flat["/".join(keys)] = node
  return dict(sorted(flat.items()))


def read(path: str, layout: str | None, budget: Budget) -> Found:
  """The weights of the msgpack file ``path`` (``layout`` is not used)."""
  del layout
  flat = read_tree(path, budget)
  return Found(tree.candidates(flat), {}, tree.none_found(flat), path)
