"""jasp.policy: which leaves are pruned and why, on real flax models."""

import dataclasses
import re
import warnings

import jax.numpy as jnp
import pytest
from zoo import basic

import jasp
from jasp import sparse


def _plan(**kw):
  model, variables, x = basic.digits_cnn()
  lay = jasp.trace_layouts(model.apply, variables, x)
  return jasp.policy.plan(variables, 4, layouts=lay, policy=jasp.Policy(**kw))


def test_default_prunes_weights_with_divisible_inputs():
  d = _plan()
  assert not d["params/Conv_0/kernel"].prune  # in=1
  assert "not a multiple of m=4" in d["params/Conv_0/kernel"].reason
  for p in (
    "params/Conv_1/kernel",
    "params/Conv_2/kernel",
    "params/Dense_0/kernel",
    "params/Dense_1/kernel",
  ):
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
  d = _plan(
    rule=lambda path, leaf, dec: (
      dataclasses.replace(dec, prune=False, reason="mine")
      if path.endswith("Dense_1/kernel")
      else dec
    )
  )
  assert d["params/Dense_1/kernel"].reason == "mine"
  with pytest.raises(ValueError, match="not a multiple"):
    _plan(rule=lambda path, leaf, dec: 1 if path.endswith("Dense_1/kernel") else dec)


def test_bad_override_names_path():
  with pytest.raises(ValueError, match="Dense_0/kernel"):
    _plan(axes={r"Dense_0/kernel": 5})


def test_integer_leaves_stay_dense():
  d = jasp.policy.plan({"kernel": jnp.ones((8, 8), jnp.int32)}, 4)
  assert not d["kernel"].prune


# ----------------------------------------------------------------------------
# Misuse that must be an error (or a warning), naming the field, path or fix.


def test_a_string_pattern_is_one_pattern():
  # A str is a sequence of characters; read as such, "Dense_1" would include every
  # path holding a 'D' or an 'e'.
  d = _plan(include="Dense_1")
  assert [p for p, x in d.items() if x.prune] == ["params/Dense_1/kernel"]
  d = _plan(exclude="Dense_1")
  assert d["params/Dense_0/kernel"].prune and not d["params/Dense_1/kernel"].prune
  assert jasp.Policy(include="Dense_1").include == ("Dense_1",)
  assert jasp.Policy(exclude=re.compile("Conv")).exclude == (re.compile("Conv"),)
  assert jasp.Policy(exclude=None).exclude == ()


def test_sparsify_string_pattern_is_one_pattern():
  model, variables, x = basic.digits_cnn()
  lay = jasp.trace_layouts(model.apply, variables, x)
  pruned, _ = jasp.prune(variables, layouts=lay)
  _, report = sparse.sparsify(pruned, layouts=lay, dtype=jnp.bfloat16, include="Dense_1")
  assert report["params/Dense_0/kernel"] == "kept: not matched by include"
  assert report["params/Dense_1/kernel"] != "kept: not matched by include"
  _, report = sparse.sparsify(pruned, layouts=lay, dtype=jnp.bfloat16, exclude="Dense_1")
  assert report["params/Dense_1/kernel"] == "kept: matched by exclude"
  assert report["params/Dense_0/kernel"] != "kept: matched by exclude"
  with pytest.raises(ValueError, match=r"exclude holds '\['"):
    sparse.sparsify(pruned, layouts=lay, exclude=["["])


@pytest.mark.parametrize("field", ["include", "exclude", "axes"])
def test_invalid_regex_is_named_when_the_policy_is_made(field):
  value = {"Dense(": 0} if field == "axes" else ["Dense_0", "Dense("]
  with pytest.raises(ValueError, match=rf"Policy\.{field} holds 'Dense\('.*regular expression"):
    jasp.Policy(**{field: value})


