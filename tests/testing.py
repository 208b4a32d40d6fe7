"""Helpers shared by the tests: seeds, random weights, 2:4 weights, errors, tree views.

The float64 oracles the tests compare against live in ``reference.py``, which
imports nothing from jasp; these helpers may use jasp (``nm_weight`` prunes with
``jasp.nm_mask``) and are never the oracle of the function under test.

Seeds: every random draw that is not tied to a specific value starts from
:func:`seed`, fixed by default so that a failure reproduces. ``JASP_TEST_SEED=<int>``
picks another one and ``JASP_TEST_SEED=random`` a fresh one per run; pytest
prints the seed in its header and under every failure (``conftest.py``).
"""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

SEED_ENV = "JASP_TEST_SEED"
DEFAULT_SEED = 0

_seed: int | None = None


def _parse_seed(value: str | None) -> int:
  if value is None or value.strip() == "":
    return DEFAULT_SEED
  if value.strip().lower() == "random":
    return int.from_bytes(os.urandom(4), "little")
  try:
    return int(value)
  except ValueError:
    raise ValueError(f"{SEED_ENV}={value!r}: expected an integer or 'random'") from None


def seed() -> int:
  """The run's seed: ``JASP_TEST_SEED`` (an int, or ``random``), else 0; one value per process."""
  global _seed
  if _seed is None:
    _seed = _parse_seed(os.environ.get(SEED_ENV))
    # Subprocesses the tests start (and a second call here) see the same value.
    os.environ[SEED_ENV] = str(_seed)
  return _seed


def fresh_rng(salt: int = 0) -> tuple[np.random.Generator, int]:
  """``(rng, seed)``: a NumPy generator from the run's seed, and that seed for messages."""
  s = seed()
  return np.random.default_rng([s, salt]), s


def normal(shape, seed: int = 0, dtype=jnp.float32) -> jax.Array:
  """Standard normal draws (NumPy's generator, so identical on every backend), as ``dtype``."""
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def normals(*shapes, seed: int = 0, dtype=jnp.float32) -> list[jax.Array]:
  """One :func:`normal` array per shape, from one generator."""
  rng = np.random.default_rng(seed)
  return [jnp.asarray(rng.standard_normal(s), dtype) for s in shapes]


def nm_along(shape, axis, seed: int = 0) -> np.ndarray:
  """A float32 NumPy array, 2:4 along ``axis`` (an int or a run of axes): normal draws, masked."""
  import jasp

  a = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
  return a * np.asarray(jasp.nm_mask(a, 2, 4, axis=axis))


def nm_weight(k: int = 64, n: int = 32, dtype=jnp.bfloat16, seed: int = 0) -> jax.Array:
  """A ``(k, n)`` weight, 2:4 along ``k`` (a matmul's reduction axis), as ``dtype``."""
  import jasp

  w = jax.random.normal(jax.random.key(seed), (k, n), jnp.float32)
  return jnp.where(jasp.nm_mask(w, 2, 4, 0), w, 0).astype(dtype)


def special_values(dtype, subnormals: bool) -> np.ndarray:
  """NaN, +-inf, +-0, the largest and smallest normal of ``dtype`` (and subnormals), as float64."""
  info = jnp.finfo(dtype)
  vals = [np.nan, np.inf, -np.inf, -0.0, 0.0, float(info.max), 1.0, -1.0, float(info.tiny)]
  if subnormals:
    tiny = float(info.smallest_subnormal)
    vals += [tiny, 2 * tiny, -tiny, 3 * tiny]
  return np.asarray(vals, np.float64)


def as_np64(x) -> np.ndarray:
  """Any array (bf16 and fp16 included) as float64 NumPy, through float32."""
  return np.asarray(jnp.asarray(x).astype(jnp.float32), np.float64)


