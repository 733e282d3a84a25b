"""Training throughput (samples/s of a FULL training step) of resunet's input pipeline against the
usual MONAI pipeline, with the same network, loss, optimiser and augmentation family.

Run: python benchmarks/bench_train.py [--iterations 3] [--warmup 1] [--workers 0 2] [--batch 16]
                                      [--size 128] [--base 32] [--prob-one] [--workdir DIR]
                                      [--profile]

Data (parent process, not timed): the demo's real MRI, `resunet.demo.prepare_dataset` (MNI152
2009a T1 template from the nilearn wheel cut into 20-slice axial slabs, labels background / grey
matter / white matter); the 6 ``imagesTr`` slabs (20 x 233 x 197 voxels, 1 mm) are the training
cases of both sides. Written once to ``--workdir`` (default: a temporary folder).

Identical on both sides: ``build_model("resunet", spatial_dims=2, in_channels=1, out_channels=3,
base_channels=--base, depth=5)`` (seeded init), our ``DiceFocalLoss`` with the
trainer's default settings (dice 0.5 / focal 0.5, alpha 0.7, gamma 2, batch Dice) on the integer
labels, AdamW (lr 1e-3, weight decay 1e-4) with the trainer's poly LR schedule, and the step itself:
`resunet.train.steps.train_step` (zero_grad, forward, loss, backward, grad-norm clip 12, step),
then ``scheduler.step()``. ``torch.set_num_threads(os.cpu_count())``. What differs is the
precision / memory format of the step and where the batch is made.
Augmentation family, same per-sample probabilities on both sides (the trainer's defaults; elastic
switched on at 0.2; ``--prob-one``: every transform with probability 1): rotation +-15 degrees
(p 0.2), isotropic zoom 0.85-1.25 (p 0.2), flip of each in-plane axis (p 0.5 each), elastic
deformation (p 0.2; ours alpha 2-6 px, sigma 8-12 px; MONAI control-point spacing 20 px, magnitude
1-3), gamma 0.9-1.1 (p 0.3); labels nearest-neighbour. Our other intensity transforms (brightness,
contrast, noise) are switched off, since MONAI's pipeline has no counterpart.

Each child runs in its own subprocess (peak RSS of one does not include the other):

ours        ``resunet train``'s defaults: precision / memory format ``auto`` (the trainer's own
            `choose_step_settings` on real batches of the benchmark's model: timed, guarded,
            cached; its choice is printed) and the prefetching `BatchLoader` (1 batch ahead;
            after each step the child waits until the next batch is made, so the thread's work
            stays in the child's turn and counts as its data time)
ours sync   the same without the prefetching thread (the batch made in the loop)
ours fp32   forced fp32 / contiguous, prefetching: ours' step-time gain from precision alone
MONAI wW P  MONAI's pipeline with num_workers W, the step in fp32 or under bf16 autocast (P)

ours   (exactly what ``resunet train`` does per iteration, `resunet.train.trainer`)
    setup (timed, reported): `find_dataset` + `build_cache` (preprocess: MR z-score over non-zero
           voxels, crop to non-zero; written as .npy; reused when ``--workdir`` already holds it)
           + `CacheIndex.load` (memory maps); ``PatchSampler(cases, (size, size), batch,
           foreground_fraction=0.33, seed=0)`` with the per-epoch RNGs of
           `augment_generator(seed=0, epoch=0)`.
    iteration: `make_batch` (the trainer's own function: ``sampler.sample()`` -- 16 random axial
           slices read from the memory maps, a third centred on foreground -- then
           `augment_batch` on the batch, no DataLoader: the trainer has none) = "data"; `train_step` + ``scheduler.step()`` = "step".
monai  (the usual MONAI way)
    setup (timed, reported): ``CacheDataset`` over the same 6 cases with the deterministic
           transforms cached: LoadImaged, EnsureChannelFirstd("no_channel": without metadata
           tracking it cannot read the channel axis from the header), CropForegroundd(image),
           NormalizeIntensityd(nonzero=True) (the same z-score), SpatialPadd to >= size in-plane,
           FgBgToIndicesd (MONAI's recommended precomputation for the crop below).
    random transforms, per sample dict: RandCropByPosNegLabeld(spatial_size=(size, size, 1), pos 1,
           neg 2 -> a third on foreground, num_samples 8), SqueezeDimd -> 2-D slices, RandRotated,
           RandZoomd, RandFlipd (each axis), Rand2DElasticd, RandAdjustContrastd, SelectItemsd;
           metadata tracking switched off (``set_track_meta(False)``) so MONAI runs at its fastest.
    loader: ``monai.data.DataLoader(batch_size=batch / 8, shuffle=True, num_workers=W,
           persistent_workers=W > 0)`` (list_data_collate flattens the 8 slices per case), cycled
           over epochs; every ``--workers`` value is its own child; the best is the peer.
    iteration: ``next(loader)`` + labels ``.long()`` = "data"; the same `train_step` +
           ``scheduler.step()`` = "step". MONAI's slices are in nibabel's (x, y) order, ours in
           (y, x): transposed, which does not change the cost.

Timing: the children are started one after the other (setup timed alone), then run in LOCKSTEP:
round after round, each child runs one iteration while the others wait (rotating which goes
first), so load from other processes on a shared machine hits all of them alike. A MONAI child's
loader workers are stopped (SIGSTOP) outside its turn and continued (SIGCONT) for it, so they
prefetch only alongside their own main process, as in a real run (overlapping its step and
competing with it for the cores), never during another child's turn. ``--warmup`` rounds, then
``--iterations`` timed ones; reported: samples/s = batch / median seconds per iteration, the
fastest and slowest iteration, the median data and step seconds. Then the input pipeline alone,
each child in turn: ``--data-batches`` batches without the model, total time after
``max(2, 2 W)`` untimed batches (so prefetched batches do not count; with workers this is the
loader's throughput, not per-batch latency). Peak RSS: ``ru_maxrss`` of the child (imports,
cache, model, optimiser state) and, for W > 0, of its largest worker. The ratio is ours / MONAI
(best ``--workers``) samples per second (> 1: ours is faster); as the step is the same work on
both sides, the footer also gives the ratio with one common step time (median of the children's
step times) plus each side's own data time -- an estimate, labelled as such -- and the ratio of
the pipelines alone. No assertion on speed: the numbers depend on the machine and on what else
runs on it. ``--profile`` prints the top operators of one of our iterations (torch.profiler).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from _machine import machine_line

SEED = 0
NUM_CLASSES = 3
SAMPLES_PER_CASE = 8  # MONAI: slices cropped per case dict (num_samples)
ROTATION_DEG = 15.0
ZOOM = (0.85, 1.25)
GAMMA = (0.9, 1.1)


def probabilities(prob_one: bool) -> dict[str, float]:
    if prob_one:
        return {"rotation": 1.0, "scale": 1.0, "flip": 1.0, "elastic": 1.0, "gamma": 1.0}
    return {"rotation": 0.2, "scale": 0.2, "flip": 0.5, "elastic": 0.2, "gamma": 0.3}


# --------------------------------------------------------------------------- children


def _peak_rss_mib(who: int = resource.RUSAGE_SELF) -> float:
    return resource.getrusage(who).ru_maxrss / 1024  # kB on Linux


class Side:
    """One side in a child process: its batch source plus the (identical) model, loss, optimiser
    and training step."""

    def __init__(self, args, next_batch, setup_s: float, shutdown=None, worker_pids=None, settings=None,
                 after_step=None) -> None:
        from resunet.losses import DiceFocalLoss
        from resunet.train.precision import StepSettings
        from resunet.nets import build_model
        from resunet.train.config import ScheduleConfig, StageConfig
        from resunet.train.stages import lr_factor

        self.args, self.next_batch, self.setup_s, self.shutdown = args, next_batch, setup_s, shutdown
        self.worker_pids = worker_pids or (lambda: [])
        torch.manual_seed(SEED)
        self.model = build_model("resunet", spatial_dims=2, in_channels=1, out_channels=NUM_CLASSES,
                                 base_channels=args.base, depth=5)
        self.loss_fn = DiceFocalLoss(0.5, 0.5, 0.7, 2.0, batch_dice=True)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-3, weight_decay=1e-4)
        stage = StageConfig(patch_size=[args.size, args.size], batch_size=args.batch, epochs=1,
                            iterations_per_epoch=args.warmup + args.iterations)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_factor(ScheduleConfig(), [stage]))
        self.settings = settings or StepSettings()
        self.model = self.settings.apply(self.model)
        self.scaler = torch.amp.GradScaler("cpu", enabled=False)
        self.after_step = after_step or (lambda: 0.0)  # ours: wait for the prefetched next batch
        self.losses: list[float] = []

    def signal_workers(self, sig: int) -> None:
        """SIGSTOP / SIGCONT the loader's worker processes (none for ours and W = 0)."""
        for pid in self.worker_pids():
            os.kill(pid, sig)

    def step(self, images, labels) -> None:
        from resunet.train.steps import train_step

        self.losses.append(train_step(self.model, self.settings.apply(images), labels, self.loss_fn,
                                      self.optimizer, self.scaler, self.settings.dtype))
        self.scheduler.step()

    def iteration(self) -> dict:
        t0 = time.perf_counter()
        images, labels = self.next_batch()
        t1 = time.perf_counter()
        self.step(images, labels)
        t2 = time.perf_counter()
        waited = self.after_step()
        return {"data_s": t1 - t0 + waited, "step_s": t2 - t1}

    def pipeline(self) -> dict:
        for _ in range(max(2, 2 * self.args.workers)):
            self.next_batch()
        t0 = time.perf_counter()
        for _ in range(self.args.data_batches):
            self.next_batch()
        return {"seconds": time.perf_counter() - t0}

    def profile(self) -> dict:
        from torch.profiler import ProfilerActivity, profile, record_function

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            with record_function("data (make_batch)"):
                images, labels = self.next_batch()
            with record_function("step (train_step + scheduler)"):
                self.step(images, labels)
        table = prof.key_averages().table(sort_by="cpu_time_total", row_limit=20,
                                          max_name_column_width=48)
        return {"text": table}

    def finish(self) -> dict:
        workers_rss = None
        if self.shutdown is not None:
            self.shutdown()  # persistent workers end, so RUSAGE_CHILDREN includes them
            workers_rss = _peak_rss_mib(resource.RUSAGE_CHILDREN) if self.args.workers else None
        return {"rss_mib": _peak_rss_mib(), "workers_rss_mib": workers_rss,
                "last_loss": self.losses[-1] if self.losses else None}


