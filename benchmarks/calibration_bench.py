"""One-shot N:M pruning time and quality: magnitude vs Wanda vs SparseGPT, per layer.

Run on the device machine (H100/H200) or on CPU at small sizes::

    python3 benchmarks/calibration_bench.py            # 4096x4096, 4096x11008, 11008x4096; 2048 tokens
    python3 benchmarks/calibration_bench.py --quick    # 512x512 and 512x1024, 256 tokens (CPU)

For each layer ``Y = X @ W`` (``W`` of shape ``(K, O)``, float32; ``X`` of shape
``(T, K)`` with input features whose scales span e^-2..e^2, as LLM activations
have outlier channels), every method is timed end to end from ``(W, X)`` to the
pruned weight, its statistics included:

* magnitude: ``jasp.nm_mask`` + ``where``;
* Wanda: ``sum(X**2)`` per feature + ``|W| * ||X||`` scores + the N:M mask;
* SparseGPT: ``H = X^T X`` (float32, HIGHEST) + :func:`jasp.calibration.sparsegpt_layer`
  (damping, inverse-Hessian Cholesky factor, column-blocked OBS, block 128),
  also split into Hessian / factor / OBS loop.

Each function is jitted; after a warm-up call the median over ``--reps`` calls
(host wall time to ``block_until_ready``) is reported. Quality: the relative
reconstruction error ``||X W - X W_hat||^2 / ||X W||^2`` on the calibration
inputs. ``--pipeline`` also times the whole-model API (``jasp.wanda_prune`` /
``jasp.calibration.sparsegpt_prune``, a 4-layer MLP) including tracing and
compilation (first call) and again (second call, compiled).
"""

from __future__ import annotations

import argparse
import functools
import json
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

import jasp  # noqa: E402
from jasp import calibration as cal  # noqa: E402
from jasp.calibration import sparsegpt as sgpt  # noqa: E402
from jasp.masks import topn_mask  # noqa: E402

HI = jax.lax.Precision.HIGHEST
SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096)]
QUICK = [(512, 512), (512, 1024)]


def timed(fn, *args, reps: int):
  jax.block_until_ready(fn(*args))  # compile + warm-up
  ts = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    ts.append(time.perf_counter() - t0)
  return statistics.median(ts)


@jax.jit
def magnitude(w, x):
  del x
  mask = jasp.nm_mask(w, 2, 4, 0)
  return jnp.where(mask, w, 0.0)


@jax.jit
def wanda(w, x):
  norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=0))
  mask = topn_mask(jnp.abs(w) * norm[:, None], 2, 4, 0)
  return jnp.where(mask, w, 0.0)


@jax.jit
def hessian(x):
  return jnp.matmul(x.T, x, precision=HI)


@functools.partial(jax.jit, static_argnames=("blocksize",))
def sparsegpt(w, x, blocksize=128):
  return sgpt._layer(w, hessian(x), 2, 4, blocksize, 0.01, sgpt._unroll())[0]


@jax.jit
def factor(h):
  return sgpt.inverse_hessian_factor(h, 0.01)


@functools.partial(jax.jit, static_argnames=("unroll",))
def obs_loop(w, h, unroll=None):
  unroll = sgpt._unroll() if unroll is None else unroll
  return sgpt._obs(w.T, h, n=2, m=4, blocksize=128, damp=0.01, unroll=unroll)[0]


@jax.jit
def rel_error(w, w_hat, h):
  num = cal.reconstruction_error(w, w_hat, h)
  return num / jnp.sum(jnp.matmul(h, w, precision=HI) * w)


def layer_rows(shapes, tokens, reps, unrolls=(), seed=0):
  rows = []
  for k, o in shapes:
    rng = np.random.default_rng(seed)
    w = jnp.asarray(rng.standard_normal((k, o)) / np.sqrt(k), jnp.float32)
    x = jnp.asarray(rng.standard_normal((tokens, k)) * np.exp(rng.uniform(-2, 2, k)), jnp.float32)
    h = hessian(x)
    row = {"K": k, "O": o, "T": tokens}
    for name, fn in (("magnitude", magnitude), ("wanda", wanda), ("sparsegpt", sparsegpt)):
      row[f"{name}_ms"] = 1e3 * timed(fn, w, x, reps=reps)
      row[f"{name}_rel_err"] = float(rel_error(w, fn(w, x), h))
      assert bool(jasp.is_nm(fn(w, x), 2, 4, 0)), name
    row["sgpt_hessian_ms"] = 1e3 * timed(hessian, x, reps=reps)
    row["sgpt_factor_ms"] = 1e3 * timed(factor, h, reps=reps)
    row["sgpt_obs_ms"] = 1e3 * timed(obs_loop, w, h, reps=reps)
    if unrolls and (k, o) == shapes[0]:
      for u in unrolls:
        row[f"sgpt_obs_unroll{u}_ms"] = 1e3 * timed(
          functools.partial(obs_loop, unroll=u), w, h, reps=reps
        )
    rows.append(row)
    print(json.dumps(row), flush=True)
  return rows


