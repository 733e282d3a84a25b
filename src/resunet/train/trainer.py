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

``semi_supervised.enabled``: the unlabelled images join the cache. ``method: mean_teacher``: every
step is a mean-teacher step (`resunet.train.semi_supervised`); the teacher is in ``last.pt``'s
training state, the student is validated and saved. ``method: pseudo_label``
(`resunet.train.pseudo_labels`): at the planned epochs the model labels the unlabelled images and
the epochs' samplers draw from them too; the steps are supervised steps, and the LR schedule
restarts at each labelling epoch.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from resunet.data.augment import AugmentConfig, augment_batch
from resunet.data.cache import CachedCase, build_cache
from resunet.data.datasets import DatasetInfo, find_dataset, label_layout, read_label, validate_dataset
from resunet.data.io import atomic_write
from resunet.data.sampling import PatchSampler
from resunet.errors import ConfigError
from resunet.hardware import resolve_device
from resunet.losses import DiceFocalLoss
from resunet.model import FINAL_CHECKPOINT, ModelSpec, cache_root, checkpoint_payload, load_checkpoint, load_matching_weights, save_checkpoint
from resunet.nets import build_model
from resunet.train.config import StageConfig, TrainConfig, dump_config
from resunet.train.distributed import DistInfo, all_reduce_sum, barrier, init_distributed, shutdown
from resunet.train.loader import BatchLoader, prefetch_for
from resunet.train.logger import RunLogger
from resunet.train.pseudo_labels import PseudoLabeller, labelling_epochs
from resunet.train.semi_supervised import MeanTeacher, unlabelled_summary
from resunet.train.precision import StepChoice, StepSettings, candidate_settings, choose_step_settings
from resunet.train.signals import StopRequest, TrainingInterrupted, signal_name
from resunet.train.stages import epochs_that_fit, lr_factor, shrink_last_stages, stage_for_epoch
from resunet.train.steps import summarize_validation, train_step, validation_counts

console = Console(stderr=True)

#: the precision measurement's batches: an RNG key no epoch uses, and how many (1 warm-up)
_SELECTION_EPOCH, _SELECTION_STEPS = 1_000_000, 5


@dataclass
class FitResult:
    run_dir: Path
    epochs_run: int
    best_val_dice: float | None
    stopped_early: bool


def split_cases(info: DatasetInfo, config: TrainConfig) -> tuple[list[str], list[str]]:
    """Training and validation case ids: explicit ``val_cases`` or a seeded ``val_fraction``, both
    from the labelled ``info.training`` only (``info.unlabelled`` never enters either)."""
    ids = [c.case_id for c in info.training]
    if config.data.val_cases:
        unknown = sorted(set(config.data.val_cases) - set(ids))
        unlabelled = sorted(set(unknown) & {c.case_id for c in info.unlabelled})
        if unlabelled:
            raise ConfigError(f"data.val_cases names unlabelled cases of {info.root}: {unlabelled}; a validation "
                              "case needs a label")
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


def augment_generator(seed: int, epoch: int, rank: int = 0) -> torch.Generator:
    """The CPU ``torch.Generator`` one epoch's `augment_batch` draws from, seeded by ``(seed,
    epoch, rank)`` only (as `PatchSampler.reseed` for placements), so a resumed run sees exactly
    the batches an uninterrupted one would."""
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch) * 1009 + rank)