def _augment_config(prob_one: bool):
    from resunet.data.augment import AugmentConfig

    p = probabilities(prob_one)
    augment = AugmentConfig.disabled()
    augment.rotation.enabled, augment.rotation.p = True, p["rotation"]
    augment.rotation.degrees = (-ROTATION_DEG, ROTATION_DEG)
    augment.scale.enabled, augment.scale.p, augment.scale.zoom = True, p["scale"], ZOOM
    augment.flip.enabled, augment.flip.p = True, p["flip"]
    augment.elastic.enabled, augment.elastic.p = True, p["elastic"]
    augment.elastic.alpha, augment.elastic.sigma = (2.0, 6.0), (8.0, 12.0)
    augment.gamma.enabled, augment.gamma.p, augment.gamma.gamma = True, p["gamma"], GAMMA
    return augment


def side_ours(args) -> Side:
    from resunet.data.cache import build_cache
    from resunet.data.datasets import find_dataset, read_label
    from resunet.data.preprocess import PreprocessConfig
    from resunet.data.sampling import PatchSampler
    from resunet.train.trainer import augment_generator, make_batch

    augment = _augment_config(args.prob_one)
    t0 = time.perf_counter()
    info = find_dataset(args.dataset)
    index = build_cache(info.training, PreprocessConfig(modality="mr"), args.workdir / "cache",
                        progress=False, label_reader=lambda path: read_label(path, info))
    sampler = PatchSampler(index.cases(), (args.size, args.size), args.batch,
                           foreground_fraction=0.33, context=0, seed=0)
    sampler.reseed(SEED, 0, 0)
    generator = augment_generator(SEED, 0, 0)
    setup_s = time.perf_counter() - t0
    settings = _ours_settings(args, index.cases(), augment)
    make = lambda: make_batch(sampler, augment, generator, "cpu", settings)  # noqa: E731
    if not args.prefetch:
        return Side(args, make, setup_s, settings=settings)
    from resunet.train.loader import BatchLoader

    loader = BatchLoader(make, 10**9, args.prefetch)
    batches = iter(loader)
    # after each step: wait until the thread has made the next batch, so its work stays inside
    # this child's turn (and is counted as this child's data time)
    return Side(args, lambda: next(batches), setup_s, shutdown=loader.close, settings=settings,
                after_step=loader.wait_next)


