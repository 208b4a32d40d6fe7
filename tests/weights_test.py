"""jasp.weights: what is a matmul/conv weight, along which axes, on real flax layers.

Each expectation is written from the layer's math (the independent oracle): a
norm scale multiplies an activation, an LSTM's gate kernels are read whole along
their input axis, a LoRA factor pair is a low-rank update, and so on.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import testing
from flax import nnx

import jasp


class _PreNorm(nn.Module):
  """Llama/T5-style: a norm before a Dense, scale-only."""

  norm: str

  @nn.compact
  def __call__(self, x):
    if self.norm == "rms":
      x = nn.RMSNorm()(x)
    else:
      x = nn.LayerNorm(use_bias=False)(x)
    return nn.Dense(4, use_bias=False)(x)


class _NNXPreNorm(nnx.Module):
  def __init__(self, rngs):
    self.norm = nnx.RMSNorm(8, rngs=rngs)
    self.proj = nnx.Linear(8, 4, use_bias=False, rngs=rngs)

  def __call__(self, x):
    return self.proj(self.norm(x))


@pytest.mark.parametrize("norm", ["rms", "layer"])
def test_linen_norm_scales_stay_dense_through_prune_and_training(norm):
  model = _PreNorm(norm)
  x = testing.normal((4, 8))
  variables = model.init(jax.random.key(0), x)
  variables = jax.tree_util.tree_map(
    lambda a: a + testing.normal(a.shape, 1), variables
  )  # scales != 1
  lay = jasp.trace_layouts(model.apply, variables, x)
  (scale,) = [p for p in lay if p.endswith("scale")]
  assert lay[scale].axis is None and "activation" in lay[scale].reason
  assert lay["params/Dense_0/kernel"].axis == (0,)
  pruned, masks = jasp.prune(variables, layouts=lay)
  flat = jasp._tree.leaves_by_path(pruned)
  np.testing.assert_array_equal(
    np.asarray(flat[scale]), np.asarray(jasp._tree.leaves_by_path(variables)[scale])
  )
  assert jasp._tree.leaves_by_path(masks, keep_none=True)[scale] is None
  # Training with enforcement never zeroes a scale entry.
  tx = optax.chain(optax.sgd(0.1), jasp.mask_updates(masks))
  state = tx.init(pruned)
  grads = jax.grad(lambda v: jnp.sum(model.apply(v, x) ** 2))(pruned)
  updates, _ = tx.update(grads, state, pruned)
  after = optax.apply_updates(pruned, updates)
  assert np.all(np.asarray(jasp._tree.leaves_by_path(after)[scale]) != 0)


def test_nnx_rmsnorm_scale_is_not_a_weight_for_any_method():
  model = _NNXPreNorm(nnx.Rngs(0))
  x = testing.normal((16, 8))
  lay = jasp.trace_layouts(model, x)
  assert lay["norm/scale"].axis is None and lay["proj/kernel"].axis == (0,)
  for prune in (jasp.wanda_prune, jasp.sparsegpt_prune):
    _, masks = prune(model, [x], progress=False)
    masks = jasp._tree.leaves_by_path(masks, keep_none=True)
    assert masks["norm/scale"] is None and masks["proj/kernel"] is not None


def test_weight_through_nested_jit_cast_and_flip_is_a_weight():
  def f(p, x):
    w = jax.jit(lambda a: jnp.flip(a.astype(jnp.bfloat16), 0))(p["w"])
    return x @ w.astype(jnp.float32) @ jax.jit(lambda a: a)(p["v"])

  lay = jasp.trace_layouts(
    f, {"w": testing.normal((8, 12)), "v": testing.normal((12, 4))}, testing.normal((2, 8))
  )
  assert lay["w"].axis == (0,) and lay["w"].out_axes == (1,), lay["w"]
  assert lay["v"].axis == (0,), lay["v"]


def test_optimized_lstm_gate_kernels_are_weights_along_their_input_axis():
  cell = nn.scan(
    nn.OptimizedLSTMCell,
    variable_broadcast="params",
    split_rngs={"params": False},
    in_axes=1,
    out_axes=1,
  )(8)
  x = testing.normal((2, 5, 4))
  carry = cell.initialize_carry(jax.random.key(0), x[:, 0].shape)
  variables = cell.init(jax.random.key(1), carry, x)
  lay = jasp.trace_layouts(lambda v, x: cell.apply(v, carry, x)[1], variables, x)
  for gate in ("i", "f", "g", "o"):
    assert lay[f"params/i{gate}/kernel"].axis == (0,), lay[f"params/i{gate}/kernel"]
    assert lay[f"params/h{gate}/kernel"].axis == (0,), lay[f"params/h{gate}/kernel"]
    assert lay[f"params/h{gate}/bias"].axis is None


def test_lora_factors_are_low_rank_and_the_base_kernel_is_a_weight():
  class M(nnx.Module):
    def __init__(self, rngs):
      self.a = nnx.LoRALinear(16, 16, lora_rank=4, rngs=rngs)
      self.b = nnx.LoRALinear(16, 8, lora_rank=4, rngs=rngs)

    def __call__(self, x):
      return self.b(nnx.relu(self.a(x)))

  lay = jasp.trace_layouts(M(nnx.Rngs(0)), testing.normal((2, 16)))
  for layer in ("a", "b"):
    assert lay[f"{layer}/kernel"].axis == (0,)
    for f in ("lora_a", "lora_b"):
      assert lay[f"{layer}/lora/{f}"].axis is None
      assert "low-rank" in lay[f"{layer}/lora/{f}"].reason


def test_a_linear_bottleneck_that_is_not_added_back_is_two_weights():
  """A VAE's mean head feeding the decoder (eval path): two Dense layers, not LoRA."""

  def f(p, x):
    mean = jax.nn.relu(x @ p["enc"]) @ p["mean"]
    return jax.nn.relu(mean @ p["dec"] + p["b"])

  p = {
    "enc": testing.normal((16, 32)),
    "mean": testing.normal((32, 4)),
    "dec": testing.normal((4, 32)),
    "b": testing.normal((32,)),
  }
  lay = jasp.trace_layouts(f, p, testing.normal((2, 16)))
  assert lay["mean"].axis == (0,) and lay["dec"].axis == (0,)