def make_batch(
    sampler: PatchSampler,
    augment: AugmentConfig | None,
    generator: torch.Generator,
    device: torch.device | str = "cpu",
    settings: StepSettings | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One training batch as the loop builds it: ``sampler.sample()`` (drawn from
    ``sampler.rng``), moved to ``device``, `augment_batch` with ``augment`` (an `AugmentConfig`)
    and ``generator``, in the memory format of ``settings`` (default contiguous).
    Modality dropout drops whole modalities (``sampler.modalities``, each with its 2.5-D slices).
    Returns ``(images (B, C, *patch) float32, labels (B, 1, *patch) int64)``."""
    images, targets = sampler.sample()
    images, targets = images.to(device), targets.to(device)
    images, targets = augment_batch(images, targets, augment, generator, modalities=sampler.modalities)
    if settings is not None:
        images = settings.apply(images)
    return images, targets


def _seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


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
    device = resolve_device(config.device)
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


@dataclass
class _Run:
    """What the epochs of one `fit` share: the parts, and the state ``last.pt`` restores."""

    config: TrainConfig
    device: torch.device
    dist: DistInfo
    stop: StopRequest
    labels: dict[str, int]
    out_channels: int
    train_cases: list[CachedCase]
    val_cases: list[CachedCase]
    model: torch.nn.Module
    train_model: torch.nn.Module  # the model, or its DDP wrapper
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    loss_fn: DiceFocalLoss
    logger: RunLogger
    step_choice: StepChoice = field(default_factory=lambda: StepChoice(StepSettings(), "not chosen yet"))
    best: float | None = None
    bad_validations: int = 0
    start_epoch: int = 0
    start_iteration: int = 0  # resumed mid-epoch: iterations of ``start_epoch`` already trained
    resumed_losses: list[float] = field(default_factory=list)
    epochs_run: int = 0
    semi: MeanTeacher | None = None  # semi_supervised mean_teacher: the teacher and the unlabelled draws
    pseudo: PseudoLabeller | None = None  # semi_supervised pseudo_label: the labels of the unlabelled cases
    selection_seconds: float = 0.0  # spent choosing the precision / memory format
    data_wait_seconds: float = 0.0  # the last epoch's time blocked on batches
    channel_names: list[str] = field(default_factory=list)  # the dataset's, one per modality

    @property
    def run_dir(self) -> Path:
        return Path(self.config.output_dir)

    @property
    def class_names(self) -> list[str]:
        return [n for n, v in self.labels.items() if v != 0]

    @property
    def settings(self) -> StepSettings:
        """The precision and memory format every training step uses (`resunet.train.precision`)."""
        return self.step_choice.settings

    def payload(self, stage: StageConfig, epoch: int, row: dict[str, Any], state: bool) -> dict[str, Any]:
        """The checkpoint after ``epoch`` epochs: weights, `ModelSpec`, run record (+ training state)."""
        config = self.config
        spec = ModelSpec.for_network(
            self.model, preprocess=config.data.preprocess, labels=self.labels, plan=config.plan,
            inference={"mode": config.data.mode, "context": config.data.context, "patch_size": list(stage.patch_size),
                       "modality_dropout": config.augment.modality_dropout, "channel_names": self.channel_names},
        )
        record: dict[str, Any] = {
            "train_config": config.model_dump(mode="json"), "epoch": epoch,
            "metrics": {k: v for k, v in row.items() if isinstance(v, (int, float))},
            "history": [dict(r) for r in self.logger.rows],
        }
        if state:
            record["training_state"] = {
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(), "rng_torch": torch.get_rng_state(),
                "best": self.best, "bad_validations": self.bad_validations,
                "step_settings": self.step_choice.to_dict(),
            }
            if self.semi is not None or self.pseudo is not None:
                record["training_state"]["semi_supervised"] = (self.semi or self.pseudo).state_dict()
        return checkpoint_payload(spec, self.model.state_dict(), **record)


def _fit(config: TrainConfig, resume: bool, device: torch.device, dist_info: DistInfo,
         stop: StopRequest) -> FitResult:
    run_dir = Path(config.output_dir)
    if not resume and (run_dir / "last.pt").exists():
        raise ConfigError(
            f"{run_dir} already holds a run (last.pt); continue it with --resume {run_dir} or choose another output dir"
        )
    _seed_everything(config.seed, config.deterministic)
    run = _start(config, device, dist_info, stop, resume)
    stopped_early = _train_epochs(run)
    best_path, last_path = run_dir / "best.pt", run_dir / "last.pt"
    if dist_info.is_main and last_path.exists():
        weights = {k: v for k, v in load_checkpoint(last_path).items() if k != "training_state"}
        if not best_path.exists():  # no validation cases: the last weights are the best we have
            save_checkpoint(best_path, weights)
        if not stopped_early and weights["epoch"] == config.total_epochs:  # the schedule ran to its end
            save_checkpoint(run_dir / FINAL_CHECKPOINT, weights)
    return FitResult(run_dir, run.epochs_run, run.best, stopped_early)


def _load_cases(config: TrainConfig, dist_info: DistInfo) -> tuple[dict[str, int], int, list, list, list, list[str]]:
    """Labels, output channels, the cached training / validation / unlabelled cases (rank 0
    builds the cache; unlabelled cases only with ``semi_supervised.enabled``) and the dataset's
    channel names."""
    semi = config.semi_supervised.enabled
    info = find_dataset(config.data.dataset, unlabelled=semi)
    if semi:
        summary = unlabelled_summary(info, config.semi_supervised.method)  # ConfigError on every rank when there are none
        if dist_info.is_main:
            console.print(summary)
    validate_dataset(info)
    labels, out_channels = label_layout(info)
    train_ids, val_ids = split_cases(info, config)
    cache_dir = Path(config.data.cache_dir or cache_root())

    def label_reader(path: Path):
        return read_label(path, info)

    cases = info.training + info.unlabelled
    if dist_info.is_main:
        index = build_cache(cases, config.data.preprocess, cache_dir, label_reader=label_reader)
    barrier(dist_info)
    if not dist_info.is_main:
        index = build_cache(cases, config.data.preprocess, cache_dir, progress=False, label_reader=label_reader)
    return (labels, out_channels, [index.load(i) for i in train_ids], [index.load(i) for i in val_ids],
            [index.load(c.case_id) for c in info.unlabelled], list(info.channel_names))


def _lr_schedule(config: TrainConfig) -> Callable[[int], float]:
    """The run's LR multiplier per iteration: pseudo-labelling restarts it at each labelling epoch,
    so every labelling is done by weights at the end of a decay."""
    semi = config.semi_supervised
    restarts = (labelling_epochs(config.total_epochs, semi.pseudo_label_at)
                if semi.enabled and semi.method == "pseudo_label" else ())
    return lr_factor(config.schedule, config.stages, restarts)


def _start(config: TrainConfig, device: torch.device, dist_info: DistInfo, stop: StopRequest,
           resume: bool) -> _Run:
    """Data, model, optimiser, schedule, logger; the saved state when resuming, else the config written."""
    labels, out_channels, train_cases, val_cases, unlabelled, channel_names = _load_cases(config, dist_info)
    num_in = train_cases[0].image.shape[0] * (2 * config.data.context + 1)
    model = make_model(config, num_in, out_channels).to(device)
    if config.init_from is not None and not resume:
        report = load_matching_weights(model, load_checkpoint(config.init_from)["state_dict"])
        if dist_info.is_main:
            console.print(f"init from {config.init_from}: {report.summary()}")
    optimizer = make_optimizer(model, config)
    run = _Run(
        config, device, dist_info, stop, labels, out_channels, train_cases, val_cases, model, model, optimizer,
        torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_schedule(config)),
        torch.amp.GradScaler(device.type, enabled=False),
        make_loss(config), RunLogger(Path(config.output_dir), [n for n, v in labels.items() if v != 0],
                                     enabled=dist_info.is_main), channel_names=channel_names,
    )
    ckpt = load_checkpoint(run.run_dir / "last.pt", map_location=device) if resume else None
    _settle_step_settings(run, ckpt)
    if config.semi_supervised.enabled and config.semi_supervised.method == "pseudo_label":
        run.pseudo = PseudoLabeller(config, unlabelled, run.run_dir, dist_info)
    elif config.semi_supervised.enabled:  # after the settings: the teacher gets the model's memory format
        run.semi = MeanTeacher(config, run.model, unlabelled, device, dist_info, run.settings)
    if ckpt is not None:
        _restore(run, ckpt)
    elif dist_info.is_main:
        run.run_dir.mkdir(parents=True, exist_ok=True)
        with atomic_write(run.run_dir / "config.yaml") as tmp:
            Path(tmp).write_text(dump_config(config))
    if dist_info.enabled:
        run.train_model = torch.nn.parallel.DistributedDataParallel(
            run.model, device_ids=[device.index] if device.type == "cuda" else None
        )
    return run


def _settle_step_settings(run: _Run, ckpt: dict[str, Any] | None) -> None:
    """The run's precision and memory format: a resumed run's own (from ``last.pt``), else
    `choose_step_settings` on the first stage's real batches (rank 0 decides for every rank).
    Applied to the model and the grad scaler, printed, written to ``<run>/step_settings.json``."""
    config, device = run.config, run.device
    saved = (ckpt or {}).get("training_state", {}).get("step_settings")
    if saved is not None:
        run.step_choice = StepChoice.from_dict({**saved, "reason": f"kept from the run's start: {saved['reason']}"})
    else:
        t0 = time.perf_counter()
        choice = _measured_step_choice(run) if run.dist.is_main else None
        options = candidate_settings(device, config.precision, config.memory_format)
        index = torch.tensor([float(options.index(choice.settings)) if choice else 0.0])
        settings = options[int(all_reduce_sum(index, run.dist)[0])]
        run.step_choice = choice if choice is not None else StepChoice(settings, "chosen by rank 0")
        run.selection_seconds = time.perf_counter() - t0
    run.model = run.settings.apply(run.model)
    run.train_model = run.model
    run.scaler = torch.amp.GradScaler(device.type, enabled=run.settings.uses_scaler)
    if run.dist.is_main:
        choice = run.step_choice
        console.print(f"training precision {choice.settings}{' (cached)' if choice.cached else ''}: {choice.reason}")
        run.run_dir.mkdir(parents=True, exist_ok=True)
        with atomic_write(run.run_dir / "step_settings.json") as tmp:
            Path(tmp).write_text(json.dumps(choice.to_dict(), indent=1))


def _measured_step_choice(run: _Run) -> StepChoice:
    """`choose_step_settings` for the run's model on batches of its first stage, drawn from RNGs
    of their own (the epochs' draws are untouched)."""
    config, stage = run.config, run.config.stages[0]

    def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
        sampler = PatchSampler(run.train_cases, stage.patch_size, stage.batch_size, config.data.foreground_fraction,
                               context=config.data.context, seed=0)
        sampler.reseed(config.seed, _SELECTION_EPOCH, 0)
        generator = augment_generator(config.seed, _SELECTION_EPOCH)
        return [make_batch(sampler, config.augment, generator, run.device) for _ in range(_SELECTION_STEPS)]

    return choose_step_settings(run.model, batches, lambda m: make_optimizer(m, config), run.loss_fn,
                                precision=config.precision, memory_format=config.memory_format)


def _restore(run: _Run, ckpt: dict[str, Any]) -> None:
    """Weights, optimiser, schedule, scaler, RNG, best score and the epoch / iteration to continue at."""
    run.model.load_state_dict(ckpt["state_dict"])
    state = ckpt["training_state"]
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    run.scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng_torch"])
    run.start_epoch, run.best, run.bad_validations = ckpt["epoch"], state["best"], state["bad_validations"]
    # stopped by a signal mid-epoch: iterations of epoch `start_epoch` already done, their losses
    run.start_iteration, run.resumed_losses = int(state.get("iteration", 0)), list(state.get("epoch_losses", []))
    run.logger.restore(ckpt["history"])
    if run.semi is not None or run.pseudo is not None:
        (run.semi or run.pseudo).load_state_dict(state.get("semi_supervised"), str(run.run_dir / "last.pt"))


def _train_epochs(run: _Run) -> bool:
    """The epoch loop (time budget, stages, validation, checkpoints, pace, early stop); True when
    early stopping ended it."""
    config, dist_info = run.config, run.dist
    sampler_key, sampler = None, None
    # the precision measurement counts against the budget like an epoch does
    t_start, epoch_seconds = time.perf_counter() - run.selection_seconds, 0.0
    t_first_end = t_start
    run.stop.install()
    epoch = run.start_epoch - 1
    while epoch + 1 < config.total_epochs:  # the total can shrink (`_keep_to_budget`)
        epoch += 1
        t0 = time.perf_counter()
        if _budget_spent(config, t0 - t_start + epoch_seconds, dist_info, epoch):
            break
        idx, stage = stage_for_epoch(config.stages, epoch)
        if run.pseudo is not None and run.pseudo.due(epoch):
            run.pseudo.relabel(run.model, epoch, stage, amp=run.settings.dtype is not None)
        key = (idx, run.pseudo.epoch if run.pseudo else None)
        if sampler_key != key:  # a new stage, or new pseudo-labels
            sampler_key = key
            cases = run.pseudo.training_cases(run.train_cases) if run.pseudo else run.train_cases
            sampler = PatchSampler(cases, stage.patch_size, stage.batch_size, config.data.foreground_fraction,
                                   context=config.data.context, seed=0)
        sampler.reseed(config.seed, epoch, dist_info.rank)
        losses = _train_epoch(run, epoch, idx, stage, sampler)
        row = _end_epoch(run, epoch, idx, stage, losses, time.perf_counter() - t0)
        epoch_seconds = row["seconds"]
        now = time.perf_counter()
        if run.epochs_run == 1:
            t_first_end = now
        pace = (now - t_first_end) / (run.epochs_run - 1) if run.epochs_run >= 3 else None
        if _keep_to_budget(config, run.epochs_run, epoch + 1, now - t_start, pace, dist_info):
            run.scheduler.lr_lambdas[0] = _lr_schedule(config)
        if config.early_stopping_patience and run.bad_validations >= config.early_stopping_patience:
            if dist_info.is_main:
                console.print(f"early stopping: no improvement in {run.bad_validations} validations")
            return True
    return False


def _budget_spent(config: TrainConfig, seconds: float, dist_info: DistInfo, epoch: int) -> bool:
    """``max_minutes`` reached (with one more epoch of the last epoch's length); every rank agrees."""
    over_budget = bool(config.max_minutes) and seconds > config.max_minutes * 60
    # every rank must take the same decision, or the others wait forever in a collective
    if all_reduce_sum(torch.tensor([float(over_budget)]), dist_info)[0] > 0:
        if dist_info.is_main:
            console.print(f"time budget of {config.max_minutes:g} min reached after {epoch} epochs")
        return True
    return False


def _train_epoch(run: _Run, epoch: int, idx: int, stage: StageConfig, sampler: PatchSampler) -> list[float]:
    """One epoch's iterations (a resumed epoch replays the draws it already trained on); after a
    signal, ``last.pt`` is written and `TrainingInterrupted` raised. Returns the losses."""
    config, dist_info = run.config, run.dist
    generator = augment_generator(config.seed, epoch, dist_info.rank)
    frozen = list(run.model.encoder_parameters()) if epoch < config.freeze_encoder_epochs else ()
    skip = run.start_iteration if epoch == run.start_epoch else 0  # done before a signal stopped the run
    losses, stopped_at = (list(run.resumed_losses) if skip else []), None
    with _progress(dist_info.is_main) as bar:
        task = bar.add_task(
            f"epoch {epoch + 1}/{config.total_epochs} (stage {idx + 1}, {'x'.join(map(str, stage.patch_size))}, "
            f"batch {stage.batch_size})", total=stage.iterations_per_epoch, loss=0.0, speed=0.0,
        )
        t_iter = time.perf_counter()
        loader = BatchLoader(lambda: make_batch(sampler, config.augment, generator, run.device, run.settings),
                             stage.iterations_per_epoch, prefetch_for(config.prefetch_batches, run.device))
        with loader:
            for it, (images, targets) in enumerate(loader):
                if it >= skip and run.stop.agreed(dist_info):  # a signal: every rank stops here
                    stopped_at = it
                    break
                if it < skip:  # resumed mid-epoch: replay the draws only, these were trained on
                    bar.update(task, advance=1)
                    continue
                if run.semi is None:
                    losses.append(train_step(run.train_model, images, targets, run.loss_fn, run.optimizer,
                                             run.scaler, run.settings.dtype, frozen))
                else:  # mean teacher: + the consistency loss on unlabelled patches, then the teacher update
                    losses.append(run.semi.step(run.train_model, images, targets, run.loss_fn, run.optimizer,
                                                run.scaler, run.settings.dtype, frozen, epoch, it))
                run.scheduler.step()
                bar.update(task, advance=1, loss=float(np.mean(losses[-20:])),
                           speed=(it + 1) / (time.perf_counter() - t_iter))
        run.data_wait_seconds = loader.wait_seconds
    if stopped_at is not None:
        rows = run.logger.rows
        _save_and_stop(run.stop, dist_info, run.run_dir, epoch, stopped_at, losses, config,
                       lambda: run.payload(stage, epoch, rows[-1] if rows else {}, state=True))
    return losses


def _validate(run: _Run, stage: StageConfig) -> dict[str, float]:
    """Validation loss and pooled Dice per class over the validation cases (split over ranks)."""
    classes = max(2, run.out_channels)
    mine = run.val_cases[run.dist.rank :: run.dist.world_size]
    counts = validation_counts(
        run.model, mine, run.loss_fn, classes, run.device, mode=run.config.data.mode,
        context=run.config.data.context, divisor=run.model.divisor, batch_size=run.config.val_batch_size,
        amp=run.settings.dtype is not None, patch_size=stage.patch_size,
    )
    val_loss, dice = summarize_validation(all_reduce_sum(counts, run.dist), classes)
    return {"val_loss": val_loss, "val_dice_mean": float(np.mean(dice)),
            **{f"val_dice_{n}": d for n, d in zip(run.class_names, dice)}}


def _end_epoch(run: _Run, epoch: int, idx: int, stage: StageConfig, losses: list[float],
               seconds: float) -> dict[str, Any]:
    """Mean loss over ranks, validation when due, the metrics row, ``best.pt`` / ``last.pt``."""
    config, dist_info = run.config, run.dist
    mean = torch.tensor([np.mean(losses)], dtype=torch.float64)
    train_loss = float(all_reduce_sum(mean, dist_info)[0]) / dist_info.world_size
    row: dict[str, Any] = {"epoch": epoch + 1, "stage": idx + 1, "train_loss": train_loss,
                           "lr": run.optimizer.param_groups[0]["lr"],
                           # share of the epoch's training time spent waiting for batches
                           "data_wait": round(run.data_wait_seconds / max(seconds, 1e-9), 4)}
    improved = False
    if run.val_cases and ((epoch + 1) % config.val_interval == 0 or epoch + 1 == config.total_epochs):
        t0 = time.perf_counter()
        row.update(_validate(run, stage))
        seconds += time.perf_counter() - t0
        improved = run.best is None or row["val_dice_mean"] > run.best
        if improved:
            run.best, run.bad_validations = row["val_dice_mean"], 0
        else:
            run.bad_validations += 1
    run.epochs_run += 1
    row["seconds"] = round(seconds, 2)
    run.logger.log_epoch(row)
    if dist_info.is_main:
        if improved:
            save_checkpoint(run.run_dir / "best.pt", run.payload(stage, epoch + 1, row, state=False))
        save_checkpoint(run.run_dir / "last.pt", run.payload(stage, epoch + 1, row, state=True))
        dice_text = "" if row.get("val_dice_mean") is None else "  val Dice " + "  ".join(
            f"{n} {row[f'val_dice_{n}']:.4f}" for n in run.class_names)
        console.print(f"epoch {epoch + 1:3d}  loss {train_loss:.4f}{dice_text}  ({row['seconds']:.0f} s)")
    barrier(dist_info)
    return row


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


def make_model(config: TrainConfig, in_channels: int, out_channels: int) -> torch.nn.Module:
    """The network ``config.model`` describes (`ModelConfig.build_kwargs`, ``fusion``) for
    ``in_channels`` inputs (modalities x (2 * context + 1) slices) and ``out_channels`` logits:
    the one place training and timing build it. `ConfigError` for late fusion of one modality."""
    modalities = in_channels // (2 * config.data.context + 1)
    if config.model.fusion == "late" and modalities < 2:
        raise ConfigError(f"model.fusion late needs at least 2 modalities (image channels); {config.data.dataset} "
                          f"has {modalities}: use model.fusion early")
    return build_model(config.model.name, spatial_dims=2 if config.data.mode == "2d" else 3,
                       in_channels=in_channels, out_channels=out_channels, modalities=modalities,
                       modality_fusion=config.model.fusion, **config.model.build_kwargs())


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