def _ours_settings(args, cases, augment):
    """The trainer's own choice (`choose_step_settings`: timed on real batches, guarded, cached)
    for the benchmark's model, or the forced ``--precision``; printed to stderr."""
    from resunet.data.sampling import PatchSampler
    from resunet.losses import DiceFocalLoss
    from resunet.nets import build_model
    from resunet.train.precision import choose_step_settings
    from resunet.train.trainer import augment_generator, make_batch

    torch.manual_seed(SEED)
    model = build_model("resunet", spatial_dims=2, in_channels=1, out_channels=NUM_CLASSES,
                        base_channels=args.base, depth=5)

    def batches():
        sampler = PatchSampler(cases, (args.size, args.size), args.batch, foreground_fraction=0.33, seed=0)
        sampler.reseed(SEED, 99, 0)
        generator = augment_generator(SEED, 99, 0)
        return [make_batch(sampler, augment, generator, "cpu") for _ in range(5)]

    forced = args.precision != "auto"
    choice = choose_step_settings(model, batches, lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3),
                                  DiceFocalLoss(0.5, 0.5, 0.7, 2.0, batch_dice=True),
                                  precision=args.precision, memory_format="contiguous" if forced else "auto")
    print(f"ours ({args.precision}): {choice.settings}{' (cached)' if choice.cached else ''}: {choice.reason}",
          file=sys.stderr)
    return choice.settings


