"""ONNX export (jax2onnx) of pruned flax models, run in onnxruntime, and the ONNX checker."""

import logging

import pytest
import testing

pytest.importorskip("jax2onnx", reason="ONNX export needs the onnx extra: pip install 'jasp[onnx]'")
pytest.importorskip(
  "onnxruntime", reason="running ONNX needs the onnx extra: pip install 'jasp[onnx]'"
)

import jax  # noqa: E402
import numpy as np  # noqa: E402
import onnx  # noqa: E402
from onnx import helper  # noqa: E402
from onnx import numpy_helper  # noqa: E402
from zoo import finetuned  # noqa: E402

import jasp  # noqa: E402
from jasp import export  # noqa: E402
from jasp.export import cli  # noqa: E402

TOL = 1e-5  # relative error, fp32
# jax2onnx 0.17's nnx converters read Variable.value, which flax 0.12 deprecates.
pytestmark = [
  pytest.mark.slow,  # exports trace, convert and run whole models
  pytest.mark.filterwarnings("ignore:'.value' access is now deprecated"),
]


@pytest.fixture(scope="module")
def cnn_onnx(tmp_path_factory):
  model, variables, masks, _, x = finetuned.pruned_cnn()
  path = tmp_path_factory.mktemp("onnx") / "cnn.onnx"
  export.to_onnx(model.apply, variables, x, path=path, masks=masks)
  return path


@pytest.fixture(scope="module")
def block_onnx(tmp_path_factory):
  model, variables, masks, _, tokens = finetuned.pruned_block()
  path = tmp_path_factory.mktemp("onnx") / "block.onnx"
  export.to_onnx(model.apply, variables, tokens, path=path, masks=masks)
  return path


def _pruned_axis_ok(report, pruned, dense):
  by_param = report.by_param()
  for p in pruned:
    w = by_param[p]
    assert w.nm and w.expected and w.status == "N:M", w
  for p in dense:
    w = by_param[p]
    assert not w.nm and not w.expected and w.status in ("dense", "n/a"), w


def test_cnn_runs_in_onnxruntime_like_jax(cnn_onnx):
  model, variables, _, _, x = finetuned.pruned_cnn()
  onnx.checker.check_model(str(cnn_onnx))
  (y,) = export.run_onnx(cnn_onnx, x)
  assert testing.rel_err(y, model.apply(variables, x)) <= TOL


def test_cnn_checker_finds_pattern_on_every_pruned_weight(cnn_onnx):
  report = export.check_file(cnn_onnx)
  assert report.ok and report.format == "onnx" and (report.n, report.m) == (2, 4)
  _pruned_axis_ok(report, finetuned.PRUNED_CNN, finetuned.DENSE_CNN)
  by_param = report.by_param()
  # The exporter stored the conv kernels as KCRS and the Dense kernels as MatMul B (in, out).
  assert by_param["params/Conv_1/kernel"].shape == (32, 8, 3, 3)
  assert by_param["params/Conv_1/kernel"].consumer == "Conv(group=2)"
  assert by_param["params/Conv_1/kernel"].axis == (1,)
  assert by_param["params/Conv_2/kernel"].shape == (32, 32, 3)
  assert by_param["params/Dense_0/kernel"].axis == (0,)
  assert by_param["params/Dense_0/kernel"].consumer == "MatMul[B]"
  table = str(report)
  assert "params/Dense_0/kernel" in table and "N:M" in table


def test_block_runs_in_onnxruntime_like_jax(block_onnx):
  model, variables, _, _, tokens = finetuned.pruned_block()
  (y,) = export.run_onnx(block_onnx, tokens)
  assert testing.rel_err(y, model.apply(variables, tokens)) <= TOL
  report = export.check_file(block_onnx)
  assert report.ok
  _pruned_axis_ok(report, finetuned.PRUNED_BLOCK, finetuned.DENSE_BLOCK)


def test_nnx_block_exports_and_checks(tmp_path):
  module, masks, tokens = finetuned.pruned_nnx_block()
  path = tmp_path / "nnx.onnx"
  export.to_onnx(module, tokens, path=path, masks=masks)
  (y,) = export.run_onnx(path, tokens)
  assert testing.rel_err(y, module(tokens)) <= TOL
  report = export.check_file(path)
  assert report.ok
  pruned = [
    p for p, mk in jasp._tree.leaves_by_path(masks, keep_none=True).items() if mk is not None
  ]
  assert sorted(report.by_param()) == sorted(pruned)
  assert all(w.nm for w in report.weights)


