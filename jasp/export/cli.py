"""The ``jasp`` command line: ``jasp check FILE [--json] [--n 2 --m 4] ...``.

Also runs as ``python -m jasp.export.cli check FILE`` (or ``python -m jasp``);
``jasp --version`` prints the installed version.

The command starts without jax, flax or optax: this module imports only the
standard library at the top, and the checker when ``check`` runs.

Exit status of ``check``: 0 when every expected-sparse weight is N:M along its
consumer's reduction axis; 1 when one is not; 2 when the file cannot be checked
(missing, corrupt, unsupported, holding no weights, malformed jasp metadata,
sizes over ``--max-bytes``, or an optional dependency is missing: the message
names the pip extra), or the arguments are wrong. An error inside jasp itself
prints its traceback and also exits 2: a check that did not finish never exits
0 or 1.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import logging
import os
import sys
import traceback
import unicodedata
from collections.abc import Sequence

from jasp._version import __version__

__all__ = ["build_parser", "main", "version"]

EXIT_OK, EXIT_NOT_SPARSE, EXIT_ERROR = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
    prog="jasp", description="jasp: N:M (2:4) structured sparsity for JAX."
  )
  parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
  sub = parser.add_subparsers(dest="command", metavar="COMMAND")
  chk = sub.add_parser(
    "check",
    help="check the N:M pattern of the weights stored in a file",
    description=(
      "List each weight of FILE that feeds a matmul/conv (or each kernel of a "
      "checkpoint), the axis its consumer reduces over, whether it is N:M along it, "
      "and its sparsity. FILE: .onnx, a TensorFlow SavedModel directory, .safetensors "
      "(PyTorch layout), a flax .msgpack or an orbax checkpoint directory. A weight "
      "is expected to be N:M when it matches --expect-sparse; without that option, "
      "when the file marks it as pruned (jasp's metadata, a mask) or when it holds "
      "at least --min-zeros zeros. Exit status: 0 ok, 1 an expected weight is not "
      "N:M, 2 the file cannot be checked (unreadable, corrupt, no weights, malformed "
      "jasp metadata, over --max-bytes) or bad arguments."
    ),
  )
  chk.add_argument("file", metavar="FILE")
  chk.add_argument("--json", action="store_true", help="print the report as JSON")
  chk.add_argument(
    "--n", type=int, default=None, help="non-zeros per group (default: the file's metadata, else 2)"
  )
  chk.add_argument(
    "--m", type=int, default=None, help="group size (default: the file's metadata, else 4)"
  )
  chk.add_argument(
    "--expect-sparse",
    action="append",
    metavar="REGEX",
    default=None,
    help="weights whose name or flax path matches REGEX must be N:M "
    "(repeatable; replaces the default rule)",
  )
  chk.add_argument(
    "--min-zeros",
    type=float,
    default=None,
    metavar="FRACTION",
    help="without --expect-sparse, a weight with at least this fraction of "
    "zeros must be N:M (default 0.8*(m-n)/m; 1.01 turns this off)",
  )
  chk.add_argument(
    "--format",
    choices=("onnx", "savedmodel", "safetensors", "msgpack", "orbax"),
    default=None,
    help="the file's format (default: detected)",
  )
  chk.add_argument(
    "--layout",
    choices=("torch", "flax"),
    default=None,
    help="layout of a .safetensors file without jasp metadata (default torch)",
  )
  chk.add_argument(
    "--max-bytes",
    type=_size,
    default=None,
    metavar="SIZE",
    help="refuse a file that needs more than SIZE bytes read and decoded "
    "(e.g. 4G; default: half of the memory the process may use)",
  )
  return parser


def version() -> str:
  """The installed distribution's version, else the source tree's ``jasp.__version__``."""
  try:
    return importlib.metadata.version("jasp")
  except importlib.metadata.PackageNotFoundError:
    return __version__


def _size(text: str) -> int:
  units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
  t = text.strip().upper().removesuffix("B").removesuffix("I")
  unit = t[-1:] if t[-1:] in units else ""
  try:
    value = int(t[: len(t) - len(unit)]) * units[unit]
  except ValueError:
    raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 4096, 512M, 4G)") from None
  if value < 1:
    raise argparse.ArgumentTypeError(f"not a positive size: {text!r}")
  return value


def _check(args) -> int:
  # Deferred to keep `jasp --help` / `jasp check --help` free of numpy and jax.
  from jasp.export import _check
  from jasp.export._deps import MissingDependencyError

  try:
    report = _check.check_file(
      args.file,
      n=args.n,
      m=args.m,
      expect_sparse=args.expect_sparse,
      min_zeros=args.min_zeros,
      format=args.format,
      layout=args.layout,
      max_bytes=args.max_bytes,
    )
  except (_check.CheckError, MissingDependencyError, OSError) as e:
    print(_printable(f"jasp check: error: {e}"), file=sys.stderr)
    return EXIT_ERROR
  print(report.to_json() if args.json else _printable(report.format_table()))
  return EXIT_OK if report.ok else EXIT_NOT_SPARSE


def _printable(text: str) -> str:
  """``text`` with control characters and lone surrogates escaped (names come from the file)."""
  out = []
  for ch in text:
    if ch == "\n" or unicodedata.category(ch)[0] != "C":
      out.append(ch)
    else:
      out.append(
        ch.encode("unicode_escape", "backslashreplace").decode("ascii")
        if ord(ch) < 0x110000
        else "?"
      )
  return "".join(out)


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
  # orbax logs (through absl) its own warnings and errors about the checkpoints it cannot
  # read; the command reports the error once, in its own words.
  absl_logger = logging.getLogger("absl")
  level = absl_logger.level
  absl_logger.setLevel(logging.CRITICAL)
  try:
    return _check(args)
  except BrokenPipeError:  # `jasp check FILE | head`
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return EXIT_OK
  except Exception:  # noqa: BLE001 - a bug in jasp: shown as one, and never a verdict
    traceback.print_exc()
    print(
      "jasp check: internal error: the check did not finish (a bug in jasp; please report "
      "it with the traceback above).",
      file=sys.stderr,
    )
    return EXIT_ERROR
  finally:
    absl_logger.setLevel(level)


if __name__ == "__main__":
  sys.exit(main())
