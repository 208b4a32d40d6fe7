"""End-to-end greedy decoding of the LM example's decoder: 2:4 weights (jasp.sparse) vs dense.

The model is ``examples/lm.py``'s :class:`DecoderLM` (nnx: token + position
embeddings, ``--depth`` pre-LayerNorm blocks of ``nnx.MultiHeadAttention`` and a
GELU MLP, a linear head), vocabulary 256, parameters and computation in bf16,
randomly initialised (never trained: the figures are speed, and agreement
between variants that share the same weights).

Generation uses nnx's own attention KV cache (``MultiHeadAttention`` switched
to ``decode=True``, ``init_cache((batch, context, dim))``; the position
embedding reads the current position). The prompt (``--prompt`` random tokens)
is prefilled token by token through the same cached one-token step, in one
jitted ``lax.fori_loop`` (simple, and exactly the decode path). Then one jitted
``lax.scan`` generates ``--new-tokens`` greedy tokens: each step feeds the
previous token and appends the argmax of its logits (the first step feeds the
last prompt token). Only that scan is timed: wall time of one call of the
compiled program (a host sync at its end; dispatch is paid once per
generation, not per token), after a warm-up call, median of ``--reps``.
Compilation (tracing, lowering and XLA compile of the scan) is timed
separately, as are the prefill and, for the sparse variants, the policy's
decisions (measured on the GPU once per layer shape and token count, before
compiling, so that compile time does not include them).

tokens/s = batch * new_tokens / seconds; ms/token = seconds / new_tokens * 1e3
(one decoding step of the whole batch). Per-token time grows about linearly
with ``--depth`` (each step reads every block's weights once; the embeddings
and the 256-way head are a small constant), so a 32-block model of the same
width takes about 8x the block time of the default 4 blocks; the default keeps
compile time and memory small while each step still reads 805 M weights.

Variants, all with the same weights (copies of one random model):

1. ``dense``: the random bf16 model.
2. ``dense, 2:4 weights``: the same after one-shot magnitude 2:4 pruning
   (``jasp.prune`` with ``jasp.trace_layouts``) of every Linear kernel of the
   blocks (attention query/key/value/out, MLP up/down); embeddings, norms and
   biases are never pruned and the head is kept dense (``--prune-head`` prunes
   it too). Run densely: the baseline of the speedups.
3. ``jasp.sparse``: variant 2 after ``jasp.sparse.sparsify_nnx(model,
   dtype=bf16)``: the policy picks the dense dot or cuSPARSELt per layer shape
   and token count (dense on CPU, with one warning).
4. ``jasp.sparse, compact``: the same with ``compact=True`` (a compressed copy
   of each kernel for the decode-time kernel ``jasp.kernels.decode24``, which
   the policy then weighs too).

Correctness, before timing (batch 1): variants 3 and 4 must reproduce variant
2's first-step logits within ``tol * max|logits|``, where ``tol = max(4 e,
2^-7)`` and ``e`` is the relative error of variant 2 itself (bf16) against the
same weights evaluated in float32: a 2:4 kernel may round differently from
XLA's dense dot, but not by more than a few times what bf16 already does to
this model; a wrong kernel (layout, positions) is off by O(1). A mismatch is
recorded under ``errors``, the variant is not timed and the exit status is 1.
The fraction of equal greedy tokens vs variant 2 is recorded (not checked:
near-ties of bf16 logits can flip a later argmax and the sequences diverge).

    python3 benchmarks/decode_lm.py --out $OUT/decode_lm_h100.json   # GPU, defaults
    python3 benchmarks/decode_lm.py --smoke                           # CPU, ~30 s
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, os.path.join(HERE, "..", "examples"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import lm  # noqa: E402  (examples/lm.py: the model)
import numpy as np  # noqa: E402
from _bench_util import Recorder  # noqa: E402
from _bench_util import peak_bytes  # noqa: E402
from flax import nnx  # noqa: E402

import jasp  # noqa: E402
import jasp.sparse  # noqa: E402
from jasp.sparse import autotune  # noqa: E402

VOCAB = 256
VARIANTS = ("dense", "dense, 2:4 weights", "jasp.sparse", "jasp.sparse, compact")
BASELINE = VARIANTS[1]
SMOKE = dict(dim=64, heads=4, depth=2, context=32, prompt=4, new_tokens=8, batches="1,2", reps=1)
# The floor of the logit tolerance, relative to max |logit| (see the module docstring).
TOL_FLOOR = 2.0**-7
TOL_FACTOR = 4.0


class Mismatch(AssertionError):
  """A variant's first-step logits differ from the baseline's beyond the tolerance."""


# ----------------------------------------------------------------------------
# The model and its one-token step.


def build_model(cfg: dict, dtype: Any = jnp.bfloat16, seed: int = 0) -> lm.DecoderLM:
  """A randomly initialised :class:`lm.DecoderLM` of ``cfg``'s size in ``dtype``."""
  return lm.DecoderLM(
    vocab=VOCAB,
    dim=cfg["dim"],
    heads=cfg["heads"],
    depth=cfg["depth"],
    context=cfg["context"],
    dtype=dtype,
    param_dtype=dtype,
    rngs=nnx.Rngs(seed),
  )


