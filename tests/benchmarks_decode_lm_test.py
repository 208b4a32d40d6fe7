"""benchmarks/decode_lm.py: its CPU smoke run, and its KV-cache decoding against a no-cache oracle."""

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import decode_lm as dl  # noqa: E402

CFG = {k: dl.SMOKE[k] for k in ("dim", "heads", "depth", "context", "prompt", "new_tokens")}


def no_cache_greedy(model, prompt: np.ndarray, steps: int) -> tuple[np.ndarray, np.ndarray]:
  """Greedy tokens by re-running the whole model (decode=False) on the growing sequence.

  Returns ``(tokens (B, steps), the first step's logits (B, vocab) float32)``.
  """
  seq, out, first = np.asarray(prompt), [], None
  for _ in range(steps):
    logits = np.asarray(model(jnp.asarray(seq))[:, -1].astype(jnp.float32))
    first = logits if first is None else first
    nxt = np.argmax(logits, axis=-1).astype(np.int32)
    out.append(nxt)
    seq = np.concatenate([seq, nxt[:, None]], axis=1)
  return np.stack(out, axis=1), first


@pytest.mark.slow
def test_smoke_run_records_every_variant_checked(tmp_path):
  out = tmp_path / "decode_lm.json"
  res = dl.main(["--smoke", "--out", str(out)])
  data = json.loads(out.read_text())
  assert data["meta"]["device"]["platform"] == jax.default_backend()
  assert "errors" not in data and "errors" not in res, data.get("errors")
  assert data["config"]["batches"] == [1, 2]
  assert set(data["variants"]) == set(dl.VARIANTS)
  pruned = data["pruning"]["pruned"]
  assert len(pruned) == 6 * CFG["depth"] and all(p.startswith("blocks/") for p in pruned)
  assert "head/kernel" in data["pruning"]["dense"]
  tol = data["reference"]["tol"]
  assert dl.TOL_FLOOR <= tol < 0.1
  for name, v in data["variants"].items():
    assert set(v["batches"]) == {"1", "2"}, name
    for b, row in v["batches"].items():
      assert row["tokens_per_s"] > 0 and row["ms_per_token"] > 0 and row["compile_s"] > 0
      assert row["tokens_per_s"] == pytest.approx(
        int(b) * CFG["new_tokens"] / row["seconds"], rel=1e-9
      )
      if name != dl.BASELINE:
        assert row["speedup_vs_baseline"] > 0
    if name.startswith("jasp.sparse"):
      check = v["check"]
      assert check["passed"] and check["logits_rel_err"] <= check["tol"] == tol, check
      assert 0 <= check["agreement"]["fraction_equal"] <= 1
      assert v["policy"]["1"] and all(
        c["path"] in ("dense", "sparse", "compact") for c in v["policy"]["1"]
      )
      assert set(pruned) <= set(v["sparsify_report"])
      assert v["sparsify_report"]["head/kernel"].startswith("kept")  # not 2:4: stays nnx.Linear
  base = data["variants"][dl.BASELINE]["tokens_batch1"]
  assert data["variants"]["jasp.sparse"]["tokens_batch1"][:2] == base[:2]

  # The cached generation of the dense bf16 model equals the no-cache oracle on its weights.
  model = dl.build_model(CFG, seed=0)
  prompt = dl.make_prompts(0, 1, CFG["prompt"])
  oracle, _ = no_cache_greedy(model, prompt, 4)
  assert data["variants"]["dense"]["tokens_batch1"][:4] == oracle[0].tolist()


@pytest.mark.slow
def test_kv_cache_decode_equals_no_cache_oracle_float32():
  cfg = dict(CFG, new_tokens=5)
  model = dl.build_model(cfg, jnp.float32, seed=3)
  prompt = dl.make_prompts(3, 2, cfg["prompt"])
  tokens, first = dl.generate(model, prompt, cfg, jnp.float32)
  oracle, oracle_first = no_cache_greedy(model, prompt, cfg["new_tokens"])
  np.testing.assert_array_equal(tokens, oracle)
  np.testing.assert_allclose(first, oracle_first, rtol=1e-5, atol=1e-5)


def test_prompt_and_new_tokens_must_fit_the_context():
  model = dl.build_model(CFG, jnp.float32)
  with pytest.raises(ValueError, match="do not fit context"):
    dl.Generator(model, 1, dict(CFG, prompt=CFG["context"], new_tokens=2), jnp.float32)


@pytest.mark.slow
def test_a_wrong_sparse_model_is_recorded_and_not_timed(tmp_path, monkeypatch):
  real = dl.make_variant

  def broken(name, pruned, dense):
    model, info = real(name, pruned, dense)
    if name == "jasp.sparse":  # the head's sign flipped: every logit negated
      model.head.kernel.set_value(-model.head.kernel.get_value())
    return model, info

  monkeypatch.setattr(dl, "make_variant", broken)
  out = tmp_path / "bad.json"
  res = dl.main(["--smoke", "--variants", "2,3", "--out", str(out)])
  data = json.loads(out.read_text())
  (err,) = data["errors"]
  assert "jasp.sparse" in err and "first-step logits off the baseline" in err
  assert res["errors"] == data["errors"]
  bad = data["variants"]["jasp.sparse"]
  assert bad["check"]["passed"] is False and "batches" not in bad
  assert set(data["variants"]) == {dl.BASELINE, "jasp.sparse"}
