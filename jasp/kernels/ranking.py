"""The rank rule every N:M kernel applies, written once for all backends.

The key of an entry is the bit pattern of ``|w|`` read as an integer, with NaN
clamped to the bit pattern of +inf: for non-negative floats the integer order
*is* the float order, so the comparison is exact (denormals included) and
matches :func:`jasp.masks.magnitude` (XLA on CPU flushes subnormals to zero in
comparisons; the kernels, like the float64 reference, do not). Entry ``i`` of a
group is kept when fewer than ``n`` members beat it (larger key, or equal key
at a lower index): the rule of :func:`jasp.masks.topn_mask`, so every kernel's
mask is identical to XLA's bit for bit.

Only element-wise operations on same-shaped arrays are used, so the functions
trace the same way inside a Pallas Triton or a Pallas Mosaic GPU kernel.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

__all__ = [
  "KEY_BITS",
  "MAX_M",
  "SUPPORTED_DTYPES",
  "keep_top_n",
  "magnitude_f32",
  "rank_keys",
  "supports",
]

#: Weight dtypes the kernels accept. Others (fp64, integers) use the XLA path.
SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))

#: Largest group size the kernels accept (m*(m-1)/2 comparisons per group).
MAX_M = 8

#: dtype -> (integer dtype of the same width, ``|x|`` bit mask, +inf bit pattern).
KEY_BITS = {
  jnp.dtype(jnp.float32): (jnp.int32, 0x7FFFFFFF, 0x7F800000),
  jnp.dtype(jnp.bfloat16): (jnp.int16, 0x7FFF, 0x7F80),
  jnp.dtype(jnp.float16): (jnp.int16, 0x7FFF, 0x7C00),
}


def supports(dtype, n: int, m: int) -> bool:
  """Whether the kernels handle weights of ``dtype`` with ``n:m`` groups."""
  try:
    dt = jnp.dtype(dtype)
  except TypeError:
    return False
  return dt in SUPPORTED_DTYPES and 2 <= m <= MAX_M and 1 <= n < m


def rank_keys(x: jax.Array) -> jax.Array:
  """Exact integer sort key of ``|x|``, NaN ranked as +inf.

  Args:
    x: float32, bfloat16 or float16 array, any shape.

  Returns:
    int32 (float32 input) or int16 array of ``x``'s shape; the keys of two
    entries compare as their magnitudes do.
  """
  itype, abs_bits, inf_bits = KEY_BITS[jnp.dtype(x.dtype)]
  b = lax.bitcast_convert_type(x, itype) & itype(abs_bits)
  return jnp.minimum(b, itype(inf_bits))


def magnitude_f32(x: jax.Array) -> jax.Array:
  """``|x|`` with NaN as +inf, as float32 (exact for bf16, fp16 and fp32).

  The magnitudes the transposable kernels score blocks with.
  """
  return lax.bitcast_convert_type(rank_keys(x), x.dtype).astype(jnp.float32)


def keep_top_n(keys: list[jax.Array], n: int) -> list[jax.Array]:
  """Which members of each group are kept, from the members' keys.

  Args:
    keys: ``m`` same-shaped integer arrays; ``keys[i]`` holds member ``i`` of
      every group.
    n: members kept per group, ``1 <= n < m``.

  Returns:
    ``m`` bool arrays: member ``i`` is kept when fewer than ``n`` members beat
    it (larger key, or an equal key at a lower index). Exactly ``n`` per group.

  The ``m * (m - 1) / 2`` comparisons are shared; the count "fewer than ``n``
  of the other ``m - 1`` beat it" is evaluated as bool logic where that is
  shorter (``n = 1``: none; ``n = m - 1``: not all; 2:4: not a majority of
  three), and as a sum otherwise.
  """
  m = len(keys)
  j_wins = {(i, j): keys[j] > keys[i] for i in range(m) for j in range(i + 1, m)}

  def beaten_by(i: int) -> list[jax.Array]:
    return [
      j_wins[(i, j)] if i < j else jnp.logical_not(j_wins[(j, i)]) for j in range(m) if j != i
    ]

  keeps = []
  for i in range(m):
    b = beaten_by(i)
    if n == 1:
      keeps.append(jnp.logical_not(functools.reduce(jnp.logical_or, b)))
    elif n == m - 1:
      keeps.append(jnp.logical_not(functools.reduce(jnp.logical_and, b)))
    elif (m, n) == (4, 2):
      majority = (b[0] & b[1]) | (b[2] & (b[0] | b[1]))
      keeps.append(jnp.logical_not(majority))
    else:
      count = functools.reduce(jnp.add, [x.astype(jnp.int32) for x in b])
      keeps.append(count < n)
  return keeps
