"""Training-step overhead, memory and one-shot pruning time of jasp at ~1B parameters.

A decoder-only transformer in bf16 (pure-JAX params dict), one GPU:
  * median step time of optax.adamw vs adamw + jasp.mask_updates (masks given
    bool or packed; held packed either way) vs jasp.sparse_optimizer (grads and updates masked), rounds
    interleaved so that drift hits every variant alike;
  * compiled memory (arguments: params + optimizer state + masks; temporaries);
  * one-shot jasp.prune time (one program: masks + pruned weights) against the bytes floor
    at the device-to-device copy bandwidth measured in the same run.

    python benchmarks/scale_bench.py                 # ~1B params (GPU)
    python benchmarks/scale_bench.py --layers 2 --dim 256 --vocab 512 --batch 2 --seq 128  # CPU smoke
"""

from __future__ import annotations

import argparse
import time

import _meta  # benchmarks/_meta.py (the script's directory is on sys.path)
import jax
import jax.numpy as jnp
import numpy as np
import optax
from _bench_util import copy_bandwidth

import jasp


def init_params(key, layers, dim, vocab, dtype):
  ks = iter(jax.random.split(key, 6 * layers + 4))

  def w(shape, scale):
    return (jax.random.normal(next(ks), shape, jnp.float32) * scale).astype(dtype)

  p = {
    "embed": w((vocab, dim), 0.02),
    "head": w((dim, vocab), dim**-0.5),
    "ln_f": jnp.ones((dim,), dtype),
  }
  for i in range(layers):
    p[f"layer{i}"] = {
      "ln1": jnp.ones((dim,), dtype),
      "ln2": jnp.ones((dim,), dtype),
      "wq": w((dim, dim), dim**-0.5),
      "wk": w((dim, dim), dim**-0.5),
      "wv": w((dim, dim), dim**-0.5),
      "wo": w((dim, dim), dim**-0.5),
      "up": w((dim, 4 * dim), dim**-0.5),
      "down": w((4 * dim, dim), (4 * dim) ** -0.5),
    }
  return p


def rms(x, g):
  x32 = x.astype(jnp.float32)
  return (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + 1e-6)).astype(x.dtype) * g


