"""jasp.policy: which leaves are pruned and why, on real flax models."""

import dataclasses

import jax.numpy as jnp
import models
import pytest

import jasp


def _plan(**kw):
  model, variables, x = models.linen_cnn()
  lay = jasp.trace_layouts(model.apply, variables, x)
  return jasp.plan(variables, 4, layouts=lay, policy=jasp.Policy(**kw))


def test_default_prunes_weights_with_divisible_inputs():
  d = _plan()
  assert not d["params/Conv_0/kernel"].prune  # in=1
  assert "not a multiple of m=4" in d["params/Conv_0/kernel"].reason
  for p in ("params/Conv_1/kernel", "params/Conv_2/kernel", "params/Dense_0/kernel",
            "params/Dense_1/kernel"):
    assert d[p].prune and d[p].source == "trace", p
  assert not d["params/Dense_0/bias"].prune
  assert not d["batch_stats/BatchNorm_0/var"].prune


def test_include_exclude():
  d = _plan(include=[r"Dense"])
  assert d["params/Dense_0/kernel"].prune and not d["params/Conv_1/kernel"].prune
  assert d["params/Conv_1/kernel"].reason == "not matched by policy.include"
  d = _plan(exclude=[r"Dense_1"])
  assert not d["params/Dense_1/kernel"].prune and d["params/Dense_0/kernel"].prune


def test_tensor_core_rule():
  d = _plan(tensor_core_sizes=True)
  # Dense_1: (64, 10): out=10 is not a multiple of 8 -> kept dense with the reason.
  assert not d["params/Dense_1/kernel"].prune and "tensor-core" in d["params/Dense_1/kernel"].reason
  assert d["params/Dense_0/kernel"].prune  # (512, 64)
  assert d["params/Dense_0/kernel"].tensor_core_ok
  # Without the rule the verdict is still reported.
  assert _plan()["params/Dense_1/kernel"].tensor_core_ok is False


def test_axis_override_and_rule():
  d = _plan(axes={r"Dense_0/kernel": 1})
  assert d["params/Dense_0/kernel"].axis == (1,) and d["params/Dense_0/kernel"].source == "override"
  d = _plan(rule=lambda path, leaf, dec: False if "Conv_2" in path else True)
  assert not d["params/Conv_2/kernel"].prune and d["params/Conv_1/kernel"].prune
  d = _plan(rule=lambda path, leaf, dec: dataclasses.replace(dec, prune=False, reason="mine")
            if path.endswith("Dense_1/kernel") else dec)
  assert d["params/Dense_1/kernel"].reason == "mine"
  with pytest.raises(ValueError, match="not a multiple"):
    _plan(rule=lambda path, leaf, dec: 1 if path.endswith("Dense_1/kernel") else dec)


def test_bad_override_names_path():
  with pytest.raises(ValueError, match="Dense_0/kernel"):
    _plan(axes={r"Dense_0/kernel": 5})


def test_integer_leaves_stay_dense():
  d = jasp.plan({"kernel": jnp.ones((8, 8), jnp.int32)}, 4)
  assert not d["kernel"].prune
