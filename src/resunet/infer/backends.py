"""Inference backends and ``auto``: the fastest one on this machine whose masks match fp32 eager.

A backend turns the trained PyTorch network into a callable ``(B, C, *S) -> (B, K, *S)`` logits:

- ``eager``: the network as is, fp32.
- ``channels_last``: the network and its inputs in channels-last memory format (2-D only).
- ``bf16`` / ``fp16``: autocast; bf16 on CPUs with native bf16 (AVX512-BF16 / AMX), fp16 on CUDA.
  Without native support bf16 is emulated and many times slower, so it is not a candidate there.
- ``onnx``: the network exported to ONNX and run by ONNX Runtime on the CPU.
- ``tensorrt``: the same ONNX file run by ONNX Runtime's TensorRT execution provider in FP16
  (NVIDIA GPU + onnxruntime-gpu built with TensorRT); refused with a clear message elsewhere.

``choose_backend`` times every candidate on a calibration batch (median of repeats after one
warm-up), rejects those whose labels differ from eager fp32 (Dice < 0.999 per class present, or
logits further than ``LOGIT_ATOL`` + ``LOGIT_RTOL`` * |logit| for fp32 backends), and returns the
fastest. The choice is cached per model (spec digest), machine (CPU / GPU, threads, library
versions) and input size in ``$RESUNET_CACHE/backends.json`` (default ``~/.cache/resunet``).
"""

from __future__ import annotations

import hashlib
import json
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from resunet.data.io import atomic_write
from resunet.errors import ConfigError, ModelError
from resunet.model.onnx_file import OnnxNetwork
from resunet.model.paths import cache_root
from resunet.model.spec import ModelSpec
from resunet.hardware import Autocast, machine_key, native_bf16
from resunet.metrics import dice_from_counts

Network = Callable[[torch.Tensor], torch.Tensor]
BACKENDS = ("auto", "eager", "channels_last", "bf16", "fp16", "onnx", "tensorrt")
LOGIT_ATOL, LOGIT_RTOL = 1e-3, 1e-3  # fp32 backends: reordered sums, fused BatchNorm
MIN_DICE = 0.999


def candidates(spatial_dims: int, device: torch.device) -> list[str]:
    """Backends worth timing for a model with ``spatial_dims`` on ``device``."""
    names = ["eager"]
    if spatial_dims == 2:
        names.append("channels_last")
    if device.type == "cuda":
        names.append("fp16")
    elif native_bf16():
        names.append("bf16")
    if device.type == "cpu":
        names.append("onnx")
    elif tensorrt_available():
        names.append("tensorrt")
    return names


def tensorrt_available() -> bool:
    """An NVIDIA GPU and ONNX Runtime's TensorRT execution provider are both present."""
    import onnxruntime

    return torch.cuda.is_available() and "TensorrtExecutionProvider" in onnxruntime.get_available_providers()


class _ChannelsLast:
    def __init__(self, model: torch.nn.Module) -> None:
        import copy

        self.model = copy.deepcopy(model).to(memory_format=torch.channels_last)
        self.training = False

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.contiguous(memory_format=torch.channels_last)).contiguous()


def onnx_cache_path(spec: ModelSpec) -> Path | None:
    """Where ``--backend onnx`` keeps the ONNX file exported from a checkpoint: keyed by a digest
    of the spec (weights digest included); None when the checkpoint has no weights digest."""
    if not spec.weights_sha256:
        return None
    digest = hashlib.sha256(json.dumps(spec.to_dict(), sort_keys=True).encode()).hexdigest()
    return cache_root() / "onnx" / f"{digest[:32]}.onnx"


def onnx_network(model: torch.nn.Module, spec: ModelSpec, providers: list | None = None) -> OnnxNetwork:
    """Export ``model`` to ONNX (or reuse the cached export) and open it with ONNX Runtime."""
    from resunet.export.onnx import export_onnx

    cached = onnx_cache_path(spec)
    if cached is not None and cached.is_file():
        try:
            return OnnxNetwork(cached, providers=providers)
        except ModelError:
            pass  # a damaged cache entry: export again
    if cached is None:
        with tempfile.TemporaryDirectory() as tmp:
            data = Path(export_onnx(model, spec, Path(tmp) / "model.onnx")).read_bytes()
            return OnnxNetwork(data, providers=providers)
    cached.parent.mkdir(parents=True, exist_ok=True)
    return OnnxNetwork(export_onnx(model, spec, cached), providers=providers)


