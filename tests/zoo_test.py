"""Conformance of jasp's whole recipe on a zoo of models written like the public flax families.

One test per model family (``tests/zoo``), running every step in order:

1. layouts: ``jasp.trace_layouts`` against the case's oracle, for every leaf;
2. prune: ``jasp.prune`` with those layouts, checked by an independent NumPy N:M check;
3. fine-tune: 20 optax steps with ``jasp.mask_updates``; still N:M, pruned entries 0;
4. permute: ``jasp.permute`` keeps the function (on another input) and never lowers what
   2:4 keeps of a pruned weight; the case's channel class is permuted;
5. calibration: ``jasp.wanda_prune`` and ``jasp.sparsegpt_prune`` give N:M params, and
   SparseGPT's held-out output error is at most magnitude pruning's;
6. export: ``jasp.export.to_onnx`` runs in onnxruntime like JAX, and
   ``jasp.export.check_file`` finds the pruned weights N:M.

Every step runs even when an earlier one failed (a step whose inputs are missing is
skipped); the test fails at the end with one line per step. The checks here do not use
jasp's own N:M helpers: groups are cut along the oracle's axes in NumPy.

``JASP_ZOO_RESULTS=<dir>`` writes ``<dir>/<case>.json`` with each step's outcome and time.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
import traceback
import types

import jax
import jax.numpy as jnp
import numpy as np
import onnx
import onnxruntime
import optax
import pytest
import testing
import zoo
from flax import nnx

import jasp

N, M = 2, 4
STEPS = 20
RTOL = 1e-4
CASES = zoo.all_cases()
pytestmark = pytest.mark.slow  # every case runs the whole recipe, export included


# ----------------------------------------------------------------------------
# Independent helpers (NumPy; no jasp internals).


def groups(w, axis: tuple[int, ...]) -> np.ndarray:
  """``w`` as ``(groups, M, rest)``: the axes ``axis`` merged (row-major), cut in runs of M."""
  w = np.asarray(w)
  a0, a1 = axis[0], axis[-1]
  k = int(np.prod([w.shape[a] for a in axis]))
  x = w.reshape(w.shape[:a0] + (k,) + w.shape[a1 + 1 :])
  x = np.moveaxis(x, a0, 0).reshape(k, -1)
  return x.reshape(k // M, M, -1)


def kept_fraction(w, axis) -> float:
  """Fraction of ``sum |w|`` that 2:4 magnitude pruning along ``axis`` keeps (float64)."""
  g = np.sort(np.abs(groups(np.asarray(w, np.float64), axis)), axis=1)
  total = g.sum()
  return 1.0 if total == 0 else float(g[:, M - N :].sum() / total)


def out_leaves(y) -> list[np.ndarray]:
  return [np.asarray(x, np.float64) for x in jax.tree_util.tree_leaves(y)]


def l2_error(y, ref) -> float:
  return math.sqrt(sum(float(np.sum((x - r) ** 2)) for x, r in zip(out_leaves(y), out_leaves(ref))))


def check_nm(
  ctx, where: str, dense, pruned, masks, *, kept_identical: bool, magnitude: bool
) -> list[str]:
  """The independent N:M check of a pruned tree against the dense one and the oracle.

  Oracle-prunable leaves: a mask of the leaf's shape keeping exactly N per group, at
  most N non-zeros per group, dropped entries exactly 0, kept entries bit-identical to
  the dense ones (``kept_identical``), the kept entries the N largest ``|w|``
  (``magnitude``). Every other leaf: no mask, bit-identical to the dense leaf.
  """
  d, p = testing.leaves(dense), testing.leaves(pruned)
  mk = testing.leaves(masks, keep_none=True) if masks is not None else {}
  errors = []
  for path, w in d.items():
    if path not in p:
      errors.append(f"{path}: missing from the {where} params")
      continue
    q = np.asarray(p[path])
    w = np.asarray(w)
    mask = mk.get(path, "absent")
    if path not in ctx.prunable:
      if not isinstance(mask, str) and mask is not None:
        errors.append(
          f"{path} {w.shape}: has a mask but the oracle keeps it dense ({ctx.why_dense(path)})"
        )
      if not testing.same_bits(q, w):
        errors.append(
          f"{path} {w.shape}: changed but the oracle keeps it dense ({ctx.why_dense(path)})"
        )
      continue
    ax = ctx.prunable[path]
    if isinstance(mask, str) or mask is None:
      errors.append(f"{path} {w.shape}: no mask (expected N:M along axes {ax})")
      mask = None
    else:
      mask = np.asarray(mask)
      if mask.shape != w.shape or mask.dtype != np.bool_:
        errors.append(f"{path} {w.shape}: mask of shape {mask.shape} dtype {mask.dtype}")
        mask = None
    gq = groups(q, ax)
    bad = int(np.sum(np.count_nonzero(gq, axis=1) > N))
    if bad:
      errors.append(
        f"{path} {w.shape}: {bad} of {gq.shape[0] * gq.shape[2]} groups along "
        f"axes {ax} hold more than {N} non-zeros"
      )
    if mask is None:
      continue
    gm = groups(mask, ax)
    if not np.all(gm.sum(axis=1) == N):
      errors.append(f"{path}: the mask does not keep exactly {N} of every {M} along {ax}")
    if np.any(q[~mask] != 0):
      errors.append(f"{path}: {int(np.sum(q[~mask] != 0))} dropped entries are not 0")
    if kept_identical and q[mask].tobytes() != w[mask].tobytes():
      errors.append(f"{path}: kept weights differ from the dense ones")
    if magnitude:
      gw = np.abs(groups(w, ax))
      kept_min = np.where(gm, gw, np.inf).min(axis=1)
      drop_max = np.where(gm, -np.inf, gw).max(axis=1)
      if np.any(kept_min < drop_max):
        errors.append(f"{path}: the mask does not keep the {N} largest |w| of every group")
  for path in p:
    if path not in d:
      errors.append(f"{path}: in the {where} params but not in the dense ones")
  return errors


def fail(ctx, step: str, errors: list[str], limit: int = 12) -> None:
  if errors:
    more = f"\n  ... and {len(errors) - limit} more" if len(errors) > limit else ""
    raise AssertionError(
      f"[{ctx.case.name}] {step}: {len(errors)} problem(s):\n  "
      + "\n  ".join(errors[:limit])
      + more
    )


class Skip(Exception):
  """A step's inputs are missing because an earlier step failed."""


