"""First call of ``search_permutation`` in a fresh process, before vs after a change.

The first call of a process pays for tracing and compiling the search; this
script measures it the only honest way, one fresh Python process per call,
alternating the code under test with a baseline checkout so that both see the
same machine load. Each child imports jax and jasp (not timed), draws apex's
test matrix (``benchmarks/permutation_bench.py``'s ``apex_matrix``) and times
one ``search_permutation`` call with the given arguments (default: the
library's defaults), then a second, warm call. No persistent compilation cache
is used unless ``--cache-dir`` is given (then the first run of each side fills
it and the later ones read it).

Usage::

  python3 benchmarks/permutation_first_call.py --runs 5
  python3 benchmarks/permutation_first_call.py --baseline main --runs 5 --out first_call.json
  python3 benchmarks/permutation_first_call.py --kwargs '{"window": 3, "escapes": 0}'

``--baseline REF`` extracts the git revision ``REF`` of this repository into a
temporary directory (``git archive``) and runs it as the "before" side;
``--baseline-dir DIR`` uses an existing checkout instead.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import _meta  # noqa: E402  (benchmarks/_meta.py)

CHILD = r"""
import hashlib, json, os, sys, time
sys.path.insert(0, sys.argv[1])
import jax, numpy as np
from jasp.permutation.search import search_permutation
rows, cols = (int(x) for x in sys.argv[2].split("x"))
kw = json.loads(sys.argv[3])
np.random.seed(1)
w = np.random.rand(rows, cols).astype(np.float32).T
t = time.perf_counter()
perm, info = search_permutation(w, 2, 4, axis=0, seed=0, return_info=True, **kw)
first = time.perf_counter() - t
t = time.perf_counter()
perm2, _ = search_permutation(w, 2, 4, axis=0, seed=0, return_info=True, **kw)
warm = time.perf_counter() - t
p = np.asarray(perm)
print("RESULT " + json.dumps(dict(
  first_call_s=first, warm_s=warm, efficacy=info.score.efficacy, kept=info.score.kept,
  rounds=info.rounds, escapes=info.escapes, same_warm=bool(np.array_equal(p, np.asarray(perm2))),
  perm_sha1=hashlib.sha1(p.astype(np.int64).tobytes()).hexdigest()[:12])))
"""


def child(root: str, size: str, kwargs: str, cache_dir: str | None) -> dict:
  """One fresh process running ``root``'s search; its RESULT record."""
  env = dict(os.environ)
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  if cache_dir:
    env["JAX_COMPILATION_CACHE_DIR"] = cache_dir
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  else:
    env["JAX_ENABLE_COMPILATION_CACHE"] = "false"
  out = subprocess.run(
    [sys.executable, "-c", CHILD, root, size, kwargs],
    capture_output=True,
    text=True,
    env=env,
    timeout=600,
  )
  for line in out.stdout.splitlines():
    if line.startswith("RESULT "):
      return json.loads(line[len("RESULT ") :])
  raise RuntimeError(f"child failed ({root}):\n{out.stderr[-3000:]}")


def baseline_dir(ref: str, tmp: str) -> str:
  """``git archive`` of ``ref`` extracted under ``tmp``."""
  dest = os.path.join(tmp, "baseline")
  os.makedirs(dest)
  arch = subprocess.run(["git", "archive", ref], cwd=ROOT, capture_output=True, check=True)
  subprocess.run(["tar", "-x", "-C", dest], input=arch.stdout, check=True)
  return dest


def summary(recs: list[dict]) -> dict:
  firsts = [r["first_call_s"] for r in recs]
  return dict(
    first_call_median_s=statistics.median(firsts),
    first_call_min_s=min(firsts),
    first_call_max_s=max(firsts),
    warm_median_s=statistics.median(r["warm_s"] for r in recs),
    efficacy=recs[0]["efficacy"],
    perm_sha1=sorted({r["perm_sha1"] for r in recs}),
  )


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--size", default="128x64", help="ROWSxCHANNELS (apex: 128 rows x 64 channels)")
  ap.add_argument("--kwargs", default="{}", help="search_permutation arguments as JSON")
  ap.add_argument("--runs", type=int, default=3, help="fresh processes per side")
  ap.add_argument("--baseline", default=None, help="git revision to compare against")
  ap.add_argument("--baseline-dir", default=None, help="checkout to compare against")
  ap.add_argument("--cache-dir", default=None, help="persistent compilation cache (off if unset)")
  ap.add_argument("--out", default=None, help="write the records here (JSON)")
  args = ap.parse_args(argv)
  with tempfile.TemporaryDirectory() as tmp:
    sides = {"after": ROOT}
    if args.baseline_dir:
      sides = {"before": args.baseline_dir, **sides}
    elif args.baseline:
      sides = {"before": baseline_dir(args.baseline, tmp), **sides}
    recs = {name: [] for name in sides}
    for i in range(args.runs):
      for name, root in sides.items():
        cache = os.path.join(args.cache_dir, name) if args.cache_dir else None
        r = child(root, args.size, args.kwargs, cache)
        recs[name].append(r)
        print(
          f"run {i} {name:>6}: first {r['first_call_s']:.3f} s  warm {r['warm_s']:.3f} s  "
          f"efficacy {r['efficacy']:.2f}%  rounds {r['rounds']}  perm {r['perm_sha1']}",
          flush=True,
        )
  result = {name: dict(summary(v), runs=v) for name, v in recs.items()}
  print(f"\n{args.size} {args.kwargs}  (median / min / max of {args.runs} fresh processes)")
  for name, s in result.items():
    print(
      f"{name:>6}: first call {s['first_call_median_s']:.3f} / {s['first_call_min_s']:.3f} / "
      f"{s['first_call_max_s']:.3f} s   warm {s['warm_median_s']:.3f} s   "
      f"efficacy {s['efficacy']:.2f}%"
    )
  if args.out:
    cfg = dict(size=args.size, kwargs=json.loads(args.kwargs), runs=args.runs)
    _meta.write_json(args.out, dict(config=cfg, baseline=args.baseline, **result))


if __name__ == "__main__":
  main()
