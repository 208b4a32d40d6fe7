"""One-shot jasp.prune of a ~1B decoder against its bytes floor: the previous path and the new one.

The model is scale_bench's decoder in bf16 (a pure-JAX params dict, 10 leaves a
layer). In one process, for bool and packed masks:

  * ``floor``: read each pruned weight, write it and its mask (1 byte, or 1 bit
    packed) at the device-to-device copy bandwidth measured in this run, on
    the clock of the kernels' device time (CUPTI where PyTorch is importable);
  * ``old``: the previous jasp.prune path, reproduced below: the policy planned,
    every leaf checked and the per-leaf NaN/Inf flags stacked and read back on
    every call;
  * ``new``: jasp.prune (the plan and program reused across calls of the same
    tree; the NaN/Inf flags computed in the program, one small read back);
  * ``triton`` (GPU with Pallas Triton): ``new`` with the Triton kernel the
    dispatcher picks before Hopper (mask kernel, then XLA packing and NaN/Inf
    check), the path before the Mosaic GPU kernel;
  * ``grouped``: ``new`` with same-shaped leaves sharing kernel launches
    (``jasp.kernels.nm_mosaic.nm_mosaic_many``, one launch per shape and up to
    16 leaves instead of one per leaf; off by default in ``jasp.prune``);
  * ``program``: the new path's jitted program alone (the device work plus its
    dispatch, no planning), and the sum of its GPU kernels' time (CUPTI, where
    PyTorch's profiler is importable);

each as the first call (trace + compile + run) and the median of warm calls,
the variants interleaved round by round. ``--overhead-dim`` repeats old/new on
the same tree structure with tiny weights, where the host time dominates.

    python benchmarks/prune_bench.py --out prune.json                 # ~1B (GPU, ~1 min)
    python benchmarks/prune_bench.py --layers 2 --dim 256 --vocab 512 # CPU smoke
"""

from __future__ import annotations

import argparse
import time

import _meta  # benchmarks/_meta.py (the script's directory is on sys.path)
import jax
import jax.numpy as jnp
import numpy as np
from _bench_util import DeviceClock
from _bench_util import copy_bandwidth
from scale_bench import forward
from scale_bench import init_params

import jasp
from jasp import _dispatch
from jasp import _tree
from jasp import masks as masks_lib
from jasp import packing
from jasp import policy as policy_lib
from jasp import pruning
from jasp import sharding
from jasp.kernels import nm_pallas

# ----------------------------------------------------------------------------
# The previous path (before plans were cached), kept here to measure against.


def _old_program_body(cfg, n, m, pattern, score_fn, impl, packed, want_pruned, leaves):
  masks, pruned, finite = [], [], []
  for (path, d), w in zip(cfg, leaves):
    finite.append(
      jnp.all(jnp.isfinite(w)) if jnp.issubdtype(w.dtype, jnp.inexact) else jnp.bool_(True)
    )
    if want_pruned and pattern == "nm" and score_fn is None:
      pw, mask = masks_lib.nm_prune(w, n, m, d.axis, impl=impl, with_mask=True)
      pruned.append(pw)
    else:
      mask = pruning._leaf_mask(path, w, d, n, m, pattern, score_fn, impl, impl)
      if want_pruned:
        pruned.append(jnp.where(mask, w, jnp.zeros((), w.dtype)))
    masks.append(packing.pack(mask, d.axis) if packed else mask)
  return masks, pruned, finite


_old_program = jax.jit(_old_program_body, static_argnums=(0, 1, 2, 3, 4, 5, 6, 7))


def _old_check_finite(paths, leaves, finite):
  if any(pruning._is_traced(x) for x in leaves) or not finite:
    return
  flags = np.asarray(jax.device_get(jnp.stack(finite)))
  for path, x, ok in zip(paths, leaves, flags):
    if not ok:
      raise ValueError(f"the weight '{path}' (shape {tuple(x.shape)}) holds NaN/Inf")


