"""`resunet demo`: the main job end to end on real MRI, on CPU, in minutes.

Data: the MNI ICBM152 2009a nonlinear symmetric T1 template with its grey / white matter
probability maps (Fonov et al., NeuroImage 2011), shipped inside the ``nilearn`` wheel; only the
files are read (with nibabel). Copyright (C) 1993-2009 Louis Collins, McConnell Brain Imaging
Centre, Montreal Neurological Institute, McGill University; used under the MNI template licence
(free use with this notice kept).

Label rule (3 classes): grey matter (1) where ``gm >= 128`` and ``gm > wm``; white matter (2) where
``wm >= 128`` and ``wm >= gm``; background (0) elsewhere (probabilities stored as 0..255).

The volume is cut into axial slabs written as separate cases in the nnU-Net raw layout (so the demo
reads through the same loader as a user's data); the planner (`resunet.plan.plan_dataset`) chooses
the whole training run for this machine and ``--minutes``, exactly as `resunet train DATASET`
would; most slabs train, two are held out, predicted
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

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from resunet.data.io import read_volume, write_volume
from resunet.data.volume import Volume
from resunet.errors import InputError
from resunet.metrics import dice, dice_from_counts
from resunet.model import run_checkpoint

LABELS = {"background": 0, "grey_matter": 1, "white_matter": 2}
SLAB_THICKNESS = 20  # slices
Z_RANGE = (0, 160)  # axial slices holding the brain (tissue spans z = 2..153)
TEST_SLABS = (2, 5)
BIAS_AMPLITUDE = 0.20
RICIAN_FRACTION_OF_WM = 0.03
#: the "re-acquired" held-out slabs: another scanner's grid (mm, array order z, y, x), tilted
REACQUIRED_SPACING = (2.0, 1.2, 1.2)
REACQUIRED_TILT_DEG = (10.0, 6.0)  # about the left-right axis, then about the vertical axis

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


def _rotation(tilt_deg: tuple[float, float]) -> np.ndarray:
    """LPS rotation: ``tilt_deg[0]`` about x (left-right), then ``tilt_deg[1]`` about z."""
    a, b = np.deg2rad(tilt_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    rz = np.array([[np.cos(b), -np.sin(b), 0], [np.sin(b), np.cos(b), 0], [0, 0, 1]])
    return rz @ rx


def reacquire(
    image: Volume, labels: np.ndarray, z0: int, z1: int,
    spacing: tuple[float, float, float] = REACQUIRED_SPACING,
    tilt_deg: tuple[float, float] = REACQUIRED_TILT_DEG, seed: int = 0,
) -> tuple[Volume, Volume]:
    """The anatomy of slab ``[z0, z1)`` of ``image`` as another scanner would acquire it: a grid
    of ``spacing`` mm (array order) covering the slab's extent, tilted by ``tilt_deg`` (an oblique
    affine), voxels that average their extent (a Gaussian of FWHM = the new voxel size, i.e. partial
    volume), then the demo's bias field and Rician noise (`corrupt`). Labels are sampled at the new
    voxel centres (nearest). Returns ``(image, label)`` volumes on the new grid."""
    from scipy import ndimage

    src = image.index_to_world()
    shape_src = np.asarray(image.shape, float)
    extent = np.array([z1 - z0, shape_src[1], shape_src[2]]) * np.asarray(image.spacing)
    shape = tuple(int(round(e / s)) for e, s in zip(extent, spacing))
    centre = src @ np.array([(z0 + z1 - 1) / 2, (shape_src[1] - 1) / 2, (shape_src[2] - 1) / 2, 1.0])
    rot = _rotation(tilt_deg)
    steps = np.stack([rot @ (src[:3, a] / np.linalg.norm(src[:3, a])) * spacing[a] for a in range(3)], axis=1)
    origin = centre[:3] - steps @ ((np.asarray(shape) - 1) / 2)
    new = np.eye(4)
    new[:3, :3], new[:3, 3] = steps, origin
    sigma = [np.sqrt(max(s**2 - o**2, 0.0)) / 2.355 / o for s, o in zip(spacing, image.spacing)]
    blurred = ndimage.gaussian_filter(image.array.astype(np.float32), sigma)
    index = np.indices(shape).reshape(3, -1)
    coords = (np.linalg.inv(src) @ new @ np.vstack([index, np.ones(index.shape[1])]))[:3]
    img = ndimage.map_coordinates(blurred, coords, order=1, mode="nearest").reshape(shape)
    lab = ndimage.map_coordinates(labels, coords, order=0, mode="nearest").reshape(shape).astype(np.uint8)
    img = corrupt(np.clip(img, 0, None), lab, seed=seed)
    direction = steps[:, ::-1] / np.asarray(spacing[::-1])[None, :]  # columns in ITK order (x, y, z)
    geometry = dict(spacing=spacing, origin=tuple(origin), direction=direction, spatial_ndim=3)
    return Volume(img.astype(np.float32), **geometry), Volume(lab, **geometry)


def prepare_reacquired(root: Path, test_slabs: tuple[int, ...] = TEST_SLABS, z_range: tuple[int, int] = Z_RANGE,
                       thickness: int = SLAB_THICKNESS) -> None:
    """``imagesTs_reacquired`` / ``labelsTs_reacquired``: the held-out slabs by `reacquire` (idempotent)."""
    root = Path(root)
    if (root / "labelsTs_reacquired").is_dir() and any((root / "labelsTs_reacquired").iterdir()):
        return
    files = mni_files()
    t1 = read_volume(files["t1"])
    labels = tissue_labels(read_volume(files["gm"]).array, read_volume(files["wm"]).array)
    bounds = list(range(z_range[0], z_range[1] + 1, thickness))
    for sub in ("imagesTs_reacquired", "labelsTs_reacquired"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for i in test_slabs:
        img, lab = reacquire(t1, labels, bounds[i], bounds[i + 1], seed=100 + i)
        write_volume(img, root / "imagesTs_reacquired" / f"mni_slab{i}_0000.nii.gz")
        write_volume(lab, root / "labelsTs_reacquired" / f"mni_slab{i}.nii.gz")


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
        dice_gm = dice_from_counts(tp_gm, pred_gm - tp_gm, cum[1][-1] - tp_gm)
        dice_wm = dice_from_counts(tp_wm, pred_wm - tp_wm, cum[2][-1] - tp_wm)
        score = np.where(valid, (dice_gm + dice_wm) / 2, -1)
        i, j = np.unravel_index(int(np.argmax(score)), score.shape)
        return cls(float(edges[i]), float(edges[j]))


def _case_ids(folder: Path) -> list[str]:
    return sorted(p.name[: -len("_0000.nii.gz")] for p in folder.glob("*_0000.nii.gz"))


def run_demo(out: Path, minutes: float = 8.0) -> dict[str, dict[str, float]]:
    """Prepare the data, plan, train, predict the held-out slabs (clean, corrupted, re-acquired), evaluate, report.

    Returns ``{row name: {"grey_matter": Dice, "white_matter": Dice, "mean": Dice}}``.
    """
    from resunet.infer.predictor import Predictor
    from resunet.plan import plan_dataset
    from resunet.report.overlays import best_slice, save_overlay
    from resunet.train.config import load_config
    from resunet.train.trainer import fit

    t0 = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dataset = prepare_dataset(out / "dataset")
    prepare_reacquired(dataset)
    console.print(f"dataset: {dataset} (nnU-Net layout, {len(_case_ids(dataset / 'imagesTr'))} training slabs, "
                  f"{len(TEST_SLABS)} held out)")
    run_dir = out / "run"
    resume = (run_dir / "last.pt").exists()
    if resume:  # an interrupted demo continues with its own plan, not one re-timed now
        config = load_config(run_dir / "config.yaml")
        console.print(f"continuing {run_dir} ({config.total_epochs} epochs planned)")
    else:  # the planner decides everything, as for a user's dataset
        plan = plan_dataset(dataset, minutes, output_dir=run_dir, cache_dir=out / "cache", started=t0)
        console.print(plan.table())
        config = plan.config
    result = fit(config, resume=resume)

    predictor = Predictor.from_file(run_checkpoint(run_dir), batch_size=8, tta=True)  # flip TTA: +0.002 Dice, ~10 s
    train_ids = _case_ids(dataset / "imagesTr")
    rule = ThresholdRule.fit(
        [read_volume(dataset / "imagesTr" / f"{c}_0000.nii.gz").array for c in train_ids],
        [read_volume(dataset / "labelsTr" / f"{c}.nii.gz").array for c in train_ids],
    )
    names = [n for n, v in LABELS.items() if v]
    scores: dict[str, list[list[float]]] = {}
    overlays = []
    (out / "overlays").mkdir(exist_ok=True)
    splits = (("clean", "imagesTs", "labelsTs"), ("corrupted", "imagesTs_corrupted", "labelsTs"),
              ("re-acquired", "imagesTs_reacquired", "labelsTs_reacquired"))
    for tag, split, truth_dir in splits:
        pred_dir = out / ("predictions" if tag == "clean" else f"predictions_{tag.replace('-', '')}")
        pred_dir.mkdir(exist_ok=True)
        for case in _case_ids(dataset / split):
            image = read_volume(dataset / split / f"{case}_0000.nii.gz")
            truth = read_volume(dataset / truth_dir / f"{case}.nii.gz").array
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
    order = [f"{m} ({tag})" for tag in ("clean", "corrupted", "re-acquired") for m in ("ResUNet", "threshold rule")]
    for method in order:
        row = summary[method]
        table.add_row(method, *[f"{row[n]:.4f}" for n in [*names, "mean"]])
    console.print(table)
    console.print(f"threshold rule fitted on the training slabs: GM in [{rule.low:.1f}, {rule.high:.1f}), WM >= {rule.high:.1f}")
    console.print(f"corrupted = bias field +-{BIAS_AMPLITUDE:.0%} and Rician noise at {RICIAN_FRACTION_OF_WM:.0%} of WM intensity")
    console.print(f"re-acquired = the same slabs on a {' x '.join(f'{s:g}' for s in REACQUIRED_SPACING)} mm grid tilted "
                  f"{REACQUIRED_TILT_DEG[0]:g} + {REACQUIRED_TILT_DEG[1]:g} degrees, partial volume, then corrupted")
    console.print(f"trained {epochs} epochs; total demo time {seconds / 60:.1f} min")
    console.print(f"model:        {run_checkpoint(run_dir)}")
    console.print(f"curves:       {run_dir / 'curves.png'}  (metrics: {run_dir / 'metrics.csv'})")
    console.print(f"predictions:  {out / 'predictions'}, {out / 'predictions_corrupted'}, {out / 'predictions_reacquired'} "
                  "(NIfTI, each input's geometry)")
    console.print(f"overlays:     {out / 'overlays'} ({len(overlays)} PNGs)")
