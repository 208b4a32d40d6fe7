"""Is the sparse path available here? Loads the extension and registers its FFI targets.

:func:`status` answers once per process (cached): a CUDA GPU with 2:4 sparse
tensor cores (compute capability >= 8.0), a built extension, cuSPARSELt
loadable. Anything else is a clear reason string and the dense path.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import logging
import os

import jax

from jasp.sparse import _search_cache as search_cache_lib
from jasp.sparse import build as build_lib

__all__ = ["Runtime", "SparseUnavailable", "status", "runtime", "note_dense_fallback"]

log = logging.getLogger("jasp.sparse")

MATMUL_TARGET = "jasp_cslt_matmul"
COMPRESS_TARGET = "jasp_cslt_compress"


class SparseUnavailable(RuntimeError):
  """The 2:4 sparse matmul cannot run in this process; the message says why."""


@dataclasses.dataclass(frozen=True)
class Runtime:
  """The loaded extension.

  Attributes:
    lib: the ``ctypes`` handle of the built library.
    path: its file path.
    cusparselt_version: ``major*10000 + minor*100 + patch`` of the library the
      calls are bound to.
    device_kind: ``jax.devices()[0].device_kind`` (e.g. ``NVIDIA H100 80GB HBM3``).
    compute_capability: e.g. ``"9.0"``.
    library_path: the ``libcusparseLt.so.0`` file the calls are bound to.
  """

  lib: ctypes.CDLL
  path: str
  cusparselt_version: int
  device_kind: str
  compute_capability: str
  library_path: str = ""

  @property
  def format_tag(self) -> str:
    """Names the compressed layout: the library version and the GPU architecture."""
    return f"cusparselt{self.cusparselt_version}:sm{self.compute_capability.replace('.', '')}"

  def compressed_size(self, m: int, k: int, dtype_code: int, a_order: int) -> tuple[int, int]:
    """Bytes of the compressed form of an ``m x k`` 2:4 operand, and of its scratch buffer."""
    size = ctypes.c_int64()
    buf = ctypes.c_int64()
    err = ctypes.create_string_buffer(512)
    rc = self.lib.jasp_cslt_compressed_size(
      ctypes.c_int64(m),
      ctypes.c_int64(k),
      ctypes.c_int32(dtype_code),
      ctypes.c_int32(a_order),
      ctypes.byref(size),
      ctypes.byref(buf),
      err,
      ctypes.c_int(512),
    )
    if rc != 0:
      raise SparseUnavailable(
        f"jasp.sparse: cuSPARSELt rejects a {m}x{k} operand: {err.value.decode(errors='replace')}"
      )
    return int(size.value), int(buf.value)

  @property
  def identity(self) -> str:
    """What a search result depends on: GPU model, cuSPARSELt version, extension build."""
    return (
      f"{self.device_kind}|sm{self.compute_capability}|cslt{self.cusparselt_version}|"
      f"{os.path.basename(self.path)}"
    )

  def preset(
    self,
    out: int,
    in_: int,
    tokens: int,
    dtype: str,
    a_order: int,
    bias: bool,
    alg_id: int,
    search_ms: float,
  ) -> None:
    """Makes plans of this problem build configuration ``alg_id`` instead of searching."""
    self.lib.jasp_cslt_preset(
      ctypes.c_int64(out),
      ctypes.c_int64(in_),
      ctypes.c_int64(tokens),
      ctypes.c_int32(1 if dtype == "float16" else 0),
      ctypes.c_int64(a_order),
      ctypes.c_int64(1 if bias else 0),
      ctypes.c_int32(alg_id),
      ctypes.c_float(search_ms),
    )

  def plans(self) -> list[dict]:
    """The cached cuSPARSELt plans of this process: shape, chosen algorithm, search time.

    ``from_cache``: the configuration came from the search cache file (an
    earlier process's search), not a search in this process.
    """
    need = int(self.lib.jasp_cslt_plans(None, ctypes.c_int(0)))
    buf = ctypes.create_string_buffer(need)
    self.lib.jasp_cslt_plans(buf, ctypes.c_int(need))
    rows = []
    for line in buf.value.decode().splitlines():
      dev, m, k, t, dt, order, bias, alg, ms, ws, cached = line.split()
      rows.append(
        {
          "device": int(dev),
          "out": int(m),
          "in": int(k),
          "tokens": int(t),
          "dtype": "float16" if dt == "1" else "bfloat16",
          "a_order": int(order),
          "bias_epilogue": bias == "1",
          "alg_id": int(alg),
          "search_ms": None if float(ms) < 0 else float(ms),
          "workspace": int(ws),
          "from_cache": cached == "1",
        }
      )
    return rows


def _gpu_device():
  try:
    devs = jax.devices("gpu")
  except RuntimeError:
    return None
  return devs[0] if devs else None


def _check_device() -> tuple[str, str]:
  dev = _gpu_device()
  if dev is None:
    raise SparseUnavailable(
      f"jasp.sparse: no CUDA GPU (JAX backend '{jax.default_backend()}'); 2:4 sparse tensor "
      "cores need an NVIDIA GPU of compute capability >= 8.0 (Ampere, Hopper or newer). "
      "The dense path is used."
    )
  cc = str(getattr(dev, "compute_capability", "") or "")
  kind = str(getattr(dev, "device_kind", "gpu"))
  try:
    major = int(cc.split(".")[0])
  except ValueError:
    major = -1
  if major < 8:
    raise SparseUnavailable(
      f"jasp.sparse: the GPU '{kind}' (compute capability {cc or 'unknown'}) has no 2:4 sparse "
      "tensor cores (they need >= 8.0: Ampere, Hopper or newer). The dense path is used."
    )
  return kind, cc


def check_versions(header: int, loaded: int, library_path: str) -> None:
  """Refuses a cuSPARSELt whose ``major.minor`` differs from the header compiled against.

  Both versions are ``major*10000 + minor*100 + patch``; ``header`` is -1 when
  the header has no version macros (then nothing is checked). Such a mismatch
  happens when another library put its own ``libcusparseLt.so.0`` into the
  process first (PyTorch preloads the one of its wheel): the extension then
  binds to that copy, whose enums and structures may differ.

  Raises:
    SparseUnavailable: naming both versions, the file loaded and the fixes.
  """
  if header < 0 or header // 100 == loaded // 100:
    return

  def fmt(v):
    return f"{v // 10000}.{v // 100 % 100}.{v % 100}"

  raise SparseUnavailable(
    f"jasp.sparse: the extension was compiled against cuSPARSELt {fmt(header)}, but the "
    f"process has cuSPARSELt {fmt(loaded)} loaded from {library_path or 'an unknown file'} "
    "(another library, e.g. PyTorch, loaded its own libcusparseLt.so.0 first). Use "
    "jasp.sparse before importing that library, or point $CUSPARSELT_HOME at the same "
    "cuSPARSELt version. The dense path is used."
  )


def _library_path(lib: ctypes.CDLL) -> str:
  need = int(lib.jasp_cslt_library_path(None, ctypes.c_int(0)))
  if need <= 0:
    return ""
  buf = ctypes.create_string_buffer(need)
  lib.jasp_cslt_library_path(buf, ctypes.c_int(need))
  return buf.value.decode(errors="replace")


def _load() -> Runtime:
  kind, cc = _check_device()
  try:
    path = build_lib.build()
  except build_lib.BuildError as e:
    raise SparseUnavailable(f"{e} The dense path is used.") from e
  try:
    lib = ctypes.CDLL(path)
  except OSError as e:
    raise SparseUnavailable(
      f"jasp.sparse: loading {path} failed: {e}. The dense path is used."
    ) from e
  lib.jasp_cslt_version.restype = ctypes.c_int
  lib.jasp_cslt_compressed_size.restype = ctypes.c_int
  lib.jasp_cslt_plans.restype = ctypes.c_int
  lib.jasp_cslt_plans.argtypes = [ctypes.c_char_p, ctypes.c_int]
  lib.jasp_cslt_preset.restype = None
  lib.jasp_cslt_header_version.restype = ctypes.c_int
  lib.jasp_cslt_library_path.restype = ctypes.c_int
  lib.jasp_cslt_library_path.argtypes = [ctypes.c_char_p, ctypes.c_int]
  version = int(lib.jasp_cslt_version())
  library_path = _library_path(lib)
  check_versions(int(lib.jasp_cslt_header_version()), version, library_path)
  jax.ffi.register_ffi_target(MATMUL_TARGET, jax.ffi.pycapsule(lib.JaspCsltMatmul), platform="CUDA")
  jax.ffi.register_ffi_target(
    COMPRESS_TARGET, jax.ffi.pycapsule(lib.JaspCsltCompress), platform="CUDA"
  )
  rt = Runtime(
    lib=lib,
    path=path,
    cusparselt_version=version,
    device_kind=kind,
    compute_capability=cc,
    library_path=library_path,
  )
  search_cache_lib.install(rt)
  return rt


@functools.lru_cache(maxsize=None)
def _load_once() -> Runtime | SparseUnavailable:
  """The runtime, or the reason it is unavailable (cached: the answer does not change)."""
  try:
    return _load()
  except SparseUnavailable as e:
    return e
  except Exception as e:
    return SparseUnavailable(
      f"jasp.sparse: the sparse extension failed to load: "
      f"{type(e).__name__}: {e}. The dense path is used."
    )


def runtime() -> Runtime:
  """The loaded extension (built on first use).

  Raises:
    SparseUnavailable: no suitable GPU, or the build/load failed (the message
      says which and how to fix it).
  """
  r = _load_once()
  if isinstance(r, SparseUnavailable):
    raise SparseUnavailable(str(r))
  return r


def status() -> tuple[bool, str]:
  """``(True, description)`` when the sparse matmul can run here, else ``(False, reason)``."""
  try:
    rt = runtime()
  except SparseUnavailable as e:
    return False, str(e)
  return True, (
    f"cuSPARSELt {rt.cusparselt_version} ({rt.library_path}) on {rt.device_kind} "
    f"(sm {rt.compute_capability}), extension {rt.path}"
  )


@functools.lru_cache(maxsize=None)
def note_dense_fallback(reason: str) -> None:
  """Logs ``reason`` once per process (a warning: the model runs, but dense)."""
  log.warning("%s", reason)
