"""The fastest numerically safe precision and memory format for training, measured on this machine.

``precision: auto`` / ``memory_format: auto`` (the defaults) are resolved by `choose_step_settings`
on the run's first real batches, before the first epoch:

==================  ===========================================================================
candidates          CPU: fp32, and bf16 autocast only where the CPU computes bf16 natively
                    (AVX512-BF16 / AMX; emulated bf16 was measured 20x slower on an AVX2 box);
                    CUDA: fp32, bf16 (where the GPU supports it), fp16 autocast + GradScaler.
                    Each with the contiguous and the channels-last memory format (channels-last-3d
                    for 3-D). A forced precision or memory format narrows the list to it.
timing              every candidate starts from a copy of the SAME initial weights and trains on
                    the SAME batches; the candidates take their steps in turns (round robin), so a
                    load spike on a shared machine hits them alike. Seconds per step = median of
                    the steps after the first (warm-up: kernel selection, allocation).
numerical guard     `precision_guard`: every loss finite, the weights finite after the steps, and
                    the last loss within `LOSS_TOLERANCE` (relative) of fp32's on the same batches.
                    A candidate that fails is never chosen, however fast.
choice              the fastest candidate that passes; the reference (fp32, contiguous) unless the
                    winner is at least `MIN_GAIN` faster, so noise does not flip the choice.
cache               the choice is stored per machine (`machine_key`), device, network
                    (`model_config`), batch shape and request in ``$RESUNET_CACHE/step_settings.json``;
                    a second run of the same shape on the same machine does not time again
                    (delete the file to measure again, e.g. after measuring on a busy machine).
==================  ===========================================================================

The trainer prints the choice, writes it to ``<run>/step_settings.json`` and keeps it in ``last.pt``
so a resumed run trains with the settings its first part chose.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from resunet.data.io import atomic_write
from resunet.hardware import machine_key, native_bf16
from resunet.model.paths import cache_root

__all__ = [
    "LOSS_TOLERANCE", "MIN_GAIN", "PRECISION_DTYPES", "StepChoice", "StepSettings", "StepTiming",
    "candidate_settings", "choose_step_settings", "pick_fastest_safe", "precision_guard", "time_candidates",
]

#: a candidate's last loss must be within this relative distance of fp32's (same weights and batches)
LOSS_TOLERANCE = 0.10
#: a candidate replaces fp32 / contiguous only when at least this much faster
MIN_GAIN = 1.05
PRECISION_DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class StepSettings:
    """How a training step computes: ``precision`` (fp32 / bf16 / fp16) and ``memory_format``."""

    precision: str = "fp32"
    memory_format: str = "contiguous"

    @property
    def dtype(self) -> torch.dtype | None:
        """The autocast dtype (None for fp32)."""
        return PRECISION_DTYPES[self.precision]

    @property
    def uses_scaler(self) -> bool:
        """fp16 needs loss scaling (its range underflows small gradients); bf16 does not."""
        return self.precision == "fp16"

    def torch_format(self, ndim: int) -> torch.memory_format:
        """The ``torch.memory_format`` for a tensor of ``ndim`` dimensions (4: 2-D, 5: 3-D)."""
        if self.memory_format != "channels_last":
            return torch.contiguous_format
        return torch.channels_last if ndim == 4 else torch.channels_last_3d

    def apply(self, x: Any) -> Any:
        """``x`` (a module or a batch tensor) in this memory format."""
        if isinstance(x, nn.Module):
            fmt = self.torch_format(5 if getattr(x, "spatial_dims", 2) == 3 else 4)
            return x.to(memory_format=fmt) if fmt is not torch.contiguous_format else x
        return x.contiguous(memory_format=self.torch_format(x.ndim))

    def __str__(self) -> str:
        return f"{self.precision} / {self.memory_format}"


REFERENCE = StepSettings()


@dataclass
class StepTiming:
    """One candidate's measurement: seconds per step, the losses of every step, weights finite."""

    settings: StepSettings
    seconds: float
    losses: list[float] = field(default_factory=list)
    finite: bool = True


