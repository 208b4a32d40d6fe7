"""One-shot 2:4 pruning of a LLaMA-shaped decoder: SparseGPT (sequential) and Wanda, end to end.

The decoder is written the way LLaMA is (pre-norm RMSNorm blocks, RoPE, grouped
or multi-head attention, a SiLU-gated MLP, no biases), as a pure-JAX params
dict whose blocks are stacked on a leading layer axis and run by ``lax.scan``.
Weights are random (scaled like an initialised model) in bf16; calibration
batches are token sequences from a generated bigram chain (nothing is
downloaded). For each method the script records the end-to-end wall time of
``jasp.sparsegpt_prune`` / ``jasp.wanda_prune`` (statistics in float32), the
peak device memory, and the relative error of the pruned model's final hidden
states against the dense model's on held-out batches.

    python benchmarks/llm_oneshot.py --preset 7b --out llm_oneshot_h200.json   # GPU
    python benchmarks/llm_oneshot.py --preset tiny                              # CPU smoke

``--sparsegpt-dir PATH`` adds the authors' SparseGPT side by side on the same
weights, card and calibration tokens, in this process: their
``llama_sequential`` loop (true-sequential 2:4, damping 0.01, block 128),
imported from a checkout of IST-DASLab/sparsegpt at ``PATH`` (never part of this
project) and run on a PyTorch copy of the decoder (``llm_oneshot_torch.py``);
``--compare-layers K`` runs both on the first ``K`` blocks only. ``--devices N``
shards the calibration batches over ``N`` devices, params replicated
(``jax.sharding``; no communication written by hand): statistics are
data-parallel, and each weight's SparseGPT solve is split by output columns;
``--devices 1,2`` runs each count in turn and compares the masks with the first
count's (fraction of equal entries).
``--finetune-steps S`` times ``S`` steps of next-token training of the pruned
model with ``jasp.sparse_optimizer`` (packed masks) around AdamW against plain
AdamW, on one sequence of ``seq`` tokens per step.

``--preset 7b``: 32 blocks, width 4096, MLP 11008, 32 heads (``--kv-heads 8``
for GQA), 128 sequences of 2048 tokens in batches of ``--batch``. Sequential
SparseGPT streams the blocks: each batch's input to the current block is kept
(one ``(batch, seq, width)`` array per batch), never every layer's activations.
"""

from __future__ import annotations

import argparse
import functools
import math
import time

import _meta  # benchmarks/_meta.py (the script's directory is on sys.path)
import jax
import jax.numpy as jnp
import numpy as np
from _bench_util import Phases
from _bench_util import peak_bytes

import jasp

PRESETS = {
  "7b": dict(layers=32, dim=4096, hidden=11008, heads=32, vocab=32000, samples=128, seq=2048),
  "small": dict(layers=4, dim=1024, hidden=2816, heads=8, vocab=8192, samples=32, seq=512),
  "tiny": dict(layers=2, dim=64, hidden=176, heads=4, vocab=256, samples=4, seq=32),
}


def init_params(key, layers, dim, hidden, heads, kv_heads, vocab, dtype=jnp.bfloat16):
  """LLaMA-style params; the blocks' kernels are stacked ``(layers, in, ...)``."""
  head_dim = dim // heads
  ks = iter(jax.random.split(key, 16))

  def w(shape, fan_in):
    return (jax.random.normal(next(ks), shape, jnp.float32) * fan_in**-0.5).astype(dtype)

  blocks = {
    "attn_norm": jnp.ones((layers, dim), dtype),
    "q": w((layers, dim, heads, head_dim), dim),
    "k": w((layers, dim, kv_heads, head_dim), dim),
    "v": w((layers, dim, kv_heads, head_dim), dim),
    "o": w((layers, heads, head_dim, dim), dim),
    "mlp_norm": jnp.ones((layers, dim), dtype),
    "gate": w((layers, dim, hidden), dim),
    "up": w((layers, dim, hidden), dim),
    "down": w((layers, hidden, dim), hidden),
  }
  return {
    "embed": w((vocab, dim), 1.0) * jnp.asarray(0.02, dtype),
    "blocks": blocks,
    "final_norm": jnp.ones((dim,), dtype),
  }


def rms_norm(x, scale, eps=1e-6):
  xf = x.astype(jnp.float32)
  xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
  return (xf * scale.astype(jnp.float32)).astype(x.dtype)


