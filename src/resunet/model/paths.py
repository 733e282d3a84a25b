"""`cache_root()`: the one folder resunet keeps machine-local caches in.

``$RESUNET_CACHE`` when set, else ``~/.cache/resunet``. Under it: one folder per preprocessing
config (training and planning, when the config names no ``data.cache_dir``; `resunet.data.cache`),
``fingerprints/`` dataset fingerprints, ``onnx/`` exports made by ``--backend onnx``, ``trt/``
TensorRT engines, ``backends.json`` the ``--backend auto`` choices.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """The cache folder (see the module docstring); not created here."""
    return Path(os.environ.get("RESUNET_CACHE", Path.home() / ".cache" / "resunet"))
