"""Timed training steps of candidate configurations on this machine, on the dataset's own batches.

The planner sizes a run from what one step costs HERE: `time_training` builds the candidate's
model, sampler and augmentation on the real preprocessed cases and times complete iterations
(batch sampling + augmentation + forward + loss + backward + optimiser step) exactly as the
trainer runs them (with ``semi_supervised.enabled``, the mean-teacher step, the labelled cases standing
in for the unlabelled ones: the cost depends on the patch and batch sizes only). The figure is the MEAN of ``repeats`` iterations after ``warmup`` ones: the
augmentation's cost varies from batch to batch (a rotated 3-D batch costs a resampling an
unrotated one does not), and the fastest of a few was measured 25 % under the epochs' real pace
(3-D hippocampus: 0.32 s timed, 0.42 s per iteration in the epochs).

`choose_precision` runs the same steps from the same initial weights in fp32 and in bf16 autocast
(only where the CPU has native bf16 / AMX, or on CUDA) and keeps bf16 when it is faster AND its
losses stay finite and close to fp32's (the numerical guard).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from resunet.data.sampling import PatchSampler
from resunet.hardware import native_bf16
from resunet.train.config import TrainConfig

__all__ = ["PrecisionChoice", "StepTiming", "choose_precision", "precision_guard", "time_training"]

#: bf16 must end within this relative distance of fp32's loss after the guarded steps
LOSS_TOLERANCE = 0.10


@dataclass
class StepTiming:
    """Seconds per training iteration (batch + step) and the losses of the timed iterations."""

    seconds: float
    losses: list[float] = field(default_factory=list)
    amp: bool = False


def time_training(
    config: TrainConfig,
    cases: Sequence,
    in_channels: int,
    out_channels: int,
    *,
    amp: bool,
    repeats: int = 8,
    warmup: int = 1,
    model: torch.nn.Module | None = None,
    device: torch.device | str = "cpu",
) -> StepTiming:
    """Time iterations of ``config``'s first stage on ``cases`` (cached, preprocessed).

    ``model`` (optional) is deep-copied so several precisions start from the same weights.
    """
    from resunet.nets import build_model
    from resunet.train.semi_supervised import MeanTeacher
    from resunet.train.steps import train_step
    from resunet.train.trainer import augment_generator, make_batch, make_loss, make_optimizer

    stage = config.stages[0]
    spatial_dims = 2 if config.data.mode == "2d" else 3
    if model is None:
        torch.manual_seed(config.seed)
        model = build_model(config.model.name, spatial_dims=spatial_dims, in_channels=in_channels,
                            out_channels=out_channels, base_channels=config.model.base_channels,
                            depth=config.model.depth)
    model = copy.deepcopy(model).to(device)
    optimizer, loss_fn = make_optimizer(model, config), make_loss(config)
    scaler = torch.amp.GradScaler("cuda" if torch.device(device).type == "cuda" else "cpu",
                                  enabled=amp and torch.device(device).type == "cuda")
    sampler = PatchSampler(list(cases), stage.patch_size, stage.batch_size, config.data.foreground_fraction,
                           context=config.data.context, seed=0)
    sampler.reseed(config.seed, 0, 0)
    generator = augment_generator(config.seed, 0)
    semi = (MeanTeacher(config, model, [(c.image, None) for c in cases], device)
            if config.semi_supervised.enabled else None)
    times, losses = [], []
    for it in range(warmup + repeats):
        t0 = time.perf_counter()
        images, targets = make_batch(sampler, config.augment, generator, device)
        if semi is None:
            losses.append(train_step(model, images, targets, loss_fn, optimizer, scaler, amp))
        else:
            losses.append(semi.step(model, images, targets, loss_fn, optimizer, scaler, amp, (), 0, it))
        times.append(time.perf_counter() - t0)
    return StepTiming(float(np.mean(times[warmup:])), losses, amp)


@dataclass
class PrecisionChoice:
    amp: bool
    fp32_seconds: float
    bf16_seconds: float | None
    reason: str


def choose_precision(
    config: TrainConfig, cases: Sequence, in_channels: int, out_channels: int,
    device: torch.device | str = "cpu", bf16_available: bool | None = None, repeats: int = 8,
) -> PrecisionChoice:
    """fp32 or bf16 autocast for ``config`` on this machine: timed, and guarded numerically."""
    from resunet.nets import build_model

    device = torch.device(device)
    spatial_dims = 2 if config.data.mode == "2d" else 3
    torch.manual_seed(config.seed)
    model = build_model(config.model.name, spatial_dims=spatial_dims, in_channels=in_channels,
                        out_channels=out_channels, base_channels=config.model.base_channels,
                        depth=config.model.depth)
    fp32 = time_training(config, cases, in_channels, out_channels, amp=False, model=model, device=device,
                         repeats=repeats)
    if bf16_available is None:
        bf16_available = device.type == "cuda" or native_bf16()
    if not bf16_available:
        return PrecisionChoice(False, fp32.seconds, None, "fp32: this CPU has no native bf16 (AVX512-BF16 / AMX)")
    low = time_training(config, cases, in_channels, out_channels, amp=True, model=model, device=device,
                        repeats=repeats)
    ok, why = precision_guard(fp32.losses, low.losses)
    ratio = fp32.seconds / low.seconds
    if not ok:
        return PrecisionChoice(False, fp32.seconds, low.seconds, f"fp32: bf16 failed the numerical guard ({why})")
    if ratio <= 1.05:
        return PrecisionChoice(False, fp32.seconds, low.seconds,
                               f"fp32: bf16 is not faster here ({low.seconds:.3f} s vs {fp32.seconds:.3f} s per step)")
    return PrecisionChoice(True, fp32.seconds, low.seconds,
                           f"bf16 autocast: {ratio:.2f}x faster than fp32 here ({low.seconds:.3f} s vs "
                           f"{fp32.seconds:.3f} s per step), losses within {LOSS_TOLERANCE:.0%} of fp32's")


def precision_guard(reference: Sequence[float], candidate: Sequence[float],
                    tolerance: float = LOSS_TOLERANCE) -> tuple[bool, str]:
    """Do ``candidate``'s losses (same weights, same batches) track fp32's ``reference``?
    Every loss must be finite and the last one within ``tolerance`` (relative) of fp32's last."""
    if not all(np.isfinite(candidate)):
        return False, "non-finite loss"
    ref, got = float(reference[-1]), float(candidate[-1])
    gap = abs(got - ref) / max(abs(ref), 1e-6)
    if gap > tolerance:
        return False, f"loss {got:.4f} vs fp32 {ref:.4f} after {len(candidate)} steps ({gap:.0%} apart)"
    return True, f"loss {got:.4f} vs fp32 {ref:.4f}"
