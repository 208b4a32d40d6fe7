"""N:M mask computation speed on a GPU: the Pallas kernel against XLA and apex.

Run on the device machine (H100/H200)::

    python3 benchmarks/mask_bench.py            # the BENCHMARKS.md table (+ JSON under $OUT)
    python3 benchmarks/mask_bench.py --sweep    # tiling sweep first
    python3 benchmarks/mask_bench.py --quick    # two shapes, for a smoke test

Timing. Each measured function is jitted over ``K`` distinct inputs (rotating
buffers: together well over the 50 MB L2) so that one dispatch launches ``K``
back-to-back calls; after a warm-up, the median over repetitions of
(wall time to ``block_until_ready``) / ``K`` is the *host* figure. Where PyTorch
is importable its profiler (CUPTI) also records every kernel the process runs,
JAX's included: the sum of kernel durations per call is the *device* figure,
used in the table when available. PyTorch code (apex's algorithm, the copy) is
timed with CUDA events.

Bytes per call: the mask kernel reads the weight and writes a 1-byte mask. The
copy reference copies a buffer of half that many bytes (the same bytes read
plus written), measured in the same run; %copy is copy time / kernel time.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import statistics
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from _bench_util import DeviceClock  # noqa: E402
from _bench_util import Recorder  # noqa: E402

from jasp import _dispatch  # noqa: E402
from jasp import masks  # noqa: E402
from jasp.kernels import mosaic  # noqa: E402
from jasp.kernels import nm2d_mosaic  # noqa: E402
from jasp.kernels import nm2d_pallas  # noqa: E402
from jasp.kernels import nm_mosaic  # noqa: E402
from jasp.kernels import nm_pallas  # noqa: E402

SHAPES = [(4096, 4096), (8192, 8192), (16384, 16384), (4096, 11008), (11008, 4096)]
DTYPES = ["bfloat16", "float32"]
L2_BYTES = 50 << 20

try:
  import torch  # noqa: E402
except Exception:
  torch = None


# ----------------------------------------------------------------------------
# Timing.


CLOCK = None


def time_jax(fn, inputs, iters=20, device=True, breakdown=False):
  """(host seconds per call, device seconds per call or None)."""
  f = jax.jit(lambda *xs: tuple(fn(x) for x in xs))
  jax.block_until_ready(f(*inputs))
  jax.block_until_ready(f(*inputs))
  ts = []
  for _ in range(iters):
    t0 = time.perf_counter()
    jax.block_until_ready(f(*inputs))
    ts.append(time.perf_counter() - t0)
  host = statistics.median(ts) / len(inputs)
  dev = None
  if device and CLOCK is not None:
    reps = 5

    def run():
      for _ in range(reps):
        jax.block_until_ready(f(*inputs))

    dev = CLOCK.measure(run, reps * len(inputs), breakdown)
  return host, dev


def best_time(t):
  host, dev = t
  return dev if dev is not None else host


def time_torch(fn, iters=20, warmup=3):
  """CUPTI kernel time per call where available, else CUDA events (median)."""
  for _ in range(warmup):
    fn()
  torch.cuda.synchronize()
  if CLOCK is not None and CLOCK.ok:

    def run():
      for _ in range(iters):
        fn()
      torch.cuda.synchronize()

    dev = CLOCK.measure(run, iters)
    if dev is not None:
      return dev
  ts = []
  for _ in range(iters):
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    fn()
    b.record()
    b.synchronize()
    ts.append(a.elapsed_time(b) * 1e-3)
  return statistics.median(ts)


# ----------------------------------------------------------------------------
# The formulations.

PATTERNS = np.array(
  [[1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 0, 1], [0, 1, 1, 0], [0, 1, 0, 1], [0, 0, 1, 1]], np.float32
)


def xla_rank(w):
  return masks.nm_mask(w, 2, 4, 0, impl="xla")


def xla_topk(w):
  a = masks.magnitude(w).reshape(w.shape[0] // 4, 4, *w.shape[1:])
  a = jnp.moveaxis(a, 1, -1)
  _, idx = jax.lax.top_k(a, 2)
  keep = jax.nn.one_hot(idx, 4, dtype=jnp.bool_).any(-2)
  return jnp.moveaxis(keep, -1, 1).reshape(w.shape)


def _xla_pattern(w, precision):
  a = jnp.abs(w.astype(jnp.float32)).T.reshape(-1, 4)
  idx = jnp.argmax(jnp.dot(a, PATTERNS.T, precision=precision), axis=1)
  return jnp.asarray(PATTERNS, bool)[idx].reshape(w.shape[::-1]).T


def xla_pattern_default(w):
  return _xla_pattern(w, None)


def xla_pattern_highest(w):
  return _xla_pattern(w, jax.lax.Precision.HIGHEST)


XLA_MASKS = {
  "rank": xla_rank,
  "top_k": xla_topk,
  "pattern_mm": xla_pattern_default,
  "pattern_mm_fp32": xla_pattern_highest,
}


def pallas_mask(axis=0, **tuning):
  return lambda w: nm_pallas.nm_mask_pallas(w, 2, 4, axis, interpret=False, **tuning)


def make_inputs(shape, dtype, k=None, seed=0):
  nbytes = math.prod(shape) * jnp.dtype(dtype).itemsize
  if k is None:
    k = int(min(8, max(2, math.ceil(4 * L2_BYTES / nbytes))))
  keys = jax.random.split(jax.random.PRNGKey(seed), k)
  return [jax.random.normal(kk, shape, jnp.float32).astype(dtype) for kk in keys]


# ----------------------------------------------------------------------------
# Baselines in PyTorch.


def torch_copy_time(nbytes):
  src = torch.empty(int(nbytes), dtype=torch.uint8, device="cuda").random_(0, 255)
  dst = torch.empty_like(src)
  return time_torch(lambda: dst.copy_(src))


def jax_copy_time(nbytes):
  xs = [jnp.full((int(nbytes),), i, jnp.uint8) for i in range(2)]
  return best_time(time_jax(lambda x: x ^ jnp.uint8(1), xs))


def apex_time(shape, dtype_name):
  """apex's m4n2_1d: |w| @ the 6 patterns in float32, argmax, gather (torch layout)."""
  dt = getattr(torch, dtype_name)
  w = torch.randn(shape[::-1], device="cuda", dtype=torch.float32).to(dt)
  pats = torch.tensor(PATTERNS, device="cuda")

  def apex_like():
    a = w.abs().float().reshape(-1, 4)
    idx = torch.argmax(a @ pats.t(), dim=1)
    return pats[idx].reshape(w.shape).bool()

  return time_torch(apex_like, iters=10, warmup=2)


