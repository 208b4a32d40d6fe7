"""2:4 sparse matmul (jasp.sparse, cuSPARSELt through jax.ffi) vs XLA's dense jnp.dot.

Run on the device machine::

    python3 benchmarks/sparse_matmul_bench.py                 # everything (JSON under $OUT)
    python3 benchmarks/sparse_matmul_bench.py --quick         # two shapes, a smoke test
    python3 benchmarks/sparse_matmul_bench.py --budget-s 300  # stop starting new rows after 300 s
    python3 benchmarks/sparse_matmul_bench.py --policy-check --out policy.json  # the policy's choices

``y = x @ W`` with a Flax kernel ``W (in, out)`` 2:4 along ``in``, ``x (tokens, in)``.
Timing: each function is jitted and warmed up (the sparse plan search
included); where PyTorch is importable its CUPTI profiler records every kernel
the process runs, JAX's and cuSPARSELt's included, and the figure is the sum of
kernel durations per call over back-to-back calls on 2 rotating inputs
("device"); else the host wall time per call. The policy column is what
:class:`jasp.sparse.MatmulPolicy` decides from a host-timed measurement of these
calls (the policy's former method; ``--policy-check`` compares it with the
device-time measurement the policy now makes) and the resulting time relative
to dense.
Per-call overhead: host time per call for small problems (back-to-back and
one synchronous call), jasp sparse vs jnp.dot vs PyTorch's ``_cslt_sparse_mm``
(which builds its cuSPARSELt plan on every call).

``--policy-check`` (only this, about 1-2 minutes on an H200): per row of
POLICY_SHAPES x POLICY_TOKENS (bf16, or ``--shapes``/``--tokens``), the CUPTI
dense and sparse times, the policy's former host-timed measurement
(``autotune.measure_gpu_host``) and its device-time measurement
(``autotune.measure_gpu``), the choice each makes, and whether that choice is
within 5 % of the faster path by CUPTI time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
# Search every shape afresh (the first-call and alg_id columns report the search).
os.environ.setdefault("JASP_SPARSE_SEARCH_CACHE", "0")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.extend import core as jex_core  # noqa: E402

import jasp  # noqa: E402
from jasp import sparse  # noqa: E402
from jasp.sparse import _compress as compress_lib  # noqa: E402
from jasp.sparse import _runtime  # noqa: E402
from jasp.sparse import autotune as policy_lib  # noqa: E402

# Load the extension (and its cuSPARSELt, e.g. $CUSPARSELT_HOME's) before
# PyTorch, which preloads the libcusparseLt.so.0 of its own wheel.
sparse.status()

from _bench_util import DeviceClock  # noqa: E402
from _bench_util import Recorder  # noqa: E402

try:
  import torch  # noqa: E402
except Exception:
  torch = None

# (in, out) of the Flax kernel; the names are PyTorch's (out x in).
SHAPES = {
  "8192x8192": (8192, 8192),
  "14336x4096 (up)": (4096, 14336),
  "4096x14336 (down)": (14336, 4096),
  "7B attn 4096x4096": (4096, 4096),
  "7B mlp 11008x4096 (up)": (4096, 11008),
  "7B mlp 4096x11008 (down)": (11008, 4096),
  "16384x16384": (16384, 16384),
}
TOKENS = [16, 64, 256, 1024, 2048, 4096, 8192, 16384]
POLICY_SHAPES = ["8192x8192", "14336x4096 (up)", "4096x14336 (down)"]
POLICY_TOKENS = [16, 64, 256, 1024, 4096]
# A choice is right when its path's CUPTI time is within this of the faster path's.
POLICY_TOLERANCE = 1.05


CLOCK = DeviceClock()


def w24(k: int, n: int, dtype, seed: int = 0) -> jax.Array:
  w = jax.random.normal(jax.random.key(seed), (k, n), jnp.float32)
  return jnp.where(jasp.nm_mask(w, 2, 4, 0), w, 0).astype(dtype)


def rand(shape, dtype, seed):
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32).astype(dtype)


def host_per_call(fn, argsets, n: int) -> float:
  t0 = time.perf_counter()
  out = None
  for i in range(n):
    out = fn(*argsets[i % len(argsets)])
  jax.block_until_ready(out)
  return (time.perf_counter() - t0) / n


def device_per_call(fn, argsets, reps: int) -> float | None:
  def run():
    out = None
    for i in range(reps):
      out = fn(*argsets[i % len(argsets)])
    jax.block_until_ready(out)

  return CLOCK.measure(run, reps)


def time_fn(fn, argsets, est_s: float) -> dict:
  reps = int(min(50, max(6, 0.05 / max(est_s, 1e-6))))
  host = statistics.median(host_per_call(fn, argsets, reps) for _ in range(3))
  dev = device_per_call(fn, argsets, reps)
  return {"host_ms": host * 1e3, "device_ms": None if dev is None else dev * 1e3}


def best(t: dict) -> float:
  return t["device_ms"] if t["device_ms"] is not None else t["host_ms"]


DENSE = jax.jit(lambda x, w: jnp.dot(x, w))


SPARSE = jax.jit(lambda x, s: sparse.sparse_matmul(x, s))


def bench_shape(name, k, n, dtype, tokens, out, deadline, a_order):
  w = w24(k, n, dtype)
  t0 = time.perf_counter()
  sw = sparse.compress(w, dtype=dtype, a_order=a_order)
  if not sw.is_compressed:  # e.g. fp16 where it is not verified: the dense path
    out.setdefault("rows", []).append(
      {
        "shape": name,
        "tokens": tokens[0],
        "skipped": f"{jnp.dtype(dtype).name} a_order={a_order} not compressed (dense path)",
      }
    )
    return
  jax.block_until_ready(sw.compressed)
  compress_ms = (time.perf_counter() - t0) * 1e3
  rows = []
  for t in tokens:
    if time.perf_counter() > deadline:
      rows.append({"shape": name, "tokens": t, "skipped": "time budget"})
      continue
    xs = [(rand((t, k), dtype, 10 + i),) for i in range(2)]
    d_args = [(x, sw.dense) for (x,) in xs]
    s_args = [(x, sw) for (x,) in xs]
    ts = time.perf_counter()
    jax.block_until_ready(SPARSE(*s_args[0]))  # compile + plan search
    first_ms = (time.perf_counter() - ts) * 1e3
    jax.block_until_ready(DENSE(*d_args[0]))
    y = SPARSE(*s_args[1])
    ref = jnp.dot(
      xs[1][0].astype(jnp.float32), w.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST
    )
    err = float(jnp.linalg.norm(y.astype(jnp.float32) - ref) / jnp.linalg.norm(ref))
    est = 2.0 * t * k * n / 5e14
    td = time_fn(DENSE, d_args, est)
    tsp = time_fn(SPARSE, s_args, est / 1.5)
    # The policy's decision from a host-timed measurement of these calls (its former method).
    inner = min(500, max(3, int(2e-3 / max(est, 1e-6))))
    hd = statistics.median(host_per_call(DENSE, d_args, inner) for _ in range(5))
    hs = statistics.median(host_per_call(SPARSE, s_args, inner) for _ in range(5))
    choice = policy_choice((hd, hs), k, n, t, jnp.dtype(dtype).name)
    sp = best(td) / best(tsp)
    t_pad = -(-t // compress_lib.SIZE_MULTIPLE) * compress_lib.SIZE_MULTIPLE
    plan = next(
      (
        p
        for p in _runtime.runtime().plans()
        if (p["out"], p["in"], p["tokens"], p["dtype"], p["a_order"], p["bias_epilogue"])
        == (n, k, t_pad, jnp.dtype(dtype).name, a_order, False)
      ),
      {},
    )
    row = {
      "shape": name,
      "in": k,
      "out": n,
      "tokens": t,
      "dtype": jnp.dtype(dtype).name,
      "a_order": "row" if a_order == sparse.A_ROW else "col",
      "dense": td,
      "sparse": tsp,
      "speedup": sp,
      "rel_err": err,
      "first_call_ms": first_ms,
      "compress_ms": compress_ms,
      "policy": "sparse" if choice.sparse else "dense",
      "policy_vs_dense": sp if choice.sparse else 1.0,
      "policy_host_speedup": hd / hs,
      "alg_id": plan.get("alg_id"),
      "search_ms": plan.get("search_ms"),
    }
    rows.append(row)
    print(
      json.dumps(
        {
          k2: (round(v, 4) if isinstance(v, float) else v)
          for k2, v in row.items()
          if k2 not in ("dense", "sparse")
        }
        | {"dense_ms": round(best(td), 4), "sparse_ms": round(best(tsp), 4)}
      ),
      flush=True,
    )
  out.setdefault("rows", []).extend(rows)
  del sw, w


def _cupti_pair(k, n, t, dtype, sw) -> tuple[dict, dict]:
  """Dense and sparse timings (``time_fn``: CUPTI where available) at ``t`` tokens."""
  xs = [(rand((t, k), dtype, 10 + i),) for i in range(2)]
  d_args = [(x, sw.dense) for (x,) in xs]
  s_args = [(x, sw) for (x,) in xs]
  jax.block_until_ready(SPARSE(*s_args[0]))  # compile + plan search
  jax.block_until_ready(DENSE(*d_args[0]))
  est = 2.0 * t * k * n / 5e14
  return time_fn(DENSE, d_args, est), time_fn(SPARSE, s_args, est / 1.5)


def policy_choice(measured: tuple[float, float], k: int, n: int, t: int, dtype: str):
  """``autotune.choose`` in "auto" mode on given (dense_s, sparse_s), through a fresh cache.

  (``cache_file=""`` is one in-memory cache per process, which would hand a
  second measurement of the same key the first one's times.)
  """
  with tempfile.TemporaryDirectory() as d:
    pol = sparse.MatmulPolicy(measure=lambda *a: measured, cache_file=os.path.join(d, "t.json"))
    return policy_lib.choose(pol, k=k, n=n, t=t, dtype=dtype, compressed=True, has_dense=True)


def _judge(name: str, measured: tuple[float, float], d_ms: float, s_ms: float, k, n, t) -> dict:
  """The policy's choice from ``measured`` (dense_s, sparse_s) and how it fares by CUPTI time."""
  c = policy_choice(measured, k, n, t, "bfloat16")
  chosen = s_ms if c.sparse else d_ms
  return {
    f"{name}_dense_ms": measured[0] * 1e3,
    f"{name}_sparse_ms": measured[1] * 1e3,
    f"{name}_speedup": measured[0] / measured[1],
    f"{name}_choice": "sparse" if c.sparse else "dense",
    f"{name}_vs_best": chosen / min(d_ms, s_ms),
    f"{name}_ok": chosen <= POLICY_TOLERANCE * min(d_ms, s_ms),
  }


def policy_check(out, names, tokens, deadline, a_order):
  """Per shape and token count: CUPTI times, the former and the new policy measurement."""
  dtype = jnp.bfloat16
  rows = out.setdefault("policy_rows", [])
  for name in names:
    k, n = SHAPES[name]
    sw = sparse.compress(w24(k, n, dtype), dtype=dtype, a_order=a_order)
    for t in tokens:
      if time.perf_counter() > deadline:
        rows.append({"shape": name, "tokens": t, "skipped": "time budget"})
        continue
      td, tsp = _cupti_pair(k, n, t, dtype, sw)
      d_ms, s_ms = best(td), best(tsp)
      t0 = time.perf_counter()
      old = policy_lib.measure_gpu_host(k, n, t, "bfloat16", a_order=a_order)
      t1 = time.perf_counter()
      new = policy_lib.measure_gpu(k, n, t, "bfloat16", a_order=a_order)
      t2 = time.perf_counter()
      row = {
        "shape": name,
        "in": k,
        "out": n,
        "tokens": t,
        "dtype": "bfloat16",
        "timing": "cupti" if td["device_ms"] is not None else "host",
        "dense_ms": d_ms,
        "sparse_ms": s_ms,
        "speedup": d_ms / s_ms,
        "faster": "sparse" if s_ms < d_ms else "dense",
        **_judge("old", old, d_ms, s_ms, k, n, t),
        **_judge("new", new, d_ms, s_ms, k, n, t),
        "old_measure_s": t1 - t0,
        "new_measure_s": t2 - t1,
      }
      rows.append(row)
      print(json.dumps({a: round(v, 4) if isinstance(v, float) else v for a, v in row.items()}))
    del sw
  done = [r for r in rows if "skipped" not in r]
  out["policy_summary"] = {
    "rows": len(done),
    "old_ok": sum(r["old_ok"] for r in done),
    "new_ok": sum(r["new_ok"] for r in done),
    "target_met": bool(done) and all(r["new_ok"] for r in done),
  }


def fmt_policy(rows) -> str:
  lines = [
    "| shape (out x in) | tokens | dense ms | sparse ms | speedup | old meas. | old choice |"
    " new meas. | new choice | old ok | new ok |",
    "|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    if "skipped" in r:
      lines.append(f"| {r['shape']} | {r['tokens']} | skipped ({r['skipped']}) |||||||||")
      continue
    ok = lambda v: "yes" if v else "NO"
    lines.append(
      f"| {r['shape']} | {r['tokens']} | {r['dense_ms']:.4f} | {r['sparse_ms']:.4f} | "
      f"{r['speedup']:.2f}x | {r['old_speedup']:.2f}x | {r['old_choice']} | "
      f"{r['new_speedup']:.2f}x | {r['new_choice']} | {ok(r['old_ok'])} "
      f"({r['old_vs_best']:.2f}) | {ok(r['new_ok'])} ({r['new_vs_best']:.2f}) |"
    )
  return "\n".join(lines)


def overhead(out):
  """Per-call cost of small problems: jasp sparse vs jnp.dot vs torch _cslt_sparse_mm."""
  res = {}
  for k, n, t in [(4096, 4096, 16), (4096, 4096, 256), (8192, 8192, 16)]:
    dtype = jnp.bfloat16
    w = w24(k, n, dtype)
    sw = sparse.compress(w)
    xs = [(rand((t, k), dtype, 20 + i),) for i in range(2)]
    d_args = [(x, sw.dense) for (x,) in xs]
    s_args = [(x, sw) for (x,) in xs]
    r = {}
    for name, fn, args in (("jnp.dot", DENSE, d_args), ("jasp sparse", SPARSE, s_args)):
      jax.block_until_ready(fn(*args[0]))
      b2b = statistics.median(host_per_call(fn, args, 200) for _ in range(5))
      lat = []
      for i in range(50):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args[i % 2]))
        lat.append(time.perf_counter() - t0)
      dev = device_per_call(fn, args, 50)
      r[name] = {
        "back_to_back_ms": b2b * 1e3,
        "sync_latency_ms": statistics.median(lat) * 1e3,
        "device_ms": None if dev is None else dev * 1e3,
      }
    if torch is not None and torch.cuda.is_available():
      try:
        wt = (
          torch.from_numpy(np.asarray(jax.device_get(w.T.astype(jnp.float32))))
          .to("cuda", torch.bfloat16)
          .contiguous()
        )
        wc = torch._cslt_compress(wt)
        xt = torch.randn(k, t, device="cuda", dtype=torch.bfloat16)
        torch._cslt_sparse_mm(wc, xt)
        torch.cuda.synchronize()
        b2b = []
        for _ in range(5):
          t0 = time.perf_counter()
          for _ in range(200):
            torch._cslt_sparse_mm(wc, xt)
          torch.cuda.synchronize()
          b2b.append((time.perf_counter() - t0) / 200)
        r["torch _cslt_sparse_mm"] = {"back_to_back_ms": statistics.median(b2b) * 1e3}
      except Exception as e:
        r["torch _cslt_sparse_mm"] = {"error": f"{type(e).__name__}: {e}"[:300]}
    res[f"{k}x{n} t={t}"] = r
    print(json.dumps({f"{k}x{n} t={t}": r}), flush=True)
  out["overhead"] = res


