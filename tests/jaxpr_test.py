"""jasp._jaxpr: the one traversal (call bodies, loop roles, context keys)."""

import jax
import jax.numpy as jnp
import numpy as np

from jasp import _jaxpr
from jasp import calibration as cal


class _Count(_jaxpr.Interpreter):
  """Counts how often each primitive is reached, keyed by context."""

  def __init__(self):
    super().__init__()
    self.seen = []

  def literal(self, lit):
    return None

  def constant(self, var, value):
    return None

  def primitive(self, eqn, ins):
    self.seen.append((eqn.primitive.name, self.key(eqn)))
    return [None] * len(eqn.outvars)


def test_calls_are_inlined_and_loops_reach_their_hooks():
  def f(w, x):
    y = jax.jit(lambda a: a @ w)(x)
    y = jax.checkpoint(jnp.tanh)(y)
    y = jax.nn.relu(y)  # custom_jvp
    y, _ = jax.lax.scan(lambda c, _: (c * 2.0, None), y, None, length=3)
    return y

  closed = jax.make_jaxpr(f)(jnp.ones((4, 4)), jnp.ones((2, 4)))
  it = _Count()
  it.run(closed.jaxpr, closed.consts, [None, None])
  names = [n for n, _ in it.seen]
  assert "dot_general" in names and "tanh" in names and "max" in names
  assert "pjit" not in names and "jit" not in names and "remat2" not in names
  assert "scan" in names  # the base class treats loops as primitives


def test_context_keys_tell_apart_the_call_sites_of_a_shared_jit_body():
  g = jax.jit(lambda w, x: jnp.tanh(x @ w))

  def f(p, x):
    return g(p["a"], g(p["b"], x))

  rng = np.random.default_rng(0)
  p = {k: jnp.asarray(rng.standard_normal((8, 8)), jnp.float32) for k in "ab"}
  x = jnp.asarray(rng.standard_normal((4, 8)), jnp.float32)
  closed = jax.make_jaxpr(f)(p, x)
  bodies = [e.params["jaxpr"] for e in closed.jaxpr.eqns]
  assert bodies[0] is bodies[1]  # JAX reuses one jaxpr for both calls
  it = _Count()
  it.run(closed.jaxpr, closed.consts, [None, None, None])
  dots = [k for n, k in it.seen if n == "dot_general"]
  assert len(dots) == 2 and dots[0] != dots[1]
  # And so each weight's statistics come from its own call.
  st = cal.collect_stats(f, p, [x])
  xa = np.tanh(np.asarray(x, np.float64) @ np.asarray(p["b"], np.float64))
  np.testing.assert_allclose(np.asarray(st["a"].sumsq[0]), (xa**2).sum(0), rtol=1e-4)
  np.testing.assert_allclose(np.asarray(st["b"].sumsq[0]), (np.asarray(x) ** 2).sum(0), rtol=1e-4)


def test_scan_roles():
  def f(c, init, xs):
    return jax.lax.scan(lambda h, x: (h + c * x, h * x), init, xs, reverse=True)

  closed = jax.make_jaxpr(f)(jnp.ones(3), jnp.ones(3), jnp.ones((5, 3)))
  (eqn,) = [e for e in closed.jaxpr.eqns if e.primitive.name == "scan"]
  s = _jaxpr.Scan.of(eqn)
  consts, carry, xs = s.split_in(eqn.invars)
  assert (len(consts), len(carry), len(xs)) == (1, 1, 1)
  assert s.length == 5 and s.reverse
  c_out, ys = s.split_out(eqn.outvars)
  assert len(c_out) == 1 and len(ys) == 1