def forward(p, tokens, heads):
  x = p["embed"][tokens]
  b, t, d = x.shape
  causal = jnp.tril(jnp.ones((t, t), bool))
  for name in sorted(k for k in p if k.startswith("layer")):
    lp = p[name]
    h = rms(x, lp["ln1"])
    q, k, v = (jnp.dot(h, lp[n]).reshape(b, t, heads, d // heads) for n in ("wq", "wk", "wv"))
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / np.sqrt(d // heads)
    a = jax.nn.softmax(jnp.where(causal, s, -1e9), -1).astype(x.dtype)
    o = jnp.einsum("bhqk,bkhd->bqhd", a, v).reshape(b, t, d)
    x = x + jnp.dot(o, lp["wo"])
    x = x + jnp.dot(jax.nn.gelu(jnp.dot(rms(x, lp["ln2"]), lp["up"])), lp["down"])
  return jnp.dot(rms(x, p["ln_f"]), p["head"])


def make_step(tx, heads):
  def loss(p, x, y):
    logits = forward(p, x, heads).astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  def step(p, s, x, y):
    l, g = jax.value_and_grad(loss)(p, x, y)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s, l

  return jax.jit(step, donate_argnums=(0, 1))


def copy_gbps(nbytes: int) -> float:
  """Device copy GB/s (read + write counted), host-timed median of 10 (``_bench_util``)."""
  return copy_bandwidth(nbytes) / 1e9


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--layers", type=int, default=18)
  ap.add_argument("--dim", type=int, default=2048)
  ap.add_argument("--heads", type=int, default=16)
  ap.add_argument("--vocab", type=int, default=32000)
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--seq", type=int, default=1024)
  ap.add_argument("--rounds", type=int, default=5)
  ap.add_argument("--steps", type=int, default=6, help="timed steps per variant per round")
  ap.add_argument("--json", type=str, default="")
  ap.add_argument(
    "--prune-only", action="store_true", help="time jasp.prune only (no training steps)"
  )
  args = ap.parse_args()
  dev = jax.devices()[0]
  print(f"device: {dev.device_kind} ({dev.platform}), JAX {jax.__version__}")
  key = jax.random.key(0)
  params = init_params(key, args.layers, args.dim, args.vocab, jnp.bfloat16)
  n = sum(x.size for x in jax.tree.leaves(params))
  x = jax.random.randint(jax.random.key(1), (args.batch, args.seq), 0, args.vocab)
  y = jnp.roll(x, -1, axis=1)
  layouts = jasp.trace_layouts(lambda p, t: forward(p, t, args.heads), params, x[:1, :8])

  # One-shot prune time (second call, compiled), bool and packed.
  prune_t = {}
  for packed in (False, True):
    for _ in range(2):
      jax.block_until_ready(params)
      t = time.perf_counter()
      pruned, masks = jasp.prune(params, layouts=layouts, packed=packed)
      jax.block_until_ready((masks, pruned))
      prune_t[packed] = time.perf_counter() - t
    del pruned
  bool_masks = jasp.compute_masks(params, layouts=layouts)
  packed_masks = jasp.compute_masks(params, layouts=layouts, packed=True)
  n_pruned = sum(m.size for m in jax.tree.leaves(bool_masks))
  bw = copy_gbps(1 << 30)
  floor_bool = n_pruned * (2 + 2 + 1) / (bw * 1e9)
  floor_packed = n_pruned * (2 + 2 + 0.125) / (bw * 1e9)

  if args.prune_only:
    print(
      f"jasp.prune ({n_pruned / 1e9:.3f} B weights, bf16): bool masks {prune_t[False]:.4f} s "
      f"(floor {floor_bool:.4f} s at {bw:.0f} GB/s copy), packed {prune_t[True]:.4f} s "
      f"(floor {floor_packed:.4f} s)"
    )
    return
  # 2:4-sparse weights draw less power than dense ones, so a GPU may clock
  # higher on them: "all kept" masks keep the data dense and isolate the
  # transformation's own cost.
  all_kept = jax.tree.map(
    lambda m: None if m is None else jnp.ones_like(m), bool_masks, is_leaf=lambda m: m is None
  )
  del bool_masks  # four optimizer states of a 1 B model must fit an 80 GB card
  variants = {
    "adamw": optax.adamw(1e-4, weight_decay=0.1),
    # bool masks, all kept, so the weights stay dense (held packed in the state,
    # 1 bit/weight, as every mask is; benchmarks/optimizer_step_bench.py has the
    # bool-state baseline)
    "adamw + mask_updates (bool given, all kept)": optax.chain(
      optax.adamw(1e-4, weight_decay=0.1), jasp.mask_updates(all_kept)
    ),
    "adamw + mask_updates (packed)": optax.chain(
      optax.adamw(1e-4, weight_decay=0.1), jasp.mask_updates(packed_masks)
    ),
    "sparse_optimizer(adamw) (packed)": jasp.sparse_optimizer(
      optax.adamw(1e-4, weight_decay=0.1), packed_masks
    ),
  }
  state = {}
  mem = {}
  for name, tx in variants.items():
    p = jax.tree.map(jnp.copy, params)
    s = jax.tree.map(jnp.copy, tx.init(p))  # own buffers: the step donates them
    step = make_step(tx, args.heads)
    c = step.lower(p, s, x, y).compile()
    ma = c.memory_analysis()
    mem[name] = (
      None
      if ma is None
      else {
        "argument_bytes": ma.argument_size_in_bytes,
        "temp_bytes": ma.temp_size_in_bytes,
        "output_bytes": ma.output_size_in_bytes,
      }
    )
    p, s, _ = step(p, s, x, y)  # warm-up
    p, s, l = step(p, s, x, y)
    l.block_until_ready()
    state[name] = (step, p, s)
  times = {k: [] for k in variants}
  for _ in range(args.rounds):
    for name in variants:
      step, p, s = state[name]
      for _ in range(args.steps):
        t = time.perf_counter()
        p, s, l = step(p, s, x, y)
        l.block_until_ready()
        times[name].append(time.perf_counter() - t)
      state[name] = (step, p, s)
  base = np.median(times["adamw"])
  print(
    f"\nmodel: {args.layers} layers, width {args.dim}, vocab {args.vocab}: {n / 1e9:.3f} B params "
    f"(bf16), {n_pruned / 1e9:.3f} B pruned 2:4; batch {args.batch} x {args.seq} tokens"
  )
  print(f"{'variant':<36} {'median step':>12} {'vs adamw':>9} {'args GiB':>9} {'temp GiB':>9}")
  for name in variants:
    med = np.median(times[name])
    m = mem[name] or {}
    print(
      f"{name:<36} {med * 1e3:10.2f}ms {100 * (med / base - 1):+8.2f}% "
      f"{m.get('argument_bytes', 0) / 2**30:9.3f} {m.get('temp_bytes', 0) / 2**30:9.3f}"
    )
  if mem["adamw"]:
    for name in list(variants)[1:]:
      extra = mem[name]["argument_bytes"] - mem["adamw"]["argument_bytes"]
      print(
        f"extra argument memory of '{name}': {extra / 2**20:.1f} MiB = "
        f"{8 * extra / n_pruned:.3f} bits per pruned weight"
      )
  print(
    f"\njasp.prune ({n_pruned / 1e9:.3f} B weights, bf16): bool masks {prune_t[False]:.3f} s "
    f"(floor {floor_bool:.4f} s = read w + write w + 1 B mask at {bw:.0f} GB/s copy), "
    f"packed {prune_t[True]:.3f} s (floor {floor_packed:.4f} s)"
  )
  out = {
    "device": dev.device_kind,
    "params": n,
    "pruned": n_pruned,
    "step_ms": {k: 1e3 * float(np.median(v)) for k, v in times.items()},
    "memory": mem,
    "prune_s": {"bool": prune_t[False], "packed": prune_t[True]},
    "floor_s": {"bool": floor_bool, "packed": floor_packed},
    "copy_GBps": bw,
  }
  if args.json:
    _meta.write_json(args.json, out)


if __name__ == "__main__":
  main()