def old_prune(params, n=2, m=4, *, layouts=None, policy=None, packed=False):
  """The previous ``jasp.prune(params, n, m, layouts=..., policy=..., packed=...)``."""
  pattern, score_fn, impl = "nm", None, None
  masks_lib.check_nm(n, m)
  pruning._check_options(pattern, score_fn)
  decisions = policy_lib.plan(params, m, layouts=layouts, policy=policy)
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  paths = [_tree.path_str(p) for p, _ in flat]
  leaves = [x for _, x in flat]
  shapes = {p: tuple(np.shape(x)) for p, x in zip(paths, leaves)}
  pruning._check_some_pruned(decisions, shapes, n, m)
  todo = [i for i, p in enumerate(paths) if decisions[p].prune]
  for i in todo:
    pruning._check_prunable(paths[i], leaves[i])
  for i in todo:
    sharding.check_groups_unsplit(leaves[i], decisions[paths[i]].axis, m, path=paths[i])
  cfg = tuple((paths[i], decisions[paths[i]]) for i in todo)
  sub = [leaves[i] for i in todo]
  masks, pruned, finite = _old_program(cfg, n, m, pattern, score_fn, impl, packed, True, sub)
  _old_check_finite([paths[i] for i in todo], sub, finite)
  mask_tree = jax.tree_util.tree_unflatten(
    treedef, pruning._scatter([None] * len(leaves), todo, masks)
  )
  return jax.tree_util.tree_unflatten(
    treedef, pruning._scatter(list(leaves), todo, pruned)
  ), mask_tree


# ----------------------------------------------------------------------------
# Timing.


def _timed(fn) -> float:
  t = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - t


def _new_program(params, layouts, packed, group=False):
  """The new path's cached program and its inputs (the device work without the planning)."""
  leaves, treedef = jax.tree_util.tree_flatten(params)
  options = ("nm", None, None, packed, True, pruning._impl_in_force(None), group)
  plan = pruning._get_plan(params, leaves, treedef, 2, 4, layouts, None, options)
  sub = [leaves[i] for i in plan.todo]
  return lambda: plan.program(sub)


def _triton(fn):
  """``fn`` with the dispatcher told the GPU predates Hopper: the Triton kernel, as before Mosaic."""

  def run():
    real = _dispatch._capability
    _dispatch._capability = lambda w: 8.0
    try:
      return fn()
    finally:
      _dispatch._capability = real

  return run


def _grouped(fn):
  """``fn`` with same-shaped leaves sharing kernel launches (``nm_mosaic_many``)."""

  def run():
    pruning._GROUP_SAME_SHAPES = True
    try:
      return fn()
    finally:
      pruning._GROUP_SAME_SHAPES = False

  return run


def measure(params, layouts, warm: int) -> dict:
  """First and warm (median) seconds of old / new / program, bool and packed masks."""
  calls = {}
  for packed in (False, True):  # new first: a compile cache the two share favours the second
    kind = "packed" if packed else "bool"
    calls[f"new {kind}"] = lambda p=packed: jasp.prune(params, layouts=layouts, packed=p)
    calls[f"old {kind}"] = lambda p=packed: old_prune(params, layouts=layouts, packed=p)
    if jax.default_backend() == "gpu" and nm_pallas.backend_available():
      # The previous kernel in the same run: impl="pallas" keys a program of its own in
      # the prune cache, traced (and kept) with the Triton kernel.
      calls[f"triton {kind}"] = _triton(
        lambda p=packed: jasp.prune(params, layouts=layouts, packed=p, impl="pallas")
      )
    # Same-shaped leaves in shared launches (a plan and program of their own).
    calls[f"grouped {kind}"] = _grouped(
      lambda p=packed: jasp.prune(params, layouts=layouts, packed=p)
    )
  first = {name: _timed(fn) for name, fn in calls.items()}
  for packed in (False, True):
    kind = "packed" if packed else "bool"
    calls[f"program {kind}"] = _new_program(params, layouts, packed)
    calls[f"grouped program {kind}"] = _new_program(params, layouts, packed, group=True)
    _timed(calls[f"program {kind}"])
    _timed(calls[f"grouped program {kind}"])
  times = {name: [] for name in calls}
  for _ in range(warm):
    for name, fn in calls.items():
      times[name].append(_timed(fn))
  device = {}
  clock = DeviceClock()
  for name in ("program bool", "program packed", "grouped program bool", "grouped program packed"):

    def run(fn=calls[name]):
      for _ in range(5):
        jax.block_until_ready(fn())

    device[name] = clock.measure(run, 5)  # GPU kernel time per call (CUPTI); None without it
  return {
    "first_s": first,
    "warm_s": {k: float(np.median(v)) for k, v in times.items()},
    "device_s": device,
  }


def check_same(params, layouts) -> None:
  """The new path returns exactly the old path's pruned params and masks."""
  for packed in (False, True):
    a = old_prune(params, layouts=layouts, packed=packed)
    b = jasp.prune(params, layouts=layouts, packed=packed)
    same = jax.tree.map(lambda x, y: bool(jnp.array_equal(x, y)), a, b)
    assert all(jax.tree.leaves(same)), f"old and new prune differ (packed={packed})"