def need(ctx, *names: str) -> None:
  """Raises :class:`Skip` unless an earlier step left ``ctx.<name>`` for every name."""
  missing = [n for n in names if getattr(ctx, n, None) is None]
  if missing:
    raise Skip(f"needs {', '.join(missing)} from an earlier step")


# ----------------------------------------------------------------------------
# The case's dense model, in both call forms.

_BUILT: dict = {}


def build(case: zoo.Case):
  """``case.build()`` once per case; nnx modules are handed out as clones (they are mutable)."""
  if case.name not in _BUILT:
    _BUILT[case.name] = case.build()
  built = _BUILT[case.name]
  return nnx.clone(built) if case.framework == "nnx" else built


def setup(case: zoo.Case):
  """The dense model of ``case``, its call forms, and the oracle's verdict on every leaf.

  ``ctx.all_leaves`` is every leaf (linen: all collections; nnx: the whole state),
  ``ctx.param_tree`` what jasp prunes (linen: the variables; nnx: the ``nnx.Param``
  state), ``ctx.prunable`` the oracle's ``{path: axes}`` of the leaves that must be N:M
  (axes whose size is a multiple of M), ``ctx.run(tree, *inputs)`` the jitted eval call.
  """
  ctx = types.SimpleNamespace(
    case=case, layouts=None, pruned=None, masks=None, tuned=None, tuned_model=None
  )
  if case.framework == "linen":
    ctx.model, ctx.variables = build(case)
    ctx.fn = case.apply(ctx.model)
    ctx.run = jax.jit(ctx.fn)
    ctx.all_leaves = testing.leaves(ctx.variables)
    ctx.param_tree = ctx.variables  # what jasp.prune takes
  else:
    assert len(case.sample) == 1, f"[{case.name}] nnx cases take one input"
    ctx.model = build(case)
    ctx.all_leaves = testing.leaves(nnx.state(ctx.model))
    ctx.param_tree = nnx.state(ctx.model, nnx.Param)

    graphdef, _, rest = nnx.split(ctx.model, nnx.Param, ...)

    @jax.jit
    def run(state, *xs):  # the eval-mode model with other nnx.Param values
      return nnx.merge(graphdef, state, rest)(*xs)

    ctx.run = run
  ctx.param_paths = set(testing.leaves(ctx.param_tree))
  ctx.expected = {p: case.expected_axis(p, tuple(np.shape(x))) for p, x in ctx.all_leaves.items()}
  ctx.prunable = {}
  for p, ax in ctx.expected.items():
    shape = np.shape(ctx.all_leaves[p])
    if ax is not None and int(np.prod([shape[a] for a in ax])) % M == 0:
      ctx.prunable[p] = ax

  def why_dense(path):
    ax = ctx.expected.get(path)
    if ax is None:
      return "the oracle keeps it dense"
    return f"axes {ax} have a size that is not a multiple of {M}"

  ctx.why_dense = why_dense
  return ctx


