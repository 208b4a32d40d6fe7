"""jasp.enforcement holds masks 1 bit per weight in its state, whatever form they are given in.

The oracles are NumPy: ``np.unpackbits`` reads the bits of the state, and the
N:M pattern of the trained params is counted group by group.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
import testing
from flax import nnx
from zoo import basic

import jasp
from jasp import _tree


def _token_block():
  model, variables, x = basic.token_block()
  lay = jasp.trace_layouts(model.apply, variables, x)
  params = variables["params"]
  masks = jasp.compute_masks({"params": params}, layouts=lay)["params"]
  axes = {
    p: d.axis for p, d in jasp.policy.plan({"params": params}, layouts=lay).items() if d.prune
  }
  y = jax.random.randint(jax.random.key(7), x.shape, 0, 32)

  def loss(p):
    logits = model.apply({"params": p}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  return params, masks, loss, {p.removeprefix("params/"): a for p, a in axes.items()}


def _digits_cnn():
  model, variables, x = basic.digits_cnn()
  lay = jasp.trace_layouts(model.apply, variables, x)
  masks = jasp.compute_masks(variables, layouts=lay)["params"]
  axes = {p: d.axis for p, d in jasp.policy.plan(variables, layouts=lay).items() if d.prune}
  y = jnp.arange(x.shape[0]) % 10

  def loss(p):
    logits = model.apply({"params": p, "batch_stats": variables["batch_stats"]}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  return variables["params"], masks, loss, {p.removeprefix("params/"): a for p, a in axes.items()}


def _unpackbits(leaf) -> np.ndarray:
  """The bool mask a PackedMask holds, read with NumPy (bit j of byte b = entry 8b + j)."""
  (a,) = leaf.axis  # a state packs bool masks along one axis
  bits = np.unpackbits(np.asarray(leaf.bits), axis=a, bitorder="little")
  return np.take(bits, np.arange(leaf.shape[a]), axis=a).astype(bool)


def _nm_ok(w, axis, n=2, m=4) -> bool:
  """At most ``n`` non-zeros in every group of ``m`` along the flattened ``axis``."""
  nz = np.asarray(w, np.float32) != 0
  a0, a1 = min(axis), max(axis)
  nz = np.moveaxis(nz.reshape(nz.shape[:a0] + (-1,) + nz.shape[a1 + 1 :]), a0, -1)
  return bool((nz.reshape(-1, nz.shape[-1] // m, m).sum(-1) <= n).all())


def _by_path(masks) -> dict:
  """``{path: mask leaf}`` (a bool array or a PackedMask) of a masks tree, dense leaves left out."""
  return {p: x for p, x in _tree.leaves_by_path(masks, keep_none=True).items() if x is not None}


@pytest.mark.parametrize("kind", ["mask_updates", "mask_gradients", "sparse_optimizer"])
def test_state_holds_packed_bits_when_given_bool(kind):
  params, masks, _, _ = _token_block()
  tx = {
    "mask_updates": lambda: jasp.mask_updates(masks),
    "mask_gradients": lambda: jasp.mask_gradients(masks),
    "sparse_optimizer": lambda: jasp.sparse_optimizer(optax.adam(1e-3), masks),
  }[kind]()
  held = _by_path(tx.init(params).masks)
  given = _by_path(masks)
  assert set(held) == set(given) and len(given) >= 5
  for p, leaf in held.items():
    assert isinstance(leaf, jasp.PackedMask), p
    assert np.asarray(leaf.bits).dtype == np.uint8, p
    assert leaf.bits_per_weight == 1.0, (p, leaf.shape)  # every axis here divides by 8
    np.testing.assert_array_equal(_unpackbits(leaf), np.asarray(given[p]), err_msg=p)


def test_get_masks_returns_the_form_given():
  params, masks, _, _ = _token_block()
  want = {p: np.asarray(x) for p, x in _by_path(masks).items()}
  packed = jasp.pack_masks(masks)
  first = sorted(want)[0]
  mixed = _tree.map_with_path(  # the first masked leaf packed, the others bool
    lambda p, x: _by_path(packed)[p] if p == first else x, masks
  )
  for given in (masks, packed, mixed):
    state = optax.chain(optax.adam(1e-3), jasp.mask_updates(given)).init(params)
    for got in (jasp.get_masks(state), jax.jit(jasp.get_masks)(state)):
      form, have = _by_path(given), _by_path(got)
      assert set(have) == set(want)
      for p in want:
        assert type(have[p]) is type(form[p]), p  # a bool array, or a PackedMask as given
        np.testing.assert_array_equal(jasp.packing.as_bool(have[p]), want[p], err_msg=p)
    for p, leaf in _by_path(jasp.get_masks(state, packed=True)).items():
      assert type(leaf) is jasp.PackedMask, p
      np.testing.assert_array_equal(jasp.packing.as_bool(leaf), want[p], err_msg=p)
    for p, leaf in _by_path(jasp.get_masks(state, packed=False)).items():
      assert not isinstance(leaf, jasp.PackedMask) and leaf.dtype == bool, p
      np.testing.assert_array_equal(leaf, want[p], err_msg=p)
  with pytest.raises(ValueError, match="packed must be"):
    jasp.get_masks(state, packed="yes")


def test_unpackable_leaves_stay_bool():
  params = {
    "w": jnp.ones((16, 8)),
    "s": jnp.ones(()),
    "e": jnp.ones((0, 4)),
    "odd": jnp.ones((3, 5)),
  }
  masks = {
    "w": jnp.asarray(testing.nm_along((16, 8), 0) != 0),
    "s": jnp.asarray(True),
    "e": jnp.ones((0, 4), bool),
    "odd": jnp.asarray(np.arange(15).reshape(3, 5) % 2 == 0),
  }
  state = jasp.mask_updates(masks).init(params)
  assert isinstance(state.masks["w"], jasp.PackedMask) and state.masks["w"].axis == (1,)
  assert not isinstance(state.masks["s"], jasp.PackedMask)  # a scalar: no axis to pack along
  assert not isinstance(state.masks["e"], jasp.PackedMask)  # empty: nothing to save
  # no axis divides by 8: packed along the last axis, padded to one byte per row
  assert state.masks["odd"].axis == (1,) and np.shape(state.masks["odd"].bits) == (3, 1)
  for k, v in jasp.get_masks(state).items():
    np.testing.assert_array_equal(v, masks[k])
  u, _ = jasp.mask_updates(masks).update(params, state, params)
  new = optax.apply_updates(params, u)
  for k in params:
    np.testing.assert_array_equal(np.asarray(new[k]) != 0, np.asarray(masks[k]))


@pytest.mark.slow
@pytest.mark.parametrize("model", ["digits_cnn", "token_block"])
@pytest.mark.parametrize("kind", ["mask_updates", "sparse_optimizer"])
def test_params_stay_exactly_nm_over_many_adamw_steps(model, kind):
  params, masks, loss, axes = {"digits_cnn": _digits_cnn, "token_block": _token_block}[model]()
  inner = optax.adamw(3e-2, weight_decay=0.1)
  tx = (
    optax.chain(inner, jasp.mask_updates(masks))
    if kind == "mask_updates"
    else jasp.sparse_optimizer(inner, masks)
  )
  state = tx.init(params)  # params NOT pruned beforehand
  assert all(
    isinstance(x, jasp.PackedMask) for x in _by_path(jasp.get_masks(state, packed=True)).values()
  )

  @jax.jit
  def step(p, s):
    u, s = tx.update(jax.grad(loss)(p), s, p)
    return optax.apply_updates(p, u), s

  p0 = params
  for i in range(25):
    params, state = step(params, state)
    if i % 8 == 0 or i == 24:
      testing.assert_masked(params, masks)
  w, w0, mk = testing.leaves(params), testing.leaves(p0), _by_path(masks)
  kernels = [p for p in mk if p.endswith("kernel")]
  assert len(kernels) >= 4 and set(kernels) <= set(axes)
  for p in kernels:
    assert _nm_ok(w[p], axes[p]), p
    assert (np.asarray(w[p])[np.asarray(mk[p])] != np.asarray(w0[p])[np.asarray(mk[p])]).any(), p
  for p in set(w) - set(mk):  # dense leaves train freely
    assert not np.array_equal(w[p], w0[p]) or "bias" in p, p


@pytest.mark.slow
def test_update_masks_accepts_either_form_and_get_masks_follows():
  params, masks, loss, _ = _token_block()
  tx = optax.chain(optax.adam(1e-2), jasp.mask_updates(jasp.pack_masks(masks)))

  @jax.jit
  def step(p, s):
    u, s = tx.update(jax.grad(loss)(p), s, p)
    return optax.apply_updates(p, u), s

  params, state = step(params, tx.init(params))
  moments = state[0]
  new_bool = jasp.compute_masks({"params": params}, n=1, m=4)["params"]
  for new in (new_bool, jasp.pack_masks(new_bool)):
    s2 = jasp.update_masks(state, new)
    for a, b in zip(jax.tree.leaves(s2[0]), jax.tree.leaves(moments)):
      np.testing.assert_array_equal(a, b)
    got, want = _by_path(jasp.get_masks(s2)), _by_path(new)
    for p in want:
      assert type(got[p]) is type(want[p]), p
      np.testing.assert_array_equal(jasp.packing.as_bool(got[p]), jasp.packing.as_bool(want[p]))
    assert all(isinstance(x, jasp.PackedMask) for x in _by_path(s2[1].masks).values())
    p2 = params
    for _ in range(3):
      p2, s2 = step(p2, s2)
    testing.assert_masked(p2, new_bool)


def test_nnx_optimizer_holds_packed_masks():
  model, tokens = basic.nnx_token_block()
  lay = jasp.trace_layouts(model, tokens)
  masks = jasp.compute_masks(nnx.state(model, nnx.Param), layouts=lay)
  y = jax.random.randint(jax.random.key(3), tokens.shape, 0, 32)
  tx = jasp.sparse_optimizer(optax.adamw(1e-2), masks)
  l0, l1, opt = testing.nnx_token_steps(model, tx, tokens, y, steps=5)
  assert l1 < l0
  testing.assert_masked(nnx.state(model, nnx.Param), masks)
  got = jasp.get_masks(opt.opt_state)
  want = _by_path(masks)
  have = _by_path(got)
  assert set(have) == set(want)
  for p in want:
    np.testing.assert_array_equal(np.asarray(have[p]), np.asarray(want[p]), err_msg=p)
  held = _by_path(jasp.get_masks(opt.opt_state, packed=True))
  assert held and all(isinstance(x, jasp.PackedMask) for x in held.values())


def test_step_with_bool_given_masks_materialises_no_bool_mask():
  k, n = 2048, 1024
  w = jax.random.normal(jax.random.key(0), (k, n))
  masks = jasp.compute_masks({"w": w}, layouts={"w": jasp.Layout((0,), (1,), "dot")})
  for tx in (jasp.mask_updates(masks), jasp.sparse_optimizer(optax.sgd(1e-2), masks)):
    state = tx.init({"w": w})
    compiled = (
      jax.jit(lambda u, s, p, tx=tx: tx.update(u, s, p)[0])
      .lower({"w": w}, state, {"w": w})
      .compile()
    )
    mem = compiled.memory_analysis()
    if mem is None:
      pytest.skip("this backend reports no memory analysis")
    assert mem.argument_size_in_bytes < 2 * 4 * k * n + k * n // 4, mem  # bits, not bytes
    assert mem.temp_size_in_bytes < k * n // 4, mem


def _save(path, tree):
  with ocp.StandardCheckpointer() as cp:
    cp.save(path, tree)


def _restore(path, target):
  with ocp.StandardCheckpointer() as cp:
    return cp.restore(path, target)


@pytest.mark.slow
def test_checkpoint_round_trip_and_a_state_saved_with_bool_masks(tmp_path):
  params, masks, loss, _ = _token_block()
  params = jasp.apply_masks(params, masks)
  tx = jasp.sparse_optimizer(optax.adamw(1e-2, weight_decay=0.1), masks)

  @jax.jit
  def step(p, s):
    u, s = tx.update(jax.grad(loss)(p), s, p)
    return optax.apply_updates(p, u), s

  state = tx.init(params)
  for _ in range(2):
    params, state = step(params, state)
  ref_p, ref_s = params, state
  for _ in range(3):
    ref_p, ref_s = step(ref_p, ref_s)

  def same(got, want):
    # Bit for bit on CPU. On a GPU the programs of the two layouts (and of a
    # restored state) may fuse AdamW's arithmetic differently: 1 ulp was seen.
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      a, b = np.atleast_1d(np.asarray(a)), np.atleast_1d(np.asarray(b))
      if jax.default_backend() == "cpu":
        np.testing.assert_array_equal(a.view(np.uint8), b.view(np.uint8))
      else:
        np.testing.assert_allclose(a.astype(np.float64), b.astype(np.float64), rtol=2e-6, atol=0)

  def resume(p, s):
    for _ in range(3):
      p, s = step(p, s)
    same(p, ref_p)
    return s

  # The packed state round-trips and resumes bit for bit.
  _save(tmp_path / "new", {"p": params, "s": state})
  back = _restore(tmp_path / "new", {"p": params, "s": tx.init(params)})
  same(resume(back["p"], back["s"]), ref_s)
  # A state as jasp saved it before (bool masks) restores into with_bool_masks'
  # layout, runs as it is, and packs again through update_masks.
  old = jasp.with_bool_masks(state)
  assert not _by_path(old.masks) or not any(
    isinstance(x, jasp.PackedMask) for x in _by_path(old.masks).values()
  )
  _save(tmp_path / "old", {"p": params, "s": old})
  target = {"p": params, "s": jasp.with_bool_masks(tx.init(params))}
  back = _restore(tmp_path / "old", target)
  resume(back["p"], back["s"])
  repacked = jasp.update_masks(back["s"], jasp.get_masks(back["s"]))
  assert jax.tree.structure(repacked) == jax.tree.structure(state)
  same(resume(back["p"], repacked), ref_s)
