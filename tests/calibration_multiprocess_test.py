"""Calibration over several JAX processes (multi-controller), as on several hosts.

Two processes on this machine, two simulated CPU devices each, joined by
``jax.distributed`` with Gloo collectives: each process holds half of every
calibration batch (``jax.make_array_from_process_local_data``), and both run the
same ``wanda_prune`` / ``sparsegpt_prune`` call. The oracle is the same pruning
on one device in this process: Wanda's masks equal it; SparseGPT's equal it for
the first stage and agree closely after it (float sums in another order).
"""

import os
import socket
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

import jasp

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import llm_oneshot as lo  # noqa: E402

_WORKER = textwrap.dedent("""
    import sys
    pid, port, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=pid)
    sys.path.insert(0, "benchmarks")
    import numpy as np
    from jax.experimental import multihost_utils
    from jax.sharding import NamedSharding, PartitionSpec as P
    import jasp, llm_oneshot as lo
    assert jax.process_count() == 2 and jax.device_count() == 4
    cfg = lo.PRESETS["tiny"]
    params = lo.init_params(jax.random.key(0), cfg["layers"], cfg["dim"], cfg["hidden"],
                            cfg["heads"], 2, cfg["vocab"])
    mesh = jax.make_mesh((4,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    sh = NamedSharding(mesh, P("data"))
    batches = [
      jax.make_array_from_process_local_data(
        sh, np.asarray(lo.bigram_tokens(s, 4, cfg["seq"], cfg["vocab"]))[2 * pid : 2 * pid + 2])
      for s in range(2)
    ]
    params = jax.device_put(params, NamedSharding(mesh, P()))
    found = {}
    for prune in (jasp.wanda_prune, jasp.sparsegpt_prune):
      _, masks = prune(lo.hidden_states, params, batches, sequential=True, progress=False)
      for k, v in masks["blocks"].items():
        if v is not None:
          found[prune.__name__ + "/" + k] = np.asarray(multihost_utils.process_allgather(v, tiled=True))
    if pid == 0:
      np.savez(out, **found)
    print("ok", pid)
""")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_prune_like_one_device(tmp_path):
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(
    os.environ,
    XLA_FLAGS="--xla_force_host_platform_device_count=2",
    JAX_PLATFORMS="cpu",
    PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""),
  )
  out, port = str(tmp_path / "masks.npz"), str(_free_port())
  procs = [
    subprocess.Popen(
      [sys.executable, "-c", _WORKER, str(pid), port, out],
      env=env,
      cwd=root,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for pid in range(2)
  ]
  logs = [p.communicate(timeout=600) for p in procs]
  for p, (so, se) in zip(procs, logs):
    assert p.returncode == 0 and "ok" in so, se[-3000:]
  got = np.load(out)
  cfg = lo.PRESETS["tiny"]
  params = lo.init_params(
    jax.random.key(0), cfg["layers"], cfg["dim"], cfg["hidden"], cfg["heads"], 2, cfg["vocab"]
  )
  batches = [lo.bigram_tokens(s, 4, cfg["seq"], cfg["vocab"]) for s in range(2)]
  for prune in (jasp.wanda_prune, jasp.sparsegpt_prune):
    _, masks = prune(lo.hidden_states, params, batches, sequential=True, progress=False)
    for k, want in masks["blocks"].items():
      if want is None:
        continue
      have, want = got[prune.__name__ + "/" + k], np.asarray(want)
      assert have.shape == want.shape, k
      if prune is jasp.wanda_prune:  # sums of squares: the same masks
        np.testing.assert_array_equal(have, want, err_msg=k)
        continue
      # SparseGPT: the first stage (q, k, v of block 0: the same inputs) gives the same masks;
      # after it the sharded float sums run in another order and near-ties can flip
      # (docs/design/calibration-across-devices.md): block 0 agrees to 99.9%.
      if k in ("q", "k", "v"):
        np.testing.assert_array_equal(have[0], want[0], err_msg=k)
      assert np.mean(have[0] == want[0]) >= 0.999, k
      # A wrong layout or a lost batch shard changes about half of a mask's entries.
      assert np.mean(have == want) >= 0.9, k
