"""Channel-permutation search on apex's test matrices: kept magnitude, efficacy, time.

apex's protocol (``permutation_tests``, Pool & Yu 2021): a matrix of uniform
[0, 1) values drawn with ``np.random.seed(1)``, 2:4 groups along the 64
columns of a 128 x 64 matrix; also square 256, 1024 and 4096 matrices drawn the
same way. Efficacy = share (in %) of the gap between unpermuted 2:4 and the
best unstructured half of each row that the permutation closes.

For each configuration the first call (compilation included) and a second,
warm call (same shapes) are timed with a host timer; both return the same
permutation when no time limit cuts the search.

Usage::

  python benchmarks/permutation_bench.py                 # all sizes, this backend
  python benchmarks/permutation_bench.py --sizes 64x128 --json out.json
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import _meta  # noqa: E402  (benchmarks/_meta.py)

from jasp.permutation.search import search_permutation  # noqa: E402

# apex's published figures on the 64 x 128 matrix of its permutation_tests (V100).
APEX = [
  ("default 2:4 (no permutation)", 2852.376, 0.0, None),
  ("channel_swap, 1000 escapes", 2920.694, 36.0, 20.2),
  ("OSG window 8, 0 escapes", 2919.757, 35.5, 0.013),
  ("OSG window 8, 1000 escapes", 2919.935, 35.6, 1.39),
  ("OSG window 12, 0 escapes", 2921.947, 36.6, 0.86),
  ("random, 100000", 2879.129, 14.1, 11.5),
  ("50% rows (bound)", 3042.332, 100.0, None),
]


def apex_matrix(rows: int, cols: int) -> np.ndarray:
  """apex's matrix, as jasp sees it: (channels = cols, rows), groups along axis 0."""
  np.random.seed(1)
  return np.random.rand(rows, cols).astype(np.float32).T


def configs(rows: int, cols: int, budget: float):
  """(label, kwargs) pairs for one matrix size."""
  if cols <= 64:
    return [
      ("windows 8, 0 escapes", dict(window=2, escapes=0)),
      ("windows 8, 3 escapes", dict(window=2, escapes=3)),
      ("windows 8, 6 escapes", dict(window=2, escapes=6)),
      ("windows 8, 10 escapes", dict(window=2, escapes=10)),
      ("windows 8, 20 escapes", dict(window=2, escapes=20)),
      ("windows 8, 100 escapes (default)", dict()),
      ("windows 12, 0 escapes", dict(window=3, escapes=0)),
      ("swap, 100 escapes", dict(strategy="swap", escapes=100)),
      ("windows 8, 8 chains x 20 escapes", dict(chains=8, escapes=20)),
      ("windows 8, 8 chains x 5 escapes", dict(chains=8, escapes=5)),
      ("windows 8, 8 chains x 3 escapes", dict(chains=8, escapes=3)),
    ] + (
      [("windows 12, 4 chains x 0 escapes", dict(window=3, chains=4, escapes=0))]
      if jax.default_backend() != "cpu"
      else []
    )  # vmapped, every phase runs: GPU only
  if cols <= 256:
    return [
      ("windows 8, 0 escapes", dict(window=2, escapes=0)),
      ("windows 8, 10 escapes", dict(window=2, escapes=10)),
      ("windows 8, 100 escapes (default)", dict()),
    ]
  return [(f"windows 8, {budget:g} s budget", dict(time_limit=budget))]


def run(sizes, budgets, warm: bool):
  out = []
  dev = jax.devices()[0]
  print(
    f"# backend {jax.default_backend()} ({dev.device_kind}), jax {jax.__version__}, "
    f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}",
    flush=True,
  )
  for size in sizes:
    rows, cols = (int(x) for x in size.split("x"))
    w = apex_matrix(rows, cols)
    budget = budgets.get(cols, budgets["default"])
    for label, kw in configs(rows, cols, budget):
      t = time.perf_counter()
      perm, info = search_permutation(w, 2, 4, axis=0, seed=0, return_info=True, **kw)
      cold = time.perf_counter() - t
      warm_s = None
      if warm and "time_limit" not in kw:
        t = time.perf_counter()
        perm2, info2 = search_permutation(w, 2, 4, axis=0, seed=0, return_info=True, **kw)
        warm_s = time.perf_counter() - t
        assert np.array_equal(np.asarray(perm), np.asarray(perm2))
      sc = info.score
      rec = dict(
        size=f"{cols}x{rows}",
        config=label,
        kept=sc.kept,
        kept_identity=sc.kept_identity,
        bound=sc.bound,
        fraction=sc.fraction,
        fraction_identity=sc.kept_identity / sc.total,
        efficacy=sc.efficacy,
        first_call_s=cold,
        warm_s=warm_s,
        rounds=info.rounds,
        escapes=info.escapes,
        converged=info.converged,
        backend=jax.default_backend(),
        device=dev.device_kind,
      )
      out.append(rec)
      ws = "-" if warm_s is None else f"{warm_s:.3f}"
      print(
        f"{cols:>5}ch x {rows:>5} | {label:<34} | kept {sc.kept:12.3f} "
        f"({100 * sc.kept_identity / sc.total:.2f}% -> {100 * sc.fraction:.2f}%) | "
        f"efficacy {sc.efficacy:6.2f}% | first {cold:8.3f} s | warm {ws:>7} s | "
        f"rounds {info.rounds} escapes {info.escapes}",
        flush=True,
      )
  return out


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument(
    "--sizes",
    default="128x64,256x256,1024x1024,4096x4096",
    help="comma-separated ROWSxCHANNELS (apex: 128 rows x 64 channels)",
  )
  ap.add_argument("--budget-1024", type=float, default=30.0, help="seconds for 1024 channels")
  ap.add_argument("--budget-4096", type=float, default=60.0, help="seconds for 4096 channels")
  ap.add_argument("--no-warm", action="store_true", help="skip the second (warm) call")
  ap.add_argument("--json", default=None, help="write the records here")
  args = ap.parse_args(argv)
  print("# apex (V100, published):")
  for label, kept, eff, sec in APEX:
    print(
      f"#   {label:<30} kept {kept:9.3f} efficacy {eff:5.1f}%"
      + (f" {sec} s" if sec is not None else "")
    )
  budgets = {1024: args.budget_1024, 4096: args.budget_4096, "default": args.budget_4096}
  recs = run(args.sizes.split(","), budgets, not args.no_warm)
  if args.json:
    _meta.write_json(args.json, recs)


if __name__ == "__main__":
  main()
