"""Evaluate a folder of predicted label maps against a folder of ground-truth label maps.

Cases are matched by file name (``CASE.nii.gz`` in both folders; the nnU-Net channel suffix
``_0000`` is ignored). Spacing is read from the ground-truth files. Per-case, per-class metrics go
to ``per_case.csv``; the summary (mean, sd, median per class and metric) to ``summary.csv`` and
``summary.md``.
"""

from __future__ import annotations

import csv
import io
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from resunet.data.io import atomic_write, read_volume
from resunet.errors import InputError
from resunet.metrics import METRIC_NAMES, compute_all

LABEL_SUFFIXES = (".nii.gz", ".nii", ".png", ".mha", ".nrrd", ".npz")
#: files ``evaluate --images`` shows under the overlays (pictures may be JPEG, grey or RGB)
IMAGE_SUFFIXES = (*LABEL_SUFFIXES, ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def case_files(folder: Path, suffixes: Sequence[str] = LABEL_SUFFIXES) -> dict[str, Path]:
    """``{case id: path}`` of every file in ``folder`` ending in one of ``suffixes`` (label files by
    default; ``_0000`` channel suffix dropped)."""
    folder = Path(folder)
    what = "label files" if tuple(suffixes) == LABEL_SUFFIXES else "images"
    if not folder.is_dir():
        raise InputError(
            f"{folder} is not a folder of {what}; pass the folder holding them ({', '.join(suffixes)})"
        )
    out = {}
    for p in sorted(folder.iterdir()):
        suffix = next((s for s in suffixes if p.name.lower().endswith(s)), None)
        if suffix and p.is_file():
            out[re.sub(r"_\d{4}$", "", p.name[: -len(suffix)])] = p
    return out


@dataclass
class Evaluation:
    """Per-case rows (``case``, ``label``, ``name`` and one column per metric) and what was missing."""

    rows: list[dict] = field(default_factory=list)
    missing_pred: list[str] = field(default_factory=list)
    missing_gt: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)

    def summary(self) -> list[dict]:
        """One row per (label, metric): mean, sd, median and n over cases (inf kept, nan skipped)."""
        out = []
        labels = sorted({(r["label"], r["name"]) for r in self.rows})
        for label, name in labels:
            for metric in METRIC_NAMES:
                values = np.array([r[metric] for r in self.rows if r["label"] == label], dtype=float)
                values = values[~np.isnan(values)]
                out.append({
                    "label": label, "name": name, "metric": metric, "n": int(values.size),
                    "mean": float(values.mean()) if values.size else math.nan,
                    "sd": float(values.std(ddof=1)) if values.size > 1 else 0.0,
                    "median": float(np.median(values)) if values.size else math.nan,
                })
        return out


def evaluate_folders(
    pred_dir: Path,
    gt_dir: Path,
    labels: dict[str, int],
    tolerance_mm: float = 1.0,
) -> Evaluation:
    """Compare every case present on both sides; list cases missing on either side."""
    preds, gts = case_files(pred_dir), case_files(gt_dir)
    if not gts:
        raise InputError(f"no label files ({', '.join(LABEL_SUFFIXES)}) in {gt_dir}")
    result = Evaluation(missing_pred=sorted(set(gts) - set(preds)), missing_gt=sorted(set(preds) - set(gts)))
    names = {v: n for n, v in labels.items() if v != 0}
    for case in sorted(set(preds) & set(gts)):
        try:
            gt = read_volume(gts[case])
            pred = read_volume(preds[case])
            if pred.shape != gt.shape:
                raise InputError(f"prediction {preds[case]} has shape {pred.shape}, ground truth {gt.shape}")
            metrics = compute_all(pred.array, gt.array, list(names), gt.spacing, tolerance_mm)
        except Exception as err:  # one bad case must not stop the others
            result.failed[case] = str(err)
            continue
        for label, values in metrics.items():
            result.rows.append({"case": case, "label": label, "name": names[label], **values})
    return result


def _csv(rows: Sequence[dict]) -> str:
    buf = io.StringIO()
    if rows:
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return buf.getvalue()


def summary_markdown(summary: Sequence[dict], metrics: Sequence[str] = METRIC_NAMES) -> str:
    """Markdown table: one row per class, ``mean +- sd`` per metric."""
    classes = sorted({(r["label"], r["name"]) for r in summary})
    lines = ["| class | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    for label, name in classes:
        cells = []
        for m in metrics:
            r = next(x for x in summary if x["label"] == label and x["metric"] == m)
            cells.append(f"{r['mean']:.4f} ± {r['sd']:.4f}")
        lines.append(f"| {name} ({label}) | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_evaluation(result: Evaluation, out_dir: Path) -> dict[str, Path]:
    """Write ``per_case.csv``, ``summary.csv`` and ``summary.md`` (atomically) under ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"per_case": out_dir / "per_case.csv", "summary": out_dir / "summary.csv",
             "markdown": out_dir / "summary.md"}
    summary = result.summary()
    texts = {"per_case": _csv(result.rows), "summary": _csv(summary), "markdown": summary_markdown(summary)}
    for key, path in paths.items():
        with atomic_write(path) as tmp:
            Path(tmp).write_text(texts[key])
    return paths


def label_names(labels_json: Path | None, gt_folder: Path) -> dict[str, int]:
    """Label names -> values: the ``labels`` of an nnU-Net ``dataset.json``, or (None) every value
    found in the ground-truth files, named ``label_<v>``."""
    import json

    if labels_json is not None:
        try:
            return {str(k): int(v) for k, v in json.loads(Path(labels_json).read_text())["labels"].items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise InputError(f"{labels_json}: cannot read a 'labels' mapping ({err}); "
                             "pass an nnU-Net dataset.json") from None
    values: set[int] = set()
    for path in case_files(gt_folder).values():
        values |= {int(v) for v in np.unique(read_volume(path).array)}
    return {f"label_{v}": v for v in sorted(values)}


def evaluate_and_write(pred: Path, gt: Path, names: dict[str, int], tolerance_mm: float,
                       out_dir: Path) -> tuple[Evaluation, dict[str, Path]]:
    """`evaluate_folders` then `write_evaluation` into ``out_dir``; when no case could be
    evaluated, an `InputError` saying why instead of empty tables."""
    result = evaluate_folders(pred, gt, names, tolerance_mm)
    if not result.rows and (result.failed or not set(case_files(pred)) & set(case_files(gt))):
        why = [f"  {case}: {err}" for case, err in result.failed.items()]
        if not result.failed:
            why = [f"  no file name of {pred} matches one of {gt} (ground truth: "
                   f"{', '.join(result.missing_pred[:5]) or 'none'}); predictions and labels must share file names"]
        raise InputError("no case could be evaluated:\n" + "\n".join(why))
    return result, write_evaluation(result, out_dir)