def test_dynamic_batch(tmp_path):
  model, variables, masks, _, x = finetuned.pruned_cnn()
  path = tmp_path / "dyn.onnx"
  export.to_onnx(model.apply, variables, x, path=path, masks=masks, dynamic_batch=True)
  x7 = np.concatenate([np.asarray(x), np.asarray(x)[:3]])
  (y,) = export.run_onnx(path, x7)
  assert y.shape[0] == 7
  assert testing.rel_err(y, model.apply(variables, x7)) <= TOL


def test_export_logs_no_serializer_warnings(tmp_path, caplog):
  """A conv model with a dynamic batch exports without warnings from the ONNX serializer."""
  model, variables, masks, _, x = finetuned.pruned_cnn()
  with caplog.at_level(logging.WARNING):
    export.to_onnx(
      model.apply, variables, x, path=tmp_path / "m.onnx", masks=masks, dynamic_batch=True
    )
  noisy = [r.getMessage() for r in caplog.records if r.name.startswith("onnx")]
  assert not noisy, noisy


def _corrupt(src, dst, param, fn):
  """Rewrites the initializer exported from flax leaf ``param`` with ``fn(array)``."""
  model = onnx.load(str(src))
  report = export.check_onnx(model)
  name = report.by_param()[param].name
  for k, init in enumerate(model.graph.initializer):
    if init.name == name:
      arr = fn(numpy_helper.to_array(init).copy())
      model.graph.initializer[k].CopyFrom(numpy_helper.from_array(arr, name))
  onnx.save_model(model, str(dst))
  return name


def test_checker_fails_on_a_corrupted_pattern(cnn_onnx, tmp_path, capsys):
  bad = tmp_path / "bad.onnx"

  def fill_group(a):  # MatMul B (in, out): make one group of 4 inputs dense
    a[0:4, 0] = 1.0
    return a

  name = _corrupt(cnn_onnx, bad, "params/Dense_0/kernel", fill_group)
  report = export.check_file(bad)
  assert not report.ok
  (fail,) = report.failures
  assert fail.name == name and fail.status == "FAIL" and fail.bad_groups == 1
  assert cli.main(["check", str(bad)]) == 1
  out = capsys.readouterr().out
  assert "FAIL" in out and name in out
  # The uncorrupted file passes through the command line too.
  assert cli.main(["check", str(cnn_onnx)]) == 0


def test_checker_names_the_wrong_axis(cnn_onnx, tmp_path):
  """2:4 along the output axis (jaxpruner's default) fails, and the note says so."""
  bad = tmp_path / "wrong_axis.onnx"

  def out_axis(a):  # MatMul B (in, out) = (2048, 64): 2:4 along out instead of in
    return testing.nm_along(a.shape, 1)

  _corrupt(cnn_onnx, bad, "params/Dense_0/kernel", out_axis)
  w = export.check_file(bad).by_param()["params/Dense_0/kernel"]
  assert w.status == "FAIL" and "along axis 1 instead" in w.note


# ----------------------------------------------------------------------------
# The consumer rules, on hand-built graphs (no exporter involved).


def _graph_model(nodes, inits, inputs, outputs):
  graph = helper.make_graph(
    nodes, "g", inputs, outputs, [numpy_helper.from_array(v, k) for k, v in inits.items()]
  )
  return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _vi(name, shape):
  return helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, shape)


