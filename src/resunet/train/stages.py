"""Multi-stage plan and learning-rate schedule.

A run is a list of stages (e.g. 128 px / batch 16, then 256 px / batch 4) trained one after the
other on the same weights. The LR schedule runs over the iterations of ALL stages, times each
stage's ``lr_scale``, optionally in cycles that restart at given epochs (pseudo-labelling).
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

from resunet.train.config import ScheduleConfig, StageConfig


def stage_for_epoch(stages: Sequence[StageConfig], epoch: int) -> tuple[int, StageConfig]:
    """Index and config of the stage that trains ``epoch`` (0-based)."""
    end = 0
    for i, stage in enumerate(stages):
        end += stage.epochs
        if epoch < end:
            return i, stage
    raise ValueError(f"epoch {epoch} is past the last stage (total {end} epochs)")


def lr_factor(schedule: ScheduleConfig, stages: Sequence[StageConfig],
              restart_epochs: Sequence[int] = ()) -> Callable[[int], float]:
    """Multiplier of the base LR at global iteration ``it`` (for `torch.optim.lr_scheduler.LambdaLR`).

    The decay (and the warm-up) runs over the iterations of all stages; ``restart_epochs``
    (0-based) cut it into cycles: at the first iteration of each such epoch the schedule starts
    again (warm-up, then the decay over that cycle's iterations), so the weights before it have
    been trained to the end of a decay (pseudo-labelling labels with them)."""
    bounds = []  # (first iteration of the stage, lr_scale)
    epoch_starts = [0]  # first iteration of every epoch
    start = 0
    for stage in stages:
        bounds.append((start, stage.lr_scale))
        start += stage.epochs * stage.iterations_per_epoch
        epoch_starts += [epoch_starts[-1] + stage.iterations_per_epoch * (k + 1) for k in range(stage.epochs)]
    total = max(1, start)
    cycles = sorted({0, *(epoch_starts[e] for e in restart_epochs if 0 < e < len(epoch_starts) - 1)}) + [total]

    def factor(it: int) -> float:
        scale = next(s for first, s in reversed(bounds) if it >= first)
        first, end = next((a, b) for a, b in zip(cycles, cycles[1:]) if it < b or b == total)
        into = it - first
        if schedule.warmup_iterations and into < schedule.warmup_iterations:
            return scale * (into + 1) / schedule.warmup_iterations
        progress = min(1.0, into / max(1, end - first))
        if schedule.kind == "poly":
            base = (1.0 - progress) ** schedule.poly_exponent
        elif schedule.kind == "cosine":
            base = 0.5 * (1.0 + math.cos(math.pi * progress))
        else:
            base = 1.0
        return scale * max(base, 1e-3)

    return factor


def epochs_that_fit(total_epochs: int, epochs_done: int, elapsed_s: float, budget_s: float,
                    pace_s: float | None, tolerance: float = 0.05) -> int | None:
    """A smaller total number of epochs when the run, at ``pace_s`` seconds per epoch (measured
    on the epochs after the first, which carries one-off set-up: first plot, first save, warm-up),
    would overrun ``budget_s`` by more than ``tolerance``; None when it fits or no pace is known
    yet. At least one more epoch is kept; the schedule recomputed for the new total then ends at
    the last step inside the budget."""
    if pace_s is None or epochs_done >= total_epochs:
        return None
    projected = elapsed_s + (total_epochs - epochs_done) * pace_s
    if projected <= budget_s * (1 + tolerance):
        return None
    fit = int((budget_s - elapsed_s) / pace_s)
    return max(epochs_done + 1, epochs_done + fit)


def shrink_last_stages(stages: Sequence[StageConfig], total_epochs: int) -> None:
    """Cut epochs from the end (last stage first, IN PLACE) until the stages hold ``total_epochs``."""
    excess = sum(s.epochs for s in stages) - total_epochs
    for stage in reversed(stages):
        if excess <= 0:
            break
        cut = min(excess, stage.epochs - 1)
        stage.epochs -= cut
        excess -= cut
