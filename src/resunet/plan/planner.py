"""`plan_dataset`: dataset folder + time budget -> a complete `TrainConfig`, with every choice explained.

Order: find and check the dataset -> fingerprint (cached) -> preprocessing rules -> build the
preprocessed cache (training needs it anyway) -> time real training steps of the candidate
networks on the cached cases (fp32 and bf16 on the first) -> keep the first candidate that
leaves enough steps -> epochs x iterations from what is left of the budget. The rules are in
`resunet.plan.rules`; this module only measures and assembles.

The budget covers the whole `resunet train DATASET --minutes N` command: the time spent
fingerprinting, caching and timing (measured from ``started``) comes off the training time.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from rich.console import Console
from rich.table import Table

from resunet.data.cache import build_cache
from resunet.data.datasets import DatasetInfo, find_dataset, read_label, validate_dataset
from resunet.data.preprocess import PreprocessConfig
from resunet.errors import InputError
from resunet.plan import rules
from resunet.plan.fingerprint import DatasetFingerprint, fingerprint_dataset
from resunet.plan.rules import Choice
from resunet.plan.timing import choose_precision, time_training
from resunet.train.config import TrainConfig, config_from_dict, dump_config

__all__ = ["DEFAULT_MINUTES", "Plan", "plan_dataset"]

DEFAULT_MINUTES = 10.0
#: share of the training budget kept free for the end-of-epoch saves and what the plan cannot see
SAFETY = 0.04
#: a candidate's step is estimated as (anchor step) x (MAC ratio) / OPTIMISM before timing it.
#: Measured (2-D 128^2, batch 16, bf16): base 32 has 16x base 8's MACs and took 5.4x its time,
#: i.e. 3x the MACs per second; OPTIMISM 6 keeps the estimate below any real step seen
OPTIMISM = 6.0
#: the loop around the timed steps (progress bar, schedule, per-epoch checkpoint) costs about this much
LOOP_OVERHEAD = 1.05
console = Console(stderr=True)


@dataclass
class Plan:
    """A planned run: the config `fit` takes, the reasons, the fingerprint it came from."""

    config: TrainConfig
    choices: list[Choice]
    fingerprint: DatasetFingerprint
    seconds_planning: float = 0.0
    timings: list[dict[str, Any]] = field(default_factory=list)

    def table(self) -> Table:
        table = Table(title=f"Plan for {self.fingerprint.root} ({self.fingerprint.num_cases} labelled cases)")
        table.add_column("setting")
        table.add_column("value", overflow="fold")
        table.add_column("why", overflow="fold")
        for c in self.choices:
            table.add_row(c.key, _show(c.value), c.reason)
        return table

    def to_yaml(self) -> str:
        """The config as YAML (`resunet train --config` reads it back); reasons in ``plan``."""
        return dump_config(self.config)


def _show(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return " x ".join(_show(v) for v in value)
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _label_layout(info: DatasetInfo, fp: DatasetFingerprint) -> int:
    """Output channels (`label_layout`'s check of the label values), and every class somewhere."""
    from resunet.train.trainer import label_layout

    out_channels = label_layout(info)[1]
    missing = [c.name for c in fp.classes if c.cases_present == 0]
    if missing:
        raise InputError(
            f"{info.root}: class(es) {missing} appear in no training label map; remove them from "
            "dataset.json's labels (and renumber) or add cases that contain them"
        )
    return out_channels


def _check_images(fp: DatasetFingerprint, info: DatasetInfo) -> None:
    expected = info.num_channels
    for c in fp.cases:
        if info.layout == "nnunet" and c.num_channels != expected:
            raise InputError(
                f"{info.root}: case {c.case_id} has {c.num_channels} channels per file; nnU-Net layout "
                "images hold one channel each (split a 4-D image into _0000, _0001, ... files)"
            )


def plan_dataset(
    dataset: Path | str,
    minutes: float = DEFAULT_MINUTES,
    *,
    output_dir: Path | str | None = None,
    cache_dir: Path | str | None = None,
    started: float | None = None,
    device: str = "cpu",
    seed: int = 0,
    progress: bool = True,
) -> Plan:
    """Plan a training run on ``dataset`` that fits ``minutes`` (the whole command, from
    ``started``, a `time.perf_counter` value; default now) on this machine."""
    from resunet.train.trainer import default_cache_dir

    t0 = time.perf_counter() if started is None else started
    if not minutes > 0:
        raise InputError(f"the budget must be positive minutes, got {minutes}")
    info = find_dataset(dataset)
    validate_dataset(info)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    fp = fingerprint_dataset(info, cache, progress=progress)
    _check_images(fp, info)
    out_channels = _label_layout(info, fp)

    choices: list[Choice] = []
    preprocess, why = rules.plan_preprocessing(fp, minutes)
    choices += why
    val_fraction, why = rules.plan_validation(fp.num_cases)
    choices.append(why)
    foreground, why = rules.plan_foreground_fraction(fp)
    choices.append(why)
    n_train = fp.num_cases - int(round(fp.num_cases * val_fraction))

    tree: dict[str, Any] = {
        "data": {"dataset": str(info.root), "cache_dir": str(cache), "val_fraction": val_fraction,
                 "preprocess": preprocess, "foreground_fraction": foreground},
        "loss": {"dice_weight": 1.0, "focal_weight": 1.0, "alpha": None, "gamma": 0.0, "batch_dice": True},
        "optimizer": {"name": "adamw", "lr": 3e-3, "weight_decay": 1e-4},
        "schedule": {"kind": "poly", "warmup_iterations": 0},
        "seed": seed, "device": device,
        "output_dir": str(output_dir or Path("runs") / Path(info.root).name),
    }
    choices.append(Choice("loss", "Dice + CE", "nnU-Net's loss; +0.002 Dice over Dice + focal in the demo"))

    # the cache: built now with the planned preprocessing (training reuses it)
    index = build_cache(info.training, PreprocessConfig.model_validate(preprocess), cache,
                        label_reader=lambda p: read_label(p, info), progress=progress)
    cases = [index.load(c.case_id) for c in info.training if c.label is not None]
    in_channels = int(cases[0].image.shape[0])

    three_d, two_d, mode_reason = rules.geometry_candidates(fp, preprocess["target_spacing"], minutes)
    timings: list[dict[str, Any]] = []
    precision = None
    chosen = None
    budget = minutes * 60.0

    def measure(candidate: dict[str, Any]) -> float:
        nonlocal precision
        config = _candidate_config(tree, candidate, fp, n_train, amp=False, epochs=1)
        channels = in_channels * (2 * candidate["context"] + 1)
        if precision is None:
            precision = choose_precision(config, cases, channels, out_channels, device=device)
            seconds = precision.bf16_seconds if precision.amp else precision.fp32_seconds
        else:
            config.amp = precision.amp
            seconds = time_training(config, cases, channels, out_channels, amp=precision.amp,
                                    device=device).seconds
        timings.append({**candidate, "seconds_per_step": round(seconds, 4), "amp": precision.amp})
        return seconds

    def steps_left(seconds: float) -> float:
        left = budget * (1 - SAFETY) - (time.perf_counter() - t0)
        return left / seconds

    # The cheapest 2-D candidate is timed first (it also decides the precision). Every other
    # candidate gets an optimistic estimate from it (MAC ratio / OPTIMISM: wider and 3-D
    # convolutions use the cores better per MAC) and is timed only when even that estimate would
    # leave enough steps. 3-D: narrowest first, wider while they fit; 2-D: widest first.
    anchor = two_d[-1]
    t_anchor = measure(anchor)
    macs_anchor = _macs(anchor, in_channels, out_channels)

    def estimate(c: dict[str, Any]) -> float:
        return t_anchor * _macs(c, in_channels, out_channels) / macs_anchor / OPTIMISM

    for candidate in sorted(three_d, key=lambda c: c["base_channels"]):
        guess = estimate(candidate)
        if steps_left(guess) < rules.MIN_STEPS_3D:
            timings.append({**candidate, "estimated_seconds_per_step": round(guess, 4)})
            break
        seconds = measure(candidate)
        if steps_left(seconds) < rules.MIN_STEPS_3D:
            break
        chosen = (candidate, seconds, rules.MIN_STEPS_3D)
    if chosen is None:
        for candidate in two_d:
            if candidate is anchor:
                seconds = t_anchor
            elif steps_left(estimate(candidate)) < rules.MIN_STEPS:
                timings.append({**candidate, "estimated_seconds_per_step": round(estimate(candidate), 4)})
                continue
            else:
                seconds = measure(candidate)
            if steps_left(seconds) >= rules.MIN_STEPS:
                chosen = (candidate, seconds, rules.MIN_STEPS)
                break
    if chosen is None:  # nothing leaves the minimum: the cheapest 2-D candidate, as many steps as fit
        chosen = (anchor, t_anchor, 0)
    candidate, seconds, minimum = chosen
    mode_text = {"2d": "2-D" if fp.is_flat else "2.5-D (3 slices in)", "3d": "3-D"}[candidate["mode"]]
    if candidate["mode"] == "2d" and three_d:
        t3 = next(t for t in timings if t["mode"] == "3d")
        how = (f"{t3['seconds_per_step']:.2f} s timed" if "seconds_per_step" in t3 else
               f">= {t3['estimated_seconds_per_step']:.2f} s estimated from the 2-D step and the MACs")
        mode_reason = (f"3-D steps ({how}) leave fewer than {rules.MIN_STEPS_3D} steps in {minutes:g} min; "
                       "2.5-D slices along the first axis")
    choices.append(Choice("data.mode", mode_text, mode_reason))
    choices.append(Choice("stages.0.patch_size", candidate["patch_size"],
                          "median image shape at the target spacing" + (
                              f", at most {rules.max_patch_side(minutes)} px per side in {minutes:g} min"
                              if candidate["mode"] == "2d" else f", at most {rules.MAX_3D_VOXELS} voxels")
                          + f", a multiple of {2 ** (candidate['depth'] - 1)}"))
    choices.append(Choice("model.depth", candidate["depth"], "poolings while the smallest patch axis stays >= 8"))
    choices.append(Choice("stages.0.batch_size", candidate["batch_size"],
                          "a fixed number of pixels per step, at least 8 slices (BatchNorm)" if candidate["mode"] == "2d"
                          else "a fixed number of voxels per step, at least 2 patches"))
    tried = ", ".join(f"{t['mode']} base {t['base_channels']}: " + (
        f"{t['seconds_per_step']:.3f} s" if "seconds_per_step" in t else f">= {t['estimated_seconds_per_step']:.3f} s est.")
        for t in timings)
    choices.append(Choice("model.base_channels", candidate["base_channels"],
                          (f"widest whose step leaves >= {minimum} steps" if minimum else
                           "no candidate leaves the minimum steps: the cheapest") + f" (timed here: {tried})"))
    choices.append(Choice("amp", "bf16" if precision.amp else "fp32", precision.reason))

    # what is left of the budget: validations and the safety margin come off
    val_cases = int(round(fp.num_cases * val_fraction))
    validation_s = _validation_seconds(fp, val_cases, candidate, seconds, preprocess["target_spacing"])
    left = budget * (1 - SAFETY) - (time.perf_counter() - t0)
    n_validations = 5 if val_cases else 0
    epochs, per_epoch, why = rules.plan_schedule(seconds * LOOP_OVERHEAD, left - n_validations * validation_s, minutes)
    choices.append(why)
    val_interval = max(1, epochs // 5) if val_cases else 1
    if val_cases:
        choices.append(Choice("val_interval", val_interval,
                              f"every {val_interval} epochs (~{validation_s:.0f} s per validation of {val_cases} cases)"))
    augment, why = rules.plan_augmentation(fp, candidate["mode"], n_train,
                                           one_scale=any(c.value == rules.ONE_SCALE for c in choices))
    choices.append(why)
    tree["augment"] = augment
    warmup = max(10, int(0.02 * epochs * per_epoch))
    tree["schedule"]["warmup_iterations"] = warmup
    config = _candidate_config(tree, candidate, fp, n_train, amp=precision.amp, epochs=epochs,
                               per_epoch=per_epoch, val_interval=val_interval)
    config.max_minutes = round(max(0.1, (budget - (time.perf_counter() - t0)) / 60.0), 3)
    planning = time.perf_counter() - t0
    config.plan = {
        "minutes": minutes,
        "planning_seconds": round(planning, 1),
        "choices": [{"key": c.key, "value": _show(c.value), "reason": c.reason} for c in choices],
        "timings": timings,
        "fingerprint": summarize_fingerprint(fp),
    }
    return Plan(config, choices, fp, planning, timings)


def summarize_fingerprint(fp: DatasetFingerprint) -> dict[str, Any]:
    """The fingerprint in a few lines (the plan record; the full one is ``fingerprint.json``)."""
    return {
        "cases": fp.num_cases, "spatial_ndim": fp.spatial_ndim,
        "median_spacing": [round(s, 4) for s in fp.median_spacing],
        "median_shape": [round(s, 1) for s in fp.median_shape],
        "orientations": sorted({c.orientation for c in fp.cases}),
        "channels": [{"name": c.name, "modality": c.modality, "mean": round(c.mean, 4), "sd": round(c.sd, 4),
                      "p00_5": round(c.p00_5, 4), "p99_5": round(c.p99_5, 4)} for c in fp.channels],
        "classes": [{"name": c.name, "voxel_fraction": round(c.voxel_fraction, 6), "cases": c.cases_present,
                     "median_components": c.median_components} for c in fp.classes],
    }


def _macs(candidate: dict[str, Any], in_channels: int, out_channels: int) -> float:
    """Convolution MACs of one training batch of ``candidate`` (forward pass)."""
    from resunet.nets import build_model, count_macs

    dims = 2 if candidate["mode"] == "2d" else 3
    channels = in_channels * (2 * candidate["context"] + 1)
    net = build_model("resunet", spatial_dims=dims, in_channels=channels, out_channels=out_channels,
                      base_channels=candidate["base_channels"], depth=candidate["depth"])
    return float(count_macs(net, (1, channels, *candidate["patch_size"]))) * candidate["batch_size"]


def _candidate_config(tree: dict[str, Any], candidate: dict[str, Any], fp: DatasetFingerprint, n_train: int,
                      *, amp: bool, epochs: int, per_epoch: int = rules.ITERATIONS_PER_EPOCH,
                      val_interval: int = 1) -> TrainConfig:
    full = yaml.safe_load(yaml.safe_dump(tree))  # a deep copy of plain data
    full["data"].update(mode=candidate["mode"], context=candidate["context"])
    full["model"] = {"name": "resunet", "base_channels": candidate["base_channels"], "depth": candidate["depth"]}
    full["stages"] = [{"patch_size": candidate["patch_size"], "batch_size": candidate["batch_size"],
                       "epochs": epochs, "iterations_per_epoch": per_epoch}]
    full["amp"] = amp
    full["val_interval"] = val_interval
    full.setdefault("augment", rules.plan_augmentation(fp, candidate["mode"], n_train)[0])
    return config_from_dict(full, "the plan")


def _validation_seconds(fp: DatasetFingerprint, n_cases: int, candidate: dict[str, Any], step_seconds: float,
                        spacing: Any) -> float:
    """Estimated seconds of one validation pass: forward passes over ``n_cases`` median cases
    (a forward pass costs about a third of a training step; 3-D windows overlap by half)."""
    if not n_cases:
        return 0.0
    voxels = float(np.prod(fp.median_shape_at(tuple(spacing))))
    per_step = float(np.prod(candidate["patch_size"])) * candidate["batch_size"]
    if candidate["mode"] == "3d":
        per_step /= 8.0  # 50 % overlap in three axes
    return n_cases * voxels / per_step * step_seconds / 3.0 + 0.5 * n_cases
