"""The checker on flax checkpoints, its command line, and its errors (never a traceback)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from flax import serialization
from zoo import finetuned

import jasp
from jasp import export
from jasp.export import cli

pytestmark = pytest.mark.slow  # exports models in every format, then checks the files


@pytest.fixture(scope="module")
def cnn_msgpack(tmp_path_factory):
  _, variables, _, _, _ = finetuned.pruned_cnn()
  path = tmp_path_factory.mktemp("ckpt") / "cnn.msgpack"
  path.write_bytes(serialization.msgpack_serialize(jax_to_numpy(variables)))
  return path


def jax_to_numpy(tree):
  import jax

  return jax.tree.map(np.asarray, tree)


def test_msgpack_checkpoint(cnn_msgpack):
  report = export.check_file(cnn_msgpack)
  assert report.ok and report.format == "msgpack"
  by = report.by_name()
  for p in finetuned.PRUNED_CNN:
    assert by[p].nm and by[p].expected_by == "zeros", by[p]
  assert by["params/Conv_0/kernel"].status == "n/a"
  assert by["params/Conv_1/kernel"].axis == (2,)  # HWIO: along I


def test_orbax_checkpoint_with_masks(tmp_path):
  ocp = pytest.importorskip(
    "orbax.checkpoint", reason="needs the checkpoint extra: pip install 'jasp[checkpoint]'"
  )
  _, variables, masks, _, _ = finetuned.pruned_cnn()
  kept = {
    mod: {"kernel": d["kernel"]}
    for mod, d in masks["params"].items()
    if d.get("kernel") is not None
  }  # orbax stores no None leaves
  ckpt = {"params": variables["params"], "masks": jax_to_numpy(kept)}
  path = tmp_path / "orbax"
  with ocp.PyTreeCheckpointer() as c:
    c.save(str(path), ckpt)
  report = export.check_file(path)
  assert report.ok and report.format == "orbax"
  by = report.by_name()
  for p in finetuned.PRUNED_CNN:
    assert by[p].nm and by[p].expected_by == "mask", by[p]
  assert not by["params/Conv_0/kernel"].expected
  # The command line on the same checkpoint, as JSON.
  assert cli.main(["check", str(path), "--json"]) == 0


def test_check_params_and_expect_sparse(capsys, cnn_msgpack):
  _, variables, _, layouts, _ = finetuned.pruned_cnn()
  report = export.check_params(variables, layouts=layouts)
  assert report.ok and len(report.weights) == 5
  # Expecting a weight that is dense fails; the regex replaces the default rule.
  report = export.check_params(variables, expect_sparse=r"Conv_0|Dense_0")
  assert not report.ok
  assert [w.param for w in report.failures] == ["params/Conv_0/kernel"]
  assert cli.main(["check", str(cnn_msgpack), "--expect-sparse", "Conv_0"]) == 1
  capsys.readouterr()
  # --n/--m: 2:4 weights are not 1:4.
  assert (
    cli.main(
      [
        "check",
        str(cnn_msgpack),
        "--n",
        "1",
        "--m",
        "4",
        "--json",
        "--expect-sparse",
        r"Conv_[12]|Dense",
      ]
    )
    == 1
  )
  data = json.loads(capsys.readouterr().out)
  assert data["ok"] is False and data["n"] == 1
  assert {w["param"] for w in data["weights"] if w["status"] == "FAIL"} == set(finetuned.PRUNED_CNN)


def test_dense_weights_with_many_zeros_must_be_nm():
  rng = np.random.default_rng(0)
  w = rng.normal(size=(16, 8)).astype(np.float32)
  w[rng.random(w.shape) < 0.5] = 0  # unstructured 50%
  report = export.check_params({"params": {"Dense_0": {"kernel": w}}})
  (c,) = report.weights
  assert c.status == "FAIL" and c.expected_by == "zeros"
  assert export.check_params({"params": {"Dense_0": {"kernel": w}}}, min_zeros=1.01).ok


@pytest.mark.parametrize(
  "content,name",
  [
    (b"\x08\x07garbage that is no protobuf \xff\xff", "bad.onnx"),
    (b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}", "bad.safetensors"),
    (b"\xc1\xc1\xc1", "bad.msgpack"),
    (b"hello", "notes.txt"),
  ],
  ids=["onnx", "safetensors", "msgpack", "txt"],
)
def test_corrupt_or_unsupported_file_exit_2(tmp_path, capsys, content, name):
  path = tmp_path / name
  path.write_bytes(content)
  try:
    code = cli.main(["check", str(path)])
  except export.MissingDependencyError:
    pytest.skip("the optional reader is not installed")
  err = capsys.readouterr().err
  if "pip install" in err:
    pytest.skip("the optional reader is not installed")
  assert code == 2
  assert err.startswith("jasp check: error: ") and str(path) in err
  assert "Traceback" not in err


def test_missing_path_and_bad_directory(tmp_path, capsys):
  assert cli.main(["check", str(tmp_path / "nope.onnx")]) == 2
  assert "no such file" in capsys.readouterr().err
  (tmp_path / "empty").mkdir()
  assert cli.main(["check", str(tmp_path / "empty")]) == 2
  assert "neither a TensorFlow SavedModel" in capsys.readouterr().err
  with pytest.raises(SystemExit) as e:  # argparse's own usage error
    cli.main(["check"])
  assert e.value.code == 2


def test_missing_dependency_names_the_extra(tmp_path, capsys, monkeypatch):
  path = tmp_path / "m.onnx"
  path.write_bytes(b"\x08\x07")
  monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx -> ImportError
  with pytest.raises(export.MissingDependencyError, match=r"pip install 'jasp\[onnx\]'"):
    export.check_file(path)
  assert cli.main(["check", str(path)]) == 2
  err = capsys.readouterr().err
  assert "pip install 'jasp[onnx]'" in err and "Traceback" not in err
  monkeypatch.setitem(sys.modules, "tensorflow", None)
  with pytest.raises(export.MissingDependencyError, match=r"jasp\[tf\]"):
    export.to_saved_model(lambda p, x: x, {}, np.zeros(1), path=tmp_path / "sm")


def test_python_dash_m_entry_point(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run(
    [sys.executable, "-m", "jasp.export.cli", "check", str(tmp_path / "missing.onnx")],
    capture_output=True,
    text=True,
    cwd=root,
    env=env,
    timeout=120,
  )
  assert proc.returncode == 2
  assert "no such file" in proc.stderr and "Traceback" not in proc.stderr


def test_report_table_and_json_shapes():
  w = np.asarray(jasp.nm_mask(np.arange(1, 33, dtype=np.float32).reshape(8, 4), 2, 4, 0))
  report = export.check_params({"params": {"Dense_0": {"kernel": w * 1.0}}}, name="t")
  text = str(report)
  assert text.splitlines()[0].startswith("t (pytree): 1 weight(s), 1 2:4")
  assert "weight" in text.splitlines()[2] and "status" in text.splitlines()[2]
  data = json.loads(report.to_json())
  assert data["weights"][0]["status"] == "N:M" and data["weights"][0]["axis"] == [0]


def test_orbax_checkpoint_manager_layout(tmp_path, capsys):
  ocp = pytest.importorskip(
    "orbax.checkpoint", reason="needs the checkpoint extra: pip install 'jasp[checkpoint]'"
  )
  _, variables, _, _, _ = finetuned.pruned_cnn()
  tree = {"params": jax_to_numpy(variables["params"])}
  with ocp.CheckpointManager(str(tmp_path / "run")) as mgr:
    mgr.save(1, args=ocp.args.StandardSave(tree))
    mgr.save(2, args=ocp.args.StandardSave(tree))
    mgr.wait_until_finished()
  report = export.check_file(tmp_path / "run")  # the latest step, its single item
  assert report.ok and report.path.endswith("(2/default)")
  with ocp.CheckpointManager(str(tmp_path / "two"), item_names=("a", "b")) as mgr:
    mgr.save(
      1, args=ocp.args.Composite(a=ocp.args.StandardSave(tree), b=ocp.args.StandardSave(tree))
    )
    mgr.wait_until_finished()
  assert cli.main(["check", str(tmp_path / "two")]) == 2
  assert "pass the item's directory" in capsys.readouterr().err
  assert export.check_file(tmp_path / "two" / "1" / "a").ok


# ----------------------------------------------------------------------------
# Untrusted files: the check fails closed (exit 2 with the reason), never a traceback.

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _w24(rows=8, cols=4):
  """A 2:4 weight (rows, cols), 2:4 along axis 0 (a MatMul B operand)."""
  return (
    np.asarray(
      jasp.nm_mask(np.arange(1, rows * cols + 1, dtype=np.float32).reshape(rows, cols), 2, 4, 0)
    )
    * 1.0
  )


def _matmul_onnx(meta=None, *, w=None, name="W"):
  """A one-MatMul ONNX model (y = x @ W) with ``meta`` as its jasp metadata."""
  onnx = pytest.importorskip("onnx", reason="needs the onnx extra: pip install 'jasp[onnx]'")
  from onnx import TensorProto
  from onnx import helper
  from onnx import numpy_helper

  w = _w24() if w is None else w
  node = helper.make_node("MatMul", ["x", name], ["y"])
  graph = helper.make_graph(
    [node],
    "g",
    [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, w.shape[0]])],
    [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, w.shape[1]])],
    [numpy_helper.from_array(w.astype(np.float32), name)],
  )
  model = helper.make_model(graph)
  if meta is not None:
    entry = model.metadata_props.add()
    entry.key, entry.value = "jasp", meta if isinstance(meta, str) else json.dumps(meta)
  onnx.checker.check_model(model) if meta is None else None
  return model


PRUNED_W = {
  "n": 2,
  "m": 4,
  "weights": {"W": {"path": "params/Dense_0/kernel", "pruned": True, "axis": [0]}},
}


def _cli(path, *args):
  """``(exit status, stderr)`` of ``jasp check PATH ARGS`` run in-process."""
  import contextlib
  import io

  err = io.StringIO()
  with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
    code = cli.main(["check", str(path), *args])
  return code, err.getvalue()


_LIMITED_CLI = (
  "import resource, sys; mem = int(sys.argv[1]); "
  "resource.setrlimit(resource.RLIMIT_AS, (mem, mem)); "
  "from jasp.export import cli; sys.exit(cli.main(sys.argv[2:]))"
)


def _cli_subprocess(path, *args, timeout=60, mem=3 << 30):
  """``jasp check`` in a child process with a wall-clock timeout and an address-space limit."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run(
    [sys.executable, "-c", _LIMITED_CLI, str(mem), "check", str(path), *args],
    capture_output=True,
    text=True,
    cwd=ROOT,
    env=env,
    timeout=timeout,
  )


