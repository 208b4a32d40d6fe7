"""The checker on flax checkpoints, its command line, and its errors (never a traceback)."""

import json
import os
import subprocess
import sys

import export_models as em
import numpy as np
import pytest
from flax import serialization

import jasp
from jasp import export
from jasp.export import cli


@pytest.fixture(scope="module")
def cnn_msgpack(tmp_path_factory):
  _, variables, _, _, _ = em.pruned_cnn()
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
  for p in em.PRUNED_CNN:
    assert by[p].nm and by[p].expected_by == "zeros", by[p]
  assert by["params/Conv_0/kernel"].status == "n/a"
  assert by["params/Conv_1/kernel"].axis == (2,)  # HWIO: along I


def test_orbax_checkpoint_with_masks(tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint", reason="needs the checkpoint extra: "
                            "pip install 'jasp[checkpoint]'")
  _, variables, masks, _, _ = em.pruned_cnn()
  kept = {mod: {"kernel": d["kernel"]} for mod, d in masks["params"].items()
          if d.get("kernel") is not None}  # orbax stores no None leaves
  ckpt = {"params": variables["params"], "masks": jax_to_numpy(kept)}
  path = tmp_path / "orbax"
  with ocp.PyTreeCheckpointer() as c:
    c.save(str(path), ckpt)
  report = export.check_file(path)
  assert report.ok and report.format == "orbax"
  by = report.by_name()
  for p in em.PRUNED_CNN:
    assert by[p].nm and by[p].expected_by == "mask", by[p]
  assert not by["params/Conv_0/kernel"].expected
  # The command line on the same checkpoint, as JSON.
  assert cli.main(["check", str(path), "--json"]) == 0


def test_check_params_and_expect_sparse(capsys, cnn_msgpack):
  _, variables, _, layouts, _ = em.pruned_cnn()
  report = export.check_params(variables, layouts=layouts)
  assert report.ok and len(report.weights) == 5
  # Expecting a weight that is dense fails; the regex replaces the default rule.
  report = export.check_params(variables, expect_sparse=r"Conv_0|Dense_0")
  assert not report.ok
  assert [w.param for w in report.failures] == ["params/Conv_0/kernel"]
  assert cli.main(["check", str(cnn_msgpack), "--expect-sparse", "Conv_0"]) == 1
  capsys.readouterr()
  # --n/--m: 2:4 weights are not 1:4.
  assert cli.main(["check", str(cnn_msgpack), "--n", "1", "--m", "4", "--json",
                   "--expect-sparse", r"Conv_[12]|Dense"]) == 1
  data = json.loads(capsys.readouterr().out)
  assert data["ok"] is False and data["n"] == 1
  assert {w["param"] for w in data["weights"] if w["status"] == "FAIL"} == set(em.PRUNED_CNN)


def test_dense_weights_with_many_zeros_must_be_nm():
  rng = np.random.default_rng(0)
  w = rng.normal(size=(16, 8)).astype(np.float32)
  w[rng.random(w.shape) < 0.5] = 0  # unstructured 50%
  report = export.check_params({"params": {"Dense_0": {"kernel": w}}})
  (c,) = report.weights
  assert c.status == "FAIL" and c.expected_by == "zeros"
  assert export.check_params({"params": {"Dense_0": {"kernel": w}}}, min_zeros=1.01).ok


@pytest.mark.parametrize("content,name", [
    (b"\x08\x07garbage that is no protobuf \xff\xff", "bad.onnx"),
    (b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}", "bad.safetensors"),
    (b"\xc1\xc1\xc1", "bad.msgpack"),
    (b"hello", "notes.txt"),
])
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
  proc = subprocess.run([sys.executable, "-m", "jasp.export.cli", "check",
                         str(tmp_path / "missing.onnx")], capture_output=True, text=True,
                        cwd=root, env=env, timeout=120)
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
  ocp = pytest.importorskip("orbax.checkpoint", reason="needs the checkpoint extra: "
                            "pip install 'jasp[checkpoint]'")
  _, variables, _, _, _ = em.pruned_cnn()
  tree = {"params": jax_to_numpy(variables["params"])}
  with ocp.CheckpointManager(str(tmp_path / "run")) as mgr:
    mgr.save(1, args=ocp.args.StandardSave(tree))
    mgr.save(2, args=ocp.args.StandardSave(tree))
    mgr.wait_until_finished()
  report = export.check_file(tmp_path / "run")  # the latest step, its single item
  assert report.ok and report.path.endswith("(2/default)")
  with ocp.CheckpointManager(str(tmp_path / "two"), item_names=("a", "b")) as mgr:
    mgr.save(1, args=ocp.args.Composite(a=ocp.args.StandardSave(tree),
                                        b=ocp.args.StandardSave(tree)))
    mgr.wait_until_finished()
  assert cli.main(["check", str(tmp_path / "two")]) == 2
  assert "pass the item's directory" in capsys.readouterr().err
  assert export.check_file(tmp_path / "two" / "1" / "a").ok
