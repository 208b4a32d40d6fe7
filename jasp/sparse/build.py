"""Builds the cuSPARSELt XLA FFI extension (``_ffi.cc``) on first use.

No CUDA device code is compiled: ``_ffi.cc`` is host C++ that calls
cuSPARSELt's C API, so the system C++ compiler suffices. What it needs:

* XLA's FFI headers: ``jax.ffi.include_dir()``;
* ``cusparseLt.h`` and ``libcusparseLt.so.0``: ``$CUSPARSELT_HOME`` if set,
  else the ``nvidia-cusparselt-cu12`` / ``-cu13`` wheel (``pip install
  nvidia-cusparselt-cu13``), else a system install (``/usr``);
* the CUDA runtime's type headers (``driver_types.h``, ``library_types.h``):
  the ``nvidia-cuda-runtime`` wheel, ``$CUDA_HOME`` or ``/usr/local/cuda``.

The shared object is cached under ``$JASP_CACHE_DIR`` (default
``$XDG_CACHE_HOME/jasp`` or ``~/.cache/jasp``), keyed by a hash of the source,
the jax/jaxlib versions, the cuSPARSELt header and the compiler, so upgrading
any of them rebuilds. Builds are atomic (compiled to a temporary name, then
renamed), so concurrent processes do not see a half-written library.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile

__all__ = ["BuildError", "Toolchain", "build", "cache_dir", "find_toolchain"]

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_ffi.cc")


class BuildError(RuntimeError):
  """The extension could not be built; the message says what was missing or failed."""


@dataclasses.dataclass(frozen=True)
class Toolchain:
  """What a build uses.

  Attributes:
    compiler: the C++ compiler's path.
    include_dirs: ``-I`` directories (XLA FFI, cuSPARSELt, CUDA runtime types).
    lib_dir: the directory of ``libcusparseLt.so.0`` (also the run path).
    lib_name: the file name linked (``libcusparseLt.so.0``).
    cusparselt_header: path of the ``cusparseLt.h`` used.
  """

  compiler: str
  include_dirs: tuple[str, ...]
  lib_dir: str
  lib_name: str
  cusparselt_header: str


def cache_dir() -> str:
  """The directory built libraries (and timing caches) are stored in."""
  base = os.environ.get("JASP_CACHE_DIR")
  if not base:
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    base = os.path.join(xdg, "jasp")
  return base


def _nvidia_roots() -> list[str]:
  """Directories of the ``nvidia`` namespace package (the CUDA wheels), if any."""
  try:
    spec = importlib.util.find_spec("nvidia")
  except (ImportError, ValueError):
    return []
  if spec is None:
    return []
  return [p for p in (spec.submodule_search_locations or []) if os.path.isdir(p)]


def _env_roots(*names: str) -> list[str]:
  return [os.environ[n] for n in names if os.environ.get(n)]


def _find(patterns: list[str]) -> list[str]:
  out = []
  for pat in patterns:
    for hit in sorted(glob.glob(pat)):
      if hit not in out:
        out.append(hit)
  return out


def _candidates(filename: str, sub: str) -> list[str]:
  """``<root>/**/<sub>/<filename>``, in order of preference.

  ``$CUSPARSELT_HOME`` / ``$CUSPARSELT_PATH`` first (an explicit choice, e.g.
  another cuSPARSELt version than the wheel's), then the ``nvidia`` wheels,
  then ``$CUDA_HOME`` / ``$CUDA_PATH`` and the system paths.
  """

  def env(*names):
    out = []
    for r in _env_roots(*names):
      out += [
        os.path.join(r, sub, filename),
        os.path.join(r, sub, "x86_64-linux-gnu", filename),
        os.path.join(r, sub + "64", filename),
      ]
    return out

  pats = env("CUSPARSELT_HOME", "CUSPARSELT_PATH")
  for r in _nvidia_roots():
    pats += [os.path.join(r, "*", sub, filename), os.path.join(r, sub, filename)]
  pats += env("CUDA_HOME", "CUDA_PATH")
  pats += [
    os.path.join("/usr/local/cuda", sub, filename),
    os.path.join("/usr/local/cuda", sub + "64", filename),
    os.path.join("/usr/local/cuda-*", sub, filename),
    os.path.join("/usr/local/cuda-*", sub + "64", filename),
    os.path.join("/usr", sub, filename),
    os.path.join("/usr", sub, "x86_64-linux-gnu", filename),
    os.path.join("/usr", sub, "aarch64-linux-gnu", filename),
  ]
  return _find(pats)


def find_toolchain() -> Toolchain:
  """Locates the compiler, headers and library a build needs.

  Raises:
    BuildError: naming every missing piece and where it was looked for.
  """
  missing = []
  compiler = os.environ.get("CXX") or next(
    (c for c in ("c++", "g++", "clang++") if shutil.which(c)), None
  )
  if compiler and not shutil.which(compiler):
    compiler = None
  if not compiler:
    missing.append("a C++ compiler (set $CXX, or install g++)")
  try:
    import jax

    ffi_inc = jax.ffi.include_dir()
  except Exception as e:
    ffi_inc = None
    missing.append(f"XLA's FFI headers (jax.ffi.include_dir() failed: {e})")
  headers = _candidates("cusparseLt.h", "include")
  if not headers:
    missing.append(
      "cusparseLt.h (pip install nvidia-cusparselt-cu13, or -cu12 for CUDA 12; "
      "or set $CUSPARSELT_HOME)"
    )
  libs = [p for p in _candidates("libcusparseLt.so.0", "lib")]
  if not libs:
    missing.append("libcusparseLt.so.0 (the same nvidia-cusparselt wheel)")
  rt = _candidates("driver_types.h", "include")
  rt = [p for p in rt if os.path.exists(os.path.join(os.path.dirname(p), "library_types.h"))]
  # driver_types.h includes crt/host_defines.h: use a directory that has it
  # (the toolkit's; some runtime wheels ship driver_types.h without crt/).
  rt = [
    p for p in rt if os.path.exists(os.path.join(os.path.dirname(p), "crt", "host_defines.h"))
  ] or rt
  if not rt:
    missing.append(
      "the CUDA runtime headers driver_types.h/library_types.h (pip install "
      "nvidia-cuda-runtime, or set $CUDA_HOME)"
    )
  if missing:
    raise BuildError(
      "jasp.sparse cannot build its cuSPARSELt extension; missing: " + "; ".join(missing) + "."
    )
  header = headers[0]
  # Prefer the library that sits beside the header (same wheel, same version).
  root = os.path.dirname(os.path.dirname(header))
  lib = next((p for p in libs if p.startswith(root + os.sep)), libs[0])
  incs = [ffi_inc, os.path.dirname(header), os.path.dirname(rt[0])]
  return Toolchain(
    compiler=compiler,
    include_dirs=tuple(dict.fromkeys(incs)),
    lib_dir=os.path.dirname(lib),
    lib_name=os.path.basename(lib),
    cusparselt_header=header,
  )


# Used only when neither a cuSPARSE header nor cuSPARSELt's own stub exists
# (cuSPARSELt < 0.10 includes <cusparse.h> for three enums).
_CUSPARSE_STUB = """\
#ifndef CUSPARSE_H_
#define CUSPARSE_H_
typedef enum { CUSPARSE_STATUS_SUCCESS = 0, CUSPARSE_STATUS_NOT_INITIALIZED = 1,
  CUSPARSE_STATUS_ALLOC_FAILED = 2, CUSPARSE_STATUS_INVALID_VALUE = 3,
  CUSPARSE_STATUS_ARCH_MISMATCH = 4, CUSPARSE_STATUS_MAPPING_ERROR = 5,
  CUSPARSE_STATUS_EXECUTION_FAILED = 6, CUSPARSE_STATUS_INTERNAL_ERROR = 7,
  CUSPARSE_STATUS_MATRIX_TYPE_NOT_SUPPORTED = 8, CUSPARSE_STATUS_ZERO_PIVOT = 9,
  CUSPARSE_STATUS_NOT_SUPPORTED = 10, CUSPARSE_STATUS_INSUFFICIENT_RESOURCES = 11
} cusparseStatus_t;
typedef enum { CUSPARSE_OPERATION_NON_TRANSPOSE = 0, CUSPARSE_OPERATION_TRANSPOSE = 1,
  CUSPARSE_OPERATION_CONJUGATE_TRANSPOSE = 2 } cusparseOperation_t;
typedef enum { CUSPARSE_ORDER_COL = 1, CUSPARSE_ORDER_ROW = 2 } cusparseOrder_t;
#endif
"""


# cusparseLt.h needs only cudaStream_t from driver_types.h; used when the
# runtime headers found lack the toolkit's crt/ directory that the real one includes.
_DRIVER_TYPES_SHIM = """\
#ifndef __DRIVER_TYPES_H__
#define __DRIVER_TYPES_H__
typedef struct CUstream_st *cudaStream_t;
#endif
"""


def _needs_shim(tc: Toolchain) -> bool:
  rt = tc.include_dirs[-1]
  return not os.path.exists(os.path.join(rt, "crt", "host_defines.h"))


def _needs_stub(tc: Toolchain) -> bool:
  here = os.path.dirname(tc.cusparselt_header)
  if os.path.exists(os.path.join(here, "cusparseLt_cusparse_stub.h")):
    return False
  return not any(os.path.exists(os.path.join(d, "cusparse.h")) for d in tc.include_dirs)


def _key(tc: Toolchain) -> str:
  import jax
  import jaxlib

  h = hashlib.sha256()
  with open(SOURCE, "rb") as f:
    h.update(f.read())
  with open(tc.cusparselt_header, "rb") as f:
    h.update(f.read())
  try:
    cc = subprocess.run(
      [tc.compiler, "--version"], capture_output=True, text=True, timeout=30
    ).stdout
  except (OSError, subprocess.SubprocessError):
    cc = tc.compiler
  for part in (jax.__version__, getattr(jaxlib, "__version__", ""), cc, repr(tc), sys.platform):
    h.update(part.encode())
  return h.hexdigest()[:16]


def build(*, force: bool = False, verbose: bool = False) -> str:
  """Compiles ``_ffi.cc`` (once per toolchain) and returns the library's path.

  Args:
    force: rebuild even when a cached library exists.
    verbose: print the compiler command.

  Returns:
    The path of the shared object (under :func:`cache_dir`).

  Raises:
    BuildError: when a piece is missing (see :func:`find_toolchain`) or the
      compiler fails (its output's tail is in the message).
  """
  tc = find_toolchain()
  out_dir = os.path.join(cache_dir(), "sparse")
  os.makedirs(out_dir, exist_ok=True)
  target = os.path.join(out_dir, f"jasp_cslt_{_key(tc)}.so")
  if os.path.exists(target) and not force:
    return target
  with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
    incs = list(tc.include_dirs)
    shim = _needs_shim(tc)
    if shim:
      with open(os.path.join(tmp, "driver_types.h"), "w") as f:
        f.write(_DRIVER_TYPES_SHIM)
    if shim or _needs_stub(tc):
      # Without the toolkit's crt/, a real cusparse.h cannot compile either.
      with open(os.path.join(tmp, "cusparse.h"), "w") as f:
        f.write(_CUSPARSE_STUB)
    if shim:
      incs.insert(0, tmp)
    elif _needs_stub(tc):
      incs.append(tmp)
    so = os.path.join(tmp, "lib.so")
    cmd = (
      [tc.compiler, "-O2", "-std=c++17", "-shared", "-fPIC", "-w"]
      + [f"-I{d}" for d in incs]
      + [
        SOURCE,
        "-o",
        so,
        f"-L{tc.lib_dir}",
        f"-l:{tc.lib_name}",
        f"-Wl,-rpath,{tc.lib_dir}",
        # Bind every cuSPARSELt symbol when the library loads, so a copy
        # that another library loads later (RTLD_GLOBAL) cannot take over
        # some calls through lazy binding.
        "-Wl,-z,now",
      ]
    )
    if verbose:
      print(" ".join(cmd), flush=True)
    try:
      r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.SubprocessError) as e:
      raise BuildError(f"jasp.sparse: running the compiler failed: {e}") from e
    if r.returncode != 0:
      tail = (r.stderr or r.stdout)[-3000:]
      raise BuildError(
        f"jasp.sparse: compiling {SOURCE} failed (exit {r.returncode}):\n{' '.join(cmd)}\n{tail}"
      )
    os.replace(so, target)
  return target


if __name__ == "__main__":
  print(build(force="--force" in sys.argv, verbose=True))
