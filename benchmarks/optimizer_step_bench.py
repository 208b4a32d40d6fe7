"""Step time of AdamW with jasp's masks in the optimizer state: bool (before) vs 1-bit (now).

An MLP of ``--layers`` bf16 ``dim x dim`` kernels (default 8 x 4096^2, 134 M
params), one jitted training step (forward, backward, optimizer, apply) at each
``--tokens`` count: at 1024 tokens the step is memory-bound (the optimizer's
pass over params, gradients and moments weighs), at 16384 compute-bound.
Variants, all in one process, rounds interleaved (the order rotates each
round) so that drift hits every variant alike:

* ``adamw``: ``optax.adamw`` alone, the baseline;
* ``mask_updates bool state (before)``: the transformation as jasp wrote it
  while it held bool masks, rebuilt here from ``optax`` and ``jnp.where``
  (1 byte per weight read each step);
* ``mask_updates``: ``jasp.mask_updates`` given the bool masks of ``jasp.prune``
  (held packed, 1 bit per weight), the default;
* ``mask_updates PackedMask (axis 0)``: given ``jasp.pack_masks`` of them,
  packed along axis 0, the group axis (as ``jasp.prune(packed=True)`` packs),
  instead of the last axis that a state packs a bool mask along;
* ``sparse_optimizer bool state (before)``: ``jasp.sparse_optimizer`` whose
  state holds bool masks (``jasp.with_bool_masks``: the code path before);
* ``sparse_optimizer``: ``jasp.sparse_optimizer`` given bool masks, the default.

Targets (defaults, the memory-bound step): ``mask_updates`` within 1 % of
``adamw``, ``sparse_optimizer`` within 1.5 %.

    python benchmarks/optimizer_step_bench.py --out optimizer_step.json   # H200: ~60 s
    python benchmarks/optimizer_step_bench.py --dim 256 --layers 2 --tokens 64 256 \\
      --rounds 3 --steps 2 --out /tmp/o.json                              # CPU smoke
"""

from __future__ import annotations

import argparse
import time

import _meta  # benchmarks/_meta.py (the script's directory is on sys.path)
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jasp

TARGETS = {"mask_updates": 1.0, "sparse_optimizer": 1.5}  # % over adamw, memory-bound step


def bool_state_mask_updates(masks) -> optax.GradientTransformation:
  """``jasp.mask_updates`` as it was with bool masks in its state: ``where(mask, u, -p)``."""

  is_none = lambda x: x is None

  def init_fn(params):
    del params
    return jax.tree.map(
      lambda m: None if m is None else jnp.asarray(m, bool), masks, is_leaf=is_none
    )

  def update_fn(updates, state, params):
    def one(m, u, p):
      if m is None:
        return u
      dt = jnp.promote_types(u.dtype, p.dtype)
      return jnp.where(m, u.astype(dt), -p.astype(dt))

    return jax.tree.map(one, state, updates, params, is_leaf=is_none), state

  return optax.GradientTransformation(init_fn, update_fn)


def init_params(layers: int, dim: int) -> dict:
  keys = jax.random.split(jax.random.key(0), layers)
  return {
    f"layer{i}": {"kernel": (jax.random.normal(k, (dim, dim)) * dim**-0.5).astype(jnp.bfloat16)}
    for i, k in enumerate(keys)
  }


def loss_fn(params, x):
  h = x
  for i in range(len(params)):
    h = jax.nn.gelu(jnp.dot(h, params[f"layer{i}"]["kernel"]))
  return jnp.mean(jnp.square(h.astype(jnp.float32)))


def make_step(tx):
  def step(p, s, x):
    loss, g = jax.value_and_grad(loss_fn)(p, x)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s, loss

  return jax.jit(step, donate_argnums=(0, 1))


def variants(bool_masks, packed_masks) -> dict:
  """``{name: (transformation, state transform)}``; the state transform runs on ``tx.init``."""
  adamw = lambda: optax.adamw(1e-4, weight_decay=0.1)
  same = lambda s: s
  return {
    "adamw": (adamw(), same),
    "mask_updates bool state (before)": (
      optax.chain(adamw(), bool_state_mask_updates(bool_masks)),
      same,
    ),
    "mask_updates": (optax.chain(adamw(), jasp.mask_updates(bool_masks)), same),
    "mask_updates PackedMask (axis 0)": (
      optax.chain(adamw(), jasp.mask_updates(packed_masks)),
      same,
    ),
    "sparse_optimizer bool state (before)": (
      jasp.sparse_optimizer(adamw(), bool_masks),
      jasp.with_bool_masks,
    ),
    "sparse_optimizer": (jasp.sparse_optimizer(adamw(), bool_masks), same),
  }


def state_bytes(state) -> int:
  return sum(int(np.prod(np.shape(a))) * np.dtype(a.dtype).itemsize for a in jax.tree.leaves(state))