def test_gemm_transb_matmul_operand_order_and_chains():
  """Gemm transB=1 reduces B along 1; MatMul's A along -1; through Transpose and Reshape."""
  inits = {
    "gemm_tb": testing.nm_along((20, 48), 1),  # Gemm transB=1: B (N, K)
    "gemm_b": testing.nm_along((48, 20), 0),  # Gemm transB=0: B (K, N)
    "mm_a": testing.nm_along((20, 48), 1),  # MatMul(W, x): A (M, K)
    "t_w": testing.nm_along((20, 48), 1),  # Transpose -> (48, 20) -> MatMul B
    "r_w": testing.nm_along((2, 24, 20), (0, 1)),  # Reshape (48, 20) -> MatMul B: axes 0,1 merged
    "wrong": testing.nm_along((48, 20), 1),  # MatMul B along the output axis: wrong
    "shape": np.asarray([48, 20], np.int64),
  }
  nodes = [
    helper.make_node("Gemm", ["x", "gemm_tb"], ["y1"], transB=1),
    helper.make_node("Gemm", ["x", "gemm_b"], ["y2"]),
    helper.make_node("MatMul", ["mm_a", "xt"], ["y3"]),
    helper.make_node("Transpose", ["t_w"], ["t_wt"], perm=[1, 0]),
    helper.make_node("MatMul", ["x", "t_wt"], ["y4"]),
    helper.make_node("Reshape", ["r_w", "shape"], ["r_w2"]),
    helper.make_node("MatMul", ["x", "r_w2"], ["y5"]),
    helper.make_node("MatMul", ["x", "wrong"], ["y6"]),
  ]
  model = _graph_model(
    nodes, inits, [_vi("x", [3, 48]), _vi("xt", [48, 3])], [_vi(f"y{i}", None) for i in range(1, 7)]
  )
  r = export.check_onnx(model).by_name()
  assert r["gemm_tb"].axis == (1,) and r["gemm_tb"].nm and r["gemm_tb"].consumer == "Gemm(transB=1)"
  assert r["gemm_b"].axis == (0,) and r["gemm_b"].nm
  assert r["mm_a"].axis == (1,) and r["mm_a"].nm and r["mm_a"].consumer == "MatMul[A]"
  assert r["t_w"].axis == (1,) and r["t_w"].nm
  assert r["r_w"].axis == (0, 1) and r["r_w"].nm
  assert r["wrong"].axis == (0,) and not r["wrong"].nm and r["wrong"].status == "FAIL"
  assert "shape" not in r


def test_conv_kcrs_grouped_and_depthwise():
  inits = {
    "w": testing.nm_along((20, 12, 3, 3), 1),  # KCRS, groups along C
    "wg": testing.nm_along((20, 8, 3, 3), 1),  # group=2: C/group = 8
    "wdw": np.ones((12, 1, 3, 3), np.float32),  # depthwise
    "wrong": testing.nm_along((20, 12, 3, 3), 0),  # 2:4 along K: wrong for TensorRT
  }
  nodes = [
    helper.make_node("Conv", ["x", "w"], ["y1"], pads=[1, 1, 1, 1]),
    helper.make_node("Conv", ["x16", "wg"], ["y2"], group=2, pads=[1, 1, 1, 1]),
    helper.make_node("Conv", ["x", "wdw"], ["y3"], group=12, pads=[1, 1, 1, 1]),
    helper.make_node("Conv", ["x", "wrong"], ["y4"], pads=[1, 1, 1, 1]),
  ]
  model = _graph_model(
    nodes,
    inits,
    [_vi("x", [1, 12, 5, 5]), _vi("x16", [1, 16, 5, 5])],
    [_vi(f"y{i}", None) for i in range(1, 5)],
  )
  r = export.check_onnx(model).by_name()
  assert r["w"].axis == (1,) and r["w"].nm and r["w"].consumer == "Conv"
  assert r["wg"].nm and r["wg"].consumer == "Conv(group=2)"
  assert r["wdw"].status == "n/a" and "depthwise" in r["wdw"].consumer
  assert r["wrong"].status == "FAIL" and "along axis 0 instead" in r["wrong"].note


