"""SparseGPT's Hessian ``X^T X`` from bf16 activations: time, error and the masks it gives.

At LLaMA-7B shapes the float32 Hessian (``Precision.HIGHEST``, what
``jasp.calibration`` computes) is a large share of one-shot SparseGPT on a GPU.
The activations are bf16, so every product of two of them is exact in float32;
only the accumulation order and precision differ between ways of summing them.
This script compares, per input width ``K`` over one calibration batch of
``T`` tokens:

  * ``f32_highest``: float32 operands, ``Precision.HIGHEST`` (jasp's way);
  * ``bf16_tc``: bf16 operands, float32 result (tensor cores accumulate);
  * ``bf16_tc_chunks``: the same over chunks of ``--chunk`` tokens, the
    chunk sums added in float32 (bounds how many products a tensor-core
    accumulator sums);

and reports, for each: device time (CUPTI kernel sums on a GPU, else host
time), the relative error of 256 sampled rows of ``H`` against float64, and the
fraction of SparseGPT's 2:4 mask on a ``(K, --out)`` weight that equals the
mask from the float64 Hessian rounded to float32 (``sparsegpt_layer``),
the measure that decides whether a faster Hessian is good enough.

    python benchmarks/hessian_bench.py --out hessian_h200.json     # GPU: K 4096, 11008
    python benchmarks/hessian_bench.py --ks 256 --tokens 2048      # CPU smoke
"""

from __future__ import annotations

import argparse

import _meta  # benchmarks/_meta.py (the script's directory is on sys.path)
import jax
import jax.numpy as jnp
import numpy as np
from _bench_util import DeviceClock
from _bench_util import timed
from jax import lax

from jasp.calibration import sparsegpt_layer

HIGHEST = lax.Precision.HIGHEST
_XTX = (((0,), (0,)), ((), ()))


def f32_highest(x):
  xf = x.astype(jnp.float32)
  return lax.dot_general(xf, xf, _XTX, precision=HIGHEST)


def bf16_tc(x):
  return lax.dot_general(x, x, _XTX, preferred_element_type=jnp.float32)


def bf16_tc_chunks(x, chunk: int):
  t, k = x.shape
  xs = x.reshape(t // chunk, chunk, k)

  def add(h, xc):
    return h + lax.dot_general(xc, xc, _XTX, preferred_element_type=jnp.float32), None

  h, _ = lax.scan(add, jnp.zeros((k, k), jnp.float32), xs)
  return h


def activations(key, tokens: int, k: int) -> jax.Array:
  """bf16 ``(tokens, k)``: normal rows with per-feature scales log-uniform in [e^-2, e^2]."""
  a, b = jax.random.split(key)
  scale = jnp.exp(jax.random.uniform(b, (k,), minval=-2.0, maxval=2.0))
  return (jax.random.normal(a, (tokens, k)) * scale).astype(jnp.bfloat16)


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--ks", default="4096,11008", help="input widths K")
  ap.add_argument("--tokens", type=int, default=16384, help="tokens in the batch (T)")
  ap.add_argument("--chunk", type=int, default=2048, help="tokens per tensor-core chunk")
  ap.add_argument("--out-features", type=int, default=1024, help="O of the weight for masks")
  ap.add_argument("--rows", type=int, default=256, help="rows of H checked against float64")
  ap.add_argument("--out", default="")
  args = ap.parse_args()
  if args.tokens % args.chunk:
    ap.error("--tokens must be a multiple of --chunk")
  clock = DeviceClock()
  dev = jax.devices()[0]
  res = {"device": dev.device_kind, "tokens": args.tokens, "chunk": args.chunk, "rows": []}
  print(f"device: {dev.device_kind}, JAX {jax.__version__}", flush=True)
  variants = {
    "f32_highest": jax.jit(f32_highest),
    "bf16_tc": jax.jit(bf16_tc),
    "bf16_tc_chunks": jax.jit(lambda x: bf16_tc_chunks(x, args.chunk)),
  }
  for k in (int(s) for s in args.ks.split(",")):
    x = activations(jax.random.key(k), args.tokens, k)
    xd = np.asarray(x.astype(jnp.float32), np.float64)
    rows = np.random.default_rng(0).choice(k, size=min(args.rows, k), replace=False)
    ref_rows = xd[:, rows].T @ xd  # (rows, K) of the float64 Hessian
    h_ref = jnp.asarray(xd.T @ xd, jnp.float32)  # float64, rounded once
    w = jax.random.normal(jax.random.key(k + 1), (k, args.out_features), jnp.float32)
    _, want = sparsegpt_layer(w, h_ref)
    for name, fn in variants.items():
      h = fn(x)
      got_rows = np.asarray(h, np.float64)[rows]
      err = float(np.linalg.norm(got_rows - ref_rows) / np.linalg.norm(ref_rows))
      _, mask = sparsegpt_layer(w, h)
      row = {
        "K": k,
        "variant": name,
        "seconds": timed(fn, [(x,)], clock, reps=5)[0],
        "device_timing": clock.ok,
        "rel_error_vs_f64": err,
        "mask_equal_to_f64_hessians": float(jnp.mean(mask == want)),
      }
      res["rows"].append(row)
      print(row, flush=True)
  if args.out:
    _meta.write_json(args.out, res)


if __name__ == "__main__":
  main()
