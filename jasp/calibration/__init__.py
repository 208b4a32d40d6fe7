"""Calibration-based one-shot N:M pruning: Wanda and SparseGPT.

Both need the inputs that each weight's matmul sees on a few calibration
batches. :mod:`jasp.calibration.stats` taps them from the model's jaxpr (no
change to the model: linen, nnx or any function), streaming over batches under
``jit``:

* :func:`wanda_prune`: keep the ``n`` of every ``m`` weights with the largest
  ``|W| * ||X||_2`` (no weight update);
* :func:`sparsegpt_prune`: choose the mask by OBS saliency and update the kept
  weights to compensate (per-layer Hessian ``X^T X``, blocks of 128), layer
  after layer on the outputs of the already-pruned layers.

Both return ``(params, masks)`` like :func:`jasp.prune`, so the masks feed
:func:`jasp.mask_updates` for fine-tuning.
"""

from jasp.calibration._driver import LayerResult
from jasp.calibration.sparsegpt import inverse_hessian_factor
from jasp.calibration.sparsegpt import reconstruction_error
from jasp.calibration.sparsegpt import sparsegpt_layer
from jasp.calibration.sparsegpt import sparsegpt_prune
from jasp.calibration.stats import LayerStats
from jasp.calibration.stats import Site
from jasp.calibration.stats import collect_stats
from jasp.calibration.stats import from_matrix
from jasp.calibration.stats import to_matrix
from jasp.calibration.wanda import wanda_prune
from jasp.calibration.wanda import wanda_scores

__all__ = [
  "LayerResult",
  "LayerStats",
  "Site",
  "collect_stats",
  "from_matrix",
  "inverse_hessian_factor",
  "reconstruction_error",
  "sparsegpt_layer",
  "sparsegpt_prune",
  "to_matrix",
  "wanda_prune",
  "wanda_scores",
]
