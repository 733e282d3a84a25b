"""`fit(config)`: the training loop, composed of the small parts in this package.

Data: dataset folder -> validated cases -> preprocessed cache (memory-mapped) -> `PatchSampler`
batches -> `augment_batch` on the training device. Each epoch draws its batches from RNGs seeded by
``(seed, epoch, rank)``, so a resumed run sees exactly the batches an uninterrupted run would.

SIGINT / SIGTERM (`resunet.train.signals`): the current iteration finishes; at that iteration
boundary (every rank agreeing, via an all-reduce) rank 0 writes ``last.pt`` with the full training
state -- plus the iterations of the current epoch already done and their losses -- and `fit`
raises `TrainingInterrupted` (CLI: exit code 130 / 143). ``--resume`` replays that epoch's batch
and augmentation draws up to the stop (without training on them) and continues, so the final
weights equal an uninterrupted run's (deterministic CPU). A signal arriving during validation or
the end-of-epoch save is acted on at the next iteration boundary; one arriving after the last
iteration of the last epoch lets the run finish normally.
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from resunet.data.augment import AugmentConfig, augment_batch
from resunet.data.cache import CachedCase, build_cache
from resunet.data.datasets import DatasetInfo, find_dataset, read_label, validate_dataset
from resunet.data.io import atomic_write
from resunet.data.sampling import PatchSampler
from resunet.errors import ConfigError, InputError
from resunet.losses import DiceFocalLoss
from resunet.nets import build_model, model_config
from resunet.train.checkpoint import load_checkpoint, load_matching_weights, save_checkpoint
from resunet.train.config import TrainConfig, dump_config
from resunet.train.distributed import DistInfo, all_reduce_sum, barrier, init_distributed, shutdown
from resunet.train.logger import RunLogger
from resunet.train.signals import StopRequest, TrainingInterrupted, signal_name
from resunet.train.stages import epochs_that_fit, lr_factor, shrink_last_stages, stage_for_epoch
from resunet.train.steps import dice_from_counts, train_step, validation_counts

console = Console(stderr=True)


@dataclass
class FitResult:
    run_dir: Path
    epochs_run: int
    best_val_dice: float | None
    stopped_early: bool


def default_cache_dir() -> Path:
    return Path(os.environ.get("RESUNET_CACHE", Path.home() / ".cache" / "resunet"))


def split_cases(info: DatasetInfo, config: TrainConfig) -> tuple[list[str], list[str]]:
    """Training and validation case ids: explicit ``val_cases`` or a seeded ``val_fraction``."""
    ids = [c.case_id for c in info.training]
    if config.data.val_cases:
        unknown = sorted(set(config.data.val_cases) - set(ids))
        if unknown:
            raise ConfigError(f"data.val_cases names cases not in {info.root}: {unknown}")
        val = [i for i in ids if i in set(config.data.val_cases)]
    else:
        n_val = int(round(len(ids) * config.data.val_fraction))
        if config.data.val_fraction > 0:
            n_val = max(1, n_val)
        order = np.random.default_rng(config.seed).permutation(len(ids))
        val = [ids[i] for i in sorted(order[:n_val])]
    train = [i for i in ids if i not in set(val)]
    if not train:
        raise ConfigError("no training cases left after the validation split; lower data.val_fraction")
    return train, val


def label_layout(info: DatasetInfo) -> tuple[dict[str, int], int]:
    """Label names -> values (must be 0..K-1) and the number of output channels (1 when binary)."""
    labels = dict(sorted(info.labels.items(), key=lambda kv: kv[1]))
    values = sorted(labels.values())
    if values != list(range(len(values))) or len(values) < 2:
        raise InputError(
            f"{info.dataset_json or info.root}: labels must be 0 (background), 1, ..., K-1 without gaps, "
            f"got {labels}; renumber the label maps and dataset.json (e.g. 0, 1, 5 -> 0, 1, 2)"
        )
    return labels, 1 if len(values) == 2 else len(values)


def epoch_generators(seed: int, epoch: int, rank: int = 0) -> tuple[np.random.Generator, torch.Generator]:
    """The RNGs one epoch draws its batches from: the sampler's numpy generator (slice / patch
    placement) and the CPU ``torch.Generator`` of `augment_batch`, both seeded by ``(seed, epoch,
    rank)`` only, so a resumed run sees exactly the batches an uninterrupted one would."""
    return (
        np.random.default_rng([seed, epoch, rank]),
        torch.Generator().manual_seed((seed * 1_000_003 + epoch) * 1009 + rank),
    )


def make_batch(
    sampler: PatchSampler,
    augment: AugmentConfig | None,
    generator: torch.Generator,
    device: torch.device | str = "cpu",
    channels_last: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One training batch as the loop builds it: ``sampler.sample()`` (drawn from
    ``sampler.rng``), moved to ``device``, `augment_batch` with ``augment`` (an `AugmentConfig`)
    and ``generator``; ``channels_last`` for 2-D models trained in that memory format.
    Returns ``(images (B, C, *patch) float32, labels (B, 1, *patch) int64)``."""
    images, targets = sampler.sample()
    images, targets = images.to(device), targets.to(device)
    images, targets = augment_batch(images, targets, augment, generator)
    if channels_last and images.ndim == 4:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, targets