def _monai_transforms(size: int, p: dict[str, float]):
    import math

    from monai.transforms import (
        Compose,
        CropForegroundd,
        EnsureChannelFirstd,
        FgBgToIndicesd,
        LoadImaged,
        NormalizeIntensityd,
        Rand2DElasticd,
        RandAdjustContrastd,
        RandCropByPosNegLabeld,
        RandFlipd,
        RandRotated,
        RandZoomd,
        SelectItemsd,
        SpatialPadd,
        SqueezeDimd,
    )

    keys, modes = ("image", "label"), ("bilinear", "nearest")
    return Compose([
        # deterministic: cached by CacheDataset
        LoadImaged(keys, image_only=True),
        EnsureChannelFirstd(keys, channel_dim="no_channel"),  # no metadata: set_track_meta(False)
        CropForegroundd(keys, source_key="image", allow_smaller=True),
        NormalizeIntensityd("image", nonzero=True),
        SpatialPadd(keys, spatial_size=(size, size, -1)),
        FgBgToIndicesd("label"),
        # random: per sample dict, every time
        RandCropByPosNegLabeld(
            keys, label_key="label", spatial_size=(size, size, 1), pos=1, neg=2,
            num_samples=SAMPLES_PER_CASE, fg_indices_key="label_fg_indices",
            bg_indices_key="label_bg_indices",
        ),
        SqueezeDimd(keys, dim=-1),
        RandRotated(keys, range_x=math.radians(ROTATION_DEG), prob=p["rotation"], mode=modes,
                    padding_mode="zeros"),
        RandZoomd(keys, prob=p["scale"], min_zoom=ZOOM[0], max_zoom=ZOOM[1], mode=modes,
                  padding_mode="constant"),
        RandFlipd(keys, prob=p["flip"], spatial_axis=0),
        RandFlipd(keys, prob=p["flip"], spatial_axis=1),
        Rand2DElasticd(keys, spacing=(20, 20), magnitude_range=(1.0, 3.0), prob=p["elastic"],
                       mode=modes, padding_mode="zeros"),
        RandAdjustContrastd("image", prob=p["gamma"], gamma=GAMMA),
        SelectItemsd(keys),
    ])


