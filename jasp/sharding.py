"""Sharded params: the rule that N:M groups must not straddle shards.

jasp's mask computation and enforcement are element-wise within a group of
``m`` along the group axis, so under ``jit`` a params pytree sharded with
``jax.sharding.NamedSharding`` (over any mesh: data and model axes) is pruned
and kept sparse shard by shard, with no collective and the weight's own
sharding on the mask. The one requirement: each shard holds whole groups.
"""

from __future__ import annotations

from typing import Any

from jasp import _tree

__all__ = ["check_groups_unsplit", "shard_run"]


def shard_run(
  shape: tuple[int, ...], shard_shape: tuple[int, ...], axes: tuple[int, ...]
) -> int | None:
  """Length of the contiguous runs of the flattened group axes held by one shard.

  Returns None when no group axis is split across shards.
  """
  split = [a for a in axes if shard_shape[a] != shape[a]]
  if not split:
    return None
  inner = split[-1]
  run = shard_shape[inner]
  for a in axes:
    if a > inner:
      run *= shape[a]
  return int(run)


def check_groups_unsplit(w: Any, axis: tuple[int, ...], m: int, *, path: str = "") -> None:
  """Raises ``ValueError`` if ``w``'s sharding cuts a group of ``m`` in two.

  A no-op for unsharded, replicated or traced arrays (under ``jit`` the check
  belongs to whoever chose the sharding; :func:`jasp.compute_masks` runs it on
  concrete params).
  """
  sharding = getattr(w, "sharding", None)
  if sharding is None or _tree.is_tracer(w):
    return
  try:
    if sharding.is_fully_replicated:
      return
    local = tuple(sharding.shard_shape(tuple(w.shape)))
  except Exception:
    return
  axes = tuple(a % len(w.shape) for a in axis)
  run = shard_run(tuple(w.shape), local, axes)
  if run is not None and run % m:
    spec = getattr(sharding, "spec", None)
    name = f"'{path}' " if path else ""
    sizes = "x".join(str(w.shape[a]) for a in axes)
    raise ValueError(
      f"the weight {name}of shape {tuple(w.shape)} is sharded ({spec}) so that each shard "
      f"holds {run} consecutive entries of its group axis {axes} (size {sizes}); {run} is "
      f"not a multiple of m={m}, so a group of {m} would straddle two shards. Shard that "
      f"axis over fewer devices (size/devices must divide by {m}) or shard another axis."
    )
