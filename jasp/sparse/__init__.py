"""jasp.sparse: 2:4 weights on the sparse tensor cores (cuSPARSELt through ``jax.ffi``).

The pipeline: compress a pruned 2:4 kernel once (:func:`compress`, or a whole
tree with :func:`sparsify` / :func:`sparsify_nnx`), then multiply with
:func:`matmul`, which takes the sparse kernel where the policy measured it
faster on this GPU and the dense dot elsewhere. With ``compact=True`` the
weight also keeps jasp's compact format, read by a decode-time kernel
(:func:`compact_matmul`, :mod:`jasp.kernels.decode24`) that the policy weighs
too: at the few tokens of LLM decoding, cuSPARSELt is slower than dense. On CPU, or a GPU without 2:4
tensor cores, everything runs dense and a warning says why.

The C++ extension (``_ffi.cc``, host code only) is compiled on first use with
the system C++ compiler against XLA's FFI headers and the cuSPARSELt wheel
(``pip install nvidia-cusparselt-cu13``); see :mod:`jasp.sparse.build`.
"""

from jasp import _deprecation
from jasp.sparse._compress import A_COL
from jasp.sparse._compress import A_ROW
from jasp.sparse._compress import SparseWeight
from jasp.sparse._compress import compress
from jasp.sparse._matmul import compact_matmul
from jasp.sparse._matmul import dense_matmul
from jasp.sparse._matmul import sparse_matmul
from jasp.sparse._runtime import SparseUnavailable
from jasp.sparse._runtime import status
from jasp.sparse.autotune import Choice
from jasp.sparse.autotune import MatmulPolicy
from jasp.sparse.autotune import matmul
from jasp.sparse.autotune import tune
from jasp.sparse.flax import SparseEinsum
from jasp.sparse.flax import SparseLinear
from jasp.sparse.flax import apply
from jasp.sparse.flax import intercept
from jasp.sparse.flax import sparsify
from jasp.sparse.flax import sparsify_nnx

__all__ = [
  "A_COL",
  "A_ROW",
  "Choice",
  "MatmulPolicy",
  "SparseEinsum",
  "SparseLinear",
  "SparseUnavailable",
  "SparseWeight",
  "apply",
  "compact_matmul",
  "compress",
  "dense_matmul",
  "intercept",
  "matmul",
  "sparse_matmul",
  "sparsify",
  "sparsify_nnx",
  "status",
  "tune",
]

# The sparse-vs-dense choice was `jasp.sparse.policy`; `jasp.policy` decides
# which leaves are pruned, so the module is now `jasp.sparse.autotune`.
__getattr__ = _deprecation.module_getattr("jasp.sparse", {"policy": "jasp.sparse.autotune"})
