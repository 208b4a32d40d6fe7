"""The checker's verdict: which weights of a file are N:M, which must be, and the report.

A reader (:mod:`jasp.export._readers`) turns a file into :class:`Candidate`
weights (an array, its consumer, the axes that consumer reduces over, and what
the file says about it); :func:`report` gives each its :class:`WeightCheck`
and gathers them in a :class:`CheckReport`, the table ``jasp check`` prints and
whose ``ok`` decides its exit status.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from jasp._nm_core import check_nm
from jasp.export import _nm
from jasp.export._safe_read import CheckError

__all__ = ["Candidate", "CheckReport", "WeightCheck", "report", "run_of_axes"]


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
    expected: whether the weight must be N:M (see :mod:`jasp.export._check`).
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


_TABLE_HEAD = ("weight", "param", "shape", "consumer", "axis", None, "zeros", "expected", "status")


def _table_row(w: WeightCheck) -> tuple[str, ...]:
  """One line of :meth:`CheckReport.format_table` (its columns as strings)."""
  if w.nm:
    nm = "yes"
  else:
    nm = "-" if not w.applicable else f"no ({w.bad_groups}/{w.groups} groups)"
  return (
    w.name,
    w.param or "-",
    "x".join(map(str, w.shape)) or "()",
    w.consumer,
    "-" if w.axis is None else ",".join(map(str, w.axis)),
    nm,
    f"{100 * w.zero_fraction:.1f}%",
    f"yes ({w.expected_by})" if w.expected else "no",
    w.status,
    w.note,
  )


def _table(head: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
  """``head`` and ``rows`` as left-aligned columns (with a rule under the head); [] without rows."""
  if not rows:
    return []
  widths = [max(len(str(r[i])) for r in rows + [head]) for i in range(len(head))]
  fmt = lambda r: "  ".join(str(c).ljust(wd) for c, wd in zip(r, widths)).rstrip()
  return [fmt(head), fmt(tuple("-" * wd for wd in widths))] + [fmt(r) for r in rows]


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
    verdict = (
      "OK" if self.ok else f"FAILED: {len(self.failures)} expected weight(s) not {self.n}:{self.m}"
    )
    return (
      f"{self.path} ({self.format}): {len(self.weights)} weight(s), {nm} {self.n}:{self.m} "
      f"along the consumer's reduction axis, {exp} expected sparse; {verdict}"
    )

  def format_table(self) -> str:
    head = tuple(h or f"{self.n}:{self.m}" for h in _TABLE_HEAD) + ("note",)
    rows = [_table_row(w) for w in self.weights]
    lines = [self.summary(), f"expected sparse: {self.rule}"] + _table(head, rows)
    return "\n".join(lines)

  def __str__(self) -> str:
    return self.format_table()

  def to_dict(self) -> dict:
    return {
      "path": self.path,
      "format": self.format,
      "n": self.n,
      "m": self.m,
      "ok": self.ok,
      "rule": self.rule,
      "weights": [dict(dataclasses.asdict(w), status=w.status, ok=w.ok) for w in self.weights],
    }

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=1)


@dataclasses.dataclass
class Candidate:
  """A weight found in a file, before the N:M verdict."""

  name: str
  array: np.ndarray
  consumer: str
  axes: list[tuple[int, ...]]  # one entry per consumer (empty: unknown)
  param: str | None = None
  marked: str = ""  # "metadata" | "mask" when the file says it was pruned
  note: str = ""
  mask: np.ndarray | None = None


def run_of_axes(axes: tuple[int, ...], ndim: int) -> tuple[int, ...] | None:
  """``axes`` normalised and sorted if they are a run of consecutive axes of ``range(ndim)``."""
  if not axes or any(not -ndim <= a < ndim for a in axes):
    return None
  out = sorted(a % ndim for a in axes)
  return tuple(out) if out == list(range(out[0], out[0] + len(out))) else None


class _AxesVerdict(NamedTuple):
  """The pattern of one weight along its consumers' axes."""

  applicable: bool = False
  nm: bool = False
  groups: int = 0
  bad_groups: int = 0
  notes: tuple[str, ...] = ()


def _axes_text(axes_list: Sequence[tuple[int, ...]]) -> str:
  return "; ".join(",".join(map(str, a)) for a in axes_list)


def _axes_notes(
  w: np.ndarray,
  axes_list: list[tuple[int, ...]],
  n: int,
  m: int,
  zeros: float,
  applicable: bool,
  nm: bool,
) -> tuple[str, ...]:
  """Why a weight is not N:M along its consumers' axes (and whether it is along another)."""
  notes = []
  if len(axes_list) > 1:
    notes.append("consumed along several axes: " + _axes_text(axes_list))
  if not applicable:
    k = [int(np.prod([w.shape[a] for a in ax])) for ax in axes_list]
    notes.append(f"reduction size {k[0] if len(k) == 1 else k} is not a multiple of {m}")
  elif not nm and zeros > 0:
    other = _nm.nm_axes(w, n, m, skip=[a for ax in axes_list for a in ax])
    if other:
      notes.append(
        f"{n}:{m} along axis {','.join(map(str, other))} instead: the wrong axis for this consumer"
      )
  return tuple(notes)


