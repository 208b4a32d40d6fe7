"""The ``jasp`` command line: ``jasp check FILE [--json] [--n 2 --m 4] ...``.

Also runs as ``python -m jasp.export.cli check FILE``.

Exit status of ``check``: 0 when every expected-sparse weight is N:M along its
consumer's reduction axis; 1 when one is not; 2 when the file cannot be read
(missing, corrupt, unsupported, or an optional dependency is missing: the
message names the pip extra), or the arguments are wrong.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

__all__ = ["main", "build_parser"]

EXIT_OK, EXIT_NOT_SPARSE, EXIT_ERROR = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="jasp", description="jasp: N:M (2:4) structured sparsity for JAX.")
  sub = parser.add_subparsers(dest="command", metavar="COMMAND")
  chk = sub.add_parser(
      "check", help="check the N:M pattern of the weights stored in a file",
      description=(
          "List each weight of FILE that feeds a matmul/conv (or each kernel of a "
          "checkpoint), the axis its consumer reduces over, whether it is N:M along it, "
          "and its sparsity. FILE: .onnx, a TensorFlow SavedModel directory, .safetensors "
          "(PyTorch layout), a flax .msgpack or an orbax checkpoint directory. A weight "
          "is expected to be N:M when it matches --expect-sparse; without that option, "
          "when the file marks it as pruned (jasp's metadata, a mask) or when it holds "
          "at least --min-zeros zeros. Exit status: 0 ok, 1 an expected weight is not "
          "N:M, 2 unreadable file or bad arguments."))
  chk.add_argument("file", metavar="FILE")
  chk.add_argument("--json", action="store_true", help="print the report as JSON")
  chk.add_argument("--n", type=int, default=None,
                   help="non-zeros per group (default: the file's metadata, else 2)")
  chk.add_argument("--m", type=int, default=None,
                   help="group size (default: the file's metadata, else 4)")
  chk.add_argument("--expect-sparse", action="append", metavar="REGEX", default=None,
                   help="weights whose name or flax path matches REGEX must be N:M "
                        "(repeatable; replaces the default rule)")
  chk.add_argument("--min-zeros", type=float, default=None, metavar="FRACTION",
                   help="without --expect-sparse, a weight with at least this fraction of "
                        "zeros must be N:M (default 0.8*(m-n)/m; 1.01 turns this off)")
  chk.add_argument("--format", choices=("onnx", "savedmodel", "safetensors", "msgpack", "orbax"),
                   default=None, help="the file's format (default: detected)")
  chk.add_argument("--layout", choices=("torch", "flax"), default=None,
                   help="layout of a .safetensors file without jasp metadata (default torch)")
  return parser


def _check(args) -> int:
  from jasp.export import _check  # pylint: disable=g-import-not-at-top
  from jasp.export._deps import MissingDependencyError  # pylint: disable=g-import-not-at-top
  try:
    report = _check.check_file(args.file, n=args.n, m=args.m, expect_sparse=args.expect_sparse,
                               min_zeros=args.min_zeros, format=args.format, layout=args.layout)
  except (_check.CheckError, MissingDependencyError, OSError) as e:
    print(f"jasp check: error: {e}", file=sys.stderr)
    return EXIT_ERROR
  print(report.to_json() if args.json else report.format_table())
  return EXIT_OK if report.ok else EXIT_NOT_SPARSE


def main(argv: Sequence[str] | None = None) -> int:
  """Entry point of the ``jasp`` console script; returns the exit status."""
  # TensorFlow (imported to read a SavedModel's variables, never to compute) logs its
  # start-up to stderr; the oneDNN notice goes only when oneDNN is off.
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
  parser = build_parser()
  args = parser.parse_args(argv)
  if args.command != "check":
    parser.print_help(sys.stderr)
    return EXIT_ERROR
  try:
    return _check(args)
  except BrokenPipeError:  # `jasp check FILE | head`
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return EXIT_OK


if __name__ == "__main__":
  sys.exit(main())
