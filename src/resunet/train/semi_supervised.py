"""Semi-supervised training with a mean teacher (Tarvainen & Valpola, 2017) on unlabelled images.

Each iteration (`MeanTeacher.step`), next to the labelled batch:

1. a batch of unlabelled patches is drawn uniformly (`PatchSampler` on image-only cases, no
   foreground oversampling without labels);
2. two views of every patch: ONE spatial transform (``augment``'s rotation / zoom / flips /
   elastic, drawn once) shared by both, then, for each view independently, ``augment``'s intensity
   transforms and Gaussian noise of ``view_noise`` x the patch's intensity std. Sharing the spatial
   transform keeps teacher and student voxel-aligned without inverting a resampling (an inverse
   warp would need interpolation and lose the borders that left the patch); the perturbation the
   student must be robust to is then intensity and noise, which is what the two views differ in.
   Spatial variety still comes from the shared transform, drawn anew for every patch;
3. the teacher (an exponential moving average of the student, eval mode, no gradient) predicts
   its view; the student's view goes through the SAME forward pass as the labelled batch
   (concatenated after it: one pass, so DDP and BatchNorm see one batch);
4. loss = supervised Dice + focal + ``w(t)`` x consistency(student, teacher), with
   ``w(t) = consistency_weight x sigmoid_rampup(t, rampup_fraction x all iterations)``;
5. after the optimiser step the teacher follows: ``teacher = d * teacher + (1 - d) * student``,
   ``d = min(ema_decay, 1 - 1 / (t + 1))`` (the teacher starts as the student and only averages
   once there is something to average); BatchNorm running statistics are averaged alike.

Validation and checkpoints use the STUDENT: ``final.pt`` / ``best.pt`` / ``last.pt`` hold its weights, so they are
ordinary ResUNet checkpoints that `resunet predict` and `load_model` use unchanged; the teacher
lives only in ``last.pt``'s training state (``training_state["semi_supervised"]``) to resume.

Exact resume: the unlabelled draws of iteration ``i`` of epoch ``e`` on rank ``r`` come from
generators seeded by ``(seed, e, r, i)`` only, so there is no RNG state to carry: a resumed run
draws what an uninterrupted one would, and the teacher weights are the only state. DDP: each rank
draws its own unlabelled patches (seeded with its rank); the teacher is updated on every rank from
the student the optimiser step has just synchronised, so its weights stay identical everywhere. The
student's BatchNorm running statistics are each rank's own after a forward pass (DDP broadcasts
rank 0's at the start of the next), so after the update the teacher's floating buffers are
broadcast from rank 0 (the rank whose student is saved).
"""

from __future__ import annotations

import copy
import math
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from resunet.data.augment import AugmentConfig, add_gaussian_noise, augment_batch
from resunet.data.datasets import UNLABELLED_FOLDER, DatasetInfo
from resunet.data.sampling import PatchSampler
from resunet.errors import ConfigError
from resunet.hardware import autocast
from resunet.train.config import SemiSupervisedConfig, StageConfig, TrainConfig
from resunet.train.distributed import DistInfo, broadcast_from_main
from resunet.train.precision import StepSettings
from resunet.train.stages import stage_for_epoch
from resunet.train.steps import train_step

__all__ = [
    "MeanTeacher",
    "consistency_loss",
    "ema_update",
    "global_iteration",
    "sigmoid_rampup",
    "unlabelled_summary",
    "view_configs",
]

#: keeps the unlabelled draws apart from the labelled sampler's ``(seed, epoch, rank)`` stream
_SALT = 7331
_SPATIAL = ("rotation", "scale", "flip", "elastic")
_INTENSITY = ("bias_field", "brightness", "contrast", "gamma", "noise", "rician_noise", "blur", "low_resolution")


def sigmoid_rampup(step: int, rampup_steps: float) -> float:
    """0 at ``step`` 0, 1 from ``rampup_steps`` on, sigmoid-shaped between: ``exp(-5 (1 - t)^2)``
    (Laine & Aila) with ``t = step / rampup_steps``, rescaled so it starts at exactly 0."""
    if rampup_steps <= 0:
        return 1.0
    t = min(1.0, max(0.0, step / rampup_steps))
    floor = math.exp(-5.0)
    return (math.exp(-5.0 * (1.0 - t) ** 2) - floor) / (1.0 - floor)


def _class_logits(logits: torch.Tensor) -> torch.Tensor:
    """``(B, K, *S)`` class logits; a binary model's one logit ``z`` becomes ``(0, z)`` (softmax of
    those is ``(1 - sigmoid(z), sigmoid(z))``)."""
    return torch.cat([torch.zeros_like(logits), logits], dim=1) if logits.shape[1] == 1 else logits


