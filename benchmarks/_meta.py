"""What every benchmark results file records about its run: commit, versions, device.

Every script in ``benchmarks/`` writes its results through :func:`write_json`
(or, for line-oriented output, prints :func:`header_line` first), so each file
says which code ran, with which libraries, on which device::

    {"meta": {"commit": "1a2b3c4", "date": "2026-11-30", "command": "...",
              "python": "3.11.7", "versions": {"jax": ..., "jaxlib": ..., ...},
              "device": {"platform": "gpu", "kind": "NVIDIA H200", "count": 1, ...}},
     ...the benchmark's own fields...}

A list of records is stored under ``"records"``. The commit comes from
``git rev-parse --short HEAD`` (with ``-dirty`` when the tree has changes);
where the benchmark runs from a copy without ``.git``, set ``JASP_COMMIT``.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Always recorded; the optional ones only when the benchmark imported them.
CORE = ("jax", "jaxlib", "flax", "optax", "numpy")
OPTIONAL = ("torch", "jax2onnx", "onnx", "onnxruntime", "tensorflow", "nvidia-cusparselt-cu13")


def commit() -> str:
  """Short commit of the checkout, ``-dirty`` if it has changes; ``JASP_COMMIT`` overrides."""
  if os.environ.get("JASP_COMMIT"):
    return os.environ["JASP_COMMIT"]
  git = lambda *a: subprocess.run(
    ["git", *a], cwd=ROOT, capture_output=True, text=True, check=True, timeout=30
  ).stdout.strip()
  try:
    head = git("rev-parse", "--short", "HEAD")
  except (OSError, subprocess.SubprocessError):
    return "unknown (no git checkout; set JASP_COMMIT)"
  try:
    dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
  except (OSError, subprocess.SubprocessError):
    dirty = False
  return head + ("-dirty" if dirty else "")


def _version(dist: str) -> str | None:
  try:
    return importlib.metadata.version(dist)
  except importlib.metadata.PackageNotFoundError:
    return None


def versions() -> dict[str, str]:
  out = {name: _version(name) or "not installed" for name in CORE}
  for name in OPTIONAL:
    module = name.replace("-", "_")
    if module in sys.modules or name.startswith("nvidia-"):
      v = _version(name)
      if v:
        out[name] = v
  return out


def _cpu_name() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def device() -> dict[str, Any]:
  """JAX's default backend: platform, device kind and count, and the host CPU."""
  import jax

  devs = jax.devices()
  return {
    "platform": jax.default_backend(),
    "kind": devs[0].device_kind,
    "count": len(devs),
    "host_cpu": f"{_cpu_name()}, {os.cpu_count()} cores",
  }


def _script() -> str:
  arg0 = sys.argv[0] if sys.argv and sys.argv[0] else "-c"
  return os.path.relpath(arg0, ROOT) if arg0.endswith(".py") else arg0


def run_meta() -> dict[str, Any]:
  """The ``meta`` block of a results file, for the process that calls it."""
  return {
    "commit": commit(),
    "date": time.strftime("%Y-%m-%d", time.gmtime()),
    "command": "python3 " + shlex.join([_script(), *sys.argv[1:]]),
    "python": platform.python_version(),
    "versions": versions(),
    "device": device(),
  }


def with_meta(results: Any, meta: dict[str, Any] | None = None) -> dict[str, Any]:
  """``results`` with a ``meta`` block first (a list goes under ``records``)."""
  meta = run_meta() if meta is None else meta
  if isinstance(results, dict):
    return {"meta": meta, **{k: v for k, v in results.items() if k != "meta"}}
  return {"meta": meta, "records": results}


def write_json(path: str, results: Any, meta: dict[str, Any] | None = None) -> None:
  """Writes ``with_meta(results)`` to ``path`` (indented JSON)."""
  with open(path, "w") as f:
    json.dump(with_meta(results, meta), f, indent=1, default=str)


def header_line(meta: dict[str, Any] | None = None) -> str:
  """One ``# meta {...}`` line for line-oriented results (text files)."""
  return "# meta " + json.dumps(run_meta() if meta is None else meta)
