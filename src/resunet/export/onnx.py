"""ONNX export of a trained model (reading the file back: `resunet.model.onnx_file.OnnxNetwork`).

The exported file is self-describing: ``metadata_props["resunet"]`` holds the JSON of its
`resunet.model.ModelSpec` (model config, preprocessing config, label names, how the model sees a
case), so ``resunet predict -m model.onnx`` needs nothing else. Axes: input ``(B, C, *S)`` ->
logits ``(B, K, *S)``; the batch axis and every spatial axis are dynamic (spatial sizes must be
multiples of the network's divisor, as in PyTorch).
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Any

import torch

from resunet.data.io import atomic_write
from resunet.errors import ModelError
from resunet.model.onnx_file import METADATA_KEY, OnnxNetwork
from resunet.model.spec import ModelSpec

#: largest |logit| difference between the exported file and PyTorch that `export_checked` accepts
PARITY_TOLERANCE = 1e-4


def example_input(spec: ModelSpec, batch: int = 2, size: int | None = None) -> torch.Tensor:
    """A seeded random input ``(batch, C, *S)`` whose spatial sizes are multiples of the divisor."""
    side = size or (4 * spec.divisor if spec.spatial_dims == 2 else 2 * spec.divisor)
    gen = torch.Generator().manual_seed(0)
    return torch.randn(batch, spec.in_channels, *([side] * spec.spatial_dims), generator=gen)


def export_onnx(model: torch.nn.Module, spec: ModelSpec, path: str | Path) -> Path:
    """Write ``model`` (eval mode, fp32, CPU) as one self-contained ONNX file with ``spec`` embedded.

    Uses the dynamo exporter (``torch.onnx.export(dynamo=True, external_data=False)``) with a
    dynamic batch axis and spatial axes declared as multiples of the divisor. Atomic write.
    """
    import onnx

    model = model.float().cpu().eval()
    x = example_input(spec)
    batch = torch.export.Dim("batch", min=1, max=4096)
    axes: dict[int, Any] = {0: batch}
    for i, name in enumerate("dhw"[-spec.spatial_dims:]):
        axes[2 + i] = spec.divisor * torch.export.Dim(f"{name}_blocks", min=1, max=4096)
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
    entry.key, entry.value = METADATA_KEY, json.dumps(spec.to_dict())
    path = Path(path)
    with atomic_write(path) as tmp:
        onnx.save_model(proto, str(tmp))
    return path


def export_checked(model: torch.nn.Module, spec: ModelSpec, path: str | Path) -> float:
    """`export_onnx`, then run the file with ONNX Runtime on `example_input` and compare with
    PyTorch; a file whose logits differ by more than `PARITY_TOLERANCE` is deleted (`ModelError`).
    Returns the largest |logit| difference."""
    path = export_onnx(model, spec, path)
    x = example_input(spec, batch=2)
    with torch.no_grad():
        diff = (OnnxNetwork(path)(x) - model(x)).abs().max().item()
    if not diff <= PARITY_TOLERANCE:  # never leave a model behind that computes something else
        Path(path).unlink(missing_ok=True)
        raise ModelError(f"the exported ONNX model differs from PyTorch by {diff:.2e} (> {PARITY_TOLERANCE:g}); "
                         "nothing written")
    return diff