# ----------------------------------------------------------------------------


def sweep(out):
  """Tiling sweep on 8192^2 (both layouts, both dtypes); returns the best configs."""
  res = []
  shape = (8192, 8192)
  grids = {
    0: [
      dict(tile_elems=t, max_contig=c, num_warps=w)
      for t, c, w in itertools.product([256, 512, 1024], [256, 512], [4, 8, 16])
      if c <= t
    ],
    -1: [
      dict(tile_elems=t, max_contig=c, num_warps=8, split=sp)
      for sp, t, c in itertools.product([True, False], [512, 1024, 2048], [128, 256])
    ],
  }
  best = {}
  for dtype, axis in itertools.product(DTYPES, [0, -1]):
    xs = make_inputs(shape, dtype)
    ref = np.asarray(masks.nm_mask(xs[0], 2, 4, axis, impl="xla"))
    for cfg in grids[axis]:
      try:
        fn = pallas_mask(axis, **cfg)
        ok = bool((np.asarray(fn(xs[0])) == ref).all())
        t = time_jax(fn, xs, iters=5)
        res.append(
          {
            "dtype": dtype,
            "axis": axis,
            **cfg,
            "ok": ok,
            "host_us": t[0] * 1e6,
            "dev_us": None if t[1] is None else t[1] * 1e6,
          }
        )
        print(json.dumps(res[-1]), flush=True)
      except Exception as e:
        print(f"sweep {dtype} axis={axis} {cfg}: {type(e).__name__}: {str(e)[:300]}", flush=True)
    rows = [r for r in res if r["dtype"] == dtype and r["axis"] == axis and r["ok"]]
    rows.sort(key=lambda r: r["dev_us"] if r["dev_us"] is not None else r["host_us"])
    for r in rows[:3]:
      print("best", r, flush=True)
    if rows:
      best[dtype, axis] = {k: rows[0][k] for k in grids[axis][0]}
  out["sweep"] = res
  out["sweep_best"] = {f"{k[0]} axis={k[1]}": v for k, v in best.items()}
  return best


