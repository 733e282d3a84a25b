"""The planner's rules: pure functions of the dataset fingerprint, the budget and measured speeds.

Each rule returns its choice and a `Choice` record with the reason, so `resunet plan` can print
why. `resunet.plan.planner.plan_dataset` calls them in order and times the candidate networks in
between. The rules learn from nnU-Net's published planners (median spacing, CT vs non-CT
normalisation, patch from the median shape, pooling while an axis stays >= 8, foreground
oversampling, its augmentation pipeline), and add what nnU-Net ignores: the time budget and the
speed of this machine.

=====================  =========================================================================
choice                 rule
=====================  =========================================================================
target spacing         median spacing per axis (3-D: the coarse axis of anisotropic data keeps
                       its median too); in-plane spacing coarsened when the median image is wider
                       than `max_side(minutes)` pixels (256 px up to 30 min; more with more time)
reorient               3-D: yes (array axes to one world convention; predict does the same)
crop to non-zero       3-D: yes; 2-D pictures: no (black pixels are content)
normalisation          CT: clip to the foreground 0.5 / 99.5 percentiles, then one dataset-wide
                       mean / sd (nnU-Net's CT scheme); MR and microscopy: per-case z-score over
                       the non-zero voxels, unless the cases share one intensity scale (their
                       foreground means differ by < 10 %: one scanner / calibrated), then one
                       dataset-wide mean / sd; RGB / 8-bit pictures: dataset-wide mean / sd per channel
mode                   2-D data: 2-D. 3-D data: 2.5-D (3 slices in) when the spacing is
                       anisotropic (max / min >= 3) or a 3-D step leaves fewer than
                       `MIN_STEPS_3D` steps in the budget; else 3-D
patch                  2-D / 2.5-D: the median in-plane shape, at most `max_patch_side(minutes)`
                       per axis; 3-D: the median shape, scaled down to at most `MAX_3D_VOXELS`;
                       rounded up to a multiple of the network's divisor
depth                  1 + the number of 2x poolings while the smallest patch axis stays >= 8
                       before pooling (bottleneck >= 4 px, as nnU-Net), between 3 and 5
batch                  2-D: `PIXELS_PER_BATCH_2D` / patch pixels, clamped to [8, 32] (BatchNorm
                       needs >= 8); 3-D: `VOXELS_PER_BATCH_3D` / patch voxels, clamped to [4, 8]
                       (nnU-Net's 2 suits its instance norm; our BatchNorm needs more samples)
width                  the widest of base 32 / 16 / 8 whose timed step still leaves `MIN_STEPS`
                       steps in the budget (training steps buy more Dice than width on a CPU
                       budget: the demo gained +0.005 from 560 to 1120 steps)
precision, memory      the fastest of fp32 / bf16 (native only) x contiguous / channels-last whose
format                 losses track fp32's, timed on the cheapest candidate
                       (`resunet.train.precision.choose_step_settings`, cached per machine)
loss                   Dice + cross-entropy (nnU-Net's; +0.002 over Dice + focal in the demo)
optimiser / schedule   AdamW, LR 3e-3, warm-up 2 % of the steps, poly decay to 0 at the last step
epochs x iterations    as many steps as fit in the budget left after fingerprint, cache, timing
                       and the planned validations, from the measured step time (the whole
                       schedule fits the budget); epochs of up to 50 iterations
validation             10 % of the cases (2..10 cases) when there are >= 10, about 5 validations
                       per run; fewer cases: all train (the last weights are the model).
                       ``--folds K``: each of K models validates on 1/K of the cases and gets 1/K
                       of the training time (epochs x iterations sized for that share)
foreground sampling    0.5 of the patches centred on a labelled voxel when the smallest class
                       covers < 1 % of the voxels, else 0.33 (nnU-Net)
augmentation           rotation, per-axis zoom, flips, gamma, brightness / contrast, noise, blur
                       and low-resolution simulation (nnU-Net's rates); MR adds a bias field (no
                       Rician noise: it folds z-scored intensities); fewer than 20 training cases:
                       +-20 instead of +-15 degrees; data on one intensity scale: no brightness /
                       contrast, mild gamma (they would teach the net to ignore absolute intensity)
=====================  =========================================================================
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from resunet.errors import InputError
from resunet.plan.fingerprint import DatasetFingerprint

__all__ = [
    "Choice",
    "MIN_STEPS",
    "MIN_STEPS_3D",
    "geometry_candidates",
    "network_depth",
    "plan_augmentation",
    "plan_preprocessing",
    "plan_schedule",
    "plan_validation",
    "round_patch",
]

MIN_STEPS = 1000
MIN_STEPS_3D = 1500
PIXELS_PER_BATCH_2D = 2**18
VOXELS_PER_BATCH_3D = 2**18
MAX_3D_VOXELS = 64**3
ANISOTROPY_FOR_2D = 3.0
WIDTHS = (32, 16, 8)
#: coefficient of variation of the per-case foreground means below which non-CT cases are taken to
#: share one intensity scale (measured: MNI slabs of one scan 4.5 %, MSD hippocampus MR 268 %)
ONE_SCALE_SPREAD = 0.10
ONE_SCALE = "fixed (one scale)"
ITERATIONS_PER_EPOCH = 50


@dataclass(frozen=True)
class Choice:
    """One planner decision: the config key it sets, the value, and why."""

    key: str
    value: Any
    reason: str


def max_side(minutes: float) -> int:
    """Largest in-plane image side (pixels) trained at full resolution within ``minutes``."""
    return 256 if minutes <= 30 else 384 if minutes <= 120 else 512


def max_patch_side(minutes: float) -> int:
    """Largest 2-D patch side for a budget of ``minutes`` (a step's cost grows with its pixels)."""
    return 128 if minutes <= 15 else 192 if minutes <= 60 else 256


def network_depth(patch: Sequence[float], max_depth: int = 5, min_depth: int = 3) -> int:
    """Levels of the U-Net for ``patch``: 1 + poolings while the smallest axis is >= 8."""
    side, poolings = float(min(patch)), 0
    while side >= 8 and poolings + 1 < max_depth:
        side /= 2
        poolings += 1
    return int(min(max_depth, max(min_depth, poolings + 1)))


def round_patch(shape: Sequence[float], depth: int) -> list[int]:
    """``shape`` rounded up to multiples of the divisor ``2 ** (depth - 1)``."""
    div = 2 ** (depth - 1)
    return [int(max(div, math.ceil(s / div) * div)) for s in shape]


# ---------------------------------------------------------------------------------- preprocessing


def _case_spread(means: Sequence[float]) -> float:
    """Coefficient of variation of the per-case means (inf when their mean is ~0)."""
    m = np.asarray(means, dtype=np.float64)
    centre = abs(float(m.mean()))
    return float(m.std() / centre) if centre > 1e-12 else float("inf")


def plan_slice_axis(fp: DatasetFingerprint) -> tuple[int, Choice | None]:
    """3-D data: the canonical axis (0 z, 1 y, 2 x) moved first, which a 2-D / 2.5-D network
    slices along (`PreprocessConfig.slice_axis`): the one-slice axis of files holding a single
    slice; else the coarsest axis of anisotropic data (max / min spacing >= `ANISOTROPY_FOR_2D`:
    a sagittally acquired scan is sliced sagittally, so each slice is an acquired, sharp image);
    else 0 (axial)."""
    if fp.spatial_ndim != 3:
        return 0, None
    singleton = [t for t in range(3) if all(c.shape[t] == 1 for c in fp.cases)]
    names = ("z (axial)", "y (coronal)", "x (sagittal)")
    if singleton:
        axis = singleton[0]
        return axis, Choice("data.preprocess.slice_axis", axis, f"the files hold one slice along {names[axis]}")
    spacing = fp.median_spacing
    if max(spacing) / min(spacing) < ANISOTROPY_FOR_2D:
        return 0, None
    axis = int(np.argmax(spacing))
    return axis, Choice("data.preprocess.slice_axis", axis,
                        f"the coarsest axis, {names[axis]} ({spacing[axis]:.3g} mm vs {min(spacing):.3g} mm): "
                        "2-D slices are the acquired planes")


def plan_preprocessing(fp: DatasetFingerprint, minutes: float) -> tuple[dict[str, Any], list[Choice]]:
    """Target spacing, orientation, cropping and normalisation (a `PreprocessConfig` dict)."""
    n = fp.spatial_ndim
    choices: list[Choice] = []
    spacing = list(fp.median_spacing)
    spacings = np.array([c.spacing for c in fp.cases])
    mixed = bool(np.ptp(spacings, axis=0).max() > 1e-3 * max(spacing))
    reason = "median spacing of the cases" + (" (the cases differ; each is resampled to it)" if mixed else "")
    shape = fp.median_shape_at(tuple(spacing))
    limit = max_side(minutes)
    inplane = shape[-2:]
    if max(inplane) > limit:
        factor = max(inplane) / limit
        spacing = [*spacing[:-2], *(s * factor for s in spacing[-2:])]
        reason += (f"; in-plane coarsened {factor:.2f}x so the median image ({int(inplane[0])} x "
                   f"{int(inplane[1])} px) is at most {limit} px wide within {minutes:g} min "
                   "(predictions are mapped back to every input's own grid)")
    spacing = [float(f"{s:.4g}") for s in spacing]
    choices.append(Choice("data.preprocess.target_spacing", spacing, reason))
    pre: dict[str, Any] = {"target_spacing": spacing, "reorient": n == 3, "crop_to_nonzero": n == 3}
    n_classes = len(fp.classes)
    if n_classes > 8:  # linear label resampling interpolates one channel per class
        pre["label_resampling"] = "nearest"
        choices.append(Choice("data.preprocess.label_resampling", "nearest",
                              f"{n_classes} classes: one-hot linear resampling would cost one pass per class"))
    if n == 3:
        orientations = sorted({c.orientation for c in fp.cases})
        choices.append(Choice("data.preprocess.reorient", True,
                              f"array axes to one world convention (cases are {', '.join(orientations)})"))

    modalities = fp.modalities
    first = modalities[0]
    if any(m != first for m in modalities):
        first = "mixed"
    if first == "ct":
        ch = fp.channels
        low = [c.p00_5 for c in ch]
        high = [c.p99_5 for c in ch]
        pre.update(modality="ct", normalization="fixed", intensity_clip=(min(low), max(high)),
                   intensity_mean=[c.mean for c in ch], intensity_std=[max(c.sd, 1e-3) for c in ch])
        choices.append(Choice("data.preprocess.normalization", "fixed + clip",
                              f"CT: clip to the foreground 0.5 / 99.5 percentiles ({min(low):.0f}, "
                              f"{max(high):.0f}) HU, then the dataset-wide foreground mean / sd"))
    elif first in ("rgb", "picture") and all(c.integer_valued and c.max <= 255 for c in fp.channels):
        pre.update(modality="none", normalization="fixed",
                   intensity_mean=[c.mean for c in fp.channels],
                   intensity_std=[max(c.sd, 1e-3) for c in fp.channels])
        choices.append(Choice("data.preprocess.normalization", "fixed per channel",
                              "8-bit pictures: one dataset-wide mean / sd per channel"))
    else:
        what = {"mr": "MR", "microscopy": "microscopy", "picture": "pictures", "mixed": "mixed channels"}.get(first, first)
        spread = max(_case_spread(c.case_means) for c in fp.channels)
        modality = "mr" if first == "mr" else "none"
        if fp.num_cases >= 2 and spread < ONE_SCALE_SPREAD:
            pre.update(modality=modality, normalization="fixed",
                       intensity_mean=[c.mean for c in fp.channels],
                       intensity_std=[max(c.sd, 1e-6) for c in fp.channels])
            choices.append(Choice("data.preprocess.normalization", ONE_SCALE,
                                  f"{what} on one intensity scale: the cases' foreground means differ by "
                                  f"{spread:.1%} (< {ONE_SCALE_SPREAD:.0%}), so one dataset-wide mean / sd keeps "
                                  "absolute intensities (a per-case z-score would shift each case by its content)"))
        else:
            pre.update(modality=modality, normalization="zscore", zscore_mask="nonzero")
            why = (f"the cases' foreground means differ by {spread:.0%}" if fp.num_cases >= 2 else "one case")
            choices.append(Choice("data.preprocess.normalization", "zscore",
                                  f"{what}: intensities in arbitrary units ({why}), per-case z-score over the "
                                  "non-zero voxels"))
    return pre, choices


# ---------------------------------------------------------------------------------- geometry


def geometry_candidates(
    fp: DatasetFingerprint, spacing: Sequence[float], minutes: float
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], str]:
    """Candidate (mode, context, patch, depth, batch, base) settings, most expensive first.

    Returns ``(candidates_3d, candidates_2d, reason)``: the 3-D list is empty when the rules
    exclude 3-D outright (2-D data, anisotropic spacing); the planner times the 3-D ones first
    and falls back to the 2-D ones when they leave too few steps.
    """
    shape = fp.median_shape_at(tuple(spacing))
    two_d: list[dict[str, Any]] = []
    side = max_patch_side(minutes)
    inplane = [min(float(s), side) for s in shape[-2:]]
    depth = network_depth(inplane)
    patch = [min(p, side) for p in round_patch(inplane, depth)]
    batch = int(np.clip(PIXELS_PER_BATCH_2D // int(np.prod(patch)), 8, 32))
    context = 0 if fp.is_flat else 1
    for base in WIDTHS:
        two_d.append({"mode": "2d", "context": context, "patch_size": patch, "depth": depth,
                      "batch_size": batch, "base_channels": base})
    if fp.is_flat:
        return [], two_d, "2-D images"
    anisotropy = max(spacing) / min(spacing)
    if anisotropy >= ANISOTROPY_FOR_2D:
        return [], two_d, f"anisotropic spacing ({anisotropy:.1f}x): 2.5-D slices along the coarsest axis"
    voxels = float(np.prod(shape))
    scale = min(1.0, (MAX_3D_VOXELS / voxels) ** (1 / 3))
    target = [s * scale for s in shape]
    depth3 = network_depth(target, max_depth=5)
    patch3 = round_patch(target, depth3)
    batch3 = int(np.clip(VOXELS_PER_BATCH_3D // int(np.prod(patch3)), 4, 8))
    three_d = [{"mode": "3d", "context": 0, "patch_size": patch3, "depth": depth3,
                "batch_size": batch3, "base_channels": base} for base in (16, 8)]
    return three_d, two_d, "isotropic enough for 3-D"


# ---------------------------------------------------------------------------------- schedule


def plan_schedule(step_seconds: float, budget_seconds: float, minutes: float,
                  folds: int = 1) -> tuple[int, int, Choice]:
    """``(epochs, iterations_per_epoch)`` that fit ``budget_seconds`` (one model's share: ``folds``
    models share ``minutes``) at ``step_seconds`` each.

    Raises `InputError` saying how many minutes are needed when not even 5 epochs of 10
    iterations fit."""
    steps = int(budget_seconds / step_seconds)
    if steps < 50:
        need = (folds * 50 * step_seconds + max(0.0, minutes * 60 - folds * budget_seconds)) / 60
        each = f" ({folds} folds, one model each)" if folds > 1 else ""
        raise InputError(
            f"a budget of {minutes:g} min{each} leaves time for {max(steps, 0)} training steps of "
            f"{step_seconds:.2f} s per model here; the smallest plan needs 50 steps: give at least "
            f"--minutes {math.ceil(need * 1.2)}" + (" or fewer --folds" if folds > 1 else "")
        )
    per_epoch = int(min(ITERATIONS_PER_EPOCH, max(10, steps // 20)))
    epochs = max(1, steps // per_epoch)
    return epochs, per_epoch, Choice(
        "stages.0.epochs", f"{epochs} x {per_epoch}",
        f"{epochs * per_epoch} steps of {step_seconds:.3f} s (measured here) fill the "
        f"{budget_seconds / 60:.1f} min left for training; the LR reaches 0 at the last step")


def plan_validation(num_cases: int, folds: int = 1) -> tuple[float, Choice]:
    """Fraction of the cases kept for validation (0 with fewer than 10 cases); with ``folds`` K > 1
    each fold validates on 1/K of them (`resunet.train.folds`)."""
    if folds > 1:
        if folds > num_cases:
            raise InputError(f"{folds} folds need at least {folds} labelled cases, the dataset has {num_cases}; "
                             f"use --folds {num_cases} or fewer" if num_cases >= 2 else
                             "cross-validation needs at least 2 labelled cases; drop --folds")
        return 1.0 / folds, Choice("folds", folds, f"{folds}-fold cross-validation: each fold validates on 1/{folds} "
                                   f"of the {num_cases} cases and trains 1/{folds} of the time; predict ensembles them")
    if num_cases < 10:
        return 0.0, Choice("data.val_fraction", 0.0,
                           f"{num_cases} case(s): all train; the last weights (LR 0) are the model")
    n_val = int(np.clip(round(0.1 * num_cases), 2, 10))
    return n_val / num_cases, Choice("data.val_fraction", round(n_val / num_cases, 4),
                                     f"{n_val} of {num_cases} cases validate (10 %, 2..10)")


def plan_foreground_fraction(fp: DatasetFingerprint) -> tuple[float, Choice]:
    present = [c for c in fp.classes if c.cases_present]
    smallest = min((c.voxel_fraction for c in present), default=0.0)
    if smallest < 0.01:
        return 0.5, Choice("data.foreground_fraction", 0.5,
                           f"the smallest class covers {smallest:.2%} of the voxels: half the patches on labels")
    return 0.33, Choice("data.foreground_fraction", 0.33, f"classes cover >= {smallest:.1%} of the voxels (nnU-Net's 0.33)")


# ---------------------------------------------------------------------------------- augmentation


def plan_augmentation(fp: DatasetFingerprint, mode: str, num_training: int,
                      one_scale: bool = False) -> tuple[dict[str, Any], Choice]:
    """An `AugmentConfig` dict: nnU-Net's pipeline in our transforms, scaled by the data size.

    ``one_scale``: the intensities were normalised with dataset-wide statistics because the
    cases share one scale; global brightness / contrast changes would then teach the network to
    ignore the absolute intensities that normalisation kept, so they are off and gamma is mild.
    Blur and low-resolution simulation run at nnU-Net's effective rates (its p 0.2 / 0.25 per
    sample times 0.5 per channel)."""
    few = num_training < 20
    degrees = 20.0 if few else 15.0
    mr = "mr" in fp.modalities
    aug: dict[str, Any] = {
        "rotation": {"enabled": True, "p": 0.2, "degrees": (-degrees, degrees)},
        "scale": {"enabled": True, "p": 0.2, "zoom": (0.85, 1.25), "per_axis": True},
        "flip": {"enabled": True, "p": 0.5},
        "brightness": {"enabled": not one_scale, "p": 0.15, "factor": (0.75, 1.25)},
        "contrast": {"enabled": not one_scale, "p": 0.15, "factor": (0.75, 1.25)},
        "gamma": {"enabled": True, "p": 0.2 if one_scale else 0.3,
                  "gamma": (0.9, 1.1) if one_scale else (0.8, 1.25)},
        "noise": {"enabled": True, "p": 0.15, "sigma": (0.0, 0.1)},
        "blur": {"enabled": True, "p": 0.1, "sigma": (0.5, 1.0)},
        "low_resolution": {"enabled": True, "p": 0.125, "zoom": (0.5, 1.0)},
        # applied to the intensities (relative to the background): +-2..10 %. Measured on the demo
        # (benchmarks/RESULTS.md): +-5..20 % gave clean 0.947 / corrupted 0.935 / re-acquired 0.909,
        # +-2..10 % gave 0.966 / 0.927 / 0.917 -- a stronger field buys robustness with clean Dice
        "bias_field": {"enabled": mr, "p": 0.3, "amplitude": (0.02, 0.1)},
        # no Rician noise: it models magnitude images (>= 0) and would fold the negative half of
        # z-scored intensities over; Gaussian noise covers the noise floor after normalisation
        "rician_noise": {"enabled": False},
    }
    parts = [f"rotation +-{degrees:g} ({'fewer than 20' if few else num_training} training cases) and per-axis "
             "zoom at p 0.2, flips, noise, blur and low-resolution simulation (scans acquired coarser than training)"]
    if mr:
        parts.append("MR: a bias field")
    parts.append("one intensity scale: no brightness / contrast, mild gamma" if one_scale
                 else "brightness, contrast, gamma")
    return aug, Choice("augment", "nnU-Net-like", "; ".join(parts))
