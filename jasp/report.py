"""The sparsity report: per leaf, pruned or dense and why, N:M validity, zeros.

Returned as data (:class:`SparsityReport`, a tuple of :class:`LeafReport`) and
printed readably (``print(report)`` or ``report.format(verbosity)``, after
apex's verbosity levels).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jasp import _tree
from jasp import layouts as layouts_lib
from jasp import masks as masks_lib
from jasp import policy as policy_lib

__all__ = ["LeafReport", "SparsityReport", "sparsity_report"]


@dataclasses.dataclass(frozen=True)
class LeafReport:
  """One leaf of the report.

  Attributes:
    path: the leaf's path string.
    shape, dtype: the leaf's shape and dtype name.
    status: ``"pruned"`` (has a mask), ``"dense"``, or, in a report made
      without masks, ``"to prune"`` (what the policy would prune).
    reason: why a leaf stays dense (or notes).
    axis: the group axes (None if the leaf is not a matmul/conv weight).
    valid: whether the leaf *is* N:M along ``axis`` (None when no axis).
    zero_fraction: fraction of exactly-zero entries.
    mask_bits_per_weight: memory of its mask per weight (0 when none).
    tensor_core_ok: apex's size rule (``out % 8``, ``in % 16``) verdict.
    source: where the axis came from (``trace``, ``convention``, ...).
    numeric: False for a leaf that holds no numbers (a PRNG key, a string):
      it is reported as dense, not a weight, and counts in no total.
  """

  path: str
  shape: tuple[int, ...]
  dtype: str
  status: str
  reason: str
  axis: tuple[int, ...] | None
  valid: bool | None
  zero_fraction: float
  mask_bits_per_weight: float
  tensor_core_ok: bool | None
  source: str
  numeric: bool = True

  @property
  def size(self) -> int:
    """The number of entries; 0 for a leaf that holds no numbers (a PRNG key)."""
    return int(np.prod(self.shape, dtype=np.int64)) if self.numeric else 0


@dataclasses.dataclass(frozen=True)
class SparsityReport:
  """The whole tree's report; ``str()`` is a table, ``to_dict()`` plain data."""

  entries: tuple[LeafReport, ...]
  n: int
  m: int

  @property
  def pruned(self) -> tuple[LeafReport, ...]:
    return tuple(e for e in self.entries if e.status in ("pruned", "to prune"))

  @property
  def dense(self) -> tuple[LeafReport, ...]:
    return tuple(e for e in self.entries if e.status == "dense")

  @property
  def all_valid(self) -> bool:
    """Every pruned (or to-be-pruned) leaf is N:M along its axis."""
    return all(e.valid for e in self.pruned)

  @property
  def total_params(self) -> int:
    return sum(e.size for e in self.entries)

  @property
  def sparsity(self) -> float:
    """Fraction of all params that are exactly zero."""
    total = self.total_params
    return sum(e.zero_fraction * e.size for e in self.entries) / total if total else 0.0

  def to_dict(self) -> dict:
    return {
      "n": self.n,
      "m": self.m,
      "total_params": self.total_params,
      "pruned_params": sum(e.size for e in self.pruned),
      "sparsity": self.sparsity,
      "all_valid": self.all_valid,
      "leaves": [dataclasses.asdict(e) for e in self.entries],
    }

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=1)

  def summary(self) -> str:
    """The header line: how much is pruned, and whether every pruned leaf is N:M.

    When no leaf is pruned it says so (never "all N:M"), with the number of
    weights skipped because their input size is not a multiple of ``m``.
    """
    pruned = sum(e.size for e in self.pruned)
    planned = any(e.status == "to prune" for e in self.entries)
    head = (
      f"{self.n}:{self.m} sparsity: {len(self.pruned)} of {len(self.entries)} leaves "
      f"{'to prune' if planned else 'pruned'} ({pruned:,} of {self.total_params:,} params, "
      f"{100 * pruned / max(self.total_params, 1):.1f}%); overall zeros "
      f"{100 * self.sparsity:.1f}%; "
    )
    if not self.pruned:
      skipped = sum(
        1
        for e in self.dense
        if e.axis is not None and e.reason == policy_lib.size_reason(e.shape, e.axis, self.m)
      )
      return (
        head
        + f"no leaf is pruned {self.n}:{self.m}"
        + (
          f" ({skipped} weight(s) skipped: input size not a multiple of m={self.m})"
          if skipped
          else ""
        )
      )
    return head + (f"all {self.n}:{self.m}" if self.all_valid else f"NOT all {self.n}:{self.m}")

  def format(self, verbosity: int = 2) -> str:
    """The report as text.

    Args:
      verbosity: 0 nothing; 1 the summary line and invalid leaves; 2 also every
        matmul/conv weight (pruned or dense, with the reason); 3 every leaf.

    Raises:
      TypeError: ``verbosity`` is not an int.
    """
    if isinstance(verbosity, bool) or not isinstance(verbosity, (int, np.integer)):
      raise TypeError(
        f"verbosity must be an int from 0 to 3, got {verbosity!r} ({type(verbosity).__name__})."
      )
    if verbosity <= 0:
      return ""
    rows = [_row(e) for e in self.entries if _shown(e, verbosity)]
    head = (
      "leaf",
      "shape",
      "dtype",
      "status",
      "axis",
      f"{self.n}:{self.m}",
      "zeros",
      "tc-size",
      "mask b/w",
      "reason",
    )
    lines = [self.summary()]
    if rows:
      widths = [max(len(str(r[i])) for r in rows + [head]) for i in range(len(head))]
      fmt = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()
      lines += [fmt(head), fmt(tuple("-" * w for w in widths))] + [fmt(r) for r in rows]
    return "\n".join(lines)

  def __str__(self) -> str:
    return self.format(2)


