"""jasp.sharding: the group-straddling rule, and the multi-device suite on 8 CPU devices."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from jasp import sharding


def test_shard_run():
  assert sharding.shard_run((64, 8), (64, 8), (0,)) is None
  assert sharding.shard_run((64, 8), (16, 8), (0,)) == 16
  assert sharding.shard_run((64, 8), (64, 2), (0,)) is None
  assert sharding.shard_run((8, 16, 4), (2, 16, 4), (0, 1)) == 32
  assert sharding.shard_run((8, 16, 4), (8, 6, 4), (0, 1)) == 6


def test_unsharded_and_traced_are_fine():
  sharding.check_groups_unsplit(jnp.ones((6, 4)), (0,), 4)
  jax.jit(lambda x: sharding.check_groups_unsplit(x, (0,), 4) or x)(jnp.ones((6, 4)))


@pytest.mark.skipif(os.environ.get("JASP_IN_SUBPROCESS") == "1", reason="already in the subprocess")
@pytest.mark.slow
def test_multidevice_suite_on_8_cpu_devices():
  env = dict(
    os.environ,
    XLA_FLAGS="--xla_force_host_platform_device_count=8",
    JAX_PLATFORMS="cpu",
    JASP_IN_SUBPROCESS="1",
  )
  here = os.path.dirname(__file__)
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "pytest",
      "-q",
      "-p",
      "no:cacheprovider",
      os.path.join(here, "multidevice_sharding.py"),
    ],
    env=env,
    capture_output=True,
    text=True,
    timeout=900,
    cwd=os.path.dirname(here),
  )
  assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
  assert " passed" in proc.stdout and "skipped" not in proc.stdout.splitlines()[-1], proc.stdout[
    -2000:
  ]