def test_positional_pooling_args_get_a_clear_error_or_export(tmp_path):
  """jax2onnx 0.17's pooling converters take keywords only; jasp's error says what to write."""
  import flax.linen as nn

  class Pool(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(4)(nn.avg_pool(x, (2, 2), (2, 2)).reshape(x.shape[0], -1))

  x = np.ones((2, 4, 4, 3), np.float32)
  variables = Pool().init(jax.random.key(0), x)
  try:
    export.to_onnx(Pool().apply, variables, x, path=tmp_path / "pool.onnx")
  except TypeError as e:
    assert "window_shape=(2, 2), strides=(2, 2)" in str(e)
  else:  # a later jax2onnx that accepts positional arguments
    (y,) = export.run_onnx(tmp_path / "pool.onnx", x)
    assert testing.rel_err(y, Pool().apply(variables, x)) <= TOL


def test_weights_used_inside_control_flow_subgraphs():
  inits = {"sub_w": testing.nm_along((48, 20), 0), "cond": np.asarray(True)}
  then = helper.make_graph(
    [helper.make_node("MatMul", ["x", "sub_w"], ["t"])], "then", [], [_vi("t", [3, 20])]
  )
  other = helper.make_graph(
    [helper.make_node("Identity", ["x"], ["e"])], "else", [], [_vi("e", [3, 48])]
  )
  node = helper.make_node("If", ["cond"], ["y"], then_branch=then, else_branch=other)
  model = _graph_model([node], inits, [_vi("x", [3, 48])], [_vi("y", None)])
  (w,) = export.check_onnx(model).weights
  assert w.name == "sub_w" and w.axis == (0,) and w.nm and w.consumer == "MatMul[B]"


def test_einsum_concat_and_visit_once():
  """Einsum drops its reduced letters; Concat along another axis is followed; a graph whose
  Identity nodes fan out exponentially is walked once per name."""
  inits = {
    "ein": testing.nm_along((48, 4, 5), 0),  # 'btk,khd->bthd': reduces k (axis 0)
    "cat_a": testing.nm_along((48, 8), 0),  # Concat along axis 1, then MatMul B
    "cat_b": testing.nm_along((48, 12), 0),
    "cat_k": testing.nm_along((24, 20), 0),  # Concat along axis 0 = the reduction axis
    "fan": testing.nm_along((48, 20), 0),
  }
  nodes = [
    helper.make_node("Einsum", ["x3", "ein"], ["y1"], equation="btk,khd->bthd"),
    helper.make_node("Concat", ["cat_a", "cat_b"], ["cat"], axis=1),
    helper.make_node("MatMul", ["x", "cat"], ["y2"]),
    helper.make_node("Concat", ["cat_k", "cat_k"], ["catk"], axis=0),
    helper.make_node("MatMul", ["x", "catk"], ["y3"]),
  ]
  prev = "fan"
  for i in range(40):  # each level doubles the paths: 2**40 without visit-once
    nodes += [
      helper.make_node("Identity", [prev], [f"f{i}"]),
      helper.make_node("Identity", [prev], [f"f{i}"]),
    ]
    prev = f"f{i}"
  nodes.append(helper.make_node("MatMul", ["x", prev], ["y4"]))
  model = _graph_model(
    nodes,
    inits,
    [_vi("x", [3, 48]), _vi("x3", [2, 3, 48])],
    [_vi(f"y{i}", None) for i in range(1, 5)],
  )
  r = export.check_onnx(model).by_name()
  assert r["ein"].axis == (0,) and r["ein"].nm and r["ein"].consumer.startswith("Einsum")
  assert r["cat_a"].axis == (0,) and r["cat_a"].nm and r["cat_b"].nm
  assert "cat_k" not in r  # concatenated along its reduction axis: not a plain weight
  assert r["fan"].axis == (0,) and r["fan"].nm


def test_loop_operands_and_outer_reads_are_followed_into_the_body():
  """An initializer passed into a Loop (jax2onnx's scan constants) or read from the enclosing
  graph by the body; two bodies reuse the same input names."""

  def body(name):
    b_in = [
      helper.make_tensor_value_info("i", onnx.TensorProto.INT64, []),
      helper.make_tensor_value_info("c", onnx.TensorProto.BOOL, []),
      _vi("w_in", None),
      _vi("h", [3, 48]),
    ]
    b_nodes = [
      helper.make_node("Identity", ["c"], ["c_out"]),
      helper.make_node("Identity", ["w_in"], ["w_out"]),
      helper.make_node("MatMul", ["h", "w_in"], ["h1"]),
      helper.make_node("MatMul", ["h1", "outer"], ["h_out"]),
    ]
    b_out = [
      helper.make_tensor_value_info("c_out", onnx.TensorProto.BOOL, []),
      _vi("w_out", None),
      _vi("h_out", [3, 48]),
    ]
    return helper.make_graph(b_nodes, name, b_in, b_out)

  inits = {
    "carried": testing.nm_along((48, 48), 0),
    "carried2": testing.nm_along((48, 48), 0, seed=1),
    "outer": testing.nm_along((48, 48), 0, seed=2),
    "trip": np.asarray(2, np.int64),
    "cond": np.asarray(True),
  }
  nodes = [
    helper.make_node("Loop", ["trip", "cond", "carried", "x"], ["w1", "y1"], body=body("b1")),
    helper.make_node("Loop", ["trip", "cond", "carried2", "y1"], ["w2", "y2"], body=body("b2")),
  ]
  model = _graph_model(nodes, inits, [_vi("x", [3, 48])], [_vi("y2", None)])
  r = export.check_onnx(model).by_name()
  for name in ("carried", "carried2", "outer"):
    assert r[name].axis == (0,) and r[name].nm and r[name].consumer == "MatMul[B]", r[name]