def consistency_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str = "mse") -> torch.Tensor:
    """Disagreement of two predictions, logits ``(B, K, *S)`` (``K = 1``: binary, sigmoid), as a
    scalar; 0 when they agree. ``mse``: squared difference of the class probabilities, summed over
    classes, mean over samples and voxels. ``kl``: ``KL(teacher || student)`` per voxel, mean.
    Gradients reach ``student`` only."""
    s, t = _class_logits(student.float()), _class_logits(teacher.detach().float())
    if kind == "mse":
        return (torch.softmax(s, dim=1) - torch.softmax(t, dim=1)).square().sum(dim=1).mean()
    if kind == "kl":
        log_t = torch.log_softmax(t, dim=1)
        return (log_t.exp() * (log_t - torch.log_softmax(s, dim=1))).sum(dim=1).mean()
    raise ConfigError(f"semi_supervised.consistency must be 'mse' or 'kl', got {kind!r}")


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, decay: float, step: int) -> float:
    """``teacher = d * teacher + (1 - d) * student`` for every parameter and floating buffer (BatchNorm
    running statistics), ``d = min(decay, 1 - 1 / (step + 1))``; integer buffers are copied. IN
    PLACE on ``teacher``; returns ``d``. ``step``: optimiser steps done before this one (0-based)."""
    d = min(float(decay), 1.0 - 1.0 / (step + 1))
    pairs = [*zip(teacher.parameters(), student.parameters()), *zip(teacher.buffers(), student.buffers())]
    for t, s in pairs:
        if t.dtype.is_floating_point:
            t.mul_(d).add_(s.detach().to(t.dtype), alpha=1.0 - d)
        else:
            t.copy_(s)
    return d


def view_configs(augment: AugmentConfig) -> tuple[AugmentConfig, AugmentConfig]:
    """``augment`` split in two: its spatial transforms only (shared by both views) and its
    intensity transforms only (drawn per view)."""
    spatial, intensity = augment.model_copy(deep=True), augment.model_copy(deep=True)
    for name in _INTENSITY:
        getattr(spatial, name).enabled = False
    for name in _SPATIAL:
        getattr(intensity, name).enabled = False
    return spatial, intensity


def global_iteration(stages: Sequence[StageConfig], epoch: int, iteration: int) -> int:
    """Optimiser steps before iteration ``iteration`` of ``epoch`` (0-based), over all stages."""
    return sum(stage_for_epoch(stages, e)[1].iterations_per_epoch for e in range(epoch)) + int(iteration)


def unlabelled_summary(info: DatasetInfo, method: str = "mean_teacher") -> str:
    """How many unlabelled cases ``info`` (from ``find_dataset(root, unlabelled=True)``) holds, and
    where from; `ConfigError` saying where to put them when there are none."""
    if not info.unlabelled:
        where = {
            "nnunet": f"{info.root}/{UNLABELLED_FOLDER}/ named like imagesTr/ (CASE_0000{info.file_ending}, ...), "
                      "or images in imagesTr/ without a file in labelsTr/",
            "msd": f"{info.root}/{UNLABELLED_FOLDER}/ (one .nii.gz per case, every channel in it), or "
                   "dataset.json 'training' entries with an 'image' and no 'label'",
            "images_masks": f"{info.root}/images/ without a mask of the same stem in masks/",
        }[info.layout]
        raise ConfigError(f"semi_supervised.enabled is set but dataset {info.root} holds no unlabelled image; put "
                          f"them in {where}, or set semi_supervised.enabled=false")
    parts = ", ".join(f"{n} from {k}" for k, n in info.unlabelled_sources.items() if n)
    how = "mean teacher" if method == "mean_teacher" else "pseudo-labels"
    return (f"semi-supervised ({how}): {len(info.unlabelled)} unlabelled case(s) ({parts}), "
            f"{len(info.training)} labelled")


def _seed(*key: int) -> int:
    return int(np.random.SeedSequence([int(k) for k in key]).generate_state(1, np.uint64)[0] >> 1)


