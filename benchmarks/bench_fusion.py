"""Multi-modal fusion on real brain-tumour MR: T1c alone, FLAIR alone, early and late fusion, and a
late-fused model trained with modality dropout predicting without its FLAIR.

Reads ``../shared/data/brats2015_sample`` beside the project (six BraTS 2013/2015 patients,
``brats_2013_pat000N_1/`` with ``T1c_subtrMeanDivStd.nii.gz``, ``Flair_subtrMeanDivStd.nii.gz``,
``OTMultiClass.nii.gz`` and ``brainmask.nii.gz``; CC BY-NC-SA 3.0), or ``--data``; skips with a
message when it is absent.

Data: each image is cropped to its brain mask's bounding box (+ ``--margin`` voxels) and set to 0
outside the brain (the files are z-scored over the whole box, so the background is a negative
constant; zeroing it lets the planned MR z-score use the brain voxels, as nnU-Net does for
BraTS). The label is the whole tumour: ``OTMultiClass > 0`` as one class. Three nnU-Net raw
datasets are written under ``--out``: T1c only, FLAIR only, both (``_0000`` T1c, ``_0001`` FLAIR).
Patients 1-4 train, 5-6 are held out.

Runs, each ``resunet train DATASET --minutes M`` (the planner, then the trainer, as a user runs
it; ``--set`` adds the fusion settings on top of the plan):

- ``T1c``, ``FLAIR``: one modality;
- ``early``: both, stacked as channels (``model.fusion=early``);
- ``late``: both, one encoder branch per modality (``model.fusion=late``);
- ``late + dropout``: late fusion trained with ``augment.modality_dropout=--dropout``;
- with ``--early-dropout`` also ``early + dropout``.

``--fixed`` trains a small fixed 2.5-D config instead of a plan (``max_minutes`` = ``--minutes``):
a smoke check of the script below the planner's minimum budget (``--minutes 0.2 --fixed``).

Every model trained with modality dropout is also predicted with FLAIR missing (the test cases'
``_0001`` files left out: zero-filled after normalisation, `resunet predict` warns). The script
prints a markdown table of whole-tumour Dice per test patient and their mean, then the plan each
run used (``config.yaml`` of its run folder). Run folders are reused when they hold a finished run.

    python benchmarks/bench_fusion.py --minutes 10
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parent.parent / "shared" / "data" / "brats2015_sample"
MODALITIES = {"T1c": "T1c_subtrMeanDivStd.nii.gz", "FLAIR": "Flair_subtrMeanDivStd.nii.gz"}
LABEL, BRAIN = "OTMultiClass.nii.gz", "brainmask.nii.gz"
TRAIN, TEST = (1, 2, 3, 4), (5, 6)
#: ``--fixed``: the config trained instead of a plan (a smoke check below the planner's minimum budget)
FIXED = ["data.preprocess.modality=mr", "data.mode=2d", "data.context=1", "data.val_fraction=0.25",
         "model.base_channels=8", "model.depth=4", "val_interval=5", "precision=fp32", "memory_format=contiguous",
         "stages=[{patch_size: [64, 64], batch_size: 4, epochs: 100, iterations_per_epoch: 5}]"]


def patient_folders(data: Path) -> dict[int, Path] | None:
    """Patient number -> folder, or None when a patient or one of its files is missing."""
    folders = {}
    for n in (*TRAIN, *TEST):
        hits = sorted(data.glob(f"*pat{n:04d}*"))
        if not hits or not all((hits[0] / f).is_file() for f in (*MODALITIES.values(), LABEL, BRAIN)):
            return None
        folders[n] = hits[0]
    return folders


def crop_patient(folder: Path, margin: int) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """The patient's modalities (zero outside the brain) and whole-tumour label, cropped to the
    brain's bounding box; and the affine of the cropped grid."""
    import nibabel as nib

    brain_img = nib.load(str(folder / BRAIN))
    brain = np.asanyarray(brain_img.dataobj) > 0.5
    box = tuple(slice(max(0, int(ix.min()) - margin), int(ix.max()) + margin + 1) for ix in np.nonzero(brain))
    affine = brain_img.affine.copy()
    affine[:3, 3] = affine[:3, :3] @ np.array([s.start for s in box]) + affine[:3, 3]
    images = {}
    for name, file in MODALITIES.items():
        data = np.asanyarray(nib.load(str(folder / file)).dataobj).astype(np.float32)
        images[name] = np.where(brain, data, 0.0).astype(np.float32)[box]
    label = (np.asanyarray(nib.load(str(folder / LABEL)).dataobj) > 0).astype(np.uint8)[box]
    return images, label, affine


