"""Accelerator kernels for jasp: Pallas Mosaic GPU (Hopper) and Pallas Triton.

Every mask kernel here has an exact XLA counterpart in :mod:`jasp.masks`; the
choice between them is made by :mod:`jasp._dispatch`. :mod:`jasp.kernels.decode24`
multiplies by a compressed 2:4 weight at small token counts (its counterpart:
the dense product of :func:`~jasp.kernels.decode24.decompress_24`). The kernels
run on any backend in Pallas interpret mode (slow; for tests).
"""

from jasp.kernels.nm2d_pallas import nm_mask_2d_pallas
from jasp.kernels.nm2d_pallas import supports_2d
from jasp.kernels.nm_pallas import SUPPORTED_DTYPES
from jasp.kernels.nm_pallas import nm_mask_pallas
from jasp.kernels.nm_pallas import nm_prune_pallas
from jasp.kernels.nm_pallas import supports

__all__ = [
  "SUPPORTED_DTYPES",
  "nm_mask_2d_pallas",
  "nm_mask_pallas",
  "nm_prune_pallas",
  "supports",
  "supports_2d",
]