def test_matmul_onnx_fixture_passes(tmp_path):
  path = tmp_path / "m.onnx"
  path.write_bytes(_matmul_onnx(PRUNED_W).SerializeToString())
  report = export.check_file(path)
  assert report.ok and [w.expected_by for w in report.weights] == ["metadata"]


@pytest.mark.parametrize(
  "content",
  [b"", b"\x08\x07", b"\x08\x07\x12\x04jasp"],
  ids=["empty", "ir_version", "ir_version_and_producer"],
)
def test_onnx_without_a_graph_exit_2(tmp_path, content):
  pytest.importorskip("onnx")
  path = tmp_path / "m.onnx"
  path.write_bytes(content)
  code, err = _cli(path)
  assert code == 2, err
  assert "empty file" in err or "no graph" in err
  with pytest.raises(export.CheckError):
    export.check_file(path)


def test_onnx_cut_before_its_graph_exit_2(tmp_path):
  onnx = pytest.importorskip("onnx")
  model = _matmul_onnx(PRUNED_W)
  head = onnx.ModelProto()
  head.CopyFrom(model)
  head.ClearField("graph")
  head.ClearField("opset_import")
  head.ClearField("metadata_props")
  full, prefix = model.SerializeToString(), head.SerializeToString()
  assert full.startswith(prefix)  # fields 1-6 come before the graph (field 7)
  path = tmp_path / "cut.onnx"
  path.write_bytes(prefix)
  code, err = _cli(path)
  assert code == 2 and "no graph" in err, err