def test_tied_embedding_and_gqa_einsums():
  class Decoder(nnx.Module):
    def __init__(self, rngs, d=16, h=4, kv=2, dh=8, vocab=32):
      init = nnx.initializers.normal(0.1)
      self.embed = nnx.Embed(vocab, d, rngs=rngs)
      self.q = nnx.Param(init(rngs.params(), (d, h, dh)))
      self.kv = nnx.Param(init(rngs.params(), (2, d, kv, dh)))
      self.o = nnx.Param(init(rngs.params(), (h, dh, d)))
      self.h, self.nkv = h, kv

    def __call__(self, tokens):
      x = self.embed(tokens)
      q = jnp.einsum("btd,dhk->bthk", x, self.q[...])
      k, v = jnp.einsum("btd,cdgk->cbtgk", x, self.kv[...])
      q = q.reshape(q.shape[:2] + (self.nkv, self.h // self.nkv, q.shape[-1]))
      att = jax.nn.softmax(jnp.einsum("btgrk,bsgk->bgrts", q, k), axis=-1)
      y = jnp.einsum("bgrts,bsgk->btgrk", att, v).reshape(q.shape[:2] + (self.h, -1))
      x = x + jnp.einsum("bthk,hkd->btd", y, self.o[...])
      return self.embed.attend(x)

  lay = jasp.trace_layouts(Decoder(nnx.Rngs(0)), jnp.zeros((2, 6), jnp.int32))
  assert lay["q"].axis == (0,) and lay["q"].out_axes == (1, 2)
  assert lay["kv"].axis == (1,) and lay["kv"].out_axes == (0, 2, 3)
  assert lay["o"].axis == (0, 1) and lay["o"].out_axes == (2,)
  assert lay["embed/embedding"].axis is None and "gather" in lay["embed/embedding"].reason


def test_products_with_constants_and_activations():
  mask = np.tril(np.ones((8, 8), np.float32))  # MADE-style autoregressive mask

  def f(p, x):
    h = x @ (p["masked"] * mask)  # a weight times a constant: still a weight
    h = h @ jnp.where(mask > 0, p["where"], 0.0)  # a weight chosen by a constant mask
    h = h @ (p["scaled"] / 4.0)
    gate = jax.nn.sigmoid(x)
    return (h * p["gate_scale"] * gate) @ p["out"], p["returned"]

  p = {
    k: testing.normal((8, 8), i)
    for i, k in enumerate(["masked", "where", "scaled", "out", "returned"])
  }
  p["gate_scale"] = testing.normal((8,), 9)
  lay = jasp.trace_layouts(f, p, testing.normal((2, 8)))
  for k in ("masked", "where", "scaled", "out"):
    assert lay[k].axis == (0,), (k, lay[k])
  assert lay["gate_scale"].axis is None and "activation" in lay["gate_scale"].reason
  assert lay["returned"].axis is None and "output" in lay["returned"].reason


def test_weights_under_cond_while_and_remat():
  def f(p, x):
    x = jax.lax.cond(x.sum() > 0, lambda a: a @ p["c"], lambda a: a @ p["c"] * 2.0, x)
    x = jax.checkpoint(lambda a: jnp.tanh(a @ p["r"]))(x)
    n = jnp.int32(2) + jnp.sum(x > 0).astype(jnp.int32)
    return jax.lax.fori_loop(0, n, lambda i, a: jnp.tanh(a @ p["w"]), x)

  p = {k: testing.normal((8, 8), i) for i, k in enumerate("crw")}
  lay = jasp.trace_layouts(f, p, testing.normal((2, 8)))
  for k in "crw":
    assert lay[k].axis == (0,), (k, lay[k])
  st = jasp.calibration.collect_stats(f, p, [testing.normal((2, 8), 5)], hessian=True)
  assert set(st) == {"c", "r", "w"}
  # The while loop ran n times: each iteration's inputs were summed.
  assert float(st["w"].count) % 2 == 0 and float(st["w"].count) >= 4


def test_stacked_kernels_of_nnx_scan_over_vmapped_blocks():
  class Block(nnx.Module):
    def __init__(self, rngs):
      self.norm = nnx.RMSNorm(8, rngs=rngs)
      self.up = nnx.Linear(8, 16, use_bias=False, rngs=rngs)
      self.down = nnx.Linear(16, 8, use_bias=False, rngs=rngs)

    def __call__(self, x):
      return x + self.down(nnx.gelu(self.up(self.norm(x))))

  class Stack(nnx.Module):
    def __init__(self, rngs):
      @nnx.split_rngs(splits=3)
      @nnx.vmap(in_axes=(0,), out_axes=0)
      def make(rngs):
        return Block(rngs)

      self.blocks = make(rngs)

    def __call__(self, x):
      @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
      @nnx.remat
      def body(x, blk):
        return blk(x)

      return body(x, self.blocks)

  lay = jasp.trace_layouts(Stack(nnx.Rngs(0)), testing.normal((2, 8)))
  assert lay["blocks/up/kernel"].axis == (1,) and lay["blocks/up/kernel"].stack == (0,)
  assert lay["blocks/down/kernel"].axis == (1,) and lay["blocks/down/kernel"].out_axes == (2,)
  assert lay["blocks/norm/scale"].axis is None


def test_a_weight_used_as_a_scan_carry_or_by_a_bias_add_stays_dense():
  def f(p, x):
    w, _ = jax.lax.scan(lambda w, _: (w * 0.5, None), p["carried"], None, length=2)
    return (x @ w) + p["bias_like"]

  lay = jasp.trace_layouts(
    f,
    {"carried": testing.normal((8, 8)), "bias_like": testing.normal((2, 8))},
    testing.normal((2, 8)),
  )
  assert lay["carried"].axis is None and "carry" in lay["carried"].reason
  assert lay["bias_like"].axis is None and "add" in lay["bias_like"].reason
