"""`OnnxNetwork`: an exported resunet ONNX file run by ONNX Runtime (writing it: `resunet.export.onnx`).

The file carries its `ModelSpec` as JSON in ``metadata_props["resunet"]``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from resunet.errors import ModelError
from resunet.model.spec import SPEC_FORMAT, ModelSpec

METADATA_KEY = "resunet"


class OnnxNetwork:
    """An exported resunet model run by ONNX Runtime, callable like the PyTorch model.

    ``net(x)`` takes a float tensor ``(B, C, *S)`` and returns float32 logits ``(B, K, *S)`` as a
    CPU tensor. Attributes mirror the PyTorch networks: ``spatial_dims``, ``in_channels``,
    ``out_channels``, ``divisor``; ``spec`` is the embedded `ModelSpec`.
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
            data = json.loads(raw) if raw else None
        except ValueError:
            data = None
        if not isinstance(data, dict) or data.get("format") != SPEC_FORMAT:
            raise ModelError(
                f"{name} is an ONNX model without resunet metadata (metadata_props['{METADATA_KEY}']); "
                "export it with `resunet export` so it carries its preprocessing and labels"
            )
        self.spec = ModelSpec.from_dict(data, name)
        self.spatial_dims, self.in_channels = self.spec.spatial_dims, self.spec.in_channels
        self.out_channels, self.divisor = self.spec.out_channels, self.spec.divisor
        self._input = self.session.get_inputs()[0].name

    def eval(self) -> "OnnxNetwork":
        return self

    def to(self, *args: Any, **kwargs: Any) -> "OnnxNetwork":
        return self

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        array = np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())
        return torch.from_numpy(self.session.run(None, {self._input: array})[0])