@pytest.mark.parametrize("drop", ["node", "initializer"])
def test_onnx_pruned_weights_in_metadata_but_not_in_graph_exit_2(tmp_path, drop):
  model = _matmul_onnx(PRUNED_W)
  model.graph.ClearField(drop)
  path = tmp_path / "m.onnx"
  path.write_bytes(model.SerializeToString())
  code, err = _cli(path)
  assert code == 2, err
  assert "marks 1 weight(s) as pruned" in err and "W (params/Dense_0/kernel)" in err
  assert ("no initializer" in err) if drop == "initializer" else ("read by nothing" in err)
  with pytest.raises(export.CheckError, match="cannot verify"):
    export.check_onnx(model)


def test_no_weights_in_safetensors_msgpack_orbax_exit_2(tmp_path):
  st = pytest.importorskip("safetensors.numpy")
  st.save_file({}, str(tmp_path / "empty.safetensors"))
  st.save_file({"Dense_0.bias": np.zeros(4, np.float32)}, str(tmp_path / "bias.safetensors"))
  (tmp_path / "empty.msgpack").write_bytes(serialization.msgpack_serialize({}))
  (tmp_path / "bias.msgpack").write_bytes(
    serialization.msgpack_serialize({"params": {"Dense_0": {"bias": np.zeros(4, np.float32)}}})
  )
  names = ["empty.safetensors", "bias.safetensors", "empty.msgpack", "bias.msgpack"]
  ocp = pytest.importorskip("orbax.checkpoint")
  with ocp.PyTreeCheckpointer() as c:
    c.save(str(tmp_path / "orbax"), {"params": {"Dense_0": {"bias": np.zeros(4, np.float32)}}})
  names.append("orbax")
  for name in names:
    code, err = _cli(tmp_path / name)
    assert code == 2 and "no weights found" in err, (name, err)
  # An API caller that expects no weights may say so.
  assert export.check_file(tmp_path / "bias.msgpack", require_weights=False).ok


