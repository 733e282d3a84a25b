"""ONNX export of a trained model, and `OnnxNetwork`: the exported file run by ONNX Runtime.

The exported file is self-describing: ``metadata_props["resunet"]`` holds the JSON `model_spec`
(model config, preprocessing config, label names, how the model sees a case), so
``resunet predict -m model.onnx`` needs nothing else. Axes: input ``(B, C, *S)`` -> logits
``(B, K, *S)``; the batch axis and every spatial axis are dynamic (spatial sizes must be
multiples of the network's divisor, as in PyTorch).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from resunet.data.io import atomic_write
from resunet.errors import ModelError

METADATA_KEY = "resunet"
SPEC_FORMAT = "resunet-model-spec"


def model_spec(checkpoint: dict[str, Any], model: torch.nn.Module) -> dict[str, Any]:
    """JSON-able description of a checkpoint's model: everything prediction needs except weights."""
    return {
        "format": SPEC_FORMAT,
        "version": 1,
        "model": dict(checkpoint["model"]),
        "preprocess": checkpoint["preprocess"],
        "labels": dict(checkpoint["labels"]),
        "inference": checkpoint["inference"],
        "spatial_dims": int(model.spatial_dims),
        "in_channels": int(model.in_channels),
        "out_channels": int(model.out_channels),
        "divisor": int(model.divisor),
        "weights_sha256": checkpoint.get("weights_sha256"),
    }


def example_input(spec: dict[str, Any], batch: int = 2, size: int | None = None) -> torch.Tensor:
    """A seeded random input ``(batch, C, *S)`` whose spatial sizes are multiples of the divisor."""
    div = spec["divisor"]
    side = size or (4 * div if spec["spatial_dims"] == 2 else 2 * div)
    gen = torch.Generator().manual_seed(0)
    return torch.randn(batch, spec["in_channels"], *([side] * spec["spatial_dims"]), generator=gen)


def export_onnx(model: torch.nn.Module, spec: dict[str, Any], path: str | Path) -> Path:
    """Write ``model`` (eval mode, fp32, CPU) as one self-contained ONNX file with ``spec`` embedded.

    Uses the dynamo exporter (``torch.onnx.export(dynamo=True, external_data=False)``) with a
    dynamic batch axis and spatial axes declared as multiples of the divisor. Atomic write.
    """
    import onnx

    model = model.float().cpu().eval()
    x = example_input(spec)
    batch = torch.export.Dim("batch", min=1, max=4096)
    axes: dict[int, Any] = {0: batch}
    for i, name in enumerate("dhw"[-spec["spatial_dims"]:]):
        axes[2 + i] = spec["divisor"] * torch.export.Dim(f"{name}_blocks", min=1, max=4096)
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(
                model, (x,), dynamo=True, external_data=False, dynamic_shapes=(axes,),
                input_names=["image"], output_names=["logits"], verbose=False,
            )
        except Exception as err:  # the exporter's errors are long; keep the first line
            raise ModelError(f"ONNX export failed ({type(err).__name__}: {str(err).splitlines()[0][:300]})") from None
    proto = program.model_proto
    del proto.metadata_props[:]
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(spec)
    path = Path(path)
    with atomic_write(path) as tmp:
        onnx.save_model(proto, str(tmp))
    return path


class OnnxNetwork:
    """An exported resunet model run by ONNX Runtime, callable like the PyTorch model.

    ``net(x)`` takes a float tensor ``(B, C, *S)`` and returns float32 logits ``(B, K, *S)`` as a
    CPU tensor. Attributes mirror the PyTorch networks: ``spatial_dims``, ``in_channels``,
    ``out_channels``, ``divisor``; ``spec`` is the embedded model spec.
    """

    training = False

    def __init__(self, source: str | Path | bytes, threads: int | None = None, providers: list | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        name = "<memory>" if isinstance(source, bytes) else str(source)
        if not isinstance(source, bytes):
            if not Path(source).is_file():
                raise ModelError(f"ONNX model {source} does not exist; pass a file written by `resunet export`")
            source = str(source)
        try:
            self.session = ort.InferenceSession(source, options, providers=providers or ["CPUExecutionProvider"])
        except Exception as err:
            raise ModelError(
                f"{name} is not a loadable ONNX model ({type(err).__name__}: {str(err).splitlines()[0][:200]}); "
                "re-export it with `resunet export`"
            ) from None
        raw = self.session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
        try:
            spec = json.loads(raw) if raw else None
        except ValueError:
            spec = None
        if not isinstance(spec, dict) or spec.get("format") != SPEC_FORMAT:
            raise ModelError(
                f"{name} is an ONNX model without resunet metadata (metadata_props['{METADATA_KEY}']); "
                "export it with `resunet export` so it carries its preprocessing and labels"
            )
        self.spec: dict[str, Any] = spec
        self.spatial_dims = int(spec["spatial_dims"])
        self.in_channels = int(spec["in_channels"])
        self.out_channels = int(spec["out_channels"])
        self.divisor = int(spec["divisor"])
        self._input = self.session.get_inputs()[0].name

    def eval(self) -> "OnnxNetwork":
        return self

    def to(self, *args: Any, **kwargs: Any) -> "OnnxNetwork":
        return self

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        array = np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())
        return torch.from_numpy(self.session.run(None, {self._input: array})[0])


def onnx_cache_path(spec: dict[str, Any]) -> Path | None:
    """Where ``--backend onnx`` keeps the ONNX file exported from a checkpoint: keyed by a digest
    of the spec (weights digest included); None when the checkpoint has no weights digest."""
    if not spec.get("weights_sha256"):
        return None
    root = Path(os.environ.get("RESUNET_CACHE", Path.home() / ".cache" / "resunet"))
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()
    return root / "onnx" / f"{digest[:32]}.onnx"
