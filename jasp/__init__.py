"""jasp: automatic N:M (2:4) structured sparsity for JAX, Flax and Optax.

The pipeline, one module per idea: masks (pure math) -> layouts and policy
(which leaf, which axis) -> pruning (trees) -> enforcement (optax) -> report.
"""

from jasp import calibration
from jasp import export
from jasp import permutation
from jasp import sparse
from jasp._dispatch import get_mask_impl
from jasp._dispatch import mask_impl
from jasp._dispatch import nm_prune_array
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
from jasp.layouts import Layout
from jasp.layouts import convention_layout
from jasp.layouts import trace_layouts
from jasp.masks import block_patterns
from jasp.masks import is_nm
from jasp.masks import nm_mask
from jasp.masks import nm_mask_2d
from jasp.packing import PackedMask
from jasp.packing import pack
from jasp.packing import pack_masks
from jasp.packing import unpack
from jasp.packing import unpack_masks
from jasp.permutation import PermutationPlan
from jasp.permutation import PermutationReport
from jasp.permutation import permutation_score
from jasp.permutation import permute
from jasp.permutation import search_permutation
from jasp.permutation import trace_channels
from jasp.policy import Decision
from jasp.policy import Policy
from jasp.policy import plan
from jasp.pruning import apply_masks
from jasp.pruning import compute_masks
from jasp.pruning import prune
from jasp.report import LeafReport
from jasp.report import SparsityReport
from jasp.report import sparsity_report

__version__ = "0.1.0"

__all__ = [
  "Decision",
  "Layout",
  "LeafReport",
  "MaskState",
  "PackedMask",
  "PermutationPlan",
  "PermutationReport",
  "Policy",
  "SparseState",
  "SparsityReport",
  "apply_masks",
  "assert_masked",
  "block_patterns",
  "calibration",
  "compute_masks",
  "count_unmasked",
  "convention_layout",
  "export",
  "get_mask_impl",
  "get_masks",
  "is_nm",
  "mask_gradients",
  "mask_impl",
  "mask_updates",
  "nm_mask",
  "nm_mask_2d",
  "nm_prune_array",
  "pack",
  "pack_masks",
  "permutation",
  "permutation_score",
  "permute",
  "plan",
  "prune",
  "sparse",
  "sparse_optimizer",
  "sparsegpt_prune",
  "schedule_free_eval_params",
  "search_permutation",
  "sparsity_report",
  "trace_channels",
  "trace_layouts",
  "unpack",
  "unpack_masks",
  "update_masks",
  "wanda_prune",
]
