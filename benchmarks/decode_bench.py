"""Decode-time 2:4 matmul: the compressed-weight kernel against XLA's dense dot.

``y = x @ W`` with ``x (T, K)`` bf16, ``T`` from 1 to 256 tokens, and ``W (K, N)``
2:4 along ``K``. Dense: ``jnp.dot(x, W)`` of the masked dense weight. Compressed:
:func:`jasp.kernels.decode24.matmul_24` of :func:`~jasp.kernels.decode24.compress_24`
(kept values and 2-bit positions, 56% of the dense bytes): ``default`` is the
product's layout for the shape (``"nk"``, Mosaic GPU, on Hopper; else ``"kn"``,
Triton) and plan; the other layout is timed too, plus the ``--sweep`` tuning
variants, or only the ``--variants`` given.

Run on the device machine::

    python3 benchmarks/decode_bench.py --out $OUT/decode_h100.json        # everything
    python3 benchmarks/decode_bench.py --quick --out $OUT/decode.json     # 2 shapes x 3 T
    python3 benchmarks/decode_bench.py --sweep --quick                    # tuning variants too
    python3 benchmarks/decode_bench.py --probe --quick                    # the selects' share
    python3 benchmarks/decode_bench.py --quick --variants 'layout=nk,block_n=128;layout=kn'
    python3 benchmarks/decode_bench.py --smoke                            # CPU, interpret mode

Before timing, every output is checked against a float32 ``Precision.HIGHEST``
product of the same bf16 operands; a mismatch beyond bf16 output rounding stops
the run (exit status 1) after recording it.

Timing: every function is jitted and warmed up; ``W`` rotates over copies
that span 256 MiB, 5x the 50 MB L2 (a decode step reads each layer's weight
from HBM once), as the ``jasp.sparse`` policy measures
(:func:`jasp.sparse.autotune.weight_copies`). Where PyTorch is importable, its CUPTI profiler sums the durations of
every kernel run per call ("device": the kernel and its split-K reduction for
the compressed path, XLA's GEMM and any helper kernels for dense); else host
wall time per call, which at these sizes measures dispatch as much as the
kernels (the JSON says which). Bandwidth: bytes read and written per call
(format or dense weight, ``x``, ``y``) over the time, against a device copy's
(read + write) bandwidth measured in the same run.

``--probe`` also times each layout's default format with the selects that
build the dense tiles cut to one per code (:func:`one_select_per_code`): the
same bytes with almost no work per weight, so wrong products (unchecked, kept
apart under ``"probes"``). What the probe gains over the real kernel is about
the most that cheaper decoding of the positions can gain (the probe still
does one select per code).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from _bench_util import DeviceClock  # noqa: E402
from _bench_util import Recorder  # noqa: E402
from _bench_util import copy_bandwidth  # noqa: E402
from _bench_util import timed  # noqa: E402

import jasp  # noqa: E402
from jasp.kernels import decode24  # noqa: E402
from jasp.kernels import decode24_mosaic  # noqa: E402
from jasp.sparse import autotune  # noqa: E402

SHAPES = ((4096, 4096), (8192, 8192), (4096, 14336), (14336, 4096), (16384, 16384))
TOKENS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
QUICK_SHAPES = ((4096, 4096), (14336, 4096))
QUICK_TOKENS = (1, 16, 256)
SMOKE_SHAPES = ((256, 128), (160, 96))
SMOKE_TOKENS = (1, 3, 16)

#: Variants always timed besides ``default`` (the product's: :func:`compress_24`'s
#: layout for the shape, the ``"nk"`` Mosaic GPU kernel on Hopper, else ``"kn"``
#: (Triton)): the other layout, where its kernel compiles (or in the smoke run).
LAYOUT_VARIANTS = ({"layout": "kn"}, {"layout": "nk"})

#: ``--sweep`` variants: plan overrides, and ``tile`` (a different format).
SWEEP = (
  {"layout": "kn", "block_g": 16},
  {"layout": "kn", "block_g": 64},
  {"layout": "kn", "num_warps": 8},
  {"layout": "kn", "num_stages": 2},
  {"layout": "kn", "num_stages": 4},
  {"layout": "kn", "target_programs": 132},
  {"layout": "kn", "target_programs": 528},
  {"layout": "kn", "tile": 64},
  {"layout": "kn", "tile": 256},
  {"layout": "nk", "stages": 2},
  {"layout": "nk", "target_programs": 264},
  {"layout": "nk", "target_programs": 528},
  {"layout": "nk", "tile": 64},
  {"layout": "nk", "accumulators": 2},
  {"layout": "nk", "accumulators": 4},
  {"layout": "nk", "accumulators": 8},
  {"layout": "nk", "tile": 64, "accumulators": 4},
  {"layout": "nk", "stages": 3},
  {"layout": "nk", "stages": 4},
  {"layout": "nk", "block_n": 128},
  {"layout": "nk", "tile": 64, "block_n": 128},
  {"layout": "nk", "block_n": 128, "half_chunks": True},
)


@contextlib.contextmanager
def one_select_per_code():
  """Within: both decode kernels trace with one compare and select per code where they
  take six (:func:`jasp.kernels.decode24_mosaic.position_tile`), so their products are
  wrong; they read the same bytes (the codes are still used). JAX's caches are cleared
  on entry and exit, so nothing traced within runs outside."""
  real = decode24_mosaic.position_tile

  def stand_in(j, p0, p1, v0, v1):
    del p1
    if j == 0:
      return jnp.where(p0 == 0, v0, v1)
    return v0 if j == 2 else v1

  jax.clear_caches()
  decode24_mosaic.position_tile = stand_in
  try:
    yield
  finally:
    decode24_mosaic.position_tile = real
    jax.clear_caches()


class Mismatch(AssertionError):
  """An output differs from the reference product beyond bf16 rounding."""


def weight_24(key: jax.Array, k: int, n: int, dtype) -> jax.Array:
  """A ``(k, n)`` normal weight in ``dtype``, 2:4 along ``k`` (``jasp.nm_prune``: ties broken)."""
  w = jax.random.normal(key, (k, n), jnp.float32).astype(dtype)
  return jasp.nm_prune(w, 2, 4, axis=0, with_mask=False)


def check(y: jax.Array, x: jax.Array, w: jax.Array, what: str) -> float:
  """Raises :class:`Mismatch` unless ``y`` is ``x @ w`` within output rounding; returns the
  largest error relative to ``max |x @ w|``.

  Bound per entry: ``u |ref| + 2 K 2^-24 (|x| @ |w|)``, ``u`` the output dtype's
  unit roundoff, ``ref`` the float32 ``HIGHEST`` product.
  """
  hi = jax.lax.Precision.HIGHEST
  xf, wf = x.astype(jnp.float32), w.astype(jnp.float32)
  ref = jnp.dot(xf, wf, precision=hi)
  mag = jnp.dot(jnp.abs(xf), jnp.abs(wf), precision=hi)
  u = float(jnp.finfo(y.dtype).eps) / 2
  err = jnp.abs(y.astype(jnp.float32) - ref)
  excess = float(jnp.max(err - (u * jnp.abs(ref) + 2 * x.shape[-1] * 2.0**-24 * mag)))
  rel = float(jnp.max(err) / jnp.maximum(jnp.max(jnp.abs(ref)), 1e-30))
  if not excess <= 0:  # NaN fails too
    raise Mismatch(
      f"{what}: output off the reference by {excess:.3g} beyond the bound (rel {rel:.3g})"
    )
  return rel


def variant_name(tuning: dict) -> str:
  return ",".join(f"{k}={v}" for k, v in tuning.items())


def parse_variants(text: str) -> tuple[dict, ...]:
  """``"layout=nk,block_n=128;layout=kn"`` -> ``({"layout": "nk", "block_n": 128}, {"layout": "kn"})``.

  Raises:
    ValueError: an entry is not ``key=value`` or names no layout.
  """
  out = []
  for entry in filter(None, (e.strip() for e in text.split(";"))):
    tuning = {}
    for item in entry.split(","):
      key, sep, value = item.partition("=")
      if not sep or not key.strip():
        raise ValueError(f"variant entries are key=value, got {item!r} in {entry!r}")
      value = value.strip()
      tuning[key.strip()] = int(value) if value.lstrip("-").isdigit() else value
    if tuning.get("layout") not in decode24.LAYOUTS:
      raise ValueError(f"each variant names its layout ({decode24.LAYOUTS}), got {entry!r}")
    out.append(tuning)
  return tuple(out)


def variants(sweep: bool, default_layout: str, chosen: tuple[dict, ...] = ()) -> list:
  """``[(name, tuning)]`` to time: ``default`` (the product's format and plan, in
  ``default_layout``), then ``chosen`` if given, else the other layout and, with
  ``sweep``, :data:`SWEEP`."""
  extra = list(chosen) if chosen else [t for t in LAYOUT_VARIANTS if t["layout"] != default_layout]
  if sweep and not chosen:
    extra += SWEEP
  return [("default", {})] + [(variant_name(t), t) for t in extra]


def applies(k: int, n: int, tuning: dict, smoke: bool) -> bool:
  """Whether a variant runs on ``(K, N)`` here: its format, kernel and plan take the shape,
  and its kernel compiles here (or the smoke run interprets it)."""
  layout = tuning.get("layout") or decode24.default_layout(k, n, jnp.bfloat16)
  tile = tuning.get("tile")
  if not decode24.shape_ok(k, n, jnp.bfloat16, layout)[0]:
    return False
  if not (smoke or layout == "kn" or decode24.native(layout)):
    return False
  knobs = {a: b for a, b in tuning.items() if a not in ("layout", "tile")}

  def fmt():
    w = jnp.zeros((k, n), jnp.bfloat16)
    return decode24.compress_24(w, layout=layout, tile=tile, check=False)

  try:  # the format and its plan, on abstract arrays (nothing is allocated)
    c = jax.eval_shape(fmt)
    decode24.plan_for(c, 1, **knobs)
  except ValueError:  # the format or the plan's knobs do not fit the shape
    return False
  return True


def bench_shape(k: int, n: int, args, clock: DeviceClock, copy_bw: float, records: list) -> None:
  """Every token count of one ``(K, N)``: checks, then times, dense and each variant."""
  dtype = jnp.bfloat16
  dense_bytes = k * n * 2
  copies = 1 if args.smoke else autotune.weight_copies(dense_bytes)  # as jasp.sparse measures
  keys = jax.random.split(jax.random.key(k * 7 + n), copies + 1)
  ws = [weight_24(kk, k, n, dtype) for kk in keys[:copies]]
  interpret = True if args.smoke else None
  dense = jax.jit(lambda x, w: jnp.dot(x, w))
  formats: dict[tuple, list] = {}  # (layout, tile) -> one compressed weight per copy
  fns = []
  default_layout = decode24.default_layout(k, n, dtype)
  for name, tuning in variants(args.sweep, default_layout, args.variants):
    if not applies(k, n, tuning, args.smoke):
      continue
    fmt = (tuning.get("layout") or default_layout, tuning.get("tile"))
    if fmt not in formats:
      formats[fmt] = [decode24.compress_24(w, layout=fmt[0], tile=fmt[1]) for w in ws]
    plan_kw = {a: b for a, b in tuning.items() if a not in ("tile", "layout")}
    fn = jax.jit(lambda x, c, kw=plan_kw: decode24.matmul_24(x, c, interpret=interpret, **kw))
    fns.append((name, fmt, plan_kw, fn))
  for t in args.tokens:
    if args.deadline and time.time() > args.deadline:
      print(f"budget spent: skipping {k}x{n} T={t} onwards", flush=True)
      return
    x = jax.random.normal(jax.random.key(t), (t, k), jnp.float32).astype(dtype)
    io_bytes = (t * k + t * n) * 2
    rec = {"K": k, "N": n, "T": t, "dtype": "bfloat16", "weight_copies": copies}
    rec["dense_rel_err"] = check(dense(x, ws[0]), x, ws[0], f"dense {k}x{n} T={t}")
    sec, on_dev = timed(dense, [(x, w) for w in ws], clock, args.reps)
    rec.update(dense_s=sec, device_timing=on_dev, dense_bytes_per_s=(dense_bytes + io_bytes) / sec)
    for name, fmt, plan_kw, fn in fns:
      cs = formats[fmt]
      what = f"compressed[{name}] {k}x{n} T={t}"
      p = decode24.plan_for(cs[0], t, **plan_kw)
      row = {"variant": name, "layout": cs[0].layout, "tile": cs[0].tile, "splits": p.splits}
      row["plan"] = {f.name: getattr(p, f.name) for f in dataclasses.fields(p)}
      row["rel_err"] = check(fn(x, cs[0]), x, ws[0], what)
      sec, _ = timed(fn, [(x, c) for c in cs], clock, args.reps)
      moved = decode24.nbytes(cs[0]) + io_bytes
      row.update(
        seconds=sec,
        speedup_vs_dense=rec["dense_s"] / sec,
        bytes_moved=moved,
        bytes_per_s=moved / sec,
        fraction_of_copy_bw=moved / sec / copy_bw,
      )
      rec.setdefault("compressed", []).append(row)
    if args.probe:
      rec["probes"] = probes(x, formats, rec["dense_s"], clock, args.reps, interpret)
    best = min(rec["compressed"], key=lambda r: r["seconds"])
    records.append(rec)
    print(
      f"{k:>6}x{n:<6} T={t:<4} dense {rec['dense_s'] * 1e6:8.1f} us  "
      f"compressed {rec['compressed'][0]['seconds'] * 1e6:8.1f} us "
      f"(x{rec['compressed'][0]['speedup_vs_dense']:.2f}, "
      f"{100 * rec['compressed'][0]['fraction_of_copy_bw']:.0f}% of copy bw)  "
      f"best {best['variant']} x{best['speedup_vs_dense']:.2f}",
      flush=True,
    )


def probes(x, formats: dict, dense_s: float, clock, reps: int, interpret) -> list[dict]:
  """Each layout's default format timed under :func:`one_select_per_code`."""
  rows = []
  defaults = {fmt: cs for fmt, cs in formats.items() if fmt[1] is None}
  real = {fmt: decode24.matmul_24(x, cs[0], interpret=interpret) for fmt, cs in defaults.items()}
  with one_select_per_code():
    for (layout, tile), cs in defaults.items():
      fn = jax.jit(lambda x, c: decode24.matmul_24(x, c, interpret=interpret))
      sec, _ = timed(fn, [(x, c) for c in cs], clock, reps)
      rows.append(
        {
          "variant": f"probe:{layout}",
          "probe": "one select per code (wrong products, unchecked)",
          "layout": layout,
          "seconds": sec,
          "speedup_vs_dense": dense_s / sec,
          "differs_from_product": bool(jnp.any(fn(x, cs[0]) != real[layout, tile])),
        }
      )
  for row in rows:
    print(f"  {row['variant']}: x{row['speedup_vs_dense']:.2f} of dense", flush=True)
  return rows