def prune(model: lm.DecoderLM, prune_head: bool = False) -> dict:
  """One-shot magnitude 2:4 pruning of ``model``'s block kernels, in place.

  Returns ``{"pruned": [paths], "dense": {path: reason}}`` from the sparsity report.
  """
  x = jnp.zeros((1, 8), jnp.int32)
  layouts = jasp.trace_layouts(model, x)
  policy = None if prune_head else jasp.Policy(exclude=[r"^head/"])
  params, masks = jasp.prune(nnx.state(model, nnx.Param), layouts=layouts, policy=policy)
  nnx.update(model, params)
  rep = jasp.sparsity_report(params, masks, layouts=layouts, policy=policy).to_dict()
  pruned = [leaf["path"] for leaf in rep["leaves"] if leaf["status"] == "pruned"]
  dense = {
    leaf["path"]: leaf["reason"] or "excluded"
    for leaf in rep["leaves"]
    if leaf["path"] not in pruned
  }
  if not rep["all_valid"]:
    raise AssertionError("jasp.prune left a pruned leaf that is not 2:4")
  return {"pruned": pruned, "dense": dense, "pruned_params": rep["pruned_params"]}


def forward_one(model: lm.DecoderLM, tok: jax.Array, pos: jax.Array) -> jax.Array:
  """Logits ``(B, vocab)`` of one token per row, ``tok (B, 1)`` at position ``pos``.

  The attention layers must be in decode mode with their cache initialised;
  each call appends this position's keys and values to the cache.
  """
  x = model.tok(tok) + model.pos(jnp.reshape(pos, (1,)))
  for blk in model.blocks:
    x = blk(x, None)  # the cache's own causal mask (positions <= the cache index)
  return model.head(model.ln(x))[:, 0]


def attention_layers(model: nnx.Module) -> list[nnx.MultiHeadAttention]:
  return [n for _, n in nnx.iter_graph(model) if isinstance(n, nnx.MultiHeadAttention)]