def _seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def _resolve_device(kind: str) -> torch.device:
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' requested but no CUDA GPU is available; use device: cpu")
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(kind)


def _progress(enabled: bool) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}  {task.fields[speed]:.2f} it/s"),
        TimeElapsedColumn(),
        console=console,
        disable=not enabled,
        transient=True,
    )


def fit(config: TrainConfig, resume: bool = False) -> FitResult:
    """Train as ``config`` says; with ``resume`` continue from ``<output_dir>/last.pt``."""
    device = _resolve_device(config.device)
    dist_info = init_distributed(device.type)
    if dist_info.enabled and device.type == "cuda":
        device = torch.device("cuda", dist_info.local_rank)
    stop = StopRequest()  # SIGINT / SIGTERM handlers, installed when the epochs start
    try:
        return _fit(config, resume, device, dist_info, stop)
    finally:
        try:
            shutdown(dist_info)
        finally:
            stop.restore()


def _fit(config: TrainConfig, resume: bool, device: torch.device, dist_info: DistInfo,
         stop: StopRequest) -> FitResult:
    run_dir = Path(config.output_dir)
    last_path, best_path = run_dir / "last.pt", run_dir / "best.pt"
    if not resume and last_path.exists():
        raise ConfigError(
            f"{run_dir} already holds a run (last.pt); continue it with --resume {run_dir} or choose another output dir"
        )
    _seed_everything(config.seed, config.deterministic)

    info = find_dataset(config.data.dataset)
    validate_dataset(info)
    labels, out_channels = label_layout(info)
    class_names = [n for n, v in labels.items() if v != 0]
    train_ids, val_ids = split_cases(info, config)

    cache_dir = Path(config.data.cache_dir or default_cache_dir())
    def label_reader(path: Path):
        return read_label(path, info)

    if dist_info.is_main:
        index = build_cache(info.training, config.data.preprocess, cache_dir, label_reader=label_reader)
    barrier(dist_info)
    if not dist_info.is_main:
        index = build_cache(info.training, config.data.preprocess, cache_dir, progress=False,
                            label_reader=label_reader)
    train_cases: list[CachedCase] = [index.load(i) for i in train_ids]
    val_cases: list[CachedCase] = [index.load(i) for i in val_ids]

    num_in = train_cases[0].image.shape[0] * (2 * config.data.context + 1)
    spatial_dims = 2 if config.data.mode == "2d" else 3
    model = build_model(
        config.model.name, spatial_dims=spatial_dims, in_channels=num_in, out_channels=out_channels,
        base_channels=config.model.base_channels, depth=config.model.depth,
    ).to(device)
    if config.channels_last and spatial_dims == 2:
        model = model.to(memory_format=torch.channels_last)

    if config.init_from is not None and not resume:
        report = load_matching_weights(model, load_checkpoint(config.init_from)["state_dict"])
        if dist_info.is_main:
            console.print(f"init from {config.init_from}: {report.summary()}")

    optimizer = make_optimizer(model, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(config.schedule, config.stages))
    scaler = torch.amp.GradScaler(device.type, enabled=config.amp and device.type == "cuda")
    loss_fn = make_loss(config)
    logger = RunLogger(run_dir, class_names, enabled=dist_info.is_main)

    start_epoch, best, bad_validations = 0, None, 0
    start_iteration, resumed_losses = 0, []
    if resume:
        ckpt = load_checkpoint(last_path, map_location=device)
        model.load_state_dict(ckpt["state_dict"])
        state = ckpt["training_state"]
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng_torch"])
        start_epoch, best, bad_validations = ckpt["epoch"], state["best"], state["bad_validations"]
        # stopped by a signal mid-epoch: iterations of epoch `start_epoch` already done, their losses
        start_iteration, resumed_losses = int(state.get("iteration", 0)), list(state.get("epoch_losses", []))
        logger.restore(ckpt["history"])
    elif dist_info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        with atomic_write(run_dir / "config.yaml") as tmp:
            Path(tmp).write_text(dump_config(config))

    train_model: torch.nn.Module = model
    if dist_info.enabled:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )

    frozen = list(model.encoder_parameters())
    stage_index, sampler = -1, None
    stopped_early, epochs_run = False, 0
    predict_kwargs = dict(
        mode=config.data.mode, context=config.data.context, divisor=model.divisor,
        batch_size=config.val_batch_size, amp=config.amp,
    )
    t_start, epoch_seconds = time.perf_counter(), 0.0
    t_first_end = t_start
    stop.install()
    epoch = start_epoch - 1
    while epoch + 1 < config.total_epochs:  # the total can shrink (`_keep_to_budget`)
        epoch += 1
        t0 = time.perf_counter()
        over_budget = bool(config.max_minutes) and (t0 - t_start + epoch_seconds) > config.max_minutes * 60
        # every rank must take the same decision, or the others wait forever in a collective
        if all_reduce_sum(torch.tensor([float(over_budget)]), dist_info)[0] > 0:
            if dist_info.is_main:
                console.print(f"time budget of {config.max_minutes:g} min reached after {epoch} epochs")
            break
        idx, stage = stage_for_epoch(config.stages, epoch)
        if idx != stage_index:
            stage_index = idx
            sampler = PatchSampler(
                train_cases, stage.patch_size, stage.batch_size, config.data.foreground_fraction,
                context=config.data.context, seed=0,
            )
        sampler.rng, generator = epoch_generators(config.seed, epoch, dist_info.rank)
        freeze = frozen if epoch < config.freeze_encoder_epochs else ()

        skip = start_iteration if epoch == start_epoch else 0  # done before a signal stopped the run
        losses, stopped_at = (list(resumed_losses) if skip else []), None
        with _progress(dist_info.is_main) as bar:
            task = bar.add_task(
                f"epoch {epoch + 1}/{config.total_epochs} (stage {idx + 1}, {'x'.join(map(str, stage.patch_size))}, "
                f"batch {stage.batch_size})", total=stage.iterations_per_epoch, loss=0.0, speed=0.0,
            )
            t_iter = time.perf_counter()
            for it in range(stage.iterations_per_epoch):
                if it >= skip and stop.agreed(dist_info):  # a signal: every rank stops here
                    stopped_at = it
                    break
                images, targets = make_batch(sampler, config.augment, generator, device,
                                             config.channels_last and spatial_dims == 2)
                if it < skip:  # resumed mid-epoch: replay the draws only, these were trained on
                    bar.update(task, advance=1)
                    continue
                losses.append(train_step(train_model, images, targets, loss_fn, optimizer, scaler, config.amp, freeze))
                scheduler.step()
                bar.update(task, advance=1, loss=float(np.mean(losses[-20:])),
                           speed=(it + 1) / (time.perf_counter() - t_iter))
        if stopped_at is not None:
            _save_and_stop(stop, dist_info, run_dir, epoch, stopped_at, losses, config, lambda: {
                **_checkpoint_payload(model, config, labels, stage, epoch, logger.rows,
                                      logger.rows[-1] if logger.rows else {}),
                "training_state": _training_state(optimizer, scheduler, scaler, best, bad_validations),
            })
        train_loss = float(all_reduce_sum(torch.tensor([np.mean(losses)], dtype=torch.float64), dist_info)[0]) / dist_info.world_size

        row: dict[str, Any] = {"epoch": epoch + 1, "stage": idx + 1, "train_loss": train_loss,
                               "lr": optimizer.param_groups[0]["lr"]}
        improved = False
        if val_cases and ((epoch + 1) % config.val_interval == 0 or epoch + 1 == config.total_epochs):
            mine = val_cases[dist_info.rank :: dist_info.world_size]
            counts = validation_counts(
                model, mine, loss_fn, max(2, out_channels), device,
                patch_size=stage.patch_size, **predict_kwargs,
            )
            val_loss, dice = dice_from_counts(all_reduce_sum(counts, dist_info), max(2, out_channels))
            row.update(val_loss=val_loss, val_dice_mean=float(np.mean(dice)))
            row.update({f"val_dice_{n}": d for n, d in zip(class_names, dice)})
            improved = best is None or row["val_dice_mean"] > best
            if improved:
                best, bad_validations = row["val_dice_mean"], 0
            else:
                bad_validations += 1
        epoch_seconds = time.perf_counter() - t0
        epochs_run += 1
        row["seconds"] = round(epoch_seconds, 2)
        logger.log_epoch(row)

        if dist_info.is_main:
            payload = _checkpoint_payload(model, config, labels, stage, epoch + 1, logger.rows, row)
            if improved:
                save_checkpoint(best_path, payload)
            save_checkpoint(last_path, {**payload, "training_state": _training_state(
                optimizer, scheduler, scaler, best, bad_validations)})
            dice_text = "" if row.get("val_dice_mean") is None else "  val Dice " + "  ".join(
                f"{n} {row[f'val_dice_{n}']:.4f}" for n in class_names)
            console.print(f"epoch {epoch + 1:3d}  loss {train_loss:.4f}{dice_text}  ({row['seconds']:.0f} s)")
        barrier(dist_info)
        now = time.perf_counter()
        if epochs_run == 1:
            t_first_end = now
        pace = (now - t_first_end) / (epochs_run - 1) if epochs_run >= 3 else None
        if _keep_to_budget(config, epochs_run, epoch + 1, now - t_start, pace, dist_info):
            scheduler.lr_lambdas[0] = lr_factor(config.schedule, config.stages)
        if config.early_stopping_patience and bad_validations >= config.early_stopping_patience:
            stopped_early = True
            if dist_info.is_main:
                console.print(f"early stopping: no improvement in {bad_validations} validations")
            break
    if dist_info.is_main and not best_path.exists() and last_path.exists():
        # no validation cases: the last weights are the best we have
        save_checkpoint(best_path, {k: v for k, v in load_checkpoint(last_path).items() if k != "training_state"})
    return FitResult(run_dir, epochs_run, best, stopped_early)


