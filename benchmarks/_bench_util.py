"""Helpers shared by the GPU benchmarks: device timing, compile phases and crash-safe result files."""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any

import _meta
import jax
import jax.numpy as jnp
import numpy as np

try:
  import torch
except ImportError:  # pragma: no cover - CPU-only machines
  torch = None


class DeviceClock:
  """Sum of GPU kernel durations in a window (PyTorch's CUPTI profiler); None without it."""

  def __init__(self):
    self.ok = torch is not None and torch.cuda.is_available()

  def measure(self, run: Callable[[], Any], calls: int, breakdown: bool = False) -> float | None:
    """Seconds of GPU kernel time per call while ``run()`` makes ``calls`` calls."""
    if not self.ok:
      return None
    try:
      from torch.profiler import ProfilerActivity
      from torch.profiler import profile

      with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run()
      total = 0.0
      parts = []
      for ev in prof.key_averages():
        t = getattr(ev, "self_device_time_total", None)
        if t is None:
          t = getattr(ev, "self_cuda_time_total", 0.0)
        total += t
        parts.append((t / calls, ev.key[:60]))
      if breakdown:
        for t, k in sorted(parts, reverse=True)[:6]:
          print(f"    {t:9.1f} us/call  {k}", flush=True)
      return total * 1e-6 / calls if total > 0 else None
    except Exception as e:
      print(f"device clock unavailable: {type(e).__name__}: {e}", flush=True)
      self.ok = False
      return None


#: ``jax.monitoring`` duration events of a compilation, and the keys they are summed under.
EVENTS = {
  "/jax/core/compile/jaxpr_trace_duration": "trace_s",
  "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower_s",
  "/jax/core/compile/backend_compile_duration": "backend_compile_s",
}


class Phases:
  """Sums (and counts) the compile phases that ``jax.monitoring`` reports while active.

  ``with phases: ...`` resets ``totals`` (seconds per key of :data:`EVENTS`)
  and ``counts`` (events per key), then adds every event reported inside.
  """

  def __init__(self):
    self.totals: dict[str, float] = {}
    self.counts: dict[str, int] = {}
    self.active = False
    jax.monitoring.register_event_duration_secs_listener(self._listen)

  def _listen(self, event, duration, **_):
    if self.active and event in EVENTS:
      key = EVENTS[event]
      self.totals[key] = self.totals.get(key, 0.0) + duration
      self.counts[key] = self.counts.get(key, 0) + 1

  def __enter__(self):
    self.totals, self.counts, self.active = {}, {}, True
    return self

  def __exit__(self, *exc):
    self.active = False

  def summary(self) -> dict:
    """``{key: seconds}`` rounded to ms, plus ``programs``: how many were compiled."""
    out = {k: round(v, 3) for k, v in self.totals.items()}
    out["programs"] = self.counts.get("backend_compile_s", 0)
    return out


def timed(
  fn: Callable[..., Any], args_list: Sequence[tuple], clock: DeviceClock, reps: int
) -> tuple[float, bool]:
  """``(seconds per call, device timing?)`` of ``fn(*args)`` over ``args_list``, back to back.

  After one warm-up call per ``args``, ``reps`` rounds over ``args_list``: the
  GPU kernel time per call (``clock``), else the host time per call.
  """
  for args in args_list:
    jax.block_until_ready(fn(*args))

  def run():
    out = None
    for _ in range(reps):
      for args in args_list:
        out = fn(*args)
    jax.block_until_ready(out)

  calls = reps * len(args_list)
  dev = clock.measure(run, calls)
  if dev is not None:
    return dev, True
  t0 = time.perf_counter()
  run()
  return (time.perf_counter() - t0) / calls, False


def copy_bandwidth(nbytes: int, clock: DeviceClock | None = None, reps: int = 10) -> float:
  """Bytes per second of a device copy: ``nbytes`` read and ``nbytes`` written.

  The copy is an XLA element-wise op over 4-byte words (on an H100 one over
  ``uint8`` measured 1.69 TB/s, below what a dense GEMV reads). With a
  working ``clock``: its GPU kernel time over ``reps`` calls on two rotating
  buffers; else the host wall time per call, median of ``reps`` single calls.
  """
  words = max(1, nbytes // 4)
  bufs = [(jnp.full((words,), i, jnp.uint32),) for i in range(2)]
  f = jax.jit(lambda a: a ^ jnp.uint32(1))
  moved = 2 * 4 * words
  if clock is not None and clock.ok:
    return moved / timed(f, bufs, clock, reps)[0]
  jax.block_until_ready(f(*bufs[0]))
  ts = []
  for i in range(reps):
    t = time.perf_counter()
    jax.block_until_ready(f(*bufs[i % 2]))
    ts.append(time.perf_counter() - t)
  return moved / float(np.median(ts))


def peak_bytes() -> int | None:
  """The first device's peak bytes in use so far in this process (None where not reported)."""
  stats = getattr(jax.devices()[0], "memory_stats", lambda: None)()
  return None if not stats else int(stats.get("peak_bytes_in_use", 0)) or None


class Recorder:
  """Keeps a results dict on disk after every stage, so a crash loses nothing.

  With an empty ``path`` the results stay in memory only.
  """

  def __init__(self, out: dict, path: str):
    self.out, self.path = out, path
    self.meta = _meta.run_meta()

  def save(self) -> None:
    if self.path:
      _meta.write_json(self.path, self.out, self.meta)

  def stage(self, fn: Callable[..., Any], *args: Any) -> Any:
    """Runs ``fn(*args)``; an exception is printed and recorded under ``errors``."""
    try:
      return fn(*args)
    except Exception as e:
      traceback.print_exc()
      self.out.setdefault("errors", []).append(f"{fn.__name__}: {type(e).__name__}: {e}"[:2000])
      return None
    finally:
      self.save()
