"""First call (compilation + run) and warm call of SparseGPT's per-layer program,
old and new, in one process, at the LLaMA-7B layer shapes.

The per-layer program is what :func:`jasp.sparsegpt_prune` runs for every
weight (``jasp.calibration.sparsegpt._sparsegpt_leaf``: Hessian factor, OBS
loop, calibration error). "old" is a verbatim copy of that program before its
compile-time change (three factorisations and two triangular solves for ``U``,
default XLA compile options: on GPUs every new matmul shape is autotuned);
"new" is the library's. Both take the same data: ``w (K, O)`` float32 and the
Hessian of ``T`` heavy-tailed calibration rows.

Run on the device machine::

    python3 benchmarks/sparsegpt_first_call.py --out sgpt_first_call.json

``--variants new old new-unroll1 new-autotune`` adds the diagnostics (see
``VARIANTS``). ``--compile-only`` lowers and compiles at the given shapes from
``jax.ShapeDtypeStruct`` (no data, no run) and records compile times and the
size of the program (StableHLO characters, while loops, matmuls, custom
calls), the CPU proxy. The first call of a shape is timed as the user sees it
(trace, compile, run, ``block_until_ready``); the compile phases come from
``jax.monitoring``. The new program runs first: it autotunes nothing, so the
old one cannot reuse its autotuning results.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import _meta  # noqa: E402  (benchmarks/_meta.py)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from _bench_util import Phases  # noqa: E402
from jax import lax  # noqa: E402

from jasp import masks as masks_lib  # noqa: E402
from jasp import weights  # noqa: E402
from jasp.calibration import sparsegpt as sgpt  # noqa: E402

HIGHEST = lax.Precision.HIGHEST
LLAMA_7B = ((4096, 4096), (4096, 11008), (11008, 4096))
# -- the old per-layer program (as it was before the change), for a dense kernel --


def old_factor(h, damp):
  h = h.astype(jnp.float32)
  k = h.shape[-1]
  eye = jnp.eye(k, dtype=jnp.float32)
  diag = jnp.diagonal(h)
  dead = diag == 0
  mean = jnp.mean(diag)
  h = jnp.where(dead[:, None] | dead[None, :], 0.0, h)
  h = h + jnp.diag(jnp.where(dead, 1.0, 0.0) + damp * mean)
  with jax.default_matmul_precision("highest"):
    low = jnp.linalg.cholesky(h)
    hinv = jax.scipy.linalg.cho_solve((low, True), eye)
    return jnp.triu(jnp.linalg.cholesky(hinv, upper=True))


def old_obs(w, h, *, n, m, blocksize, damp, unroll=1):
  o, k = w.shape
  bs = blocksize
  kp = -(-k // bs) * bs
  u = old_factor(h, damp)
  dead = jnp.diagonal(h) == 0
  w = jnp.where(dead[None, :], 0.0, w)
  if kp > k:
    u = jnp.pad(u, ((0, kp - k), (0, kp - k))) + jnp.diag(
      jnp.concatenate([jnp.zeros(k), jnp.ones(kp - k)]).astype(jnp.float32)
    )
    w = jnp.pad(w, ((0, 0), (0, kp - k)))
    dead = jnp.pad(dead, (0, kp - k), constant_values=True)

  def block(b, carry):
    w, keep = carry
    i1 = b * bs
    w1 = lax.dynamic_slice_in_dim(w, i1, bs, axis=1)
    u1 = lax.dynamic_slice(u, (i1, i1), (bs, bs))
    d1 = jnp.diagonal(u1)
    dead1 = lax.dynamic_slice_in_dim(dead, i1, bs)

    def column(c, carry):
      w1, q1, e1, k1 = carry
      j0 = (c // m) * m
      wg = lax.dynamic_slice_in_dim(w1, j0, m, axis=1)
      dg = lax.dynamic_slice_in_dim(d1, j0, m)
      deadg = lax.dynamic_slice_in_dim(dead1, j0, m)
      score = jnp.where(deadg[None, :], -1.0, jnp.square(wg) / jnp.square(dg))
      fresh = masks_lib.topn_mask(score, n, m, axis=1)
      k1 = jnp.where(c % m == 0, lax.dynamic_update_slice_in_dim(k1, fresh, j0, axis=1), k1)
      keep = lax.dynamic_index_in_dim(k1, c, axis=1, keepdims=False)
      wc = lax.dynamic_index_in_dim(w1, c, axis=1, keepdims=False)
      qc = jnp.where(keep, wc, 0.0)
      err = (wc - qc) / d1[c]
      urow = lax.dynamic_index_in_dim(u1, c, axis=0, keepdims=False)
      w1 = w1 - err[:, None] * urow[None, :]
      q1 = lax.dynamic_update_index_in_dim(q1, qc, c, axis=1)
      e1 = lax.dynamic_update_index_in_dim(e1, err, c, axis=1)
      return w1, q1, e1, k1

    z = jnp.zeros_like(w1)
    _, q1, e1, k1 = lax.fori_loop(
      0, bs, column, (w1, z, z, jnp.zeros(w1.shape, bool)), unroll=unroll
    )
    urows = lax.dynamic_slice_in_dim(u, i1, bs, axis=0)
    w = w - jnp.matmul(e1, urows, precision=HIGHEST)
    w = lax.dynamic_update_slice_in_dim(w, q1, i1, axis=1)
    keep = lax.dynamic_update_slice_in_dim(keep, k1, i1, axis=1)
    return w, keep

  w, keep = lax.fori_loop(0, kp // bs, block, (w, jnp.zeros(w.shape, bool)))
  return w[:, :k], keep[:, :k]


@functools.partial(jax.jit, static_argnames=("site", "n", "m", "blocksize", "damp", "unroll"))
def old_leaf(w, hessian, count, site, n, m, blocksize, damp, unroll):
  """The old ``_sparsegpt_leaf`` for a dense ``(K, O)`` kernel (one feature group)."""
  del site
  wg = w.astype(jnp.float32)[None]
  h = hessian / jnp.maximum(count, 1.0)
  q, keep = old_obs(wg[0].T, h[0], n=n, m=m, blocksize=blocksize, damp=damp, unroll=unroll)
  q, keep = q.T[None], keep.T[None]
  d = wg - q
  err = jnp.sum(jnp.einsum("gkl,glo->gko", h, d, precision=HIGHEST) * d)
  new, mask = q[0].astype(w.dtype), keep[0]
  err = jnp.where(jnp.all(jnp.isfinite(q)), err, jnp.nan)
  return jnp.where(mask, new, jnp.zeros((), w.dtype)), mask, err


_STATIC = ("site", "n", "m", "blocksize", "damp", "unroll")
# name: (per-layer function, overrides of its static arguments). The last two
# are diagnostics, not run by default: "new-unroll1" one column per OBS loop
# step (a smaller program; the default off CPU is 4), "new-autotune" the new
# program with XLA's default options (GPU matmul autotuning on; run it in a
# process of its own: XLA reuses autotuning results between programs).
VARIANTS = {
  "new": (sgpt._sparsegpt_leaf, {}),
  "old": (old_leaf, {}),
  "new-unroll1": (sgpt._sparsegpt_leaf, {"unroll": 1}),
  "new-autotune": (jax.jit(sgpt._sparsegpt_leaf.__wrapped__, static_argnames=_STATIC), {}),
}


# -- measurement --------------------------------------------------------------


def dense_site(k: int, o: int) -> weights.Site:
  """The site of a flax ``Dense`` kernel ``(K, O)``, as the driver passes it."""
  return weights.Site(kind="dot", shape=(k, o), perm=(0, 1), rows=1, groups=1, group_axes=(0,))


def statics(k, o, name):
  kw = dict(site=dense_site(k, o), n=2, m=4, blocksize=128, damp=0.01, unroll=sgpt._unroll())
  return {**kw, **VARIANTS[name][1]}


@jax.jit
def _gram(x):
  return jnp.matmul(x.T, x, precision=HIGHEST)


def problem(k, o, tokens, seed=0):
  """``w (K, O)``, ``hessian (1, K, K)`` (sum of ``x x^T`` over ``tokens`` rows), ``count``."""
  rng = np.random.default_rng(seed)
  scale = np.exp(rng.normal(0.0, 1.0, k)).astype(np.float32)
  x = rng.standard_t(3, (tokens, k)).astype(np.float32) * scale
  w = jnp.asarray(rng.standard_normal((k, o), np.float32) / np.sqrt(k))
  h = _gram(jnp.asarray(x))[None]
  return jax.block_until_ready((w, h, jnp.float32(tokens)))


def timed_calls(fn, args, kw, reps, phases):
  with phases:
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(*args, **kw))
    first = time.perf_counter() - t0
  warm = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args, **kw))
    warm.append(time.perf_counter() - t0)
  row = {"first_s": first, "warm_s": statistics.median(warm)}
  row.update({k: round(v, 4) for k, v in phases.totals.items()})
  return row, out


def run_shapes(shapes, variants, tokens, reps):
  phases = Phases()
  rows = []
  for name in variants:  # one-off process costs (backend start, library loads) out of the way
    timed_calls(VARIANTS[name][0], problem(256, 256, 512), statics(256, 256, name), 1, phases)
  for k, o in shapes:
    data = problem(k, o, tokens)
    outs = {}
    for name in variants:
      row, outs[name] = timed_calls(VARIANTS[name][0], data, statics(k, o, name), reps, phases)
      unroll = statics(k, o, name)["unroll"]
      rows.append({"variant": name, "K": k, "O": o, "tokens": tokens, "unroll": unroll, **row})
      print(_line(rows[-1]), flush=True)
    if "new" in outs and "old" in outs:
      (wa, ma, ea), (wb, mb, eb) = outs["new"], outs["old"]
      rows.append(
        {
          "variant": "new vs old",
          "K": k,
          "O": o,
          "mask_mismatches": int(jnp.sum(ma != mb)),
          "max_abs_weight_diff": float(jnp.max(jnp.abs(wa - wb))),
          "error_new": float(ea),
          "error_old": float(eb),
        }
      )
      print(rows[-1], flush=True)
  return rows


def compile_only(shapes, variants):
  """Lower and compile from shapes alone: times and program size (the CPU proxy)."""
  rows = []
  for k, o in shapes:
    args = (
      jax.ShapeDtypeStruct((k, o), jnp.float32),
      jax.ShapeDtypeStruct((1, k, k), jnp.float32),
      jax.ShapeDtypeStruct((), jnp.float32),
    )
    for name in variants:
      t0 = time.perf_counter()
      lowered = VARIANTS[name][0].lower(*args, **statics(k, o, name))
      t1 = time.perf_counter()
      compiled = lowered.compile()
      t2 = time.perf_counter()
      text = lowered.as_text()
      row = {
        "variant": name,
        "K": k,
        "O": o,
        "lower_s": t1 - t0,
        "compile_s": t2 - t1,
        "stablehlo_chars": len(text),
        "while_loops": text.count("stablehlo.while"),
        "dots": text.count("dot_general"),
        "custom_calls": text.count("custom_call"),
        "compiled_hlo_chars": len(compiled.as_text()),
      }
      rows.append(row)
      print(_line(row), flush=True)
  return rows


def _line(row):
  return "  ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())


def _shape(text):
  k, o = text.lower().split("x")
  return int(k), int(o)


def main(argv=None):
  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--shapes", type=_shape, nargs="*", default=list(LLAMA_7B), help="KxO ...")
  p.add_argument("--variants", nargs="*", default=["new", "old"], choices=list(VARIANTS))
  p.add_argument("--tokens", type=int, default=4096, help="calibration rows of the Hessian")
  p.add_argument("--reps", type=int, default=3, help="warm calls (median)")
  p.add_argument("--compile-only", action="store_true")
  p.add_argument("--out", default=None, help="JSON results file")
  args = p.parse_args(argv)
  dev = jax.devices()[0]
  print(f"jax {jax.__version__}, {dev.platform}: {getattr(dev, 'device_kind', '')}", flush=True)
  t0 = time.perf_counter()
  if args.compile_only:
    rows = compile_only(args.shapes, args.variants)
  else:
    rows = run_shapes(args.shapes, args.variants, args.tokens, args.reps)
  total = time.perf_counter() - t0
  print(f"total {total:.1f} s", flush=True)
  if args.out:
    results = {
      "compile_only": args.compile_only,
      "compiler_options": sgpt.COMPILER_OPTIONS,
      "unroll": sgpt._unroll(),
      "total_s": total,
      "records": rows,
    }
    _meta.write_json(args.out, results)


if __name__ == "__main__":
  main()
