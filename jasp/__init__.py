"""jasp: automatic N:M (2:4) structured sparsity for JAX, Flax and Optax.

The pipeline, one module per idea, each layer importing only the ones below it:
:mod:`jasp.masks` (one array, pure math; Pallas kernels through
``jasp._dispatch``) -> :mod:`jasp.layouts` and :mod:`jasp.policy` (which leaf,
which axis) -> :mod:`jasp.pruning` (whole trees) -> :mod:`jasp.enforcement`
(optax) and :mod:`jasp.report` -> :mod:`jasp.permutation` ->
:mod:`jasp.calibration` -> :mod:`jasp.sparse` (the 2:4 matmul) ->
:mod:`jasp.export` (files and the ``jasp`` CLI). ``tests/layering_test.py``
states the layers as data and checks them.

Conventions, the same in every function:

* ``params`` is the tree that is pruned (the first argument of
  :func:`prune`, :func:`compute_masks`, :func:`sparsity_report`, the
  calibration functions...): flax ``linen`` variables (or their ``"params"``
  collection), an ``nnx.State``, or any pytree of arrays. ``masks`` mirrors it.
* ``n`` and ``m`` always come in that order, default to ``n=2, m=4`` and can
  be passed by keyword.
* :mod:`jasp.typing` names the shared types.

Importing ``jasp`` is cheap: names load on first use (PEP 562), so ``jasp
check --help`` never imports jax.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from jasp import _deprecation
from jasp._version import __version__ as __version__

if TYPE_CHECKING:  # what IDEs and type checkers see; at run time __getattr__ loads these
  from jasp import calibration
  from jasp import export
  from jasp import permutation
  from jasp import sparse
  from jasp._dispatch import get_mask_impl
  from jasp._dispatch import mask_impl
  from jasp.calibration import sparsegpt_prune
  from jasp.calibration import wanda_prune
  from jasp.enforcement import MaskState
  from jasp.enforcement import SparseState
  from jasp.enforcement import assert_masked
  from jasp.enforcement import count_unmasked
  from jasp.enforcement import get_masks
  from jasp.enforcement import mask_gradients
  from jasp.enforcement import mask_updates
  from jasp.enforcement import schedule_free_eval_params
  from jasp.enforcement import sparse_optimizer
  from jasp.enforcement import update_masks
  from jasp.enforcement import with_bool_masks
  from jasp.layouts import Layout
  from jasp.layouts import convention_layout
  from jasp.layouts import trace_layouts
  from jasp.masks import block_patterns
  from jasp.masks import is_nm
  from jasp.masks import nm_mask
  from jasp.masks import nm_mask_2d
  from jasp.masks import nm_prune
  from jasp.packing import PackedMask
  from jasp.packing import pack_masks
  from jasp.packing import unpack_masks
  from jasp.permutation import PermutationPlan
  from jasp.permutation import PermutationReport
  from jasp.permutation import permutation_score
  from jasp.permutation import permute
  from jasp.permutation import search_permutation
  from jasp.permutation import trace_channels
  from jasp.policy import Decision
  from jasp.policy import Policy
  from jasp.pruning import apply_masks
  from jasp.pruning import compute_masks
  from jasp.pruning import prune
  from jasp.report import LeafReport
  from jasp.report import SparsityReport
  from jasp.report import sparsity_report


__all__ = [
  "apply_masks",
  "assert_masked",
  "block_patterns",
  "calibration",
  "compute_masks",
  "convention_layout",
  "count_unmasked",
  "Decision",
  "export",
  "get_mask_impl",
  "get_masks",
  "is_nm",
  "Layout",
  "LeafReport",
  "mask_gradients",
  "mask_impl",
  "mask_updates",
  "MaskState",
  "nm_mask",
  "nm_mask_2d",
  "nm_prune",
  "pack_masks",
  "PackedMask",
  "permutation",
  "permutation_score",
  "PermutationPlan",
  "PermutationReport",
  "permute",
  "Policy",
  "prune",
  "schedule_free_eval_params",
  "search_permutation",
  "sparse",
  "sparse_optimizer",
  "sparsegpt_prune",
  "SparseState",
  "sparsity_report",
  "SparsityReport",
  "trace_channels",
  "trace_layouts",
  "unpack_masks",
  "update_masks",
  "wanda_prune",
  "with_bool_masks",
]

# name -> the module that defines it.
_LAZY = {
  "Decision": "jasp.policy",
  "Layout": "jasp.layouts",
  "LeafReport": "jasp.report",
  "MaskState": "jasp.enforcement",
  "PackedMask": "jasp.packing",
  "PermutationPlan": "jasp.permutation",
  "PermutationReport": "jasp.permutation",
  "Policy": "jasp.policy",
  "SparseState": "jasp.enforcement",
  "SparsityReport": "jasp.report",
  "apply_masks": "jasp.pruning",
  "assert_masked": "jasp.enforcement",
  "block_patterns": "jasp.masks",
  "compute_masks": "jasp.pruning",
  "convention_layout": "jasp.layouts",
  "count_unmasked": "jasp.enforcement",
  "get_mask_impl": "jasp._dispatch",
  "get_masks": "jasp.enforcement",
  "is_nm": "jasp.masks",
  "mask_gradients": "jasp.enforcement",
  "mask_impl": "jasp._dispatch",
  "mask_updates": "jasp.enforcement",
  "nm_mask": "jasp.masks",
  "nm_mask_2d": "jasp.masks",
  "nm_prune": "jasp.masks",
  "pack_masks": "jasp.packing",
  "permutation_score": "jasp.permutation",
  "permute": "jasp.permutation",
  "prune": "jasp.pruning",
  "schedule_free_eval_params": "jasp.enforcement",
  "search_permutation": "jasp.permutation",
  "sparse_optimizer": "jasp.enforcement",
  "sparsegpt_prune": "jasp.calibration",
  "sparsity_report": "jasp.report",
  "trace_channels": "jasp.permutation",
  "trace_layouts": "jasp.layouts",
  "unpack_masks": "jasp.packing",
  "update_masks": "jasp.enforcement",
  "wanda_prune": "jasp.calibration",
  "with_bool_masks": "jasp.enforcement",
}

# Old top-level names: they still work and warn (see CHANGELOG.md).
_DEPRECATED = {
  "nm_prune_array": "jasp.masks.nm_prune",
  "pack": "jasp.packing.pack",
  "plan": "jasp.policy.plan",
  "unpack": "jasp.packing.unpack",
}

_deprecated_getattr = _deprecation.module_getattr("jasp", _DEPRECATED, stacklevel=4)


def __getattr__(name: str):
  if name in _LAZY:
    value = getattr(importlib.import_module(_LAZY[name]), name)
  elif name in _DEPRECATED:
    return _deprecated_getattr(name)
  elif name.startswith("__"):
    raise AttributeError(f"module 'jasp' has no attribute {name!r}")
  else:
    try:  # a submodule: jasp.masks, jasp._tree, ...
      value = importlib.import_module(f"jasp.{name}")
    except ModuleNotFoundError as e:
      if e.name != f"jasp.{name}":
        raise
      raise AttributeError(f"module 'jasp' has no attribute {name!r}") from None
  globals()[name] = value  # later lookups skip __getattr__
  return value


def __dir__() -> list[str]:
  return sorted(set(globals()) | set(__all__))