def side_monai(args) -> Side:
    from monai.data import CacheDataset, DataLoader, set_track_meta
    from monai.utils import set_determinism

    from resunet.data.datasets import find_dataset

    set_track_meta(False)
    set_determinism(seed=SEED)
    if args.batch % SAMPLES_PER_CASE:
        raise SystemExit(f"--batch must be a multiple of {SAMPLES_PER_CASE} for the MONAI side")
    info = find_dataset(args.dataset)
    files = [{"image": str(c.images[0]), "label": str(c.label)} for c in info.training]
    transform = _monai_transforms(args.size, probabilities(args.prob_one))

    t0 = time.perf_counter()
    dataset = CacheDataset(files, transform, num_workers=None, progress=False)
    loader = DataLoader(dataset, batch_size=args.batch // SAMPLES_PER_CASE, shuffle=True,
                        num_workers=args.workers, persistent_workers=args.workers > 0)
    setup_s = time.perf_counter() - t0
    state = {}

    def forever():
        while True:
            iterator = iter(loader)
            state["iterator"] = iterator
            yield from iterator

    batches = forever()

    def next_batch():
        batch = next(batches)
        return batch["image"], batch["label"].long()

    images, labels = next_batch()  # shape / label check (starts the workers), not timed
    assert images.shape == (args.batch, 1, args.size, args.size), images.shape
    assert set(torch.unique(labels).tolist()) <= set(range(NUM_CLASSES))

    def worker_pids() -> list[int]:
        return [w.pid for w in getattr(state.get("iterator"), "_workers", [])]

    def shutdown():
        it = state.pop("iterator", None)
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
        time.sleep(0.2)

    from resunet.train.precision import StepSettings

    settings = StepSettings("bf16" if args.precision == "bf16" else "fp32", "contiguous")
    return Side(args, next_batch, setup_s, shutdown if args.workers else None, worker_pids, settings=settings)


def serve(args) -> None:
    """Child main loop: one command per stdin line, one tagged JSON line per reply on stdout."""
    torch.set_num_threads(os.cpu_count() or 1)
    side = side_ours(args) if args.child == "ours" else side_monai(args)

    def reply(tag: str, payload: dict) -> None:
        sys.stdout.write(f"{tag} {json.dumps(payload)}\n")
        sys.stdout.flush()

    side.signal_workers(signal.SIGSTOP)  # loader workers run only during this child's turns
    reply("READY", {"setup_s": side.setup_s, "worker_pids": side.worker_pids()})
    commands = {"iter": side.iteration, "pipeline": side.pipeline, "profile": side.profile,
                "finish": side.finish}
    try:
        for line in sys.stdin:
            cmd = line.strip()
            side.signal_workers(signal.SIGCONT)
            payload = commands[cmd]()
            if cmd == "finish":
                reply("FINISH", payload)
                return
            side.signal_workers(signal.SIGSTOP)
            reply(cmd.upper(), payload)
    finally:  # parent gone or an error: never leave stopped workers behind
        if side.shutdown is not None and side.worker_pids():
            side.signal_workers(signal.SIGCONT)


# --------------------------------------------------------------------------- parent