def dense_out(ctx, *xs):
  """The dense model's outputs on ``xs``."""
  return ctx.run(ctx.param_tree if ctx.case.framework == "nnx" else ctx.variables, *xs)


# ----------------------------------------------------------------------------
# The steps.


def step_layouts(ctx):
  """1. trace_layouts vs the oracle, every leaf."""
  c = ctx.case
  if c.framework == "linen":
    layouts = jasp.trace_layouts(ctx.fn, ctx.variables, *c.sample)
  else:
    layouts = jasp.trace_layouts(ctx.model, *c.sample)
  ctx.layouts = layouts
  errors = []
  for path, x in ctx.all_leaves.items():
    shape = tuple(np.shape(x))
    exp = ctx.expected[path]
    if path not in layouts:
      if path in ctx.param_paths:
        errors.append(f"{path} {shape}: missing from the layouts")
      continue  # nnx state outside nnx.Param (BatchStat, rng): not traced, never pruned
    lay = layouts[path]
    if exp is None:
      if lay.axis is not None:
        errors.append(f"{path} {shape}: expected dense, got axes {lay.axis}")
      elif not lay.reason:
        errors.append(f"{path} {shape}: dense without a reason")
      else:
        for rx, text in c.expected_reason.items():
          if re.search(rx, path) and text not in lay.reason:
            errors.append(f"{path} {shape}: the reason {lay.reason!r} does not say {text!r}")
    elif lay.axis != exp:
      errors.append(f"{path} {shape}: expected axes {exp}, got {lay.axis} ({lay.reason})")
  for path in layouts:
    if path not in ctx.all_leaves:
      errors.append(f"{path}: in the layouts but not a leaf of the model")
  fail(ctx, "layouts", errors)


def step_prune(ctx):
  """2. jasp.prune with the traced layouts; the independent N:M check."""
  need(ctx, "layouts")
  pruned, masks = jasp.prune(ctx.param_tree, layouts=ctx.layouts)
  ctx.pruned, ctx.masks = pruned, masks
  fail(
    ctx,
    "prune",
    check_nm(ctx, "pruned", ctx.param_tree, pruned, masks, kept_identical=True, magnitude=True),
  )


