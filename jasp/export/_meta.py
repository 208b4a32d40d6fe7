"""jasp's metadata in an exported file, parsed as untrusted input.

The exporters record the pattern and, per weight, whether it was pruned and
where it came from: an ONNX ``metadata_props`` entry, the ``__metadata__`` of
a ``.safetensors`` header, a SavedModel's ``assets.extra/jasp.json``.
:func:`jasp_meta` checks the fields the checker reads, and :func:`unverified`
refuses a file whose metadata marks as pruned a weight the check did not see.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from jasp.export._safe_read import CheckError

__all__ = ["first_line", "int_list", "is_int", "jasp_meta", "short", "unverified"]


def short(value: Any) -> str:
  """``repr(value)``, cut to 60 characters (values come from untrusted files)."""
  r = repr(value)
  return r if len(r) <= 60 else r[:57] + "..."


def first_line(e: BaseException) -> str:
  """The first line of an exception's message (at most 300 characters), else its class name."""
  text = str(e).strip()
  line = text.splitlines()[0] if text else type(e).__name__
  return line[:300]


def is_int(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def int_list(value: Any, *, nonneg: bool) -> bool:
  """Whether ``value`` is a list of integers (non-negative ones with ``nonneg``)."""
  return isinstance(value, list) and all(is_int(v) and (v >= 0 or not nonneg) for v in value)


def _check_pattern(meta: dict, where: str) -> None:
  """``n`` and ``m``: positive integers with ``1 <= n < m`` (defaults 2:4)."""
  for key in ("n", "m"):
    if key in meta and not (is_int(meta[key]) and meta[key] >= 1):
      raise CheckError(f"{where}: {key!r} must be a positive integer, got {short(meta[key])}.")
  n, m = meta.get("n", 2), meta.get("m", 4)
  if m < 2 or not n < m:
    raise CheckError(f"{where}: 'n' and 'm' must give 1 <= n < m, got n={n}, m={m}.")


def _check_record(rec: Any, at: str) -> None:
  """One entry of the metadata's ``weights``: ``{pruned, path?, kind?, layer?, axis?}``."""
  if not isinstance(rec, dict):
    raise CheckError(f"{at} must be an object, got {type(rec).__name__} {short(rec)}.")
  if not isinstance(rec.get("pruned"), bool):
    got = "nothing" if "pruned" not in rec else short(rec["pruned"])
    raise CheckError(f"{at}.pruned must be true or false, got {got}.")
  for key in ("path", "kind"):
    if key in rec and not isinstance(rec[key], str):
      raise CheckError(f"{at}.{key} must be a string, got {short(rec[key])}.")
  if "layer" in rec and not int_list(rec["layer"], nonneg=True):
    raise CheckError(
      f"{at}.layer must be a list of non-negative integers, got {short(rec['layer'])}."
    )
  if rec.get("axis") is not None and not (int_list(rec["axis"], nonneg=False) and rec["axis"]):
    raise CheckError(
      f"{at}.axis must be null or a non-empty list of integers, got {short(rec['axis'])}."
    )


def jasp_meta(meta: Any, where: str) -> dict:
  """jasp's metadata, checked field by field (the fields the checker reads).

  Args:
    meta: the decoded JSON.
    where: the file (or the part of it) named in errors.

  Returns:
    ``meta`` itself.

  Raises:
    CheckError: naming the first malformed field.
  """
  where = f"{where}: jasp metadata"
  if not isinstance(meta, dict):
    raise CheckError(f"{where} must be a JSON object, got {type(meta).__name__} {short(meta)}.")
  _check_pattern(meta, where)
  for key in ("layout", "var_prefix", "producer"):
    if key in meta and not isinstance(meta[key], str):
      raise CheckError(f"{where}: {key!r} must be a string, got {short(meta[key])}.")
  if meta.get("layout", "torch") not in ("torch", "flax"):
    raise CheckError(f"{where}: 'layout' must be 'torch' or 'flax', got {short(meta['layout'])}.")
  weights = meta.get("weights", {})
  if not isinstance(weights, dict):
    raise CheckError(
      f"{where}: 'weights' must be an object {{name: {{...}}}}, got "
      f"{type(weights).__name__} {short(weights)}."
    )
  for name, rec in weights.items():
    _check_record(rec, f"{where}: weights[{name!r}]")
  return meta


def unverified(
  where: str, recorded: Mapping[str, Any], found: set[str], why: Mapping[str, str]
) -> None:
  """Raises :class:`CheckError` when the metadata marks as pruned a weight the check did not see.

  Args:
    where: the file named in the error.
    recorded: the metadata's ``weights`` (checked by :func:`jasp_meta`).
    found: the names of the weights the check found.
    why: for a name not found, why not (default: "not in the file").
  """
  lost = [name for name, rec in recorded.items() if rec["pruned"] and name not in found]
  if not lost:
    return
  items = []
  for name in lost[:10]:
    path = recorded[name].get("path")
    shown = f" ({path})" if path and path != name else ""
    items.append(f"{name}{shown}: {why.get(name, 'not in the file')}")
  more = f"; and {len(lost) - 10} more" if len(lost) > 10 else ""
  raise CheckError(
    f"{where}: jasp's metadata marks {len(lost)} weight(s) as pruned that the "
    f"check cannot verify: {'; '.join(items)}{more}."
  )