def _model(args, dim, vocab):
  params = init_params(jax.random.key(0), args.layers, dim, vocab, jnp.bfloat16)
  heads = max(1, min(args.heads, dim // 4))
  x = jnp.zeros((1, 8), jnp.int32)
  layouts = jasp.trace_layouts(lambda p, t: forward(p, t, heads), params, x)
  return params, layouts


def _print_table(res: dict, floor: dict | None) -> None:
  print(f"{'path':<24} {'first call':>12} {'warm (median)':>14} {'vs floor':>9}")
  for name, first in res["first_s"].items():
    warm = res["warm_s"][name]
    ratio = f"{warm / floor[name.split()[-1]]:8.2f}x" if floor else ""
    print(f"{name:<24} {first * 1e3:10.1f}ms {warm * 1e3:12.3f}ms {ratio:>9}")
  for name in ("program bool", "program packed", "grouped program bool", "grouped program packed"):
    warm = res["warm_s"][name]
    ratio = f"{warm / floor[name.split()[-1]]:8.2f}x" if floor else ""
    print(f"{name:<24} {'':>12} {warm * 1e3:12.3f}ms {ratio:>9}")
    dev = res["device_s"].get(name)
    if dev is not None:
      ratio = f"{dev / floor[name.split()[-1]]:8.2f}x" if floor else ""
      print(f"{'  GPU kernels':<24} {'':>12} {dev * 1e3:12.3f}ms {ratio:>9}")


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--layers", type=int, default=18)
  ap.add_argument("--dim", type=int, default=2048)
  ap.add_argument("--heads", type=int, default=16)
  ap.add_argument("--vocab", type=int, default=32000)
  ap.add_argument("--warm", type=int, default=10, help="warm calls per variant")
  ap.add_argument("--overhead-dim", type=int, default=8, help="width of the tiny model (0: skip)")
  ap.add_argument("--out", type=str, default="")
  args = ap.parse_args()
  dev = jax.devices()[0]
  print(f"device: {dev.device_kind} ({dev.platform}), JAX {jax.__version__}")
  out = {"device": dev.device_kind, "layers": args.layers, "dim": args.dim, "vocab": args.vocab}

  params, layouts = _model(args, args.dim, args.vocab)
  out["full"] = measure(params, layouts, args.warm)
  check_same(params, layouts)
  masks = jasp.compute_masks(params, layouts=layouts)
  n_pruned = sum(m.size for m in jax.tree.leaves(masks))
  out["leaves"] = len(jax.tree.leaves(params))
  out["pruned_leaves"] = len(jax.tree.leaves(masks))
  out["pruned_weights"] = n_pruned
  del masks
  # The copy on the same clock as the kernels (CUPTI where PyTorch is importable; host
  # time of single calls ran 20-40% slower on an H100).
  clock = DeviceClock()
  bw = copy_bandwidth(min(1 << 30, max(1 << 20, 4 * n_pruned)), clock) / 1e9
  out["copy_GBps"] = bw
  out["copy_timing"] = "device (CUPTI kernel sums)" if clock.ok else "host wall time per call"
  out["floor_s"] = {
    "bool": n_pruned * (2 + 2 + 1) / (bw * 1e9),
    "packed": n_pruned * (2 + 2 + 0.125) / (bw * 1e9),
  }
  print(
    f"\n{args.layers} layers, width {args.dim}: {out['leaves']} leaves, {out['pruned_leaves']} "
    f"pruned ({n_pruned / 1e9:.3f} B bf16 weights); floor bool {out['floor_s']['bool'] * 1e3:.3f} "
    f"ms, packed {out['floor_s']['packed'] * 1e3:.3f} ms at {bw:.0f} GB/s copy"
  )
  _print_table(out["full"], out["floor_s"])
  del params
  if args.overhead_dim:
    tiny, tiny_layouts = _model(args, args.overhead_dim, 4 * args.overhead_dim)
    out["overhead"] = measure(tiny, tiny_layouts, max(args.warm, 20))
    check_same(tiny, tiny_layouts)
    print(f"\nsame tree, width {args.overhead_dim} (host time dominates):")
    _print_table(out["overhead"], None)
  if args.out:
    _meta.write_json(args.out, out)


if __name__ == "__main__":
  main()
