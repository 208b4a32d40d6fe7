"""What a model-level permutation did: per channel class and per pruned layer.

Returned as data by :func:`jasp.permute` and printed readably (``print(report)``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from jasp import _tree

__all__ = ["ClassReport", "LayerReport", "PermutationPlan", "PermutationReport"]


@dataclasses.dataclass(frozen=True)
class ClassReport:
  """One channel dimension of the model.

  Attributes:
    id: the class id (stable within one trace).
    size: number of channels.
    members: ``(path, axis)`` of every parameter axis that carries the channels
      (directly, or as a factor of a flattened or grouped axis).
    consumers: paths of the N:M-pruned weights whose groups run along these
      channels (what the search optimises).
    status: ``"permuted"``, ``"identity"`` (searched, nothing better found) or
      ``"skipped"``.
    reason: why it was skipped (or kept as it was).
    kept_before, kept_after: ``sum |w|`` kept by N:M over the consumers,
      before and after (each consumer normalised by its mean ``|w|``, as in
      the search).
    efficacy: apex's efficacy of the search on the joint matrix, in percent.
    seconds: search time.
  """
  id: int
  size: int
  members: tuple[tuple[str, int], ...]
  consumers: tuple[str, ...]
  status: str
  reason: str = ""
  kept_before: float = 0.0
  kept_after: float = 0.0
  efficacy: float = 0.0
  seconds: float = 0.0


@dataclasses.dataclass(frozen=True)
class LayerReport:
  """One N:M-pruned weight: the fraction of ``sum |w|`` its mask keeps.

  Attributes:
    path: the leaf's path.
    axis: its group axes.
    kept_before: fraction kept by N:M without permutation.
    kept_after: fraction kept after the permutation.
    permuted: True when its group axis was permuted.
  """
  path: str
  axis: tuple[int, ...]
  kept_before: float
  kept_after: float
  permuted: bool


def _take_all(x, perms):
  for ax, p in enumerate(perms):
    if p is not None:
      x = jnp.take(x, jnp.asarray(p), axis=ax)
  return x


@dataclasses.dataclass(frozen=True)
class PermutationPlan:
  """The permutation of every leaf axis: ``{path: (perm or None per axis)}``.

  ``perm[j]`` is the old index that moves to position ``j`` (``jnp.take(leaf,
  perm, axis)``). Apply it to any tree whose leaves mirror the permuted ones,
  such as an optimizer state created before the permutation.
  """
  leaves: Mapping[str, tuple[np.ndarray | None, ...]]

  def apply(self, tree: Any, *, exact: bool = False) -> Any:
    """Permutes every leaf of ``tree`` whose path ends with a planned path.

    The match is by path suffix (so ``0/mu/Dense_0/kernel`` in an optax state
    of the linen params matches ``params/Dense_0/kernel``; ``mu/conv1/kernel``
    matches the nnx path ``conv1/kernel``) and shape; other leaves pass
    through.

    Args:
      tree: any pytree of arrays (variables, an optimizer state, gradients).
      exact: match whole paths only (for the model's own variables).

    Returns:
      a tree of the same structure.
    """
    # A plan made on linen variables also matches trees of the params alone
    # (what an optimizer is initialised with): "params/" may be missing.
    alias = {}
    for k in self.leaves:
      alias[k] = k
      if k.startswith("params/") and k[len("params/"):] not in self.leaves:
        alias.setdefault(k[len("params/"):], k)
    keys = sorted(alias, key=len, reverse=True)

    def one(path: str, x):
      if exact:
        return _take_all(x, self.leaves[path]) if path in self.leaves else x
      for k in keys:
        if path == k or path.endswith("/" + k):
          perms = self.leaves[alias[k]]
          if np.ndim(x) != len(perms) or any(
              p is not None and np.shape(x)[ax] != len(p) for ax, p in enumerate(perms)):
            continue
          return _take_all(x, perms)
      return x

    return _tree.map_with_path(one, tree)

  def inverse(self) -> PermutationPlan:
    """The plan that undoes this one."""
    inv = {k: tuple(None if p is None else np.argsort(p) for p in v)
           for k, v in self.leaves.items()}
    return PermutationPlan(inv)


@dataclasses.dataclass(frozen=True)
class PermutationReport:
  """The outcome of :func:`jasp.permute`.

  Attributes:
    classes: one :class:`ClassReport` per channel dimension that holds a
      parameter axis.
    layers: one :class:`LayerReport` per N:M-pruned weight.
    plan: the :class:`PermutationPlan` that was applied.
    max_abs_error, max_rel_error: largest difference between the permuted and
      the original model's outputs on the sample inputs (absolute, and relative
      to the largest output magnitude); None when not verified.
    n, m: the N:M pattern.
    seconds: total time.
  """
  classes: tuple[ClassReport, ...]
  layers: tuple[LayerReport, ...]
  plan: PermutationPlan
  max_abs_error: float | None
  max_rel_error: float | None
  n: int
  m: int
  seconds: float

  @property
  def permuted(self) -> tuple[ClassReport, ...]:
    return tuple(c for c in self.classes if c.status == "permuted")

  def format(self, verbosity: int = 2) -> str:
    """Human-readable summary; ``verbosity`` 1: totals, 2: + classes, 3: + layers."""
    lines = [f"channel permutation for {self.n}:{self.m}: {len(self.permuted)} of "
             f"{len(self.classes)} channel dimension(s) permuted in {self.seconds:.2f} s"]
    if self.max_rel_error is not None:
      lines.append(f"  outputs vs. the original: max abs error {self.max_abs_error:.3g}, "
                   f"relative {self.max_rel_error:.3g}")
    before = sum(lr.kept_before for lr in self.layers)
    after = sum(lr.kept_after for lr in self.layers)
    if self.layers:
      lines.append(f"  mean fraction of |w| kept by {self.n}:{self.m} over "
                   f"{len(self.layers)} layer(s): {before / len(self.layers):.4f} -> "
                   f"{after / len(self.layers):.4f}")
    if verbosity >= 2:
      for c in self.classes:
        members = ", ".join(f"{p}[{a}]" for p, a in c.members[:6])
        more = f" (+{len(c.members) - 6})" if len(c.members) > 6 else ""
        if c.status == "skipped":
          lines.append(f"  [{c.size:>5}] skipped: {c.reason}: {members}{more}")
        else:
          lines.append(f"  [{c.size:>5}] {c.status}: efficacy {c.efficacy:.1f}%, "
                       f"{c.seconds:.2f} s; consumers {', '.join(c.consumers)}; members "
                       f"{members}{more}" + (f" ({c.reason})" if c.reason else ""))
    if verbosity >= 3:
      for lr in self.layers:
        lines.append(f"  {lr.path}: kept {lr.kept_before:.4f} -> {lr.kept_after:.4f}"
                     + (" (permuted)" if lr.permuted else ""))
    return "\n".join(lines)

  def __str__(self) -> str:
    return self.format()

