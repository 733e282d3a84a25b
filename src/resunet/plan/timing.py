"""Timed training steps of candidate configurations on this machine, on the dataset's own batches.

The planner sizes a run from what one step costs HERE: `time_training` builds the candidate's
model, sampler and augmentation on the real preprocessed cases and times complete iterations
(batch sampling + augmentation + forward + loss + backward + optimiser step) exactly as the
trainer runs them (with the ``mean_teacher`` semi-supervised method, the mean-teacher step, the labelled cases
standing in for the unlabelled ones: the cost depends on the patch and batch sizes only). The
figure is the MEAN of ``repeats`` iterations after ``warmup`` ones: the augmentation's cost varies from batch to batch (a rotated 3-D batch costs a resampling an
unrotated one does not), and the fastest of a few was measured 25 % under the epochs' real pace
(3-D hippocampus: 0.32 s timed, 0.42 s per iteration in the epochs).

`planned_step_settings` chooses the precision and memory format once, on the cheapest
candidate's real batches, with the trainer's own rule (`resunet.train.precision`: fastest candidate
whose losses track fp32's, cached per machine); every candidate is then timed with that choice.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from resunet.data.sampling import PatchSampler
from resunet.train.config import TrainConfig
from resunet.train.precision import StepChoice, StepSettings, choose_step_settings

__all__ = ["StepTiming", "planned_step_settings", "time_training"]


@dataclass
class StepTiming:
    """Seconds per training iteration (batch + step) and the losses of the timed iterations."""

    seconds: float
    losses: list[float] = field(default_factory=list)
    settings: StepSettings = field(default_factory=StepSettings)


def _build(config: TrainConfig, in_channels: int, out_channels: int) -> torch.nn.Module:
    from resunet.train.trainer import make_model

    torch.manual_seed(config.seed)
    return make_model(config, in_channels, out_channels)


def _sampler(config: TrainConfig, cases: Sequence) -> PatchSampler:
    stage = config.stages[0]
    sampler = PatchSampler(list(cases), stage.patch_size, stage.batch_size, config.data.foreground_fraction,
                           context=config.data.context, seed=0)
    sampler.reseed(config.seed, 0, 0)
    return sampler


def time_training(
    config: TrainConfig,
    cases: Sequence,
    in_channels: int,
    out_channels: int,
    *,
    settings: StepSettings,
    repeats: int = 8,
    warmup: int = 1,
    device: torch.device | str = "cpu",
) -> StepTiming:
    """Time iterations of ``config``'s first stage on ``cases`` (cached, preprocessed) exactly as
    the trainer runs them: batches from `BatchLoader` (prefetching as `prefetch_for`
    says), steps in ``settings``' precision and memory format. Seconds between consecutive steps."""
    from resunet.train.loader import BatchLoader, prefetch_for
    from resunet.train.semi_supervised import MeanTeacher
    from resunet.train.steps import train_step
    from resunet.train.trainer import augment_generator, make_batch, make_loss, make_optimizer

    device = torch.device(device)
    model = settings.apply(_build(config, in_channels, out_channels).to(device))
    optimizer, loss_fn = make_optimizer(model, config), make_loss(config)
    scaler = torch.amp.GradScaler(device.type, enabled=settings.uses_scaler)
    sampler, generator = _sampler(config, cases), augment_generator(config.seed, 0)
    semi = (MeanTeacher(config, model, [(c.image, None) for c in cases], device, settings=settings)
            if config.semi_supervised.enabled and config.semi_supervised.method == "mean_teacher" else None)
    times, losses = [], []
    t0 = time.perf_counter()
    with BatchLoader(lambda: make_batch(sampler, config.augment, generator, device, settings),
                     warmup + repeats, prefetch_for(config.prefetch_batches, device)) as loader:
        for it, (images, targets) in enumerate(loader):
            if semi is None:
                losses.append(train_step(model, images, targets, loss_fn, optimizer, scaler, settings.dtype))
            else:
                losses.append(semi.step(model, images, targets, loss_fn, optimizer, scaler, settings.dtype, (), 0, it))
            now = time.perf_counter()
            times.append(now - t0)
            t0 = now
    return StepTiming(float(np.mean(times[warmup:])), losses, settings)


def planned_step_settings(config: TrainConfig, cases: Sequence, in_channels: int, out_channels: int,
                          device: torch.device | str = "cpu") -> StepChoice:
    """The precision and memory format for ``config`` on this machine (`choose_step_settings`
    on its real batches: timed, numerically guarded, cached)."""
    from resunet.train.trainer import augment_generator, make_batch, make_loss, make_optimizer

    device = torch.device(device)
    model = _build(config, in_channels, out_channels).to(device)

    def batches() -> list:
        sampler, generator = _sampler(config, cases), augment_generator(config.seed, 0)
        return [make_batch(sampler, config.augment, generator, device) for _ in range(5)]

    return choose_step_settings(model, batches, lambda m: make_optimizer(m, config), make_loss(config),
                                precision=config.precision, memory_format=config.memory_format)