def test_safetensors_metadata_lists_a_pruned_weight_it_lacks_exit_2(tmp_path):
  st = pytest.importorskip("safetensors.numpy")
  meta = {
    "n": 2,
    "m": 4,
    "layout": "torch",
    "weights": {
      "fc.weight": {"path": "params/fc/kernel", "pruned": True, "kind": "dot", "axis": [0]},
      "gone.weight": {"path": "params/gone/kernel", "pruned": True, "kind": "dot", "axis": [0]},
    },
  }
  path = tmp_path / "m.safetensors"
  st.save_file({"fc.weight": _w24().T.copy()}, str(path), metadata={"jasp": json.dumps(meta)})
  code, err = _cli(path)
  assert code == 2 and "gone.weight (params/gone/kernel)" in err, err
  del meta["weights"]["gone.weight"]
  st.save_file({"fc.weight": _w24().T.copy()}, str(path), metadata={"jasp": json.dumps(meta)})
  assert _cli(path)[0] == 0


@pytest.mark.parametrize(
  "meta,field",
  [
    ('{"n": "x"}', "'n'"),
    ('{"n": null}', "'n'"),
    ('{"m": 1e400}', "'m'"),
    ('{"n": 3, "m": 2}', "'n' and 'm'"),
    ("[1, 2]", "must be a JSON object"),
    ('{"weights": ["W"]}', "'weights'"),
    ('{"weights": {"W": 5}}', "weights['W']"),
    ('{"weights": {"W": {"pruned": "yes"}}}', "weights['W'].pruned"),
    ('{"weights": {"W": {"path": "p"}}}', "weights['W'].pruned"),
    ('{"weights": {"W": {"pruned": true, "layer": "0"}}}', "weights['W'].layer"),
    ('{"weights": {"W": {"pruned": true, "path": 3}}}', "weights['W'].path"),
    ('{"n": 2, "n": 3}', "'n' appears twice"),
    ('{"n": NaN}', "NaN"),
    ("{not json", "not valid JSON"),
  ],
)
def test_malformed_jasp_metadata_exit_2_naming_the_field(tmp_path, meta, field):
  path = tmp_path / "m.onnx"
  path.write_bytes(_matmul_onnx(meta).SerializeToString())
  code, err = _cli(path)
  assert code == 2, err
  assert "jasp metadata" in err and field in err, err
  assert "Traceback" not in err
  st = pytest.importorskip("safetensors.numpy")
  path = tmp_path / "m.safetensors"
  st.save_file({"fc.weight": _w24().T.copy()}, str(path), metadata={"jasp": meta})
  code, err = _cli(path)
  assert code == 2 and field in err, err