def _keep_to_budget(config: TrainConfig, epochs_run: int, epochs_done: int, elapsed_s: float,
                    pace_s: float | None, dist_info: DistInfo) -> bool:
    """A planned run (``config.plan``) with a ``max_minutes`` budget that runs behind its plan
    trains fewer epochs, with the LR schedule recomputed for the new total, so the schedule still
    reaches its end inside the budget. Every rank takes rank 0's decision. True when it shrank."""
    if config.plan is None or not config.max_minutes:
        return False
    new_total = epochs_that_fit(config.total_epochs - (epochs_done - epochs_run), epochs_run, elapsed_s,
                                config.max_minutes * 60.0, pace_s)
    if new_total is not None:
        new_total += epochs_done - epochs_run  # epochs of an earlier (resumed) process
    decision = torch.tensor([float(new_total or 0) if dist_info.is_main else 0.0])
    new_total = int(all_reduce_sum(decision, dist_info)[0])
    if not new_total:
        return False
    old = config.total_epochs
    shrink_last_stages(config.stages, new_total)
    if dist_info.is_main:
        console.print(f"running behind the plan ({pace_s:.1f} s per epoch): "
                      f"{config.total_epochs} epochs instead of {old}, the LR schedule recomputed to end in the budget")
        with atomic_write(Path(config.output_dir) / "config.yaml") as tmp:
            Path(tmp).write_text(dump_config(config))
    return True