def rel_err(got, want) -> float:
  """``max |got - want| / max |want|`` over all leaves of two pytrees of arrays (float64)."""
  a = [np.asarray(x, np.float64) for x in jax.tree_util.tree_leaves(got)]
  b = [np.asarray(x, np.float64) for x in jax.tree_util.tree_leaves(want)]
  assert len(a) == len(b), f"{len(a)} outputs vs {len(b)}"
  diff = max(float(np.max(np.abs(x - r))) for x, r in zip(a, b))
  scale = max(float(np.max(np.abs(r))) for r in b)
  return diff / max(scale, 1e-30)


def same_bits(a, b) -> bool:
  """Same shape, dtype and bytes."""
  a, b = np.asarray(a), np.asarray(b)
  return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


def _key(k) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def leaves(tree, keep_none: bool = False) -> dict:
  """``{path: leaf}``: keys joined by '/', an nnx Variable's trailing 'value' dropped.

  Written with ``jax.tree_util`` only (not ``jasp._tree``), so tests can check
  jasp's own path handling against it.
  """
  flat, _ = jax.tree_util.tree_flatten_with_path(
    tree, is_leaf=(lambda x: x is None) if keep_none else None
  )
  out = {}
  for path, x in flat:
    keys = [_key(k) for k in path]
    if keys and keys[-1] == "value":
      keys = keys[:-1]
    out["/".join(keys)] = x
  return out


def kernels_of(tree) -> dict:
  """``{path: leaf}`` for the leaves whose path ends with ``kernel``."""
  return {p: x for p, x in leaves(tree).items() if p.endswith("kernel")}


def assert_masked(params, masks) -> None:
  """Every entry a mask drops is exactly 0 in ``params`` (trees matched by path)."""
  mk = leaves(masks, keep_none=True)
  for p, w in leaves(params).items():
    if mk.get(p) is not None:
      assert (np.asarray(w)[~np.asarray(mk[p])] == 0).all(), p


def param_id(value):
  """A readable ``ids=`` for ``pytest.mark.parametrize``: ``(16, 8)`` -> ``16x8``, dicts as ``k=v``.

  Other values keep pytest's own id (``None`` lets pytest choose).
  """
  if isinstance(value, tuple) and value and all(isinstance(x, int) for x in value):
    return "x".join(str(x) for x in value)
  if isinstance(value, dict):
    return ",".join(f"{k}={param_id(v) or v}" for k, v in value.items())
  return None


def nnx_token_steps(model, tx, tokens, labels, steps: int):
  """Trains an nnx token model with ``tx`` through ``nnx.Optimizer`` (cross-entropy).

  Returns:
    ``(first, last, optimizer)``: the losses of the first and of the last of
    ``steps + 1`` jitted steps, and the ``nnx.Optimizer`` (its ``opt_state``).
  """
  import optax
  from flax import nnx

  opt = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit
  def step(model, opt):
    def loss(m):
      return optax.softmax_cross_entropy_with_integer_labels(m(tokens), labels).mean()

    value, grads = nnx.value_and_grad(loss)(model)
    opt.update(model, grads)
    return value

  first = last = step(model, opt)
  for _ in range(steps):
    last = step(model, opt)
  return float(first), float(last), opt


def run_on_cpu_devices(code: str, devices: int, timeout: int = 300) -> subprocess.CompletedProcess:
  """Runs ``python -c code`` from the repository root on ``devices`` simulated CPU devices.

  The multi-device tests run this way: XLA fixes the device count at start-up,
  so it cannot change inside the test process. The repository root is on
  ``PYTHONPATH`` and is the working directory.
  """
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(
    os.environ,
    XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
    JAX_PLATFORMS="cpu",
    PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""),
  )
  return subprocess.run(
    [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout, cwd=root
  )


def lowers_for_cuda(fn, *args) -> None:
  """Lower jitted ``fn`` on ``args`` (arrays or ``ShapeDtypeStruct``) for CUDA, on any host.

  A Pallas Mosaic GPU kernel is lowered to Mosaic's IR (its layouts, loads
  and stores checked) when it is lowered for CUDA, which needs no GPU; the
  PTX is built later, on the GPU. Raises what the lowering raises.
  """
  specs = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in args]
  jax.export.export(jax.jit(fn), platforms=["cuda"])(*specs)
