"""Wall time of every step of the recipe on each model of the conformance zoo (CPU).

Runs the steps of ``tests/zoo_test.py`` (layouts, prune, 20 fine-tuning steps,
permute, Wanda + SparseGPT, ONNX export + ``jasp check``) on each family of
``tests/zoo`` in one process, in order, and records per step its wall time and
whether its checks passed, plus what jasp did: how many leaves (and layers of
stacked kernels) it pruned, why the others stay dense, how many channel classes
it permuted, SparseGPT's and magnitude pruning's held-out output errors.

A step's time includes jasp's first calls (tracing, compilation) and the test's
own independent checks, as a user running the recipe once would see it; the
first case also pays for JAX's and jax2onnx's imports.

Usage::

  python benchmarks/zoo_steps.py --json benchmarks/results/zoo_steps_cpu_<date>.json
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import pathlib
import sys
import tempfile
import time
import traceback

import numpy as np

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import _meta  # noqa: E402  (benchmarks/_meta.py)
import zoo  # noqa: E402
import zoo_test  # noqa: E402


def _summary(ctx) -> dict:
  masks = zoo_test.leaves(ctx.masks, keep_none=True) if ctx.masks is not None else {}
  pruned = [p for p, mk in masks.items() if mk is not None]
  layers = 0
  for p in pruned:
    lay = ctx.layouts[p]
    layers += int(np.prod([np.shape(masks[p])[a] for a in lay.stack])) if lay.stack else 1
  reasons = collections.Counter()
  for p, lay in (ctx.layouts or {}).items():
    if masks.get(p) is None:
      reasons[(lay.reason or "policy").split(":")[0][:60]] += 1
  out = {"pruned_leaves": len(pruned), "pruned_layers": layers, "dense": dict(reasons)}
  report = getattr(ctx, "perm_report", None)
  if report is not None:
    out["classes_permuted"] = [len(report.permuted), len(report.classes)]
  out["calibration_errors"] = getattr(ctx, "calib_errors", None)
  return out


def run_case(case, tmp: str) -> dict:
  t0 = time.perf_counter()
  ctx = zoo_test.setup(case)
  steps = {}
  for name, fn in zoo_test.STEP_FUNCS:
    t1 = time.perf_counter()
    try:
      fn(ctx, pathlib.Path(tmp)) if name == "export" else fn(ctx)
      status, msg = "PASS", ""
    except Exception as e:  # noqa: BLE001 - recorded; later steps still run
      status = "FAIL"
      msg = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200]}"
      traceback.print_exc()
    steps[name] = {"status": status, "seconds": round(time.perf_counter() - t1, 2), "msg": msg}
    print(f"  {case.name:14s} {name:12s} {status} {steps[name]['seconds']:7.2f} s", flush=True)
  return {
    "case": case.name,
    "framework": case.framework,
    "steps": steps,
    "seconds": round(time.perf_counter() - t0, 2),
    "summary": _summary(ctx),
  }


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--cases", default="", help="comma-separated case names (default: all)")
  ap.add_argument("--json", default="", help="write the results to this file")
  args = ap.parse_args()
  want = [c for c in args.cases.split(",") if c]
  cases = [c for c in zoo.all_cases() if not want or c.name in want]
  out = {"cases": []}
  with tempfile.TemporaryDirectory() as tmp:
    for case in cases:
      out["cases"].append(run_case(case, tmp))
  names = [n for n, _ in zoo_test.STEP_FUNCS]
  print("\n| model | " + " | ".join(names) + " | total |")
  print("| --- |" + " --- |" * (len(names) + 1))
  for r in out["cases"]:
    cells = [
      f"{r['steps'][n]['seconds']:.1f} s" + ("" if r["steps"][n]["status"] == "PASS" else " (FAIL)")
      for n in names
    ]
    print(f"| {r['case']} | " + " | ".join(cells) + f" | {r['seconds']:.1f} s |")
  for r in out["cases"]:
    print(r["case"], json.dumps(r["summary"]))
  if args.json:
    _meta.write_json(args.json, out)


if __name__ == "__main__":
  main()
