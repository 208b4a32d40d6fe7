"""The program that jax2onnx converts: the model's own jaxpr, evaluated again.

jasp traces the model itself (``jax.make_jaxpr``, so linen, nnx, ``nn.scan``
and ``remat`` run exactly as under ``jit``) and hands jax2onnx a function that
evaluates that jaxpr (:class:`Lowering`, on the traversal of
:mod:`jasp._jaxpr`). jax2onnx then sees JAX primitives only, never flax code.
Measured reasons (jax2onnx 0.17.1, flax 0.12.8):

* While it traces a model's Python code, jax2onnx replaces flax's pooling
  functions with keyword-only converters and ``jnp.shape`` with its own:
  ``nn.max_pool(x, (3, 3))`` (a positional window) and every linen ``nn.scan``
  (``Shapes must be 1D sequences of concrete values``) failed. Evaluating the
  jaxpr runs no flax code.
* A ``scan`` over stacked layers (``nn.scan``/``nnx.scan`` of blocks) became an
  ONNX ``Loop`` that gathers each layer's weights from one stacked initializer:
  TensorRT reads the 2:4 pattern from a layer's constant weight, and
  ``jasp check`` could not see per-layer weights. Such a scan is unrolled here,
  each layer's slice of the weights cut ahead of time: one initializer per layer.
* jax2onnx does not convert a reverse ``scan`` (``NotImplementedError``, the
  backward half of a BiLSTM); it is evaluated as a forward scan over the
  reversed inputs, its stacked outputs reversed back.
* ``reduce_window_max`` (what ``nn.max_pool`` lowers to) over ``(1, *window, 1)``
  is converted by jax2onnx into a ``MaxPool`` that onnxruntime rejects
  ("Unsupported pooling size"); it is re-expressed as flax's keyword
  ``max_pool``, which jax2onnx converts correctly, after an explicit ``-inf``
  pad (its converter ignores explicit padding pairs).

Computations on weights alone (a cast, a transpose, a flip of a kernel) are
folded: the initializers hold each weight as its consumer reads it. Other
scans (an RNN over time, weights as constants of the loop), ``cond`` and
``while`` are bound as they are (jax2onnx converts them to ``Loop``/``If``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jasp import _jaxpr

__all__ = ["Lowering"]


def _concrete(x: Any) -> bool:
  return not isinstance(x, jax.core.Tracer)


class Lowering(_jaxpr.Interpreter):
  """Evaluates a model's jaxpr for jax2onnx (see the module doc)."""

  def literal(self, lit):
    return lit.val

  def constant(self, var, value):
    return value

  def bind(self, eqn, ins: Sequence[Any], **changes) -> list:
    params = dict(eqn.params, **changes)
    bind_params = eqn.primitive.get_bind_params(params)
    subfuns = []
    if isinstance(bind_params, tuple):  # older jax: (subfuns, params)
      subfuns, bind_params = bind_params
    if all(_concrete(x) for x in ins):  # weights alone: fold into a constant
      with jax.ensure_compile_time_eval():
        ans = eqn.primitive.bind(*subfuns, *ins, **bind_params)
    else:
      ans = eqn.primitive.bind(*subfuns, *ins, **bind_params)
    return list(ans) if eqn.primitive.multiple_results else [ans]

  def primitive(self, eqn, ins):
    name = eqn.primitive.name
    if name == "reduce_window_max" and not _concrete(ins[0]):
      pooled = _max_pool(eqn, ins[0])
      if pooled is not None:
        return [pooled]
    if name == "conv_general_dilated" and _concrete(ins[1]) and not _concrete(ins[0]):
      return self._conv_oihw(eqn, ins)
    if name == "dot_general" and len(ins) == 2 and _concrete(ins[0]) != _concrete(ins[1]):
      out = _dot_as_matmul(eqn, ins)
      if out is not None:
        return [out]
    return self.bind(eqn, ins)

  def _conv_oihw(self, eqn, ins):
    """A constant kernel stored as ONNX's ``Conv`` reads it (``OIHW``/``KCRS``)."""
    dn = eqn.params["dimension_numbers"]
    rhs = tuple(dn.rhs_spec)
    if rhs == tuple(range(len(rhs))):
      return self.bind(eqn, ins)
    with jax.ensure_compile_time_eval():
      kernel = jnp.transpose(ins[1], rhs)
    new = jax.lax.ConvDimensionNumbers(dn.lhs_spec, tuple(range(len(rhs))), dn.out_spec)
    return self.bind(eqn, [ins[0], kernel] + list(ins[2:]), dimension_numbers=new)

  def scan(self, eqn, scan, ins):
    consts, carry, xs = scan.split_in(ins)
    if any(_concrete(x) for x in xs):
      return self._unroll(eqn, scan, consts, carry, xs)
    if not scan.reverse:
      return self.bind(eqn, ins)
    flipped = [jnp.flip(x, 0) for x in xs]
    outs = self.bind(eqn, list(consts) + list(carry) + flipped, reverse=False)
    c, ys = scan.split_out(outs)
    return list(c) + [jnp.flip(y, 0) for y in ys]

  def _unroll(self, eqn, scan, consts, carry, xs):
    """One evaluation of the body per layer; scanned weights sliced ahead of time."""
    order = range(scan.length - 1, -1, -1) if scan.reverse else range(scan.length)
    per_step = []
    carry = list(carry)
    for i in order:
      sliced = []
      for x in xs:
        if _concrete(x):
          with jax.ensure_compile_time_eval():
            sliced.append(x[i])
        else:
          sliced.append(x[i])
      outs = self.walk(eqn, "body", scan.body, list(consts) + carry + sliced)
      carry, ys = scan.split_out(outs)
      per_step.append(ys)
    if scan.reverse:
      per_step = per_step[::-1]
    n_ys = len(scan.body.jaxpr.outvars) - scan.num_carry
    stacked = [jnp.stack([step[k] for step in per_step]) for k in range(n_ys)]
    return list(carry) + stacked