class Generator:
  """Jitted prefill and greedy decode of one model at one batch size, with a KV cache.

  Attributes:
    prefill: ``prefill(prompt (B, P)) -> cache`` after positions ``0 .. P-2``
      (compiled on first use).
    decode: the compiled ``decode(cache, last (B,)) -> (tokens (B, new), first
      logits (B, vocab) float32)``, positions ``P-1 .. P+new-2``.
    compile_s: seconds to trace, lower and compile ``decode``.
  """

  def __init__(self, model: nnx.Module, batch: int, cfg: dict, dtype: Any = jnp.bfloat16):
    if cfg["prompt"] < 1 or cfg["prompt"] + cfg["new_tokens"] - 1 > cfg["context"]:
      raise ValueError(
        f"prompt {cfg['prompt']} + new tokens {cfg['new_tokens']} do not fit context "
        f"{cfg['context']} (need prompt >= 1 and prompt + new - 1 <= context)"
      )
    m = nnx.clone(model)  # the same arrays; only the attention layers' mode differs
    for attn in attention_layers(m):
      attn.decode = True
      attn.init_cache((batch, cfg["context"], attn.in_features), dtype=dtype)
    graphdef, params, cache, rest = nnx.split(m, nnx.Param, nnx.Cache, ...)
    self.params, self.rest, self.cache0 = params, rest, cache
    self.batch, self.vocab = batch, VOCAB
    prompt_len, new = cfg["prompt"], cfg["new_tokens"]

    def step(params, rest, cache, tok, pos):
      mod = nnx.merge(graphdef, params, cache, rest)
      logits = forward_one(mod, tok[:, None], pos)
      return nnx.state(mod, nnx.Cache), logits

    @jax.jit
    def prefill(params, rest, cache, prompt):
      def body(i, cache):
        return step(params, rest, cache, jax.lax.dynamic_index_in_dim(prompt, i, 1, False), i)[0]

      return jax.lax.fori_loop(0, prompt_len - 1, body, cache)

    def decode(params, rest, cache, last):
      def body(carry, i):
        cache, tok, first = carry
        cache, logits = step(params, rest, cache, tok, prompt_len - 1 + i)
        logits = logits.astype(jnp.float32)
        nxt = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        first = jnp.where(i == 0, logits, first)
        return (cache, nxt, first), nxt

      first = jnp.zeros((last.shape[0], VOCAB), jnp.float32)
      (_, _, first), toks = jax.lax.scan(body, (cache, last, first), jnp.arange(new))
      return toks.T, first

    self._prefill = prefill
    last = jax.ShapeDtypeStruct((batch,), jnp.int32)
    t0 = time.perf_counter()
    self._decode = jax.jit(decode).lower(params, rest, cache, last).compile()
    self.compile_s = time.perf_counter() - t0

  def prefill(self, prompt: jax.Array) -> Any:
    return self._prefill(self.params, self.rest, self.cache0, prompt)

  def decode(self, cache: Any, last: jax.Array) -> tuple[jax.Array, jax.Array]:
    return self._decode(self.params, self.rest, cache, last)

  def memory(self) -> dict | None:
    """The compiled decode program's memory analysis (bytes), where the backend gives one."""
    try:
      ma = self._decode.memory_analysis()
    except Exception:  # noqa: BLE001 - optional on some backends
      return None
    if ma is None:
      return None
    keys = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes")
    return {k: int(getattr(ma, k)) for k in keys if hasattr(ma, k)}


def make_prompts(seed: int, batch: int, length: int) -> np.ndarray:
  """``(batch, length)`` uniform random int32 tokens; a smaller batch uses the first rows."""
  return np.random.default_rng(seed).integers(0, VOCAB, (batch, length)).astype(np.int32)


def generate(
  model: nnx.Module, prompt: np.ndarray, cfg: dict, dtype: Any = jnp.bfloat16
) -> tuple[np.ndarray, np.ndarray]:
  """Greedy tokens ``(B, new_tokens)`` after ``prompt (B, P)``, and the first step's logits."""
  gen = Generator(model, prompt.shape[0], cfg, dtype)
  prompt = jnp.asarray(prompt, jnp.int32)
  toks, first = gen.decode(gen.prefill(prompt), prompt[:, -1])
  return np.asarray(toks), np.asarray(first)


# ----------------------------------------------------------------------------
# Variants.


