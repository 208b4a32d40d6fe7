"""PyTorch layouts (numpy, no torch): every conversion both ways, safetensors files, apex masks."""

import jax
import numpy as np
import pytest
import testing
from zoo import finetuned

import jasp
from jasp import export

DOT = jasp.Layout((0,), (1,), kind="dot")


def _check_both_ways(w, layout, want_shape, index_map):
  """torch_weight moves every entry where ``index_map`` says, and flax_weight undoes it.

  ``index_map(t_idx) -> w_idx`` maps a grid of PyTorch indices to flax
  indices, written independently of the implementation.
  """
  t = export.torch_weight(w, layout)
  assert t.shape == want_shape
  idx = np.indices(t.shape)
  np.testing.assert_array_equal(t, w[index_map(*idx)])
  np.testing.assert_array_equal(export.flax_weight(t, w.shape, layout), w)
  # The other way round: a PyTorch array to flax and back.
  t2 = np.random.default_rng(1).normal(size=want_shape).astype(np.float32)
  w2 = export.flax_weight(t2, w.shape, layout)
  assert w2.shape == w.shape
  np.testing.assert_array_equal(export.torch_weight(w2, layout), t2)
  return t


def test_dense_in_out_to_out_in():
  w = testing.nm_along((48, 20), 0)  # flax (in, out), 2:4 along in
  t = _check_both_ways(w, DOT, (20, 48), lambda o, i: (i, o))
  assert bool(jasp.is_nm(t, 2, 4, axis=1)) and not bool(jasp.is_nm(t, 2, 4, axis=0))


@pytest.mark.parametrize("spatial", [(3,), (3, 5), (2, 3, 5)], ids=["1d", "2d", "3d"])
def test_conv_to_kcrs(spatial):
  nd = len(spatial) + 2
  w = testing.nm_along(spatial + (12, 20), nd - 2)  # (*spatial, in, out)
  layout = jasp.Layout((nd - 2,), (nd - 1,), kind="conv")
  t = _check_both_ways(w, layout, (20, 12) + spatial, lambda o, c, *s: tuple(s) + (c, o))
  assert bool(jasp.is_nm(t, 2, 4, axis=1)) and not bool(jasp.is_nm(t, 2, 4, axis=0))


