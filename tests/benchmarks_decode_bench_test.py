"""benchmarks/decode_bench.py: its CPU smoke run, and its correctness gate (float64 oracle here)."""

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import testing

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import decode_bench as db  # noqa: E402

from jasp.kernels import decode24


def test_smoke_run_writes_checked_records(tmp_path):
  out = tmp_path / "decode.json"
  res = db.main(["--smoke", "--out", str(out)])
  data = json.loads(out.read_text())
  assert data["meta"]["device"]["platform"] == jax.default_backend()
  assert data["records"] == json.loads(json.dumps(res["records"], default=str))
  shapes = {(r["K"], r["N"], r["T"]) for r in data["records"]}
  assert shapes == {(k, n, t) for k, n in db.SMOKE_SHAPES for t in db.SMOKE_TOKENS}
  for r in data["records"]:
    k, n, t = r["K"], r["N"], r["T"]
    names = [row["variant"] for row in r["compressed"]]
    # the Mosaic kernel's "nk" layout needs K % 256 == 0 and N % 64 == 0
    assert names == (["default", "layout=nk"] if (k, n) == (256, 128) else ["default"])
    for row in r["compressed"]:
      assert 0 <= row["rel_err"] < 2**-7
      assert row["bytes_moved"] == k * n + k * n // 8 + 2 * t * (k + n)
      assert row["speedup_vs_dense"] == pytest.approx(r["dense_s"] / row["seconds"])
  assert "errors" not in data


def test_sweep_smoke_times_every_variant_that_fits():
  res = db.main(["--smoke", "--sweep", "--shapes", "256x128", "--tokens", "3"])
  (r,) = res["records"]
  names = [row["variant"] for row in r["compressed"]]
  # off Hopper the default is the "kn" layout, so "layout=kn" is not timed twice
  assert names[:2] == ["default", "layout=nk"] and "layout=kn" not in names
  assert names == ["default"] + [n for n, t in db.variants(True, "kn")[1:] if t.get("tile") != 256]
  assert "layout=nk,block_n=128" in names  # N = 128 takes two multiplies per program
  got = {(row["layout"], row["tile"]) for row in r["compressed"]}
  assert got == {("kn", 128), ("kn", 64), ("nk", 64)}  # K / 4 = 64 groups: the 'nk' chunk is 64
  nk = {row["variant"]: row["plan"] for row in r["compressed"] if row["layout"] == "nk"}
  assert nk["layout=nk"]["block_n"] == 64 and nk["layout=nk,block_n=128"]["block_n"] == 128


def test_variants_flag_times_only_the_variants_given():
  res = db.main(
    [
      "--smoke",
      "--shapes",
      "256x128",
      "--tokens",
      "2",
      "--variants",
      "layout=nk,block_n=128; layout=kn,block_g=16",
    ]
  )
  (r,) = res["records"]
  rows = {row["variant"]: row for row in r["compressed"]}
  assert list(rows) == ["default", "layout=nk,block_n=128", "layout=kn,block_g=16"]
  assert rows["layout=nk,block_n=128"]["plan"]["block_n"] == 128
  assert rows["layout=kn,block_g=16"]["plan"]["block_g"] == 16
  assert db.parse_variants("layout=nk,stages=2;;") == ({"layout": "nk", "stages": 2},)
  # a variant whose plan does not fit the shape is left out, not an error: N = 192
  assert not db.applies(1024, 192, {"layout": "nk", "block_n": 128}, smoke=True)
  assert db.applies(1024, 192, {"layout": "nk"}, smoke=True)
  for bad, msg in (("stages=2", "names its layout"), ("layout=nk,stages", "key=value")):
    with pytest.raises(ValueError, match=msg):
      db.parse_variants(bad)
  with pytest.raises(SystemExit):
    db.parse_args(["--smoke", "--variants", "layout=mn"])


def test_probe_cuts_the_selects_only_within_and_is_kept_apart():
  res = db.main(["--smoke", "--probe", "--shapes", "256x128", "--tokens", "3,5"])
  for r in res["records"]:
    # every variant's product was checked; the probes are rows of their own
    assert [row["variant"] for row in r["compressed"]] == ["default", "layout=nk"]
    assert [row["variant"] for row in r["probes"]] == ["probe:kn", "probe:nk"]
    assert all(row["differs_from_product"] for row in r["probes"])
  # outside the probe, the kernels decode with six selects again
  w = db.weight_24(jax.random.key(1), 256, 128, jnp.bfloat16)
  x = jnp.ones((2, 256), jnp.bfloat16)
  for layout in ("kn", "nk"):
    y = decode24.matmul_24(x, decode24.compress_24(w, layout=layout), interpret=True)
    db.check(y, x, w, layout)


def test_weight_is_2_of_4_with_the_two_largest_kept():
  w = np.asarray(db.weight_24(jax.random.key(0), 64, 48, jnp.float32), np.float64)
  dense = np.asarray(jax.random.normal(jax.random.key(0), (64, 48), jnp.float32), np.float64)
  g, d = w.reshape(16, 4, 48), np.abs(dense).reshape(16, 4, 48)
  assert ((g != 0).sum(axis=1) == 2).all()
  kept = np.sort(np.abs(g), axis=1)[:, 2:]
  np.testing.assert_array_equal(kept, np.sort(d, axis=1)[:, 2:])


def test_check_passes_rounded_products_and_fails_loudly():
  rng, seed = testing.fresh_rng(3)
  x = jnp.asarray(rng.standard_normal((4, 256)), jnp.bfloat16)
  w = jnp.asarray(rng.standard_normal((256, 32)), jnp.bfloat16)
  ref = testing.as_np64(x) @ testing.as_np64(w)
  y = jnp.asarray(ref, jnp.bfloat16)  # the float64 product rounded once
  assert db.check(y, x, w, "rounded") < 2**-8
  off = y.at[1, 2].add(jnp.bfloat16(0.25 + abs(float(ref[1, 2])) * 2**-5))
  with pytest.raises(db.Mismatch, match=r"bad: output off .* beyond the bound"):
    db.check(off, x, w, "bad")
  with pytest.raises(db.Mismatch):
    db.check(y.at[0, 0].set(jnp.nan), x, w, "nan")