def sweep_mosaic(out):
  """Tile sweep of the Mosaic GPU kernel on 8192^2, every output set (docs/design/mosaic-kernels.md)."""
  res = []
  shape = (8192, 8192)
  outsets = [("mask",), ("bits",), ("weight", "mask"), ("weight", "bits", "finite")]
  for dtype in DTYPES:
    xs = make_inputs(shape, dtype)
    want = masks.nm_mask(xs[0], 2, 4, 0, impl="xla")
    for tile, outputs in itertools.product([512, 1024, 2048], outsets):
      p = nm_mosaic.plan(
        shape, 4, 0, packed="bits" in outputs, itemsize=jnp.dtype(dtype).itemsize, tile_elems=tile
      )
      fn = lambda w, p=p, o=outputs: nm_mosaic.nm_mosaic(w, 2, 4, 0, o, p=p, interpret=False)
      try:
        got = fn(xs[0])
        ok = "mask" not in outputs or bool(jnp.array_equal(got[outputs.index("mask")], want))
        t = time_jax(fn, xs, iters=5)
        res.append(
          {
            "dtype": dtype,
            "tile_elems": tile,
            "outputs": outputs,
            "ok": ok,
            "block": p.block,
            "vec": p.vec,
            "dev_us": None if t[1] is None else t[1] * 1e6,
            "host_us": t[0] * 1e6,
          }
        )
        print(json.dumps(res[-1]), flush=True)
      except Exception as e:
        print(
          f"sweep_mosaic {dtype} {tile} {outputs}: {type(e).__name__}: {str(e)[:300]}", flush=True
        )
  out["sweep_mosaic"] = res
  return res


def main_table(out, shapes, dtypes, tuning=None):
  tuning = tuning or {}
  rows = []
  for shape, dtype in itertools.product(shapes, dtypes):
    n_el = math.prod(shape)
    itemsize = jnp.dtype(dtype).itemsize
    nbytes = n_el * (itemsize + 1)
    xs = make_inputs(shape, dtype)
    r = {"shape": shape, "dtype": dtype, "elements": n_el, "bytes": nbytes, "K": len(xs)}
    tune0, tune1 = tuning.get((dtype, 0), {}), tuning.get((dtype, -1), {})
    r["tuning"] = {"axis0": tune0, "axis-1": tune1}
    want = np.asarray(xla_rank(xs[0]))
    got = np.asarray(pallas_mask(0, **tune0)(xs[0]))
    r["pallas_exact"] = bool((got == want).all())
    t = time_jax(pallas_mask(0, **tune0), xs)
    r["pallas_host_s"], r["pallas_dev_s"] = t
    r["pallas_s"] = best_time(t)
    stage_mosaic(r, xs, want)
    # The masked weight (+ mask) in one pass, and the XLA equivalent.
    t = time_jax(
      lambda w, tune0=tune0: nm_pallas.nm_prune_pallas(w, 2, 4, 0, interpret=False, **tune0), xs
    )
    r["prune_pallas_s"] = best_time(t)
    t = time_jax(lambda w: masks.nm_prune(w, 2, 4, 0, impl="xla"), xs)
    r["prune_xla_s"] = best_time(t)
    r["xla"] = {}
    for name, fn in XLA_MASKS.items():
      try:
        exact = bool((np.asarray(fn(xs[0])) == want).all())
        r["xla"][name] = {"s": best_time(time_jax(fn, xs, iters=10)), "exact": exact}
      except Exception as e:
        r["xla"][name] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
    exact_xla = [v["s"] for v in r["xla"].values() if v.get("exact")]
    r["best_xla_s"] = min(exact_xla) if exact_xla else None
    # Group axis last (PyTorch layout): kernel vs XLA rank.
    wt = jax.block_until_ready([x.T for x in xs])
    want_t = np.asarray(masks.nm_mask(wt[0], 2, 4, -1, impl="xla"))
    r["pallas_cols_exact"] = bool((np.asarray(pallas_mask(-1, **tune1)(wt[0])) == want_t).all())
    r["pallas_cols_s"] = best_time(time_jax(pallas_mask(-1, **tune1), wt))
    if "mosaic_s" in r:  # the Mosaic kernel's strided "cols" view
      cols = lambda w: nm_mosaic.nm_mosaic(w, 2, 4, -1, ("mask",), interpret=False)[0]
      r["mosaic_cols_exact"] = bool((np.asarray(cols(wt[0])) == want_t).all())
      r["mosaic_cols_s"] = best_time(time_jax(cols, wt))
    r["xla_cols_s"] = best_time(time_jax(lambda w: masks.nm_mask(w, 2, 4, -1, impl="xla"), wt))
    del xs, wt
    if torch is not None:
      copy_bytes = nbytes // 2
      r["copy_torch_s"] = torch_copy_time(copy_bytes)
      r["copy_jax_s"] = jax_copy_time(copy_bytes)
      r["copy_s"] = min(r["copy_torch_s"], r["copy_jax_s"])
      r["apex_s"] = apex_time(shape, dtype)
    rows.append(r)
    print(json.dumps(r), flush=True)
  out["table"] = rows
  return rows


