"""jasp: automatic N:M (2:4) structured sparsity for JAX, Flax and Optax."""

from jasp.masks import is_nm, nm_mask, nm_mask_2d

__version__ = "0.1.0"

__all__ = [
    "is_nm",
    "nm_mask",
    "nm_mask_2d",
]