def time_tokens(params, masks, vs, tokens: int, dim: int, rounds: int, steps: int) -> dict:
  """Median ms per step of each variant at ``tokens`` tokens (rounds interleaved)."""
  x = jax.random.normal(jax.random.key(1), (tokens, dim), jnp.bfloat16)
  live = {}
  for name, (tx, to_state) in vs.items():
    p = jax.tree.map(jnp.copy, params)
    s = jax.tree.map(jnp.copy, to_state(tx.init(p)))  # own buffers: the step donates them
    step = make_step(tx)
    for _ in range(2):  # compile, warm up
      p, s, loss = step(p, s, x)
    loss.block_until_ready()
    live[name] = [step, p, s]
  times = {name: [] for name in vs}
  names = list(vs)
  for r in range(rounds):
    for name in names[r % len(names) :] + names[: r % len(names)]:
      step, p, s = live[name]
      t = time.perf_counter()
      for _ in range(steps):
        p, s, loss = step(p, s, x)
      loss.block_until_ready()
      times[name].append((time.perf_counter() - t) / steps)
      live[name][1:] = [p, s]
  for name in names[1:]:  # every masked variant kept the params N:M
    jasp.assert_masked(live[name][1], masks)
  return {name: 1e3 * float(np.median(t)) for name, t in times.items()}


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--layers", type=int, default=8)
  ap.add_argument("--dim", type=int, default=4096)
  ap.add_argument("--tokens", type=int, nargs="+", default=[1024, 16384])
  ap.add_argument("--rounds", type=int, default=15)
  ap.add_argument("--steps", type=int, default=10, help="steps per variant per round")
  ap.add_argument("--out", type=str, default="", help="results JSON path")
  ap.add_argument(
    "--all-kept",
    action="store_true",
    help="masks that keep every entry: dense weights in every variant (2:4-sparse weights may "
    "let a GPU clock higher, which would hide part of the masks' cost)",
  )
  args = ap.parse_args()
  dev = jax.devices()[0]
  print(f"device: {dev.device_kind} ({dev.platform}), JAX {jax.__version__}")
  t0 = time.perf_counter()
  params = init_params(args.layers, args.dim)
  params, bool_masks = jasp.prune(params)
  if args.all_kept:  # dense weights, same work: the transformation's own cost alone
    params = init_params(args.layers, args.dim)
    bool_masks = jax.tree.map(lambda m: jnp.ones_like(m), bool_masks)
  packed_masks = jasp.pack_masks(bool_masks)  # along axis 0, the kernels' group axis
  vs = variants(bool_masks, packed_masks)
  # the masks' bytes in the state: the state's bytes beyond adamw's
  sizes = {name: state_bytes(f(tx.init(params))) for name, (tx, f) in vs.items()}
  mask_bytes = {name: b - sizes["adamw"] for name, b in sizes.items()}
  n = sum(x.size for x in jax.tree.leaves(params))
  results = {}
  for tokens in args.tokens:
    results[tokens] = time_tokens(params, bool_masks, vs, tokens, args.dim, args.rounds, args.steps)
  print(
    f"\n{args.layers} x {args.dim}^2 bf16 kernels ({n / 1e6:.1f} M params, "
    f"{'all kept' if args.all_kept else '2:4'}), AdamW; "
    f"median of {args.rounds} interleaved rounds of {args.steps} steps"
  )
  head = f"{'variant':<38} {'mask MiB':>9}" + "".join(
    f" {f'{t} tok ms':>12} {'vs adamw':>9}" for t in args.tokens
  )
  print(head)
  for name in vs:
    row = f"{name:<38} {mask_bytes[name] / 2**20:9.2f}"
    for tokens in args.tokens:
      ms, base = results[tokens][name], results[tokens]["adamw"]
      row += f" {ms:12.3f} {100 * (ms / base - 1):+8.2f}%"
    print(row)
  low = min(args.tokens)
  verdict = {
    name: {
      "overhead_pct": 100 * (results[low][name] / results[low]["adamw"] - 1),
      "target_pct": target,
    }
    for name, target in TARGETS.items()
  }
  for name, v in verdict.items():
    ok = "meets" if v["overhead_pct"] <= v["target_pct"] else "MISSES"
    print(f"{name} at {low} tokens: {v['overhead_pct']:+.2f}% {ok} the {v['target_pct']}% target")
  print(f"total {time.perf_counter() - t0:.1f} s")
  if args.out:
    _meta.write_json(
      args.out,
      {
        "layers": args.layers,
        "dim": args.dim,
        "params": n,
        "rounds": args.rounds,
        "steps": args.steps,
        "all_kept": args.all_kept,
        "step_ms": {str(t): r for t, r in results.items()},
        "state_mask_bytes": mask_bytes,
        "targets_at_tokens": low,
        "targets": verdict,
      },
    )


if __name__ == "__main__":
  main()
