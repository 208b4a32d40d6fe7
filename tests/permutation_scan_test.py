"""Channel permutation through scans: stacked layers per layer, sequences with one permutation.

The oracles are written here in NumPy: which permutation each layer got is read
back from the weights themselves (every permuted slice must be an exact copy of
an original one), what 2:4 keeps is computed by sorting groups of four, and the
scanned models are compared with the same weights unrolled into a Python loop.
"""

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import testing
from flax import nnx
from zoo import permutation as pm

from jasp.permutation.apply import permute
from jasp.permutation.graph import trace_channels

KW = dict(escapes=3, time_limit=None, seed=0)
L, C = pm.LAYERS, pm.C
FORMS = ["lax", "linen", "nnx"]
# The weights 2:4 prunes (the default policy), with their group axis.
PRUNED = {"proj/kernel": 0, "blocks/up/kernel": 1, "blocks/down/kernel": 1, "head/kernel": 0}


def flat(tree) -> dict[str, np.ndarray]:
  """``{"a/b/c": array}`` of a nested dict (None leaves dropped)."""
  out = {}

  def walk(prefix, t):
    if isinstance(t, dict):
      for k, v in t.items():
        walk(f"{prefix}/{k}" if prefix else str(k), v)
    elif t is not None:
      out[prefix] = np.asarray(t)

  walk("", tree)
  return out


