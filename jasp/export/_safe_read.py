"""Bounded, fail-closed reads of the files that ``jasp check`` is given.

The checker reads files it cannot trust, so every read goes through here:

* only regular files (after following symbolic links) are read: a FIFO, a
  socket or a device (``/dev/zero``, a terminal) is refused, and is opened with
  ``O_NONBLOCK`` so that a FIFO cannot block the ``open`` itself; a directory
  (SavedModel, orbax) may hold only regular files and directories, at most
  :data:`MAX_ENTRIES` of them;
* a file is read up to the size ``fstat`` gives when it is opened, never past
  it (a file that grows while read is cut there);
* sizes a file declares (tensor shapes, header lengths, offsets) are checked
  against the bytes that hold them before anything is allocated;
* a :class:`Budget` caps the bytes one check reads from files plus the bytes
  of the arrays it decodes (default :func:`default_max_bytes`: half of the
  memory the process may still use); a file over it is refused, not attempted;
* JSON metadata is parsed strictly: no duplicate keys, no ``NaN``/``Infinity``,
  nesting at most :data:`MAX_JSON_DEPTH` deep.

Every refusal raises :class:`CheckError` naming the file and the reason.
"""

from __future__ import annotations

import json
import math
import os
import stat
from typing import Any

__all__ = [
  "CheckError",
  "Budget",
  "default_max_bytes",
  "regular_size",
  "read_bytes",
  "read_head",
  "check_tree",
  "loads_json",
  "nbytes_of",
  "MAX_ENTRIES",
  "MAX_JSON_DEPTH",
]

MAX_ENTRIES = 100_000  # files and directories under a SavedModel or an orbax checkpoint
MAX_JSON_DEPTH = 64
_FALLBACK_MAX_BYTES = 8 << 30  # where the memory the process may use cannot be found


class CheckError(ValueError):
  """The file cannot be checked: missing, corrupt or of an unsupported format."""


def _kind(mode: int) -> str:
  for test, name in (
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISDIR, "a directory"),
  ):
    if test(mode):
      return name
  return "not a regular file"


def _proc_status_bytes(field: str) -> int:
  """A ``kB`` field of ``/proc/self/status`` in bytes (0 where there is none)."""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith(field + ":"):
          return int(line.split()[1]) * 1024
  except (OSError, ValueError, IndexError):
    pass
  return 0


