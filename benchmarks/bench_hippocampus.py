"""Self-configuring training on real MR: `resunet train DATASET --minutes N` on MSD Task04 Hippocampus.

Reads ``../shared/data/Task04_Hippocampus`` (195 labelled MR volumes, MSD layout; CC-BY-SA 4.0,
Simpson et al. 2019) beside the project, or ``--data``; skips with a message when it is absent.

Split: a fixed fifth of the cases (39, chosen by ``numpy.random.default_rng(0).permutation`` of the
sorted case list) is held out; the other 156 form an MSD-layout copy (symlinks + a rewritten
``dataset.json``) that `resunet train` plans and trains on, exactly as a user would run it. The
held-out cases are then predicted with ``resunet predict`` and scored (Dice per class, per case,
averaged). ``--baseline`` also trains the fixed defaults (``resunet train --dataset``, no planner)
under the same wall-clock budget (``max_minutes``) for comparison. ``--folds K`` also runs
``resunet train <copy> --minutes N --folds K`` (K models, each 1/K of the training time) and
predicts with their ensemble (``resunet predict -m <run folder>``).

    python benchmarks/bench_hippocampus.py --minutes 10 [--folds 3]
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
DEFAULT_DATA = HERE.parent.parent / "shared" / "data" / "Task04_Hippocampus"


def make_split(src: Path, dst: Path, seed: int = 0) -> tuple[Path, list[str]]:
    """MSD copy of the training four fifths under ``dst/train``; held-out images/labels in ``dst/test``."""
    js = json.loads((src / "dataset.json").read_text())
    cases = sorted(js["training"], key=lambda c: c["image"])
    order = np.random.default_rng(seed).permutation(len(cases))
    n_test = len(cases) // 5
    test, train = sorted(order[:n_test]), sorted(order[n_test:])
    root = dst / "train"
    for sub in ("train/imagesTr", "train/labelsTr", "test/images", "test/labels"):
        (dst / sub).mkdir(parents=True, exist_ok=True)

    def link(case: dict, folder_images: Path, folder_labels: Path) -> str:
        for key, folder in (("image", folder_images), ("label", folder_labels)):
            p = (src / case[key]).resolve()
            q = folder / p.name
            if not q.exists():
                os.symlink(p, q)
        return Path(case["image"]).name

    for i in train:
        link(cases[i], root / "imagesTr", root / "labelsTr")
    held = [link(cases[i], dst / "test" / "images", dst / "test" / "labels") for i in test]
    split_js = dict(js, training=[cases[i] for i in train], numTraining=len(train), test=[], numTest=0)
    (root / "dataset.json").write_text(json.dumps(split_js, indent=1))
    return root, held


def score(pred_dir: Path, label_dir: Path, names: list[str]) -> dict[str, float]:
    from resunet.data.io import read_volume
    from resunet.metrics import dice

    rows = []
    for label in sorted(label_dir.glob("*.nii.gz")):
        gt = read_volume(label).array
        pred = read_volume(pred_dir / label.name).array
        rows.append([dice(pred == c, gt == c) for c in range(1, len(names) + 1)])
    mean = np.mean(rows, axis=0)
    return {**{n: float(m) for n, m in zip(names, mean)}, "mean": float(np.mean(rows)), "cases": len(rows)}


def run(cmd: list[str], log: Path) -> float:
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, check=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--out", type=Path, default=Path("bench-hippocampus"))
    ap.add_argument("--baseline", action="store_true", help="also train the fixed defaults for comparison")
    ap.add_argument("--folds", type=int, default=0, help="also train K folds in the same budget and ensemble them")
    ap.add_argument("--skip-single", action="store_true", help="with --folds: do not run the one-model plan")
    args = ap.parse_args()
    if not (args.data / "dataset.json").is_file():
        print(f"skipped: {args.data} not found (MSD Task04_Hippocampus; see ../shared/DATA.md)")
        return
    out = args.out.resolve()
    train_root, held = make_split(args.data.resolve(), out / "split")
    names = ["Anterior", "Posterior"]
    resunet = [sys.executable, "-m", "resunet"]
    results = {}
    runs = [] if args.skip_single and args.folds else [
        ("planned", [*resunet, "train", str(train_root), "--minutes", str(args.minutes), "-o", str(out / "planned")])]
    if args.folds:
        runs.append((f"{args.folds} folds", [*resunet, "train", str(train_root), "--minutes", str(args.minutes),
                                             "--folds", str(args.folds), "-o", str(out / f"folds{args.folds}")]))
    if args.baseline:
        runs.append(("fixed defaults", [*resunet, "train", "--dataset", str(train_root), "-o", str(out / "defaults"),
                                        "--set", f"max_minutes={args.minutes}"]))
    for name, cmd in runs:
        run_dir = Path(cmd[cmd.index("-o") + 1])
        if (run_dir / "last.pt").exists() or (run_dir / "ensemble.json").exists():
            print(f"{name}: reusing {run_dir}")
            seconds = json.loads((run_dir / "bench_seconds.json").read_text())["seconds"]
        else:
            seconds = run(cmd, out / f"{run_dir.name}_train.log")
            (run_dir / "bench_seconds.json").write_text(json.dumps({"seconds": seconds}))
        pred = out / f"{run_dir.name}_predictions"
        model = run_dir  # its model: the folds' ensemble, else final.pt (best.pt when it stopped early)
        run([*resunet, "predict", "-m", str(model), "-i", str(out / "split" / "test" / "images"),
             "-o", str(pred)], out / f"{run_dir.name}_predict.log")
        results[name] = {**score(pred, out / "split" / "test" / "labels", names), "train_minutes": seconds / 60}
        if name != "fixed defaults":
            import yaml

            cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
            results[name]["plan"] = {c["key"]: c["value"] for c in cfg["plan"]["choices"]}
            metrics = run_dir / ("fold_0/metrics.csv" if args.folds and name != "planned" else "metrics.csv")
            results[name]["epochs_run"] = len(metrics.read_text().strip().splitlines()) - 1
            if (run_dir / "ensemble.json").exists():
                results[name]["cv_dice"] = json.loads((run_dir / "ensemble.json").read_text())["cv_dice"]
    print(f"MSD Task04 Hippocampus, {len(held)} held-out cases (fixed fifth, seed 0), budget {args.minutes:g} min")
    for name, r in results.items():
        print(f"  {name:15s} Anterior {r['Anterior']:.4f}  Posterior {r['Posterior']:.4f}  mean {r['mean']:.4f}  "
              f"({r['train_minutes']:.1f} min for `resunet train`)")
    for name, r in results.items():
        if "plan" in r:
            print(f"  plan of {name} ({r['epochs_run']} epochs run"
                  + (f", cross-validation Dice {r['cv_dice']:.4f}" if r.get("cv_dice") else "") + "):")
            for key, value in r["plan"].items():
                print(f"    {key}: {value}")
    (out / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
