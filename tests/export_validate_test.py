"""Exporters check what they write and never leave a broken file behind."""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
import testing
from zoo import finetuned

import jasp
from jasp import export

jax2onnx = pytest.importorskip("jax2onnx")
onnx = pytest.importorskip("onnx")

pytestmark = pytest.mark.slow  # exports trace, convert and run whole models


class _MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(4)(jnp.tanh(nn.Dense(16)(x)))


@pytest.fixture(scope="module")
def mlp():
  x = testing.normal((3, 8))
  model = _MLP()
  v = model.init(jax.random.key(0), x)
  lay = jasp.trace_layouts(model.apply, v, x)
  pruned, masks = jasp.prune(v, layouts=lay)
  return model, pruned, masks, x


def _patch_converter(monkeypatch, edit):
  """jax2onnx's converter, with ``edit(model)`` applied to what it returns."""
  real = jax2onnx.to_onnx

  def fake(*a, **k):
    model = real(*a, **k)
    edit(model)
    return model

  monkeypatch.setattr(jax2onnx, "to_onnx", fake)


def test_a_file_onnx_rejects_is_an_error_and_nothing_is_written(mlp, tmp_path, monkeypatch):
  model, pruned, masks, x = mlp
  path = tmp_path / "m.onnx"
  path.write_bytes(b"the previous file")

  def drop_a_node(m):
    del m.graph.node[len(m.graph.node) // 2]

  _patch_converter(monkeypatch, drop_a_node)
  with pytest.raises(export.ExportError, match="onnx.checker|onnxruntime"):
    export.to_onnx(model.apply, pruned, x, path=path, masks=masks)
  assert path.read_bytes() == b"the previous file"
  assert sorted(os.listdir(tmp_path)) == ["m.onnx"]  # no temporary left over


def test_outputs_that_differ_from_jax_are_an_error(mlp, tmp_path, monkeypatch):
  model, pruned, masks, x = mlp
  from onnx import numpy_helper

  def shift_biases(m):
    for i, t in enumerate(m.graph.initializer):
      a = numpy_helper.to_array(t)
      if a.size == 4:  # the last bias: changes the outputs, not the pattern
        m.graph.initializer[i].CopyFrom(numpy_helper.from_array((a + 0.5).astype(a.dtype), t.name))

  _patch_converter(monkeypatch, shift_biases)
  with pytest.raises(export.ExportError, match="differs from the JAX model"):
    export.to_onnx(model.apply, pruned, x, path=tmp_path / "m.onnx", masks=masks)
  assert not (tmp_path / "m.onnx").exists()


def test_a_pruned_weight_without_its_pattern_in_the_file_is_an_error(mlp, tmp_path, monkeypatch):
  model, pruned, masks, x = mlp
  from onnx import numpy_helper

  def fill_zeros(m):
    for i, t in enumerate(m.graph.initializer):
      a = numpy_helper.to_array(t)
      if a.ndim == 2 and a.shape == (8, 16):
        m.graph.initializer[i].CopyFrom(
          numpy_helper.from_array((a + (a == 0) * 1e-3).astype(a.dtype), t.name)
        )

  _patch_converter(monkeypatch, fill_zeros)
  with pytest.raises(export.ExportError, match="N:M pattern|2:4"):
    # A huge tolerance lets the run pass: only the pattern check can catch it.
    export.to_onnx(model.apply, pruned, x, path=tmp_path / "m.onnx", masks=masks, rtol=1e9)
  assert not (tmp_path / "m.onnx").exists()


def test_masks_of_the_wrong_shape_or_paths_are_an_error(mlp):
  model, pruned, masks, x = mlp
  bad = jax.tree_util.tree_map(lambda a: a[:4] if a.ndim == 2 else a, masks)
  with pytest.raises(ValueError, match="shape"):
    export.to_onnx(model.apply, pruned, x, masks=bad)
  with pytest.raises(ValueError, match="names a leaf"):
    export.to_onnx(model.apply, pruned, x, masks={"other": {"kernel": None}})


def test_an_accepted_export_replaces_the_previous_file(mlp, tmp_path):
  model, pruned, masks, x = mlp
  path = tmp_path / "m.onnx"
  path.write_bytes(b"old")
  export.to_onnx(model.apply, pruned, x, path=path, masks=masks)
  assert export.check_file(path).ok and sorted(os.listdir(tmp_path)) == ["m.onnx"]


def test_savedmodel_failing_its_run_leaves_the_old_directory(tmp_path, monkeypatch):
  pytest.importorskip("tensorflow")
  model, variables, masks, _, x = finetuned.pruned_cnn()
  path = tmp_path / "sm"
  export.to_saved_model(model.apply, variables, x, path=path, masks=masks)
  before = sorted(os.listdir(path))
  from jasp.export import _saved_model

  real = _saved_model.run_saved_model
  monkeypatch.setattr(
    _saved_model, "run_saved_model", lambda p, *xs: [y + 1.0 for y in real(p, *xs)]
  )
  with pytest.raises(export.ExportError, match="TensorFlow: output 0 differs"):
    export.to_saved_model(model.apply, variables, x, path=path, masks=masks)
  assert sorted(os.listdir(path)) == before and export.check_file(path).ok
  assert sorted(os.listdir(tmp_path)) == ["sm"]