def pipeline_rows(width, depth, tokens, batches):
  rng = np.random.default_rng(1)
  params = {
    f"layer{i}": {
      "kernel": jnp.asarray(rng.standard_normal((width, width)) / np.sqrt(width), jnp.float32)
    }
    for i in range(depth)
  }

  def mlp(p, x):
    for i in range(depth):
      x = jax.nn.gelu(x @ p[f"layer{i}"]["kernel"])
    return x

  xs = [
    jnp.asarray(
      rng.standard_normal((tokens // batches, width)) * np.exp(rng.uniform(-2, 2, width)),
      jnp.float32,
    )
    for _ in range(batches)
  ]
  layouts = jasp.trace_layouts(mlp, params, xs[0])
  out = []
  for name, fn in (
    ("magnitude", lambda: jasp.prune(params, layouts=layouts)),
    ("wanda", lambda: cal.wanda_prune(mlp, params, xs, layouts=layouts, progress=False)),
    ("sparsegpt", lambda: cal.sparsegpt_prune(mlp, params, xs, layouts=layouts, progress=False)),
  ):
    times = []
    for _ in range(2):
      t0 = time.perf_counter()
      jax.block_until_ready(fn())
      times.append(time.perf_counter() - t0)
    row = {
      "pipeline": name,
      "width": width,
      "depth": depth,
      "tokens": tokens,
      "first_s": times[0],
      "second_s": times[1],
    }
    out.append(row)
    print(json.dumps(row), flush=True)
  return out


def main(argv=None):
  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--quick", action="store_true")
  p.add_argument("--tokens", type=int, default=None)
  p.add_argument("--reps", type=int, default=5)
  p.add_argument("--pipeline", action="store_true")
  p.add_argument(
    "--unroll",
    type=int,
    nargs="*",
    default=[],
    help="also time the OBS loop unrolled by these factors (first shape)",
  )
  args = p.parse_args(argv)
  shapes = QUICK if args.quick else SHAPES
  tokens = args.tokens or (256 if args.quick else 2048)
  dev = jax.devices()[0]
  print(f"jax {jax.__version__}, {dev.platform}: {getattr(dev, 'device_kind', '')}", flush=True)
  rows = layer_rows(shapes, tokens, args.reps, args.unroll)
  pipe = []
  if args.pipeline:
    pipe = pipeline_rows(512 if args.quick else 4096, 4, tokens, 4)

  print(
    "\n| K x O | tokens | magnitude | Wanda | SparseGPT (Hessian; factor; factor + OBS) | "
    "rel. error mag / Wanda / SparseGPT |"
  )
  print("| --- | --- | --- | --- | --- | --- |")
  for r in rows:
    print(
      f"| {r['K']}x{r['O']} | {r['T']} | {r['magnitude_ms']:.2f} ms | {r['wanda_ms']:.2f} ms "
      f"| {r['sparsegpt_ms']:.1f} ms ({r['sgpt_hessian_ms']:.1f}; {r['sgpt_factor_ms']:.1f}; "
      f"{r['sgpt_obs_ms']:.1f}) | {r['magnitude_rel_err']:.4f} / {r['wanda_rel_err']:.4f} / "
      f"{r['sparsegpt_rel_err']:.4f} |"
    )
  for r in pipe:
    print(
      f"pipeline {r['pipeline']}: {r['depth']} layers {r['width']}^2, {r['tokens']} tokens: "
      f"{r['first_s']:.2f} s first call, {r['second_s']:.2f} s second"
    )
  out = os.environ.get("OUT")
  if out:
    _meta.write_json(
      os.path.join(out, "calibration_bench.json"),
      {
        "device": str(dev.device_kind if hasattr(dev, "device_kind") else dev),
        "jax": jax.__version__,
        "layers": rows,
        "pipeline": pipe,
      },
    )


if __name__ == "__main__":
  main()