@dataclass
class StepChoice:
    """The settings chosen, why, every candidate's measurement, and whether it came from the cache."""

    settings: StepSettings
    reason: str
    timings: list[dict[str, Any]] = field(default_factory=list)
    cached: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"precision": self.settings.precision, "memory_format": self.settings.memory_format,
                "reason": self.reason, "timings": self.timings, "cached": self.cached}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "StepChoice":
        return cls(StepSettings(data["precision"], data["memory_format"]), data.get("reason", ""),
                   list(data.get("timings", [])), bool(data.get("cached", False)))


def candidate_settings(device: torch.device, precision: str = "auto", memory_format: str = "auto",
                       bf16_available: bool | None = None) -> list[StepSettings]:
    """The candidates the hardware supports for the request (``auto`` or one forced value each);
    the reference (fp32 / contiguous) first whenever it is allowed."""
    device = torch.device(device)
    if precision == "auto":
        if bf16_available is None:
            bf16_available = (torch.cuda.is_bf16_supported() if device.type == "cuda" else native_bf16())
        precisions = ["fp32"] + (["bf16"] if bf16_available else []) + (["fp16"] if device.type == "cuda" else [])
    else:
        precisions = [precision]
    formats = ["contiguous", "channels_last"] if memory_format == "auto" else [memory_format]
    return [StepSettings(p, f) for p in precisions for f in formats]


def precision_guard(reference: Sequence[float], candidate: Sequence[float],
                    tolerance: float = LOSS_TOLERANCE) -> tuple[bool, str]:
    """Do ``candidate``'s losses (same weights, same batches) track the fp32 ``reference``'s?
    Every loss must be finite and the last within ``tolerance`` (relative) of fp32's last."""
    if not candidate or not all(np.isfinite(candidate)):
        return False, "non-finite loss"
    ref, got = float(reference[-1]), float(candidate[-1])
    gap = abs(got - ref) / max(abs(ref), 1e-6)
    if gap > tolerance:
        return False, f"loss {got:.4f} vs fp32 {ref:.4f} after {len(candidate)} steps ({gap:.0%} apart)"
    return True, f"loss {got:.4f} vs fp32 {ref:.4f}"


def pick_fastest_safe(timings: Sequence[StepTiming], min_gain: float = MIN_GAIN) -> tuple[StepSettings, str]:
    """The fastest candidate passing the guard against the fp32 run among ``timings`` (when there
    is one), preferring the reference unless the winner is ``min_gain`` faster. Why, in words."""
    reference = next((t for t in timings if t.settings == REFERENCE), None)
    fp32 = reference or next((t for t in timings if t.settings.precision == "fp32"), None)
    safe, rejected = [], []
    for t in timings:
        ok, why = (True, "") if fp32 is None or t.settings.precision == "fp32" else precision_guard(fp32.losses, t.losses)
        if not t.finite:
            ok, why = False, "non-finite weights"
        if ok:
            safe.append(t)
        else:
            rejected.append((t, why))
    if not safe:
        raise RuntimeError("every training precision candidate failed the numerical guard: "
                           + "; ".join(f"{t.settings}: {why}" for t, why in rejected))
    best = min(safe, key=lambda t: t.seconds)
    if reference is not None and reference in safe and best.seconds * min_gain > reference.seconds:
        best = reference
    note = "".join(f"; {t.settings} rejected ({why})" for t, why in rejected)
    if reference is not None and best is not reference:
        return best.settings, (f"{best.settings}: {reference.seconds / best.seconds:.2f}x faster than fp32 / contiguous "
                               f"({best.seconds:.3f} s vs {reference.seconds:.3f} s per step), losses within "
                               f"{LOSS_TOLERANCE:.0%} of fp32's{note}")
    if reference is not None:
        return best.settings, f"{best.settings}: no candidate was {min_gain:.2f}x faster ({best.seconds:.3f} s per step){note}"
    return best.settings, f"{best.settings}: the fastest of the requested settings ({best.seconds:.3f} s per step){note}"


