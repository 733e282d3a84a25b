"""What this machine is and can do: the device to run on, threads, native bf16, autocast.

One owner for the hardware rules every front end applies (training, prediction, serving,
planning): `resolve_device` (``auto`` / ``cpu`` / ``cuda[:N]``, with the one "no CUDA here"
message), `set_threads` (intra-op threads = physical cores), `native_bf16`, `amp_dtype` (bf16 on
the CPU, fp16 on CUDA), `autocast` (a context, a no-op without a dtype) and `Autocast` (a network
wrapped in it, used by the bf16 / fp16 inference backends).
"""

from __future__ import annotations

import os
import platform
from contextlib import nullcontext
from typing import Any, Callable

import torch

from resunet.errors import ConfigError


def resolve_device(kind: str | torch.device) -> torch.device:
    """``auto`` -> CUDA when present else CPU; ``cuda`` without a GPU -> `ConfigError` saying so."""
    kind = str(kind)
    if kind == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(kind)
    except RuntimeError:
        raise ConfigError(f"unknown device {kind!r}; use cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {kind!r} requested but no CUDA GPU is available; use --device cpu")
    return device


def physical_cores() -> int:
    """Physical cores available to this process (hyper-threads do not speed up convolutions)."""
    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
        cores = {(blk.split("physical id")[1].split("\n")[0], blk.split("core id")[1].split("\n")[0])
                 for blk in text.split("\n\n") if "core id" in blk and "physical id" in blk}
        if cores:
            return max(1, min(available, len(cores)))
    except (OSError, IndexError):
        pass
    return max(1, available)


def set_threads(threads: int | None = None) -> int:
    """Intra-op threads = physical cores (or ``threads``), for PyTorch; ONNX sessions copy it."""
    n = threads or physical_cores()
    torch.set_num_threads(n)
    return n


def native_bf16() -> bool:
    """True when this CPU computes bf16 natively (otherwise autocast emulates it, slowly)."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, p, lambda: False)() for p in probes)


def machine_key(device: torch.device) -> str:
    """CPU/GPU model, thread count and library versions: what makes timings comparable."""
    import onnxruntime

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return f"{cpu}|{gpu}|threads={torch.get_num_threads()}|torch={torch.__version__}|ort={onnxruntime.__version__}"


def amp_dtype(device: torch.device | str, amp: bool = True) -> torch.dtype | None:
    """The mixed-precision dtype on ``device``: fp16 on CUDA, bf16 on the CPU; None when not ``amp``."""
    if not amp:
        return None
    return torch.float16 if torch.device(device).type == "cuda" else torch.bfloat16


def autocast(device: torch.device | str, dtype: torch.dtype | None) -> Any:
    """``torch.autocast`` to ``dtype`` on ``device``'s type; a no-op context when ``dtype`` is None."""
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


class Autocast:
    """``model`` called under `autocast` to ``dtype``, logits returned as float32."""

    training = False

    def __init__(self, model: Callable[[torch.Tensor], torch.Tensor], dtype: torch.dtype) -> None:
        self.model, self.dtype = model, dtype

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        with autocast(x.device, self.dtype):
            return self.model(x).float()