class Child:
    """A child process speaking the `serve` protocol."""

    def __init__(self, label: str, side: str, workers: int, args, log_dir: Path, precision: str = "fp32",
                 prefetch: int = 0) -> None:
        cmd = [
            sys.executable, str(Path(__file__).resolve()), "--child", side, "--workers", str(workers),
            "--precision", precision, "--prefetch", str(prefetch),
            "--dataset", str(args.dataset), "--workdir", str(args.workdir),
            "--iterations", str(args.iterations), "--warmup", str(args.warmup),
            "--data-batches", str(args.data_batches), "--batch", str(args.batch),
            "--size", str(args.size), "--base", str(args.base),
        ]
        if args.prob_one:
            cmd.append("--prob-one")
        self.label, self.side, self.workers, self.precision, self.prefetch = label, side, workers, precision, prefetch
        self.log = log_dir / f"{label.replace(' ', '_')}.stderr"
        self.worker_pids: list[int] = []
        self._stderr = open(self.log, "w")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self._stderr, text=True, bufsize=1,
                                     cwd=Path(__file__).resolve().parent)
        ready = self._read("READY")
        self.setup_s, self.worker_pids = ready["setup_s"], ready["worker_pids"]
        self.data: list[float] = []
        self.step: list[float] = []

    def _read(self, tag: str) -> dict:
        for line in self.proc.stdout:
            if line.startswith(tag + " "):
                return json.loads(line[len(tag) + 1:])
        self.proc.wait()
        self._stderr.flush()
        sys.stderr.write(self.log.read_text()[-4000:])
        raise SystemExit(f"{self.label} child failed (exit code {self.proc.returncode})")

    def ask(self, cmd: str) -> dict:
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        return self._read(cmd.upper())

    def close(self) -> dict:
        result = self.ask("finish")
        self.proc.wait()
        self._stderr.close()
        return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=3, help="timed training iterations")
    parser.add_argument("--warmup", type=int, default=1, help="untimed training iterations first")
    parser.add_argument("--data-batches", type=int, default=6,
                        help="batches for the pipeline-only throughput")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2],
                        help="MONAI DataLoader num_workers to try (a child per value)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=128, help="slice size (square)")
    parser.add_argument("--base", type=int, default=32, help="ResUNet base channels")
    parser.add_argument("--prob-one", action="store_true",
                        help="every augmentation with probability 1 (both sides)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="dataset + cache folder to keep between runs (default: temporary)")
    parser.add_argument("--profile", action="store_true", help="profile one of our iterations")
    parser.add_argument("--child", choices=("ours", "monai"), help=argparse.SUPPRESS)
    parser.add_argument("--precision", default="auto", help=argparse.SUPPRESS)
    parser.add_argument("--prefetch", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--dataset", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        args.workers = args.workers[0]
        serve(args)
        return

    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        args.workdir = (args.workdir or Path(tmp)).resolve()
        from resunet.demo import prepare_dataset

        args.dataset = prepare_dataset(args.workdir / "dataset")
        import monai

        torch.set_num_threads(os.cpu_count() or 1)
        print(machine_line())
        p = probabilities(args.prob_one)
        print(f"MONAI {monai.__version__}; ResUNet 2-D base {args.base}, batch {args.batch} x 1 x "
              f"{args.size}^2, AdamW, our DiceFocal on both sides; augmentation p = "
              + ", ".join(f"{k} {v:g}" for k, v in p.items()))
        print(f"lockstep rounds: {args.warmup} warm-up + {args.iterations} timed (median); pipeline "
              f"alone: {args.data_batches} batches; MNI152 demo slabs (6 training cases)")
        print()

        # ours as `resunet train` runs by default (precision auto, prefetch 1), ours without the
        # prefetching thread, ours forced to fp32 (prefetching); MONAI fp32 and under bf16 autocast
        children = [Child("ours", "ours", 0, args, Path(tmp), "auto", 1),
                    Child("ours sync", "ours", 0, args, Path(tmp), "auto", 0),
                    Child("ours fp32", "ours", 0, args, Path(tmp), "fp32", 1)]
        children += [Child(f"MONAI w{w} {p}", "monai", w, args, Path(tmp), p)
                     for p in ("fp32", "bf16") for w in args.workers]
        try:
            for r in range(args.warmup + args.iterations):
                k = r % len(children)
                for child in children[k:] + children[:k]:
                    t = child.ask("iter")
                    if r >= args.warmup:
                        child.data.append(t["data_s"])
                        child.step.append(t["step_s"])
            pipeline = {c.label: c.ask("pipeline")["seconds"] for c in children}
            profile = children[0].ask("profile")["text"] if args.profile else None
            final = {c.label: c.close() for c in children}
        finally:
            for c in children:
                if c.proc.poll() is None:  # failed: let stopped workers run (and notice) first
                    for pid in c.worker_pids:
                        try:
                            os.kill(pid, signal.SIGCONT)
                        except ProcessLookupError:
                            pass
                    c.proc.kill()

        rows = []
        for c in children:
            iters = [d + s for d, s in zip(c.data, c.step)]
            rows.append({
                "label": c.label, "side": c.side, "precision": c.precision,
                "samples_per_s": args.batch / statistics.median(iters),
                "iter_s": statistics.median(iters), "lo": min(iters), "hi": max(iters),
                "data_s": statistics.median(c.data), "step_s": statistics.median(c.step),
                "pipeline": args.batch * args.data_batches / pipeline[c.label],
                "setup_s": c.setup_s, **final[c.label],
            })
        ours, ours_sync, ours_fp32 = rows[:3]
        monai = {p: max((r for r in rows[3:] if r["precision"] == p), key=lambda r: r["samples_per_s"])
                 for p in ("fp32", "bf16")}
        header = (f"{'child':<16}{'samples/s':>11}{'s/iter':>8}{'min-max':>13}"
                  f"{'data s':>8}{'step s':>8}{'pipeline samples/s':>20}{'setup s':>9}"
                  f"{'peak RSS MiB':>14}{'workers RSS':>13}{'ours / it':>11}")
        print(header)
        print("-" * len(header))
        for r in rows:
            wrss = "-" if r["workers_rss_mib"] is None else f"{r['workers_rss_mib']:.0f}"
            span = f"{r['lo']:.2f}-{r['hi']:.2f}"
            print(f"{r['label']:<16}{r['samples_per_s']:>11.2f}{r['iter_s']:>8.2f}"
                  f"{span:>13}{r['data_s']:>8.3f}{r['step_s']:>8.2f}"
                  f"{r['pipeline']:>20.1f}{r['setup_s']:>9.2f}{r['rss_mib']:>14.0f}{wrss:>13}"
                  f"{ours['samples_per_s'] / r['samples_per_s']:>10.2f}x")
        print("(samples/s: batch / median s per whole iteration; data: time the step waited for its batch "
              "(ours: making it, or waiting for the prefetching thread; MONAI: waiting on the loader); "
              "step: train_step + LR scheduler; ours: `resunet train`'s defaults, precision auto + prefetch 1; "
              "'ours / it': ours' samples/s over that row's)")
        for p in ("fp32", "bf16"):
            m = monai[p]
            print(f"ours / MONAI {p} (best: {m['label']}) = {ours['samples_per_s'] / m['samples_per_s']:.2f}x samples/s")
        print(f"ours auto / ours forced fp32: {ours_fp32['step_s'] / ours['step_s']:.2f}x per step, "
              f"{ours['samples_per_s'] / ours_fp32['samples_per_s']:.2f}x per iteration")
        print(f"waiting for data, share of an iteration: ours (prefetch) {ours['data_s'] / ours['iter_s']:.1%}, "
              f"ours without prefetching {ours_sync['data_s'] / ours_sync['iter_s']:.1%} "
              f"({ours['samples_per_s'] / ours_sync['samples_per_s']:.2f}x samples/s from prefetching); "
              f"MONAI fp32 {monai['fp32']['data_s'] / monai['fp32']['iter_s']:.1%}")
        print(f"input pipeline alone: ours / best MONAI = "
              f"{ours_sync['pipeline'] / max(r['pipeline'] for r in rows[3:]):.1f}x samples/s")
        if profile:
            print()
            print("one of our iterations under torch.profiler (CPU):")
            print(profile)


if __name__ == "__main__":
    main()