def mosaic_fn(outputs):
  return lambda w: nm_mosaic.nm_mosaic(w, 2, 4, 0, outputs, interpret=False)


def stage_mosaic(r, xs, want):
  """The Pallas Mosaic GPU kernel on the same inputs: mask, masked weight + mask, packed bits."""
  if not (mosaic.available() and jax.default_backend() == "gpu"):
    return
  try:
    got = np.asarray(mosaic_fn(("mask",))(xs[0])[0])
    r["mosaic_exact"] = bool((got == want).all())
    pw, mk = mosaic_fn(("weight", "mask"))(xs[0])
    r["mosaic_prune_exact"] = bool(
      (np.asarray(mk) == want).all() and jnp.array_equal(pw, jnp.where(want, xs[0], 0))
    )
    r["mosaic_s"] = best_time(time_jax(lambda w: mosaic_fn(("mask",))(w)[0], xs))
    r["mosaic_prune_s"] = best_time(time_jax(mosaic_fn(("weight", "mask")), xs))
    r["mosaic_bits_s"] = best_time(time_jax(lambda w: mosaic_fn(("bits",))(w)[0], xs))
  except Exception as e:
    r["mosaic_error"] = f"{type(e).__name__}: {str(e)[:400]}"


def fmt_mosaic_table(rows):
  """Triton vs Mosaic GPU kernels, each against a copy of the bytes it moves."""
  lines = [
    "| weight | dtype | copy (w + 1 B) | Triton mask | % of copy | Mosaic mask | % of copy | "
    "Mosaic bits | % of copy | w + mask: Triton / Mosaic | axis -1: Triton / Mosaic | exact |",
    "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
  ]
  for r in rows:
    if "mosaic_s" not in r or not r.get("copy_s"):
      continue
    isz = jnp.dtype(r["dtype"]).itemsize
    copy_bits = r["copy_s"] * (isz + 0.125) / (isz + 1)  # copy time of w + 1 bit per entry
    lines.append(
      f"| {r['shape'][0]}x{r['shape'][1]} | {r['dtype']} | {r['copy_s'] * 1e3:.3f} ms | "
      f"{r['pallas_s'] * 1e3:.3f} ms | {100 * r['copy_s'] / r['pallas_s']:.0f}% | "
      f"{r['mosaic_s'] * 1e3:.3f} ms | {100 * r['copy_s'] / r['mosaic_s']:.0f}% | "
      f"{r['mosaic_bits_s'] * 1e3:.3f} ms | {100 * copy_bits / r['mosaic_bits_s']:.0f}% | "
      f"{r['prune_pallas_s'] * 1e3:.3f} / {r['mosaic_prune_s'] * 1e3:.3f} ms | "
      f"{r['pallas_cols_s'] * 1e3:.3f} / {r.get('mosaic_cols_s', float('nan')) * 1e3:.3f} ms | "
      f"{r['mosaic_exact'] and r['mosaic_prune_exact'] and r.get('mosaic_cols_exact', True)} |"
    )
  return "\n".join(lines)


def fmt_table(rows):
  lines = [
    "| weight | dtype | Pallas mask | GB/s | % of copy | best exact XLA | vs XLA | "
    "apex alg. (torch) | vs apex | masked w + mask: Pallas / XLA | axis -1: Pallas / XLA |",
    "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
  ]
  for r in rows:
    t = r["pallas_s"]
    gbs = r["bytes"] / t / 1e9
    pc = f"{100 * r['copy_s'] / t:.0f}%" if r.get("copy_s") else "-"
    bx = r["best_xla_s"]
    best_name = min((v["s"], k) for k, v in r["xla"].items() if v.get("exact"))[1] if bx else "-"
    apex = r.get("apex_s")
    lines.append(
      f"| {r['shape'][0]}x{r['shape'][1]} | {r['dtype']} | {t * 1e3:.3f} ms | {gbs:.0f} | {pc} | "
      f"{bx * 1e3:.3f} ms ({best_name}) | {bx / t:.2f}x | "
      f"{'-' if apex is None else f'{apex * 1e3:.2f} ms'} | "
      f"{'-' if apex is None else f'{apex / t:.0f}x'} | "
      f"{r['prune_pallas_s'] * 1e3:.3f} / {r['prune_xla_s'] * 1e3:.3f} ms | "
      f"{r['pallas_cols_s'] * 1e3:.3f} / {r['xla_cols_s'] * 1e3:.3f} ms |"
    )
  return "\n".join(lines)