def write_datasets(folders: dict[int, Path], out: Path, margin: int) -> dict[str, Path]:
    """nnU-Net raw datasets ``T1c``, ``FLAIR``, ``both`` (imagesTr/labelsTr: patients 1-4) and the
    test inputs ``test/<variant>/`` (``T1c``, ``FLAIR``, ``both``, ``both_no_flair``) + ``test/labels``."""
    import nibabel as nib

    variants = {"T1c": ["T1c"], "FLAIR": ["FLAIR"], "both": ["T1c", "FLAIR"]}
    roots = {v: out / "datasets" / f"Dataset00{i + 1}_{v}" for i, v in enumerate(variants)}
    if all((r / "dataset.json").is_file() for r in roots.values()) and (out / "test" / "labels").is_dir():
        return roots
    for n, folder in folders.items():
        images, label, affine = crop_patient(folder, margin)
        case = f"pat{n:04d}"
        targets = {v: roots[v] / "imagesTr" for v in variants} if n in TRAIN else \
            {**{v: out / "test" / v for v in variants}, "both_no_flair": out / "test" / "both_no_flair"}
        for variant, folder_out in targets.items():
            folder_out.mkdir(parents=True, exist_ok=True)
            names = variants.get(variant, ["T1c"])  # both_no_flair: the T1c file of the pair only
            for c, name in enumerate(names):
                nib.save(nib.Nifti1Image(images[name], affine), str(folder_out / f"{case}_{c:04d}.nii.gz"))
        labels = [roots[v] / "labelsTr" for v in variants] if n in TRAIN else [out / "test" / "labels"]
        for folder_out in labels:
            folder_out.mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(label, affine), str(folder_out / f"{case}.nii.gz"))
    for variant, root in roots.items():
        channels = {str(c): name for c, name in enumerate(variants[variant])}
        (root / "dataset.json").write_text(json.dumps({
            "name": f"BraTS sample, {variant}", "channel_names": channels,
            "labels": {"background": 0, "whole_tumour": 1}, "numTraining": len(TRAIN), "file_ending": ".nii.gz",
        }, indent=1))
    return roots


def dice_per_case(pred_dir: Path, label_dir: Path) -> dict[str, float]:
    from resunet.data.io import read_volume
    from resunet.metrics import dice

    return {p.name[: -len(".nii.gz")]: float(dice(read_volume(pred_dir / p.name).array > 0, read_volume(p).array > 0))
            for p in sorted(label_dir.glob("*.nii.gz"))}


