"""`resunet compare` on real MR: ResUNet, Attention U-Net, U-Net and the Transformer hybrid under one budget.

Reads ``../shared/data/Task04_Hippocampus`` (MSD layout, 195 labelled MR volumes; CC-BY-SA 4.0,
Simpson et al. 2019) or ``--data``; skips with a message when it is absent.

Split: the fixed held-out fifth of `bench_hippocampus.make_split` (39 cases, seed 0), linked as
the MSD ``test`` cases (``imagesTs/`` + ``labelsTs/``) of the training copy, so `resunet compare`
scores every model on cases no model trained on or selected its checkpoint with. Then, exactly as
a user would run it::

    resunet compare SPLIT --models resunet,attention_unet,unet,resunet_transformer --budget B

(one plan for the budget, the same data, split, augmentation and seed for every network, each
trained for at most ``B`` minutes) and prints the table it writes (``comparison.md``).

    python benchmarks/bench_compare_hippocampus.py --budget 3
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from bench_hippocampus import DEFAULT_DATA, make_split

MODELS = "resunet,attention_unet,unet,resunet_transformer"


def link_test_cases(split: Path, train_root: Path) -> int:
    """The held-out images / labels of ``split/test`` as the MSD test cases of ``train_root``."""
    for sub in ("imagesTs", "labelsTs"):
        (train_root / sub).mkdir(exist_ok=True)
    names = sorted(p.name for p in (split / "test" / "images").iterdir())
    for name in names:
        for src, dst in (("images", "imagesTs"), ("labels", "labelsTs")):
            target = train_root / dst / name
            if not target.exists():
                os.symlink((split / "test" / src / name).resolve(), target)
    js = json.loads((train_root / "dataset.json").read_text())
    js.update(test=[f"./imagesTs/{n}" for n in names], numTest=len(names))
    (train_root / "dataset.json").write_text(json.dumps(js, indent=1))
    return len(names)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--budget", type=float, default=3.0, help="minutes per model")
    ap.add_argument("--models", default=MODELS)
    ap.add_argument("--out", type=Path, default=Path("bench-compare-hippocampus"))
    args = ap.parse_args()
    if not (args.data / "dataset.json").is_file():
        print(f"skipped: {args.data} not found (MSD Task04_Hippocampus; see ../shared/DATA.md)")
        return
    out = args.out.resolve()
    train_root, _ = make_split(args.data.resolve(), out / "split")
    n_test = link_test_cases(out / "split", train_root)
    print(f"MSD Task04 Hippocampus: {n_test} held-out test cases (fixed fifth, seed 0); budget {args.budget:g} min per model")
    subprocess.run([sys.executable, "-m", "resunet", "compare", str(train_root), "--models", args.models,
                    "--budget", str(args.budget), "--out", str(out / "compare")], check=True)
    print((out / "compare" / "comparison.md").read_text())


if __name__ == "__main__":
    main()
