"""Channel permutation for N:M sparsity: search, graph analysis, application.

* :func:`search_permutation`: a permutation of one weight's group axis under
  which N:M keeps more magnitude (jitted window and swap searches).
* :func:`trace_channels`: which parameter axes of a model carry the same
  channels (a jaxpr analysis; the layers of a stacked, scanned block each
  have their own classes).
* :func:`permute`: both, for a whole flax linen or nnx model, keeping its
  function; returns the permuted model and a :class:`PermutationReport`.
"""

from jasp.permutation.apply import apply_permutation
from jasp.permutation.apply import permute
from jasp.permutation.graph import ChannelClass
from jasp.permutation.graph import ChannelGraph
from jasp.permutation.graph import trace_channels
from jasp.permutation.report import ClassReport
from jasp.permutation.report import LayerReport
from jasp.permutation.report import PermutationPlan
from jasp.permutation.report import PermutationReport
from jasp.permutation.search import PermutationScore
from jasp.permutation.search import SearchInfo
from jasp.permutation.search import permutation_score
from jasp.permutation.search import permute_axis
from jasp.permutation.search import search_permutation

__all__ = [
  "ChannelClass",
  "ChannelGraph",
  "ClassReport",
  "LayerReport",
  "PermutationPlan",
  "PermutationReport",
  "PermutationScore",
  "SearchInfo",
  "apply_permutation",
  "permutation_score",
  "permute",
  "permute_axis",
  "search_permutation",
  "trace_channels",
]