def step_finetune(ctx):
  """3. STEPS optax steps with mask_updates; losses finite; still N:M with 0 where pruned."""
  need(ctx, "pruned", "masks")
  c = ctx.case
  batches = c.train_batches()
  losses = []
  if c.framework == "linen":
    params = ctx.pruned["params"]
    rest = {k: v for k, v in ctx.pruned.items() if k != "params"}
    tx = optax.chain(optax.adam(1e-3), jasp.mask_updates(ctx.masks["params"]))
    opt_state = tx.init(params)
    model = ctx.model

    @jax.jit
    def train_step(params, rest, opt_state, inputs, labels, rng):
      def f(p):
        return c.loss(model, {**rest, "params": p}, inputs, labels, rng)

      (loss, updates), grads = jax.value_and_grad(f, has_aux=True)(params)
      upd, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, upd), {**rest, **updates}, opt_state, loss

    for i in range(STEPS):
      inputs, labels = batches[i % len(batches)]
      params, rest, opt_state, loss = train_step(
        params, rest, opt_state, inputs, labels, jax.random.fold_in(jax.random.key(5), i)
      )
      losses.append(float(loss))
    ctx.tuned = {**rest, "params": params}
  else:
    model = build(c)
    nnx.update(model, ctx.pruned)
    model.train()
    tx = optax.chain(optax.adam(1e-3), jasp.mask_updates(ctx.masks))
    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def train_step(model, opt, inputs, labels):
      loss, grads = nnx.value_and_grad(lambda m: c.loss(m, inputs, labels))(model)
      opt.update(model, grads)
      return loss

    for i in range(STEPS):
      inputs, labels = batches[i % len(batches)]
      losses.append(float(train_step(model, opt, inputs, labels)))
    model.eval()
    ctx.tuned_model = model
    ctx.tuned = nnx.state(model, nnx.Param)
  ctx.losses = losses
  errors = []
  if not all(np.isfinite(losses)):
    errors.append(f"non-finite losses: {losses}")
  tuned, pruned_masks = testing.leaves(ctx.tuned), testing.leaves(ctx.masks, keep_none=True)
  for path, ax in ctx.prunable.items():
    if path not in ctx.param_paths:
      continue
    w = np.asarray(tuned[path])
    g = groups(w, ax)
    bad = int(np.sum(np.count_nonzero(g, axis=1) > N))
    if bad:
      errors.append(
        f"{path} {w.shape}: after {STEPS} steps {bad} groups along {ax} hold more "
        f"than {N} non-zeros"
      )
    mk = pruned_masks.get(path)
    if mk is not None and np.any(w[~np.asarray(mk)] != 0):
      errors.append(
        f"{path}: {int(np.sum(w[~np.asarray(mk)] != 0))} pruned entries are no "
        f"longer 0 after {STEPS} steps"
      )
  fail(ctx, "fine-tune", errors)


def step_permute(ctx):
  """4. jasp.permute on the dense model: same function elsewhere, no pruned weight keeps less."""
  c = ctx.case
  if c.framework == "linen":
    permuted, report = jasp.permute(ctx.fn, ctx.variables, *c.sample)
    before, after = ctx.variables, permuted
    y0, y1 = ctx.fn(ctx.variables, *c.other), ctx.fn(permuted, *c.other)
  else:
    model = build(c)
    pmodel, report = jasp.permute(model, *c.sample)
    before, after = nnx.state(model), nnx.state(pmodel)
    y0, y1 = model(*c.other), pmodel(*c.other)
  ctx.perm_report = report
  errors = []
  err = testing.rel_err(y1, y0)
  if not err <= RTOL:
    errors.append(f"the permuted model differs on another input: relative error {err:.3g} > {RTOL}")
  b, a = testing.leaves(before), testing.leaves(after)
  for path, ax in ctx.prunable.items():
    kb, ka = kept_fraction(b[path], ax), kept_fraction(a[path], ax)
    if ka < kb - 1e-9:
      errors.append(f"{path}: 2:4 keeps {ka:.5f} of |w| after the permutation, {kb:.5f} before")
  if c.permuted_class is not None:
    rx, axis = c.permuted_class
    holders = [
      cl for cl in report.classes if any(re.fullmatch(rx, p) and a_ == axis for p, a_ in cl.members)
    ]
    if not any(cl.status == "permuted" for cl in holders):
      why = "; ".join(f"{cl.status}: {cl.reason}" for cl in holders) or "no class holds it"
      errors.append(
        f"{c.permute_note}: the class of ({rx}, axis {axis}) was not permuted "
        f"({why}); {len(report.permuted)} of {len(report.classes)} classes permuted"
      )
  fail(ctx, "permute", errors)