def _training_state(optimizer, scheduler, scaler, best, bad_validations) -> dict[str, Any]:
    """What ``--resume`` needs besides the weights (``last.pt`` only)."""
    return {
        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(), "rng_torch": torch.get_rng_state(),
        "best": best, "bad_validations": bad_validations,
    }


def _save_and_stop(stop: StopRequest, dist_info: DistInfo, run_dir: Path, epoch: int, iteration: int,
                   losses: list[float], config: TrainConfig, payload) -> None:
    """After a signal: rank 0 writes ``last.pt`` (``payload()`` plus where the epoch stopped), then
    every rank raises `TrainingInterrupted` saying where the run stopped and how to resume it."""
    # the losses of this epoch so far, per iteration averaged over ranks (as is in one process)
    if losses:
        losses = (all_reduce_sum(torch.tensor(losses, dtype=torch.float64), dist_info) / dist_info.world_size).tolist()
    last_path = run_dir / "last.pt"
    if dist_info.is_main:
        full = payload()
        full["training_state"].update(iteration=iteration, epoch_losses=[float(v) for v in losses])
        with stop.saving():  # a second signal waits for the complete file
            save_checkpoint(last_path, full)
    barrier(dist_info)
    stop.finish()
    iterations = stage_for_epoch(config.stages, epoch)[1].iterations_per_epoch
    where = (f"after epoch {epoch}/{config.total_epochs}" if iteration == 0 else
             f"in epoch {epoch + 1}/{config.total_epochs} after iteration {iteration}/{iterations}")
    command = f"resunet train --resume {run_dir}"
    if dist_info.enabled:
        command = f"torchrun <the same torchrun options> -m {command}"
    signum = stop.signum or 2
    raise TrainingInterrupted(
        signum,
        f"training stopped by {signal_name(signum)} {where}; the full training state is in {last_path}. "
        f"Continue exactly where it stopped with: {command}",
        checkpoint=last_path,
    )


