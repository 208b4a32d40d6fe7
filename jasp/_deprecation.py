"""Deprecated aliases: old names that keep working and warn, naming the new one.

Each alias is listed in ``CHANGELOG.md`` with the release that removes it.
This module imports no other jasp module.
"""

from __future__ import annotations

import functools
import importlib
import warnings
from collections.abc import Callable
from collections.abc import Mapping
from typing import Any
from typing import TypeVar

__all__ = ["deprecated_alias", "module_getattr", "warn"]

F = TypeVar("F", bound=Callable[..., Any])

#: The release that removes the aliases deprecated so far.
REMOVAL = "0.3.0"


def warn(old: str, new: str, *, stacklevel: int = 3) -> None:
  """Emits the ``DeprecationWarning`` for ``old``, naming its replacement ``new``."""
  warnings.warn(
    f"{old} is deprecated and will be removed in jasp {REMOVAL}; use {new} instead.",
    DeprecationWarning,
    stacklevel=stacklevel,
  )


def deprecated_alias(fn: F, old: str, new: str) -> F:
  """A function calling ``fn`` that first warns that ``old`` is now ``new``.

  Args:
    fn: the function under its new name.
    old: the old qualified name (``"jasp.nm_prune_array"``).
    new: the new qualified name (``"jasp.masks.nm_prune"``).
  """

  @functools.wraps(fn)
  def alias(*args, **kwargs):
    warn(old, new)
    return fn(*args, **kwargs)

  alias.__doc__ = f"Deprecated alias of :func:`{new}` (removal in jasp {REMOVAL}).\n"
  alias.__name__ = old.rsplit(".", 1)[-1]
  alias.__qualname__ = alias.__name__
  return alias  # type: ignore[return-value]


def module_getattr(
  module: str, aliases: Mapping[str, str], *, stacklevel: int = 3
) -> Callable[[str], Any]:
  """A PEP 562 module ``__getattr__`` serving deprecated names with a warning.

  Args:
    module: the module's name (``"jasp"``); the old names are ``module.name``.
    aliases: ``{old name: "package.module.new_name"}``; the new object is
      imported on first use.

  Returns:
    A function raising ``AttributeError`` for any other name.
  """

  def __getattr__(name: str) -> Any:
    if name not in aliases:
      raise AttributeError(f"module {module!r} has no attribute {name!r}")
    target = aliases[name]
    mod, _, attr = target.rpartition(".")
    warn(f"{module}.{name}", target, stacklevel=stacklevel)
    return getattr(importlib.import_module(mod), attr)

  return __getattr__