def _shown(e: LeafReport, verbosity: int) -> bool:
  """Whether :meth:`SparsityReport.format` lists ``e`` at ``verbosity`` (see there)."""
  if verbosity >= 3:
    return True
  if verbosity >= 2 and (e.axis is not None or e.status == "pruned"):
    return True
  return e.status == "pruned" and not e.valid


def _yes_no(flag: bool | None, no: str = "no") -> str:
  return "-" if flag is None else ("yes" if flag else no)


def _row(e: LeafReport) -> tuple[str, ...]:
  """One line of :meth:`SparsityReport.format` (its columns as strings)."""
  return (
    e.path,
    "x".join(map(str, e.shape)) or "()",
    e.dtype,
    e.status,
    "-" if e.axis is None else ",".join(map(str, e.axis)),
    _yes_no(e.valid, "NO"),
    f"{100 * e.zero_fraction:.1f}%",
    _yes_no(e.tensor_core_ok),
    f"{e.mask_bits_per_weight:g}" if e.mask_bits_per_weight else "-",
    e.reason,
  )


def _mask_bits(mask) -> float:
  if mask is None:
    return 0.0
  bits = getattr(mask, "bits_per_weight", None)
  if bits is not None:
    return float(bits)
  return 8.0 * np.dtype(mask.dtype).itemsize


def _is_numeric(leaf: Any) -> bool:
  """Whether ``leaf`` holds numbers (not a PRNG key array, a string or another object)."""
  dt = getattr(leaf, "dtype", None)
  if dt is None:
    return isinstance(leaf, (bool, int, float, np.number))
  try:
    return bool(jnp.issubdtype(dt, jnp.number) or jnp.issubdtype(dt, jnp.bool_))
  except TypeError:
    return False


def _dtype_name(leaf: Any) -> str:
  dt = getattr(leaf, "dtype", None)
  if dt is None:
    return type(leaf).__name__
  try:
    return str(np.dtype(dt))
  except TypeError:  # extended dtypes (PRNG keys)
    return str(dt)


def _not_numeric_reason(leaf: Any) -> str:
  dt = getattr(leaf, "dtype", None)
  if dt is not None and jax.dtypes.issubdtype(dt, jax.dtypes.prng_key):
    return "a PRNG key, not a weight"
  return f"a {type(leaf).__name__} holding no numbers, not a weight"