def step_calibration(ctx):
  """5. Wanda and SparseGPT: N:M params; SparseGPT's held-out error <= magnitude's."""
  c = ctx.case
  calib = c.calib_batches()
  errors = []
  results = {}
  for name, prune_fn in (("wanda", jasp.wanda_prune), ("sparsegpt", jasp.sparsegpt_prune)):
    try:
      if c.framework == "linen":
        params, masks = prune_fn(lambda v, b: ctx.fn(v, *b), ctx.variables, calib, progress=False)
      else:
        params, masks = prune_fn(build(c), [b[0] for b in calib], progress=False)
    except Exception as e:  # noqa: BLE001 - recorded, the other method still runs
      errors.append(f"{name}: {type(e).__name__}: {_first_lines(str(e))}")
      continue
    results[name] = params
    errors += [
      f"{name}: {e}"
      for e in check_nm(
        ctx, name, ctx.param_tree, params, masks, kept_identical=(name == "wanda"), magnitude=False
      )
    ]
  if "sparsegpt" in results:
    if c.framework == "linen":
      layouts = jasp.trace_layouts(ctx.fn, ctx.variables, *c.sample)
    else:
      layouts = jasp.trace_layouts(ctx.model, *c.sample)
    magnitude, _ = jasp.prune(ctx.param_tree, layouts=layouts)
    ref = dense_out(ctx, *c.heldout)
    e_gpt = l2_error(ctx.run(results["sparsegpt"], *c.heldout), ref)
    e_mag = l2_error(ctx.run(magnitude, *c.heldout), ref)
    ctx.calib_errors = {"sparsegpt": e_gpt, "magnitude": e_mag}
    if not e_gpt <= e_mag:
      errors.append(f"held-out output error: SparseGPT {e_gpt:.4g} > magnitude {e_mag:.4g}")
  fail(ctx, "calibration", errors)


def step_export(ctx, tmp_path):
  """6. ONNX: onnxruntime matches JAX on the sample; check_file finds the pruned weights N:M."""
  need(ctx, "tuned", "masks")
  c = ctx.case
  path = tmp_path / f"{c.name}.onnx"
  if c.framework == "linen":
    jasp.export.to_onnx(ctx.fn, ctx.tuned, *c.sample, path=path, masks=ctx.masks)
    y = ctx.fn(ctx.tuned, *c.sample)
  else:
    jasp.export.to_onnx(ctx.tuned_model, *c.sample, path=path, masks=ctx.masks)
    y = ctx.tuned_model(*c.sample)
  onnx.checker.check_model(str(path), full_check=True)  # the format's own checker
  opts = onnxruntime.SessionOptions()
  opts.log_severity_level = 3
  sess = onnxruntime.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
  feeds = {i.name: np.asarray(x) for i, x in zip(sess.get_inputs(), c.sample)}
  outs = sess.run(None, feeds)
  errors = []
  ys = jax.tree_util.tree_leaves(y)
  if len(outs) != len(ys):
    errors.append(f"onnxruntime returned {len(outs)} outputs, JAX {len(ys)}")
  else:
    err = testing.rel_err(outs, ys)
    if not err <= RTOL:
      errors.append(f"onnxruntime vs JAX: relative error {err:.3g} > {RTOL}")
  report = jasp.export.check_file(str(path))
  by_param = report.by_param()
  for p in ctx.prunable:
    if p not in ctx.param_paths:
      continue
    # A kernel stacked for a scan over layers is written one initializer per layer,
    # listed as 'path[layer]': every layer must be there.
    found = [
      w
      for name, w in by_param.items()
      if name == p or (name.startswith(p + "[") and name.endswith("]"))
    ]
    if not found:
      errors.append(f"{p}: not listed by check_file")
      continue
    layers = [name for name in by_param if name.startswith(p + "[")]
    if layers:
      depth = len(layers[0][len(p) + 1 : -1].split(","))
      want = math.prod(np.shape(testing.leaves(ctx.param_tree)[p])[:depth])
      if len(layers) != want:
        errors.append(f"{p}: check_file lists {len(layers)} layer(s) of {want}")
    for w in found:
      if not (w.nm and w.expected):
        errors.append(
          f"{w.param}: check_file says nm={w.nm}, expected={w.expected} "
          f"({w.consumer}, axis {w.axis}; {w.note})"
        )
  fail(ctx, "export", errors)


