"""Type aliases shared by jasp's modules (like ``flax.typing``).

Conventions used across the API:

* ``params``: the tree that is pruned; a flax ``linen`` variables dict (or its
  ``"params"`` collection), an ``nnx.State`` or any pytree of arrays.
* ``masks``: a tree with the same structure as ``params``; a bool array
  (True = kept), a :class:`jasp.PackedMask` or ``None`` (dense) per leaf.
* ``path``: a leaf's keys joined by ``/`` (``params/Dense_0/kernel``).
* ``axis``: a group axis, or a run of consecutive axes flattened row-major.

This module imports no other jasp module at run time.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Mapping
from collections.abc import Sequence
from typing import TYPE_CHECKING
from typing import Any
from typing import Literal

if TYPE_CHECKING:  # annotations only: no import at run time
  import jax

  from jasp.layouts import Layout

__all__ = [
  "Axis",
  "Impl",
  "Layouts",
  "Masks",
  "Params",
  "Path",
  "Pattern",
  "PyTree",
  "ScoreFn",
]

#: Any pytree (a nested structure of dicts, lists, tuples, dataclasses, arrays).
PyTree = Any

#: The tree that is pruned: flax variables, an ``nnx.State`` or a pytree of arrays.
Params = Any

#: A masks tree: ``params``' structure, a bool array / PackedMask / None per leaf.
Masks = Any

#: A leaf's path string: its keys joined by ``/``.
Path = str

#: A group axis, or a run of consecutive axes flattened in row-major order.
Axis = int | Sequence[int]

#: How masks are computed: the fused XLA computation, the Pallas kernel, or by backend.
Impl = Literal["xla", "pallas", "auto"]

#: ``{path: jasp.Layout}``: the traced layout (group and output axes) of each weight.
Layouts = Mapping[str, "Layout"]

#: A mask pattern: ``"nm"``, a transposable ``"2d_best"`` / ``"2d_greedy"``, or a
#: callable ``(w, n, m, axis) -> bool mask``.
Pattern = Literal["nm", "2d_best", "2d_greedy"] | Callable[..., "jax.Array"]

#: ``(path, weight) -> scores`` of the weight's shape; larger is kept.
ScoreFn = Callable[[str, "jax.Array"], "jax.Array"]