def _dot_as_matmul(eqn, ins) -> jax.Array | None:
  """A ``dot_general`` with one constant operand (a weight) as a 2-D ``x @ W``.

  ``W`` is folded into ``(K, O)``: its contracted axes in their own order
  (row-major, as its N:M groups run), then its free axes; ``x`` is moved to
  ``(T, K)`` to match. jax2onnx turns this into ``MatMul`` with a 2-D
  initializer, the layout TensorRT and ``jasp check`` read; None when the
  weight has batch dimensions (left to jax2onnx's ``Einsum``).
  """
  (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
  if lb or rb:
    return None
  side = 0 if _concrete(ins[0]) else 1
  w, x = ins[side], ins[1 - side]
  cw, cx = (lc, rc) if side == 0 else (rc, lc)
  pairs = sorted(zip(cw, cx))
  cw, cx = [a for a, _ in pairs], [b for _, b in pairs]
  fw = [d for d in range(w.ndim) if d not in cw]
  fx = [d for d in range(x.ndim) if d not in cx]
  k = int(np.prod([w.shape[d] for d in cw], dtype=np.int64))
  o = int(np.prod([w.shape[d] for d in fw], dtype=np.int64))
  with jax.ensure_compile_time_eval():
    w2 = jnp.transpose(w, cw + fw).reshape(k, o)
  x_free = [x.shape[d] for d in fx]
  x2 = jnp.transpose(x, fx + cx).reshape((-1, k))
  out_type = eqn.params.get("preferred_element_type") or eqn.outvars[0].aval.dtype
  y = jnp.matmul(x2, w2, preferred_element_type=out_type)
  y = y.reshape(tuple(x_free) + tuple(w.shape[d] for d in fw))
  if side == 0:  # dot_general puts the lhs' (the weight's) free axes first
    nx = len(fx)
    y = jnp.transpose(y, tuple(range(nx, nx + len(fw))) + tuple(range(nx)))
  return y.astype(eqn.outvars[0].aval.dtype)


def _max_pool(eqn, x) -> jax.Array | None:
  """``reduce_window_max`` as flax's keyword ``max_pool`` (NHWC-style windows only)."""
  p = eqn.params
  wd, ws, pad = p["window_dimensions"], p["window_strides"], [tuple(q) for q in p["padding"]]
  ones = all(
    d == 1 for d in tuple(p.get("base_dilation") or ()) + tuple(p.get("window_dilation") or ())
  )
  if not (
    ones
    and len(wd) >= 3
    and wd[0] == wd[-1] == 1
    and ws[0] == ws[-1] == 1
    and pad[0] == pad[-1] == (0, 0)
    and jnp.issubdtype(x.dtype, jnp.floating)
  ):
    return None
  if any(q != (0, 0) for q in pad):
    x = jnp.pad(x, pad, constant_values=-np.inf)
  return nn.max_pool(x, window_shape=tuple(wd[1:-1]), strides=tuple(ws[1:-1]), padding="VALID")
