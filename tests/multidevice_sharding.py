"""Sharded params on several devices (run by sharding_test.py in a subprocess with
XLA_FLAGS=--xla_force_host_platform_device_count=8, or directly on several GPUs:
`python -m pytest tests/multidevice_sharding.py`)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jasp

pytestmark = pytest.mark.skipif(jax.device_count() < 2, reason="needs several devices")

COLLECTIVES = ("all-gather", "all-reduce", "collective-permute", "all-to-all", "reduce-scatter")


def _mesh():
  n = jax.device_count()
  model = 4 if n % 4 == 0 else n
  return jax.make_mesh((n // model, model), ("data", "model"))


def _no_collectives(compiled_text: str):
  found = [c for c in COLLECTIVES if c in compiled_text]
  assert not found, f"collectives in the compiled HLO: {found}"


def _params(mesh):
  rng = np.random.default_rng(0)
  specs = {
    "dense_in_sharded": ((256, 96), P("model", None)),  # group axis sharded: 64 per shard
    "dense_out_sharded": ((128, 64), P(None, "model")),  # other axis sharded
    "dense_2d": ((128, 64), P("model", "data")),  # both
    "conv": ((3, 3, 64, 32), P(None, None, "model", "data")),
    "attn_out": ((8, 16, 64), P("model", None, None)),  # groups over (heads, head_dim)
  }
  params, layouts = {}, {}
  for name, (shape, spec) in specs.items():
    w = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    params[name] = jax.device_put(w, NamedSharding(mesh, spec))
  layouts = {
    "dense_in_sharded": jasp.Layout((0,), (1,), "dot"),
    "dense_out_sharded": jasp.Layout((0,), (1,), "dot"),
    "dense_2d": jasp.Layout((0,), (1,), "dot"),
    "conv": jasp.Layout((2,), (3,), "conv"),
    "attn_out": jasp.Layout((0, 1), (2,), "dot"),
  }
  return params, layouts


def test_masks_keep_sharding_and_match_unsharded():
  mesh = _mesh()
  params, layouts = _params(mesh)
  for packed in (False, True):
    masks = jasp.compute_masks(params, layouts=layouts, packed=packed)
    ref = jasp.compute_masks(jax.device_get(params), layouts=layouts)
    for k, w in params.items():
      mk = masks[k]
      arr = mk.bits if packed else mk
      if not packed:
        assert arr.sharding.is_equivalent_to(w.sharding, w.ndim), (k, arr.sharding, w.sharding)
        np.testing.assert_array_equal(np.asarray(mk), np.asarray(ref[k]))
      else:
        assert not arr.sharding.is_fully_replicated, k
        np.testing.assert_array_equal(np.asarray(jasp.packing.unpack(mk)), np.asarray(ref[k]))
    pruned = jasp.apply_masks(params, masks)
    for k, w in params.items():
      assert pruned[k].sharding.is_equivalent_to(w.sharding, w.ndim), k


def test_mask_computation_has_no_collectives():
  mesh = _mesh()
  params, layouts = _params(mesh)
  for k, w in params.items():
    axis = layouts[k].axis
    f = jax.jit(lambda x, axis=axis: jasp.nm_mask(x, 2, 4, axis, impl="xla"))
    _no_collectives(f.lower(w).compile().as_text())
    g = jax.jit(
      lambda x, axis=axis: jasp.packing.pack(jasp.nm_mask(x, 2, 4, axis, impl="xla"), axis)
    )
    _no_collectives(g.lower(w).compile().as_text())


def test_training_step_sharded_no_collectives():
  mesh = _mesh()
  params, layouts = _params(mesh)
  for packed in (False, True):
    masks = jasp.compute_masks(params, layouts=layouts, packed=packed)
    tx = jasp.sparse_optimizer(optax.adamw(1e-2, weight_decay=0.1), masks)
    state = tx.init(params)
    for k, held in state.masks.items():  # bool masks too are held packed, still sharded
      assert isinstance(held, jasp.PackedMask), k
      assert not held.bits.sharding.is_fully_replicated, (k, held.bits.sharding)

    def step(p, s, g, tx=tx):
      u, s = tx.update(g, s, p)
      return optax.apply_updates(p, u), s

    grads = jax.tree.map(lambda w: w * 0.5 + 1.0, params)
    compiled = jax.jit(step).lower(params, state, grads).compile()
    _no_collectives(compiled.as_text())
    new_p, _ = jax.jit(step)(params, state, grads)
    bool_masks = jasp.unpack_masks(masks)
    for k, w in new_p.items():
      assert w.sharding.is_equivalent_to(params[k].sharding, w.ndim), k
      assert (np.asarray(w)[~np.asarray(bool_masks[k])] == 0).all(), k


def test_shard_boundary_splitting_a_group_raises():
  mesh = _mesh()
  n_model = mesh.shape["model"]
  w = jax.device_put(
    jnp.ones((4 * n_model + 2 * n_model, 8)),  # 6 rows per shard
    NamedSharding(mesh, P("model", None)),
  )
  with pytest.raises(ValueError, match=r"group axis \(0,\).*straddle"):
    jasp.compute_masks({"w": w}, layouts={"w": jasp.Layout((0,), (1,), "dot")})


def test_shard_map_local_masks_equal_global():
  mesh = _mesh()
  params, _ = _params(mesh)
  w = params["dense_in_sharded"]
  try:
    shard_map = jax.shard_map
  except AttributeError:  # pragma: no cover
    from jax.experimental.shard_map import shard_map
  local = shard_map(
    lambda x: jasp.nm_mask(x, impl="xla"),
    mesh=mesh,
    in_specs=P("model", None),
    out_specs=P("model", None),
  )(w)
  np.testing.assert_array_equal(np.asarray(local), np.asarray(jasp.nm_mask(jax.device_get(w))))


def test_state_packs_along_an_axis_that_keeps_the_sharding():
  mesh = _mesh()
  n_model = mesh.shape["model"]
  put = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))
  masks = {
    # last axis 8 per shard: packed along it, the bits sharded the same way
    "last": put(jnp.ones((6, 8 * n_model), bool), P(None, "model")),
    # last axis 5 per shard, axis 0 8 per shard: packed along axis 0
    "first": put(jnp.ones((8 * n_model, 5 * n_model), bool), P("model", None)),
    # no axis divides by 8 and the last one is sharded: packing would reshard it, kept bool
    "kept": put(jnp.ones((6, 5 * n_model), bool), P(None, "model")),
  }
  params = {k: jnp.zeros(m.shape) for k, m in masks.items()}
  held = jasp.mask_updates(masks).init(params).masks
  assert held["last"].axis == (1,) and held["first"].axis == (0,)
  assert not held["last"].bits.sharding.is_fully_replicated
  assert not isinstance(held["kept"], jasp.PackedMask)
  for k, m in jasp.get_masks(jasp.MaskState(held)).items():
    np.testing.assert_array_equal(np.asarray(m), np.asarray(masks[k]))
