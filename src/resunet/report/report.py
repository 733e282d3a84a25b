"""`report.md`: the evaluation summary table plus overlays of the worst, median and best cases."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from resunet.data.io import atomic_write, read_volume
from resunet.evaluation import IMAGE_SUFFIXES, Evaluation, case_files, summary_markdown
from resunet.report.overlays import best_slice, save_overlay


def ranked_cases(evaluation: Evaluation) -> list[tuple[str, float]]:
    """``(case, mean Dice over classes)`` from worst to best."""
    per_case: dict[str, list[float]] = {}
    for r in evaluation.rows:
        per_case.setdefault(r["case"], []).append(r["dice"])
    return sorted(((c, float(np.mean(v))) for c, v in per_case.items()), key=lambda cv: cv[1])


def write_report(evaluation: Evaluation, pred_dir: Path, gt_dir: Path, images_dir: Path | None, out_dir: Path) -> Path:
    """Write overlays (when ``images_dir`` is given) and ``report.md`` under ``out_dir``; return its path."""
    out_dir = Path(out_dir)
    ranked = ranked_cases(evaluation)
    picks = []
    if ranked:
        for tag, i in (("worst", 0), ("median", len(ranked) // 2), ("best", len(ranked) - 1)):
            if ranked[i][0] not in [p[1] for p in picks]:
                picks.append((tag, *ranked[i]))
    lines = ["# Evaluation report", "", f"Predictions: `{pred_dir}`  ", f"Ground truth: `{gt_dir}`", "",
             "## Summary (mean ± sd over cases)", "", summary_markdown(evaluation.summary())]
    if evaluation.missing_pred or evaluation.missing_gt or evaluation.failed:
        lines += ["## Problems", ""]
        lines += [f"- no prediction: {c}" for c in evaluation.missing_pred]
        lines += [f"- no ground truth: {c}" for c in evaluation.missing_gt]
        lines += [f"- failed: {c}: {why}" for c, why in evaluation.failed.items()]
        lines.append("")
    if images_dir is not None and picks:
        images = case_files(Path(images_dir), IMAGE_SUFFIXES)
        preds, gts = case_files(pred_dir), case_files(gt_dir)
        (out_dir / "overlays").mkdir(parents=True, exist_ok=True)
        lines += ["## Worst, median and best cases", "", "Green: ground truth; red: prediction.", ""]
        for tag, case, score in picks:
            if case not in images:
                continue
            source = read_volume(images[case])
            image, pred, gt = source.array, read_volume(preds[case]).array, read_volume(gts[case]).array
            if source.spatial_ndim == 2 and source.num_channels == 3:  # RGB picture: (3, H, W) -> (H, W, 3)
                image = np.moveaxis(image, 0, -1)
            elif image.ndim == pred.ndim + 1:  # channels first: show channel 0
                image = image[0]
            if pred.ndim == 2:
                image, pred, gt = image[None], pred[None], gt[None]
            z = best_slice(gt)
            png = save_overlay(out_dir / "overlays" / f"{tag}_{case}.png", image[z], pred[z], gt[z],
                               title=f"{tag}: {case} (mean Dice {score:.3f}), slice {z}")
            lines += [f"### {tag}: {case} — mean Dice {score:.4f}", "", f"![{case}](overlays/{png.name})", ""]
    path = out_dir / "report.md"
    with atomic_write(path) as tmp:
        Path(tmp).write_text("\n".join(lines) + "\n")
    return path