def policy_choices(model: nnx.Module, tokens: int) -> list[dict]:
  """The dense/sparse decision of each SparseLinear's shape at ``tokens`` rows per call.

  :func:`jasp.sparse.autotune.choice_for`, the decision :func:`jasp.sparse.matmul`
  makes when it is traced (on a GPU this measures once per shape and caches it,
  so compiling afterwards does not wait on measurements).
  """
  by_shape: dict[tuple, dict] = {}
  for path, node in nnx.iter_graph(model):
    if not isinstance(node, jasp.sparse.SparseLinear):
      continue
    w = node.kernel.get_value()
    key = (w.k, w.n, tokens, w.dtype, w.is_compact)
    if key not in by_shape:
      c = autotune.choice_for(w, tokens, node.policy)
      by_shape[key] = {
        "k": w.k,
        "n": w.n,
        "tokens": tokens,
        "path": c.path,
        "reason": c.reason,
        "dense_s": c.dense_s,
        "sparse_s": c.sparse_s,
        "compact_s": c.compact_s,
        "compact_dense_s": c.compact_dense_s,
        "holds_compact": w.is_compact,
        "layers": [],
      }
    by_shape[key]["layers"].append("/".join(str(p) for p in path))
  return list(by_shape.values())


def param_bytes(model: nnx.Module) -> int:
  """Bytes of the distinct arrays among the model's parameters (shared arrays counted once)."""
  seen: dict[int, int] = {}
  for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)):
    if hasattr(leaf, "nbytes"):
      seen[id(leaf)] = int(leaf.nbytes)
  return sum(seen.values())


def reference_error(pruned: nnx.Module, cfg: dict, prompt: np.ndarray, seed: int) -> dict:
  """Relative error of the bf16 baseline's first-step logits vs the same weights in float32."""
  m32 = build_model(cfg, jnp.float32, seed)
  nnx.update(m32, jax.tree.map(lambda a: a.astype(jnp.float32), nnx.state(pruned, nnx.Param)))
  one = dict(cfg, new_tokens=1)
  with jax.default_matmul_precision("highest"):  # no TF32 in the reference
    _, l32 = generate(m32, prompt, one, jnp.float32)
  _, l16 = generate(pruned, prompt, one, jnp.bfloat16)
  scale = float(np.max(np.abs(l32)))
  err = float(np.max(np.abs(l16 - l32))) / scale
  return {"bf16_vs_float32": err, "tol": max(TOL_FACTOR * err, TOL_FLOOR)}


def agreement(tokens: np.ndarray, ref: np.ndarray) -> dict:
  """Fraction of equal tokens, and the length of the equal prefix of row 0."""
  eq = tokens == ref
  lead = int(np.argmin(eq[0])) if not eq[0].all() else int(eq.shape[1])
  return {"fraction_equal": float(eq.mean()), "leading_equal_row0": lead}


def check_logits(first: np.ndarray, ref: np.ndarray, tol: float, what: str) -> float:
  """Raises :class:`Mismatch` unless ``max|first - ref| <= tol * max|ref|``; returns the ratio."""
  rel = float(np.max(np.abs(first - ref)) / max(float(np.max(np.abs(ref))), 1e-30))
  if not rel <= tol:  # NaN fails too
    raise Mismatch(
      f"{what}: first-step logits off the baseline by {rel:.3g} x max|logit| > {tol:.3g}"
    )
  return rel


def time_decode(gen: Generator, prompt: jax.Array, reps: int) -> dict:
  """Prefill (timed warm, for information), warm up, then the median wall time of ``reps``
  decode calls."""
  jax.block_until_ready(gen.prefill(prompt))  # compiles it on first use
  t0 = time.perf_counter()
  cache = jax.block_until_ready(gen.prefill(prompt))
  prefill_s = time.perf_counter() - t0
  last = prompt[:, -1]
  toks, first = jax.block_until_ready(gen.decode(cache, last))  # warm-up
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(gen.decode(cache, last))
    times.append(time.perf_counter() - t0)
  return {
    "seconds": statistics.median(times),
    "all_seconds": times,
    "prefill_s": prefill_s,
    "tokens": np.asarray(toks),
    "first_logits": np.asarray(first),
  }


# ----------------------------------------------------------------------------
# The run.


