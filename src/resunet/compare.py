"""`resunet compare`: train several networks with the same data, split, augmentation, seed and
budget, evaluate them on the same held-out cases and write the comparison table.

Held-out cases are the dataset's test cases with labels (``imagesTs`` + ``labelsTs``); without
them, the validation cases of the split.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from resunet.data.datasets import find_dataset
from resunet.data.io import atomic_write, read_volume, write_volume
from resunet.errors import InputError
from resunet.evaluation import evaluate_folders
from resunet.infer.predictor import Predictor
from resunet.model import run_checkpoint
from resunet.nets import count_macs, count_parameters
from resunet.train.config import TrainConfig
from resunet.train.trainer import fit, split_cases

console = Console()


def held_out_cases(config: TrainConfig) -> list[tuple[str, list[Path], Path]]:
    """``(case id, image files, label file)`` of the cases every model is evaluated on."""
    info = find_dataset(config.data.dataset, unlabelled=config.semi_supervised.enabled)
    labels_ts = Path(info.root) / "labelsTs"
    cases = []
    for case in info.test:
        label = labels_ts / f"{case.case_id}{info.file_ending}"
        if label.is_file():
            cases.append((case.case_id, list(case.images), label))
    if cases:
        return cases
    _, val_ids = split_cases(info, config)
    by_id = {c.case_id: c for c in info.training}
    cases = [(i, list(by_id[i].images), by_id[i].label) for i in val_ids]
    if not cases:
        raise InputError(f"{info.root}: no labelled test cases (labelsTs/) and no validation cases to compare on")
    return cases


def slice_latency_ms(predictor: Predictor, shape: tuple[int, int], repeats: int = 5) -> float:
    """Median forward time (ms) of one 2-D slice of ``shape`` (padded to the divisor), batch 1."""
    model = predictor.model
    d = model.divisor
    size = [-(-s // d) * d for s in shape]
    x = torch.randn(1, model.in_channels, *size, device=predictor.device)
    if model.spatial_dims == 3:
        x = torch.randn(1, model.in_channels, *predictor.patch_size, device=predictor.device)
    times = []
    with torch.inference_mode():
        model(x)
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(x)
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def compare_models(base: TrainConfig, models: list[str], out: Path, minutes: float | None) -> list[dict]:
    """Train and evaluate each model; write ``comparison.md`` / ``comparison.json``; return the rows."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cases = held_out_cases(base)
    gt_dir = out / "ground_truth"
    gt_dir.mkdir(exist_ok=True)
    for case_id, _, label in cases:
        write_volume(read_volume(label), gt_dir / f"{case_id}.nii.gz")
    rows = []
    for name in models:
        cfg = base.model_copy(deep=True)
        cfg.model.name = name
        cfg.output_dir = out / name
        cfg.max_minutes = minutes
        console.rule(f"{name}")
        result = fit(cfg, resume=(cfg.output_dir / "last.pt").exists())
        predictor = Predictor.from_file(run_checkpoint(result.run_dir))
        pred_dir = out / name / "predictions"
        pred_dir.mkdir(exist_ok=True)
        shape = None
        for case_id, images, _ in cases:
            volumes = [read_volume(p) for p in images]
            shape = volumes[0].shape[-2:]
            write_volume(predictor.predict(volumes), pred_dir / f"{case_id}.nii.gz")
        labels = predictor.labels
        evaluation = evaluate_folders(pred_dir, gt_dir, labels, tolerance_mm=1.0)
        per_case = {}
        for r in evaluation.rows:
            per_case.setdefault(r["case"], []).append(r)
        case_dice = [np.mean([r["dice"] for r in rs]) for rs in per_case.values()]
        model = predictor.model
        rows.append({
            "model": name,
            "dice_mean": float(np.mean(case_dice)), "dice_sd": float(np.std(case_dice, ddof=1)) if len(case_dice) > 1 else 0.0,
            "hd95_mm": float(np.mean([r["hd95"] for r in evaluation.rows])),
            "boundary_f1": float(np.mean([r["boundary_f1"] for r in evaluation.rows])),
            "params_m": count_parameters(model) / 1e6,
            "gmac": count_macs(model, (1, model.in_channels, *[-(-s // model.divisor) * model.divisor for s in shape])) / 1e9
            if model.spatial_dims == 2 else count_macs(model, (1, model.in_channels, *predictor.patch_size)) / 1e9,
            "ms_per_slice": slice_latency_ms(predictor, tuple(shape)),
            "epochs": result.epochs_run,
        })
    _write(rows, out, len(cases), minutes)
    return rows


def _write(rows: list[dict], out: Path, n_cases: int, minutes: float | None) -> None:
    headers = ["model", "Dice (mean ± sd)", "HD95 (mm)", "boundary F1 (1 mm)", "params (M)", "GMAC", "ms / slice", "epochs"]
    lines = [f"Held-out cases: {n_cases}; budget per model: {minutes} min; same data, split, augmentation, seed.", "",
             "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    table = Table(title=f"Model comparison ({n_cases} held-out cases)")
    for h in headers:
        table.add_column(h, justify="left" if h == "model" else "right")
    for r in rows:
        cells = [r["model"], f"{r['dice_mean']:.4f} ± {r['dice_sd']:.4f}", f"{r['hd95_mm']:.2f}", f"{r['boundary_f1']:.4f}",
                 f"{r['params_m']:.2f}", f"{r['gmac']:.2f}", f"{r['ms_per_slice']:.1f}", str(r["epochs"])]
        lines.append("| " + " | ".join(cells) + " |")
        table.add_row(*cells)
    console.print(table)
    with atomic_write(out / "comparison.md") as tmp:
        Path(tmp).write_text("\n".join(lines) + "\n")
    with atomic_write(out / "comparison.json") as tmp:
        Path(tmp).write_text(json.dumps(rows, indent=2))
    console.print(f"written: {out / 'comparison.md'}")