def default_max_bytes() -> int:
  """Half of the memory this process may still use: the smallest of the machine's memory and
  what ``RLIMIT_AS``/``RLIMIT_DATA`` leave above the current use (8 GiB where none is known)."""
  room = []
  try:
    room.append(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
  except (AttributeError, ValueError, OSError):
    pass
  try:
    import resource
  except ImportError:  # not on POSIX
    resource = None
  if resource is not None:
    for limit, used in ((resource.RLIMIT_AS, "VmSize"), (resource.RLIMIT_DATA, "VmData")):
      soft, _ = resource.getrlimit(limit)
      if soft != resource.RLIM_INFINITY and soft > 0:
        room.append(max(soft - _proc_status_bytes(used), 0))
  if not room:
    return _FALLBACK_MAX_BYTES
  return max(min(room) // 2, 1 << 20)


class Budget:
  """The bytes one check may read and decode (see the module doc).

  Args:
    max_bytes: the cap; None: :func:`default_max_bytes`.
  """

  def __init__(self, max_bytes: int | None = None):
    self.max_bytes = default_max_bytes() if max_bytes is None else int(max_bytes)
    self.used = 0

  def charge(self, nbytes: int, what: str) -> None:
    """Counts ``nbytes`` for ``what``.

    Raises:
      CheckError: when the total would pass the cap.
    """
    if nbytes < 0:
      raise CheckError(f"{what}: a negative size ({nbytes}).")
    if self.used + nbytes > self.max_bytes:
      raise CheckError(
        f"{what}: {_human(nbytes)} to read or decode, over the check's limit of "
        f"{_human(self.max_bytes)} ({_human(self.used)} already used); pass a larger "
        "max_bytes (--max-bytes) to check it on a machine with the memory."
      )
    self.used += nbytes


def _human(nbytes: int) -> str:
  if nbytes < 1024:
    return f"{nbytes} B"
  for unit in ("KiB", "MiB", "GiB", "TiB", "PiB"):
    nbytes /= 1024
    if nbytes < 1024 or unit == "PiB":
      return f"{nbytes:.1f} {unit}"
  return f"{nbytes} B"  # pragma: no cover


def regular_size(path: str) -> int:
  """The size of ``path`` if it is a regular file (symbolic links followed).

  Raises:
    CheckError: missing, unreadable, or not a regular file.
  """
  try:
    st = os.stat(path)
  except OSError as e:
    raise CheckError(f"{path}: cannot read it ({e.strerror or e}).") from None
  if not stat.S_ISREG(st.st_mode):
    raise CheckError(f"{path}: {_kind(st.st_mode)}, not a regular file; refusing to read it.")
  return st.st_size


def _open_regular(path: str) -> tuple[int, int]:
  """``(fd, size)`` of ``path`` opened for reading; refuses anything but a regular file."""
  flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
  flags |= getattr(os, "O_BINARY", 0)
  try:
    fd = os.open(path, flags)
  except OSError as e:
    raise CheckError(f"{path}: cannot open it ({e.strerror or e}).") from None
  try:
    st = os.fstat(fd)
  except OSError as e:
    os.close(fd)
    raise CheckError(f"{path}: cannot read it ({e.strerror or e}).") from None
  if not stat.S_ISREG(st.st_mode):
    os.close(fd)
    raise CheckError(f"{path}: {_kind(st.st_mode)}, not a regular file; refusing to read it.")
  return fd, st.st_size


def _read_fd(fd: int, offset: int, length: int, path: str) -> bytes:
  chunks, got = [], 0
  try:
    while got < length:
      b = os.pread(fd, min(length - got, 1 << 24), offset + got)
      if not b:
        break
      chunks.append(b)
      got += len(b)
  except OSError as e:
    raise CheckError(f"{path}: cannot read it ({e.strerror or e}).") from None
  return b"".join(chunks)


def read_bytes(
  path: str, budget: Budget, *, offset: int = 0, length: int | None = None, exact: bool = False
) -> bytes:
  """Reads ``length`` bytes (default: to the end) of the regular file ``path`` from ``offset``.

  Never reads past the size the file had when opened; counts the bytes on ``budget``.

  Raises:
    CheckError: not a regular file, unreadable, over the budget, or (``exact``)
      the range ``[offset, offset + length)`` is not inside the file.
  """
  fd, size = _open_regular(path)
  try:
    if offset < 0 or (length is not None and length < 0):
      raise CheckError(f"{path}: a negative offset or length ({offset}, {length}).")
    if length is None:
      length = max(size - offset, 0)
    if exact and offset + length > size:
      raise CheckError(
        f"{path}: bytes {offset}..{offset + length} are asked for, but the file holds {size}."
      )
    length = max(min(length, size - offset), 0)
    budget.charge(length, path)
    data = _read_fd(fd, offset, length, path)
  finally:
    os.close(fd)
  if exact and len(data) != length:
    raise CheckError(f"{path}: the file shrank while read ({len(data)} of {length} bytes).")
  return data


def read_head(path: str, nbytes: int) -> bytes:
  """The first ``nbytes`` (at most) of the regular file ``path``.

  Raises:
    CheckError: not a regular file, or unreadable.
  """
  fd, size = _open_regular(path)
  try:
    return _read_fd(fd, 0, min(nbytes, size), path)
  finally:
    os.close(fd)


def check_tree(root: str, budget: Budget | None = None) -> int:
  """Checks that the directory ``root`` holds only regular files and directories.

  Symbolic links are followed (one to a regular file is read as that file); at
  most :data:`MAX_ENTRIES` entries. Charges the files' total size on ``budget``.

  Returns:
    The total size of the files.

  Raises:
    CheckError: an entry that is not a regular file or directory (a FIFO, a
      device, a dangling link, a link cycle), too many entries, or over the budget.
  """
  total, count = 0, 0
  seen: set[tuple[int, int]] = set()
  stack = [root]
  while stack:
    d = stack.pop()
    try:
      st = os.stat(d)
      entries = os.listdir(d)
    except OSError as e:
      raise CheckError(f"{d}: cannot read the directory ({e.strerror or e}).") from None
    if (st.st_dev, st.st_ino) in seen:
      raise CheckError(f"{d}: a directory reached twice (a link cycle); refusing to read it.")
    seen.add((st.st_dev, st.st_ino))
    for name in sorted(entries):
      count += 1
      if count > MAX_ENTRIES:
        raise CheckError(
          f"{root}: more than {MAX_ENTRIES} files and directories; refusing to read it."
        )
      p = os.path.join(d, name)
      try:
        st = os.stat(p)
      except OSError as e:
        raise CheckError(f"{p}: cannot read it ({e.strerror or e}).") from None
      if stat.S_ISDIR(st.st_mode):
        stack.append(p)
      elif stat.S_ISREG(st.st_mode):
        total += st.st_size
      else:
        raise CheckError(f"{p}: {_kind(st.st_mode)}, not a regular file; refusing to read it.")
  if budget is not None:
    budget.charge(total, root)
  return total


def _no_duplicates(pairs):
  out = {}
  for k, v in pairs:
    if k in out:
      raise CheckError(f"the key {k!r} appears twice")
    out[k] = v
  return out


def _reject_constant(name):
  raise CheckError(f"{name} is not a number JSON allows")


def _depth(x: Any) -> int:
  depth, level = 0, [x]
  while level:
    depth += 1
    if depth > MAX_JSON_DEPTH:
      return depth
    nxt = []
    for v in level:
      if isinstance(v, dict):
        nxt.extend(v.values())
      elif isinstance(v, list):
        nxt.extend(v)
    level = nxt
  return depth


def loads_json(text: str | bytes, what: str) -> Any:
  """Parses JSON strictly (see the module doc).

  Raises:
    CheckError: naming ``what``, when the text is not such JSON.
  """
  if isinstance(text, bytes):
    try:
      text = text.decode("utf-8")
    except UnicodeDecodeError as e:
      raise CheckError(f"{what}: not UTF-8 text ({e.reason} at byte {e.start}).") from None
  try:
    out = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_reject_constant)
  except CheckError as e:
    raise CheckError(f"{what}: {e}.") from None
  except ValueError as e:  # json.JSONDecodeError, or an integer of too many digits
    raise CheckError(f"{what}: not valid JSON ({e}).") from None
  except RecursionError:
    raise CheckError(f"{what}: JSON nested too deep to parse.") from None
  if _depth(out) > MAX_JSON_DEPTH:
    raise CheckError(f"{what}: JSON nested more than {MAX_JSON_DEPTH} levels deep.")
  return out


def nbytes_of(shape, itemsize: int, what: str) -> int:
  """``prod(shape) * itemsize`` in exact integers.

  Raises:
    CheckError: a dimension that is not a non-negative integer.
  """
  dims = []
  for d in shape:
    if isinstance(d, bool) or not isinstance(d, int) or d < 0:
      raise CheckError(f"{what}: a dimension that is not a non-negative integer ({d!r}).")
    dims.append(d)
  return math.prod(dims) * int(itemsize)
