"""jasp.sparse._search_cache: storing and reusing the algorithm search's choices (CPU, no extension)."""

import json
import logging

import pytest

from jasp.sparse import _search_cache as sc

IDENT = "NVIDIA H100 80GB HBM3|sm9.0|cslt800|jasp_cslt_0123456789abcdef.so"


def _row(
  out, in_, tokens, dtype="bfloat16", a_order=0, bias=False, alg=17, ms=0.25, from_cache=False
):
  return {
    "device": 0,
    "out": out,
    "in": in_,
    "tokens": tokens,
    "dtype": dtype,
    "a_order": a_order,
    "bias_epilogue": bias,
    "alg_id": alg,
    "search_ms": ms,
    "workspace": 1024,
    "from_cache": from_cache,
  }


class FakeRuntime:
  """What the cache uses of a Runtime: identity, plans() and preset()."""

  def __init__(self, rows, identity=IDENT):
    self.rows = rows
    self.identity = identity
    self.presets = []

  def plans(self):
    return self.rows

  def preset(self, out, in_, tokens, dtype, a_order, bias, *, alg_id, search_ms):
    self.presets.append(((out, in_, tokens, dtype, a_order, bias), alg_id, search_ms))


def test_cache_path_default_override_and_off(monkeypatch, tmp_path):
  monkeypatch.delenv(sc.ENV, raising=False)
  monkeypatch.setenv("JASP_CACHE_DIR", str(tmp_path))
  assert sc.cache_path() == str(tmp_path / "sparse_search.json")
  monkeypatch.setenv(sc.ENV, str(tmp_path / "other.json"))
  assert sc.cache_path() == str(tmp_path / "other.json")
  monkeypatch.setenv(sc.ENV, "0")
  assert sc.cache_path() is None
  assert sc.save(FakeRuntime([_row(64, 64, 16)])) == 0
  assert not sc.install(FakeRuntime([]))


def test_save_writes_only_this_process_searches(tmp_path):
  path = str(tmp_path / "s.json")
  rows = [
    _row(8192, 8192, 8192, alg=17, ms=0.95),
    _row(8192, 8192, 8192, dtype="float16", a_order=1, bias=True, alg=6, ms=1.1),
    _row(64, 64, 16, ms=None),  # not searched (search off)
    _row(128, 128, 32, alg=3, from_cache=True),
  ]  # read from the cache
  assert sc.save(FakeRuntime(rows), path) == 2
  got = sc.read(path, IDENT)
  assert got == {
    (8192, 8192, 8192, "bfloat16", 0, False): (17, 0.95),
    (8192, 8192, 8192, "float16", 1, True): (6, 1.1),
  }
  assert sc.read(path, "another GPU") == {}
  assert sc.save(FakeRuntime([_row(64, 64, 16, ms=None)]), str(tmp_path / "none.json")) == 0
  assert not (tmp_path / "none.json").exists()


def test_write_merges_with_other_processes_and_identities(tmp_path):
  path = str(tmp_path / "s.json")
  sc.write(path, IDENT, {(1, 2, 3, "bfloat16", 0, False): (1, 0.1)})
  sc.write(path, "H200|sm9.0|cslt1000|x.so", {(1, 2, 3, "bfloat16", 0, False): (9, 0.2)})
  sc.write(
    path,
    IDENT,
    {(4, 5, 6, "float16", 1, False): (2, 0.3), (1, 2, 3, "bfloat16", 0, False): (5, 0.05)},
  )  # a newer search wins
  assert sc.read(path, IDENT) == {
    (1, 2, 3, "bfloat16", 0, False): (5, 0.05),
    (4, 5, 6, "float16", 1, False): (2, 0.3),
  }
  assert sc.read(path, "H200|sm9.0|cslt1000|x.so") == {(1, 2, 3, "bfloat16", 0, False): (9, 0.2)}
  with open(path) as f:
    assert set(json.load(f)) == {IDENT, "H200|sm9.0|cslt1000|x.so"}
  assert [p.name for p in tmp_path.iterdir()] == ["s.json"]  # no temporary file left


def test_install_presets_stored_choices_and_saves_at_exit(monkeypatch, tmp_path):
  path = tmp_path / "s.json"
  monkeypatch.setenv(sc.ENV, str(path))
  sc.write(str(path), IDENT, {(8192, 4096, 2048, "float16", 0, True): (27, 0.5)})
  sc.write(str(path), "other", {(1, 1, 1, "bfloat16", 0, False): (1, 1.0)})
  registered = []
  monkeypatch.setattr(sc.atexit, "register", lambda fn, *a: registered.append((fn, a)))
  rt = FakeRuntime([_row(256, 384, 512, alg=4, ms=0.01)])
  assert sc.install(rt)
  assert rt.presets == [((8192, 4096, 2048, "float16", 0, True), 27, 0.5)]
  ((fn, args),) = registered
  assert fn(*args) == 1  # what the exit hook does: this process's search is added
  assert set(sc.read(str(path), IDENT)) == {
    (8192, 4096, 2048, "float16", 0, True),
    (256, 384, 512, "bfloat16", 0, False),
  }


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '{"%s": [{"out": 1}]}' % IDENT])
def test_unreadable_file_is_ignored_with_a_warning_then_replaced(tmp_path, caplog, text):
  path = tmp_path / "s.json"
  path.write_text(text)
  with caplog.at_level(logging.WARNING, logger="jasp.sparse"):
    assert sc.read(str(path), IDENT) == {}
  assert "ignoring the search cache" in caplog.text
  sc.write(str(path), IDENT, {(1, 2, 3, "bfloat16", 0, False): (1, 0.1)})
  assert sc.read(str(path), IDENT) == {(1, 2, 3, "bfloat16", 0, False): (1, 0.1)}
