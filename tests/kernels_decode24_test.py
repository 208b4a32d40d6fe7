"""The 2:4 compressed format and the decode matmul (jasp.kernels.decode24).

Oracles, written here and independent of the code under test: a NumPy
re-implementation of the packing (element by element, from the format's
definition) and float64 NumPy products of the same low-precision operands.

On CPU the kernel runs in Pallas interpret mode (small shapes); the Pallas to
Triton lowering is checked for CUDA without a GPU. The tests marked ``gpu``
compile and run the Triton kernel (``"kn"`` layout) and the Mosaic GPU kernel
(``"nk"``, Hopper): ``pytest -m gpu tests/kernels_decode24_test.py``.
"""

import dataclasses

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
import testing

from jasp.kernels import decode24

DTYPES = [jnp.bfloat16, jnp.float16, jnp.float32]
# Unit roundoff of the output dtype (half an ulp, relative).
UNIT = {jnp.bfloat16: 2.0**-8, jnp.float16: 2.0**-11, jnp.float32: 2.0**-24}


# ----------------------------------------------------------------------------
# Oracles.


def random_24(rng, k, n, dtype, *, ints=False, zero_frac=0.25):
  """A ``(k, n)`` NumPy array of ``dtype``, 2:4 along axis 0, with groups of 0, 1 and 2 nonzeros.

  Each group keeps 2 random positions; each kept value is then zero with
  probability ``zero_frac`` (some as ``-0.0``). ``ints``: small integers (exact products).
  """
  vals = rng.integers(-3, 4, (k, n)) if ints else rng.standard_normal((k, n))
  vals = np.where(vals == 0, 1.0, vals).astype(np.float64)
  order = np.argsort(rng.random((k // 4, 4, n)), axis=1)
  keep = np.zeros((k // 4, 4, n), bool)
  np.put_along_axis(keep, order[:, :2], True, axis=1)
  keep = keep.reshape(k, n)
  zero = rng.random((k, n)) < zero_frac
  w = np.where(keep & ~zero, vals, 0.0)
  w = np.where(keep & zero & (rng.random((k, n)) < 0.5), -0.0, w)
  return np.asarray(jnp.asarray(w, dtype))


def kept_ref(group):
  """The two kept positions of a group of 4: its nonzeros, completed by its first zeros."""
  nonzero = [i for i in range(4) if group[i] != 0]
  assert len(nonzero) <= 2
  return sorted(nonzero + [i for i in range(4) if group[i] == 0][: 2 - len(nonzero)])


def nibble_ref(i, tile):
  """``(byte, shift)`` of entry ``i`` along the packed axis: two half tiles per tile."""
  j, i = divmod(i, tile)
  half, i = divmod(i, tile // 2)
  return j * tile // 2 + i, 4 * half


def pack_ref(w, tile):
  """``(values, meta)`` of the format, entry by entry from its definition."""
  k, n = w.shape
  values = np.zeros((2, k // 4, n), w.dtype)
  meta = np.zeros((k // 4, n // 2), np.uint8)
  for g in range(k // 4):
    for c in range(n):
      kept = kept_ref(w[4 * g : 4 * g + 4, c])
      values[:, g, c] = w[4 * g : 4 * g + 4, c][kept]
      byte, shift = nibble_ref(c, tile)
      meta[g, byte] |= (kept[0] | kept[1] << 2) << shift
  return values, meta


def dense_ref(values, meta, tile):
  """The dense weight of a packed pair (entry by entry; unkept entries +0)."""
  _, groups, n = values.shape
  w = np.zeros((4 * groups, n), values.dtype)
  for c in range(n):
    byte, shift = nibble_ref(c, tile)
    code = (meta[:, byte] >> shift) & 15
    for g in range(groups):
      w[4 * g + (code[g] & 3), c] = values[0, g, c]
      w[4 * g + (code[g] >> 2), c] = values[1, g, c]
  return w


def bits(a):
  a = np.asarray(a)
  return a.view(np.dtype(f"u{a.dtype.itemsize}"))


def assert_product(y, x, w, dtype, msg=""):
  """``y`` is ``x @ w`` (float64 of the same operands) within the output rounding.

  The kernel sums exact products in float32 and rounds once to ``dtype``:
  ``|y - ref| <= u |ref| + (1 + u) e`` with ``u`` the unit roundoff of
  ``dtype`` and ``e <= K 2^-24 (|x| @ |w|)`` the float32 summation error.
  """
  x64, w64 = testing.as_np64(x), testing.as_np64(w)
  ref = x64 @ w64
  got = testing.as_np64(y)
  assert got.shape == ref.shape, msg
  u = UNIT[dtype]
  bound = u * np.abs(ref) + (1 + u) * x64.shape[-1] * 2.0**-24 * (np.abs(x64) @ np.abs(w64))
  err = np.abs(got - ref)
  worst = np.unravel_index(np.argmax(err - bound), err.shape)
  assert np.all(err <= bound + 1e-30), (
    f"{msg}: |y - ref| = {err[worst]:.3g} > {bound[worst]:.3g} at {worst} "
    f"(y {got[worst]}, ref {ref[worst]})"
  )


def pallas_calls(jaxpr):
  """Every ``pallas_call`` equation in ``jaxpr`` and its sub-jaxprs."""
  out = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "pallas_call":
      out.append(eqn)
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      out += pallas_calls(sub)
  return out


# ----------------------------------------------------------------------------
# Format.


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
  "shape,tile", [((16, 64), 32), ((40, 96), None), ((64, 256), 128), ((8, 12), 6)]
)
def test_compress_matches_numpy_packing(shape, tile, dtype):
  rng, seed = testing.fresh_rng(hash((shape, str(tile))) % 1000)
  w = random_24(rng, *shape, dtype)
  c = decode24.compress_24(jnp.asarray(w), tile=tile)
  tile = tile or {64: 64, 96: 32, 256: 128}[shape[1]]
  values, meta = pack_ref(w, tile)
  msg = f"seed={seed} {shape} tile={tile}"
  assert c.shape == shape and c.tile == tile and c.dtype == dtype, msg
  assert c.values.dtype == dtype and c.meta.dtype == np.uint8, msg
  np.testing.assert_array_equal(bits(c.values), bits(values), err_msg=msg)
  np.testing.assert_array_equal(np.asarray(c.meta), meta, err_msg=msg)
  back = np.asarray(decode24.decompress_24(c))
  np.testing.assert_array_equal(bits(back), bits(dense_ref(values, meta, tile)), err_msg=msg)
  np.testing.assert_array_equal(back, w, err_msg=msg)  # equal values (signs of zeros aside)


def test_groups_with_zero_one_two_nonzeros_and_signed_zeros():
  """Fillers are the lowest zero positions; kept ``-0.0`` survives a round trip."""
  w = np.zeros((12, 32), np.float32)
  w[1, 0] = 5.0  # group 0: one nonzero at 1 -> slots (0, 1)
  w[3, 1] = -2.0  # one nonzero at 3 -> slots (0, 3)
  w[0, 2], w[2, 2] = -0.0, 7.0  # -0 kept as a filler at 0
  w[6, 3], w[7, 3] = 1.0, 1.0  # group 1: ties
  w[8:12, 4] = [0.0, 3.0, 0.0, -3.0]
  c = decode24.compress_24(jnp.asarray(w))
  values, meta = pack_ref(w, 32)
  np.testing.assert_array_equal(bits(c.values), bits(values))
  np.testing.assert_array_equal(np.asarray(c.meta), meta)
  code = lambda g, col: (int(c.meta[g, col % 16]) >> (4 * (col // 16))) & 15
  assert code(0, 0) == 0 | 1 << 2 and code(0, 1) == 0 | 3 << 2 and code(0, 5) == 0 | 1 << 2
  assert code(2, 4) == 1 | 3 << 2 and code(1, 3) == 2 | 3 << 2
  back = np.asarray(decode24.decompress_24(c))
  np.testing.assert_array_equal(bits(back), bits(w))
  assert np.signbit(back[0, 2])


@pytest.mark.parametrize("dtype", DTYPES)
def test_nbytes(dtype):
  k, n = 64, 128
  c = decode24.compress_24(jnp.zeros((k, n), dtype))
  want = k * n * jnp.dtype(dtype).itemsize // 2 + k * n // 8
  assert decode24.nbytes(c) == c.nbytes == want
  assert c.values.shape == (2, k // 4, n) and c.meta.shape == (k // 4, n // 2)


def test_compress_rejects_bad_inputs():
  ok = np.zeros((16, 64), np.float32)
  with pytest.raises(ValueError, match="2-D"):
    decode24.compress_24(jnp.zeros((4, 4, 4)))
  with pytest.raises(ValueError, match="multiple of 4"):
    decode24.compress_24(jnp.zeros((6, 64)))
  with pytest.raises(ValueError, match="divide N=64"):
    decode24.compress_24(jnp.asarray(ok), tile=48)
  with pytest.raises(ValueError, match="even"):
    decode24.compress_24(jnp.asarray(ok), tile=1)
  with pytest.raises(ValueError, match="default column tile"):
    decode24.compress_24(jnp.zeros((16, 20)))
  for dtype in (jnp.int32, jnp.float64 if jax.config.jax_enable_x64 else jnp.int8):
    with pytest.raises(ValueError, match="dtype"):
      decode24.compress_24(jnp.zeros((16, 64), dtype))
  bad = ok.copy()
  bad[4:7, 7] = 1.0  # group 1 of column 7: 3 nonzeros
  bad[0:4, 9] = 2.0  # group 0 of column 9: 4 nonzeros (first in (group, column) order)
  with pytest.raises(
    ValueError, match=r"group 0 \(rows 0..3\) of column 9 has 4 nonzeros; 2 group"
  ):
    decode24.compress_24(jnp.asarray(bad))


def test_compress_in_jit_needs_check_false():
  w = jnp.asarray(random_24(np.random.default_rng(1), 32, 64, np.float32))
  with pytest.raises(ValueError, match="check=False"):
    jax.jit(decode24.compress_24)(w)
  c = jax.jit(lambda w: decode24.compress_24(w, check=False))(w)
  eager = decode24.compress_24(w)
  np.testing.assert_array_equal(np.asarray(c.values), np.asarray(eager.values))
  np.testing.assert_array_equal(np.asarray(c.meta), np.asarray(eager.meta))


def test_pytree():
  c = decode24.compress_24(jnp.ones((8, 64), jnp.bfloat16).at[2:].set(0))
  leaves, tree = jax.tree_util.tree_flatten(c)
  assert len(leaves) == 2
  c2 = jax.tree_util.tree_unflatten(tree, leaves)
  assert c2.shape == (8, 64) and c2.tile == 64
  with pytest.raises(dataclasses.FrozenInstanceError):
    c.tile = 32


# ----------------------------------------------------------------------------
# The kernel (interpret mode).


def run_case(
  t,
  k,
  n,
  dtype,
  *,
  seed_salt=0,
  lead=None,
  tile=None,
  layout=None,
  ints=False,
  interpret=True,
  **tuning,
):
  rng, seed = testing.fresh_rng(seed_salt)
  w = random_24(rng, k, n, dtype, ints=ints)
  x_shape = (lead or ()) + (t,) + (k,)
  x = (rng.integers(-3, 4, x_shape) if ints else rng.standard_normal(x_shape)).astype(np.float32)
  x = jnp.asarray(x, dtype)
  c = decode24.compress_24(jnp.asarray(w), tile=tile, layout=layout)
  y = decode24.matmul_24(x, c, interpret=interpret, **tuning)
  assert y.dtype == dtype and y.shape == x.shape[:-1] + (n,)
  return x, w, y, f"seed={seed} T={t} K={k} N={n} {jnp.dtype(dtype)} {tuning}"


_FAST_T_DTYPE = [(1, jnp.bfloat16), (3, jnp.float16), (16, jnp.float32), (64, jnp.bfloat16)]
_T_DTYPE = [
  pytest.param(t, d, marks=() if (t, d) in _FAST_T_DTYPE else pytest.mark.slow)
  for t in (1, 3, 16, 64)
  for d in DTYPES
]


@pytest.mark.parametrize("t,dtype", _T_DTYPE)
def test_matmul_split_k_with_tail(t, dtype):
  """K = 1056: 264 groups, 8 whole chunks of 32 split over programs, then a tail of 8."""
  x, w, y, msg = run_case(t, 1056, 128, dtype, seed_salt=t)
  p = decode24.plan(t, 1056, 128, 128)
  assert p.splits > 1 and p.tail == 8, p
  assert_product(y, x, w, dtype, msg)


@pytest.mark.parametrize("dtype", DTYPES)
def test_matmul_256_tokens(dtype):
  """256 rows: several row tiles per column tile."""
  x, w, y, msg = run_case(256, 256, 64, dtype, seed_salt=256)
  assert decode24.plan(256, 256, 64, 64).grid[0] == 4
  assert_product(y, x, w, dtype, msg)


@pytest.mark.parametrize(
  "k,n,tile",
  [
    (64, 64, None),  # fewer groups than one chunk: the tail alone
    (160, 96, 32),  # one chunk and a tail, three column tiles
    (512, 256, 128),  # whole chunks only, split-K
    (256, 512, 256),  # wide tiles
    (4, 32, None),  # one group
  ],
)
def test_matmul_shapes(k, n, tile):
  x, w, y, msg = run_case(3, k, n, jnp.bfloat16, seed_salt=k + n, tile=tile)
  assert_product(y, x, w, jnp.bfloat16, msg)


@pytest.mark.parametrize("dtype", DTYPES)
def test_matmul_exact_on_integers(dtype):
  """Small integers: every product and partial sum is exact, so y equals the oracle."""
  x, w, y, msg = run_case(5, 288, 64, dtype, ints=True, seed_salt=5)
  ref = testing.as_np64(x) @ testing.as_np64(w)
  assert np.abs(ref).max() < 256  # exact in bf16 too
  np.testing.assert_array_equal(testing.as_np64(y), ref, err_msg=msg)


@pytest.mark.parametrize(
  "tuning",
  [
    {"splits": 1},
    {"splits": 2, "block_g": 16},
    {"block_t": 32},
    {"target_programs": 1},
  ],
  ids=testing.param_id,
)
def test_matmul_tuning_overrides(tuning):
  x, w, y, msg = run_case(40, 512, 128, jnp.bfloat16, ints=True, seed_salt=7, **tuning)
  np.testing.assert_array_equal(
    testing.as_np64(y), testing.as_np64(x) @ testing.as_np64(w), err_msg=msg
  )


def test_matmul_batch_dims_and_empty():
  x, w, y, msg = run_case(3, 128, 64, jnp.bfloat16, lead=(2,), seed_salt=11)
  assert y.shape == (2, 3, 64)
  assert_product(y.reshape(6, 64), x.reshape(6, 128), w, jnp.bfloat16, msg)
  c = decode24.compress_24(jnp.asarray(w))
  assert decode24.matmul_24(jnp.zeros((0, 128), jnp.bfloat16), c).shape == (0, 64)
  y1 = decode24.matmul_24(x[0, 0], c, interpret=True)  # a single row, no leading axis
  assert y1.shape == (64,)
  assert_product(y1[None], x[0, :1], w, jnp.bfloat16, msg)


def test_matmul_jit():
  rng, seed = testing.fresh_rng(13)
  w = random_24(rng, 160, 64, jnp.bfloat16)
  x = jnp.asarray(rng.standard_normal((7, 160)), jnp.bfloat16)
  c = decode24.compress_24(jnp.asarray(w))
  y = jax.jit(lambda x, c: decode24.matmul_24(x, c, interpret=True))(x, c)
  assert_product(y, x, w, jnp.bfloat16, f"seed={seed}")


def test_vmap_over_x_folds_rows_into_one_launch():
  rng, seed = testing.fresh_rng(17)
  w = random_24(rng, 128, 64, jnp.bfloat16)
  c = decode24.compress_24(jnp.asarray(w))
  x = jnp.asarray(rng.standard_normal((4, 2, 128)), jnp.bfloat16)
  f = jax.vmap(lambda x: decode24.matmul_24(x, c, interpret=True))
  y = f(x)
  assert y.shape == (4, 2, 64)
  assert_product(y.reshape(8, 64), x.reshape(8, 128), w, jnp.bfloat16, f"seed={seed}")
  calls = pallas_calls(jax.make_jaxpr(f)(x).jaxpr)
  assert len(calls) == 1 and calls[0].outvars[0].aval.shape == (8, 64)
  # Nested vmap folds both axes.
  g = jax.vmap(jax.vmap(lambda x: decode24.matmul_24(x, c, interpret=True)))
  y2 = g(x[:, :, None, :])
  assert y2.shape == (4, 2, 1, 64)
  np.testing.assert_array_equal(np.asarray(y2[:, :, 0]), np.asarray(y))


def test_vmap_over_weights():
  rng, seed = testing.fresh_rng(19)
  ws = [random_24(rng, 128, 64, jnp.float32) for _ in range(3)]
  cs = jax.tree_util.tree_map(
    lambda *a: jnp.stack(a), *[decode24.compress_24(jnp.asarray(w)) for w in ws]
  )
  assert cs.values.shape == (3, 2, 32, 64)
  x = jnp.asarray(rng.standard_normal((3, 2, 128)), jnp.float32)
  mm = lambda x, c: decode24.matmul_24(x, c, interpret=True)
  both = jax.vmap(mm)(x, cs)
  shared = jax.vmap(mm, in_axes=(None, 0))(x[0], cs)
  for i, w in enumerate(ws):
    assert_product(both[i], x[i], w, jnp.float32, f"seed={seed} both {i}")
    assert_product(shared[i], x[0], w, jnp.float32, f"seed={seed} shared {i}")
  with pytest.raises(ValueError, match="jax.vmap"):
    decode24.matmul_24(x[0], cs)
  with pytest.raises(ValueError, match="one weight"):
    decode24.decompress_24(cs)


def test_matmul_rejects_bad_inputs():
  w = jnp.zeros((64, 96), jnp.bfloat16)
  c = decode24.compress_24(w)
  with pytest.raises(ValueError, match="K=64"):
    decode24.matmul_24(jnp.zeros((2, 60), jnp.bfloat16), c)
  with pytest.raises(ValueError, match="K=64"):
    decode24.matmul_24(jnp.zeros((), jnp.bfloat16), c)
  with pytest.raises(ValueError, match="float32 but the weight is bfloat16"):
    decode24.matmul_24(jnp.zeros((2, 64), jnp.float32), c)
  with pytest.raises(ValueError, match="dtype"):
    decode24.matmul_24(jnp.zeros((2, 64), jnp.int32), c)
  with pytest.raises(ValueError, match="Compressed24"):
    decode24.matmul_24(jnp.zeros((2, 64), jnp.bfloat16), w)
  c6 = decode24.compress_24(jnp.zeros((64, 96), jnp.bfloat16), tile=6)
  with pytest.raises(ValueError, match="power of two >= 32"):
    decode24.matmul_24(jnp.zeros((2, 64), jnp.bfloat16), c6)
  for broken in (
    decode24.Compressed24(c.values[:, :8], c.meta, c.shape, c.tile),
    decode24.Compressed24(c.values, c.meta, c.shape, 64),  # 64 does not divide N=96
  ):
    with pytest.raises(ValueError, match="inconsistent"):
      decode24.matmul_24(jnp.zeros((2, 64), jnp.bfloat16), broken)
    with pytest.raises(ValueError, match="inconsistent"):
      decode24.decompress_24(broken)
  with pytest.raises(ValueError, match="block_g"):
    decode24.matmul_24(jnp.zeros((2, 64), jnp.bfloat16), c, block_g=24)
  with pytest.raises(ValueError, match="splits"):
    decode24.matmul_24(
      jnp.zeros((2, 256), jnp.bfloat16),
      decode24.compress_24(jnp.zeros((256, 96), jnp.bfloat16)),
      splits=3,
    )
  with pytest.raises(TypeError):
    decode24.matmul_24(jnp.zeros((2, 64), jnp.bfloat16), c, no_such_knob=1)


def test_plans():
  p = decode24.plan(1, 4096, 4096, 128)
  assert p.grid == (1, 32, 8) and p.chunks * p.splits * p.block_g == 1024 and p.tail == 0
  p = decode24.plan(1, 14336, 4096, 128)
  assert p.splits * p.chunks == 14336 // 4 // 32 and 3584 % (p.chunks * 32) == 0
  assert 200 <= p.grid[1] * p.grid[2] <= 400
  p = decode24.plan(256, 4096, 16384, 128)
  assert p.splits == 1 and p.grid == (4, 128, 1)  # enough programs without split-K
  p = decode24.plan(3, 1056, 128, 128)
  assert p.tail == 8 and p.padded_groups == (8 + 1) * 32
  p = decode24.plan(1, 64, 64, 64)
  assert p.chunks == 0 and p.tail == 16 and p.splits == 1


# ----------------------------------------------------------------------------
# Lowering for CUDA on any host, and the real kernel on a GPU.


@pytest.mark.parametrize(
  "t,k,n,dtype",
  [(1, 4096, 4096, jnp.bfloat16), (3, 1056, 96, jnp.float16), (256, 1024, 256, jnp.float32)],
)
def test_lowers_to_triton_for_cuda(t, k, n, dtype):
  """The Pallas kernel lowers to Triton IR (unsupported ops and shapes fail here)."""
  tile = 32 if n % 64 else 128
  shapes = (
    jax.ShapeDtypeStruct((t, k), dtype),
    jax.ShapeDtypeStruct((2, k // 4, n), dtype),
    jax.ShapeDtypeStruct((k // 4, n // 2), jnp.uint8),
  )

  def fn(x, v, m):
    return decode24.matmul_24(x, decode24.Compressed24(v, m, (k, n), tile), interpret=False)

  text = jax.jit(fn).trace(*shapes).lower(lowering_platforms=("cuda",)).as_text()
  assert "__gpu$xla.gpu.triton" in text


@pytest.mark.gpu
@pytest.mark.parametrize(
  "t,k,n",
  [(t, k, n) for k, n in [(4096, 4096), (1056, 384)] for t in (1, 2, 16, 100, 256)]
  + [(1, 14336, 4096), (256, 14336, 4096), (8, 4096, 14336)],
)
def test_gpu_matches_float64(t, k, n):
  rng, seed = testing.fresh_rng(t + k)
  w = random_24(rng, k, n, jnp.bfloat16)
  x = jnp.asarray(rng.standard_normal((t, k)), jnp.bfloat16)
  c = decode24.compress_24(jnp.asarray(w))
  y = decode24.matmul_24(x, c)
  assert_product(y, x, w, jnp.bfloat16, f"seed={seed} T={t} {k}x{n}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_dtypes_and_exact_integers(dtype):
  x, w, y, msg = run_case(7, 288, 256, dtype, ints=True, seed_salt=23, interpret=False)
  ref = testing.as_np64(x) @ testing.as_np64(w)
  assert np.abs(ref).max() < 256  # exact in bf16 too
  np.testing.assert_array_equal(testing.as_np64(y), ref, err_msg=msg)


# ----------------------------------------------------------------------------
# The "nk" layout and its Mosaic GPU kernel (jasp.kernels.decode24_mosaic).


def pack_nk_ref(w, tile):
  """``(values (2, N, G), meta (N, G/2))`` of the ``"nk"`` layout, entry by entry."""
  k, n = w.shape
  values = np.zeros((2, n, k // 4), w.dtype)
  meta = np.zeros((n, k // 8), np.uint8)
  for g in range(k // 4):
    for c in range(n):
      kept = kept_ref(w[4 * g : 4 * g + 4, c])
      values[:, c, g] = w[4 * g : 4 * g + 4, c][kept]
      byte, shift = nibble_ref(g, tile)  # chunks of groups, halves within a chunk
      meta[c, byte] |= (kept[0] | kept[1] << 2) << shift
  return values, meta


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("shape,tile", [((256, 64), None), ((512, 128), 64), ((1024, 64), None)])
def test_nk_compress_matches_numpy_packing(shape, tile, dtype):
  rng, seed = testing.fresh_rng(shape[0] + (tile or 0))
  w = random_24(rng, *shape, dtype)
  c = decode24.compress_24(jnp.asarray(w), layout="nk", tile=tile)
  want_tile = tile or (128 if (shape[0] // 4) % 128 == 0 else 64)
  msg = f"seed={seed} {shape} tile={want_tile}"
  assert (c.layout, c.tile, c.shape) == ("nk", want_tile, shape), msg
  values, meta = pack_nk_ref(w, want_tile)
  np.testing.assert_array_equal(bits(c.values), bits(values), err_msg=msg)
  np.testing.assert_array_equal(np.asarray(c.meta), meta, err_msg=msg)
  assert c.nbytes == values.nbytes + meta.nbytes
  back = decode24.decompress_24(c)
  np.testing.assert_array_equal(testing.as_np64(back), testing.as_np64(w), err_msg=msg)


def test_nk_rejects_what_it_cannot_take():
  w = jnp.zeros((256, 64), jnp.bfloat16)
  assert decode24.shape_ok(256, 64, jnp.bfloat16, "nk") == (True, "")
  for (k, n, dtype), why in {
    (256, 64, jnp.float32): "dtype float32",
    (128, 64, jnp.bfloat16): "K=128",
    (256, 96, jnp.bfloat16): "N=96",
  }.items():
    ok, msg = decode24.shape_ok(k, n, dtype, "nk")
    assert not ok and why in msg
    with pytest.raises(ValueError, match="no 'nk' layout"):
      decode24.compress_24(jnp.zeros((k, n), dtype), layout="nk")
  with pytest.raises(ValueError, match="'nk' tile must be one of"):
    decode24.compress_24(w, layout="nk", tile=32)
  with pytest.raises(ValueError, match="layout must be one of"):
    decode24.compress_24(w, layout="mn")
  c = decode24.compress_24(jnp.zeros((512, 64), jnp.bfloat16), layout="nk")
  with pytest.raises(ValueError, match="inconsistent Compressed24"):
    decode24.matmul_24(jnp.zeros((1, 512), jnp.bfloat16), dataclasses.replace(c, layout="kn"))
  with pytest.raises(ValueError, match="splits must divide"):
    decode24.matmul_24(jnp.zeros((1, 512), jnp.bfloat16), c, interpret=True, splits=3)
  # An "nk" weight of fp32 values (which the multiply would round to TF32) is refused
  # wherever it is read, not only by the kernel.
  c32 = dataclasses.replace(c, values=c.values.astype(jnp.float32))
  for read in (
    decode24.decompress_24,
    lambda c: decode24.plan_for(c, 1),
    lambda c: decode24.matmul_24(jnp.zeros((1, 512), jnp.float32), c, interpret=True),
  ):
    with pytest.raises(ValueError, match="'nk' Compressed24 holds bfloat16, float16 values"):
      read(c32)
  with pytest.raises(ValueError, match="layout must be one of"):
    decode24.decompress_24(dataclasses.replace(c, layout="mn"))
  with pytest.raises(ValueError, match="layout must be one of"):
    decode24.shape_ok(256, 64, jnp.bfloat16, "mn")


def test_plan_for_and_tile_for_follow_the_layout():
  """The plan of each layout comes from that layout's planner; the tile is compress_24's."""
  w = jnp.zeros((1024, 128), jnp.bfloat16)
  kn = decode24.compress_24(w, layout="kn")
  nk = decode24.compress_24(w, layout="nk")
  assert decode24.plan_for(kn, 5) == decode24.plan(5, 1024, 128, 128)
  assert decode24.plan_for(nk, 5) == decode24.decode24_mosaic.plan(5, 1024, 128, 128)
  assert decode24.plan_for(nk, 5, splits=1, stages=2).stages == 2
  assert decode24.plan_for(kn, 5, block_g=64).block_g == 64
  with pytest.raises(TypeError):
    decode24.plan_for(nk, 5, block_g=64)  # a "kn" knob
  assert (kn.tile, nk.tile) == (
    decode24.tile_for(1024, 128, jnp.bfloat16, "kn"),
    decode24.tile_for(1024, 128, jnp.bfloat16, "nk"),
  )
  assert decode24.tile_for(1024, 96, jnp.float32, "kn") == 32
  assert decode24.tile_for(1024, 128, jnp.bfloat16, "nk", 64) == 64
  with pytest.raises(ValueError, match="divide N=96"):
    decode24.tile_for(1024, 96, jnp.float32, "kn", 64)
  with pytest.raises(ValueError, match="no 'nk' layout"):
    decode24.tile_for(1024, 96, jnp.bfloat16, "nk")
  # A "kn" format of a tile the kernel cannot run decompresses, but has no plan.
  odd = decode24.compress_24(jnp.zeros((8, 6), jnp.float32), tile=2)
  assert decode24.decompress_24(odd).shape == (8, 6)
  with pytest.raises(ValueError, match="'kn' kernel does not take this weight: N=6"):
    decode24.plan_for(odd, 1)


@pytest.mark.parametrize(
  "t,k,n,tuning",
  [
    (1, 1024, 128, {}),  # split-K over the 2 chunks of 128 groups
    (3, 512, 64, {"splits": 1}),
    (16, 256, 64, {}),  # chunk of 64 groups
    (8, 1024, 64, {"accumulators": 4, "stages": 1}),
    (16, 1024, 256, {"block_n": 128}),  # two multiplies per program
    (5, 1024, 128, {"block_n": 128, "accumulators": 2, "splits": 1}),
    (16, 1024, 128, {"half_chunks": True}),  # pipeline steps of half a chunk
    (5, 1024, 128, {"half_chunks": True, "block_n": 128, "accumulators": 2, "splits": 1}),
    pytest.param(70, 512, 64, {}, marks=pytest.mark.slow),  # two token tiles (64 + 6)
  ],
)
def test_nk_matmul_interpret(t, k, n, tuning):
  x, w, y, msg = run_case(t, k, n, jnp.bfloat16, seed_salt=t + k, layout="nk", **tuning)
  assert_product(y, x, w, jnp.bfloat16, msg)


def _smem_bytes(p) -> int:
  """Shared memory of a plan, counted from scratch: the stages' x, values and codes, and
  the float32 output tile."""
  groups = p.tile // 2 if p.half_chunks else p.tile  # per pipeline step
  x = 4 * p.tokens * groups * 2
  values, codes = 2 * p.block_n * groups * 2, p.block_n * p.tile // 2
  return p.stages * (x + values + codes) + 4 * p.block_n * p.tokens


def test_nk_plans():
  plan = decode24.decode24_mosaic.plan
  p = plan(1, 8192, 8192, 128)
  assert (p.tokens, p.token_tiles, p.chunks, p.block_n) == (8, 1, 16, 64)
  assert p.chunks % p.splits == 0 and 128 * p.splits >= 132  # fills the GPU
  assert p.stages * p.stage_bytes <= 110 * 1024  # two programs per SM
  assert p.stages >= 2
  p = plan(100, 4096, 4096, 128)
  assert (p.tokens, p.token_tiles) == (64, 2)
  # 64 tokens: one stage of chunks of 128 groups fills half an SM, so two take the SM
  for t, k, n in ((64, 4096, 4096), (64, 8192, 8192), (64, 16384, 16384)):
    p = plan(t, k, n, 128)
    assert p.stages == 2 and 110 * 1024 < _smem_bytes(p) <= 227 * 1024, p
  # split-K: the largest divisor of the chunks within about two programs per SM
  splits = {
    (k, n): plan(16, k, n, 128).splits
    for k, n in ((4096, 4096), (8192, 8192), (16384, 16384), (4096, 14336), (14336, 4096))
  }
  assert splits == {
    (4096, 4096): 4,
    (8192, 8192): 2,
    (16384, 16384): 2,
    (4096, 14336): 2,
    (14336, 4096): 4,
  }
  assert decode24.decode24_mosaic.pick_splits(16, 3, at_most=True) == 2
  assert decode24.decode24_mosaic.pick_splits(16, 3) == 4  # nearest on a log scale
  for t, tile in ((1, 128), (16, 128), (16, 64), (32, 64)):  # two programs per SM
    p = plan(t, 8192, 8192, tile)
    assert p.stages >= 2 and _smem_bytes(p) <= 110 * 1024, p
  p = plan(64, 4096, 4096, 64)  # with its 16 KiB output tile, two stages take 116 KiB
  assert p.stages == 2 and _smem_bytes(p) <= 227 * 1024
  assert plan(64, 4096, 4096, 128, stages=9).stages < 9  # shared memory
  big = plan(16, 8192, 8192, 128, stages=3, splits=1)
  assert big.stages == 3 and 110 * 1024 < 3 * big.stage_bytes and _smem_bytes(big) <= 227 * 1024
  assert plan(1, 4096, 4096, 128, accumulators=8).accumulators == 8
  with pytest.raises(ValueError, match="accumulators must be"):
    plan(1, 4096, 4096, 128, accumulators=3)
  # two multiplies per program: half the programs, the output tile and values twice as tall
  wide = plan(16, 8192, 8192, 128, block_n=128)
  assert wide.block_n == 128 and wide.stage_bytes == (4 * 16 + 2 * 128) * 128 * 2 + 128 * 64
  assert 2 <= wide.stages and _smem_bytes(wide) <= 227 * 1024
  assert plan(64, 8192, 8192, 64, block_n=128).stages == 2  # x shared by both multiplies
  for bad in (96, 256):
    with pytest.raises(ValueError, match="block_n must be one of"):
      plan(1, 4096, 4096, 128, block_n=bad)
  with pytest.raises(ValueError, match="divide N=192"):
    plan(1, 4096, 192, 128, block_n=128)
  # half chunks: x's and the values' halves per step, the chunk's codes whole
  half = plan(64, 8192, 8192, 128, block_n=128, half_chunks=True)
  assert half.stage_bytes == (4 * 64 + 2 * 128) * 64 * 2 + 128 * 64
  assert half.steps == 2 * half.per_split and half.stages == 2
  assert 110 * 1024 < _smem_bytes(half) <= 220 * 1024
  assert plan(64, 8192, 8192, 128, block_n=128).stages == 1  # whole chunks: one stage fits


@pytest.mark.parametrize(
  "t,k,n,accumulators,block_n",
  [
    (16, 1024, 128, 1, 64),
    (16, 1280, 384, 1, 64),
    (16, 1024, 64, 4, 64),
    (1, 1024, 128, 2, 64),
    (100, 1280, 384, 1, 64),
    (64, 2048, 256, 2, 128),
    (1, 1280, 384, 1, 128),
    (64, 2048, 256, -1, 128),  # half chunks: the codes' nibble picked by the step
    (16, 1280, 384, -2, 64),
  ],
)  # chunks of 128 and of 64 groups; 8, 16 and 64 tokens a program, one or two token tiles;
# one or two multiplies per program; a negative accumulator count: -a with half chunks
def test_nk_lowers_to_mosaic_gpu_for_cuda(t, k, n, accumulators, block_n):
  c = decode24.compress_24(jnp.zeros((k, n), jnp.bfloat16), layout="nk")
  p = decode24.decode24_mosaic.plan(
    t, k, n, c.tile, accumulators=abs(accumulators), block_n=block_n, half_chunks=accumulators < 0
  )

  def fn(x, v, m):  # the kernel itself: matmul_24 refuses to compile it off Hopper
    return decode24.decode24_mosaic.run(x, v, m, p=p, interpret=False)

  shapes = (
    jax.ShapeDtypeStruct((t, k), jnp.bfloat16),
    jax.ShapeDtypeStruct(c.values.shape, c.values.dtype),
    jax.ShapeDtypeStruct(c.meta.shape, c.meta.dtype),
  )
  text = jax.jit(fn).trace(*shapes).lower(lowering_platforms=("cuda",)).as_text()
  assert "mosaic_gpu" in text


@pytest.mark.gpu
@pytest.mark.parametrize(
  "t,k,n",
  [(t, k, n) for k, n in [(4096, 4096), (1280, 384)] for t in (1, 2, 16, 100)]
  + [(1, 14336, 4096), (64, 4096, 14336), (256, 11008, 4096)],
)
def test_gpu_nk_matches_float64(t, k, n):
  if not decode24.native("nk"):
    pytest.skip("the 'nk' kernel needs Pallas Mosaic GPU on compute capability 9.0+")
  rng, seed = testing.fresh_rng(t + k + 1)
  w = random_24(rng, k, n, jnp.bfloat16)
  x = jnp.asarray(rng.standard_normal((t, k)), jnp.bfloat16)
  c = decode24.compress_24(jnp.asarray(w), layout="nk")
  y = jax.jit(decode24.matmul_24)(x, c)
  assert_product(y, x, w, jnp.bfloat16, f"seed={seed} T={t} {k}x{n}")
  xi = jnp.asarray(rng.integers(-3, 4, (t, k)), jnp.float16)
  wi = jnp.asarray(random_24(rng, k, n, jnp.float16, ints=True))
  yi = decode24.matmul_24(xi, decode24.compress_24(wi, layout="nk"))
  assert_product(yi, xi, wi, jnp.float16, f"fp16 ints seed={seed} T={t} {k}x{n}")
  if n % 128 == 0:  # two multiplies per program
    y2 = decode24.matmul_24(x, c, block_n=128)
    assert_product(y2, x, w, jnp.bfloat16, f"block_n=128 seed={seed} T={t} {k}x{n}")
    y3 = decode24.matmul_24(x, c, block_n=128, half_chunks=True)
    assert_product(y3, x, w, jnp.bfloat16, f"half chunks seed={seed} T={t} {k}x{n}")


def test_default_layout_is_nk_where_the_mosaic_kernel_compiles_and_fits(monkeypatch):
  assert decode24.default_layout(4096, 4096, jnp.bfloat16) == (
    "nk" if decode24.decode24_mosaic.native() else "kn"
  )
  monkeypatch.setattr(decode24.decode24_mosaic, "native", lambda: True)
  assert decode24.default_layout(4096, 4096, jnp.bfloat16) == "nk"
  assert decode24.default_layout(4096, 4096, jnp.float32) == "kn"  # would be TF32
  assert decode24.default_layout(1056, 128, jnp.bfloat16) == "kn"  # K not a multiple of 256
  monkeypatch.setattr(decode24.decode24_mosaic, "native", lambda: False)
  assert decode24.default_layout(4096, 4096, jnp.bfloat16) == "kn"


def test_nk_vmap_over_x_folds_rows_into_one_launch(monkeypatch):
  rng, seed = testing.fresh_rng(29)
  w = random_24(rng, 256, 64, jnp.bfloat16)
  c = decode24.compress_24(jnp.asarray(w), layout="nk")
  x = jnp.asarray(rng.standard_normal((3, 2, 256)), jnp.bfloat16)
  launches = []
  real = decode24.decode24_mosaic.run
  monkeypatch.setattr(
    decode24.decode24_mosaic, "run", lambda *a, p, **k: launches.append(p.t) or real(*a, p=p, **k)
  )
  y = jax.vmap(lambda x: decode24.matmul_24(x, c, interpret=True))(x)
  # custom_vmap traces the unbatched body once (2 rows); the launch made is of all 6 rows.
  assert y.shape == (3, 2, 64) and launches[-1] == 6 and set(launches) <= {2, 6}
  assert_product(y.reshape(6, 64), x.reshape(6, 256), w, jnp.bfloat16, f"seed={seed}")


def decode_any_ref(values, meta, tile, layout):
  """The dense weight of a format holding any codes (``p0 >= p1`` too), entry by entry:
  position 0 reads slot 0 only, position 3 slot 1 only, slot 0 wins at 1 and 2."""
  if layout == "nk":
    values = values.transpose(0, 2, 1)
  _, groups, n = values.shape
  w = np.zeros((4 * groups, n), values.dtype)
  for g in range(groups):
    for c in range(n):
      row, i = (g, c) if layout == "kn" else (c, g)
      byte, shift = nibble_ref(i, tile)
      code = (int(meta[row, byte]) >> shift) & 15
      p0, p1 = code & 3, code >> 2
      for j in range(4):
        if j == p0 and j != 3:
          w[4 * g + j, c] = values[0, g, c]
        elif j == p1 and j != 0:
          w[4 * g + j, c] = values[1, g, c]
  return w


@pytest.mark.parametrize(
  "layout,dtype", [("kn", jnp.bfloat16), ("kn", jnp.float32), ("nk", jnp.bfloat16)]
)
def test_any_code_decodes_alike_in_decompress_and_the_kernel(layout, dtype):
  """Codes compress_24 never writes (p0 >= p1) still give one weight, in both readers."""
  rng, seed = testing.fresh_rng(31)
  k, n, tile = 256, 64, 64
  dims = (k // 4, n) if layout == "kn" else (n, k // 4)
  values = jnp.asarray(rng.standard_normal((2, *dims)), dtype)
  meta = rng.integers(0, 256, (dims[0], dims[1] // 2), dtype=np.uint8)
  c = decode24.Compressed24(values, jnp.asarray(meta), (k, n), tile, layout)
  w = decode_any_ref(np.asarray(values), meta, tile, layout)
  assert {int(b) & 15 for b in meta.ravel()} == set(range(16))  # every code occurs
  np.testing.assert_array_equal(bits(decode24.decompress_24(c)), bits(w), err_msg=f"seed={seed}")
  x = jnp.asarray(rng.standard_normal((3, k)), dtype)
  y = decode24.matmul_24(x, c, interpret=True)
  assert_product(y, x, w, dtype, f"seed={seed} {layout}")