def _eqns(jaxpr):
  for eqn in jaxpr.eqns:
    yield eqn
    for sub in jex_core.jaxprs_in_params(eqn.params):
      yield from _eqns(sub)


def end_to_end(out, batch: int, context: int, dim: int, depth: int):
  """The examples/lm.py decoder (nnx), bf16, dense masked vs jasp.sparse (policy auto)."""
  from flax import nnx

  sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
  from lm import DecoderLM

  model = DecoderLM(
    vocab=256,
    dim=dim,
    heads=dim // 128,
    depth=depth,
    context=context,
    dtype=jnp.bfloat16,
    param_dtype=jnp.bfloat16,
    rngs=nnx.Rngs(0),
  )
  tokens = jax.random.randint(jax.random.key(1), (batch, context), 0, 256)
  # 2:4 by magnitude along each kernel's traced reduction axes; the head stays dense.
  pruned, _ = jasp.prune(
    nnx.state(model, nnx.Param),
    layouts=jasp.trace_layouts(model, tokens),
    policy=jasp.Policy(exclude=(r"^head/",)),
  )
  nnx.update(model, pruned)

  def fwd_fn(m):
    g, s = nnx.split(m)
    return jax.jit(lambda s, t: nnx.merge(g, s)(t)), s

  dense_f, dense_s = fwd_fn(model)
  ref = jax.block_until_ready(dense_f(dense_s, tokens))
  # Like for like: every dot of the dense model must run in bf16.
  dots = {}
  for eqn in _eqns(jax.make_jaxpr(dense_f)(dense_s, tokens).jaxpr):
    if eqn.primitive.name == "dot_general":
      key = "x".join(str(v.aval.dtype) for v in eqn.invars)
      dots[key] = dots.get(key, 0) + 1
  t0 = time.perf_counter()
  report = sparse.sparsify_nnx(model, dtype=jnp.bfloat16)
  sparsify_s = time.perf_counter() - t0
  sparse_f, sparse_s = fwd_fn(model)
  t0 = time.perf_counter()
  y = jax.block_until_ready(sparse_f(sparse_s, tokens))  # traces: policy measurements
  first_s = time.perf_counter() - t0
  err = float(
    jnp.linalg.norm((y - ref).astype(jnp.float32)) / jnp.linalg.norm(ref.astype(jnp.float32))
  )
  td = time_fn(dense_f, [(dense_s, tokens)], 0.01)
  ts = time_fn(sparse_f, [(sparse_s, tokens)], 0.01)
  res = {
    "batch": batch,
    "context": context,
    "dim": dim,
    "depth": depth,
    "tokens": batch * context,
    "dense": td,
    "sparse": ts,
    "speedup": best(td) / best(ts),
    "rel_err_logits": err,
    "dense_dot_dtypes": dots,
    "sparsify_s": sparsify_s,
    "first_call_s": first_s,
    "report": report,
  }
  out["end_to_end"] = res
  print(json.dumps({k: v for k, v in res.items() if k != "report"}), flush=True)