def make_loss(config: TrainConfig) -> DiceFocalLoss:
    """The run's Dice + Focal loss as ``config.loss`` describes it."""
    c = config.loss
    return DiceFocalLoss(c.dice_weight, c.focal_weight, c.alpha, c.gamma, batch_dice=c.batch_dice)


def make_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """The run's optimiser (AdamW, or SGD with Nesterov momentum) over ``model``'s parameters."""
    o = config.optimizer
    if o.name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=o.lr, momentum=o.momentum, nesterov=True,
                               weight_decay=o.weight_decay)
    return torch.optim.AdamW(model.parameters(), lr=o.lr, weight_decay=o.weight_decay)


def _checkpoint_payload(model, config: TrainConfig, labels: dict[str, int], stage, epoch: int,
                        history: list[dict[str, Any]], row: dict[str, Any]) -> dict[str, Any]:
    """Everything `predict` needs (weights, model/preprocessing config, labels) plus the run record."""
    return {
        "state_dict": model.state_dict(),
        "model": model_config(model),
        "preprocess": config.data.preprocess.model_dump(mode="json"),
        "labels": labels,
        "inference": {"mode": config.data.mode, "context": config.data.context,
                      "patch_size": list(stage.patch_size)},
        "train_config": config.model_dump(mode="json"),
        "epoch": epoch,
        "metrics": {k: v for k, v in row.items() if isinstance(v, (int, float))},
        "history": [dict(r) for r in history],
    }