def _leaf_checks(leaf: Any, axis: tuple[int, ...] | None, n: int, m: int):
  """``(zero fraction, N:M along axis)`` of one leaf, as device scalars (not synchronised)."""
  if not _is_numeric(leaf):
    return jnp.float32(0), jnp.bool_(False)
  arr = jnp.asarray(leaf)
  zeros = jnp.mean((arr == 0).astype(jnp.float32)) if arr.size else jnp.float32(0)
  valid = jnp.bool_(False)
  if axis is not None:
    try:
      valid = masks_lib.is_nm(arr, n, m, axis)
    except ValueError:
      valid = jnp.bool_(False)
  return zeros, valid


def _leaf_reason(leaf: Any, d: policy_lib.Decision, numeric: bool, masked: bool | None) -> str:
  """Why a leaf is as it is; ``masked``: whether it has a mask (None when no masks are given)."""
  reason = d.reason if numeric or d.axis is not None else _not_numeric_reason(leaf)
  if masked is False and d.prune:
    reason = reason or "no mask given"
  if masked and not d.prune:
    reason = f"masked, although the policy says: {d.reason}"
  return reason


def _leaf_report(
  path: str, leaf: Any, d: policy_lib.Decision, have_masks: bool, mk: Any, checks
) -> LeafReport:
  """The :class:`LeafReport` of one leaf, from its decision, mask and :func:`_leaf_checks`."""
  zeros, valid = checks
  numeric = _is_numeric(leaf)
  pruned = (mk is not None) if have_masks else d.prune
  masked = (mk is not None) if have_masks else None
  return LeafReport(
    path=path,
    shape=tuple(np.shape(leaf)),
    dtype=_dtype_name(leaf),
    status=("pruned" if have_masks else "to prune") if pruned else "dense",
    reason=_leaf_reason(leaf, d, numeric, masked),
    axis=d.axis,
    valid=None if d.axis is None else bool(valid),
    zero_fraction=float(zeros),
    mask_bits_per_weight=_mask_bits(mk),
    tensor_core_ok=d.tensor_core_ok,
    source=d.source,
    numeric=numeric,
  )


def sparsity_report(
  params: Any,
  masks: Any = None,
  n: int = 2,
  m: int = 4,
  *,
  layouts: Mapping[str, layouts_lib.Layout] | None = None,
  policy: policy_lib.Policy | None = None,
) -> SparsityReport:
  """Reports the state of every leaf of ``params``.

  Args:
    params: params pytree (pruned or not): linen variables, an ``nnx.State``
      (RNG key leaves, e.g. of ``nnx.Dropout``, are reported as not weights),
      any pytree.
    masks: the masks pytree (from :func:`jasp.prune`); None to report what the
      policy *would* prune and whether the params already are N:M.
    n, m: the pattern to check.
    layouts, policy: as given to :func:`jasp.compute_masks`, for the reasons.

  Returns:
    A :class:`SparsityReport` (one device synchronisation for the whole tree).

  Raises:
    ValueError: invalid ``n``/``m``; ``masks`` does not mirror ``params``
      (naming the path); ``layouts`` does not describe ``params`` (see
      :func:`jasp.policy.plan`).
    TypeError: ``n``/``m`` are not ints; a mask leaf is not a bool array or
      :class:`jasp.PackedMask` (naming the path).
  """
  masks_lib.check_nm(n, m)
  decisions = policy_lib.plan(params, m, layouts=layouts, policy=policy)
  leaves = _tree.leaves_by_path(params)
  mask_by_path = _tree.leaves_by_path(masks, keep_none=True) if masks is not None else {}
  if masks is not None:
    _tree.align(masks, params)
  checks = [_leaf_checks(leaf, decisions[path].axis, n, m) for path, leaf in leaves.items()]
  got = jax.device_get(checks)
  entries = [
    _leaf_report(path, leaf, decisions[path], masks is not None, mask_by_path.get(path), zv)
    for (path, leaf), zv in zip(leaves.items(), got)
  ]
  return SparsityReport(tuple(entries), n, m)
