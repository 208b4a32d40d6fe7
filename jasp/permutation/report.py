"""What a model-level permutation did: per channel class and per pruned layer.

Returned as data by :func:`jasp.permute` and printed readably (``print(report)``).
A member or consumer that is one layer of a stacked leaf (a kernel ``(L, in,
out)`` run by a scan) prints as ``path[axis]@layer`` (``path@layer``).

*Efficacy* (after apex ASP) measures how much of what a permutation can win it
won. N:M pruning keeps ``kept_before`` of ``sum |w|``; the *unstructured
bound* ``bound`` keeps the largest ``n/m`` of each row's weights, with no
group constraint, and no permutation can keep more. The efficacy is
``100 * (kept_after - kept_before) / (bound - kept_before)``: 0% is no gain,
100% reaches the bound.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from jasp import _tree

__all__ = ["ClassReport", "LayerReport", "PermutationPlan", "PermutationReport", "permute_array"]


@dataclasses.dataclass(frozen=True)
class ClassReport:
  """One channel dimension of the model.

  Attributes:
    id: the class id (stable within one trace).
    size: number of channels.
    members: ``(path, axis)`` of every parameter axis that carries the channels
      (directly, or as a factor of a flattened or grouped axis).
    consumers: paths of the N:M-pruned weights whose groups run along these
      channels (what the search optimises); a stacked weight (one matrix per
      layer of a scan) is listed once per layer that reads them.
    status: ``"permuted"``, ``"identity"`` (searched, nothing better found) or
      ``"skipped"``.
    reason: why it was skipped (or kept as it was).
    kept_before, kept_after: ``sum |w|`` kept by N:M over the consumers,
      before and after (each consumer normalised by its mean ``|w|``, as in
      the search).
    efficacy: apex's efficacy of the search on the joint matrix, in percent:
      ``100 * (kept_after - kept_before) / (bound - kept_before)`` on the
      matrix the search saw (the module docstring says more).
    seconds: search time.
    layers: for each member, the layer of a stacked leaf that carries the
      channels (indices along the leaf's stacked axes), or None when every
      layer does (and for unstacked leaves): the hidden channels of layer 3 of
      a scanned MLP are ``(".../up/kernel", 2)`` with layer ``(3,)``.
    consumer_layers: for each consumer, its layer (``()`` when unstacked).
    bound: ``sum |w|`` over the consumers (normalised as ``kept_before``)
      kept by the largest ``n/m`` of each row's channels, unstructured: what no
      permutation can beat; 0 for a class that was not searched.
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
  layers: tuple[tuple[int, ...] | None, ...] = ()
  consumer_layers: tuple[tuple[int, ...], ...] = ()
  bound: float = 0.0

  def member_names(self) -> list[str]:
    """``path[axis]`` per member, ``path[axis]@layer`` for one layer of a stacked leaf."""
    out = []
    for k, (p, a) in enumerate(self.members):
      lay = self.layers[k] if k < len(self.layers) else None
      out.append(f"{p}[{a}]" + ("" if lay is None else f"@{_layer_str(lay)}"))
    return out

  def consumer_names(self) -> list[str]:
    """``path`` per consumer, ``path@layer`` for one layer of a stacked weight."""
    out = []
    for k, p in enumerate(self.consumers):
      lay = self.consumer_layers[k] if k < len(self.consumer_layers) else ()
      out.append(p + (f"@{_layer_str(lay)}" if lay else ""))
    return out


def _layer_str(layer) -> str:
  return str(layer[0]) if len(layer) == 1 else "(" + ",".join(str(i) for i in layer) + ")"


@dataclasses.dataclass(frozen=True)
class LayerReport:
  """One N:M-pruned weight (one layer of a stacked one): the fraction of ``sum |w|`` kept.

  Attributes:
    path: the leaf's path.
    axis: its group axes.
    kept_before: fraction kept by N:M without permutation.
    kept_after: fraction kept after the permutation.
    permuted: True when its group axis was permuted.
    layer: for a weight stacked along layer axes (a kernel ``(L, in, out)``
      run by a scan), the layer: its indices along those axes; ``()`` for the
      whole leaf.
    stack: the leaf's stacked axes that ``layer`` indexes (``()`` if none).
  """

  path: str
  axis: tuple[int, ...]
  kept_before: float
  kept_after: float
  permuted: bool
  layer: tuple[int, ...] = ()
  stack: tuple[int, ...] = ()

  @property
  def name(self) -> str:
    """``path``, or ``path@layer`` for one layer of a stacked weight."""
    return self.path + (f"@{_layer_str(self.layer)}" if self.layer else "")


def permute_array(x, perms, stack: tuple[int, ...] = (), xp=jnp):
  """``x`` with each axis ``ax`` permuted by ``perms[ax]`` (exact: a gather).

  Args:
    x: an array.
    perms: per axis of ``x``, None or an int permutation: ``(size,)`` for the
      whole axis (``take``), or ``(*[x.shape[s] for s in stack], size)``: one
      permutation per layer along the axes ``stack`` (``take_along_axis``).
    stack: the stacked axes that multi-dimensional permutations index, sorted.
    xp: ``jax.numpy`` or ``numpy``.

  Returns:
    an array of ``x``'s shape and dtype.
  """
  for ax, p in enumerate(perms):
    if p is None:
      continue
    p = np.asarray(p)
    if p.ndim == 1:
      x = xp.take(x, xp.asarray(p), axis=ax)
      continue
    order = list(stack) + [ax]
    q = np.transpose(p, np.argsort(order))
    shape = [1] * np.ndim(x)
    for a in order:
      shape[a] = np.shape(x)[a]
    x = xp.take_along_axis(x, xp.asarray(q.reshape(shape)), axis=ax)
  return x


def _fits(x, perms, stack) -> bool:
  shape = np.shape(x)
  if len(shape) != len(perms):
    return False
  for ax, p in enumerate(perms):
    if p is None:
      continue
    p = np.asarray(p)
    if p.shape[-1] != shape[ax]:
      return False
    if p.ndim > 1 and tuple(p.shape[:-1]) != tuple(shape[s] for s in stack):
      return False
  return True


@dataclasses.dataclass(frozen=True)
class PermutationPlan:
  """The permutation of every leaf axis: ``{path: (perm or None per axis)}``.

  ``perm[j]`` is the old index that moves to position ``j`` (``jnp.take(leaf,
  perm, axis)``). For a leaf stacked along layer axes (a kernel ``(L, in,
  out)`` run by a scan) whose layers are permuted differently, ``perm`` is
  ``(L, size)``: row ``l`` permutes layer ``l`` (``jnp.take_along_axis``), the
  leading dimensions indexed by the axes ``stacks[path]``. Apply it to any tree
  whose leaves mirror the permuted ones, such as an optimizer state created
  before the permutation.

  Attributes:
    leaves: ``{path: (perm or None per axis)}``.
    stacks: ``{path: stacked axes}`` for leaves with per-layer permutations.
  """

  leaves: Mapping[str, tuple[np.ndarray | None, ...]]
  stacks: Mapping[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)

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
      if k.startswith("params/") and k[len("params/") :] not in self.leaves:
        alias.setdefault(k[len("params/") :], k)
    keys = sorted(alias, key=len, reverse=True)

    def one(path: str, x):
      if exact:
        if path not in self.leaves:
          return x
        return permute_array(x, self.leaves[path], tuple(self.stacks.get(path, ())))
      for k in keys:
        if path == k or path.endswith("/" + k):
          perms = self.leaves[alias[k]]
          stack = tuple(self.stacks.get(alias[k], ()))
          if not _fits(x, perms, stack):
            continue
          return permute_array(x, perms, stack)
      return x

    return _tree.map_with_path(one, tree)

  def inverse(self) -> PermutationPlan:
    """The plan that undoes this one."""
    inv = {
      k: tuple(None if p is None else np.argsort(p, axis=-1) for p in v)
      for k, v in self.leaves.items()
    }
    return PermutationPlan(inv, dict(self.stacks))


@dataclasses.dataclass(frozen=True)
class PermutationReport:
  """The outcome of :func:`jasp.permute`.

  Attributes:
    classes: one :class:`ClassReport` per channel dimension that holds a
      parameter axis.
    layers: one :class:`LayerReport` per N:M-pruned weight (per layer of a
      stacked one).
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

  @property
  def searched(self) -> tuple[ClassReport, ...]:
    """The classes that were searched (their bound was measured), permuted or not."""
    return tuple(c for c in self.classes if c.bound > 0)

  @property
  def efficacy(self) -> float:
    """Efficacy over every searched class jointly, in percent (0 when none).

    ``100 * sum(kept_after - kept_before) / sum(bound - kept_before)``: the
    share of the magnitude that N:M loses against the unstructured bound (the
    largest ``n/m`` of each row) that the permutations win back.
    """
    gap = sum(max(c.bound - c.kept_before, 0.0) for c in self.searched)
    won = sum(c.kept_after - c.kept_before for c in self.searched)
    return 100.0 * won / gap if gap > 0 else 0.0

  def format(self, verbosity: int = 2) -> str:
    """Human-readable text: a summary, then (``verbosity`` >= 2) the channel
    dimensions, then (>= 3) the pruned layers.

    The summary says how many channel dimensions were permuted, searched and
    skipped, the joint efficacy (:attr:`efficacy`, with its formula), the mean
    fraction of ``sum |w|`` N:M keeps before and after, and how far the
    permuted model's outputs are from the original's. The dimensions follow
    grouped by status (permuted, searched but kept, skipped), identical lines
    once with a count.
    """
    lines = self._summary()
    if verbosity >= 2:
      lines += self._class_lines()
    if verbosity >= 3:
      lines.append("  pruned layers (fraction of |w| kept by N:M, before -> after):")
      lines += [
        f"    {lr.name}: {lr.kept_before:.4f} -> {lr.kept_after:.4f}"
        + (" (permuted)" if lr.permuted else "")
        for lr in self.layers
      ]
    return "\n".join(lines)

  def _summary(self) -> list[str]:
    nm = f"{self.n}:{self.m}"
    searched = len(self.searched)
    lines = [
      f"channel permutation for {nm}: {len(self.permuted)} of {len(self.classes)} channel "
      f"dimension(s) permuted ({searched} searched, {len(self.classes) - searched} skipped) "
      f"in {self.seconds:.2f} s"
    ]
    if searched:
      lines += [
        f"  efficacy {self.efficacy:.1f}% over the {searched} searched dimension(s): the share of "
        f"the |w| that {nm} loses",
        f"    against the unstructured bound (the largest {self.n}/{self.m} of each row) that "
        "the permutation wins back,",
        "    100 * (kept after - kept before) / (bound - kept before), summed over the dimensions",
      ]
    if self.layers:
      k = len(self.layers)
      before = sum(lr.kept_before for lr in self.layers) / k
      after = sum(lr.kept_after for lr in self.layers) / k
      lines.append(
        f"  mean fraction of |w| kept by {nm} over {k} pruned layer(s): {before:.4f} -> {after:.4f}"
      )
    if self.max_rel_error is not None:
      lines.append(
        f"  outputs vs. the original: max abs error {self.max_abs_error:.3g}, "
        f"relative {self.max_rel_error:.3g}"
      )
    return lines

  def _class_lines(self) -> list[str]:
    groups = (
      ("permuted", "permuted"),
      ("identity", "searched, kept as they were"),
      ("skipped", "skipped"),
    )
    lines = []
    for status, title in groups:
      rows = _counted([_class_line(c) for c in self.classes if c.status == status])
      if rows:
        lines.append(f"  {title}:")
        lines += [f"    {r}" for r in rows]
    return lines

  def __str__(self) -> str:
    return self.format()


def _class_line(c: ClassReport) -> str:
  """One class: size, outcome, consumers, members (the first six)."""
  names = c.member_names()
  members = ", ".join(names[:6]) + (f" (+{len(names) - 6})" if len(names) > 6 else "")
  if c.status == "skipped":
    return f"[{c.size:>5}] {c.reason}: {members}"
  outcome = f"efficacy {c.efficacy:.1f}%, {c.seconds:.2f} s" + (
    f" ({c.reason})" if c.reason else ""
  )
  return f"[{c.size:>5}] {outcome}; consumers {', '.join(c.consumer_names())}; members {members}"


def _counted(lines: list[str]) -> list[str]:
  """``lines`` with repeats dropped, in first-seen order; a repeated line ends ``(xN)``."""
  counts: dict[str, int] = {}
  for line in lines:
    counts[line] = counts.get(line, 0) + 1
  return [line if k == 1 else f"{line} (x{k})" for line, k in counts.items()]
