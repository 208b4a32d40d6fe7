"""The public API: deprecated aliases warn and still work, argument conventions hold."""

from __future__ import annotations

import importlib
import inspect
import warnings

import jax.numpy as jnp
import numpy as np
import pytest

import jasp

PACKAGES = ["jasp", "jasp.calibration", "jasp.export", "jasp.permutation", "jasp.sparse"]
MODULES = ["jasp.masks", "jasp.packing", "jasp.policy", "jasp.pruning", "jasp.report"]


def _public_callables():
  for name in PACKAGES + MODULES:
    mod = importlib.import_module(name)
    for attr in mod.__all__:
      obj = getattr(mod, attr)
      if inspect.isfunction(obj):
        yield f"{name}.{attr}", obj


@pytest.mark.parametrize(
  "old, new",
  [
    ("nm_prune_array", "jasp.masks.nm_prune"),
    ("pack", "jasp.packing.pack"),
    ("unpack", "jasp.packing.unpack"),
    ("plan", "jasp.policy.plan"),
  ],
)
def test_deprecated_top_level_names_warn(old, new):
  assert old not in jasp.__all__
  with pytest.warns(DeprecationWarning, match=new.replace(".", r"\.")) as rec:
    obj = getattr(jasp, old)
  assert rec[0].filename == __file__  # the warning points at the caller
  mod, _, attr = new.rpartition(".")
  assert obj is getattr(importlib.import_module(mod), attr)


def test_deprecated_masks_nm_prune_array_warns_when_called():
  w = jnp.arange(8.0).reshape(4, 2)
  with pytest.warns(DeprecationWarning, match=r"jasp\.masks\.nm_prune\b") as rec:
    got = jasp.masks.nm_prune_array(w, 2, 4, 0, with_mask=False)
  assert rec[0].filename == __file__
  np.testing.assert_array_equal(got, jasp.masks.nm_prune(w, with_mask=False))


def test_sparse_policy_module_is_now_autotune():
  from jasp.sparse import autotune

  with pytest.warns(DeprecationWarning, match=r"jasp\.sparse\.autotune"):
    from jasp.sparse import policy
  assert policy is autotune
  assert jasp.sparse.MatmulPolicy is autotune.MatmulPolicy
  assert jasp.sparse.matmul is autotune.matmul


def test_new_names_do_not_warn():
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    w = jnp.asarray(np.random.default_rng(0).standard_normal((8, 4)), jnp.float32)
    pruned, mask = jasp.masks.nm_prune(w, 2, 4, axis=0)
    np.testing.assert_array_equal(mask, jasp.masks.nm_mask(w, 2, 4, axis=0))
    np.testing.assert_array_equal(jasp.nm_prune(w, with_mask=False), pruned)
    jasp.packing.unpack(jasp.packing.pack(mask))
    jasp.policy.plan({"kernel": w})


def test_prune_shows_its_arguments():
  params = inspect.signature(jasp.prune).parameters
  assert not any(p.kind is p.VAR_KEYWORD for p in params.values())
  compute = inspect.signature(jasp.compute_masks).parameters
  assert list(params) == list(compute)
  for name in params:
    assert params[name].default == compute[name].default, name
  with pytest.raises(TypeError, match="unexpected keyword"):
    jasp.prune({"kernel": jnp.ones((8, 4))}, layout=None)


#: ``n=None, m=None``: read from the file's metadata, else 2:4.
FROM_METADATA = {"jasp.export.check_file", "jasp.export.check_onnx"}


def test_n_m_convention():
  """Every public function taking n and m: ``n: int = 2, m: int = 4``, n first, keyword-able."""
  checked = 0
  for name, fn in _public_callables():
    params = inspect.signature(fn).parameters
    if "n" not in params or "m" not in params:
      continue
    names = list(params)
    assert names.index("n") < names.index("m"), name
    for arg, default in (("n", 2), ("m", 4)):
      p = params[arg]
      if name in FROM_METADATA:
        default = None
      assert p.default == default, f"{name}: {arg} defaults to {p.default}"
      assert p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY), f"{name}: {arg} is {p.kind}"
    checked += 1
  assert checked >= 10


def test_tree_argument_is_named_params():
  """Functions taking the tree that is pruned name it ``params`` (see the jasp docstring)."""
  for fn in (
    jasp.prune,
    jasp.compute_masks,
    jasp.apply_masks,
    jasp.sparsity_report,
    jasp.count_unmasked,
    jasp.assert_masked,
    jasp.policy.plan,
    jasp.wanda_prune,
    jasp.sparsegpt_prune,
    jasp.trace_layouts,
    jasp.trace_channels,
    jasp.permute,
    jasp.calibration.collect_stats,
  ):
    assert "params" in inspect.signature(fn).parameters, fn.__name__