def rope(x, theta=10_000.0):
  """Rotary embedding, rotate-half form, on ``x (B, T, N, Dh)``."""
  t, half = x.shape[1], x.shape[-1] // 2
  inv = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
  ang = jnp.arange(t, dtype=jnp.float32)[:, None] * inv[None, :]
  sin, cos = jnp.sin(ang)[None, :, None, :], jnp.cos(ang)[None, :, None, :]
  x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).astype(x.dtype)


def block(x, p):
  """One pre-norm block; the scan body over the stacked params."""
  b, t, _ = x.shape
  h = rms_norm(x, p["attn_norm"])
  q = rope(jnp.einsum("btd,dnh->btnh", h, p["q"]))
  k = rope(jnp.einsum("btd,dnh->btnh", h, p["k"]))
  v = jnp.einsum("btd,dnh->btnh", h, p["v"])
  rep = q.shape[2] // k.shape[2]
  k, v = jnp.repeat(k, rep, axis=2), jnp.repeat(v, rep, axis=2)
  s = jnp.einsum("bqnh,bknh->bnqk", q, k).astype(jnp.float32) / math.sqrt(q.shape[-1])
  s = jnp.where(jnp.tril(jnp.ones((t, t), bool)), s, -1e30)
  a = jnp.einsum("bnqk,bknh->bqnh", jax.nn.softmax(s, -1).astype(v.dtype), v)
  x = x + jnp.einsum("btnh,nhd->btd", a, p["o"])
  h = rms_norm(x, p["mlp_norm"])
  g = jnp.einsum("btd,df->btf", h, p["gate"])
  u = jnp.einsum("btd,df->btf", h, p["up"])
  return x + jnp.einsum("btf,fd->btd", jax.nn.silu(g) * u, p["down"])


def hidden_states(params, tokens):
  """The final normed hidden states ``(B, T, dim)`` (the LM head is the tied embedding)."""
  x = params["embed"][tokens]
  x, _ = jax.lax.scan(lambda h, p: (block(h, p), None), x, params["blocks"])
  return rms_norm(x, params["final_norm"])


def bigram_tokens(seed, n, length, vocab):
  """``(n, length)`` int32 tokens from a fixed random bigram chain (a stand-in for text)."""
  rng = np.random.default_rng(1234)
  nxt = rng.integers(0, vocab, size=(vocab, 8))
  r = np.random.default_rng(seed)
  out = np.empty((n, length), np.int32)
  out[:, 0] = r.integers(0, vocab, n)
  for i in range(1, length):
    out[:, i] = nxt[out[:, i - 1], r.integers(0, 8, n)]
  return jnp.asarray(out)


def output_error(params, pruned, held_out) -> float:
  """``||h_pruned - h_dense|| / ||h_dense||`` over the held-out batches (float32)."""
  f = jax.jit(hidden_states)
  num = den = 0.0
  for x in held_out:
    d = f(params, x).astype(jnp.float32)
    s = f(pruned, x).astype(jnp.float32)
    num += float(jnp.sum((s - d) ** 2))
    den += float(jnp.sum(d**2))
  return math.sqrt(num / den)


def shard(params, batches, held_out, devices: int):
  """Batches split along sequences over ``devices``; params replicated.

  The statistics are then data-parallel, and jasp splits each weight's
  SparseGPT solve by output columns over the same devices. (Splitting the
  params along their output axes too, over the same mesh axis, makes every
  block's forward gather the activations.)
  """
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  mesh = jax.make_mesh((devices,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
  put = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))
  params = jax.tree.map(lambda x: put(x, P()), params)
  by_seq = lambda xs: [put(x, P("d")) for x in xs]
  return params, by_seq(batches), by_seq(held_out)


def agreement(masks, ref) -> dict:
  """Fraction of equal mask entries against ``ref``'s: mean and worst over the pruned leaves."""
  fr = [
    float(jnp.mean(jax.device_get(a) == jax.device_get(b)))
    for a, b in zip(jax.tree.leaves(masks), jax.tree.leaves(ref))
  ]
  return {"mean": float(np.mean(fr)), "min": float(np.min(fr)), "leaves": len(fr)}


_PHASES = None


