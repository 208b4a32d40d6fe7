"""TensorFlow SavedModel export (jax2tf) of pruned flax models, loaded back and checked."""

import pytest
import testing

pytest.importorskip(
  "tensorflow", reason="SavedModel export needs the tf extra: pip install 'jasp[tf]'"
)

import numpy as np  # noqa: E402
from zoo import finetuned  # noqa: E402

from jasp import export  # noqa: E402
from jasp.export import cli  # noqa: E402

pytestmark = pytest.mark.slow  # exports trace, convert and run whole models

TOL = 1e-5  # relative error, fp32


@pytest.fixture(scope="module")
def cnn_saved(tmp_path_factory):
  model, variables, masks, _, x = finetuned.pruned_cnn()
  path = tmp_path_factory.mktemp("tf") / "cnn"
  export.to_saved_model(model.apply, variables, x, path=path, masks=masks, dynamic_batch=True)
  return path


def test_cnn_saved_model_runs_like_jax(cnn_saved):
  model, variables, _, _, x = finetuned.pruned_cnn()
  (y,) = export.run_saved_model(cnn_saved, x)
  assert testing.rel_err(y, model.apply(variables, x)) <= TOL
  x5 = np.asarray(x)[:3]  # dynamic batch
  (y5,) = export.run_saved_model(cnn_saved, x5)
  assert testing.rel_err(y5, model.apply(variables, x5)) <= TOL


def test_cnn_saved_model_checker(cnn_saved, capsys):
  report = export.check_file(cnn_saved)
  assert report.ok and report.format == "savedmodel"
  by_param = report.by_param()
  for p in finetuned.PRUNED_CNN:
    assert by_param[p].nm and by_param[p].expected, by_param[p]
  for p in finetuned.DENSE_CNN:
    assert not by_param[p].nm and not by_param[p].expected, by_param[p]
  # Flax layouts inside: the conv kernel is HWIO, reduced along I.
  assert by_param["params/Conv_1/kernel"].shape == (3, 3, 8, 32)
  assert by_param["params/Conv_1/kernel"].axis == (2,)
  assert cli.main(["check", str(cnn_saved), "--json"]) == 0
  assert '"ok": true' in capsys.readouterr().out


def test_block_saved_model_runs_like_jax_and_checks(tmp_path):
  model, variables, masks, _, tokens = finetuned.pruned_block()
  path = export.to_saved_model(model.apply, variables, tokens, path=tmp_path / "block", masks=masks)
  (y,) = export.run_saved_model(path, tokens)
  assert testing.rel_err(y, model.apply(variables, tokens)) <= TOL
  report = export.check_file(path)
  assert report.ok
  by_param = report.by_param()
  for p in finetuned.PRUNED_BLOCK:
    assert by_param[p].nm and by_param[p].expected, by_param[p]
  assert by_param["params/MultiHeadDotProductAttention_0/out/kernel"].axis == (0, 1)
  for p in finetuned.DENSE_BLOCK:
    assert by_param[p].status == "dense", by_param[p]


def test_nnx_saved_model(tmp_path):
  module, masks, tokens = finetuned.pruned_nnx_block()
  path = export.to_saved_model(module, tokens, path=tmp_path / "nnx", masks=masks)
  (y,) = export.run_saved_model(path, tokens)
  assert testing.rel_err(y, module(tokens)) <= TOL
  report = export.check_file(path)
  assert report.ok and report.by_param()["conv/kernel"].nm


def test_saved_model_without_jasp_metadata_uses_conventions(cnn_saved, tmp_path):
  import shutil

  bare = tmp_path / "bare"
  shutil.copytree(cnn_saved, bare)
  shutil.rmtree(bare / "assets.extra")
  report = export.check_file(bare)
  assert report.ok
  # No metadata: the variable's checkpoint path (the tf.Module attribute first) and
  # flax's conventions (a rank-2 kernel is (in, out)); expected because half zeros.
  w = report.by_param()["params/params/Dense_0/kernel"]
  assert w.nm and w.expected_by == "zeros" and w.axis == (0,)
