"""`load_model(path)`: a trained model from a checkpoint (``.pt``) or an exported ONNX file (``.onnx``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from resunet.errors import ModelError
from resunet.model.checkpoint import load_checkpoint
from resunet.model.spec import CHECKPOINT_FIELDS, ModelSpec


@dataclass
class LoadedModel:
    """A network ready for inference and its contract.

    ``network``: a `resunet.nets` model (eval mode, on the CPU) or a `resunet.model.onnx_file.OnnxNetwork`;
    ``record``: the checkpoint's run record (``epoch``, ``metrics``, ``history``, ...; empty for ONNX).
    """

    network: Any
    spec: ModelSpec
    source: str
    record: dict[str, Any] = field(default_factory=dict)

    @property
    def is_onnx(self) -> bool:
        from resunet.model.onnx_file import OnnxNetwork

        return isinstance(self.network, OnnxNetwork)


def model_from_checkpoint(payload: dict[str, Any], source: str = "checkpoint") -> LoadedModel:
    """Rebuild the network of a loaded checkpoint dict (`load_checkpoint`) and load its weights."""
    if not isinstance(payload, dict) or "state_dict" not in payload or not isinstance(payload.get("model"), dict):
        raise ModelError(f"{source} does not hold a complete resunet model (no model config or weights); "
                         "use the best.pt / last.pt of a `resunet train` run")
    config = dict(payload["model"])
    try:
        from resunet.nets import build_model

        network = build_model(config.pop("name"), **config)
    except (KeyError, TypeError, ValueError, ModelError) as err:
        raise ModelError(f"{source}: its model config {payload['model']} does not build a network ({err})") from None
    try:
        network.load_state_dict(payload["state_dict"])
    except RuntimeError as err:  # e.g. weights of another model under this model config
        detail = " ".join(str(err).split())[:300]
        raise ModelError(
            f"{source}: its weights do not fit its model config {payload['model']} "
            f"({detail}); the file mixes two models -- use the best.pt / last.pt its run wrote"
        ) from None
    fields = {k: payload.get(k) for k in CHECKPOINT_FIELDS if k != "model"}
    try:
        spec = ModelSpec.for_network(network, weights_sha256=payload.get("weights_sha256"), **fields)
    except (ValueError, TypeError) as err:  # pydantic's ValidationError is a ValueError
        raise ModelError(f"{source} does not hold a complete resunet model ({' '.join(str(err).split())[:300]})") from None
    record = {k: v for k, v in payload.items() if k not in (*CHECKPOINT_FIELDS, "state_dict")}
    return LoadedModel(network.eval(), spec, source, record)


def load_model(path: str | Path, map_location: str | torch.device = "cpu") -> LoadedModel:
    """Open a checkpoint (verified, ``weights_only``) or an exported ONNX file (its embedded spec)."""
    path = Path(path)
    if path.suffix.lower() == ".onnx":
        from resunet.model.onnx_file import OnnxNetwork

        network = OnnxNetwork(path)
        return LoadedModel(network, network.spec, str(path))
    return model_from_checkpoint(load_checkpoint(path, map_location=map_location), str(path))