def run_method(name, params, batches, held_out, keep: dict | None = None) -> dict:
  """Prunes with ``name``; wall time, the compile phases inside it, memory, mask and output figures."""
  global _PHASES
  _PHASES = _PHASES or Phases()
  prune = {"sparsegpt": jasp.sparsegpt_prune, "wanda": jasp.wanda_prune}[name]
  kwargs = {"sequential": True} if name == "sparsegpt" else {}
  with _PHASES:
    t0 = time.perf_counter()
    pruned, masks = prune(hidden_states, params, batches, progress=False, **kwargs)
    jax.block_until_ready((pruned, masks))
    wall = time.perf_counter() - t0
  kept = [float(jnp.mean(m)) for m in jax.tree.leaves(masks)]
  if keep is not None:
    keep[name] = masks
  return {
    "wall_s": wall,
    "compile": _PHASES.summary(),
    "peak_bytes": peak_bytes(),
    "pruned_leaves": len(kept),
    "kept_fraction": float(np.mean(kept)) if kept else None,
    "output_rel_error": output_error(params, pruned, held_out),
  }


def first_layers(params, k: int):
  """The model cut to its first ``k`` blocks."""
  return {**params, "blocks": jax.tree.map(lambda x: x[:k], params["blocks"])}


def side_by_side(params, cfg, batches, held_out, sparsegpt_dir: str) -> dict:
  """jasp's sequential SparseGPT and the authors' on the same weights and tokens."""
  import llm_oneshot_torch as lt  # PyTorch: only for the comparison
  import torch

  out = {"layers": int(params["blocks"]["q"].shape[0])}
  out["jasp"] = run_method("sparsegpt", params, batches, held_out)
  print(f"  jasp sparsegpt: {out['jasp']}", flush=True)
  t0 = time.perf_counter()
  model = lt.from_jax(params, {"seq": cfg["seq"]})
  out["torch_copy_s"] = time.perf_counter() - t0
  dev = "cuda:0" if torch.cuda.is_available() else "cpu"
  res = lt.run_authors(model, [np.asarray(b) for b in batches], sparsegpt_dir, dev)
  res["output_rel_error"] = output_error(params, lt.to_jax(model, params), held_out)
  out["authors"] = res
  out["speedup"] = res["wall_s"] / out["jasp"]["wall_s"]
  out["error_ratio"] = out["jasp"]["output_rel_error"] / res["output_rel_error"]
  print(f"  authors: {res}", flush=True)
  return out


def next_token_loss(params, tokens):
  """Mean next-token cross-entropy (tied embedding as the LM head); blocks rematerialised."""
  x = params["embed"][tokens[:, :-1]]
  step = jax.checkpoint(lambda c, p: (block(c, p), None))
  x, _ = jax.lax.scan(step, x, params["blocks"])
  h = rms_norm(x, params["final_norm"])
  logits = jnp.einsum("btd,vd->btv", h, params["embed"]).astype(jnp.float32)
  logp = jax.nn.log_softmax(logits, -1)
  return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], -1))


def finetune(pruned, packed, tokens, steps: int) -> dict:
  """Step time and peak memory: AdamW, and ``sparse_optimizer`` (``packed`` masks) around it.

  ``pruned``: the params in host memory; each variant trains its own device copy.
  """
  import optax

  out = {}
  for name, tx in [
    ("adamw", optax.adamw(1e-5)),
    ("sparse_optimizer(adamw), packed", jasp.sparse_optimizer(optax.adamw(1e-5), packed)),
  ]:
    # Params and optimizer state donated: updated in place, as a training loop does.
    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(p, s, x, tx=tx):
      loss, g = jax.value_and_grad(next_token_loss)(p, x)
      u, s = tx.update(g, s, p)
      return optax.apply_updates(p, u), s, loss

    p = jax.tree.map(lambda a: jnp.array(a, copy=True), pruned)  # its own copy, donated
    s = tx.init(p)
    t0 = time.perf_counter()
    p, s, loss = step(p, s, tokens)
    jax.block_until_ready(loss)
    first = time.perf_counter() - t0
    times = []
    for _ in range(steps):
      t0 = time.perf_counter()
      p, s, loss = step(p, s, tokens)
      jax.block_until_ready(loss)
      times.append(time.perf_counter() - t0)
    kept = all(bool(jasp.is_nm(p["blocks"][k], 2, 4, a)) for k, a in _AXES.items())
    out[name] = {
      "first_s": first,
      "step_s": float(np.median(times)),
      "loss": float(loss),
      "peak_bytes": peak_bytes(),
      "still_2to4": kept,
    }
    print(f"  {name}: {out[name]}", flush=True)
    del p, s
  return out


