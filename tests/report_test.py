"""jasp.report: the sparsity report as data and as text."""

import json

import models

import jasp


def test_report_after_prune():
  model, variables, x = models.linen_cnn()
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
  _, variables, _ = models.linen_cnn()
  r = jasp.sparsity_report(variables)
  by = {e.path: e for e in r.entries}
  assert by["params/Dense_0/kernel"].status == "to prune"
  assert not by["params/Dense_0/kernel"].valid and not r.all_valid
  assert "NOT all 2:4" in str(r)
