"""resunet: residual U-Net with spatial attention for medical image segmentation.

The public Python API (imported on first use, so ``import resunet`` stays light)::

    from resunet import read_volume, write_volume, plan_dataset, fit, Predictor

- `read_volume` / `write_volume`: NIfTI, DICOM series, PNG/JPG, MHA/NRRD <-> `Volume`.
- `plan_dataset(dataset, minutes)`: a `Plan` whose ``config`` fits this machine and budget.
- `fit(config)`: train (`TrainConfig`, `load_config` reads a YAML file).
- `Predictor.from_file(path)`: a checkpoint or ONNX file -> masks in each input's geometry;
  `load_model` gives the network and its `ModelSpec`.
"""

from __future__ import annotations

import importlib
from typing import Any

from resunet.errors import ResunetError
from resunet.version import __version__

#: public name -> module that defines it
_API = {
    "Volume": "resunet.data.volume",
    "read_volume": "resunet.data.io",
    "write_volume": "resunet.data.io",
    "plan_dataset": "resunet.plan",
    "Plan": "resunet.plan",
    "fit": "resunet.train.trainer",
    "TrainConfig": "resunet.train.config",
    "load_config": "resunet.train.config",
    "Predictor": "resunet.infer.predictor",
    "load_model": "resunet.model",
    "ModelSpec": "resunet.model",
}

__all__ = ["ResunetError", "__version__", *_API]


def __getattr__(name: str) -> Any:
    if name in _API:
        value = getattr(importlib.import_module(_API[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'resunet' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
