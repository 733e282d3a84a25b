"""K-fold cross-validation: `train_folds` trains one model per fold and records them as an ensemble.

``config.folds = K`` (K > 1; `resunet plan DATASET --folds K` sets it and sizes each fold's share
of the budget): the labelled cases are split into K parts by `fold_splits` (a seeded permutation
dealt round-robin, so the parts differ in size by at most one case and every case validates in
exactly one fold). Fold ``k`` trains on the other K - 1 parts in ``<output_dir>/fold_<k>/`` (a whole
`fit` run: ``final.pt``, ``best.pt``, ``last.pt``, ``metrics.csv``) and validates on part ``k``. Unlabelled images
(semi-supervised) are shared by every fold and validate in none.

``<output_dir>/ensemble.json`` lists the finished folds (``members``: each fold's model, `run_checkpoint`), each
fold's validation cases and best validation Dice, and their mean: the cross-validation estimate,
every case scored by the one model that did not train on it. It is rewritten after every fold, so
``resume`` skips finished folds and continues the interrupted one from its ``last.pt``.
`resunet predict -m <output_dir>` averages the members' probabilities (`resunet.infer.ensemble`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.console import Console

from resunet.data.datasets import find_dataset
from resunet.data.io import atomic_write
from resunet.errors import ConfigError
from resunet.model import find_run_checkpoint, run_checkpoint
from resunet.train.config import TrainConfig, dump_config
from resunet.train.trainer import FitResult, fit

ENSEMBLE_FILE = "ensemble.json"
console = Console(stderr=True)


def fold_splits(case_ids: list[str], folds: int, seed: int = 0) -> list[list[str]]:
    """The validation cases of each of ``folds`` folds: the ids in a ``default_rng(seed)``
    permutation dealt round-robin, each part in the ids' own order. Every id is in exactly one
    part; part sizes differ by at most one. `ConfigError` unless ``2 <= folds <= len(case_ids)``."""
    if folds < 2:
        raise ConfigError(f"cross-validation needs at least 2 folds, got {folds}")
    if folds > len(case_ids):
        raise ConfigError(f"{folds} folds need at least {folds} labelled cases, the dataset has {len(case_ids)}; "
                          f"use --folds {max(2, len(case_ids))} or fewer")
    order = np.random.default_rng(seed).permutation(len(case_ids))
    parts = [sorted(int(i) for i in order[k::folds]) for k in range(folds)]
    return [[case_ids[i] for i in part] for part in parts]


def fold_config(config: TrainConfig, fold: int, val_cases: list[str]) -> TrainConfig:
    """``config`` for fold ``fold``: one model (``folds`` 1) in ``<output_dir>/fold_<fold>``
    validating on ``val_cases``."""
    return config.model_copy(update={
        "folds": 1, "output_dir": Path(config.output_dir) / f"fold_{fold}",
        "data": config.data.model_copy(update={"val_cases": list(val_cases), "val_fraction": 0.0}),
    }, deep=True)


@dataclass
class FoldsResult:
    run_dir: Path
    folds: list[FitResult]

    @property
    def cv_dice(self) -> float | None:
        """Mean best validation Dice over the folds (None when a fold did not validate)."""
        values = [f.best_val_dice for f in self.folds]
        return None if any(v is None for v in values) else float(np.mean(values))


def read_ensemble(run_dir: Path | str) -> dict:
    """``<run_dir>/ensemble.json`` (``{}`` when there is none)."""
    path = Path(run_dir) / ENSEMBLE_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def _write_ensemble(run_dir: Path, config: TrainConfig, splits: list[list[str]], done: dict[int, FitResult]) -> None:
    record = {
        "folds": len(splits),
        "members": [str(run_checkpoint(run_dir / f"fold_{k}").relative_to(run_dir)) for k in sorted(done)],
        "validation": {f"fold_{k}": {"cases": splits[k], "best_val_dice": done[k].best_val_dice,
                                     "epochs_run": done[k].epochs_run} for k in sorted(done)},
        "cv_dice": FoldsResult(run_dir, [done[k] for k in sorted(done)]).cv_dice if done else None,
        "complete": len(done) == len(splits),
        "seed": config.seed,
    }
    with atomic_write(run_dir / ENSEMBLE_FILE) as tmp:
        Path(tmp).write_text(json.dumps(record, indent=1))


def train_folds(config: TrainConfig, resume: bool = False) -> FoldsResult:
    """Train the ``config.folds`` folds one after another (see the module docstring); each fold
    gets ``config.max_minutes`` (the plan already divided the budget). ``resume``: folds recorded
    as finished in ``ensemble.json`` are kept, the first unfinished one resumes from its
    ``last.pt`` when it has one."""
    run_dir = Path(config.output_dir)
    info = find_dataset(config.data.dataset, unlabelled=config.semi_supervised.enabled)
    splits = fold_splits([c.case_id for c in info.training], config.folds, config.seed)
    lead = os.environ.get("RANK", "0") == "0"  # under torchrun every rank trains each fold; rank 0 records
    run_dir.mkdir(parents=True, exist_ok=True)
    if lead:
        with atomic_write(run_dir / "config.yaml") as tmp:
            Path(tmp).write_text(dump_config(config))
    previous = read_ensemble(run_dir) if resume else {}
    done: dict[int, FitResult] = {}
    for name, record in previous.get("validation", {}).items():
        k = int(name.split("_")[1])
        if find_run_checkpoint(run_dir / name) is not None:
            done[k] = FitResult(run_dir / name, record["epochs_run"], record["best_val_dice"], False)
    for k, val in enumerate(splits):
        if k in done:
            console.print(f"fold {k + 1}/{len(splits)}: finished earlier, kept")
            continue
        cfg = fold_config(config, k, val)
        console.print(f"fold {k + 1}/{len(splits)}: {len(info.training) - len(val)} cases train, {len(val)} validate "
                      f"-> {cfg.output_dir}")
        done[k] = fit(cfg, resume=resume and (Path(cfg.output_dir) / "last.pt").is_file())
        if lead:
            _write_ensemble(run_dir, config, splits, done)
    return FoldsResult(run_dir, [done[k] for k in range(len(splits))])
