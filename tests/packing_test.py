"""jasp.packing: 1-bit masks behave exactly like bool masks everywhere."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
import testing
from zoo import basic

import jasp
from jasp import _tree


@pytest.mark.parametrize(
  "shape,axis",
  [
    ((16, 5), 0),
    ((3, 3, 12, 7), 2),
    ((2, 4, 8), (0, 1)),
    ((5, 24), 1),
    ((12,), 0),
    ((8, 3, 16), -1),
  ],
  ids=testing.param_id,
)
def test_roundtrip(shape, axis):
  rng, _ = testing.fresh_rng()
  m = jnp.asarray(rng.random(shape) > 0.5)
  p = jasp.packing.pack(m, axis)
  assert p.bits.dtype == jnp.uint8
  np.testing.assert_array_equal(np.asarray(jasp.packing.unpack(p)), np.asarray(m))
  np.testing.assert_array_equal(np.asarray(jax.jit(jasp.packing.unpack)(p)), np.asarray(m))
  k = int(np.prod([shape[a] for a in ((axis,) if isinstance(axis, int) else axis)]))
  if k % 8 == 0:
    assert p.bits_per_weight == 1.0


def test_packed_masks_through_the_api(tmp_path):
  model, variables, x = basic.token_block()
  lay = jasp.trace_layouts(model.apply, variables, x)
  bool_masks = jasp.compute_masks(variables, layouts=lay)
  packed = jasp.compute_masks(variables, layouts=lay, packed=True)
  unpacked = jasp.unpack_masks(packed)
  for a, b in zip(jax.tree.leaves(unpacked), jax.tree.leaves(bool_masks)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # apply_masks
  for a, b in zip(
    jax.tree.leaves(jasp.apply_masks(variables, packed)),
    jax.tree.leaves(jasp.apply_masks(variables, bool_masks)),
  ):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # report: 1 bit per weight
  r = jasp.sparsity_report(jasp.apply_masks(variables, packed), packed, layouts=lay)
  assert r.all_valid
  assert {e.mask_bits_per_weight for e in r.pruned} == {1.0}
  # enforcement gives bit-identical training to bool masks
  params = variables["params"]
  y = jax.random.randint(jax.random.key(5), x.shape, 0, 32)

  def loss(p):
    return optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": p}, x), y).mean()

  results = []
  for mk in (bool_masks["params"], packed["params"]):
    tx = jasp.sparse_optimizer(optax.adamw(1e-2, weight_decay=0.1), mk)
    p, s = params, tx.init(params)

    def step(p, s, tx=tx):
      u, s = tx.update(jax.grad(loss)(p), s, p)
      return optax.apply_updates(p, u), s

    step = jax.jit(step)
    for _ in range(2):
      p, s = step(p, s)
    results.append((p, s))
  for a, b in zip(jax.tree.leaves(results[0][0]), jax.tree.leaves(results[1][0])):
    a, b = np.asarray(a), np.asarray(b)
    np.testing.assert_array_equal(a == 0, b == 0)
    if jax.default_backend() == "cpu":  # GPU fusions may reassociate differently
      np.testing.assert_array_equal(a, b)
    else:
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  # the packed state checkpoints through orbax
  with ocp.StandardCheckpointer() as cp:
    cp.save(tmp_path / "c", {"state": results[1][1]})
  with ocp.StandardCheckpointer() as cp:
    back = cp.restore(tmp_path / "c", {"state": results[1][1]})
  got = jasp.get_masks(back["state"])
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(packed["params"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert any(
    isinstance(v, jasp.PackedMask) for v in _tree.leaves_by_path(got, keep_none=True).values()
  )


def test_update_step_never_materialises_a_bool_mask():
  # A large weight; the jitted mask_updates step with packed masks must not
  # hold a K x N byte buffer: its temporaries stay far below one byte/weight.
  k, n = 2048, 1024
  w = jax.random.normal(jax.random.key(0), (k, n))
  packed = jasp.compute_masks({"w": w}, packed=True, layouts={"w": jasp.Layout((0,), (1,), "dot")})
  tx = jasp.mask_updates(packed)
  state = tx.init({"w": w})
  f = jax.jit(lambda u, s, p: tx.update(u, s, p)[0])
  compiled = f.lower({"w": w}, state, {"w": w}).compile()
  mem = compiled.memory_analysis()
  if mem is None:
    pytest.skip("this backend reports no memory analysis")
  assert mem.temp_size_in_bytes < k * n // 4, mem


def test_malformed_masks_are_named():
  # A float mask would be packed as its integer part (0.5 -> dropped) without the check.
  with pytest.raises(
    TypeError, match=r"pack\(\) takes a bool mask, got ArrayImpl of dtype float32"
  ):
    jasp.packing.pack(jnp.full((8, 4), 0.5))
  with pytest.raises(ValueError, match="out of range"):
    jasp.packing.pack(jnp.ones((8, 4), bool), 2)
  # A PackedMask whose axis its shape does not have fails when made, not later in unpack.
  with pytest.raises(ValueError, match=r"PackedMask of shape \(8, 4\): axis \(5,\)"):
    jasp.PackedMask(jnp.zeros((1, 4), jnp.uint8), (8, 4), (5,))
  masks = {"a": jnp.ones((8, 4), bool), "b": None, "c": jnp.ones((8, 4), jnp.int32)}
  with pytest.raises(TypeError, match="axes must be a"):
    jasp.pack_masks(masks, [0])
  with pytest.raises(
    TypeError, match=r"the mask for 'c' \(shape \(8, 4\)\): pack\(\) takes a bool"
  ):
    jasp.pack_masks(masks)
  with pytest.raises(
    ValueError, match=r"the mask for 'a' \(shape \(8, 4\)\): axis 3 is out of range"
  ):
    jasp.pack_masks({"a": masks["a"]}, {"a": 3})
