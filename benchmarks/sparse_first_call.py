"""Cost of the first jasp.sparse call of a new shape, in a fresh process.

Run on the device machine, one process per case (the plan cache lives in the
process)::

    python3 benchmarks/sparse_first_call.py float16 8192 8192 8192
    JASP_SPARSE_DEBUG=1 python3 benchmarks/sparse_first_call.py bfloat16 8192 8192 8192

Arguments: dtype, ``in``, ``out``, tokens (``y = x @ W`` with ``W (in, out)``
2:4 along ``in``). Prints one ``RESULT`` line: start-up (imports, GPU and
extension load), compression, the first jitted call (compilation, plan
building and the algorithm search), a second call, and the configuration the
search chose (or the search cache held: run it twice with the same
``$JASP_SPARSE_SEARCH_CACHE`` file to see a later process's first call).
Then one ``# meta {...}`` line (commit, versions, device: ``benchmarks/_meta.py``);
append both to the results file. ``JASP_SPARSE_DEBUG=1`` time-stamps every
step of the search on stderr. Timings are host wall time; this measures
one-off costs, not speed.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

T_START = time.perf_counter()
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import _meta  # noqa: E402  (benchmarks/_meta.py)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import jasp  # noqa: E402
from jasp import sparse  # noqa: E402
from jasp.sparse import _runtime  # noqa: E402


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("dtype", choices=["bfloat16", "float16"])
  ap.add_argument("k", type=int, help="in (the 2:4 axis)")
  ap.add_argument("n", type=int, help="out")
  ap.add_argument("tokens", type=int)
  args = ap.parse_args()
  dt, k, n, t = jnp.dtype(args.dtype), args.k, args.n, args.tokens
  ok, why = sparse.status()
  print("status", why, flush=True)
  if not ok:
    return
  t0 = time.perf_counter()
  w = jax.random.normal(jax.random.key(0), (k, n), jnp.float32)
  w = jnp.where(jasp.nm_mask(w, 2, 4, 0), w, 0).astype(dt)
  x = jax.random.normal(jax.random.key(1), (t, k), jnp.float32).astype(dt)
  jax.block_until_ready((w, x))
  t1 = time.perf_counter()
  sw = sparse.compress(w)
  jax.block_until_ready(sw.compressed)
  t2 = time.perf_counter()
  f = jax.jit(sparse.sparse_matmul)
  jax.block_until_ready(f(x, sw))
  t3 = time.perf_counter()
  jax.block_until_ready(f(x, sw))
  t4 = time.perf_counter()
  plans = [
    (p["alg_id"], p["search_ms"], "cache" if p["from_cache"] else "searched")
    for p in _runtime.runtime().plans()
  ]
  print(
    f"RESULT {dt.name} {k}x{n} t={t} start-up {t0 - T_START:.2f}s compress {t2 - t1:.2f}s "
    f"first_call {t3 - t2:.2f}s second {1e3 * (t4 - t3):.2f}ms plans(alg_id, search_ms, origin)={plans}",
    flush=True,
  )
  print(_meta.header_line(), flush=True)  # commit, versions, device of this run


if __name__ == "__main__":
  main()