def test_two_jasp_metadata_entries_exit_2(tmp_path):
  model = _matmul_onnx(PRUNED_W)
  extra = model.metadata_props.add()
  extra.key, extra.value = "jasp", json.dumps({"n": 2, "m": 4, "weights": {}})
  path = tmp_path / "m.onnx"
  path.write_bytes(model.SerializeToString())
  code, err = _cli(path)
  assert code == 2 and "2 metadata_props entries" in err, err


def test_fifo_is_refused_not_waited_on(tmp_path):
  path = tmp_path / "pipe.onnx"
  os.mkfifo(path)
  proc = _cli_subprocess(path, timeout=60)
  assert proc.returncode == 2, proc.stderr
  assert "FIFO" in proc.stderr and "Traceback" not in proc.stderr
  # Inside a checkpoint directory too.
  (tmp_path / "ckpt").mkdir()
  (tmp_path / "ckpt" / "_METADATA").write_text("{}")
  os.mkfifo(tmp_path / "ckpt" / "data")
  code, err = _cli(tmp_path / "ckpt")
  assert code == 2 and "FIFO" in err, err


@pytest.mark.parametrize("name", ["zero.msgpack", "zero.safetensors", "zero.onnx", "zero"])
def test_device_files_are_refused(tmp_path, name):
  if not os.path.exists("/dev/zero"):
    pytest.skip("no /dev/zero")
  (tmp_path / name).symlink_to("/dev/zero")
  proc = _cli_subprocess(tmp_path / name, timeout=60)
  assert proc.returncode == 2, proc.stderr
  assert "character device, not a regular file" in proc.stderr, proc.stderr


def _orbax_plain(tmp_path):
  """An orbax checkpoint written without OCDBT: one directory and one .zarray per array."""
  ocp = pytest.importorskip("orbax.checkpoint")
  path = tmp_path / "plain"
  with ocp.PyTreeCheckpointer(use_ocdbt=False) as c:
    c.save(str(path), {"params": {"Dense_0": {"kernel": _w24(), "bias": np.zeros(4, np.float32)}}})
  zarray = path / "params.Dense_0.kernel" / ".zarray"
  assert zarray.exists()
  return path, zarray


@pytest.mark.parametrize(
  "shape,chunks",
  [
    ([1 << 40, 1 << 40], [8, 4]),
    ([8, 4], [1 << 20, 1 << 20]),
    ([1 << 17, 1 << 17], [1 << 17, 1 << 17]),
  ],
  ids=["huge_shape", "huge_chunks", "huge_shape_and_chunks"],
)
def test_orbax_zarray_declaring_a_huge_array_exit_2_not_abort(tmp_path, shape, chunks):
  path, zarray = _orbax_plain(tmp_path)
  assert export.check_file(path).ok
  z = json.loads(zarray.read_text())
  z["shape"], z["chunks"] = shape, chunks
  zarray.write_text(json.dumps(z))
  proc = _cli_subprocess(path, timeout=120)
  assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
  assert "Traceback" not in proc.stderr
  assert "over the check's limit" in proc.stderr or "orbax cannot" in proc.stderr, proc.stderr


def test_max_bytes_refuses_a_file_over_it(cnn_msgpack, capsys):
  with pytest.raises(export.CheckError, match="over the check's limit of 1.0 KiB"):
    export.check_file(cnn_msgpack, max_bytes=1024)
  assert cli.main(["check", str(cnn_msgpack), "--max-bytes", "1K"]) == 2
  assert "over the check's limit" in capsys.readouterr().err
  assert cli.main(["check", str(cnn_msgpack), "--max-bytes", "1G"]) == 0


def _safetensors_bytes(header: dict, data: bytes) -> bytes:
  h = json.dumps(header).encode()
  return len(h).to_bytes(8, "little") + h + data