def make_network(name: str, model: torch.nn.Module, spec: ModelSpec, device: torch.device) -> Network:
    """The callable for backend ``name`` (see the module docstring)."""
    if name == "eager":
        return model
    if name == "channels_last":
        return _ChannelsLast(model)
    if name in ("bf16", "fp16"):
        return Autocast(model, torch.bfloat16 if name == "bf16" else torch.float16)
    if name == "onnx":
        return onnx_network(model, spec)
    if name == "tensorrt":
        if device.type != "cuda" or not tensorrt_available():
            raise ConfigError(
                "backend tensorrt needs an NVIDIA GPU (--device cuda) and onnxruntime-gpu with the TensorRT "
                "execution provider; this machine has "
                + ("no CUDA GPU" if not torch.cuda.is_available() else "no TensorRT provider")
                + " -- use --backend onnx or auto")
        providers = [("TensorrtExecutionProvider", {"trt_fp16_enable": True, "trt_engine_cache_enable": True,
                                                    "trt_engine_cache_path": str(cache_root() / "trt")}),
                     "CUDAExecutionProvider"]
        return onnx_network(model, spec, providers=providers)
    raise ConfigError(f"backend {name!r} is not available; choose one of {', '.join(BACKENDS)}")


@dataclass
class BackendChoice:
    """Result of `choose_backend`: the winner and, per candidate, ms per batch and agreement."""

    name: str
    ms: dict[str, float] = field(default_factory=dict)
    dice: dict[str, float] = field(default_factory=dict)
    max_logit_diff: dict[str, float] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)
    cached: bool = False

    def summary(self) -> str:
        parts = [f"{n} {self.ms[n]:.0f} ms" + (" (rejected)" if n in self.rejected else "") for n in self.ms]
        return f"backend {self.name} ({'cached; ' if self.cached else ''}{', '.join(parts)})"


def _labels(logits: torch.Tensor) -> torch.Tensor:
    return (logits[:, 0] > 0).long() if logits.shape[1] == 1 else logits.argmax(1)


def mask_dice(a: torch.Tensor, b: torch.Tensor) -> float:
    """Smallest per-class Dice between two label tensors over the classes present in either."""
    worst = 1.0
    for c in torch.unique(torch.cat([a.flatten(), b.flatten()])).tolist():
        x, y = a == c, b == c
        tp = int((x & y).sum())
        worst = min(worst, dice_from_counts(tp, int(x.sum()) - tp, int(y.sum()) - tp))
    return worst


def _time(net: Network, x: torch.Tensor, repeats: int) -> tuple[float, torch.Tensor]:
    with torch.inference_mode():
        y = net(x).float()  # warm-up (and the output for the agreement check)
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            net(x)
            times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times), y


def choose_backend(
    model: torch.nn.Module,
    spec: ModelSpec,
    batch: torch.Tensor,
    device: torch.device,
    repeats: int = 3,
    names: list[str] | None = None,
) -> tuple[BackendChoice, Network]:
    """Time the candidates on ``batch`` ``(B, C, *S)`` (already on ``device``); see module docstring."""
    key = json.dumps([hashlib.sha256(json.dumps(spec.to_dict(), sort_keys=True).encode()).hexdigest()[:24],
                      machine_key(device), list(batch.shape)])
    names = names or candidates(spec.spatial_dims, device)
    path = cache_root() / "backends.json"
    table = _read_table(path)
    if key in table and table[key]["name"] in names:
        entry = table[key]
        choice = BackendChoice(**{**entry, "cached": True})
        return choice, make_network(choice.name, model, spec, device)
    choice = BackendChoice(name="eager")
    ref_ms, ref = _time(model, batch, repeats)
    choice.ms["eager"], choice.dice["eager"], choice.max_logit_diff["eager"] = ref_ms, 1.0, 0.0
    ref_labels = _labels(ref)
    nets: dict[str, Network] = {"eager": model}
    for name in names:
        if name == "eager":
            continue
        net = make_network(name, model, spec, device)
        ms, y = _time(net, batch, repeats)
        y = y.to(ref.device)
        diff = (y - ref).abs()
        dice = mask_dice(_labels(y), ref_labels)
        choice.ms[name], choice.dice[name], choice.max_logit_diff[name] = ms, dice, diff.max().item()
        fp32 = name in ("channels_last", "onnx")
        if dice < MIN_DICE:
            choice.rejected[name] = f"mask Dice {dice:.4f} < {MIN_DICE}"
        elif fp32 and bool((diff > LOGIT_ATOL + LOGIT_RTOL * ref.abs()).any()):
            choice.rejected[name] = f"logits differ by up to {diff.max().item():.1e}"
        else:
            nets[name] = net
    choice.name = min(nets, key=lambda n: choice.ms[n])
    entry = {k: v for k, v in choice.__dict__.items() if k != "cached"}
    table[key] = entry
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path) as tmp:
            Path(tmp).write_text(json.dumps(table, indent=1))
    except OSError:
        pass  # a read-only cache only costs a re-calibration next time
    return choice, nets[choice.name]


def _read_table(path: Path) -> dict:
    try:
        table = json.loads(path.read_text())
        return table if isinstance(table, dict) else {}
    except (OSError, ValueError):
        return {}
