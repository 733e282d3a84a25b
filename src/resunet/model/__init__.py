"""The model contract: `ModelSpec`, checkpoint files, `load_model` for ``.pt`` and ``.onnx``, `cache_root`.

Everything that writes or reads a trained model goes through this package (training writes
checkpoints, prediction / export / serving read them); it sits just above `resunet.data` and
`resunet.nets`, whose configs it holds.
"""

from resunet.model.checkpoint import (
    FINAL_CHECKPOINT,
    checkpoint_payload,
    find_run_checkpoint,
    load_checkpoint,
    load_matching_weights,
    run_checkpoint,
    save_checkpoint,
)
from resunet.model.load import LoadedModel, load_model, model_from_checkpoint
from resunet.model.paths import cache_root
from resunet.model.spec import InferenceSpec, ModelSpec

__all__ = [
    "FINAL_CHECKPOINT",
    "InferenceSpec",
    "LoadedModel",
    "ModelSpec",
    "cache_root",
    "checkpoint_payload",
    "find_run_checkpoint",
    "load_checkpoint",
    "load_matching_weights",
    "load_model",
    "model_from_checkpoint",
    "run_checkpoint",
    "save_checkpoint",
]