def test_dense_general_and_attention_flatten_to_2d():
  # DenseGeneral / attention query: (in, heads, head_dim) -> (heads*head_dim, in)
  w = testing.nm_along((12, 2, 5), 0)
  layout = jasp.Layout((0,), (1, 2), kind="dot")
  t = _check_both_ways(w, layout, (10, 12), lambda o, i: (i, o // 5, o % 5))
  assert bool(jasp.is_nm(t, 2, 4, axis=1))
  # attention out / DenseGeneral(axis=(-2, -1)): (heads, head_dim, out) -> (out, heads*head_dim)
  w = testing.nm_along((2, 8, 20), (0, 1))
  layout = jasp.Layout((0, 1), (2,), kind="dot")
  t = _check_both_ways(w, layout, (20, 16), lambda o, i: (i // 8, i % 8, o))
  assert bool(jasp.is_nm(t, 2, 4, axis=1)) and not bool(jasp.is_nm(t, 2, 4, axis=0))


def test_non_weights_are_unchanged_and_keys_follow_pytorch():
  b = np.arange(5, dtype=np.float32)
  np.testing.assert_array_equal(export.torch_weight(b, jasp.Layout(None)), b)
  assert export.torch_key("params/Dense_0/kernel") == "Dense_0.weight"
  assert export.torch_key("params/Dense_0/bias") == "Dense_0.bias"
  assert export.torch_key("params/LayerNorm_0/scale") == "LayerNorm_0.weight"
  assert export.torch_key("batch_stats/BatchNorm_0/mean") == "BatchNorm_0.running_mean"
  assert export.torch_key("batch_stats/BatchNorm_0/var") == "BatchNorm_0.running_var"
  assert export.torch_key("params/Embed_0/embedding") == "Embed_0.weight"
  assert export.torch_key("attn/query/kernel") == "attn.query.weight"  # nnx


def test_state_dict_round_trip_with_apex_masks():
  _, variables, masks, layouts, _ = finetuned.pruned_cnn()
  state, info = export.to_torch_state_dict(variables, layouts=layouts, masks=masks, apex_masks=True)
  assert state["Dense_0.weight"].shape == (64, 2048)
  assert state["Conv_1.weight"].shape == (32, 8, 3, 3)  # KCRS, grouped: C/groups = 8
  assert state["Conv_2.weight"].shape == (32, 32, 3)
  assert state["BatchNorm_0.running_var"].shape == (16,)
  for p in finetuned.PRUNED_CNN:
    key = export.torch_key(p)
    mkey = key.rpartition(".")[0] + ".__weight_mma_mask"
    assert state[mkey].dtype == np.bool_ and state[mkey].shape == state[key].shape
    np.testing.assert_array_equal(state[key] * state[mkey], state[key])
    assert bool(jasp.is_nm(state[key], 2, 4, axis=1)) and info[key]["pruned"]
  assert "Conv_0.__weight_mma_mask" not in state and not info["Conv_0.weight"]["pruned"]
  back = export.from_torch_state_dict(state, variables, layouts=layouts)
  for p, v in jasp._tree.leaves_by_path(variables).items():
    np.testing.assert_array_equal(jasp._tree.leaves_by_path(back)[p], v)


def test_safetensors_file_round_trip_and_check(tmp_path):
  pytest.importorskip(
    "safetensors", reason="needs the safetensors extra: pip install 'jasp[safetensors]'"
  )
  model, variables, masks, layouts, x = finetuned.pruned_block()
  path = tmp_path / "block.safetensors"
  export.save_safetensors(path, variables, layouts=layouts, masks=masks)
  raw = export.load_safetensors(path)
  assert raw["MultiHeadDotProductAttention_0.out.weight"].shape == (32, 32)
  assert raw["DenseGeneral_0.weight"].shape == (128, 32)
  assert raw["DenseGeneral_0.weight_mask"].dtype == np.bool_
  back = export.load_safetensors(path, like=variables)  # layouts come from the file
  np.testing.assert_array_equal(
    np.asarray(model.apply(back, x)), np.asarray(model.apply(variables, x))
  )
  report = export.check_file(path)
  assert report.ok and report.format == "safetensors"
  by_param = report.by_param()
  for p in finetuned.PRUNED_BLOCK:
    assert by_param[p].nm and by_param[p].expected and by_param[p].axis == (1,), by_param[p]
  for p in finetuned.DENSE_BLOCK:
    assert by_param[p].status == "dense", by_param[p]


def test_plain_safetensors_swapped_axis_fails(tmp_path):
  """A torch-layout file without jasp metadata, pruned along the wrong axis, fails the check."""
  st = pytest.importorskip(
    "safetensors.numpy", reason="needs the safetensors extra: pip install 'jasp[safetensors]'"
  )
  good = testing.nm_along((20, 48), 1)  # Linear (out, in), 2:4 along in
  bad = testing.nm_along((20, 48), 0)  # 2:4 along out: the flax (in, out) rule left untransposed
  mask = np.asarray(good != 0)
  path = tmp_path / "plain.safetensors"
  st.save_file(
    {
      "fc1.weight": good,
      "fc2.weight": bad,
      "fc1.__weight_mma_mask": mask,
      "fc1.bias": np.zeros(20, np.float32),
      "embed.weight": np.zeros((7, 3), np.float32),
    },
    str(path),
  )
  r = export.check_file(path).by_name()
  assert set(r) == {"fc1.weight", "fc2.weight"}
  assert r["fc1.weight"].nm and r["fc1.weight"].expected_by == "mask"
  assert r["fc2.weight"].status == "FAIL" and "along axis 0 instead" in r["fc2.weight"].note
  # a weight that breaks its own mask fails too
  st.save_file(
    {
      "fc1.weight": np.ones((20, 48), np.float32) * mask + (~mask) * 0.5,
      "fc1.__weight_mma_mask": mask,
    },
    str(path),
  )
  w = export.check_file(path).by_name()["fc1.weight"]
  assert w.status == "FAIL" and "where its mask is False" in w.note


def test_masks_of_the_params_collection_or_the_whole_dict():
  _, variables, masks, layouts, _ = finetuned.pruned_cnn()
  want, _ = export.to_torch_state_dict(variables, layouts=layouts, masks=masks)
  assert "Dense_0.weight_mask" in want
  # masks["params"] with the variables dict, and the whole masks with variables["params"].
  params_layouts = {p[len("params/") :]: v for p, v in layouts.items() if p.startswith("params/")}
  for params, lay, mk in [
    (variables, layouts, masks["params"]),
    (variables["params"], params_layouts, masks),
  ]:
    state, info = export.to_torch_state_dict(params, layouts=lay, masks=mk)
    for key in ("Dense_0.weight_mask", "Conv_1.weight_mask"):
      np.testing.assert_array_equal(state[key], want[key])
    assert info["Dense_0.weight"]["pruned"] and not info["Conv_0.weight"]["pruned"]
  # Packed masks are unpacked.
  packed = jasp.pack_masks(masks, {p: layouts[p].axis for p in finetuned.PRUNED_CNN})
  state, _ = export.to_torch_state_dict(variables, layouts=layouts, masks=packed)
  np.testing.assert_array_equal(state["Dense_0.weight_mask"], want["Dense_0.weight_mask"])


def test_masks_that_match_no_param_are_an_error(tmp_path):
  pytest.importorskip(
    "safetensors", reason="needs the safetensors extra: pip install 'jasp[safetensors]'"
  )
  _, variables, masks, layouts, _ = finetuned.pruned_cnn()
  # Masks of another tree (paths under "encoder/"): without the check no mask is written
  # and every weight is marked unpruned in the file.
  other = {"encoder": masks["params"]}
  with pytest.raises(
    ValueError,
    match=r"4 mask\(s\) match no leaf of the params: "
    r"'encoder/Conv_1/kernel', 'encoder/Conv_2/kernel', 'encoder/Dense_0/kernel'"
    r" and 1 more",
  ):
    export.save_safetensors(tmp_path / "m.safetensors", variables, layouts=layouts, masks=other)
  bad = jax.tree.map(lambda a: a, masks, is_leaf=lambda x: x is None)
  bad["params"]["Dense_0"]["kernel"] = bad["params"]["Dense_0"]["kernel"].T
  with pytest.raises(ValueError, match=r"mask for 'params/Dense_0/kernel' has shape \(64, 2048\)"):
    export.to_torch_state_dict(variables, layouts=layouts, masks=bad)
  bad["params"]["Dense_0"]["kernel"] = masks["params"]["Dense_0"]["kernel"].astype(np.uint8)
  with pytest.raises(TypeError, match=r"mask for 'params/Dense_0/kernel' has dtype uint8"):
    export.to_torch_state_dict(variables, layouts=layouts, masks=bad)


def test_malformed_layouts_and_info_are_named():
  _, variables, _, layouts, _ = finetuned.pruned_cnn()
  with pytest.raises(ValueError, match="start with 'params/' and the tree's do not"):
    export.to_torch_state_dict(variables["params"], layouts=layouts)
  with pytest.raises(TypeError, match=r"layouts\['params/Dense_0/kernel'\] is 0"):
    export.to_torch_state_dict(variables, layouts={**layouts, "params/Dense_0/kernel": 0})
  wrong = jasp.Layout((2,), (1,), kind="dot")
  with pytest.raises(
    ValueError,
    match=r"layout of 'params/Dense_0/kernel' \(axis \(2,\), "
    r"out_axes \(1,\)\) does not fit its shape \(2048, 64\)",
  ):
    export.to_torch_state_dict(variables, layouts={**layouts, "params/Dense_0/kernel": wrong})
  with pytest.raises(ValueError, match="must be distinct"):
    export.torch_weight(np.ones((8, 4)), jasp.Layout((0,), (0,), kind="dot"))
  state, info = export.to_torch_state_dict(variables, layouts=layouts)
  info = {**info, "Dense_0.weight": {"kind": "dot"}}
  with pytest.raises(ValueError, match=r"info of 'Dense_0.weight' .* lacks a list 'axis'"):
    export.from_torch_state_dict(state, variables, info=info)
  with pytest.raises(TypeError, match="torch_key takes a path string"):
    export.torch_key(("params", "Dense_0", "kernel"))
