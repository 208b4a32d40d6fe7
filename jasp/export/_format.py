"""Where jasp's metadata sits in the files it writes, shared by the writers and the checker.

The exporters (:mod:`jasp.export._onnx`, :mod:`jasp.export._saved_model`)
verify what they wrote with :mod:`jasp.export._check`, which reads the same
locations; keeping the names here lets both import them without a cycle.
"""

from __future__ import annotations

import os

__all__ = ["JASP_JSON", "METADATA_KEY"]

#: The ONNX ``metadata_props`` key of jasp's JSON metadata.
METADATA_KEY = "jasp"

#: jasp's JSON metadata inside a TensorFlow SavedModel directory.
JASP_JSON = os.path.join("assets.extra", "jasp.json")
