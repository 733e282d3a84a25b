"""The planner on a 2-D picture dataset: `resunet train DATASET --minutes N` against the fixed defaults.

Builds a Kvasir-style ``images/`` + ``masks/`` folder of 8-bit grey PNGs from real MR:
``../shared/data/Task04_Hippocampus`` (195 subjects, MSD layout; CC-BY-SA 4.0, Simpson et al.
2019) or ``--data``; skips with a message when it is absent. Per subject, ``--slices`` slices along
array axis 0 (the one with the largest labelled area and its neighbours ``--gap`` slices away), each
scaled by its own 99.5th percentile to 0..255 (as an exported picture would be); masks hold the
label indices 0 background, 1 anterior, 2 posterior (a ``dataset.json`` names them).

Split by subject: the fixed fifth of `bench_hippocampus.make_split` (``default_rng(0)``) is held
out, so no held-out slice comes from a training subject. Two runs, each the user's command:

* planned: ``resunet train <images_masks folder> --minutes N``;
* fixed defaults: ``resunet train --dataset <folder> --set max_minutes=N`` (no planner).

Both predict the held-out PNGs with ``resunet predict -m RUN``; Dice per class, per image, averaged.

    python benchmarks/bench_planner_2d.py --minutes 10
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_hippocampus import DEFAULT_DATA, run  # noqa: E402


def make_pictures(src: Path, dst: Path, slices: int, gap: int, seed: int = 0) -> tuple[Path, Path]:
    """``dst/train`` (images/ + masks/ + dataset.json) and ``dst/test`` (images/ + masks/)."""
    from PIL import Image

    from resunet.data.io import read_volume

    js = json.loads((src / "dataset.json").read_text())
    cases = sorted(js["training"], key=lambda c: c["image"])
    order = np.random.default_rng(seed).permutation(len(cases))
    test = set(order[: len(cases) // 5].tolist())
    for split in ("train", "test"):
        for sub in ("images", "masks"):
            (dst / split / sub).mkdir(parents=True, exist_ok=True)
    for i, case in enumerate(cases):
        split = "test" if i in test else "train"
        image = read_volume(src / case["image"]).array.astype(np.float32)
        label = read_volume(src / case["label"]).array.astype(np.uint8)
        area = (label > 0).reshape(label.shape[0], -1).sum(1)
        centre = int(np.argmax(area))
        offsets = [gap * (k - (slices - 1) // 2) for k in range(slices)]
        name = Path(case["image"]).name.replace(".nii.gz", "")
        for off in offsets:
            z = int(np.clip(centre + off, 0, label.shape[0] - 1))
            img = image[z]
            top = float(np.percentile(img, 99.5)) or 1.0
            pixels = np.clip(img / top * 255.0, 0, 255).astype(np.uint8)
            stem = f"{name}_z{z:02d}"
            Image.fromarray(pixels).save(dst / split / "images" / f"{stem}.png")
            Image.fromarray(label[z]).save(dst / split / "masks" / f"{stem}.png")
    (dst / "train" / "dataset.json").write_text(json.dumps(
        {"name": "Hippocampus slices (resunet 2-D benchmark)",
         "labels": {"background": 0, "anterior": 1, "posterior": 2}}, indent=1))
    return dst / "train", dst / "test"


def score(pred_dir: Path, mask_dir: Path, classes: int) -> dict[str, float]:
    from PIL import Image

    from resunet.metrics import dice

    rows = []
    for mask in sorted(mask_dir.glob("*.png")):
        gt = np.asarray(Image.open(mask))
        pred = np.asarray(Image.open(pred_dir / mask.name))
        rows.append([dice(pred == c, gt == c) for c in range(1, classes + 1)])
    mean = np.mean(rows, axis=0)
    return {"anterior": float(mean[0]), "posterior": float(mean[1]), "mean": float(np.mean(rows)), "images": len(rows)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--slices", type=int, default=3, help="slices per subject")
    ap.add_argument("--gap", type=int, default=4, help="slices between them")
    ap.add_argument("--out", type=Path, default=Path("bench-planner-2d"))
    ap.add_argument("--skip-baseline", action="store_true")
    args = ap.parse_args()
    if not (args.data / "dataset.json").is_file():
        print(f"skipped: {args.data} not found (MSD Task04_Hippocampus; see ../shared/DATA.md)")
        return
    out = args.out.resolve()
    if not (out / "pictures" / "train" / "dataset.json").is_file():
        make_pictures(args.data.resolve(), out / "pictures", args.slices, args.gap)
    train, test = out / "pictures" / "train", out / "pictures" / "test"
    resunet = [sys.executable, "-m", "resunet"]
    runs = [("planned", [*resunet, "train", str(train), "--minutes", str(args.minutes), "-o", str(out / "planned")])]
    if not args.skip_baseline:
        runs.append(("fixed defaults", [*resunet, "train", "--dataset", str(train), "-o", str(out / "defaults"),
                                        "--set", f"max_minutes={args.minutes}"]))
    results = {}
    for name, cmd in runs:
        run_dir = Path(cmd[cmd.index("-o") + 1])
        seconds = run(cmd, out / f"{run_dir.name}_train.log")
        pred = out / f"{run_dir.name}_predictions"
        run([*resunet, "predict", "-m", str(run_dir), "-i", str(test / "images"), "-o", str(pred)],
            out / f"{run_dir.name}_predict.log")
        results[name] = {**score(pred, test / "masks", 2), "train_minutes": seconds / 60,
                         "epochs_run": len((run_dir / "metrics.csv").read_text().strip().splitlines()) - 1}
        if name == "planned":
            import yaml

            cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
            results[name]["plan"] = {c["key"]: c["value"] for c in cfg["plan"]["choices"]}
    n_train = len(list((train / "images").glob("*.png")))
    print(f"Hippocampus as 2-D PNGs: {n_train} training pictures, {results['planned']['images']} held out "
          f"(subjects of the fixed fifth), budget {args.minutes:g} min")
    for name, r in results.items():
        print(f"  {name:15s} anterior {r['anterior']:.4f}  posterior {r['posterior']:.4f}  mean {r['mean']:.4f}  "
              f"({r['epochs_run']} epochs, {r['train_minutes']:.1f} min for `resunet train`)")
    for key, value in results["planned"]["plan"].items():
        print(f"    {key}: {value}")
    (out / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
