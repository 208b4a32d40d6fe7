"""A decoder-only transformer language model (flax nnx), dense -> 2:4 -> fine-tuned.

The corpus is the Python standard library's own source files, read as bytes
(every machine with Python has them; nothing is downloaded). Prints validation
loss and perplexity for the dense model, right after one-shot 2:4 pruning by
magnitude, Wanda and SparseGPT (with the time each took), after fine-tuning
the best of them for ``--finetune-steps`` steps with the masks enforced, and
for the fair baseline: the dense model trained the same number of extra steps
with the same optimizer. Writes a PNG of the curves (one labelled curve or
marker per model) and the figures as JSON.

    python examples/lm.py            # about 7 minutes on 2 CPU cores
    python examples/lm.py --quick    # a smoke run
    python examples/lm.py --help     # every option, with its default
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import jasp


def stdlib_corpus(max_bytes: int, val_fraction: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
  """Bytes of the standard library's .py files (sorted, deterministic), split by file."""
  root = Path(os.__file__).parent
  files = sorted(
    p
    for p in root.rglob("*.py")
    if "site-packages" not in p.parts and "test" not in p.parts and "tests" not in p.parts
  )
  chunks, total = [], 0
  for p in files:
    try:
      b = p.read_bytes()
    except OSError:
      continue
    chunks.append(b)
    total += len(b)
    if total >= max_bytes:
      break
  n_val = max(1, int(len(chunks) * val_fraction))
  # Every 10th file goes to validation: both splits span the whole library.
  val = [c for i, c in enumerate(chunks) if i % (len(chunks) // n_val or 1) == 0]
  train = [c for i, c in enumerate(chunks) if i % (len(chunks) // n_val or 1) != 0]
  as_arr = lambda cs: np.frombuffer(b"\n".join(cs), np.uint8).astype(np.int32)
  return as_arr(train), as_arr(val)


class Block(nnx.Module):
  def __init__(
    self, dim: int, heads: int, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs
  ):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.ln1 = nnx.LayerNorm(dim, **kw)
    self.attn = nnx.MultiHeadAttention(num_heads=heads, in_features=dim, decode=False, **kw)
    self.ln2 = nnx.LayerNorm(dim, **kw)
    self.up = nnx.Linear(dim, 4 * dim, **kw)
    self.down = nnx.Linear(4 * dim, dim, **kw)

  def __call__(self, x, mask):
    x = x + self.attn(self.ln1(x), mask=mask)
    return x + self.down(nnx.gelu(self.up(self.ln2(x))))


class DecoderLM(nnx.Module):
  """Byte-level decoder: token + position embeddings, ``depth`` blocks, a linear head.

  ``dtype`` is the computation dtype of every layer and ``param_dtype`` the
  parameters' (float32 for training here; bfloat16 for the inference benchmark).
  """

  def __init__(
    self,
    vocab: int = 256,
    dim: int = 128,
    heads: int = 4,
    depth: int = 4,
    context: int = 128,
    *,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    rngs: nnx.Rngs,
  ):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.tok = nnx.Embed(vocab, dim, **kw)
    self.pos = nnx.Embed(context, dim, **kw)
    self.blocks = nnx.List([Block(dim, heads, **kw) for _ in range(depth)])
    self.ln = nnx.LayerNorm(dim, **kw)
    self.head = nnx.Linear(dim, vocab, **kw)

  def __call__(self, tokens):
    t = tokens.shape[-1]
    x = self.tok(tokens) + self.pos(jnp.arange(t))
    mask = nnx.make_causal_mask(tokens)
    for blk in self.blocks:
      x = blk(x, mask)
    return self.head(self.ln(x))


def batches(data: np.ndarray, batch: int, context: int, rng: np.random.Generator):
  while True:
    idx = rng.integers(0, len(data) - context - 1, batch)
    x = np.stack([data[i : i + context + 1] for i in idx])
    yield x[:, :-1], x[:, 1:]


def loss_fn(model, x, y):
  return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


@nnx.jit
def train_step(model, opt, x, y):
  loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
  opt.update(model, grads)
  return loss


@nnx.jit
def eval_loss(model, x, y):
  return loss_fn(model, x, y)


def validate(model, val_x, val_y) -> float:
  return float(np.mean([float(eval_loss(model, x, y)) for x, y in zip(val_x, val_y)]))


def run_phase(model, tx, data, steps, args, desc, history, val, tqdm, seed):
  opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
  it = batches(data, args.batch, args.context, np.random.default_rng(seed))
  bar = tqdm(range(steps), desc=desc, unit="step", file=sys.stderr, mininterval=1.0)
  losses = []
  for s in bar:
    x, y = next(it)
    losses.append(train_step(model, opt, jnp.asarray(x), jnp.asarray(y)))
    if (s + 1) % args.eval_every == 0 or s + 1 == steps:
      v = validate(model, *val)
      history.append(
        {
          "phase": desc,
          "step": s + 1,
          "train_loss": float(np.mean(jax.device_get(losses[-args.eval_every :]))),
          "val_loss": v,
        }
      )
      bar.set_postfix(val_loss=f"{v:.3f}", ppl=f"{math.exp(v):.2f}")


METHOD_LABELS = {"magnitude": "magnitude", "wanda": "Wanda", "sparsegpt": "SparseGPT"}


def plot(history, one_shot, best, k, path):
  """Validation loss of every phase, and a marker for each one-shot 2:4 method.

  ``history``: the evaluation records of :func:`run_phase` (phases "dense",
  "2:4 fine-tune" and "dense + k steps"); ``one_shot``: ``{method: {"val_loss":
  ...}}``; ``best``: the method that was fine-tuned.
  """
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  phase = lambda name: [h for h in history if h["phase"] == name]
  dense, fine, dense_k = phase("dense"), phase("2:4 fine-tune"), phase(f"dense + {k} steps")
  last = dense[-1]["step"] if dense else 0
  start = dense[-1]["val_loss"] if dense else None  # where both continuations start
  label = METHOD_LABELS.get(best, best)
  fig, ax = plt.subplots(figsize=(9, 5))
  curves = [
    # (records, x offset, first point, colour, style, label)
    (dense, 0, None, "C0", "-", "dense: validation"),
    (dense_k, last, start, "C0", "--", f"dense + {k} more steps (baseline): validation"),
    (
      fine,
      last,
      one_shot[best]["val_loss"] if best in one_shot else None,
      "C1",
      "-",
      f"2:4 {label} + {k} fine-tuning steps: validation",
    ),
  ]
  for recs, offset, first, color, ls, name in curves:
    if not recs:
      continue
    xs = [offset + h["step"] for h in recs]
    ys = [h["val_loss"] for h in recs]
    if first is not None:
      xs, ys = [offset] + xs, [first] + ys
    ax.plot(xs, ys, color=color, ls=ls, marker=".", label=name)
    ax.plot(
      [offset + h["step"] for h in recs],
      [h["train_loss"] for h in recs],
      color=color,
      ls=ls,
      alpha=0.3,
      lw=1,
    )
  ax.plot([], [], color="gray", alpha=0.3, lw=1, label="training loss (faint, same colour)")
  markers = iter("ovs^D")
  for i, (name, res) in enumerate(one_shot.items()):
    ax.scatter(
      [last],
      [res["val_loss"]],
      color=f"C{i + 2}",
      marker=next(markers, "o"),
      zorder=3,
      label=f"2:4 one-shot {METHOD_LABELS.get(name, name)}: validation",
    )
  ax.axvline(last, color="gray", ls=":", lw=1)
  ax.set_xlabel(f"step (dense training | {k} more steps)")
  ax.set_ylabel("cross-entropy (nats/byte)")
  ax.set_title("byte-level LM on the Python stdlib: dense vs 2:4 (jasp)")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def add_model_args(p: argparse.ArgumentParser) -> None:
  """The model, corpus and optimiser flags (shared with benchmarks/calibration_lm.py)."""
  p.add_argument("--batch", type=int, default=16, help="sequences per training batch")
  p.add_argument("--context", type=int, default=128, help="sequence length in bytes")
  p.add_argument("--dim", type=int, default=128, help="model width")
  p.add_argument("--depth", type=int, default=3, help="number of transformer blocks")
  p.add_argument(
    "--lr", type=float, default=2e-3, help="peak AdamW learning rate of dense training"
  )
  p.add_argument(
    "--corpus-bytes",
    type=int,
    default=4_000_000,
    help="bytes of standard-library source to read (train + validation)",
  )
  p.add_argument(
    "--val-batches", type=int, default=8, help="fixed validation batches (batch x context bytes)"
  )
  p.add_argument("--seed", type=int, default=0, help="seed of the model and the data order")


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
  """The module docstring as written, and each option's default after its help."""


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
  p.add_argument("--steps", type=int, default=800, help="dense training steps")
  p.add_argument(
    "--finetune-steps",
    type=int,
    default=300,
    help="extra training steps, both for the 2:4 fine-tune and for the dense baseline",
  )
  add_model_args(p)
  p.add_argument(
    "--eval-every", type=int, default=100, help="steps between validation-loss evaluations"
  )
  p.add_argument(
    "--out", type=Path, default=Path("runs/lm"), help="directory for curves.png and results.json"
  )
  p.add_argument(
    "--methods",
    default="magnitude,wanda,sparsegpt",
    help="comma-separated one-shot 2:4 methods to compare; the best is fine-tuned",
  )
  p.add_argument(
    "--calib-batches", type=int, default=8, help="calibration batches (Wanda, SparseGPT)"
  )
  p.add_argument(
    "--quick",
    action="store_true",
    help="a smoke run: 30 + 20 steps of a 2-block, 64-wide model on 300 kB",
  )
  args = p.parse_args(argv)
  if args.quick:
    args.steps, args.finetune_steps, args.eval_every, args.val_batches = 30, 20, 10, 2
    args.calib_batches = 2
    args.corpus_bytes, args.dim, args.depth, args.context = 300_000, 64, 2, 64
  try:
    from tqdm import tqdm
  except ImportError:  # pragma: no cover
    tqdm = lambda it, **kw: it
  args.out.mkdir(parents=True, exist_ok=True)
  t0 = time.time()
  train, val = stdlib_corpus(args.corpus_bytes)
  print(
    f"corpus: Python {sys.version.split()[0]} standard library, {len(train):,} train / "
    f"{len(val):,} validation bytes; JAX {jax.__version__} on {jax.devices()[0].platform}"
  )
  vrng = np.random.default_rng(12345)
  vx, vy = zip(
    *[next(batches(val, args.batch, args.context, vrng)) for _ in range(args.val_batches)]
  )
  val_set = ([jnp.asarray(x) for x in vx], [jnp.asarray(y) for y in vy])

  model = DecoderLM(dim=args.dim, depth=args.depth, context=args.context, rngs=nnx.Rngs(args.seed))
  n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  print(f"model: {args.depth} blocks, width {args.dim}, {n_params:,} parameters")
  history: list[dict] = []
  sched = optax.warmup_cosine_decay_schedule(
    0.0, args.lr, min(100, args.steps // 10 + 1), args.steps
  )
  run_phase(
    model,
    optax.adamw(sched, weight_decay=0.01),
    train,
    args.steps,
    args,
    "dense",
    history,
    val_set,
    tqdm,
    args.seed,
  )
  dense_loss = validate(model, *val_set)

  # One-shot 2:4 by three methods, each from the same dense weights.
  layouts = jasp.trace_layouts(model, val_set[0][0])
  dense_state = jax.tree.map(jnp.copy, nnx.state(model, nnx.Param))
  crng = np.random.default_rng(args.seed + 7)
  calib = [
    jnp.asarray(next(batches(train, args.batch, args.context, crng))[0])
    for _ in range(args.calib_batches)
  ]
  pruners = {
    "magnitude": lambda: jasp.prune(dense_state, layouts=layouts),
    "wanda": lambda: jasp.wanda_prune(model, calib, layouts=layouts, progress=False),
    "sparsegpt": lambda: jasp.sparsegpt_prune(model, calib, layouts=layouts, progress=False),
  }
  one_shot = {}
  for name in args.methods.split(","):
    nnx.update(model, dense_state)
    t = time.perf_counter()
    params, masks = pruners[name]()
    jax.block_until_ready(params)
    seconds = time.perf_counter() - t
    nnx.update(model, params)
    one_shot[name] = {
      "val_loss": validate(model, *val_set),
      "seconds": seconds,
      "params": params,
      "masks": masks,
    }
    print(
      f"one-shot 2:4 {name:<10}: val loss {one_shot[name]['val_loss']:.4f} "
      f"(ppl {math.exp(one_shot[name]['val_loss']):.3f}) in {seconds:.2f} s"
    )
  best = min(one_shot, key=lambda k: one_shot[k]["val_loss"])
  params, masks = one_shot[best]["params"], one_shot[best]["masks"]
  pruned_loss = one_shot[best]["val_loss"]
  nnx.update(model, params)
  report = jasp.sparsity_report(params, masks, layouts=layouts)
  print(report.format(1))
  print(f"fine-tuning the best one-shot model: {best}")

  tx = jasp.sparse_optimizer(optax.adamw(args.lr / 4, weight_decay=0.01), masks)
  run_phase(
    model,
    tx,
    train,
    args.finetune_steps,
    args,
    "2:4 fine-tune",
    history,
    val_set,
    tqdm,
    args.seed + 1,
  )
  sparse_loss = validate(model, *val_set)
  final = jasp.sparsity_report(nnx.state(model, nnx.Param), masks, layouts=layouts)
  assert final.all_valid, "the fine-tuned model lost its 2:4 pattern"

  # The fair baseline: the dense model trained the same number of extra steps,
  # with the fine-tune's optimizer, learning rate and batches.
  k = args.finetune_steps
  nnx.update(model, dense_state)
  run_phase(
    model,
    optax.adamw(args.lr / 4, weight_decay=0.01),
    train,
    k,
    args,
    f"dense + {k} steps",
    history,
    val_set,
    tqdm,
    args.seed + 1,
  )
  dense_k_loss = validate(model, *val_set)

  plot(history, one_shot, best, k, args.out / "curves.png")
  res = {
    "dense_val_loss": dense_loss,
    "pruned_val_loss": pruned_loss,
    "best_method": best,
    "one_shot": {
      k: {"val_loss": v["val_loss"], "seconds": v["seconds"]} for k, v in one_shot.items()
    },
    "finetuned_val_loss": sparse_loss,
    "dense_continued_val_loss": dense_k_loss,
    "extra_steps": k,
    "pruned_leaves": len(final.pruned),
    "seconds": time.time() - t0,
  }
  (args.out / "results.json").write_text(json.dumps({"results": res, "history": history}, indent=1))
  print("\n  model                      val loss   perplexity (per byte)")
  print("  -------------------------  --------   ---------------------")
  rows = [("dense", dense_loss)]
  rows += [(f"2:4 one-shot ({k})", v["val_loss"]) for k, v in one_shot.items()]
  rows += [(f"dense + {k} steps", dense_k_loss)]
  rows += [(f"2:4 {best} + {k} steps", sparse_loss)]
  for name, v in rows:
    print(f"  {name:<25}  {v:8.4f}   {math.exp(v):10.3f}")
  print(
    f"\n{len(final.pruned)} weights 2:4; curves: {args.out / 'curves.png'}; "
    f"{time.time() - t0:.0f} s"
  )
  return res


if __name__ == "__main__":
  main()