def kept_2of4(w: np.ndarray, axis: int) -> np.ndarray:
  """sum |w| kept by 2:4 along ``axis``, per layer for a stacked ``(L, in, out)`` kernel."""
  a = np.abs(np.moveaxis(np.asarray(w, np.float64), axis, -1))
  a = np.sort(a.reshape(a.shape[:-1] + (a.shape[-1] // 4, 4)), axis=-1)[..., 2:]
  return a.sum(axis=tuple(range(1, a.ndim))) if axis == 1 else a.sum()


def perm_of(old: np.ndarray, new: np.ndarray, axis: int) -> np.ndarray:
  """``p`` with ``new == take(old, p, axis)``, matching whole slices exactly."""
  old, new = np.moveaxis(old, axis, 0), np.moveaxis(new, axis, 0)
  p = []
  for j in range(new.shape[0]):
    hits = [i for i in range(old.shape[0]) if np.array_equal(old[i], new[j])]
    assert len(hits) == 1, f"slice {j} along axis {axis} is no copy of exactly one old slice"
    p.append(hits[0])
  assert sorted(p) == list(range(len(p)))
  return np.array(p)


class Case:
  """One scanned form of the model: its call, its params as a nested dict, a permute."""

  def __init__(self, form: str):
    self.form = form
    self.x = pm.scan_input(1)
    if form == "lax":
      self.params0 = pm.scan_params(0)
      self.prefix = ""
    elif form == "linen":
      self.model, self.variables, self.x = pm.linen_scan()
      self.prefix = "params/"
    else:
      self.module, self.x = pm.nnx_scan()
      self.prefix = ""

  def permute(self, **kw):
    if self.form == "lax":
      return permute(pm.scan_apply, self.params0, self.x, **kw)
    if self.form == "linen":
      return permute(self.model.apply, self.variables, self.x, **kw)
    return permute(self.module, self.x, **kw)

  def params(self, new=None) -> dict:
    """The params (of the original, or of what ``permute`` returned) as a plain nested dict."""
    if self.form == "lax":
      return self.params0 if new is None else new
    if self.form == "linen":
      return (self.variables if new is None else new)["params"]
    return nnx.to_pure_dict(nnx.state(self.module if new is None else new))

  def y(self, new, x):
    if self.form == "lax":
      return pm.scan_apply(self.params(new), x)
    if self.form == "linen":
      return self.model.apply(self.variables if new is None else new, x)
    return (self.module if new is None else new)(x)


@pytest.mark.parametrize("form", FORMS)
def test_stacked_blocks_are_permuted_per_layer(form):
  case = Case(form)
  new, rep = case.permute(**KW)
  before, after = flat(case.params()), flat(case.params(new))
  assert sorted(before) == sorted(after)

  # The function is kept, on an input the permutation never saw.
  x2 = pm.scan_input(7)
  assert testing.rel_err(case.y(new, x2), case.y(None, x2)) <= 1e-5

  # No pruned weight (no layer of a stacked one) keeps less under 2:4.
  for path, axis in PRUNED.items():
    kb, ka = kept_2of4(before[path], axis), kept_2of4(after[path], axis)
    assert np.all(ka >= kb * (1 - 1e-6)), path

  # The permutations, read back from the weights: one for the residual stream
  # (proj's output axis), one per layer for the MLP's hidden channels.
  res = perm_of(before["proj/kernel"], after["proj/kernel"], 1)
  hidden = []
  for i in range(L):
    up = np.take(before["blocks/up/kernel"][i], res, axis=0)
    p = perm_of(up, after["blocks/up/kernel"][i], 1)
    hidden.append(p)
    assert np.array_equal(after["blocks/up/bias"][i], before["blocks/up/bias"][i][p])
    down = np.take(np.take(before["blocks/down/kernel"][i], p, axis=0), res, axis=1)
    assert np.array_equal(after["blocks/down/kernel"][i], down)
    assert np.array_equal(after["blocks/down/bias"][i], before["blocks/down/bias"][i][res])
    assert np.array_equal(after["blocks/norm/scale"][i], before["blocks/norm/scale"][i][res])
  assert np.array_equal(after["head/kernel"], before["head/kernel"][res])
  moved = [i for i, p in enumerate(hidden) if not np.array_equal(p, np.arange(C))]
  assert len(moved) >= 2 and len({tuple(hidden[i]) for i in moved}) == len(moved)

  # The report names each layer's hidden class, and its consumer: that layer of down.
  up_path, down_path = case.prefix + "blocks/up/kernel", case.prefix + "blocks/down/kernel"
  for i in moved:
    (cls,) = [
      c
      for c in rep.classes
      if any(mem == (up_path, 2) and lay == (i,) for mem, lay in zip(c.members, c.layers))
    ]
    assert cls.status == "permuted"
    assert (down_path, 1) in cls.members and set(cls.layers) == {(i,)}
    assert cls.consumers == (down_path,) and cls.consumer_layers == ((i,),)
    assert f"{up_path}[2]@{i}" in str(rep)
  layers = {(lr.path, lr.layer): lr for lr in rep.layers}
  assert all(layers[(down_path, (i,))].permuted for i in moved)
  (stack,) = [c for c in rep.classes if (up_path, 0) in c.members]
  assert stack.status == "skipped" and "layer axis of a scan" in stack.reason


@pytest.mark.parametrize("form", FORMS)
def test_scanned_model_matches_the_unrolled_one(form):
  """The same weights as an unrolled Python loop (one leaf per layer): the same permutations."""
  case = Case(form)
  new, rep = case.permute(**KW)
  unrolled = pm.unstack(case.params())
  new_u, rep_u = permute(pm.unrolled_apply, unrolled, case.x, **KW)
  a, b = flat(pm.unstack(case.params(new))), flat(new_u)
  assert sorted(a) == sorted(b)
  for k in a:
    assert np.array_equal(a[k], b[k]), k
  kept = {(lr.path[len(case.prefix) :], lr.layer): lr.kept_after for lr in rep.layers}
  kept_u = {lr.path: lr.kept_after for lr in rep_u.layers}
  for i in range(L):
    for name in ("up", "down"):
      assert kept[(f"blocks/{name}/kernel", (i,))] == pytest.approx(
        kept_u[f"blocks_{i}/{name}/kernel"], rel=1e-12
      )
  assert len(rep.permuted) == len(rep_u.permuted)


def test_plan_permutes_an_optimizer_state_per_layer():
  import optax

  case = Case("linen")
  v = case.variables
  tx = optax.adam(1e-3)
  opt = tx.init(v["params"])
  grads = jax.grad(lambda p: jnp.sum(case.model.apply({**v, "params": p}, case.x) ** 2))(
    v["params"]
  )
  _, opt = tx.update(grads, opt, v["params"])
  new, rep = case.permute(**KW)
  moved = rep.plan.apply(opt)
  before, after = flat(v["params"]), flat(new["params"])
  res = perm_of(before["proj/kernel"], after["proj/kernel"], 1)
  mu0 = np.asarray(opt[0].mu["blocks"]["up"]["kernel"])
  mu1 = np.asarray(moved[0].mu["blocks"]["up"]["kernel"])
  for i in range(L):
    p = perm_of(
      np.take(before["blocks/up/kernel"][i], res, axis=0), after["blocks/up/kernel"][i], 1
    )
    assert np.array_equal(mu1[i], np.take(np.take(mu0[i], res, axis=0), p, axis=1))
  back = rep.plan.inverse().apply(new)
  for x, y in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(v)):
    assert np.array_equal(np.asarray(x), np.asarray(y))


def test_lstm_over_200_steps_is_cheap_and_explains_what_it_keeps():
  """``nn.scan(nn.OptimizedLSTMCell)`` over time: one walk of the cell, not 200."""
  model, v, x = pm.linen_lstm(200)
  t0 = time.perf_counter()
  graph = trace_channels(model.apply, v, x)
  trace_s = time.perf_counter() - t0
  assert trace_s < 2.0, trace_s
  t0 = time.perf_counter()
  new, rep = permute(model.apply, v, x, **KW)
  assert time.perf_counter() - t0 < 30.0
  x2 = jax.random.normal(jax.random.key(9), x.shape)
  assert testing.rel_err(model.apply(new, x2), model.apply(v, x2)) <= 1e-5
  # The hidden state is one class for every step: the recurrent kernels' input
  # and output axes, the gates, the head's input.
  cell = "params/ScanOptimizedLSTMCell_0/"
  (hidden,) = [c for c in graph.classes() if (cell + "hi/kernel", 0) in c.members]
  assert {
    (cell + "hi/kernel", 1),
    (cell + "hf/kernel", 0),
    (cell + "ii/kernel", 1),
    ("params/Dense_0/kernel", 0),
  } <= set(hidden.members)
  assert hidden.pinned == "" and set(hidden.layers) == {None}
  # What stays has a reason: the input features, the logits.
  for c in rep.classes:
    assert c.status == "permuted" or c.reason, c
  (inp,) = [c for c in rep.classes if (cell + "ii/kernel", 0) in c.members]
  assert inp.status == "skipped" and "input" in inp.reason
  before, after = flat(v["params"]), flat(new["params"])
  for path in (f"ScanOptimizedLSTMCell_0/h{g}/kernel" for g in "ifgo"):
    assert kept_2of4(after[path], 0) >= kept_2of4(before[path], 0) * (1 - 1e-6)


# ----------------------------------------------------------------------------
# The graph: when a stack's layers are one class, and nested scans.


def _w(*shapes, seed=0):
  ks = jax.random.split(jax.random.key(seed), len(shapes))
  return [jax.random.normal(k, s) for k, s in zip(ks, shapes)]


def _by_member(graph):
  out = {}
  for c in graph.classes():
    for mem, lay in zip(c.members, c.layers):
      out.setdefault(mem, []).append((lay, c))
  return out


def test_stacked_outputs_contracted_whole_tie_the_layers():
  up, w, w2 = _w((3, 8, 16), (16, 4), (3, 16, 4))
  x = jnp.ones((2, 8))

  def ys_of(p, x):
    return jax.lax.scan(lambda c, u: (c, jnp.tanh(x @ u)), 0.0, p["up"])[1]  # (L, B, 16)

  def whole(p, x):  # one weight for every layer's outputs: one permutation
    return jnp.einsum("lbf,fd->bd", ys_of(p, x), p["w"])

  by = _by_member(trace_channels(whole, {"up": up, "w": w}, x))
  ((lay, c),) = by[("up", 2)]
  assert lay is None and ("w", 0) in c.members and c.pinned == ""

  def per_layer(p, x):  # a stacked weight reads each layer's outputs: one per layer
    return jnp.einsum("lbf,lfd->bd", ys_of(p, x), p["w2"])

  by = _by_member(trace_channels(per_layer, {"up": up, "w2": w2}, x))
  assert sorted(lay for lay, _ in by[("up", 2)]) == [(0,), (1,), (2,)]
  for lay, c in by[("up", 2)]:
    assert set(zip(c.members, c.layers)) == {(("up", 2), lay), (("w2", 1), lay)}


def test_a_stack_broadcast_from_one_weight_is_one_class():
  w, v = _w((8, 16), (16, 8))

  def f(p, x):
    ws = jnp.broadcast_to(p["w"], (3,) + p["w"].shape)
    return jax.lax.scan(lambda c, w: (c + jnp.tanh(c @ w) @ p["v"], None), x, ws)[0]

  g = trace_channels(f, {"w": w, "v": v}, jnp.ones((2, 8)))
  (c,) = [c for c in g.classes() if ("w", 1) in c.members]
  assert ("v", 0) in c.members and c.layers == (None, None) and c.pinned == ""
  assert g.stack_axes("w") == ()


def test_nested_scans_give_one_class_per_inner_layer():
  up, down, i, h = _w((2, 3, 8, 16), (2, 3, 16, 8), (8, 8), (8, 4))

  def f(p, x):
    def inner(c, w):
      return c + jnp.tanh(c @ w[0]) @ w[1], None

    def outer(c, w):
      return jax.lax.scan(inner, c, w)[0], None

    return jax.lax.scan(outer, x @ p["i"], (p["up"], p["down"]))[0] @ p["h"]

  params = {"up": up, "down": down, "i": i, "h": h}
  g = trace_channels(f, params, jnp.ones((2, 8)))
  assert g.stack_axes("up") == (0, 1)
  lays = sorted(lay for lay, _ in _by_member(g)[("up", 3)])
  assert lays == [(a, b) for a in range(2) for b in range(3)]
  pos = g.positions("down", (2,), _by_member(g)[("up", 3)][4][1].id, layer=(1, 1))
  assert np.array_equal(pos, np.arange(16)[None])
  with pytest.raises(ValueError, match="layer"):
    g.positions("down", (2,), _by_member(g)[("up", 3)][4][1].id)
  new, rep = permute(f, params, jnp.ones((2, 8)), **KW)
  x2 = jax.random.normal(jax.random.key(3), (2, 8))
  assert testing.rel_err(f(new, x2), f(params, x2)) <= 1e-5
  assert rep.plan.leaves["up"][3].shape == (2, 3, 16) and rep.plan.stacks["up"] == (0, 1)


def test_reverse_scan_with_branches_keeps_the_function():
  up, down, i, h = _w((3, 8, 16), (3, 16, 8), (8, 8), (8, 4), seed=1)

  def f(p, x):
    def body(c, w):
      u, d = w
      hid = jax.lax.cond(c.sum() > 0, lambda a: jnp.tanh(a @ u), lambda a: jax.nn.relu(a @ u), c)
      return c + hid @ d, None

    return jax.lax.scan(body, x @ p["i"], (p["up"], p["down"]), reverse=True)[0] @ p["h"]

  params = {"up": up, "down": down, "i": i, "h": h}
  g = trace_channels(f, params, jnp.ones((2, 8)))
  assert sorted(lay for lay, _ in _by_member(g)[("up", 2)]) == [(0,), (1,), (2,)]
  new, rep = permute(f, params, jnp.ones((2, 8)), **KW)
  assert rep.permuted
  x2 = jax.random.normal(jax.random.key(4), (2, 8))
  assert testing.rel_err(f(new, x2), f(params, x2)) <= 1e-5
