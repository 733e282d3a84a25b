"""Mean teacher on MSD Task04 Hippocampus: how much of the gap between few labels and all labels do
unlabelled images close?

Reads ``../shared/data/Task04_Hippocampus`` (195 labelled MR volumes, MSD layout; CC-BY-SA 4.0,
Simpson et al. 2019) beside the project, or ``--data``; skips with a message when it is absent.

Split (fixed): the held-out fifth of `bench_hippocampus` (39 cases, ``make_split`` there: seed-0
permutation of the sorted case list), scored in every run. Of the other 156 (the training pool,
sorted by case id), ``--labelled`` (20) chosen by a seed-0 permutation keep their labels; the rest
are the unlabelled images. Three nnU-Net raw folders of symlinks, in a temporary folder:

    (a) the 20 labelled cases alone
    (b) the 20 labelled cases + the other 136 images in ``imagesUnlabelled/``, with
        ``semi_supervised.enabled=true`` (mean teacher; ``--semi-set method=pseudo_label``: pseudo-labels)
    (c) all 156 cases labelled

One plan (`resunet plan` on (a), for ``--minutes``) is trained on all three (`resunet train --config
plan.yaml --set data.dataset=...`): the same network, patch, schedule and wall-clock budget
(``max_minutes``; a semi-supervised step is slower, so (b) runs fewer epochs in the same time, the
schedule recomputed). The three validate on the same cases, (a)'s validation split of the 20
(``data.val_cases``), so validation costs the same and (c)'s extra labels all train. Each run's model (``resunet predict -m RUN``: the final weights) predicts the held-out images;
printed: the mean Dice per class over the held-out cases for each run, and the share of the
(c) - (a) gap that (b) closes, ``(b - a) / (c - a)``.

    python benchmarks/bench_semi_supervised.py --minutes 10

``--minutes`` below ~4 fails on a 2-core CPU: planning (fingerprint, cache, precision timing) takes
about 2 min of it, and the planner refuses a budget that leaves fewer than 50 steps.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _machine import machine_line  # noqa: E402
from bench_hippocampus import DEFAULT_DATA, make_split, score  # noqa: E402
from bench_hippocampus import run as _run  # noqa: E402

RUNS = {"a": "20 labelled", "b": "20 labelled + unlabelled (mean teacher)", "c": "all labelled"}


def run(cmd: list[str], log: Path) -> float:
    """`bench_hippocampus.run` (seconds of ``cmd``, output to ``log``); a failure ends the benchmark
    with the end of the log (e.g. the planner saying the budget is too small)."""
    try:
        return _run(cmd, log)
    except subprocess.CalledProcessError:
        tail = [line for line in log.read_text(errors="replace").splitlines() if "━" not in line][-5:]
        raise SystemExit(f"{' '.join(cmd[2:4])} failed (log {log}):\n" + "\n".join(tail)) from None


def _case_id(path: str) -> str:
    name = Path(path).name
    return name[: -len(".nii.gz")] if name.endswith(".nii.gz") else Path(name).stem


def nnunet_folder(root: Path, msd: Path, labelled: list[dict], unlabelled: list[dict], js: dict) -> Path:
    """An nnU-Net raw folder of symlinks: ``labelled`` in imagesTr/ + labelsTr/, ``unlabelled`` in
    imagesUnlabelled/ (entries of the MSD ``dataset.json`` at ``msd``)."""
    for sub in ("imagesTr", "labelsTr", "imagesUnlabelled"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for entry in labelled + unlabelled:
        cid = _case_id(entry["image"])
        folder = "imagesTr" if entry in labelled else "imagesUnlabelled"
        os.symlink((msd / entry["image"]).resolve(), root / folder / f"{cid}_0000.nii.gz")
        if entry in labelled:
            os.symlink((msd / entry["label"]).resolve(), root / "labelsTr" / f"{cid}.nii.gz")
    (root / "dataset.json").write_text(json.dumps({
        "name": root.name, "channel_names": js["modality"],
        "labels": {name: int(value) for value, name in js["labels"].items()},
        "numTraining": len(labelled), "file_ending": ".nii.gz"}, indent=1))
    return root


def make_datasets(pool_root: Path, tmp: Path, n_labelled: int, seed: int = 0) -> dict[str, Path]:
    """The three datasets (a), (b), (c) of the module docstring, from the MSD training pool copy."""
    js = json.loads((pool_root / "dataset.json").read_text())
    pool = sorted(js["training"], key=lambda c: _case_id(c["image"]))
    if not 0 < n_labelled < len(pool):
        raise SystemExit(f"--labelled must be between 1 and {len(pool) - 1}, got {n_labelled}")
    chosen = set(np.random.default_rng(seed).permutation(len(pool))[:n_labelled].tolist())
    labelled = [c for i, c in enumerate(pool) if i in chosen]
    rest = [c for i, c in enumerate(pool) if i not in chosen]
    return {
        "a": nnunet_folder(tmp / "Dataset901_HippoFew", pool_root, labelled, [], js),
        "b": nnunet_folder(tmp / "Dataset902_HippoSemi", pool_root, labelled, rest, js),
        "c": nnunet_folder(tmp / "Dataset903_HippoAll", pool_root, pool, [], js),
    }


def validation_cases(plan: Path, dataset: Path) -> list[str]:
    """The validation case ids the planned config gives ``dataset`` (the library's own split)."""
    from resunet.data.datasets import find_dataset
    from resunet.train.config import load_config
    from resunet.train.trainer import split_cases

    return split_cases(find_dataset(dataset), load_config(plan))[1]


def train_and_score(name: str, dataset: Path, plan: Path, val: list[str], out: Path, held_dir: Path,
                    names: list[str], semi_sets: list[str]) -> dict:
    """Train ``plan`` on ``dataset`` (run ``name``, validating on ``val``; run (b) also with the
    ``semi_sets`` overrides), predict the held-out images, score them."""
    resunet = [sys.executable, "-m", "resunet"]
    run_dir = out / f"run_{name}"
    if run_dir.exists():  # a variant of (b) replaces the earlier one
        shutil.rmtree(run_dir)
    cmd = [*resunet, "train", "--config", str(plan), "--set", f"data.dataset={dataset}", "-o", str(run_dir)]
    if val:
        cmd += ["--set", f"data.val_cases=[{', '.join(val)}]"]
    if name == "b":
        cmd += ["--set", "semi_supervised.enabled=true"]
        for item in semi_sets:
            cmd += ["--set", f"semi_supervised.{item}"]
    seconds = run(cmd, out / f"train_{name}.log")
    pred = out / f"predictions_{name}"
    run([*resunet, "predict", "-m", str(run_dir), "-i", str(held_dir / "images"), "-o", str(pred)],
        out / f"predict_{name}.log")
    rows = (run_dir / "metrics.csv").read_text().strip().splitlines()
    return {**score(pred, held_dir / "labels", names), "train_minutes": seconds / 60, "epochs_run": len(rows) - 1}


#: a (c) - (a) Dice gap below this is noise (39 cases): no share of it is printed
MIN_GAP = 0.005


def gap_closed(a: float, b: float, c: float) -> str:
    """``(b - a) / (c - a)`` as a percentage, or why it is undefined."""
    if c - a < MIN_GAP:
        return f"n/a (all labels beat the few by {c - a:+.4f} < {MIN_GAP})"
    return f"{100.0 * (b - a) / (c - a):.0f} %"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--minutes", type=float, default=10.0, help="the budget of each of the three runs")
    ap.add_argument("--labelled", type=int, default=20, help="labelled cases of runs (a) and (b)")
    ap.add_argument("--out", type=Path, default=Path("bench-semi-supervised"))
    ap.add_argument("--semi-set", action="append", default=[], metavar="KEY=VALUE",
                    help="a semi_supervised setting for run (b), e.g. method=pseudo_label (repeatable)")
    ap.add_argument("--runs", default="abc", help="the runs to train now (e.g. b: a variant of (b)); the "
                    "others, and the plan, are taken from an earlier run's --out folder")
    args = ap.parse_args()
    if not (args.data / "dataset.json").is_file():
        print(f"skipped: {args.data} not found (MSD Task04_Hippocampus; see ../shared/DATA.md)")
        return
    print(machine_line())
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    pool_root, held = make_split(args.data.resolve(), out / "split")
    names = ["Anterior", "Posterior"]
    earlier = out / "results.json"
    results = json.loads(earlier.read_text()) if earlier.is_file() and args.runs != "abc" else {}
    missing = [k for k in RUNS if k not in args.runs and k not in results]
    if missing:
        raise SystemExit(f"--runs {args.runs}: no earlier results for run(s) {missing} in {earlier}; train them too")
    with tempfile.TemporaryDirectory(prefix="bench-semi-") as tmp:
        datasets = make_datasets(pool_root, Path(tmp), args.labelled)
        plan = out / "plan.yaml"
        if args.runs == "abc" or not plan.is_file():  # a variant of one run keeps the earlier plan
            run([sys.executable, "-m", "resunet", "plan", str(datasets["a"]), "--minutes", str(args.minutes),
                 "-o", str(plan)], out / "plan.log")
        val = validation_cases(plan, datasets["a"])
        for name in RUNS:
            if name in args.runs:
                results[name] = train_and_score(name, datasets[name], plan, val, out, out / "split" / "test",
                                                names, args.semi_set)
    n_pool = len(json.loads((pool_root / "dataset.json").read_text())["training"])
    print(f"MSD Task04 Hippocampus, {len(held)} held-out cases (bench_hippocampus's fixed fifth); {args.labelled} "
          f"of the {n_pool} training cases labelled ({len(val)} of them validate); one plan, {args.minutes:g} min per run"
          + (f"; (b) with {', '.join(args.semi_set)}" if args.semi_set else ""))
    method = next((v.split("=", 1)[1] for v in args.semi_set if v.startswith("method=")), "mean_teacher")
    for name, label in RUNS.items():
        r = results[name]
        label = label.replace("mean teacher", method.replace("_", " ")) if name == "b" else label
        print(f"  ({name}) {label:42s} Anterior {r['Anterior']:.4f}  Posterior {r['Posterior']:.4f}  "
              f"mean {r['mean']:.4f}  ({r['epochs_run']} epochs, {r['train_minutes']:.1f} min)")
    a, b, c = (results[k] for k in "abc")
    print("  gap (c) - (a) closed by (b): " + "  ".join(
        f"{key} {gap_closed(a[key], b[key], c[key])}" for key in (*names, "mean")))
    (out / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