def test_policy_field_types():
  with pytest.raises(TypeError, match=r"Policy\.axes must be a mapping"):
    jasp.Policy(axes=[("kernel", 0)])
  with pytest.raises(TypeError, match=r"Policy\.rule must be a callable"):
    jasp.Policy(rule=3)
  with pytest.raises(TypeError, match=r"Policy\.include holds 3"):
    jasp.Policy(include=["Dense", 3])
  _, variables, _ = basic.digits_cnn()
  with pytest.raises(TypeError, match="policy must be a jasp.Policy"):
    jasp.policy.plan(variables, policy={"exclude": ["Dense"]})
  with pytest.raises(ValueError, match="m >= 2"):
    jasp.policy.plan(variables, 0)
  with pytest.raises(TypeError, match="m must be an int"):
    jasp.policy.plan(variables, 4.0)


def test_rule_results_that_do_not_fit_name_the_leaf():
  rule = lambda path, leaf, dec: 5 if path.endswith("Dense_1/kernel") else dec  # noqa: E731
  with pytest.raises(
    ValueError, match=r"policy\.rule returned the axis 5 for 'params/Dense_1/kernel'"
  ):
    _plan(rule=rule)
  rule = lambda path, leaf, dec: "in" if path.endswith("Dense_1/kernel") else dec  # noqa: E731
  with pytest.raises(
    TypeError, match=r"policy\.rule returned 'in' \(str\) for 'params/Dense_1/kernel'"
  ):
    _plan(rule=rule)


def _cnn_and_layouts():
  model, variables, x = basic.digits_cnn()
  return variables, jasp.trace_layouts(model.apply, variables, x)


@pytest.mark.parametrize("fn", ["policy.plan", "compute_masks", "prune", "sparsity_report"])
def test_layouts_of_another_tree_are_an_error(fn):
  variables, lay = _cnn_and_layouts()
  target = jasp.policy.plan if fn == "policy.plan" else getattr(jasp, fn)
  call = lambda tree, layouts: target(tree, layouts=layouts)  # noqa: E731
  # Traced on the variables dict, applied to its "params" collection: no path matches,
  # and without the check nothing would be pruned while the report says "all 2:4".
  with pytest.raises(ValueError, match="start with 'params/' and the tree's do not"):
    call(variables["params"], lay)
  # The other way round: layouts of the "params" collection, the whole dict pruned.
  sub = {p.split("/", 1)[1]: v for p, v in lay.items() if p.startswith("params/")}
  with pytest.raises(ValueError, match="tree's paths start with 'params/'"):
    call(variables, sub)
  with pytest.raises(ValueError, match="layouts is empty"):
    call(variables, {})
  with pytest.raises(ValueError, match="another model"):
    call(variables, {"encoder/kernel": lay["params/Dense_0/kernel"]})
  with pytest.raises(TypeError, match="layouts must be a"):
    call(variables, list(lay.values()))


def test_partial_layouts_warn_only_for_weights():
  variables, lay = _cnn_and_layouts()
  part = {p: v for p, v in lay.items() if p != "params/Dense_1/kernel"}
  with pytest.warns(UserWarning, match="'params/Dense_1/kernel'"):
    d = jasp.policy.plan(variables, layouts=part)
  assert not d["params/Dense_1/kernel"].prune and d["params/Dense_0/kernel"].prune
  # Leaves outside the traced collection that are no weights (BatchNorm statistics
  # here) stay dense quietly.
  part = {p: v for p, v in lay.items() if not p.startswith("batch_stats/")}
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    jasp.policy.plan(variables, layouts=part)


def test_bad_layout_entries_name_the_leaf():
  variables, lay = _cnn_and_layouts()
  with pytest.raises(TypeError, match=r"layouts\['params/Dense_0/kernel'\] is 0"):
    jasp.policy.plan(variables, layouts={**lay, "params/Dense_0/kernel": 0})
  wrong = dataclasses.replace(lay["params/Dense_0/kernel"], axis=(2,))
  with pytest.raises(ValueError, match=r"layout of 'params/Dense_0/kernel'.*does not fit"):
    jasp.policy.plan(variables, layouts={**lay, "params/Dense_0/kernel": wrong})