def fmt_rows(rows) -> str:
  lines = [
    "| shape (out x in) | tokens | dtype | A | dense ms | jasp sparse ms | speedup | policy |"
    " policy/dense |",
    "|---|---|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    if "skipped" in r:
      lines.append(f"| {r['shape']} | {r['tokens']} | – | – | skipped ({r['skipped']}) |||||")
      continue
    lines.append(
      f"| {r['shape']} | {r['tokens']} | {r['dtype']} | {r['a_order']} | "
      f"{best(r['dense']):.4f} | {best(r['sparse']):.4f} | {r['speedup']:.2f}x | "
      f"{r['policy']} | {r['policy_vs_dense']:.2f}x |"
    )
  return "\n".join(lines)


def _torch_cusparselt():
  try:
    return torch.backends.cusparselt.version()
  except Exception:
    return None


def _header() -> dict:
  return {
    "device": jax.devices()[0].device_kind,
    "jax": jax.__version__,
    "status": sparse.status()[1],
    "torch": None if torch is None else torch.__version__,
    "torch_cusparselt": _torch_cusparselt(),
    "timing": "CUPTI kernel sums" if CLOCK.ok else "host",
  }


def main_policy_check(args):
  """``--policy-check``: the policy's choices against CUPTI times; JSON to ``--out``."""
  start = time.perf_counter()
  out = {**_header(), "mode": "policy-check", "tolerance": POLICY_TOLERANCE}
  print(json.dumps(out), flush=True)
  path = args.out or os.path.join(os.environ.get("OUT", "/tmp"), "sparse_policy_check.json")
  rec = Recorder(out, path)
  if sparse.status()[0]:
    names = POLICY_SHAPES
    if args.shapes:
      names = [n for n in SHAPES if any(s in n for s in args.shapes.split(","))]
    tokens = [int(t) for t in args.tokens.split(",")] if args.tokens else POLICY_TOKENS
    order = {"row": sparse.A_ROW, "col": sparse.A_COL}.get(args.layouts or "row", sparse.A_ROW)
    budget = args.budget_s if args.budget_s < 1e9 else 110.0  # default: the 120 s target
    rec.stage(policy_check, out, names, tokens, start + budget, order)
  out["wall_s"] = time.perf_counter() - start
  rec.save()
  print(f"\n{out['device']}, jax {out['jax']}, timing: {out['timing']}; {out['status']}")
  print(fmt_policy(out.get("policy_rows", [])))
  print("summary:", json.dumps(out.get("policy_summary")), f"wall {out['wall_s']:.1f} s")
  if out.get("errors"):
    print("errors:", out["errors"])
  print("written:", path)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--quick", action="store_true")
  ap.add_argument("--budget-s", type=float, default=1e9)
  ap.add_argument("--no-e2e", action="store_true")
  ap.add_argument("--shapes", default="")
  ap.add_argument("--tokens", default="")
  ap.add_argument("--no-overhead", action="store_true")
  ap.add_argument("--dtypes", default="bfloat16", help="comma-separated: bfloat16,float16")
  ap.add_argument(
    "--layouts",
    default="",
    help="comma-separated A layouts: row,col (default: the library's default)",
  )
  ap.add_argument(
    "--extra-tokens",
    default="2048,8192,16384",
    help="token counts of the rows beyond the first dtype and layout",
  )
  ap.add_argument(
    "--policy-check",
    action="store_true",
    help="only the policy check (POLICY_SHAPES x POLICY_TOKENS unless --shapes/--tokens)",
  )
  ap.add_argument(
    "--out", default="", help="the JSON file (default: $OUT/sparse_matmul_bench.json)"
  )
  args = ap.parse_args()
  if args.policy_check:
    return main_policy_check(args)
  start = time.perf_counter()
  deadline = start + args.budget_s
  dev = jax.devices()[0]
  ok, why = sparse.status()
  out = {
    "device": dev.device_kind,
    "jax": jax.__version__,
    "status": why,
    "torch": None if torch is None else torch.__version__,
    "torch_cusparselt": _torch_cusparselt(),
    "date": time.strftime("%Y-%m-%d"),
    "argv": sys.argv[1:],
    "timing": "CUPTI kernel sums" if CLOCK.ok else "host",
  }
  print(json.dumps(out), flush=True)
  if not ok:
    return
  path = args.out or os.path.join(os.environ.get("OUT", "/tmp"), "sparse_matmul_bench.json")

  rec = Recorder(out, path)
  stage, save = rec.stage, rec.save

  tokens = [int(t) for t in args.tokens.split(",")] if args.tokens else TOKENS
  orders = {"row": sparse.A_ROW, "col": sparse.A_COL}
  layouts = (
    [orders[v] for v in args.layouts.split(",")] if args.layouts else [compress_lib.DEFAULT_A_ORDER]
  )
  if not args.no_overhead:
    stage(overhead, out)
  names = list(SHAPES)
  if args.shapes:
    names = [n for n in names if any(s in n for s in args.shapes.split(","))]
  if args.quick:
    names = names[:2]
  for name in names:
    if name == "16384x16384" and not args.no_e2e and time.perf_counter() < deadline:
      stage(end_to_end, out, 4, 2048, 4096, 2)
    k, n = SHAPES[name]
    first = True
    for dt in args.dtypes.split(","):
      for lay in layouts:
        toks = tokens if first else [int(t) for t in args.extra_tokens.split(",")]
        stage(bench_shape, name, k, n, jnp.dtype(dt), toks, out, deadline, lay)
        first = False
  if not args.no_e2e and "end_to_end" not in out and time.perf_counter() < deadline:
    stage(end_to_end, out, 4, 2048, 4096, 2)
  out["wall_s"] = time.perf_counter() - start
  save()
  print(
    f"\n{out['device']}, jax {out['jax']}, {out['date']}, timing: {out['timing']}; {out['status']}"
  )
  print(fmt_rows(out.get("rows", [])))
  for k, v in out.get("overhead", {}).items():
    print(k, json.dumps(v))
  if "end_to_end" in out:
    e = out["end_to_end"]
    print(
      f"end-to-end lm.py decoder dim {e['dim']} depth {e['depth']}, {e['tokens']} tokens: "
      f"dense {best(e['dense']):.3f} ms, sparse {best(e['sparse']):.3f} ms, "
      f"{e['speedup']:.2f}x, rel err {e['rel_err_logits']:.2e}"
    )
  if out.get("errors"):
    print("errors:", out["errors"])


if __name__ == "__main__":
  main()