@pytest.mark.parametrize(
  "case", ["header_len", "offsets_past_end", "shape_vs_offsets", "dtype", "metadata_not_strings"]
)
def test_safetensors_size_lies_exit_2(tmp_path, case):
  pytest.importorskip("safetensors")
  ent = {"dtype": "F32", "shape": [4, 8], "data_offsets": [0, 128]}
  header = {"fc.weight": ent}
  data = _w24().T.astype(np.float32).tobytes()
  if case == "header_len":
    blob = (1 << 60).to_bytes(8, "little") + _safetensors_bytes(header, data)[8:]
  else:
    if case == "offsets_past_end":
      ent["data_offsets"] = [0, 1 << 40]
    elif case == "shape_vs_offsets":
      ent["shape"] = [1 << 30, 1 << 30]
    elif case == "dtype":
      ent["dtype"] = "OBJECT"
    else:
      header["__metadata__"] = {"jasp": {"n": 2}}
    blob = _safetensors_bytes(header, data)
  path = tmp_path / "m.safetensors"
  path.write_bytes(blob)
  code, err = _cli(path)
  assert code == 2 and "Traceback" not in err, err


@pytest.mark.parametrize("case", ["shape", "dtype", "record"])
def test_msgpack_array_size_lies_exit_2(tmp_path, case):
  import msgpack

  buf = _w24().astype(np.float32).tobytes()
  rec = {"shape": [1 << 20, 1 << 20], "dtype": "float32", "record": [8, 4]}
  parts = ([8, 4], "float32", buf)
  if case == "shape":
    parts = (rec["shape"], "float32", buf)
  elif case == "dtype":
    parts = ([8, 4], "object", buf)
  ext = msgpack.ExtType(1, msgpack.packb(parts if case != "record" else [8, 4]))
  path = tmp_path / "m.msgpack"
  path.write_bytes(msgpack.packb({"params": {"Dense_0": {"kernel": ext}}}))
  code, err = _cli(path)
  assert code == 2 and "Traceback" not in err, err


def test_onnx_tensor_data_shorter_than_its_dims_exit_2(tmp_path):
  model = _matmul_onnx(PRUNED_W)
  model.graph.initializer[0].dims[:] = [1 << 30, 1 << 30]
  path = tmp_path / "m.onnx"
  path.write_bytes(model.SerializeToString())
  code, err = _cli(path)
  assert code == 2 and "need" in err and "Traceback" not in err, err


@pytest.mark.parametrize("case", ["outside", "absolute", "fifo", "length", "past_end"])
def test_onnx_external_data_is_bounded(tmp_path, case):
  from onnx import TensorProto

  model = _matmul_onnx(PRUNED_W)
  t = model.graph.initializer[0]
  raw = t.raw_data
  t.ClearField("raw_data")
  t.data_location = TensorProto.EXTERNAL
  (tmp_path / "w.bin").write_bytes(raw)
  loc, extra = "w.bin", {}
  if case == "outside":
    loc = "../w.bin"
  elif case == "absolute":
    loc = str(tmp_path / "w.bin")
  elif case == "fifo":
    os.mkfifo(tmp_path / "w.fifo")
    loc = "w.fifo"
  elif case == "length":
    extra = {"length": str(1 << 40)}
  else:
    extra = {"offset": "64"}
  for k, v in {"location": loc, **extra}.items():
    e = t.external_data.add()
    e.key, e.value = k, v
  path = tmp_path / "m.onnx"
  path.write_bytes(model.SerializeToString())
  proc = _cli_subprocess(path, timeout=60)
  assert proc.returncode == 2, proc.stderr
  assert "Traceback" not in proc.stderr and "external data" in proc.stderr, proc.stderr


