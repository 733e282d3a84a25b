"""TorchScript export of a trained model (``torch.jit.trace``), for C++/LibTorch deployments.

The `resunet.model.ModelSpec` (as JSON) travels as the archive's extra file ``resunet.json``.
Tracing records one forward pass; the traced module is checked on a second, differently sized
input before it is written, so a shape baked into the trace is caught at export time.
TorchScript archives hold code, so resunet itself never loads them from untrusted sources:
``resunet predict`` reads checkpoints (``weights_only``) and ONNX files only.
"""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path

import torch

from resunet.data.io import atomic_write
from resunet.errors import ModelError
from resunet.export.onnx import example_input
from resunet.model.spec import ModelSpec

EXTRA_FILE = "resunet.json"


def export_torchscript(model: torch.nn.Module, spec: ModelSpec, path: str | Path) -> Path:
    """Trace ``model`` (eval, fp32, CPU) and write it atomically with ``spec`` embedded."""
    model = model.float().cpu().eval()
    x = example_input(spec)
    check = example_input(spec, batch=1, size=x.shape[-1] + 2 * spec.divisor)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, x, check_trace=False)
        worst = (traced(check) - model(check)).abs().max().item()
    if worst > 1e-4:
        raise ModelError(f"the traced model differs from the network on another input size (max |diff| {worst:.2e})")
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer, _extra_files={EXTRA_FILE: json.dumps(spec.to_dict())})
    path = Path(path)
    with atomic_write(path) as tmp:
        Path(tmp).write_bytes(buffer.getvalue())
    return path
