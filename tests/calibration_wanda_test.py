"""jasp.calibration.wanda: |W| * ||X|| scores, N:M masks, the magnitude limit."""

import jax
import jax.numpy as jnp
import numpy as np
import reference as ref
from flax import nnx
from zoo import basic

import jasp
from jasp import calibration as cal


def _dense(p, x):
  return jnp.tanh(x @ p["a"]) @ p["b"]


def _params(seed=0):
  rng = np.random.default_rng(seed)
  return {
    "a": jnp.asarray(rng.standard_normal((16, 24)), jnp.float32),
    "b": jnp.asarray(rng.standard_normal((24, 8)), jnp.float32),
  }


def test_scores_are_weight_times_input_norm_and_masks_are_nm():
  p = _params()
  rng = np.random.default_rng(1)
  scale = np.exp(rng.uniform(-3, 3, 16))
  xs = [jnp.asarray(rng.standard_normal((32, 16)) * scale, jnp.float32) for _ in range(2)]
  pruned, masks = cal.wanda_prune(_dense, p, xs, progress=False)

  x = np.concatenate([np.asarray(b, np.float64) for b in xs])
  score = np.abs(np.asarray(p["a"], np.float64)) * np.sqrt((x**2).sum(0))[:, None]
  want = ref.nm_mask_ref(score, 2, 4, 0)
  np.testing.assert_array_equal(np.asarray(masks["a"]), want)
  np.testing.assert_array_equal(np.asarray(pruned["a"]), np.where(want, p["a"], 0))
  assert not (want == ref.nm_mask_ref(np.asarray(p["a"]), 2, 4, 0)).all()  # not magnitude

  # The same masks through compute_masks' score_fn.
  stats = cal.collect_stats(_dense, p, xs)
  via = jasp.compute_masks(
    p,
    2,
    4,
    layouts=jasp.trace_layouts(_dense, p, xs[0]),
    score_fn=lambda path, w: cal.wanda_scores(w, stats[path]),
  )
  for k in p:
    np.testing.assert_array_equal(np.asarray(via[k]), np.asarray(masks[k]))
    assert bool(jasp.is_nm(pruned[k], 2, 4, 0))


def test_equal_input_norms_give_magnitude_pruning():
  p = _params(2)
  # +-1 inputs: every input feature of the first layer has norm sqrt(rows).
  signs = np.where(np.random.default_rng(3).random((4, 64, 16)) < 0.5, -1.0, 1.0)
  pruned, masks = cal.wanda_prune(
    lambda q, x: x @ q["a"],
    {"a": p["a"]},
    [jnp.asarray(s, jnp.float32) for s in signs],
    n=1,
    m=4,
    progress=False,
  )
  np.testing.assert_array_equal(np.asarray(masks["a"]), ref.nm_mask_ref(p["a"], 1, 4, 0))
  np.testing.assert_array_equal(
    np.asarray(pruned["a"]), np.where(ref.nm_mask_ref(p["a"], 1, 4, 0), p["a"], 0)
  )


def test_nnx_module_sequential():
  model, tokens = basic.nnx_token_block()
  before = np.asarray(model.up.kernel[...])
  stages = {}
  state, masks = cal.wanda_prune(
    model,
    [tokens],
    sequential=True,
    progress=False,
    callback=lambda r: stages.__setitem__(r.path, r.stage),
  )
  assert isinstance(state, nnx.State) and isinstance(masks, nnx.State)
  # The stem conv first, q/k/v together, then out, up, down, head.
  assert stages["conv/kernel"] == 0
  assert (
    stages["attn/query/kernel"] == stages["attn/key/kernel"] == stages["attn/value/kernel"] == 1
  )
  assert [stages[f"{k}/kernel"] for k in ("attn/out", "up", "down", "head")] == [2, 3, 4, 5]
  np.testing.assert_array_equal(np.asarray(model.up.kernel[...]), before)  # pure: no mutation
  nnx.update(model, state)
  assert bool(jasp.is_nm(model.up.kernel[...], 2, 4, 0))
  assert bool(jasp.is_nm(model.conv.kernel[...], 2, 4, 1))
  nnx.jit(lambda mdl, t: mdl(t))(model, tokens)


def test_wanda_scores_of_a_stacked_weight_use_each_layers_statistics():
  def f(p, x):
    x, _ = jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, p["stack"])
    return x

  rng = np.random.default_rng(3)
  p = {"stack": jnp.asarray(rng.standard_normal((3, 8, 8)), jnp.float32)}
  xs = [jnp.asarray(rng.standard_normal((16, 8)) * np.arange(1, 9), jnp.float32)]
  st = cal.collect_stats(f, p, xs)["stack"]
  scores = np.asarray(cal.wanda_scores(p["stack"], st))
  x = np.asarray(xs[0], np.float64)
  for layer in range(3):  # oracle: |W| * ||X||_2 per input feature of this layer's own inputs
    want = np.abs(np.asarray(p["stack"][layer], np.float64)) * np.linalg.norm(x, axis=0)[:, None]
    np.testing.assert_allclose(scores[layer], want, rtol=1e-4)
    x = np.tanh(x @ np.asarray(p["stack"][layer], np.float64))