def parse_shapes(text: str) -> tuple[tuple[int, int], ...]:
  return tuple(tuple(int(v) for v in s.lower().split("x")) for s in text.split(",") if s)


def parse_args(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--shapes", default="", help="K x N list, e.g. 4096x4096,14336x4096")
  ap.add_argument("--tokens", default="", help="token counts T, e.g. 1,16,256")
  ap.add_argument("--quick", action="store_true", help=f"{QUICK_SHAPES} x T {QUICK_TOKENS}")
  ap.add_argument("--smoke", action="store_true", help="CPU smoke run: tiny shapes, interpret")
  ap.add_argument("--sweep", action="store_true", help="also time the tuning variants")
  ap.add_argument("--probe", action="store_true", help="also time one select per code")
  ap.add_argument(
    "--variants",
    default="",
    help="time these instead of the other layout and the sweep, e.g. "
    "'layout=nk,block_n=128;layout=kn,num_stages=2'",
  )
  ap.add_argument("--reps", type=int, default=0, help="rounds over the weight copies")
  ap.add_argument("--budget-s", type=float, default=0, help="start no new row after this")
  ap.add_argument("--out", default="", help="JSON results file")
  args = ap.parse_args(argv)
  shapes, tokens = SHAPES, TOKENS
  if args.quick:
    shapes, tokens = QUICK_SHAPES, QUICK_TOKENS
  if args.smoke:
    shapes, tokens = SMOKE_SHAPES, SMOKE_TOKENS
  args.shapes = parse_shapes(args.shapes) or shapes
  args.tokens = tuple(int(v) for v in args.tokens.split(",") if v) or tokens
  try:
    args.variants = parse_variants(args.variants)
  except ValueError as e:
    ap.error(str(e))
  args.reps = args.reps or (2 if args.smoke else 20)
  args.deadline = time.time() + args.budget_s if args.budget_s else 0
  return args


def main(argv=None) -> dict:
  args = parse_args(argv)
  clock = DeviceClock()
  dev = jax.devices()[0]
  if not args.smoke and dev.platform != "gpu":
    raise SystemExit("decode_bench times a GPU; use --smoke on a CPU.")
  copy_bytes = (1 << 20) if args.smoke else (256 << 20)
  copy_bw = copy_bandwidth(copy_bytes, clock, args.reps)
  res = {
    "device": dev.device_kind,
    "timing": "device (CUPTI kernel sums)" if clock.ok else "host wall time per call",
    "copy_bytes_per_s": copy_bw,
    "records": [],
  }
  print(f"device: {dev.device_kind}, JAX {jax.__version__}, {res['timing']}", flush=True)
  print(f"copy bandwidth: {copy_bw / 1e9:.0f} GB/s (read + write)", flush=True)
  rec = Recorder(res, args.out)
  for k, n in args.shapes:
    try:
      bench_shape(k, n, args, clock, copy_bw, res["records"])
    except Mismatch as e:
      res.setdefault("errors", []).append(str(e))
      rec.save()
      raise
    rec.save()
  return res


if __name__ == "__main__":
  try:
    main()
  except Mismatch as e:
    print(f"MISMATCH: {e}", file=sys.stderr, flush=True)
    sys.exit(1)
