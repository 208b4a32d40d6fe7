"""The algorithm search's results, kept in a file across processes.

The first call of a shape searches cuSPARSELt's algorithm configurations,
which costs 0.06-1.2 s for bf16 and 7-9 s for fp16 (cuSPARSELt builds one
plan per configuration). This module stores each search's choice in a JSON
file when the process exits, and hands the stored choices to the extension
when it loads, so a later process builds the chosen configuration directly.

Entries are grouped by :attr:`Runtime.identity` (GPU model, compute
capability, cuSPARSELt version and the extension's build), so one file serves
several GPUs and versions and a choice is only reused where it was made. The
file is ``<cache dir>/sparse_search.json`` (see :func:`jasp.sparse.build.cache_dir`);
``$JASP_SPARSE_SEARCH_CACHE`` names another file, or ``0`` turns the cache off.
Writes re-read and merge the file, then replace it atomically, so concurrent
processes do not lose each other's entries (the last writer wins per entry).
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import tempfile
from typing import Any

from jasp.sparse import build as build_lib

__all__ = ["Entry", "Key", "cache_path", "install", "read", "save", "write"]

log = logging.getLogger("jasp.sparse")

ENV = "JASP_SPARSE_SEARCH_CACHE"

# (out, in, tokens, dtype name, a_order, bias epilogue) -> (alg_id, search_ms)
Key = tuple[int, int, int, str, int, bool]
Entry = tuple[int, float]


def cache_path() -> str | None:
  """The cache file, or None when ``$JASP_SPARSE_SEARCH_CACHE`` is ``0``."""
  env = os.environ.get(ENV, "")
  if env == "0":
    return None
  return env or os.path.join(build_lib.cache_dir(), "sparse_search.json")


def _key(row: dict[str, Any]) -> Key:
  return (
    int(row["out"]),
    int(row["in"]),
    int(row["tokens"]),
    str(row["dtype"]),
    int(row["a_order"]),
    bool(row["bias_epilogue"]),
  )


def read(path: str, identity: str) -> dict[Key, Entry]:
  """The stored choices for ``identity``; empty if the file is missing or unreadable."""
  try:
    with open(path) as f:
      raw = json.load(f)
    rows = raw.get(identity, [])
    out = {}
    for r in rows:
      if r["dtype"] not in ("bfloat16", "float16"):
        continue
      out[_key(r)] = (int(r["alg_id"]), float(r["search_ms"]))
    return out
  except FileNotFoundError:
    return {}
  except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
    log.warning("jasp.sparse: ignoring the search cache %s (%s: %s)", path, type(e).__name__, e)
    return {}


def write(path: str, identity: str, entries: dict[Key, Entry]) -> None:
  """Merges ``entries`` into the file under ``identity`` (atomic replace)."""
  try:
    with open(path) as f:
      raw = json.load(f)
    if not isinstance(raw, dict):
      raw = {}
  except (OSError, ValueError):
    raw = {}
  merged = {**read(path, identity), **entries}
  raw[identity] = [
    {
      "out": k[0],
      "in": k[1],
      "tokens": k[2],
      "dtype": k[3],
      "a_order": k[4],
      "bias_epilogue": k[5],
      "alg_id": v[0],
      "search_ms": v[1],
    }
    for k, v in sorted(merged.items())
  ]
  d = os.path.dirname(path) or "."
  os.makedirs(d, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=d, suffix=".json")
  try:
    with os.fdopen(fd, "w") as f:
      json.dump(raw, f, indent=1, sort_keys=True)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def install(rt) -> bool:
  """Hands the stored choices to the loaded extension and saves new ones at exit.

  Args:
    rt: the :class:`jasp.sparse._runtime.Runtime` just loaded.

  Returns:
    Whether the cache is on.
  """
  path = cache_path()
  if path is None:
    return False
  for k, (alg, ms) in read(path, rt.identity).items():
    rt.preset(*k, alg_id=alg, search_ms=ms)
  atexit.register(save, rt, path)
  return True


def save(rt, path: str | None = None) -> int:
  """Writes this process's search results (not those it read) to the cache file.

  Returns:
    How many entries were written (0 when the cache is off or nothing was searched).
  """
  path = path if path is not None else cache_path()
  if path is None:
    return 0
  new = {
    _key(r): (r["alg_id"], r["search_ms"])
    for r in rt.plans()
    if r["search_ms"] is not None and not r["from_cache"]
  }
  if not new:
    return 0
  try:
    write(path, rt.identity, new)
  except OSError as e:
    log.warning("jasp.sparse: could not write the search cache %s: %s", path, e)
    return 0
  return len(new)
