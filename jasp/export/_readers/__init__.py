"""Readers of the file formats ``jasp check`` takes, one module per format.

Each turns an untrusted file into the weights to check
(:class:`jasp.export._verdict.Candidate`: the array, the op that consumes it
and the axes that op reduces over), reading no more than its
:class:`~jasp.export._safe_read.Budget` allows and raising
:class:`~jasp.export._safe_read.CheckError` on anything malformed:

* :mod:`.onnx`: an ``.onnx`` model, followed through its graph;
* :mod:`.safetensors`: PyTorch (or flax) layouts, apex's mask tensors;
* :mod:`.savedmodel`: a TensorFlow SavedModel's variables;
* :mod:`.msgpack` and :mod:`.orbax`: flax checkpoints, read as a tree by
  :mod:`.tree`'s conventions.
"""

from __future__ import annotations

import dataclasses

from jasp.export._verdict import Candidate

__all__ = ["Found"]


@dataclasses.dataclass(frozen=True)
class Found:
  """What a reader found in a file.

  Attributes:
    cands: the weights to check.
    meta: jasp's metadata in the file (checked; ``{}`` when none).
    none_found: why no weight was found, for the error when ``cands`` is empty.
    path: the path as the report shows it (an orbax step directory adds the
      item it read).
  """

  cands: list[Candidate]
  meta: dict
  none_found: str
  path: str