def time_candidates(
    model: nn.Module,
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    candidates: Sequence[StepSettings],
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
    loss_fn: nn.Module,
    step: Callable[..., float] | None = None,
) -> list[StepTiming]:
    """Train a copy of ``model`` per candidate on ``batches`` (``(images, labels)`` on the model's
    device), the candidates taking turns step by step; the first step is warm-up."""
    from resunet.train.steps import train_step

    step = step or train_step
    runs = []
    for settings in candidates:
        net = settings.apply(copy.deepcopy(model))
        runs.append((settings, net, make_optimizer(net),
                     torch.amp.GradScaler(next(model.parameters()).device.type, enabled=settings.uses_scaler)))
    seconds: list[list[float]] = [[] for _ in runs]
    losses: list[list[float]] = [[] for _ in runs]
    for images, labels in batches:
        for i, (settings, net, optimizer, scaler) in enumerate(runs):
            x = settings.apply(images)
            t0 = time.perf_counter()
            losses[i].append(step(net, x, labels, loss_fn, optimizer, scaler, settings.dtype))
            seconds[i].append(time.perf_counter() - t0)
    out = []
    for (settings, net, _, _), s, loss in zip(runs, seconds, losses):
        finite = all(bool(torch.isfinite(p).all()) for p in net.parameters())
        # the median: the batches are fixed, so the cost is too, and a load spike is not the step's
        out.append(StepTiming(settings, float(np.median(s[1:] if len(s) > 1 else s)), loss, finite))
    return out


def _cache_key(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], device: torch.device,
               request: tuple[str, str]) -> str:
    from resunet.nets import model_config

    return json.dumps([machine_key(device), str(device), model_config(model), list(batch[0].shape), request])


def _read_cache() -> dict[str, Any]:
    try:
        table = json.loads((cache_root() / "step_settings.json").read_text())
        return table if isinstance(table, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_cache(key: str, choice: StepChoice) -> None:
    path = cache_root() / "step_settings.json"
    table = _read_cache()
    table[key] = {**choice.to_dict(), "cached": False}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path) as tmp:
            tmp.write_text(json.dumps(table, indent=1))
    except OSError:
        pass  # a read-only cache only costs a measurement next time


def choose_step_settings(
    model: nn.Module,
    batches: Callable[[], Sequence[tuple[torch.Tensor, torch.Tensor]]],
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
    loss_fn: nn.Module,
    *,
    precision: str = "auto",
    memory_format: str = "auto",
    use_cache: bool = True,
    bf16_available: bool | None = None,
) -> StepChoice:
    """Resolve ``precision`` / ``memory_format`` (``auto`` or forced) for ``model`` (see the module
    docstring). ``batches()`` makes the real batches to time on (called only when measuring)."""
    device = next(model.parameters()).device
    candidates = candidate_settings(device, precision, memory_format, bf16_available)
    if len(candidates) == 1:
        return StepChoice(candidates[0], f"{candidates[0]}: as configured")
    data = batches()
    key = _cache_key(model, data[0], device, (precision, memory_format))
    if use_cache and key in _read_cache():
        return StepChoice.from_dict({**_read_cache()[key], "cached": True})
    timings = time_candidates(model, data, candidates, make_optimizer, loss_fn)
    settings, reason = pick_fastest_safe(timings)
    rows = [{**asdict(t.settings), "seconds_per_step": round(t.seconds, 4), "last_loss": round(t.losses[-1], 5),
             "finite": t.finite} for t in timings]
    choice = StepChoice(settings, reason, rows)
    if use_cache:
        _write_cache(key, choice)
    return choice
