"""Searching for a channel permutation that helps N:M sparsity keep magnitude.

Permuting the channels along a weight's group axis changes which entries share
a group of ``m``, and so how much magnitude the N:M mask keeps. Only the
*partition* of the channels into groups matters (the order inside a group and
the order of the groups do not), so the search works on partitions: a
permutation is read as ``C // m`` *stripes*, stripe ``s`` holding the channels
``perm[s*m:(s+1)*m]``.

The objective is a sum over stripes of the stripe's *score*: over every other
position of the weight ("rows"), the sum of the ``n`` largest magnitudes among
the stripe's ``m`` channels. Every strategy here only accepts changes that raise
it, so the result never keeps less than the identity.

Strategies (after Pool & Yu, "Channel Permutations for N:M Sparsity", NeurIPS
2021, which apex ASP implements):

* ``"windows"`` (optimize stripe groups): take ``k`` stripes (a window of
  ``k*m`` channels) and try every partition of their channels into ``k``
  stripes (35 for 8 channels, 5,775 for 12), keeping the best. Each *round*
  cuts all stripes into disjoint windows and solves every window at once
  (batched), so one round can improve ``C // (k*m)`` windows. For ``k = 2`` the
  rounds of a *sweep* follow a round-robin schedule that pairs every two
  stripes exactly once, so a sweep without improvement is a proven local
  optimum over all pairs of stripes; for ``k >= 3`` the windows are drawn at
  random. At a local optimum an *escape* perturbs the best partition found so
  far (random channel swaps across stripes) and the search goes on.
* ``"swap"`` (channel swaps): evaluate the gain of every swap of two channels in
  different stripes (a ``C x C`` table, batched) and apply the best; escapes as
  above. Needs ``O(C^2 * rows)`` work per step: meant for small layers.

Everything runs as jitted XLA on the default backend (CPU or GPU). For a seed,
the sequence of states is fixed; ``time_limit`` only decides where it stops.
A search compiles one program per (layer shape, ``n``, ``m``, window, chains)
the first time it runs in a process (under a second on a 2-core CPU);
JAX's persistent compilation cache
(``jax.config.update("jax_compilation_cache_dir", path)``) keeps it for later
processes.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import time
from collections.abc import Callable
from typing import Any
from typing import Literal
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jasp import masks as masks_lib
from jasp.typing import Axis

__all__ = [
  "search_permutation",
  "permutation_score",
  "PermutationScore",
  "SearchInfo",
  "permute_axis",
]

Strategy = Literal["auto", "windows", "swap"]

# A window is solved exhaustively only while it has at most this many candidate
# stripes (C(k*m, m) channel subsets are scored per window).
_MAX_SUBSETS = 20_000
# Elements (windows x subsets x m x rows) gathered per batch of a round.
_BATCH_ELEMS = 1 << 23
# Windows of 3+ stripes are all solved in every pass: at most this many.
_MAX_WINDOWS = 200_000


# XLA:CPU compiles the search's many small kernels about twice as fast with its
# classic loop emitters as with the newer fusion emitters, and runs them as
# fast: the first search of a process is mostly compilation on a CPU.
_CPU_COMPILER_OPTIONS = {"xla_cpu_use_fusion_emitters": False}
_cpu_options_rejected: list[bool] = []  # set once if this XLA lacks the option


def _cpu_tuned_jit(**jit_kwargs) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
  """``jax.jit(**jit_kwargs)`` compiled with :data:`_CPU_COMPILER_OPTIONS` on CPU.

  Other backends, calls under a trace (JAX takes compile options only at the
  top level), and an XLA that rejects the options get a plain ``jax.jit``.
  """

  def wrap(fun):
    plain = jax.jit(fun, **jit_kwargs)
    tuned = jax.jit(fun, compiler_options=_CPU_COMPILER_OPTIONS, **jit_kwargs)

    @functools.wraps(fun)
    def call(*args, **kwargs):
      nested = any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves((args, kwargs)))
      if not nested and not _cpu_options_rejected and jax.default_backend() == "cpu":
        try:
          return tuned(*args, **kwargs)
        except jax.errors.JaxRuntimeError as e:
          if "compile option" not in str(e):
            raise
          _cpu_options_rejected.append(True)
      return plain(*args, **kwargs)

    return call

  return wrap


# ----------------------------------------------------------------------------
# Views and scores.


def _matrix(w: jax.Array, axis: Axis) -> jax.Array:
  """``|w|`` as float32 ``(C, R)``: the (flattened) group axes first."""
  w = jnp.asarray(w)
  axes = masks_lib.group_axes(w.ndim, axis)
  mag = masks_lib.magnitude(w)
  mag = jnp.where(jnp.isinf(mag), jnp.finfo(jnp.float32).max / 2**20, mag)
  mag = mag.astype(jnp.float32) if mag.dtype != jnp.float64 else mag
  mag = jnp.moveaxis(mag, axes, tuple(range(len(axes))))
  c = int(np.prod(mag.shape[: len(axes)], dtype=np.int64))
  return mag.reshape(c, -1)


@_cpu_tuned_jit(static_argnames=("axes", "rows"))
def _padded_matrix(w: jax.Array, axes: tuple[int, ...], rows: int) -> jax.Array:
  """:func:`_matrix`, zero-padded to ``rows`` rows (one compiled call)."""
  mag = _matrix(w, axes)
  return jnp.pad(mag, ((0, 0), (0, rows - mag.shape[1])))


def permute_axis(w: jax.Array, perm: jax.Array, axis: Axis = 0) -> jax.Array:
  """``w`` with its (flattened) group axes reordered by ``perm``.

  For a single axis this is ``jnp.take(w, perm, axis=axis)``. For a run of
  consecutive axes (a ``DenseGeneral`` kernel contracted over ``(heads,
  head_dim)``), ``perm`` indexes their row-major flattening.

  Args:
    w: array of any rank.
    perm: int array ``(C,)``, ``C`` the product of the sizes of ``axis``.
    axis: an int or a run of consecutive ints.

  Returns:
    an array of ``w``'s shape and dtype.
  """
  w = jnp.asarray(w)
  axes = masks_lib.group_axes(w.ndim, axis)
  if len(axes) == 1:
    return jnp.take(w, perm, axis=axes[0])
  a0, a1 = axes[0], axes[-1]
  flat = w.reshape(w.shape[:a0] + (-1,) + w.shape[a1 + 1 :])
  return jnp.take(flat, perm, axis=a0).reshape(w.shape)


def _topn_sum(rows: list[jax.Array], n: int) -> jax.Array:
  """Sum of the ``n`` largest of ``m`` equally shaped arrays (element-wise).

  A compare-exchange network (min/max only), so XLA fuses it with the gather
  that produces ``rows`` and the reduction that consumes it.
  """
  m = len(rows)
  rows = list(rows)
  if n > m // 2:  # sum of all minus the (m - n) smallest
    k, largest = m - n, False
  else:
    k, largest = n, True
  # k passes of a bubble network move the k extreme values to the end.
  for i in range(k):
    for j in range(m - 1 - i):
      a, b = rows[j], rows[j + 1]
      lo, hi = jnp.minimum(a, b), jnp.maximum(a, b)
      rows[j], rows[j + 1] = (lo, hi) if largest else (hi, lo)
  ext = sum(rows[m - k :])
  return ext if largest else sum(rows) - ext


def _stripe_scores(mag: jax.Array, cols: jax.Array, n: int) -> jax.Array:
  """Scores of stripes: ``cols (..., m)`` channel ids -> ``(...)`` float32."""
  m = cols.shape[-1]
  g = mag[cols]  # (..., m, R)
  return _topn_sum([g[..., i, :] for i in range(m)], n).sum(-1)


class PermutationScore(NamedTuple):
  """How much magnitude an N:M mask keeps, with and without a permutation.

  Attributes:
    kept: ``sum |w|`` kept by the N:M mask of the permuted weight.
    kept_identity: the same without permutation.
    bound: ``sum |w|`` kept by the best *unstructured* choice of ``n/m`` of
      each row (apex's "50% rows" for 2:4): no permutation can beat it.
    total: ``sum |w|`` of the dense weight.
    fraction: ``kept / total``.
    efficacy: apex's metric, in percent: ``100 * (kept - kept_identity) /
      (bound - kept_identity)`` (0 when the identity is already optimal).
  """

  kept: float
  kept_identity: float
  bound: float
  total: float
  fraction: float
  efficacy: float


def permutation_score(
  w: jax.Array, perm: jax.Array | None = None, n: int = 2, m: int = 4, axis: Axis = 0
) -> PermutationScore:
  """Scores a permutation of ``w``'s group axis against the identity and the bound.

  Sums are taken in float64 on the host, so scores of different permutations
  compare exactly.

  Args:
    w: weight of any rank (float or integer).
    perm: int ``(C,)`` along the (flattened) group axis; None for the identity.
    n, m: N:M.
    axis: the group axis (or a run of consecutive axes).

  Returns:
    a :class:`PermutationScore`.
  """
  masks_lib.check_nm(n, m)
  w = np.asarray(jax.device_get(w))
  axes = masks_lib.group_axes(w.ndim, axis)
  mag = np.abs(w.astype(np.float64))
  mag = np.where(np.isnan(mag), np.inf, mag)
  c = int(np.prod([w.shape[a] for a in axes], dtype=np.int64))
  mag = np.moveaxis(mag, axes, tuple(range(len(axes)))).reshape(c, -1)
  r = mag.shape[1]
  if c % m:
    raise ValueError(f"the group axis has {c} channels, not a multiple of m={m}.")

  def kept_of(p):
    s = np.sort(mag[np.asarray(p)].reshape(c // m, m, r), axis=1)
    return float(s[:, m - n :, :].sum())

  ident = kept_of(np.arange(c))
  kept = ident if perm is None else kept_of(_check_perm(perm, c))
  keep_row = (c * n) // m
  bound = float(np.sort(mag, axis=0)[c - keep_row :, :].sum())
  total = float(mag.sum())
  gap = bound - ident
  eff = 100.0 * (kept - ident) / gap if gap > 0 else 0.0
  return PermutationScore(kept, ident, bound, total, kept / total if total else 1.0, eff)


def _check_perm(perm, c: int) -> np.ndarray:
  p = np.asarray(jax.device_get(perm))
  if (
    p.shape != (c,)
    or not np.issubdtype(p.dtype, np.integer)
    or not np.array_equal(np.sort(p), np.arange(c))
  ):
    raise ValueError(f"perm must be a permutation of range({c}), got shape {p.shape}.")
  return p


# ----------------------------------------------------------------------------
# Window tables.


@functools.lru_cache(maxsize=None)
def window_tables(k: int, m: int) -> tuple[np.ndarray, np.ndarray]:
  """Canonical partitions of ``k*m`` channels into ``k`` stripes of ``m``.

  Returns:
    ``subsets``: int32 ``(Ns, m)``, every ``m``-subset of ``range(k*m)`` in
    lexicographic order; ``parts``: int32 ``(Np, k)``, each partition as the
    indices of its ``k`` blocks in ``subsets``, the first block holding the
    smallest channel, then the smallest channel left, and so on. ``parts[0]``
    is the identity (blocks ``0..m-1``, ``m..2m-1``, ...). ``Np`` is
    ``(k*m)! / (m!^k k!)``: 35 for 2x4, 5,775 for 3x4.
  """
  subsets = list(itertools.combinations(range(k * m), m))
  if len(subsets) > _MAX_SUBSETS:
    raise ValueError(
      f"a window of {k} stripes of {m} channels has {len(subsets)} candidate stripes "
      f"(more than {_MAX_SUBSETS}); use a smaller window or strategy='swap'."
    )
  index = {s: i for i, s in enumerate(subsets)}
  parts: list[tuple[int, ...]] = []

  def rec(rest: tuple[int, ...], acc: tuple[int, ...]):
    if not rest:
      parts.append(acc)
      return
    first, others = rest[0], rest[1:]
    for comb in itertools.combinations(others, m - 1):
      left = tuple(x for x in others if x not in comb)
      rec(left, acc + (index[(first,) + comb],))

  rec(tuple(range(k * m)), ())
  return np.asarray(subsets, np.int32), np.asarray(parts, np.int32)


@functools.lru_cache(maxsize=None)
def _round_robin(s: int) -> np.ndarray:
  """Rounds pairing every two of ``s`` stripes once: int32 ``(rounds, s'/2, 2)``.

  The circle method; for odd ``s`` a dummy stripe ``s`` joins (its pair is
  skipped).
  """
  t = s + (s % 2)
  ids = list(range(t))
  rounds = []
  for _ in range(t - 1):
    rounds.append([(ids[i], ids[t - 1 - i]) for i in range(t // 2)])
    ids = [ids[0], ids[-1]] + ids[1:-1]
  return np.asarray(rounds, np.int32)


# ----------------------------------------------------------------------------
# The window search.


# Phases of the window search (see :func:`_windows_chunk`). numpy int32, not
# Python ints: ``jnp.where(c, _STAR, _PAIRS)`` must stay a strong int32, or the
# state a chunk returns would not match the one it took and the next chunk
# would compile the search a second time.
_PAIRS = np.int32(0)  # round-robin sweeps over every pair of stripes
_STAR = np.int32(1)  # focused rounds: a dirty stripe against all the others
_LOCAL_OPT = np.int32(2)  # at a local optimum: keep the best, then escape or stop
_ALL_WINDOWS = np.int32(3)  # windows of k >= 3 stripes: every window at once


class _State(NamedTuple):
  perm: jax.Array  # (C,) current partition
  scores: jax.Array  # (S,) stripe scores of perm
  best: jax.Array  # (C,) best partition found
  best_total: jax.Array  # () its objective
  dirty: jax.Array  # (S,) bool: stripes whose windows need a (re)check
  relabel: jax.Array  # (S,) stripe relabeling of the current sweep
  phase: jax.Array  # () one of _PAIRS, _STAR, _LOCAL_OPT, _ALL_WINDOWS
  pos: jax.Array  # () round within the sweep
  improved: jax.Array  # () bool: the sweep improved something
  sweeps: jax.Array  # () sweeps started
  escapes: jax.Array  # () escapes done
  rounds: jax.Array  # () rounds done
  done: jax.Array  # () bool: local optimum after the last escape


class _Outcome(NamedTuple):
  """What the host reads after a chunk (leading chain axis when vmapped)."""

  perm: jax.Array  # (C,) the better of the current and the best partition
  total: jax.Array  # () its objective
  done: jax.Array  # () bool
  rounds: jax.Array  # () int32
  escapes: jax.Array  # () int32


def _outcome(st) -> _Outcome:
  """:class:`_Outcome` of a window or swap search state."""
  cur = st.scores.sum(-1)
  perm = jnp.where(cur > st.best_total, st.perm, st.best)
  return _Outcome(perm, jnp.maximum(cur, st.best_total), st.done, st.rounds, st.escapes)


def _tol(x):
  # float32 sums of R terms: relative rounding far below 1e-6.
  return 1e-6 * jnp.abs(x) + 1e-30


def _hash(seed, *words):
  """A uint32 hash of ``seed`` and integer ``words`` (arrays broadcast).

  Counter-based randomness (murmur3's finaliser after each word) for the
  search's random choices: a few integer ops, cheap to compile, unlike
  threefry inside a loop.
  """
  x = jnp.asarray(seed, jnp.uint32) ^ jnp.uint32(0x9E3779B9)
  for wd in words:
    x = x ^ jnp.asarray(wd).astype(jnp.uint32)
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x85EBCA6B)
    x = x ^ (x >> 13)
    x = x * jnp.uint32(0xC2B2AE35)
    x = x ^ (x >> 16)
  return x


def _rand_order(seed, tag, count, s):
  """A random permutation of ``range(s)`` drawn from ``(seed, tag, count)``."""
  bits = _hash(seed, tag, count, jnp.arange(s, dtype=jnp.uint32))
  return jnp.argsort(bits).astype(jnp.int32)


def _randint(seed, tag, count, idx, hi):
  """Uniform-ish ints in ``[0, hi)`` (``hi`` < 2**16, modulo bias < 2**-16)."""
  return (_hash(seed, tag, count, idx) % jnp.uint32(hi)).astype(jnp.int32)


@functools.lru_cache(maxsize=None)
def _member_sums(k: int, m: int, n: int) -> tuple[np.ndarray, np.ndarray] | None:
  """Tables for :func:`_subset_scores`'s sums of ``n`` members; None where it uses a network.

  Returns:
    ``tuples``: int32 ``(Nt, n)``, every ``n``-subset of the window's ``k*m``
    channels; ``of_subset``: int32 ``(Ns, C(m, n))``, for each stripe of
    :func:`window_tables` the indices in ``tuples`` of its ``n``-subsets.
  """
  if n > 2 or math.comb(m, n) > 2 * m:
    return None
  tuples = list(itertools.combinations(range(k * m), n))
  index = {t: i for i, t in enumerate(tuples)}
  subsets, _ = window_tables(k, m)
  of_subset = [[index[t] for t in itertools.combinations(sub, n)] for sub in subsets.tolist()]
  return np.asarray(tuples, np.int32), np.asarray(of_subset, np.int32)


def _subset_scores(g: jax.Array, k: int, m: int, n: int) -> jax.Array:
  """Scores of every candidate stripe of a window: ``g (k*m, R)`` -> ``(Ns,)``.

  The same values as :func:`_stripe_scores` of the window's ``subsets``. For
  ``n <= 2`` the sum of the ``n`` largest of a stripe is the largest sum of
  ``n`` of its members, and a sum of two rounds once and monotonically, so the
  max over the members' pair sums (each computed once per window) is exactly
  the network's value, at a fraction of the work (no gather per candidate).
  """
  subsets, _ = window_tables(k, m)
  sums = _member_sums(k, m, n)
  if sums is None:
    return _topn_sum([g[subsets[:, i]] for i in range(m)], n).sum(-1)
  tuples, of_subset = sums
  if (n, m) == (2, 4):
    # The two largest of a stripe (a, b, c, d) are (a, b), or (c, d), or the
    # larger of a, b with the larger of c, d: 2 max and 1 add per candidate.
    a, b = g[tuples[:, 0]], g[tuples[:, 1]]
    pair_sum, pair_max = a + b, jnp.maximum(a, b)
    ab, cd = of_subset[:, 0], of_subset[:, 5]
    return jnp.maximum(jnp.maximum(pair_sum[ab], pair_sum[cd]), pair_max[ab] + pair_max[cd]).sum(-1)
  tuple_sums = g[tuples[:, 0]]
  for i in range(1, n):
    tuple_sums = tuple_sums + g[tuples[:, i]]  # (Nt, R)
  return tuple_sums[of_subset].max(1).sum(-1)


def _solve_windows(mag, perm, wins, valid, n, m, k, batch):
  """Best partition of each window of stripes.

  Args:
    mag: ``(C, R)``; perm: ``(C,)``; wins: int ``(W, k)`` stripe ids (may hold
      ``S`` for a dummy); valid: bool ``(W,)``.

  Returns:
    gain ``(W,)`` (0 where not improving), new channels ``(W, k*m)``, new
    stripe scores ``(W, k)``.
  """
  subsets, parts = window_tables(k, m)
  subsets, parts = jnp.asarray(subsets), jnp.asarray(parts)
  s = perm.shape[0] // m
  stripes = perm.reshape(s, m)
  cols = stripes[jnp.minimum(wins, s - 1)].reshape(wins.shape[0], k * m)

  def one(wc):
    sub = _subset_scores(mag[wc], k, m, n)  # (Ns,)
    tot = sub[parts].sum(-1)  # (Np,)
    b = jnp.argmax(tot)  # first maximum: the identity (index 0) wins ties
    gain = tot[b] - tot[0]
    ok = gain > _tol(tot[0])
    b = jnp.where(ok, b, 0)
    blocks = parts[b]
    return jnp.where(ok, gain, 0.0), wc[subsets[blocks]].reshape(k * m), sub[blocks]

  if batch >= wins.shape[0]:
    gain, new, new_scores = jax.vmap(one)(cols)
  else:
    gain, new, new_scores = jax.lax.map(one, cols, batch_size=batch)
  gain = jnp.where(valid, gain, 0.0)
  return gain, new, new_scores


def _apply_windows(perm, scores, wins, take, new, new_scores, m, k):
  """Writes the windows where ``take`` (disjoint) into the partition."""
  s = scores.shape[0]
  c = perm.shape[0]
  pos = (wins[:, :, None] * m + jnp.arange(m, dtype=wins.dtype)).reshape(wins.shape[0], k * m)
  pos = jnp.where(take[:, None], pos, c)
  perm = perm.at[pos].set(new, mode="drop")
  spos = jnp.where(take[:, None], wins, s)
  scores = scores.at[spos].set(new_scores, mode="drop")
  return perm, scores


def _perturb(perm, seed, count, m, swaps):
  """Swaps ``swaps`` random pairs of channels that sit in different stripes.

  Returns the new partition and the bool ``(S,)`` of the stripes it touched.
  """
  c = perm.shape[0]

  def body(i, carry):
    perm, touched = carry
    a = _randint(seed, 7, count, 2 * i, c)
    # b: uniform over the channels outside a's stripe.
    b = ((a // m) * m + m + _randint(seed, 7, count, 2 * i + 1, c - m)) % c
    pa, pb = perm[a], perm[b]
    perm = perm.at[a].set(pb).at[b].set(pa)
    return perm, touched.at[a // m].set(True).at[b // m].set(True)

  return jax.lax.fori_loop(0, swaps, body, (perm, jnp.zeros(c // m, bool)))


@functools.lru_cache(maxsize=None)
def _all_windows(s: int, k: int) -> np.ndarray:
  """``(C(s, k), k)`` int32: every window of ``k`` of ``s`` stripes."""
  return np.asarray(list(itertools.combinations(range(s), k)), np.int32).reshape(-1, k)


def _independent(wins, gain, s):
  """Improving windows that beat every window they overlap (hence disjoint).

  A window is taken when, on each of its stripes, it has the largest gain
  (ties: the lowest window index). The best window overall is always taken.
  """
  w = wins.shape[0]
  idx = jnp.arange(w, dtype=jnp.int32)
  flat = wins.reshape(-1)
  g = jnp.repeat(gain, wins.shape[1])
  top = jnp.full(s, -jnp.inf, gain.dtype).at[flat].max(g)
  is_top = gain[:, None] == top[wins]
  cand = jnp.where(is_top.reshape(-1), jnp.repeat(idx, wins.shape[1]), w)
  first = jnp.full(s, w, jnp.int32).at[flat].min(cand)
  return (gain > 0) & jnp.all(first[wins] == idx[:, None], axis=1)


class _Win(NamedTuple):
  """What every round of one window search reads (arrays traced, ints static)."""

  mag: jax.Array  # (C, R)
  seed: jax.Array
  n: int
  m: int
  k: int
  batch: int
  all_batch: int
  escape_swaps: jax.Array
  max_escapes: jax.Array
  rr: jax.Array  # (rounds, w, 2) the round-robin schedule
  after_pairs: int  # the phase after a converged pair sweep or star


def _n_half(cx: _Win) -> int:
  """Star rounds per dirty stripe: the others in halves of ``w`` windows."""
  s = cx.mag.shape[0] // cx.m
  return -(-(s - 1) // cx.rr.shape[1])


def _local_opt(cx: _Win, st: _State, fresh) -> _State:
  """Phase ``_LOCAL_OPT``: keep the best partition, then escape from it or stop."""
  s = cx.mag.shape[0] // cx.m
  total = st.scores.sum()
  better = total > st.best_total + _tol(st.best_total)
  best = jnp.where(better, st.perm, st.best)
  best_total = jnp.where(better, total, st.best_total)
  done = st.escapes >= cx.max_escapes
  kicked, touched = _perturb(best, cx.seed, st.escapes, cx.m, cx.escape_swaps)
  perm = jnp.where(done, best, kicked)
  scores = _stripe_scores(cx.mag, perm.reshape(s, cx.m), cx.n)
  return st._replace(
    perm=perm,
    scores=scores,
    best=best,
    best_total=best_total,
    dirty=touched & ~done,
    relabel=fresh,
    phase=jnp.where(done, _LOCAL_OPT, _STAR),
    escapes=st.escapes + (~done).astype(jnp.int32),
    done=done,
    pos=jnp.zeros((), jnp.int32),
  )


def _pair_windows(cx: _Win, st: _State):
  """``(wins (w, 2), valid)``: round-robin round ``pos`` under the sweep's relabeling."""
  s = cx.mag.shape[0] // cx.m
  relab = jnp.concatenate([st.relabel, jnp.array([s], st.relabel.dtype)])
  pw = relab[cx.rr[st.pos]]
  return pw, jnp.all(pw < s, axis=-1)


def _star_windows(cx: _Win, st: _State):
  """``(wins (w, 2), valid, d)``: the first dirty stripe ``d`` against half ``pos`` of the others."""
  s = cx.mag.shape[0] // cx.m
  w = cx.rr.shape[1]
  n_half = _n_half(cx)
  slots = jnp.arange(n_half * w, dtype=jnp.int32)
  d = st.relabel[jnp.argmax(st.dirty[st.relabel])]
  others = jax.lax.dynamic_slice(slots, (jnp.minimum(st.pos, n_half - 1) * w,), (w,))
  sw = jnp.stack([jnp.full(w, d, jnp.int32), jnp.where(others >= d, others + 1, others)], 1)
  return sw, (sw[:, 1] < s) & jnp.any(st.dirty), d


def _after_pairs(cx: _Win, st: _State, perm, scores, improved_any, fresh) -> _State:
  """Bookkeeping of a pair round: next round, or a new sweep (or done with pairs)."""
  improved = st.improved | improved_any
  pos = st.pos + 1
  end = pos >= cx.rr.shape[0]
  converged = end & ~improved
  return st._replace(
    perm=perm,
    scores=scores,
    relabel=jnp.where(end, fresh, st.relabel),
    phase=jnp.where(converged, cx.after_pairs, _PAIRS),
    pos=jnp.where(end, 0, pos),
    improved=improved & ~end,
    sweeps=st.sweeps + end.astype(jnp.int32),
  )


def _after_star(cx: _Win, st: _State, perm, scores, improved_any, win, d) -> _State:
  """Bookkeeping of a star round: an improved window's stripes turn dirty.

  The stripe ``d`` turns clean when its last half of partners improved nothing.
  """
  last_half = st.pos >= _n_half(cx) - 1
  dirty = jnp.where(
    improved_any,
    st.dirty.at[win].set(True),
    jnp.where(last_half, st.dirty.at[d].set(False), st.dirty),
  )
  return st._replace(
    perm=perm,
    scores=scores,
    dirty=dirty,
    pos=jnp.where(improved_any | last_half, 0, st.pos + 1),
    phase=jnp.where(jnp.any(st.dirty), _STAR, cx.after_pairs),
  )


def _pair_or_star(cx: _Win, st: _State, fresh) -> _State:
  """Phases ``_PAIRS`` and ``_STAR``: one round of windows of two stripes (one batch shape)."""
  star = st.phase == _STAR
  pw, pvalid = _pair_windows(cx, st)
  sw, svalid, d = _star_windows(cx, st)
  s = cx.mag.shape[0] // cx.m
  wins = jnp.minimum(jnp.where(star, sw, pw), s)
  valid = jnp.where(star, svalid, pvalid)
  gain, new, new_scores = _solve_windows(cx.mag, st.perm, wins, valid, cx.n, cx.m, 2, cx.batch)
  b = jnp.argmax(gain)
  improved_any = gain[b] > 0
  take = jnp.where(star, (jnp.arange(wins.shape[0]) == b) & improved_any, gain > 0)
  perm, scores = _apply_windows(st.perm, st.scores, wins, take, new, new_scores, cx.m, 2)
  pair_st = _after_pairs(cx, st, perm, scores, improved_any, fresh)
  star_st = _after_star(cx, st, perm, scores, improved_any, wins[b], d)
  return jax.tree_util.tree_map(lambda a, b_: jnp.where(star, a, b_), star_st, pair_st)


def _all_pass(cx: _Win, st: _State) -> _State:
  """Phase ``_ALL_WINDOWS``: solve every window of ``k`` stripes, apply the best disjoint ones."""
  s = cx.mag.shape[0] // cx.m
  wins = jnp.asarray(_all_windows(s, cx.k))
  valid = jnp.ones(wins.shape[0], bool)
  gain, new, new_scores = _solve_windows(
    cx.mag, st.perm, wins, valid, cx.n, cx.m, cx.k, cx.all_batch
  )
  take = _independent(wins, gain, s)
  perm, scores = _apply_windows(st.perm, st.scores, wins, take, new, new_scores, cx.m, cx.k)
  return st._replace(
    perm=perm, scores=scores, phase=jnp.where(jnp.any(take), _ALL_WINDOWS, _LOCAL_OPT)
  )


def _search_round(cx: _Win, st: _State) -> _State:
  """One round: at a local optimum escape (or stop), else one round of the phase."""
  s = cx.mag.shape[0] // cx.m
  fresh = _rand_order(cx.seed, 1, st.rounds + 1, s)
  st = jax.lax.cond(
    st.phase == _LOCAL_OPT, functools.partial(_local_opt, cx), lambda x, f: x, st, fresh
  )
  pair_or_star = functools.partial(_pair_or_star, cx)

  def windows(x: _State, f) -> _State:
    return jax.lax.cond(x.phase == _ALL_WINDOWS, lambda y, g: _all_pass(cx, y), pair_or_star, x, f)

  step = windows if cx.k > 2 else pair_or_star
  st = jax.lax.cond(st.done | (st.phase == _LOCAL_OPT), lambda x, f: x, step, st, fresh)
  return st._replace(rounds=st.rounds + 1)


@_cpu_tuned_jit(static_argnames=("n", "m", "k", "batch", "all_batch"))
def _windows_chunk(
  mag, state: _State, seed, *, n, m, k, batch, all_batch, escape_swaps, max_escapes, chunk
):
  """Runs up to ``chunk`` rounds of the window search (a pure state machine).

  Phases: ``_PAIRS`` sweeps pairs of stripes in round-robin rounds (a round
  solves ``S // 2`` disjoint windows and applies every improvement) until a
  whole sweep improves nothing, which proves a local optimum over all pairs.
  ``_STAR`` takes the first dirty stripe ``d`` (in a random order), solves the
  pairs ``(d, x)`` for half of the other stripes ``x`` at a time and applies
  the best; ``d`` turns clean when neither half improves (the cheap way back
  to a local optimum after an escape). ``_ALL_WINDOWS`` (windows of ``k >= 3``
  stripes, after ``_PAIRS`` or ``_STAR``) solves every window of ``k`` stripes
  at once and applies the best disjoint improvements, until none is left.
  ``_LOCAL_OPT`` is a local optimum: keep the best partition so far, then
  escape (perturb the best with random channel swaps, mark the touched stripes
  dirty, go to ``_STAR``) or stop. ``_PAIRS`` and ``_STAR`` share one batch
  shape, so one compiled window solver serves both.
  """
  cx = _Win(
    mag=mag,
    seed=seed,
    n=n,
    m=m,
    k=k,
    batch=batch,
    all_batch=all_batch,
    escape_swaps=escape_swaps,
    max_escapes=max_escapes,
    rr=jnp.asarray(_round_robin(mag.shape[0] // m)),
    after_pairs=_ALL_WINDOWS if k > 2 else _LOCAL_OPT,
  )

  def cond(carry):
    st, i = carry
    return (i < chunk) & ~st.done

  # The first chunk starts from a blank state: initialising here, not in a
  # program of its own, saves a compilation.
  state = jax.lax.cond(state.rounds < 0, lambda: _init_state(mag, m, seed, n), lambda: state)
  st, _ = jax.lax.while_loop(cond, lambda cr: (_search_round(cx, cr[0]), cr[1] + 1), (state, 0))
  return st, _outcome(st)


@_cpu_tuned_jit(static_argnames=("n", "m", "k", "batch", "all_batch"))
def _windows_chunks(mag, state: _State, seed, *, chunk, **static):
  """:func:`_windows_chunk` for a batch of chains (the leading axis of ``state``)."""
  chains = state.perm.shape[0]
  seeds = _hash(seed, 99, jnp.arange(chains, dtype=jnp.uint32))
  return jax.vmap(lambda st, sd: _windows_chunk(mag, st, sd, chunk=chunk, **static))(state, seeds)


def _blank_state(mag, m: int, chains: int) -> _State:
  """A numpy placeholder :class:`_State` (``rounds = -1``: not initialised yet)."""
  c = mag.shape[0]
  s = c // m
  lead = (chains,) if chains > 1 else ()

  def z(shape, dtype, value=0):
    return np.full(lead + shape, value, dtype)

  i32 = np.int32
  return _State(
    perm=z((c,), i32),
    scores=z((s,), mag.dtype),
    best=z((c,), i32),
    best_total=z((), mag.dtype),
    dirty=z((s,), bool),
    relabel=z((s,), i32),
    phase=z((), i32),
    pos=z((), i32),
    improved=z((), bool),
    sweeps=z((), i32),
    escapes=z((), i32),
    rounds=z((), i32, -1),
    done=z((), bool),
  )


def _init_state(mag, m, seed, n) -> _State:
  """The window search's state at the identity."""
  c = mag.shape[0]
  s = c // m
  perm = jnp.arange(c, dtype=jnp.int32)
  scores = _stripe_scores(mag, perm.reshape(s, m), n)
  relabel = _rand_order(seed, 1, 0, s)
  z = jnp.zeros((), jnp.int32)
  f = jnp.zeros((), bool)
  return _State(
    perm=perm,
    scores=scores,
    best=perm,
    best_total=scores.sum(),
    dirty=jnp.zeros(s, bool),
    relabel=relabel,
    phase=jnp.full((), _PAIRS, jnp.int32),
    pos=z,
    improved=f,
    sweeps=z,
    escapes=z,
    rounds=z,
    done=f,
  )


# ----------------------------------------------------------------------------
# The swap search.


class _SwapState(NamedTuple):
  perm: jax.Array
  repl: jax.Array  # (S, m, C): score of stripe s with member p replaced by channel j
  scores: jax.Array  # (S,)
  best: jax.Array
  best_total: jax.Array
  escapes: jax.Array
  rounds: jax.Array
  done: jax.Array


def _replacement(mag, stripes, n):
  """``(S', m, C)``: score of each stripe with member ``p`` replaced by channel ``j``."""
  sp, m = stripes.shape
  c = mag.shape[0]
  cand = jnp.broadcast_to(stripes[:, None, None, :], (sp, m, c, m))
  cand = jnp.where(
    jnp.eye(m, dtype=bool)[None, :, None, :],
    jnp.arange(c, dtype=stripes.dtype)[None, None, :, None],
    cand,
  )
  return _stripe_scores(mag, cand, n)


@_cpu_tuned_jit(static_argnames=("m", "n"))
def _swap_init(mag, m, n) -> _SwapState:
  """The swap search's state at the identity."""
  c = mag.shape[0]
  stripes = jnp.arange(c, dtype=jnp.int32).reshape(c // m, m)
  scores = _stripe_scores(mag, stripes, n)
  z = jnp.zeros((), jnp.int32)
  return _SwapState(
    perm=stripes.reshape(-1),
    repl=_replacement(mag, stripes, n),
    scores=scores,
    best=stripes.reshape(-1),
    best_total=scores.sum(),
    escapes=z,
    rounds=z,
    done=jnp.zeros((), bool),
  )


@_cpu_tuned_jit(static_argnames=("n", "m"))
def _swap_chunk(mag, st: _SwapState, seed, *, n, m, escape_swaps, max_escapes, chunk):
  c = mag.shape[0]
  s = c // m

  def step(st: _SwapState) -> _SwapState:
    perm = st.perm
    where = jnp.zeros(c, jnp.int32).at[perm].set(jnp.arange(c, dtype=jnp.int32))
    stripe_of, slot_of = where // m, where % m
    # delta[i, j] for channels i, j (ids): swap their places.
    r_ij = st.repl[stripe_of[:, None], slot_of[:, None], jnp.arange(c)[None, :]]
    delta = r_ij + r_ij.T - st.scores[stripe_of][:, None] - st.scores[stripe_of][None, :]
    same = stripe_of[:, None] == stripe_of[None, :]
    delta = jnp.where(same, -jnp.inf, delta)
    flat = jnp.argmax(delta)
    i, j = flat // c, flat % c
    ok = delta[i, j] > _tol(st.scores.sum() / s)
    a, b = where[i], where[j]
    swapped = perm.at[a].set(perm[b]).at[b].set(perm[a])
    local_opt = ~ok
    total = st.scores.sum()
    better = local_opt & (total > st.best_total + _tol(st.best_total))
    best = jnp.where(better, perm, st.best)
    best_total = jnp.where(better, total, st.best_total)
    done = local_opt & (st.escapes >= max_escapes)
    escape = local_opt & ~done
    kicked, _ = _perturb(best, seed, st.escapes, m, escape_swaps)
    perm = jnp.where(ok, swapped, jnp.where(escape, kicked, perm))
    stripes = perm.reshape(s, m)
    # Refresh the two touched stripes after a swap; all of them after an escape.
    sa, sb = stripe_of[i], stripe_of[j]
    two = jnp.stack([sa, sb])
    repl2 = _replacement(mag, stripes[two], n)
    repl = jnp.where(ok, st.repl.at[two].set(repl2), st.repl)
    repl = jax.lax.cond(escape, lambda: _replacement(mag, stripes, n), lambda: repl)
    scores = _stripe_scores(mag, stripes, n)
    return _SwapState(
      perm=perm,
      repl=repl,
      scores=scores,
      best=best,
      best_total=best_total,
      escapes=st.escapes + escape.astype(jnp.int32),
      rounds=st.rounds + 1,
      done=done,
    )

  def cond(carry):
    st, i = carry
    return (i < chunk) & ~st.done

  st, _ = jax.lax.while_loop(cond, lambda cr: (step(cr[0]), cr[1] + 1), (st, 0))
  return st, _outcome(st)


# ----------------------------------------------------------------------------
# Running a search: setup, chunks between host checks, the result.


def _row_bucket(r: int) -> int:
  """Rows padded to: a power of two (at least 128) up to 4096, then multiples of 4096."""
  return max(128, 1 << max(0, (r - 1).bit_length())) if r <= 4096 else -(-r // 4096) * 4096


def _window_stripes(window: int | None, s: int) -> int:
  """Stripes per window (``k``) for ``window`` on ``s`` stripes; raises ``ValueError`` below 2."""
  k = window if window is not None else 2
  if k < 2:
    raise ValueError(f"window must be >= 2 stripes, got {k}.")
  return min(k, s)


class _Job(NamedTuple):
  """A search ready to run: ``run(mag, state, seeds, chunk=...)`` from ``state``."""

  run: Callable[..., Any]
  state: Any
  seeds: jax.Array
  cost: int  # elements of work per round (sets the rounds between host checks)


def _windows_job(mag, n, m, k, escape_swaps, escapes, seed, chains) -> _Job:
  """The window search (``chains`` side by side when more than one)."""
  s, r = mag.shape[0] // m, mag.shape[1]
  n_sub = len(window_tables(k, m)[0])
  pair = len(window_tables(2, m)[0]) * m * r
  batch = max(1, min(s // 2 + s % 2, _BATCH_ELEMS // pair))
  n_all = math.comb(s, k) if k > 2 else 1
  if k > 2 and n_all > _MAX_WINDOWS:
    raise ValueError(
      f"window={k} on {s} stripes means {n_all} windows per pass (more than "
      f"{_MAX_WINDOWS}); use window=2 for a layer this wide."
    )
  all_batch = max(1, min(n_all, _BATCH_ELEMS // (n_sub * m * r)))
  static = dict(
    n=n,
    m=m,
    k=k,
    batch=batch,
    all_batch=all_batch,
    escape_swaps=np.int32(escape_swaps),
    max_escapes=np.int32(escapes),
  )
  cost = max(s // 2 * pair, n_all * n_sub * m * r if k > 2 else 0)
  run = functools.partial(_windows_chunks if chains > 1 else _windows_chunk, **static)
  return _Job(run, _blank_state(mag, m, chains), np.uint32(seed), cost)


def _swap_job(mag, n, m, escape_swaps, escapes, seed) -> _Job:
  """The greedy swap search."""
  c, r = mag.shape
  run = functools.partial(
    _swap_chunk, n=n, m=m, escape_swaps=np.int32(escape_swaps), max_escapes=np.int32(escapes)
  )
  return _Job(run, _swap_init(mag, m, n), np.uint32(seed), max(1, 2 * m * c * r + c * c))


def _run_job(job: _Job, mag, budget: int, time_limit: float | None, t0: float) -> _Outcome:
  """Runs ``job`` in chunks until done, ``budget`` rounds, or ``time_limit`` after ``t0``.

  Host-side bookkeeping is numpy on fetched values: an eager ``jnp`` op here
  would compile a program of its own on the first call.
  """
  # Chunks of rounds between host checks: about 1e8 elements of work, so a
  # check comes every few ms on a GPU and well under a second on a CPU.
  chunk = int(min(4096, max(1, 1e8 // job.cost)))
  st, done_rounds = job.state, 0
  while True:
    this = int(max(0, min(chunk, budget - done_rounds)))
    st, out = job.run(mag, st, job.seeds, chunk=np.int32(this))
    out = jax.device_get(out)
    done_rounds = int(np.max(out.rounds))
    if (
      this == 0
      or bool(np.all(out.done))
      or done_rounds >= budget
      or (time_limit is not None and time.perf_counter() - t0 >= time_limit)
    ):
      return out


def _result(out: _Outcome, chains: int) -> tuple[jax.Array, int, bool, int]:
  """``(perm, escapes, converged, rounds)`` of a finished search (of its best chain)."""
  perm = out.perm[np.argmax(out.total)] if chains > 1 else out.perm
  return (
    jax.device_put(np.asarray(perm, np.int32)),
    int(np.max(out.escapes)),
    bool(np.all(out.done)),
    int(np.max(out.rounds)),
  )


# ----------------------------------------------------------------------------
# Public entry point.


@dataclasses.dataclass(frozen=True)
class SearchInfo:
  """What a search did.

  Attributes:
    strategy: the strategy that ran (``"windows"`` or ``"swap"``).
    window: channels per window (``k*m``), 0 for ``"swap"``.
    rounds: rounds (window strategy) or swap steps run.
    escapes: escapes taken.
    converged: True when the last local optimum was reached after the last
      escape (False when a budget stopped the search first).
    seconds: wall-clock time, compilation included.
    score: the :class:`PermutationScore` of the result.
  """

  strategy: str
  window: int
  rounds: int
  escapes: int
  converged: bool
  seconds: float
  score: PermutationScore


def search_permutation(
  w: jax.Array,
  n: int = 2,
  m: int = 4,
  axis: Axis = 0,
  *,
  strategy: Strategy = "auto",
  window: int | None = None,
  escapes: int = 100,
  escape_swaps: int = 8,
  time_limit: float | None = None,
  max_rounds: int | None = None,
  seed: int = 0,
  chains: int = 1,
  return_info: bool = False,
) -> jax.Array | tuple[jax.Array, SearchInfo]:
  """A permutation of ``w``'s group axis under which N:M keeps more magnitude.

  Args:
    w: a weight of any rank; float (any precision) or integer. Magnitudes are
      compared in float32.
    n, m: N:M (keep ``n`` of every ``m``).
    axis: the group axis (for a flax ``Dense`` kernel ``(in, out)``: 0; for a
      ``Conv`` kernel ``(*spatial, in, out)``: -2), or a run of consecutive
      axes flattened row-major. Every other axis is a "row".
    strategy: ``"windows"`` (optimize stripe groups, see the module docstring),
      ``"swap"`` (greedy channel swaps) or ``"auto"`` (windows).
    window: stripes per window for ``"windows"``: 2 (the default; 8 channels for
      2:4) or 3 (12 channels: stronger local optima, ~15x the work per window
      and a slower compilation).
    escapes: local optima to escape from (perturb the best and search on).
    escape_swaps: random channel swaps per escape.
    time_limit: seconds (wall clock, compilation included); None for none. The
      search stops at the first check after the limit (checks run every few
      milliseconds to a second, depending on the layer's size).
    max_rounds: a deterministic budget: at most this many rounds (or swap
      steps); None for none.
    seed: the seed of every random choice (window draws, escapes).
    chains: independent searches run side by side (vectorised with ``vmap``;
      the best one wins). Nearly free on a GPU for small layers; costs
      ``chains`` times the work on a CPU. ``"windows"`` only.
    return_info: also return a :class:`SearchInfo`.

  Returns:
    ``perm``: int32 ``(C,)``, ``C`` the size of the group axis (the product of
    the sizes for several axes), such that ``jnp.take(w, perm, axis=axis)`` (or
    :func:`permute_axis`) is the permuted weight; with ``return_info``, ``(perm,
    info)``. The permuted weight never keeps less magnitude than ``w`` under
    N:M. Deterministic for a given seed when no ``time_limit`` stops it.

  Raises:
    ValueError: if the group axis' size is not a multiple of ``m``.

  Example:
    >>> import jax, jax.numpy as jnp, jasp
    >>> w = jax.random.uniform(jax.random.key(0), (16, 32))
    >>> perm = jasp.permutation.search_permutation(w, 2, 4, axis=0, seed=0)
    >>> pw = jnp.take(w, perm, axis=0)  # the weight with its input channels permuted
    >>> kept = lambda x: float(jnp.sum(jnp.abs(x) * jasp.nm_mask(x, 2, 4, axis=0)))
    >>> kept(pw) >= kept(w)
    True
  """
  masks_lib.check_nm(n, m)
  if strategy not in ("auto", "windows", "swap"):
    raise ValueError(f"strategy must be 'auto', 'windows' or 'swap', got {strategy!r}.")
  t0 = time.perf_counter()
  # Not jnp.asarray: for a numpy weight that compiles a copy program of its own.
  w = w if isinstance(w, (jax.Array, np.ndarray)) else np.asarray(w)
  axes = masks_lib.group_axes(w.ndim, axis)
  c = int(np.prod([w.shape[a] for a in axes], dtype=np.int64))
  if c % m:
    raise ValueError(
      f"the group axis {axis} of an array of shape {tuple(w.shape)} has {c} channels, "
      f"not a multiple of m={m}."
    )
  s = c // m
  # Zero rows change no score: pad the rows to a bucket so that layers of
  # similar sizes share one compiled search.
  r = _row_bucket(w.size // max(c, 1))
  mag = _padded_matrix(w, axes, r)
  strategy = "windows" if strategy == "auto" else strategy
  k = _window_stripes(window, s) if strategy == "windows" else 0
  escape_swaps = max(1, min(int(escape_swaps), s // 2))
  seed = int(seed) & 0x7FFFFFFF
  if s < 2:
    perm = jnp.arange(c, dtype=jnp.int32)
    info = SearchInfo(
      strategy, k * m, 0, 0, True, time.perf_counter() - t0, permutation_score(w, perm, n, m, axis)
    )
    return (perm, info) if return_info else perm

  if strategy == "windows":
    job = _windows_job(mag, n, m, k, escape_swaps, escapes, seed, chains)
  else:
    job = _swap_job(mag, n, m, escape_swaps, escapes, seed)
  budget = max_rounds if max_rounds is not None else np.iinfo(np.int32).max
  out = _run_job(job, mag, budget, time_limit, t0)
  perm, escapes_done, all_done, rounds = _result(out, chains)
  seconds = time.perf_counter() - t0
  if not return_info:
    return perm
  info = SearchInfo(
    strategy,
    k * m,
    rounds,
    escapes_done,
    all_done,
    seconds,
    permutation_score(w, perm, n, m, axis),
  )
  return perm, info
