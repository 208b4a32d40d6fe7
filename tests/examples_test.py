"""The digits example runs end to end (a quick run: few epochs)."""

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))

import digits  # noqa: E402
import pytest  # noqa: E402

pytestmark = pytest.mark.slow  # each runs an example end to end


def test_digits_quick(tmp_path):
  res = digits.main(["--quick", "--out", str(tmp_path)])
  assert res["pattern_verified"] and res["pruned_leaves"] == 3
  assert res["onnx_verified"] and (tmp_path / "model.onnx").exists()
  assert (tmp_path / "curves.png").stat().st_size > 10_000
  saved = json.loads((tmp_path / "results.json").read_text())
  assert len(saved["history"]) == 5
  assert res["dense_acc"] > 50  # 3 epochs already learn the digits


def test_lm_quick(tmp_path):
  import lm  # noqa: E402

  res = lm.main(["--quick", "--out", str(tmp_path)])
  assert set(res["one_shot"]) == {"magnitude", "wanda", "sparsegpt"}
  assert res["best_method"] == min(res["one_shot"], key=lambda k: res["one_shot"][k]["val_loss"])
  assert res["pruned_leaves"] == 13  # q, k, v, out, up, down per block (2 blocks) + head
  assert (tmp_path / "curves.png").exists()


def test_digits_permute_quick(tmp_path):
  res = digits.main(
    ["--quick", "--permute", "--permute-time", "1", "--no-onnx", "--out", str(tmp_path)]
  )
  p = res["permutation"]
  assert p["kept_with"] > p["kept_without"]  # permutation keeps more magnitude
  assert abs(p["dense_acc_after_permute"] - res["dense_acc"]) < 1e-6  # same function