def test_onnx_external_data_read_back(tmp_path):
  from onnx import TensorProto

  model = _matmul_onnx(PRUNED_W)
  t = model.graph.initializer[0]
  (tmp_path / "w.bin").write_bytes(b"\0" * 16 + t.raw_data)
  t.ClearField("raw_data")
  t.data_location = TensorProto.EXTERNAL
  for k, v in {"location": "w.bin", "offset": "16", "length": "128"}.items():
    e = t.external_data.add()
    e.key, e.value = k, v
  path = tmp_path / "m.onnx"
  path.write_bytes(model.SerializeToString())
  report = export.check_file(path)
  assert report.ok and report.weights[0].nm
  with pytest.raises(export.CheckError, match="external file"):
    export.check_onnx(model)  # a proto alone: no directory to read it from


@pytest.mark.parametrize(
  "op,attrs,wshape",
  [
    ("Transpose", {"perm": [0, 0]}, (8, 4)),
    ("Transpose", {"perm": [5, 9]}, (8, 4)),
    ("Squeeze", {"axes": [7]}, (8, 4)),
    ("Unsqueeze", {"axes": [0, 0]}, (8, 4)),
    ("Gemm", {"transB": 7}, (8, 4)),
    ("Gemm", {}, (32,)),
    ("Conv", {}, (8, 4)),
    ("Einsum", {"equation": "...i...,ij->j"}, (8, 4)),
    ("Flatten", {"axis": 9}, (8, 4)),
    ("Concat", {"axis": 5}, (8, 4)),
  ],
  ids=[
    "transpose_repeated_perm",
    "transpose_perm_out_of_range",
    "squeeze_axis_out_of_range",
    "unsqueeze_repeated_axes",
    "gemm_bad_transB",
    "gemm_1d_weight",
    "conv_2d_weight",
    "einsum_two_ellipses",
    "flatten_axis_out_of_range",
    "concat_axis_out_of_range",
  ],
)
def test_malformed_graph_attributes_are_not_followed(tmp_path, op, attrs, wshape):
  onnx = pytest.importorskip("onnx")
  from onnx import TensorProto
  from onnx import helper
  from onnx import numpy_helper

  w = np.zeros(wshape, np.float32)
  if op in ("Transpose", "Squeeze", "Unsqueeze", "Flatten", "Concat"):
    nodes = [
      helper.make_node(op, ["W"], ["t"], **attrs),
      helper.make_node("MatMul", ["x", "t"], ["y"]),
    ]
    if op == "Squeeze" or op == "Unsqueeze":
      nodes[0] = helper.make_node(op, ["W"], ["t"])
      nodes[0].attribute.append(helper.make_attribute("axes", attrs["axes"]))
  elif op == "Einsum":  # W is the operand whose term has two ellipses
    nodes = [helper.make_node(op, ["W", "x"], ["y"], **attrs)]
  elif op == "Gemm":
    nodes = [helper.make_node(op, ["x", "W"], ["y"], **attrs)]
  else:
    nodes = [helper.make_node(op, ["x", "W"], ["y"])]
  graph = helper.make_graph(
    nodes,
    "g",
    [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
    [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    [numpy_helper.from_array(w, "W")],
  )
  model = helper.make_model(graph)
  entry = model.metadata_props.add()
  entry.key, entry.value = "jasp", json.dumps(PRUNED_W)
  path = tmp_path / "m.onnx"
  path.write_bytes(onnx.ModelProto.SerializeToString(model))
  code, err = _cli(path)
  assert code in (1, 2), err  # never a pass: the pruned W cannot be verified
  assert "Traceback" not in err and "internal error" not in err, err


def test_internal_error_is_exit_2_with_its_traceback(tmp_path, capsys, monkeypatch):
  from jasp.export import _check

  def broken(*args, **kwargs):
    raise RuntimeError("a bug")

  monkeypatch.setattr(_check, "check_file", broken)
  assert cli.main(["check", str(tmp_path / "x.onnx")]) == 2
  err = capsys.readouterr().err
  assert "Traceback" in err and "RuntimeError: a bug" in err and "internal error" in err


def test_names_from_the_file_are_printed_escaped(tmp_path, capsys):
  meta = json.loads(json.dumps(PRUNED_W))
  meta["weights"]["W"]["path"] = "params/\ud800\u001b[2J\u202e/kernel"
  path = tmp_path / "m.onnx"
  path.write_bytes(_matmul_onnx(json.dumps(meta)).SerializeToString())
  assert cli.main(["check", str(path)]) == 0
  out = capsys.readouterr().out
  assert "params/\\ud800\\x1b[2J\\u202e/kernel" in out
  assert "\x1b" not in out and "\u202e" not in out
  out.encode("utf-8")  # printable on a strict UTF-8 terminal


def test_a_graph_built_to_make_the_walk_slow_is_refused(tmp_path, monkeypatch):
  """Every weight reaches the same wide fan-out: the walk stops at MAX_VISITS."""
  pytest.importorskip("onnx")
  from onnx import TensorProto
  from onnx import helper
  from onnx import numpy_helper

  from jasp.export import _onnx_graph

  monkeypatch.setattr(_onnx_graph, "MAX_VISITS", 10_000)
  k = 150
  inits = [numpy_helper.from_array(np.zeros((4, 4), np.float32), f"w{i}") for i in range(k)]
  nodes = [helper.make_node("Concat", [f"w{i}" for i in range(k)], ["c"], axis=1)]
  nodes += [helper.make_node("Identity", ["c"], [f"y{j}"]) for j in range(k)]
  graph = helper.make_graph(
    nodes, "g", [], [helper.make_tensor_value_info("y0", TensorProto.FLOAT, None)], inits
  )
  path = tmp_path / "wide.onnx"
  path.write_bytes(helper.make_model(graph).SerializeToString())
  code, err = _cli(path)
  assert code == 2 and "more than 10000 steps" in err, err


def test_link_cycles_and_dangling_links_in_a_checkpoint_exit_2(tmp_path):
  (tmp_path / "ckpt").mkdir()
  (tmp_path / "ckpt" / "_METADATA").write_text("{}")
  (tmp_path / "ckpt" / "loop").symlink_to(tmp_path / "ckpt")
  code, err = _cli(tmp_path / "ckpt")
  assert code == 2 and "link cycle" in err, err
  (tmp_path / "ckpt" / "loop").unlink()
  (tmp_path / "ckpt" / "dangling").symlink_to(tmp_path / "nowhere")
  code, err = _cli(tmp_path / "ckpt")
  assert code == 2 and "dangling" in err and "cannot read" in err, err


def _tf_saved_model(path, variables: dict, meta=None):
  """A SavedModel holding ``{name: array}`` as variables (and ``meta`` as jasp.json)."""
  tf = pytest.importorskip("tensorflow", reason="needs the tf extra: pip install 'jasp[tf]'")
  module = tf.Module()
  module.params = {k: tf.Variable(v) for k, v in variables.items()}
  tf.saved_model.save(module, str(path))
  if meta is not None:
    (path / "assets.extra").mkdir(exist_ok=True)
    (path / "assets.extra" / "jasp.json").write_text(
      meta if isinstance(meta, str) else json.dumps(meta)
    )
  return path


def test_saved_model_without_weights_or_with_bad_metadata_exit_2(tmp_path):
  w = {"kernel": _w24()}
  sm = _tf_saved_model(tmp_path / "bias", {"bias": np.zeros(4, np.float32)})
  code, err = _cli(sm)
  assert code == 2 and "no weights found" in err, err
  good = {
    "n": 2,
    "m": 4,
    "weights": {"params/kernel": {"pruned": True, "axis": [0], "kind": "dot"}},
  }
  sm = _tf_saved_model(tmp_path / "ok", w, good)
  report = export.check_file(sm)
  assert report.ok and report.weights[0].expected_by == "metadata"
  gone = {"n": 2, "m": 4, "weights": {"params/gone": {"pruned": True, "axis": [0]}}}
  sm = _tf_saved_model(tmp_path / "gone", w, gone)
  code, err = _cli(sm)
  assert code == 2 and "params/gone" in err and "cannot verify" in err, err
  for meta, field in [
    ('{"n": "x"}', "'n'"),
    ('{"weights": {"params/kernel": []}}', "weights['params/kernel']"),
    ('{"weights": {"params/kernel": {"pruned": true, "axis": [5]}}}', "axis"),
  ]:
    sm = _tf_saved_model(tmp_path / f"bad{len(field)}", w, meta)
    code, err = _cli(sm)
    assert code == 2 and field in err and "Traceback" not in err, (meta, err)
