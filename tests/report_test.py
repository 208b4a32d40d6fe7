"""jasp.report: the sparsity report as data and as text."""

import json

import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from zoo import basic

import jasp


def test_report_after_prune():
  model, variables, x = basic.digits_cnn()
  lay = jasp.trace_layouts(model.apply, variables, x)
  pruned, masks = jasp.prune(variables, layouts=lay)
  r = jasp.sparsity_report(pruned, masks, layouts=lay)
  by = {e.path: e for e in r.entries}
  assert by["params/Dense_0/kernel"].status == "pruned" and by["params/Dense_0/kernel"].valid
  assert abs(by["params/Dense_0/kernel"].zero_fraction - 0.5) < 1e-6
  assert by["params/Dense_0/kernel"].mask_bits_per_weight == 8
  assert by["params/Conv_0/kernel"].status == "dense"
  assert "multiple of m=4" in by["params/Conv_0/kernel"].reason
  assert by["params/Dense_0/bias"].valid is None
  assert r.all_valid
  text = r.format(2)
  assert "params/Conv_0/kernel" in text and "params/Dense_0/bias" not in text
  assert "params/Dense_0/bias" in r.format(3)
  assert r.format(0) == ""
  assert r.format(1).count("\n") == 0
  d = json.loads(r.to_json())
  assert d["all_valid"] and len(d["leaves"]) == len(r.entries)
  import jax
  import numpy as np

  leaves = jax.tree.leaves(pruned)
  zeros = sum(int((np.asarray(a) == 0).sum()) for a in leaves)
  assert abs(r.sparsity - zeros / sum(a.size for a in leaves)) < 1e-6


def test_report_without_masks_and_invalid():
  _, variables, _ = basic.digits_cnn()
  r = jasp.sparsity_report(variables)
  by = {e.path: e for e in r.entries}
  assert by["params/Dense_0/kernel"].status == "to prune"
  assert not by["params/Dense_0/kernel"].valid and not r.all_valid
  assert "NOT all 2:4" in str(r)


def test_header_never_says_all_nm_when_nothing_is_pruned():
  model, variables, x = basic.digits_cnn()
  lay = jasp.trace_layouts(model.apply, variables, x)
  for masks in (None, jax.tree.map(lambda a: None, variables)):
    r = jasp.sparsity_report(variables, masks, 2, 3, layouts=lay)
    head = r.summary()
    assert "all 2:3" not in head, head
    assert head.endswith(
      "no leaf is pruned 2:3 (5 weight(s) skipped: input size not a multiple of m=3)"
    ), head
  # Kept dense by the policy, not by the size: no count of skipped weights.
  r = jasp.sparsity_report(variables, layouts=lay, policy=jasp.Policy(include=["nothing"]))
  assert r.summary().endswith("no leaf is pruned 2:4")


class _Dropped(nnx.Module):
  def __init__(self, rngs):
    self.lin = nnx.Linear(16, 8, rngs=rngs)
    self.drop = nnx.Dropout(0.5, rngs=rngs)

  def __call__(self, x):
    return self.drop(self.lin(x))


def test_nnx_state_with_rng_keys():
  model = _Dropped(nnx.Rngs(0))
  x = jnp.ones((2, 16))
  lay = jasp.trace_layouts(model, x)
  state = nnx.state(model)  # every variable, the Dropout's RNG key and count included
  pruned, masks = jasp.prune(state, layouts=lay)
  for r in (jasp.sparsity_report(pruned, masks, layouts=lay), jasp.sparsity_report(state)):
    by = {e.path: e for e in r.entries}
    key = by["drop/rngs/key"]
    assert key.status == "dense" and key.reason == "a PRNG key, not a weight" and not key.numeric
    assert key.dtype.startswith("key") and key.size == 0
    assert by["drop/rngs/count"].numeric and by["lin/kernel"].status in ("pruned", "to prune")
    assert r.total_params == 16 * 8 + 8 + 1
  assert "drop/rngs/key" in jasp.sparsity_report(pruned, masks, layouts=lay).format(3)


def test_report_argument_errors():
  _, variables, _ = basic.digits_cnn()
  with pytest.raises(ValueError, match="1 <= n < m"):
    jasp.sparsity_report(variables, n=4, m=4)
  with pytest.raises(TypeError, match="verbosity must be an int"):
    jasp.sparsity_report(variables).format("all")
  r = jasp.sparsity_report({"name": "conv", "w": jnp.ones((8, 4))})
  by = {e.path: e for e in r.entries}
  assert by["name"].reason == "a str holding no numbers, not a weight" and r.total_params == 32
