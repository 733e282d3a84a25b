"""Does the trainer's automatic precision buy speed without costing Dice? Same run, two precisions.

Run: python benchmarks/bench_precision.py [--base 32] [--batch 16] [--size 128] [--epochs 4]
                                          [--iterations 25] [--workdir DIR]

Data: the demo's real MRI (`resunet.demo.prepare_dataset`: MNI152 2009a T1 slabs, background /
grey / white matter); training on the 6 ``imagesTr`` slabs, Dice on the 2 held-out ``imagesTs``
slabs, which neither run trains on (predicted through `Predictor`, no TTA).

Two `fit` runs of ONE config (2-D ResUNet ``--base`` wide, depth 5, 2.5-D context 1, batch
``--batch`` x ``--size``^2, the default augmentation and loss, seed 0, ``epochs x iterations``
steps), differing only in ``precision`` / ``memory_format``: forced ``fp32`` / ``contiguous``,
then ``auto`` (what `resunet train` does by default: `resunet.train.precision` times the
candidates on the first batches and keeps the fastest whose losses track fp32's; the cache is
bypassed so the choice is measured in this run). Reported per run: the settings, seconds per
training step (median over the epochs of epoch seconds / iterations, validation off), the
share of the time the loop waited for batches, and held-out Dice per class; then the step-time
ratio and the Dice difference. No assertion: the figures depend on the CPU (bf16 is only a
candidate where the CPU computes it natively) and on what else runs on it.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from _machine import machine_line


def run(args, dataset: Path, out: Path, precision: str, memory_format: str) -> dict:
    from resunet.data.io import read_volume
    from resunet.demo import LABELS, _case_ids
    from resunet.infer.predictor import Predictor
    from resunet.metrics import dice
    from resunet.train.config import config_from_dict
    from resunet.train.trainer import fit

    tree = {
        "data": {"dataset": str(dataset), "cache_dir": str(args.workdir / "cache"), "val_fraction": 0.0,
                 "preprocess": {"modality": "mr"}, "mode": "2d", "context": 1},
        "model": {"name": "resunet", "base_channels": args.base, "depth": 5},
        "stages": [{"patch_size": [args.size, args.size], "batch_size": args.batch, "epochs": args.epochs,
                    "iterations_per_epoch": args.iterations}],
        "precision": precision, "memory_format": memory_format, "seed": 0, "output_dir": str(out),
    }
    t0 = time.perf_counter()
    fit(config_from_dict(tree))
    seconds = time.perf_counter() - t0
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    choice = json.loads((out / "step_settings.json").read_text())
    predictor = Predictor.from_file(out / "last.pt", batch_size=8)
    scores = []
    for case in _case_ids(dataset / "imagesTs"):
        mask = predictor.predict([read_volume(dataset / "imagesTs" / f"{case}_0000.nii.gz")]).array
        truth = read_volume(dataset / "labelsTs" / f"{case}.nii.gz").array
        scores.append([dice(mask == v, truth == v) for v in LABELS.values() if v])
    dice_per_class = np.mean(scores, axis=0)
    return {
        "settings": f"{choice['precision']} / {choice['memory_format']}", "reason": choice["reason"],
        "step_s": statistics.median(float(r["seconds"]) / args.iterations for r in rows),
        "data_wait": statistics.median(float(r["data_wait"]) for r in rows),
        "dice": [float(d) for d in dice_per_class], "seconds": seconds,
        "last_loss": float(rows[-1]["train_loss"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=int, default=32)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--iterations", type=int, default=25)
    parser.add_argument("--workdir", type=Path, default=None, help="dataset + cache to keep between runs")
    args = parser.parse_args()
    from resunet.demo import prepare_dataset
    from resunet.hardware import set_threads

    set_threads()
    with tempfile.TemporaryDirectory(prefix="bench_precision_") as tmp:
        args.workdir = (args.workdir or Path(tmp)).resolve()
        os.environ["RESUNET_CACHE"] = str(Path(tmp) / "resunet-cache")  # measure the choice in this run
        dataset = prepare_dataset(args.workdir / "dataset")
        print(machine_line())
        print(f"ResUNet 2-D base {args.base}, depth 5, 2.5-D (3 slices), batch {args.batch} x {args.size}^2, "
              f"{args.epochs} x {args.iterations} steps, seed 0; Dice on the 2 held-out MNI slabs")
        results = {}
        for label, precision, fmt in (("forced fp32", "fp32", "contiguous"), ("auto", "auto", "auto")):
            results[label] = run(args, dataset, Path(tmp) / label.replace(" ", "_"), precision, fmt)
            print(f"  {label}: {results[label]['settings']} ({results[label]['reason']})", file=sys.stderr)
        print()
        print("| run | settings | s / step | waiting for data | Dice GM | Dice WM | mean | last loss |")
        print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
        for label, r in results.items():
            print(f"| {label} | {r['settings']} | {r['step_s']:.3f} | {r['data_wait']:.1%} | {r['dice'][0]:.4f} | "
                  f"{r['dice'][1]:.4f} | {np.mean(r['dice']):.4f} | {r['last_loss']:.4f} |")
        fp32, auto = results["forced fp32"], results["auto"]
        print()
        print(f"auto / forced fp32: {fp32['step_s'] / auto['step_s']:.2f}x faster per step; held-out mean Dice "
              f"{np.mean(auto['dice']) - np.mean(fp32['dice']):+.4f} at the same {args.epochs * args.iterations} steps")
        print(f"auto chose {auto['settings']}: {auto['reason']}")


if __name__ == "__main__":
    torch.set_num_threads(os.cpu_count() or 1)
    main()
