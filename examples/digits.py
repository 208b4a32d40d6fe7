"""The apex ASP recipe, end to end, on scikit-learn's bundled digits (no download).

train dense -> evaluate -> prune 2:4 -> evaluate -> fine-tune with the masks
enforced -> evaluate -> save the sparse checkpoint -> reload it and verify the
2:4 pattern -> export to ONNX and check the pattern in the file. Prints a
table of the three accuracies and writes a PNG of the loss/accuracy curves.

    python examples/digits.py                 # the full run (about a minute on 2 CPU cores)
    python examples/digits.py --quick         # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jasp


class CNN(nn.Module):
  """A small CNN for 8x8x1 digits: two convs, a flatten, two dense layers."""

  classes: int = 10

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(32, (3, 3))(x))  # in=1: stays dense (1 is not a multiple of 4)
    x = nn.relu(nn.Conv(64, (3, 3))(x))  # pruned 2:4 along its 32 input channels
    x = nn.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
    x = x.reshape(x.shape[0], -1)  # 4 * 4 * 64 = 1024 features
    x = nn.relu(nn.Dense(128)(x))
    return nn.Dense(self.classes)(x)


def load_digits(seed: int):
  """Digits as (x_train, y_train, x_test, y_test); x in [0, 1], shape (N, 8, 8, 1)."""
  from sklearn.datasets import load_digits as sk_digits
  from sklearn.model_selection import train_test_split

  data = sk_digits()
  x = (data.images / 16.0).astype(np.float32)[..., None]
  y = data.target.astype(np.int32)
  xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.25, random_state=seed, stratify=y)
  return xtr, ytr, xte, yte


def make_steps(model: nn.Module, tx: optax.GradientTransformation):
  def loss_fn(params, x, y):
    logits = model.apply({"params": params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  @jax.jit
  def train_step(params, opt_state, x, y):
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return train_step


def evaluate(model, params, x, y) -> tuple[float, float]:
  """(accuracy in %, mean cross-entropy) on the whole set."""
  logits = jax.jit(model.apply)({"params": params}, x)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
  return float(100 * jnp.mean(jnp.argmax(logits, -1) == y)), float(loss)


def train(model, params, tx, data, epochs, batch, seed, desc, history, tqdm):
  xtr, ytr, xte, yte = data
  opt_state = tx.init(params)
  step = make_steps(model, tx)
  rng = np.random.default_rng(seed)
  bar = tqdm(range(epochs), desc=desc, unit="epoch", file=sys.stderr)
  for _ in bar:
    perm = rng.permutation(len(xtr))
    losses = []
    for i in range(0, len(xtr) - batch + 1, batch):
      idx = perm[i : i + batch]
      params, opt_state, loss = step(params, opt_state, xtr[idx], ytr[idx])
      losses.append(loss)
    acc, test_loss = evaluate(model, params, xte, yte)
    history.append(
      {
        "phase": desc,
        "train_loss": float(np.mean(jax.device_get(losses))),
        "test_loss": test_loss,
        "test_acc": acc,
      }
    )
    bar.set_postfix(loss=f"{history[-1]['train_loss']:.4f}", acc=f"{acc:.2f}%")
  return params


def kept_magnitude(dense, pruned, masks) -> float:
  """Sum |w| kept over sum |w| of the dense weights, over the pruned leaves."""
  kept = total = 0.0
  for d, p, mk in zip(
    jax.tree.leaves(dense),
    jax.tree.leaves(pruned),
    jax.tree.leaves(masks, is_leaf=lambda x: x is None),
  ):
    if mk is None:
      continue
    kept += float(jnp.abs(p).sum())
    total += float(jnp.abs(d).sum())
  return kept / total


def plot(history, pruned_acc, path: Path):
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
  epochs = np.arange(1, len(history) + 1)
  dense_n = sum(h["phase"] == "dense" for h in history)
  a1.plot(epochs, [h["train_loss"] for h in history], label="train loss")
  a1.plot(epochs, [h["test_loss"] for h in history], label="test loss")
  a1.set_yscale("log")
  a2.plot(epochs, [h["test_acc"] for h in history], label="test accuracy", color="C2")
  a2.scatter([dense_n + 0.5], [pruned_acc], color="C3", zorder=3, label="right after 2:4 pruning")
  for ax, title in ((a1, "loss"), (a2, "test accuracy (%)")):
    ax.axvline(dense_n + 0.5, color="gray", ls="--", lw=1)
    ax.set_xlabel("epoch (dense | 2:4 fine-tune)")
    ax.set_title(title)
    ax.legend()
  fig.suptitle("digits CNN: dense training, 2:4 pruning, sparse fine-tuning (jasp)")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
  """The module docstring as written, and each option's default after its help."""


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=_HelpFormatter)
  p.add_argument("--epochs", type=int, default=40, help="dense training epochs")
  p.add_argument("--finetune-epochs", type=int, default=20, help="sparse fine-tuning epochs")
  p.add_argument("--batch", type=int, default=32, help="images per training batch")
  p.add_argument(
    "--lr", type=float, default=2e-3, help="Adam learning rate (halved for fine-tuning)"
  )
  p.add_argument("--n", type=int, default=2, help="weights kept in every group of m")
  p.add_argument("--m", type=int, default=4, help="group size along the input axis")
  p.add_argument("--seed", type=int, default=0, help="seed of the split, the model and the order")
  p.add_argument(
    "--out",
    type=Path,
    default=Path("runs/digits"),
    help="directory for the checkpoint, model.onnx, curves.png and results.json",
  )
  p.add_argument("--quick", action="store_true", help="few epochs: a smoke test of the pipeline")
  p.add_argument("--no-onnx", action="store_true", help="skip the ONNX export (needs jasp[onnx])")
  p.add_argument(
    "--permute",
    action="store_true",
    help="permute channels before pruning (apex's channel permutation) and compare",
  )
  p.add_argument(
    "--permute-time", type=float, default=5.0, help="search time limit per channel group (s)"
  )
  args = p.parse_args(argv)
  if args.quick:
    args.epochs, args.finetune_epochs = 3, 2
  try:
    from tqdm import tqdm
  except ImportError:  # pragma: no cover
    tqdm = lambda it, **kw: it
  import orbax.checkpoint as ocp

  args.out.mkdir(parents=True, exist_ok=True)
  t0 = time.time()
  data = load_digits(args.seed)
  xtr, ytr, xte, yte = data
  print(
    f"digits: {len(xtr)} train / {len(xte)} test images, 8x8x1, 10 classes "
    f"(scikit-learn's bundled copy); JAX {jax.__version__} on {jax.devices()[0].platform}"
  )
  model = CNN()
  params = model.init(jax.random.key(args.seed), xtr[:1])["params"]
  history: list[dict] = []

  # 1. Dense training.
  params = train(
    model,
    params,
    optax.adam(args.lr),
    data,
    args.epochs,
    args.batch,
    args.seed,
    "dense",
    history,
    tqdm,
  )
  dense_acc, _ = evaluate(model, params, xte, yte)

  # 2. One-shot 2:4 pruning, with the layouts traced from the model itself.
  layouts = jasp.trace_layouts(model.apply, {"params": params}, xtr[:1])
  dense_params = params
  sparse = jasp.prune({"params": params}, args.n, args.m, layouts=layouts)
  params, masks = sparse[0]["params"], sparse[1]["params"]
  pruned_acc, _ = evaluate(model, params, xte, yte)
  permutation = None
  if args.permute:
    # Permute channels first (the dense model computes the same function), then prune.
    kept_plain = kept_magnitude(dense_params, params, masks)
    t = time.time()
    permuted, preport = jasp.permute(
      model.apply,
      {"params": dense_params},
      xtr[:1],
      n=args.n,
      m=args.m,
      layouts=layouts,
      time_limit=args.permute_time,
    )
    print(preport)
    perm_dense = permuted["params"]
    perm_dense_acc, _ = evaluate(model, perm_dense, xte, yte)
    sparse_p = jasp.prune({"params": perm_dense}, args.n, args.m, layouts=layouts)
    p_params, p_masks = sparse_p[0]["params"], sparse_p[1]["params"]
    perm_acc, _ = evaluate(model, p_params, xte, yte)
    kept_perm = kept_magnitude(perm_dense, p_params, p_masks)
    permutation = {
      "seconds": time.time() - t,
      "dense_acc_after_permute": perm_dense_acc,
      "one_shot_acc_without": pruned_acc,
      "one_shot_acc_with": perm_acc,
      "kept_without": kept_plain,
      "kept_with": kept_perm,
    }
    print(
      f"\n  one-shot {args.n}:{args.m} (before fine-tuning)   accuracy   kept |w| of pruned layers"
    )
    print(f"  without permutation               {pruned_acc:7.2f}%   {100 * kept_plain:7.3f}%")
    print(f"  with permutation                  {perm_acc:7.2f}%   {100 * kept_perm:7.3f}%")
    print(
      f"  (dense accuracy after permuting: {perm_dense_acc:.2f}%, unchanged function; "
      f"{permutation['seconds']:.1f} s)"
    )
    params, masks, pruned_acc = p_params, p_masks, perm_acc
  report = jasp.sparsity_report(
    {"params": params}, {"params": masks}, args.n, args.m, layouts=layouts
  )
  print(report)

  # 3. Fine-tune with the masks enforced (gradients and updates masked).
  tx = jasp.sparse_optimizer(optax.adam(args.lr / 2), masks)
  params = train(
    model,
    params,
    tx,
    data,
    args.finetune_epochs,
    args.batch,
    args.seed + 1,
    "2:4 fine-tune",
    history,
    tqdm,
  )
  sparse_acc, _ = evaluate(model, params, xte, yte)

  # 4. Save the sparse checkpoint, reload it into a fresh model, verify the pattern.
  ckpt_dir = (args.out / "sparse_checkpoint").resolve()
  with ocp.StandardCheckpointer() as cp:
    cp.save(ckpt_dir, {"params": params, "masks": masks}, force=True)
  fresh = model.init(jax.random.key(args.seed + 99), xtr[:1])["params"]
  with ocp.StandardCheckpointer() as cp:
    restored = cp.restore(ckpt_dir, {"params": fresh, "masks": masks})
  check = jasp.sparsity_report(
    {"params": restored["params"]}, {"params": restored["masks"]}, args.n, args.m, layouts=layouts
  )
  reloaded_acc, _ = evaluate(model, restored["params"], xte, yte)
  assert check.all_valid, "the reloaded checkpoint is not N:M"
  assert reloaded_acc == sparse_acc, "the reloaded model computes something else"
  print(
    f"reloaded {ckpt_dir}: {len(check.pruned)} weights verified "
    f"{args.n}:{args.m} along their input axis; accuracy {reloaded_acc:.2f}%"
  )

  # 5. Export to ONNX with the pattern intact, and check the file itself.
  onnx_ok = None
  if not args.no_onnx:
    from jasp import export

    onnx_path = args.out / "model.onnx"
    export.to_onnx(
      model.apply,
      {"params": params},
      xte[:1],
      path=onnx_path,
      masks={"params": masks},
      dynamic_batch=True,
    )
    onnx_logits = export.run_onnx(onnx_path, xte)[0]
    jax_logits = np.asarray(jax.jit(model.apply)({"params": params}, xte))
    rel = float(np.linalg.norm(onnx_logits - jax_logits) / np.linalg.norm(jax_logits))
    check_onnx = export.check_file(onnx_path, n=args.n, m=args.m)
    print(f"\nwrote {onnx_path}: onnxruntime vs JAX relative error {rel:.1e}")
    print(check_onnx)
    onnx_ok = bool(check_onnx.ok) and rel <= 1e-5
    assert onnx_ok, "the ONNX file lost the pattern or computes something else"

  plot(history, pruned_acc, args.out / "curves.png")
  results = {
    "dense_acc": dense_acc,
    "pruned_acc": pruned_acc,
    "sparse_finetuned_acc": sparse_acc,
    "gap_points": dense_acc - sparse_acc,  # dense minus fine-tuned 2:4; < 0: 2:4 is better
    "seconds": time.time() - t0,
    "pruned_leaves": len(report.pruned),
    "pattern_verified": bool(check.all_valid),
    "onnx_verified": onnx_ok,
    "permutation": permutation,
  }
  (args.out / "results.json").write_text(
    json.dumps({"results": results, "history": history}, indent=1)
  )
  rows = [
    ("dense", dense_acc),
    (f"{args.n}:{args.m} one-shot (no fine-tune)", pruned_acc),
    (f"{args.n}:{args.m} fine-tuned", sparse_acc),
  ]
  print("\n  model                          test accuracy")
  print("  -----------------------------  -------------")
  for name, acc in rows:
    print(f"  {name:<29}  {acc:12.2f}%")
  change = sparse_acc - dense_acc  # > 0: the sparse model is more accurate
  if change > 0:
    verdict = "more accurate than dense"
  elif change == 0:
    verdict = "as accurate as dense"
  elif change >= -1.0:
    verdict = f"{-change:.2f} points lost, within 1 point of dense"
  else:
    verdict = f"{-change:.2f} points lost, NOT within 1 point of dense"
  print(
    f"\nfine-tuned {args.n}:{args.m} model: {sparse_acc:.2f}% vs dense {dense_acc:.2f}% "
    f"({change:+.2f} points: {verdict})"
  )
  print(f"curves: {args.out / 'curves.png'}; {time.time() - t0:.0f} s")
  return results


if __name__ == "__main__":
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  main()