def parse_args(argv=None) -> argparse.Namespace:
  ap = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  ap.add_argument("--dim", type=int, default=4096, help="model width")
  ap.add_argument("--heads", type=int, default=32, help="attention heads")
  ap.add_argument("--depth", type=int, default=4, help="blocks (per-token time ~ linear in it)")
  ap.add_argument("--context", type=int, default=256, help="KV cache length (>= prompt + new)")
  ap.add_argument("--prompt", type=int, default=16, help="prompt tokens")
  ap.add_argument("--new-tokens", type=int, default=128, help="greedy tokens generated (timed)")
  ap.add_argument("--batches", default="1,8", help="batch sizes, comma-separated")
  ap.add_argument("--reps", type=int, default=3, help="timed generations per (variant, batch)")
  ap.add_argument("--variants", default="1,2,3,4", help="which of the 4 variants (2 always runs)")
  ap.add_argument("--prune-head", action="store_true", help="prune the LM head too")
  ap.add_argument("--seed", type=int, default=0, help="seed of the weights and the prompts")
  ap.add_argument("--smoke", action="store_true", help=f"CPU smoke config: {SMOKE}")
  ap.add_argument("--out", default="", help="JSON results file")
  args = ap.parse_args(argv)
  if args.smoke:
    for k, v in SMOKE.items():
      setattr(args, k, v)
  args.batches = tuple(int(b) for b in str(args.batches).split(",") if b)
  wanted = {int(v) for v in args.variants.split(",") if v} | {2}
  args.variants = tuple(VARIANTS[i - 1] for i in sorted(wanted))
  return args


def make_variant(name: str, pruned: nnx.Module, dense: nnx.Module) -> tuple[nnx.Module, dict]:
  """``(model, info)`` for one variant; ``info`` has the sparsify report where there is one."""
  if name == "dense":
    return dense, {}
  model = nnx.clone(pruned)
  if name == BASELINE:
    return model, {}
  kw = {"dtype": jnp.bfloat16}
  if name == "jasp.sparse, compact":
    kw["compact"] = True
  t0 = time.perf_counter()
  report = jasp.sparse.sparsify_nnx(model, **kw)
  return model, {"sparsify_s": time.perf_counter() - t0, "sparsify_report": report}


def run_variant(name: str, models: dict, cfg: dict, args, res: dict, prompts: np.ndarray) -> None:
  """Builds, checks (batch 1) and times one variant; fills ``res["variants"][name]``."""
  out = res["variants"][name] = {}
  model, info = make_variant(name, models["pruned"], models["dense"])
  out.update(info)
  out["param_bytes"] = param_bytes(model)
  if name.startswith("jasp.sparse"):
    t0 = time.perf_counter()
    out["policy"] = {b: policy_choices(model, b) for b in sorted(set(args.batches) | {1})}
    out["policy_s"] = time.perf_counter() - t0
  gens: dict[int, Generator] = {}

  def gen_for(b: int) -> Generator:
    if b not in gens:
      gens[b] = Generator(model, b, cfg)
    return gens[b]

  # Correctness at batch 1, before any timing.
  p1 = jnp.asarray(prompts[:1])
  g1 = gen_for(1)
  toks, first = g1.decode(g1.prefill(p1), p1[:, -1])
  toks, first = np.asarray(toks), np.asarray(first)
  out["tokens_batch1"] = toks[0].tolist()
  if name != BASELINE and name != "dense":
    base = res["variants"][BASELINE]
    ref_first = models["baseline_first"]
    tol = res["reference"]["tol"]
    out["check"] = {"tol": tol, "passed": False}
    out["check"]["agreement"] = agreement(toks, np.asarray([base["tokens_batch1"]]))
    out["check"]["logits_rel_err"] = check_logits(first, ref_first, tol, name)
    out["check"]["passed"] = True
  elif name == BASELINE:
    models["baseline_first"] = first
  out["batches"] = {}
  for b in args.batches:
    g = gen_for(b)
    prompt = jnp.asarray(prompts[:b])
    t = time_decode(g, prompt, args.reps)
    row = {
      "batch": b,
      "seconds": t["seconds"],
      "all_seconds": t["all_seconds"],
      "tokens_per_s": b * cfg["new_tokens"] / t["seconds"],
      "ms_per_token": t["seconds"] / cfg["new_tokens"] * 1e3,
      "compile_s": g.compile_s,
      "prefill_s": t["prefill_s"],
      "memory": g.memory(),
    }
    base = res["variants"].get(BASELINE, {}).get("batches", {}).get(b)
    if base is not None:
      row["speedup_vs_baseline"] = base["seconds"] / t["seconds"]
      ref = models["baseline_tokens"][b]
      row["agreement_vs_baseline"] = agreement(t["tokens"], ref)
    if name == BASELINE:
      models.setdefault("baseline_tokens", {})[b] = t["tokens"]
    out["batches"][b] = row
    print(
      f"  {name:<22} batch {b:>3}: {row['tokens_per_s']:10.1f} tok/s "
      f"{row['ms_per_token']:8.3f} ms/token  compile {row['compile_s']:.2f} s",
      flush=True,
    )
  out["peak_bytes_so_far"] = peak_bytes()
  gens.clear()  # free the caches before the next variant


