"""benchmarks/hessian_bench.py: its three Hessians are X^T X (float64 oracle in the test)."""

import os
import sys

import jax
import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import hessian_bench as hb  # noqa: E402


@pytest.mark.parametrize("variant", ["f32_highest", "bf16_tc", "bf16_tc_chunks"])
def test_each_variant_is_xtx(variant):
  x = hb.activations(jax.random.key(0), 512, 64)
  xd = np.asarray(x, np.float64)
  fn = {
    "f32_highest": hb.f32_highest,
    "bf16_tc": hb.bf16_tc,
    "bf16_tc_chunks": lambda v: hb.bf16_tc_chunks(v, 128),
  }[variant]
  h = np.asarray(jax.jit(fn)(x), np.float64)
  want = xd.T @ xd
  assert h.shape == (64, 64)
  np.testing.assert_allclose(h, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