def _along_axes(
  w: np.ndarray, axes_list: list[tuple[int, ...]], n: int, m: int, zeros: float
) -> _AxesVerdict:
  """The N:M pattern of ``w`` along every consumer's reduction axes, with notes."""
  odd = [ax for ax in axes_list if run_of_axes(ax, w.ndim) is None]
  if odd:
    return _AxesVerdict(
      notes=(
        f"reduction axes {_axes_text(odd)} are not a run of consecutive axes of the stored "
        "tensor: not checked",
      )
    )
  if not axes_list:
    return _AxesVerdict()
  stats = [_nm.nm_stats(w, ax, n, m) for ax in axes_list]
  applicable = all(s.applicable for s in stats)
  nm = applicable and all(s.nm for s in stats)
  notes = _axes_notes(w, axes_list, n, m, zeros, applicable, nm)
  groups = sum(s.groups for s in stats)
  bad = sum(s.bad_groups for s in stats)
  return _AxesVerdict(applicable, nm, groups, bad, notes)


def _expected(c: Candidate, regexes: Sequence[str], min_zeros: float, zeros: float):
  """``(expected, why)``: whether ``c`` must be N:M, and by which rule (see the module doc)."""
  if regexes:
    expected = any(re.search(r, c.name) or (c.param and re.search(r, c.param)) for r in regexes)
    return bool(expected), "regex" if expected else ""
  if c.marked:
    return True, c.marked
  if zeros >= min_zeros:
    return True, "zeros"
  return False, ""


def _verdict(c: Candidate, n: int, m: int, regexes: Sequence[str], min_zeros: float) -> WeightCheck:
  w = c.array
  z = _nm.zero_fraction(w)
  axes_list = [ax for ax in dict.fromkeys(c.axes) if ax]
  along = _along_axes(w, axes_list, n, m, z)
  nm = along.nm
  notes = ([c.note] if c.note else []) + list(along.notes)
  if c.mask is not None:
    outside = int(np.count_nonzero((w != 0) & ~c.mask.astype(bool)))
    if outside:
      nm = False
      notes.append(f"{outside} non-zero(s) where its mask is False")
  expected, by = _expected(c, regexes, min_zeros, z)
  return WeightCheck(
    name=c.name,
    param=c.param,
    shape=tuple(int(d) for d in w.shape),
    dtype=str(w.dtype),
    consumer=c.consumer,
    axis=axes_list[0] if axes_list else None,
    applicable=along.applicable,
    nm=bool(nm),
    groups=along.groups,
    bad_groups=along.bad_groups,
    zero_fraction=z,
    expected=expected,
    expected_by=by,
    note="; ".join(notes),
  )


def _regexes(expect_sparse: str | Sequence[str] | None) -> list[str]:
  """``expect_sparse`` as a list of patterns, each checked to compile."""
  regexes = [expect_sparse] if isinstance(expect_sparse, str) else list(expect_sparse or ())
  for r in regexes:
    try:
      re.compile(r)
    except re.error as e:
      raise CheckError(f"--expect-sparse {r!r} is not a valid regular expression: {e}") from None
  return regexes


def _rule(regexes: Sequence[str], min_zeros: float) -> str:
  """The report's line saying which weights are expected sparse."""
  if regexes:
    return "weights matching " + " or ".join(repr(r) for r in regexes)
  return (
    f"weights the file marks as pruned (metadata or masks), and any weight with "
    f">= {100 * min_zeros:.0f}% zeros"
  )


def report(
  path: str,
  fmt: str,
  cands: list[Candidate],
  n: int,
  m: int,
  expect_sparse: str | Sequence[str] | None,
  min_zeros: float | None,
) -> CheckReport:
  """The :class:`CheckReport` of the weights ``cands`` found in ``path``.

  Raises:
    CheckError: ``n``/``m`` or a pattern of ``expect_sparse`` are invalid.
  """

  try:
    check_nm(n, m)
  except (TypeError, ValueError) as e:
    raise CheckError(str(e)) from None
  regexes = _regexes(expect_sparse)
  if min_zeros is None:
    min_zeros = 0.8 * (m - n) / m
  weights = tuple(_verdict(c, n, m, regexes, min_zeros) for c in cands)
  return CheckReport(path, fmt, n, m, weights, _rule(regexes, min_zeros))