class MeanTeacher:
    """The mean-teacher part of a run: teacher, unlabelled patch source, consistency term, state.

    ``config``: the run's `TrainConfig` (its ``semi_supervised``, ``augment``, ``stages``, ``seed``,
    ``data.context``); ``student``: the model (not its DDP wrapper); ``cases``: unlabelled cases
    (``.image`` ``(C, *spatial)``, ``.label`` None, e.g. cached; or ``(image, None)`` tuples);
    ``dist``: this process's place in DDP (its rank seeds its own unlabelled draws); ``settings``:
    the run's memory format (teacher and views; the precision comes with each `step`).
    """

    def __init__(self, config: TrainConfig, student: nn.Module, cases: Sequence[Any],
                 device: torch.device | str, dist: DistInfo = DistInfo(),
                 settings: StepSettings = StepSettings()) -> None:
        if not cases:
            raise ConfigError("semi_supervised.enabled needs unlabelled images (see semi_supervised.enabled in "
                              "docs/config.md for where they go)")
        self.config, self.cases, self.device, self.dist = config, list(cases), torch.device(device), dist
        self.rank = dist.rank
        self.format = settings
        self.teacher = settings.apply(copy.deepcopy(student)).eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.spatial, self.intensity = view_configs(config.augment)
        self._samplers: dict[tuple, PatchSampler] = {}

    @property
    def options(self) -> SemiSupervisedConfig:
        """The run's ``semi_supervised`` section."""
        return self.config.semi_supervised

    def weight(self, step: int) -> float:
        """The consistency weight at global step ``step`` (ramp over the current stages' iterations)."""
        total = sum(s.epochs * s.iterations_per_epoch for s in self.config.stages)
        return self.options.consistency_weight * sigmoid_rampup(step, self.options.rampup_fraction * total)

    def _sampler(self, stage: StageConfig) -> PatchSampler:
        batch = self.options.unlabelled_batch_size or stage.batch_size
        key = (tuple(stage.patch_size), batch)
        if key not in self._samplers:
            self._samplers[key] = PatchSampler(self.cases, stage.patch_size, batch, 0.0,
                                               context=self.config.data.context, seed=0)
        return self._samplers[key]

    def views(self, epoch: int, iteration: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(student view, teacher view)``, each ``(B', C', *patch)`` on the device, of the unlabelled
        patches of ``iteration`` of ``epoch`` (seeded by ``(seed, epoch, rank, iteration)`` only)."""
        key = (self.config.seed, epoch, self.rank, iteration, _SALT)
        sampler = self._sampler(stage_for_epoch(self.config.stages, epoch)[1])
        sampler.reseed(*key)
        generator = torch.Generator().manual_seed(_seed(*key))
        images, _ = sampler.sample()
        shared, _ = augment_batch(images.to(self.device), None, self.spatial, generator)
        out = []
        for _ in range(2):
            view, _ = augment_batch(shared, None, self.intensity, generator, modalities=sampler.modalities)
            if self.options.view_noise > 0:
                view = add_gaussian_noise(view, self.options.view_noise, relative=True, generator=generator)
            out.append(self.format.apply(view))
        return out[0], out[1]

    def consistency_term(self, teacher_view: torch.Tensor, step: int,
                         dtype: torch.dtype | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
        """The teacher's prediction of ``teacher_view`` (no gradient; autocast to ``dtype``, None:
        fp32) and the weighted consistency loss of the student's logits against it, as the
        ``extra_loss`` of `train_step`."""
        with torch.no_grad(), autocast(teacher_view.device, dtype):
            target = self.teacher(teacher_view).float()
        weight, kind = self.weight(step), self.options.consistency

        def term(student_logits: torch.Tensor) -> torch.Tensor:
            return weight * consistency_loss(student_logits, target, kind)

        return term

    def step(self, model: nn.Module, images: torch.Tensor, targets: torch.Tensor, loss_fn: nn.Module,
             optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, dtype: torch.dtype | None,
             frozen: Sequence[nn.Parameter], epoch: int, iteration: int) -> float:
        """One semi-supervised training step (module docstring): `train_step` on the labelled batch
        plus the unlabelled one, then the teacher update. ``model``: the student or its DDP wrapper;
        ``dtype``: the run's autocast dtype (None: fp32). Returns the total loss."""
        step = global_iteration(self.config.stages, epoch, iteration)
        student_view, teacher_view = self.views(epoch, iteration)
        loss = train_step(model, images, targets, loss_fn, optimizer, scaler, dtype, frozen,
                          extra_images=student_view, extra_loss=self.consistency_term(teacher_view, step, dtype))
        ema_update(self.teacher, getattr(model, "module", model), self.options.ema_decay, step)
        broadcast_from_main([b for b in self.teacher.buffers() if b.dtype.is_floating_point], self.dist)
        return loss

    def state_dict(self) -> dict[str, Any]:
        """What ``last.pt`` keeps to resume: the teacher's weights (the draws need no RNG state)."""
        return {"teacher": self.teacher.state_dict()}

    def load_state_dict(self, state: dict[str, Any] | None, source: str = "the checkpoint") -> None:
        if not state or "teacher" not in state:
            raise ConfigError(f"{source} holds no mean teacher: it was trained without semi_supervised; resume it "
                              "with semi_supervised.enabled=false or start a new run")
        self.teacher.load_state_dict(state["teacher"])