def table(res: dict) -> str:
  """The results as a text table."""
  lines = [
    f"{'variant':<22} {'batch':>5} {'tokens/s':>10} {'ms/token':>9} {'speedup':>8} {'compile s':>9}"
  ]
  for name, v in res["variants"].items():
    for b, r in v.get("batches", {}).items():
      sp = r.get("speedup_vs_baseline")
      lines.append(
        f"{name:<22} {b:>5} {r['tokens_per_s']:>10.1f} {r['ms_per_token']:>9.3f} "
        f"{(f'{sp:.3f}x' if sp is not None else '-'):>8} {r['compile_s']:>9.2f}"
      )
  return "\n".join(lines)


def main(argv=None) -> dict:
  """Runs the benchmark; returns the results (also written to ``--out``)."""
  args = parse_args(argv)
  cfg = {
    "dim": args.dim,
    "heads": args.heads,
    "depth": args.depth,
    "context": args.context,
    "prompt": args.prompt,
    "new_tokens": args.new_tokens,
    "vocab": VOCAB,
    "dtype": "bfloat16",
  }
  dev = jax.devices()[0]
  res: dict = {
    "device": dev.device_kind,
    "platform": dev.platform,
    "config": dict(cfg, batches=list(args.batches), reps=args.reps, seed=args.seed),
    "timing": "host wall time of one jitted generation of new_tokens tokens (lax.scan), "
    "median of reps after a warm-up; prefill (token by token through the cache) not timed",
    "sparse_runtime": list(jasp.sparse.status()),
    "variants": {},
  }
  rec = Recorder(res, args.out)
  print(f"device: {dev.device_kind}, JAX {jax.__version__}; {res['config']}", flush=True)
  prompts = make_prompts(args.seed, max(args.batches + (1,)), args.prompt)

  models: dict = {}

  def setup():
    dense = build_model(cfg, seed=args.seed)
    pruned = nnx.clone(dense)
    res["pruning"] = prune(pruned, args.prune_head)
    models["dense"], models["pruned"] = dense, pruned
    res["reference"] = reference_error(pruned, cfg, prompts[:1], args.seed)
    print(
      f"pruned {len(res['pruning']['pruned'])} kernels; bf16 vs float32 first-step logits "
      f"{res['reference']['bf16_vs_float32']:.3g}, tolerance {res['reference']['tol']:.3g}",
      flush=True,
    )

  rec.stage(setup)
  if "pruned" in models:
    order = [BASELINE] + [v for v in args.variants if v != BASELINE]
    for name in order:

      def variant(name=name):
        try:
          run_variant(name, models, cfg, args, res, prompts)
        except Mismatch:
          res["variants"][name]["check"]["passed"] = False
          raise

      variant.__name__ = f"variant {name!r}"
      rec.stage(variant)
      if name == BASELINE and "batches" not in res["variants"].get(name, {}):
        break  # no baseline: nothing to compare against
    res["variants"] = {v: res["variants"][v] for v in VARIANTS if v in res["variants"]}
    rec.save()
  print(table(res), flush=True)
  if res.get("errors"):
    print("ERRORS:\n  " + "\n  ".join(res["errors"]), file=sys.stderr, flush=True)
  return res


if __name__ == "__main__":
  sys.exit(1 if main().get("errors") else 0)