def run(cmd: list[str], log: Path, env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        done = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
    if done.returncode != 0:
        raise SystemExit(f"failed ({done.returncode}): {' '.join(cmd)}; see {log}")
    return time.perf_counter() - t0


def plan_summary(run_dir: Path) -> dict[str, object]:
    """What the run used: geometry, network, batch, epochs, precision (from its config.yaml,
    step_settings.json and metrics.csv)."""
    import yaml

    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    steps = run_dir / "step_settings.json"
    chosen = json.loads(steps.read_text()) if steps.is_file() else {}
    stage = cfg["stages"][0]
    epochs_run = len((run_dir / "metrics.csv").read_text().strip().splitlines()) - 1
    return {
        "mode": cfg["data"]["mode"], "context": cfg["data"]["context"],
        "spacing": cfg["data"]["preprocess"].get("target_spacing"), "patch": stage["patch_size"],
        "batch": stage["batch_size"], "model": f"{cfg['model']['name']} base {cfg['model']['base_channels']} "
        f"depth {cfg['model']['depth']} fusion {cfg['model'].get('fusion', 'early')}",
        "modality_dropout": cfg["augment"].get("modality_dropout", 0.0),
        "precision": f"{chosen.get('precision', cfg.get('precision'))} {chosen.get('memory_format', '')}".strip(),
        "epochs": f"{epochs_run} of {sum(s['epochs'] for s in cfg['stages'])} x {stage['iterations_per_epoch']} it",
        "choices": {c["key"]: c["value"] for c in (cfg.get("plan") or {}).get("choices", [])},
    }


def runs_to_do(args: argparse.Namespace, roots: dict[str, Path]) -> list[tuple[str, Path, list[str]]]:
    """(name, dataset, extra --set overrides) of every training run."""
    p = f"augment.modality_dropout={args.dropout}"
    runs = [("T1c", roots["T1c"], []), ("FLAIR", roots["FLAIR"], []),
            ("early", roots["both"], ["model.fusion=early"]), ("late", roots["both"], ["model.fusion=late"]),
            ("late + dropout", roots["both"], ["model.fusion=late", p])]
    if args.early_dropout:
        runs.append(("early + dropout", roots["both"], ["model.fusion=early", p]))
    return runs


def train_and_predict(args: argparse.Namespace, out: Path, roots: dict[str, Path], env: dict[str, str]) -> dict:
    resunet = [sys.executable, "-m", "resunet"]
    results: dict[str, dict] = {}
    for name, dataset, sets in runs_to_do(args, roots):
        slug = name.replace(" + ", "_").replace(" ", "_")
        run_dir = out / "runs" / slug
        if (run_dir / "best.pt").is_file() and (run_dir / "bench_seconds.json").is_file():
            print(f"{name}: reusing {run_dir}", flush=True)
            seconds = json.loads((run_dir / "bench_seconds.json").read_text())["seconds"]
        else:
            print(f"{name}: training {args.minutes:g} min ...", flush=True)
            if args.fixed:  # no planner: a small fixed config under the same wall-clock budget
                sets = [*FIXED, f"max_minutes={args.minutes}", *sets]
                cmd = [*resunet, "train", "--dataset", str(dataset), "-o", str(run_dir)]
            else:
                cmd = [*resunet, "train", str(dataset), "--minutes", str(args.minutes), "-o", str(run_dir)]
            cmd += [a for s in sets for a in ("--set", s)]
            seconds = run(cmd, out / f"{slug}_train.log", env)
            if not (run_dir / "best.pt").is_file():
                raise SystemExit(f"{name}: the run trained no epoch in {args.minutes:g} min (no best.pt); "
                                 f"give more --minutes; see {out / f'{slug}_train.log'}")
            (run_dir / "bench_seconds.json").write_text(json.dumps({"seconds": seconds}))
        inputs = {"": name if name in ("T1c", "FLAIR") else "both"}
        if "dropout" in name:
            inputs[" (FLAIR missing)"] = "both_no_flair"
        for suffix, variant in inputs.items():
            pred = out / "predictions" / (slug + ("_no_flair" if suffix else ""))
            run([*resunet, "predict", "-m", str(run_dir), "-i", str(out / "test" / variant),
                 "-o", str(pred)], out / f"{pred.name}_predict.log", env)
            results[name + suffix] = {"dice": dice_per_case(pred, out / "test" / "labels"),
                                      "train_minutes": seconds / 60, "run": slug}
        results[name]["plan"] = plan_summary(run_dir)
    return results


def print_tables(results: dict, args: argparse.Namespace) -> None:
    cases = [f"pat{n:04d}" for n in TEST]
    how = "a fixed small config (--fixed, no planner)" if args.fixed else "`resunet train DATASET` (planned)"
    print(f"\nBraTS sample, whole tumour (label > 0), train patients {TRAIN}, test {TEST}; "
          f"{args.minutes:g} min per run of {how}; modality dropout p = {args.dropout:g}\n")
    print("| model | " + " | ".join(cases) + " | mean | train min |")
    print("|---|" + "---:|" * (len(cases) + 2))
    for name, r in results.items():
        dice = [r["dice"][c] for c in cases]
        print(f"| {name} | " + " | ".join(f"{d:.4f}" for d in dice) + f" | {np.mean(dice):.4f} | "
              f"{r['train_minutes']:.1f} |")
    print("\n| run | mode | context | spacing | patch | batch | model | dropout | precision | epochs |")
    print("|---|---|---:|---|---|---:|---|---:|---|---|")
    for name, r in results.items():
        if "plan" in r:
            p = r["plan"]
            print(f"| {name} | {p['mode']} | {p['context']} | {p['spacing']} | {p['patch']} | {p['batch']} | "
                  f"{p['model']} | {p['modality_dropout']} | {p['precision']} | {p['epochs']} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--minutes", type=float, default=10.0, help="budget of each `resunet train` (plan + train)")
    ap.add_argument("--out", type=Path, default=Path("bench-fusion"))
    ap.add_argument("--dropout", type=float, default=0.3, help="augment.modality_dropout of the dropout runs")
    ap.add_argument("--early-dropout", action="store_true", help="also train early fusion with modality dropout")
    ap.add_argument("--margin", type=int, default=4, help="voxels kept around the brain mask's box")
    ap.add_argument("--fixed", action="store_true", help="train a small fixed 2.5-D config (no planner) for "
                    "--minutes each: a smoke check below the planner's minimum budget, not a result")
    args = ap.parse_args()
    folders = patient_folders(args.data)
    if folders is None:
        print(f"skipped: {args.data} does not hold the six BraTS sample patients "
              f"({', '.join(MODALITIES.values())}, {LABEL}, {BRAIN}); see ../shared/DATA.md")
        return
    from _machine import machine_line

    print(machine_line())
    out = args.out.resolve()
    roots = write_datasets(folders, out, args.margin)
    env = {**os.environ, "RESUNET_CACHE": str(out / "cache")}
    results = train_and_predict(args, out, roots, env)
    print_tables(results, args)
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