# The input axes of the blocks' stacked kernels (after the layer axis).
_AXES = {"q": 1, "k": 1, "v": 1, "o": (1, 2), "gate": 1, "up": 1, "down": 1}


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
  ap.add_argument("--kv-heads", type=int, default=0, help="0: as many as heads (MHA)")
  ap.add_argument("--batch", type=int, default=8, help="sequences per calibration batch")
  ap.add_argument("--methods", default="wanda,sparsegpt")
  ap.add_argument("--held-out", type=int, default=2, help="held-out batches for the error")
  ap.add_argument("--devices", default="1", help="device counts to shard over, e.g. 1,2")
  ap.add_argument("--sparsegpt-dir", default="", help="a checkout of IST-DASLab/sparsegpt")
  ap.add_argument("--compare-layers", type=int, default=0, help="0: every block")
  ap.add_argument("--finetune-steps", type=int, default=0)
  ap.add_argument(
    "--tc-hessian",
    type=int,
    default=2048,
    help="SparseGPT's Hessian from the bf16 activations on the tensor cores, summed in float32 "
    "over chunks of this many rows (jasp's default 2048; 0: one product); -1: float32 at HIGHEST",
  )
  ap.add_argument("--out", default="")
  args = ap.parse_args()
  cfg = dict(PRESETS[args.preset])
  kv = args.kv_heads or cfg["heads"]
  dev = jax.devices()[0]
  out = {"preset": args.preset, "config": dict(cfg, kv_heads=kv), "device": dev.device_kind}
  from jasp.calibration import stats

  stats._HESSIAN_TC_CHUNK = args.tc_hessian if args.tc_hessian >= 0 else None
  out["hessian"] = (
    "float32 HIGHEST" if args.tc_hessian < 0 else f"bf16 tensor cores, chunk {args.tc_hessian}"
  )
  print(f"device: {dev.device_kind}, JAX {jax.__version__}; {out['config']}", flush=True)
  params = init_params(
    jax.random.key(0), cfg["layers"], cfg["dim"], cfg["hidden"], cfg["heads"], kv, cfg["vocab"]
  )
  n_batches = max(1, cfg["samples"] // args.batch)
  batches = [bigram_tokens(s, args.batch, cfg["seq"], cfg["vocab"]) for s in range(n_batches)]
  held_out = [
    bigram_tokens(10_000 + s, args.batch, cfg["seq"], cfg["vocab"]) for s in range(args.held_out)
  ]
  out["calibration_tokens"] = n_batches * args.batch * cfg["seq"]
  save = (lambda: _meta.write_json(args.out, out)) if args.out else (lambda: None)
  counts = [int(d) for d in args.devices.split(",")]
  first: dict = {}
  for d in counts:
    p, b, h = (params, batches, held_out) if d == 1 else shard(params, batches, held_out, d)
    for name in [m for m in args.methods.split(",") if m]:
      masks: dict = {}
      res = run_method(name, p, b, h, keep=masks)
      if name in first:
        res["mask_agreement_vs_first"] = agreement(masks[name], first[name])
      else:
        first[name] = masks[name]
      out[name if len(counts) == 1 else f"{name} x{d}"] = res
      print(f"{name} on {d} device(s): {res}", flush=True)
      save()
    del p, b, h
  first.clear()
  if args.sparsegpt_dir:
    k = args.compare_layers or cfg["layers"]
    print(f"side by side with the authors' SparseGPT, {k} blocks:", flush=True)
    out["side_by_side"] = side_by_side(
      first_layers(params, k), cfg, batches, held_out, args.sparsegpt_dir
    )
    save()
  if args.finetune_steps:
    pruned, masks = jasp.wanda_prune(hidden_states, params, batches[:1], progress=False)
    packed, tokens = jasp.pack_masks(masks), batches[0][:1]
    pruned = jax.device_get(pruned)  # to host: one model on the device at a time
    del params, batches, held_out, masks
    print("fine-tune steps:", flush=True)
    out["finetune"] = finetune(pruned, packed, tokens, args.finetune_steps)
    save()


if __name__ == "__main__":
  main()
