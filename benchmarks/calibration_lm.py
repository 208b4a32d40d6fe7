"""One-shot 2:4 pruning of the example language model: magnitude vs Wanda vs SparseGPT.

Trains ``examples/lm.py``'s byte-level decoder (nnx) densely, then prunes a copy
of it one-shot (no fine-tuning) with each method and prints the validation loss
and per-byte perplexity, with the time each pruning call took (tracing and
compilation included: one call per method, as a user would make it)::

    python3 benchmarks/calibration_lm.py                 # ~5 minutes on 2 CPU cores
    python3 benchmarks/calibration_lm.py --steps 30 --dim 64 --depth 2   # a smoke run

Calibration data: ``--calib`` batches of the training split (16 x 128 bytes each
by default), drawn with a fixed seed, disjoint from nothing in particular (the
reference implementations use random training-set windows too).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))

import _meta  # noqa: E402  (benchmarks/_meta.py)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import lm  # noqa: E402  (examples/lm.py: the model and the corpus)
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

import jasp  # noqa: E402
from jasp import calibration as cal  # noqa: E402


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=lm.HelpFormatter)
  p.add_argument("--steps", type=int, default=400, help="dense training steps before pruning")
  lm.add_model_args(p)
  p.add_argument("--calib", type=int, default=8, help="calibration batches (Wanda, SparseGPT)")
  args = p.parse_args(argv)

  train, val = lm.stdlib_corpus(args.corpus_bytes)
  vrng = np.random.default_rng(12345)
  val_set = [next(lm.batches(val, args.batch, args.context, vrng)) for _ in range(args.val_batches)]
  val_set = [(jnp.asarray(x), jnp.asarray(y)) for x, y in val_set]
  model = lm.DecoderLM(
    dim=args.dim, depth=args.depth, context=args.context, rngs=nnx.Rngs(args.seed)
  )
  sched = optax.warmup_cosine_decay_schedule(
    0.0, args.lr, min(100, args.steps // 10 + 1), args.steps
  )
  opt = nnx.Optimizer(model, optax.adamw(sched, weight_decay=0.01), wrt=nnx.Param)

  val_x, val_y = [x for x, _ in val_set], [y for _, y in val_set]

  def validate():  # the example's own jitted steps: the same model, loss and evaluation
    return lm.validate(model, val_x, val_y)

  t0 = time.perf_counter()
  it = lm.batches(train, args.batch, args.context, np.random.default_rng(args.seed))
  for _ in range(args.steps):
    x, y = next(it)
    lm.train_step(model, opt, jnp.asarray(x), jnp.asarray(y))
  train_s = time.perf_counter() - t0
  dense = jax.tree.map(lambda v: jnp.array(v, copy=True), nnx.state(model, nnx.Param))
  crng = np.random.default_rng(args.seed + 7)
  calib = [
    jnp.asarray(next(lm.batches(train, args.batch, args.context, crng))[0])
    for _ in range(args.calib)
  ]
  layouts = jasp.trace_layouts(model, calib[0])

  res = {"dense": {"val_loss": validate(), "seconds": 0.0}}
  methods = {
    "magnitude": lambda: jasp.prune(nnx.state(model, nnx.Param), layouts=layouts),
    "wanda": lambda: cal.wanda_prune(model, calib, layouts=layouts, progress=False),
    "sparsegpt": lambda: cal.sparsegpt_prune(model, calib, layouts=layouts, progress=False),
  }
  for name, fn in methods.items():
    nnx.update(model, dense)
    t = time.perf_counter()
    params, masks = fn()
    jax.block_until_ready(params)
    secs = time.perf_counter() - t
    nnx.update(model, params)
    report = jasp.sparsity_report(params, masks, layouts=layouts)
    assert report.all_valid, name
    res[name] = {"val_loss": validate(), "seconds": secs, "pruned_leaves": len(report.pruned)}

  dev = jax.devices()[0]
  print(
    f"jax {jax.__version__} on {dev.platform} ({getattr(dev, 'device_kind', '')}); model "
    f"{args.depth} blocks x {args.dim}, {args.steps} dense steps ({train_s:.0f} s); "
    f"{args.calib} x {args.batch} x {args.context} calibration bytes"
  )
  print("\n| model | val loss | perplexity / byte | pruning time |")
  print("| --- | --- | --- | --- |")
  for name, r in res.items():
    t = "" if name == "dense" else f"{r['seconds']:.1f} s"
    label = name if name == "dense" else f"2:4 one-shot {name}"
    print(f"| {label} | {r['val_loss']:.4f} | {math.exp(r['val_loss']):.3f} | {t} |")
  out = os.environ.get("OUT")
  if out:
    _meta.write_json(os.path.join(out, "calibration_lm.json"), {"args": vars(args), "results": res})
  return res


if __name__ == "__main__":
  main()
