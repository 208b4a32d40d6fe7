"""Builds and runs ``sparse_layout_probe.cu``: cuSPARSELt operand layouts vs dense cuBLAS.

Needs a CUDA GPU, ``nvcc``, cuBLAS and the cuSPARSELt wheel (found the way
``jasp.sparse.build`` finds it). Each (dtype, layout) runs in a process of its
own, so a crash of one (an fp16 plan once killed the CUDA context here) costs
only its own rows. Prints one JSON object per problem and writes them all to
``--out``.

  python3 benchmarks/sparse_layout_probe.py --configs a_row,b_row --dtypes bf16,fp16
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import _meta  # noqa: E402  (benchmarks/_meta.py)

from jasp.sparse import build as build_lib  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIGS = ("a_row", "a_col", "a_row_bn", "b_row", "b_t")
PROBLEMS = (
  "8192,8192,2048 8192,8192,8192 8192,8192,16384 "
  "14336,4096,2048 14336,4096,8192 14336,4096,16384 "
  "4096,14336,2048 4096,14336,8192 4096,14336,16384 "
  "16384,16384,2048 16384,16384,8192"
)


def _cublas() -> tuple[list[str], list[str]]:
  """Include and link flags for cuBLAS: the toolkit's, else the nvidia-cublas wheel's."""
  incs = build_lib._candidates("cublas_v2.h", "include")
  libs = (
    build_lib._candidates("libcublas.so", "lib")
    + build_lib._candidates("libcublas.so.*", "lib")
    + build_lib._candidates("libcublas.so", "lib64")
  )
  libs = [p for p in libs if "Lt" not in os.path.basename(p)]
  if not incs or not libs:
    raise SystemExit(f"cuBLAS not found (headers {incs}, libraries {libs})")
  d, name = os.path.split(libs[0])
  return [f"-I{os.path.dirname(incs[0])}"], [f"-L{d}", f"-l:{name}", f"-Xlinker=-rpath,{d}"]


def compile_probe(out_dir: str) -> str:
  tc = build_lib.find_toolchain()
  nvcc = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
  exe = os.path.join(out_dir, "sparse_layout_probe")
  cb_inc, cb_link = _cublas()
  cmd = [
    nvcc,
    "-O2",
    "-std=c++17",
    "-arch=native",
    "-w",
    f"-I{os.path.dirname(tc.cusparselt_header)}",
    *cb_inc,
    os.path.join(HERE, "sparse_layout_probe.cu"),
    "-o",
    exe,
    f"-L{tc.lib_dir}",
    f"-l:{tc.lib_name}",
    f"-Xlinker=-rpath,{tc.lib_dir}",
    *cb_link,
  ]
  print(" ".join(cmd), flush=True)
  subprocess.run(cmd, check=True)
  return exe


def _torch_one(torch, do_bench, dt, n: int, k: int, t: int) -> dict:
  g = torch.Generator(device="cuda").manual_seed(0)
  w = torch.randn(n, k, device="cuda", dtype=dt, generator=g)
  keep = w.abs().reshape(-1, 4).topk(2, dim=1).indices
  m = torch.zeros(w.numel() // 4, 4, dtype=torch.bool, device="cuda").scatter_(1, keep, True)
  w = (w.reshape(-1, 4) * m).reshape(n, k)
  x = torch.randn(k, t, device="cuda", dtype=dt, generator=g)
  dense = do_bench(lambda: torch.mm(w, x), return_mode="median")
  wc = torch._cslt_compress(w)
  alg = torch._cslt_sparse_mm_search(wc, x)
  sp = do_bench(lambda: torch._cslt_sparse_mm(wc, x, alg_id=alg), return_mode="median")
  return {"dense_ms": dense, "sparse_ms": sp, "speedup": dense / sp, "alg_id": int(alg)}


def torch_reference(problems: list[str], dtypes: list[str]) -> list[dict]:
  """PyTorch's path on this card: torch.mm vs ``_cslt_sparse_mm`` (searched), do_bench medians."""
  import torch
  from triton.testing import do_bench

  rows = []
  for dt_name in dtypes:
    dt = {"bf16": torch.bfloat16, "fp16": torch.float16}[dt_name]
    for prob in problems:
      n, k, t = (int(v) for v in prob.split(","))
      row = {"torch": True, "dtype": dt_name, "N": n, "K": k, "T": t}
      try:
        row.update(_torch_one(torch, do_bench, dt, n, k, t))
      except Exception as e:
        row["error"] = f"{type(e).__name__}: {e}"[:300]
      print(json.dumps(row), flush=True)
      rows.append(row)
  return rows


def main():
  ap = argparse.ArgumentParser(description=__doc__)
  ap.add_argument("--configs", default=",".join(CONFIGS))
  ap.add_argument("--dtypes", default="bf16,fp16")
  ap.add_argument("--problems", default=PROBLEMS, help="space-separated N,K,T")
  ap.add_argument("--timeout-s", type=float, default=240)
  ap.add_argument(
    "--torch",
    action="store_true",
    help="also time torch.mm vs torch._cslt_sparse_mm (PyTorch's cuSPARSELt path, the reference)",
  )
  ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "layout_probe.json"))
  args = ap.parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    exe = compile_probe(tmp)
    rows = []
    for dt in args.dtypes.split(","):
      for cfg in args.configs.split(","):
        cmd = [exe, dt, cfg, *args.problems.split()]
        try:
          r = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout_s)
          out, rc = r.stdout, r.returncode
          tail = r.stderr[-500:]
        except subprocess.TimeoutExpired as e:
          out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
          rc, tail = "timeout", ""
        for line in out.splitlines():
          try:
            row = json.loads(line)
          except json.JSONDecodeError:
            continue
          print(json.dumps(row), flush=True)
          rows.append(row)
        if rc != 0:
          note = {"dtype": dt, "config": cfg, "exit": rc, "stderr": tail}
          print(json.dumps(note), flush=True)
          rows.append(note)
  if args.torch:
    rows += torch_reference(args.problems.split(), args.dtypes.split(","))
  _meta.write_json(args.out, rows)


if __name__ == "__main__":
  main()
