"""The decode-time 2:4 matmul as a Pallas Mosaic GPU kernel (Hopper), on the ``"nk"`` layout.

``y = x @ W`` for ``x (T, K)`` and a ``(K, N)`` weight, 2:4 along ``K``, held
as :class:`jasp.kernels.decode24.Compressed24` in its ``"nk"`` layout (``G = K
/ 4`` groups, ``C`` the format's group chunk, ``tile``):

* ``values (2, N, G)``: the kept entries, slot ``s`` of group ``g`` of column
  ``n`` at ``[s, n, g]`` (groups minor, so a column's weights are contiguous);
* ``meta (N, G / 2)`` ``uint8``: the 4-bit code ``p0 | p1 << 2`` of each
  (column, group). Within chunk ``c`` of ``C`` groups, byte ``(n, c * C / 2 +
  i)`` holds group ``c * C + i`` in its low nibble and group ``c * C + C / 2 +
  i`` in its high nibble.

The kernel computes the transpose, ``y^T (N, T) = sum_j D_j^T (N, G) @ x_j^T
(G, T)`` with ``x_j = x[:, j::4]`` and ``D_j = where(p0 == j, v0, where(p1 ==
j, v1, 0))``, so that the weight is the warpgroup matrix multiply's left
operand, which Hopper takes from registers: each program owns 64 columns of
``W`` (the multiply's ``M``; or 128 in two multiplies, ``block_n``), streams
chunks of values and codes through
shared memory (TMA, a ``stages``-deep pipeline), builds the eight ``(64, C /
2)`` tiles ``D_j`` of a chunk in registers with compares and selects
(:func:`position_tile`: six selects per code, not eight), and
multiplies each with ``x_j``'s chunk, which waits in shared memory as the
right operand (``T`` padded to a multiple of 8, the multiply's ``N``, at most
64 per program; more tokens take more programs). Nothing dense is written to
shared memory. When the column tiles are too few to fill the GPU, the chunks
are split over programs (split-K) and the float32 partial sums are added
afterwards.

Outside the kernel (XLA, ``T * K`` elements): ``x`` is padded and regrouped to
``(4, T, G)``, and the ``(splits, N, T)`` float32 output is summed, transposed
and rounded to ``x``'s dtype.

Interpreted (CPU tests), the multiply is a ``dot_general`` into a float32
accumulator in shared memory, since the Mosaic GPU interpreter takes neither a
register operand nor a transposed one; the streaming, the code unpacking and
the selects are the kernel's own.

Design note: ``docs/design/decode-kernel.md``.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from jasp.kernels import mosaic

__all__ = [
  "BLOCK_NS",
  "NK_TILES",
  "Plan",
  "native",
  "pick_splits",
  "plan",
  "position_tile",
  "run",
  "shape_ok",
]

#: Group chunks (the format's ``tile``) the ``"nk"`` layout may use, widest first.
NK_TILES = (128, 64)
#: Dtypes of the warpgroup multiply at full input precision (fp32 would be TF32).
DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))

_BLOCK_N = 64  # wgmma's M: columns of W per multiply
BLOCK_NS = (64, 128)  # columns of W per program: one or two multiplies per step and position
_MAX_TOKENS = 64  # tokens per program (wgmma's N)
# About two programs per SM of a 132-SM H100 or H200: the splits are the largest
# divisor of the chunks not above this over the column tiles, rounded up. On an H100
# (8192^2, 1 and 16 tokens) 256 programs (two splits) ran 1.37-1.40x dense, 512 (four,
# the nearest divisor) 1.29-1.32x.
_TARGET_PROGRAMS = 264
# Bytes of pipeline buffers and output tile per program: about half an SM's 228
# KiB, so that two programs share an SM. On an H100 (8192^2, 16 tokens) the plans that fit two
# programs per SM ran 1.12-1.13x dense, the one that fit one 0.95x.
_SMEM_BUDGET = 110 * 1024
# When one stage fills that budget (64 tokens, chunks of 128 groups), two stages
# within this, with the output tile (one program per SM), instead: on an H100 at 64
# tokens, 8192^2 ran 1.03x dense with two, 0.80x with one; 4096^2 1.05x and 0.88x.
# Also the cap of an explicit ``stages``. (An SM block may take 227 KiB.)
_SMEM_MAX = 220 * 1024
_STAGES = 4


@functools.lru_cache(maxsize=None)
def native() -> bool:
  """Whether the kernel compiles here: a Hopper-or-newer GPU backend with Pallas Mosaic GPU."""
  if jax.default_backend() != "gpu" or not mosaic.available():
    return False
  return (mosaic.compute_capability() or 0.0) >= 9.0


def shape_ok(k: int, n: int, dtype) -> tuple[bool, str]:
  """Whether a ``(k, n)`` weight of ``dtype`` has an ``"nk"`` layout, and why not."""
  if jnp.dtype(dtype) not in DTYPES:
    return False, f"dtype {jnp.dtype(dtype).name} (the Mosaic kernel takes bf16 and fp16)"
  if k <= 0 or k % (4 * NK_TILES[-1]):
    return False, f"K={k} is not a positive multiple of {4 * NK_TILES[-1]}"
  if n <= 0 or n % _BLOCK_N:
    return False, f"N={n} is not a multiple of {_BLOCK_N}"
  return True, ""


def pick_splits(chunks: int, want: int, at_most: bool = False) -> int:
  """The divisor of ``chunks`` closest to ``want`` splits (log scale), at least 1; with
  ``at_most``, the largest divisor not above ``want``.

  The split-K rule of both decode kernels (:func:`jasp.kernels.decode24.plan` too;
  ``at_most`` is this kernel's).
  """
  if chunks <= 1 or want <= 1:
    return 1
  divisors = [d for d in range(1, chunks + 1) if chunks % d == 0]
  if at_most:
    return max(d for d in divisors if d <= want)
  return min(divisors, key=lambda d: (abs(math.log(d / want)), -d))


def position_tile(j: int, p0: jax.Array, p1: jax.Array, v0: jax.Array, v1: jax.Array) -> jax.Array:
  """Position ``j``'s entries of the dense weight, from the slots' values and positions.

  ``v0`` where ``p0 == j``, ``v1`` where ``p1 == j``, else 0, for codes with
  ``p0 < p1`` (all that :func:`jasp.kernels.decode24.compress_24` writes):
  position 0 can then be slot 0's only and position 3 slot 1's only, so the
  four positions take six selects, not eight. For other codes this is the
  definition: position 0 reads slot 0 only, position 3 slot 1 only, and slot
  0 wins at 1 and 2. The decoding of both decode kernels and of
  :func:`jasp.kernels.decode24.decompress_24`.

  Args:
    j: the position, 0..3 (static).
    p0, p1: int arrays of one shape (or broadcasting), the positions.
    v0, v1: the values, of that shape.

  Returns:
    An array like ``v0``.
  """
  zero = jnp.zeros_like(v0)
  if j == 0:
    return jnp.where(p0 == 0, v0, zero)
  if j == 3:
    return jnp.where(p1 == 3, v1, zero)
  return jnp.where(p0 == j, v0, jnp.where(p1 == j, v1, zero))


def default_tile(k: int) -> int:
  """The widest group chunk of :data:`NK_TILES` that divides ``K / 4``."""
  for t in NK_TILES:
    if (k // 4) % t == 0:
      return t
  raise ValueError(f"K={k} is not a multiple of {4 * NK_TILES[-1]}.")


@dataclasses.dataclass(frozen=True)
class Plan:
  """Static launch plan of :func:`run`.

  Attributes:
    t, k, n: the product's sizes.
    tile: groups per chunk (the format's ``tile``).
    tokens: tokens per program, ``T`` padded to a multiple of 8 (at most 64).
    token_tiles: programs along ``T``.
    splits: programs sharing one output tile (split-K); a divisor of the chunks.
    stages: chunks in flight per program (shared memory buffers): by default
      up to 4 within 110 KiB with the float32 output tile (two programs per
      SM), or 2 within 220 KiB where 110 KiB holds one; an explicit
      ``stages`` is capped at 220 KiB.
    accumulators: float32 accumulators the eight multiplies of a chunk
      rotate over (1, 2, 4 or 8): more break the chain of multiplies that
      wait on one accumulator, at 8 registers per thread each (16 tokens).
    block_n: columns of ``W`` per program (64 or 128, :data:`BLOCK_NS`): at
      128 each chunk of ``x`` read into shared memory serves two multiplies,
      halving ``x``'s reads (at 64 tokens they outweigh the weight's).
    half_chunks: pipeline steps of half a chunk (``x``'s and the values'
      halves; the chunk's codes, held at both steps): about half the shared
      memory per stage, so that more stages fit (64 tokens with ``block_n=128``).
      The multiplies of a step rotate over at most 4 accumulators then.
  """

  t: int
  k: int
  n: int
  tile: int
  tokens: int
  token_tiles: int
  splits: int
  stages: int
  accumulators: int = 1
  block_n: int = _BLOCK_N
  half_chunks: bool = False

  @property
  def chunks(self) -> int:
    return self.k // 4 // self.tile

  @property
  def per_split(self) -> int:
    return self.chunks // self.splits

  @property
  def steps(self) -> int:
    """Pipeline steps per program."""
    return self.per_split * (2 if self.half_chunks else 1)

  @property
  def stage_bytes(self) -> int:
    return _stage_bytes(self.tokens, self.tile, self.block_n, self.half_chunks)


def _stage_bytes(tokens: int, tile: int, block_n: int = _BLOCK_N, half: bool = False) -> int:
  """Shared memory of one pipeline stage: ``x``'s chunk (or half), both slots' values (16-bit,
  chunk or half) and the chunk's codes."""
  groups = tile // 2 if half else tile
  return (4 * tokens + 2 * block_n) * groups * 2 + block_n * tile // 2


def plan(
  t: int,
  k: int,
  n: int,
  tile: int,
  *,
  splits: int | None = None,
  stages: int | None = None,
  accumulators: int | None = None,
  target_programs: int | None = None,
  block_n: int | None = None,
  half_chunks: bool = False,
) -> Plan:
  """The launch plan of ``x (t, k) @ W (k, n)`` for a format of group chunk ``tile``.

  ``splits``, ``stages``, ``accumulators``, ``block_n``, ``half_chunks``:
  see :class:`Plan`; ``target_programs`` (default 264) sets the splits.

  Raises:
    ValueError: the shape has no ``"nk"`` layout of ``tile``, or ``splits``
      does not divide the chunks, ``stages < 1``, ``accumulators`` is not
      1, 2, 4 or 8, or ``block_n`` is not in :data:`BLOCK_NS` or does not
      divide ``n``.
  """
  if tile not in NK_TILES or (k // 4) % tile or k % 4 or n % _BLOCK_N or t < 1:
    raise ValueError(f"no 'nk' plan for T={t}, K={k}, N={n}, tile={tile} (tiles {NK_TILES}).")
  block_n = _BLOCK_N if block_n is None else block_n
  if block_n not in BLOCK_NS or n % block_n:
    raise ValueError(f"block_n must be one of {BLOCK_NS} and divide N={n}, got {block_n!r}.")
  tokens = min(_MAX_TOKENS, -(-t // 8) * 8)
  token_tiles = -(-t // tokens)
  chunks = (k // 4) // tile
  programs = (n // block_n) * token_tiles
  if splits is None:
    splits = pick_splits(chunks, -(-(target_programs or _TARGET_PROGRAMS) // programs), True)
  elif splits < 1 or chunks % splits:
    raise ValueError(f"splits must divide the {chunks} chunks of {tile} groups, got {splits}.")
  if stages is not None and stages < 1:
    raise ValueError(f"stages must be >= 1, got {stages}.")
  if accumulators not in (None, 1, 2, 4, 8):
    raise ValueError(f"accumulators must be 1, 2, 4 or 8, got {accumulators!r}.")
  p = Plan(
    t, k, n, tile, tokens, token_tiles, splits, 1, accumulators or 1, block_n, bool(half_chunks)
  )
  out = 4 * block_n * tokens  # the float32 output tile
  whole = (_SMEM_MAX - out) // p.stage_bytes
  if stages:  # an explicit ``stages`` may take up to the whole SM (one program per SM)
    fit = whole
  else:  # two programs per SM, unless that leaves a single stage (no overlap)
    stages = _STAGES
    fit = (_SMEM_BUDGET - out) // p.stage_bytes
    if fit < 2:
      fit = min(2, whole)
  return dataclasses.replace(p, stages=max(1, min(stages, fit, p.steps)))


def _transforms(minor: int, dtype):
  from jax.experimental.pallas import mosaic_gpu as plgpu

  bits = jnp.dtype(dtype).itemsize * 8
  swizzle = plgpu.find_swizzle(minor * bits)
  return plgpu.TilingTransform((8, swizzle * 8 // bits)), plgpu.SwizzleTransform(swizzle)


def _nibble(codes: jax.Array, which) -> jax.Array:
  """The low (``which`` 0) or high (1) 4-bit code of each byte of ``codes`` (int16);
  ``which`` a static int or a traced scalar."""
  if isinstance(which, int):
    return codes & 15 if which == 0 else codes >> 4
  return (codes >> (4 * which).astype(codes.dtype)) & 15


def _kernel(x_gmem, v_gmem, m_gmem, out_gmem, out_smem, *, p: Plan, interpret: bool):
  """One program: column tile ``"n"``, token tile ``"t"``, split ``"s"`` (see :class:`Plan`)."""
  from jax.experimental.pallas import mosaic_gpu as plgpu

  bn, tp, c, h = p.block_n, p.tokens, p.tile, p.tile // 2
  rows, a = bn // _BLOCK_N, p.accumulators  # multiplies per position; accumulators per multiply
  dtype = v_gmem.dtype
  ni, ti, si = lax.axis_index("n"), lax.axis_index("t"), lax.axis_index("s")
  groups = pl.ds(si * p.per_split * c, p.per_split * c)
  cols = pl.ds(ni * bn, bn)
  g = h if p.half_chunks else c  # groups per pipeline step
  in_specs = [
    plgpu.BlockSpec((4, tp, g), lambda i: (0, 0, i), transforms=_transforms(h, dtype)),
    plgpu.BlockSpec((2, bn, g), lambda i: (0, 0, i), transforms=_transforms(h, dtype)),
    plgpu.BlockSpec(
      (bn, h),  # a chunk's codes: with half chunks, both steps of a chunk read them
      (lambda i: (0, i // 2)) if p.half_chunks else (lambda i: (0, i)),
      transforms=_transforms(h, jnp.uint8),
    ),
  ]

  def step(i, accs, x_smem, v_smem, m_smem):
    # The halves of the chunk in this step, as (nibble, first group in the step's
    # buffers, first multiply): both, or with half chunks the step's own (its
    # nibble known at run time; its four multiplies rotate from the first accumulator).
    halves = [(i % 2, 0, 0)] if p.half_chunks else [(0, 0, 0), (1, h, 4)]
    for r in range(rows):
      sub = pl.ds(r * _BLOCK_N, _BLOCK_N)
      codes = m_smem[sub, :].astype(jnp.int16)  # 8-bit registers allow bitwise ops only
      for nibble, start, first in halves:
        code = _nibble(codes, nibble)
        p0, p1 = code & 3, code >> 2
        part = pl.ds(start, h)
        v0, v1 = v_smem[0, sub, part], v_smem[1, sub, part]
        for j in range(4):
          d = position_tile(j, p0, p1, v0, v1)
          acc_ref = accs[r * a + (first + j) % a]
          if interpret:
            xj = x_smem[j, :, part]
            acc_ref[...] += lax.dot_general(
              d, xj, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
            )
          else:
            plgpu.wgmma(acc_ref, d, x_smem.at[j, :, part].transpose((1, 0)))
    if not interpret:
      plgpu.wgmma_wait(0)

  acc_type = (plgpu.SMEM if interpret else plgpu.ACC)((_BLOCK_N, tp), jnp.float32)

  @functools.partial(pl.run_scoped, accs=tuple(acc_type for _ in range(rows * a)))
  def _(accs):
    if interpret:
      for acc_ref in accs:
        acc_ref[...] = jnp.zeros((_BLOCK_N, tp), jnp.float32)
    plgpu.emit_pipeline(
      lambda idx, *refs: step(idx[0], accs, *refs),
      grid=(p.steps,),
      in_specs=in_specs,
      max_concurrent_steps=p.stages,
    )(
      x_gmem.at[:, pl.ds(ti * tp, tp), groups],
      v_gmem.at[:, cols, groups],
      m_gmem.at[cols, pl.ds(si * p.per_split * h, p.per_split * h)],
    )
    for r in range(rows):
      total = accs[r * a][...]
      for acc_ref in accs[r * a + 1 : (r + 1) * a]:
        total = total + acc_ref[...]
      out_smem[pl.ds(r * _BLOCK_N, _BLOCK_N), :] = total
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(out_smem, out_gmem.at[si, cols, pl.ds(ti * tp, tp)])
    plgpu.wait_smem_to_gmem(0)


@functools.partial(jax.jit, static_argnames=("p", "interpret"))
def run(x2: jax.Array, values: jax.Array, meta: jax.Array, *, p: Plan, interpret: bool):
  """``x2 (T, K) @ W`` of one ``"nk"`` weight (``values (2, N, G)``, ``meta (N, G/2)``): ``(T, N)``."""
  from jax.experimental.pallas import mosaic_gpu as plgpu

  tpad = p.tokens * p.token_tiles
  xg = jnp.pad(x2, ((0, tpad - p.t), (0, 0))).reshape(tpad, p.k // 4, 4).transpose(2, 0, 1)
  out = plgpu.kernel(
    functools.partial(_kernel, p=p, interpret=interpret),
    out_type=jax.ShapeDtypeStruct((p.splits, p.n, tpad), jnp.float32),
    grid=(p.n // p.block_n, p.token_tiles, p.splits),
    grid_names=("n", "t", "s"),
    compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
    scratch_types=dict(out_smem=plgpu.SMEM((p.block_n, p.tokens), jnp.float32)),
    interpret=mosaic.interpret_params() if interpret else None,
    kernel_name="jasp_matmul_24_nk",
  )(xg, values, meta)
  return jnp.sum(out, axis=0).T[: p.t].astype(x2.dtype)