def _first_lines(text: str, n: int = 3) -> str:
  return " | ".join(text.strip().splitlines()[:n])


STEP_FUNCS = [
  ("layouts", step_layouts),
  ("prune", step_prune),
  ("fine-tune", step_finetune),
  ("permute", step_permute),
  ("calibration", step_calibration),
  ("export", step_export),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_zoo_model_is_sound(case: zoo.Case):
  """The zoo itself: the oracle names every leaf (setup raises KeyError otherwise), the dense
  model is deterministic with finite outputs on the sample and held-out inputs, and the training
  loss is a finite scalar. A failure here is a bug in the zoo, not in jasp."""
  ctx = setup(case)
  for xs in (case.sample, case.heldout):
    y = out_leaves(dense_out(ctx, *xs))
    assert all(np.all(np.isfinite(a)) for a in y), f"[{case.name}] non-finite dense output"
    assert testing.rel_err(dense_out(ctx, *xs), y) == 0.0, (
      f"[{case.name}] eval mode is not deterministic"
    )
  inputs, labels = case.train_batches()[0]
  if case.framework == "linen":
    loss, _ = case.loss(ctx.model, ctx.variables, inputs, labels, jax.random.key(0))
  else:
    model = build(case)
    model.train()
    loss = case.loss(model, inputs, labels)
  assert jnp.shape(loss) == () and np.isfinite(float(loss)), f"[{case.name}] bad loss {loss}"


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_zoo(case: zoo.Case, tmp_path):
  """Every step of the recipe on one model family; all steps run, failures listed at the end."""
  t0 = time.perf_counter()
  ctx = setup(case)
  results = {}
  for name, fn in STEP_FUNCS:
    t1 = time.perf_counter()
    try:
      if name == "export":
        fn(ctx, tmp_path)
      else:
        fn(ctx)
      status, msg = "PASS", ""
    except Skip as e:
      status, msg = "SKIP", str(e)
    except AssertionError as e:
      status, msg = "FAIL", str(e)
    except Exception as e:  # noqa: BLE001 - jasp raised: the step fails, later steps still run
      tb = traceback.extract_tb(e.__traceback__)[-1]
      status = "FAIL"
      msg = (
        f"[{case.name}] {name}: {type(e).__name__}: {_first_lines(str(e))} "
        f"(at {os.path.basename(tb.filename)}:{tb.lineno})"
      )
    results[name] = {
      "status": status,
      "message": msg,
      "seconds": round(time.perf_counter() - t1, 2),
    }
  total = round(time.perf_counter() - t0, 2)
  table = "\n".join(
    f"  {n:12s} {r['status']:4s} {r['seconds']:7.2f} s  {_first_lines(r['message'], 1)}"
    for n, r in results.items()
  )
  print(f"\n[{case.name}] {total:.1f} s\n{table}")
  out_dir = os.environ.get("JASP_ZOO_RESULTS")
  if out_dir:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"{case.name}.json"), "w") as f:
      json.dump(
        {
          "case": case.name,
          "seconds": total,
          "steps": results,
          "losses": getattr(ctx, "losses", None),
          "calibration_errors": getattr(ctx, "calib_errors", None),
        },
        f,
        indent=1,
      )
  failed = {n: r for n, r in results.items() if r["status"] != "PASS"}
  if failed:
    details = "\n\n".join(f"--- {n} ({r['status']}) ---\n{r['message']}" for n, r in failed.items())
    pytest.fail(
      f"[{case.name}] {len(failed)} of {len(results)} step(s) did not pass:\n{table}\n\n{details}",
      pytrace=False,
    )