# ----------------------------------------------------------------------------
# Transposable masks and a 7B-parameter model.


def greedy_sort_v1(w):
  """The first greedy (jasp 0.1.0 masks.py): sort each block, then 16 one-hot steps."""
  blocks, restore = masks._blocks(w, 4, 0, 1)
  mag = masks.magnitude(blocks)
  lead, n, m = mag.shape[:-2], 2, 4
  flat = mag.reshape(lead + (m * m,))
  idx = jnp.broadcast_to(jnp.arange(m * m, dtype=jnp.int32), flat.shape)
  _, order = jax.lax.sort((-flat, idx), dimension=flat.ndim - 1, num_keys=2)
  rows = jnp.zeros(lead + (m,), jnp.int32)
  cols = jnp.zeros(lead + (m,), jnp.int32)
  keep = jnp.zeros(lead + (m * m,), bool)
  eye = jnp.eye(m, dtype=jnp.int32)
  for t in range(m * m):
    o = order[..., t]
    r_hot, c_hot = eye[o // m], eye[o % m]
    ok = ((rows * r_hot).sum(-1) < n) & ((cols * c_hot).sum(-1) < n)
    rows = rows + r_hot * ok[..., None]
    cols = cols + c_hot * ok[..., None]
    keep = keep | (jax.nn.one_hot(o, m * m, dtype=bool) & ok[..., None])
  return restore(keep.reshape(lead + (m, m)))


def best_xla(w):
  with _dispatch.mask_impl("xla"):
    return masks.nm_mask_2d(w, 2, 4, 0, 1, method="best")


def best_pallas(**tuning):
  return lambda w: nm2d_pallas.nm_mask_2d_pallas(w, 2, 4, 0, 1, interpret=False, **tuning)


def sweep_2d(out):
  """Tiling sweep of the transposable kernel on 8192^2."""
  res, best = [], {}
  for dtype in DTYPES:
    xs = make_inputs((8192, 8192), dtype, k=2)
    want = np.asarray(best_xla(xs[0]))
    for tb, c, nw in itertools.product([128, 256, 512], [32, 64], [4, 8]):
      cfg = dict(tile_blocks=tb, max_contig=c, num_warps=nw)
      try:
        fn = best_pallas(**cfg)
        ok = bool((np.asarray(fn(xs[0])) == want).all())
        t = time_jax(fn, xs, iters=5)
        res.append({"dtype": dtype, **cfg, "ok": ok, "us": best_time(t) * 1e6})
        print(json.dumps(res[-1]), flush=True)
      except Exception as e:
        print(f"sweep_2d {dtype} {cfg}: {type(e).__name__}: {str(e)[:300]}", flush=True)
    rows = sorted([r for r in res if r["dtype"] == dtype and r["ok"]], key=lambda r: r["us"])
    for r in rows[:3]:
      print("best 2d", r, flush=True)
    if rows:
      best[dtype] = {k: rows[0][k] for k in ("tile_blocks", "max_contig", "num_warps")}
  out["sweep_2d"] = res
  out["sweep_2d_best"] = best
  return best


def transposable(out, dtypes):
  """nm_mask_2d on 8192^2: best (Pallas Triton and Mosaic GPU kernels), best (XLA), greedy (XLA)."""
  res = {}
  shape = (8192, 8192)
  for dtype in dtypes:
    xs = make_inputs(shape, dtype, k=2)
    fns = {
      "best_pallas": best_pallas(),
      "best_mosaic": lambda w: nm2d_mosaic.nm_mask_2d_mosaic(w, 2, 4, 0, 1, interpret=False),
      "best_xla": best_xla,
      "greedy_xla": lambda w: masks.nm_mask_2d(w, 2, 4, 0, 1, method="greedy"),
    }
    want = np.asarray(best_xla(xs[0]))
    nbytes = math.prod(shape) * (jnp.dtype(dtype).itemsize + 1)
    for name, fn in fns.items():
      try:
        print(name, dtype, flush=True)
        t = time_jax(fn, xs, iters=3, breakdown=True)
        r = res[f"{name}_{dtype}"] = {"s": best_time(t), "host_s": t[0]}
        r["GB/s"] = nbytes / r["s"] / 1e9
        if name in ("best_pallas", "best_mosaic"):
          r["exact"] = bool((np.asarray(fn(xs[0])) == want).all())
      except Exception as e:
        res[f"{name}_{dtype}"] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
      print(name, dtype, res[f"{name}_{dtype}"], flush=True)
  out["transposable"] = res
  return res


LLAMA7B_LAYER = [(4096, 4096)] * 4 + [(4096, 11008)] * 2 + [(11008, 4096)]


def llama7b(out):
  """Prunes the 32 x 7 linear weights of a LLaMA-7B shape (6.5e9 params), bf16."""
  ws = [
    jax.random.normal(jax.random.PRNGKey(i), s, jnp.float32).astype(jnp.bfloat16)
    for i, s in enumerate(LLAMA7B_LAYER)
  ]
  params = 32 * sum(math.prod(s) for s in LLAMA7B_LAYER)
  fns = {
    "nm_prune (auto)": jax.jit(lambda w: masks.nm_prune(w, 2, 4, 0)),
    "nm_mask (auto)": jax.jit(lambda w: masks.nm_mask(w, 2, 4, 0)),
    "nm_mask (xla)": jax.jit(lambda w: masks.nm_mask(w, 2, 4, 0, impl="xla")),
    "nm_mask_2d best (auto)": jax.jit(lambda w: masks.nm_mask_2d(w, 2, 4, 0, 1, method="best")),
    "nm_mask_2d best (xla)": jax.jit(best_xla),
    "nm_mask_2d greedy": jax.jit(lambda w: masks.nm_mask_2d(w, 2, 4, 0, 1, method="greedy")),
  }
  res = {"params": params}
  for name, f in fns.items():
    try:
      jax.block_until_ready([f(w) for w in ws])
      t0 = time.perf_counter()
      for _ in range(32):
        outs = [f(w) for w in ws]
      jax.block_until_ready(outs)
      res[name] = time.perf_counter() - t0
    except Exception as e:
      res[name] = f"{type(e).__name__}: {str(e)[:300]}"
    print("llama7b", name, res[name], flush=True)
  out["llama7b"] = res
  return res


def main():
  global CLOCK
  ap = argparse.ArgumentParser()
  ap.add_argument("--sweep", action="store_true")
  ap.add_argument("--sweep2d", action="store_true")
  ap.add_argument("--sweep-mosaic", action="store_true", help="tile sweep of the Mosaic GPU kernel")
  ap.add_argument("--quick", action="store_true")
  ap.add_argument("--no-table", action="store_true")
  ap.add_argument("--no-2d", action="store_true")
  args = ap.parse_args()
  CLOCK = DeviceClock()
  dev = jax.devices()[0]
  out = {
    "device": dev.device_kind,
    "jax": jax.__version__,
    "torch": None if torch is None else torch.__version__,
    "date": time.strftime("%Y-%m-%d"),
    "argv": sys.argv[1:],
  }
  print(json.dumps(out), flush=True)
  path = os.path.join(os.environ.get("OUT", "/tmp"), "mask_bench.json")

  rec = Recorder(out, path)
  stage = rec.stage

  tuning = stage(sweep, out) if args.sweep else None
  rows = []
  if not args.no_table:
    rows = stage(main_table, out, SHAPES[:2] if args.quick else SHAPES, DTYPES, tuning) or []
  if args.sweep2d:
    stage(sweep_2d, out)
  if args.sweep_mosaic:
    stage(sweep_mosaic, out)
  if not args.no_2d:
    stage(transposable, out, DTYPES)
    stage(llama7b, out)
  print(
    f"\n{dev.device_kind}, jax {jax.__version__}, {out['date']}, "
    f"device timing: {'CUPTI kernel sums' if CLOCK.ok else 'host'}"
  )
  if rows:
    print(fmt_table(rows))
    print(fmt_mosaic_table(rows))
  for k, v in out.get("transposable", {}).items():
    print(f"nm_mask_2d {k} 8192x8192: {v}")
  if "llama7b" in out:
    for k, v in out["llama7b"].items():
      print(f"llama-7b shapes ({out['llama7b']['params'] / 1e9:.2f}e9 params) {k}: {v}")


if __name__ == "__main__":
  main()
