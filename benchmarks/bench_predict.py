"""Whole-volume prediction of a CT-sized volume: resunet's predictor vs the usual MONAI pipeline,
with the same network and the same weights, measured in the same run.

Run: python benchmarks/bench_predict.py [--depth-slices 48] [--size 512] [--base 64] [--repeats 3]
                                       [--mode 2d|3d] [--batch 8] [--roi 256] [--roi-depth 32]
                                       [--weights trained|random] [--train-epochs 12]

Setup (parent process, not timed): a synthetic CT-like int16 volume ``(N, size, size)`` (`synthetic_ct`:
a body with a fat rim, lung / bone / soft-tissue blobs, an "organ" holding a hypodense "tumour",
noise; fixed seed) and its labels are made; the volume is written as ``.nii.gz`` to a temporary
folder, together with a checkpoint (`save_checkpoint`) of
``build_model("resunet", spatial_dims=2 or 3, in_channels=1, out_channels=3, base_channels=base)``
with CT "abdomen" windowing (W 400 / L 50) and no crop. Its weights:

- ``--weights trained`` (default): `resunet.train.fit` trains it first on three synthetic volumes
  of other seeds (nnU-Net layout, 2-D patches 128^2 / batch 8 or 3-D 16x96^2 / batch 2, no
  augmentation). A trained network is what users predict with: its logits are decided away from
  object boundaries, so the two masks may differ only where the pipelines see different context
  (window borders) on real boundaries. Both masks are also scored against the synthetic labels.
- ``--weights random``: seeded initialisation, head bias shifted once by the per-class median
  logit on a centre crop of the volume (classes come out balanced-ish). All logits then sit close
  together, so this is the worst case for agreement; the masks mean nothing.

Each side then runs in its own subprocess (so the peak RSS of one does not include the other),
with ``torch.set_num_threads(os.cpu_count())`` on both sides, the model built once from the
checkpoint and put in eval mode (not timed), one warm-up of the whole pipeline on a small volume
(2 x 64 x 64), then ``--repeats`` timed runs of the whole pipeline (median reported):

ours   (what ``resunet predict`` does per case)
    load:    ``read_volume(input.nii.gz)`` (nibabel)
    predict: ``Predictor.predict([volume])`` = `preprocess_case` (stack, CT window, no crop, no
             resampling) -> `predict_case_logits` -> `restore_original_geometry` -> argmax labels.
             ``--mode 2d``: `predict_slices` runs the 2-D model on whole slices (padded to a
             multiple of 16), ``--batch`` slices per call; the checkpoint's 2-D ``patch_size`` is
             not used by `predict_case_logits` in 2-D mode. ``--mode 3d``: `sliding_window_predict`
             with patch ``(roi_depth, roi, roi)``, overlap 0.5 (the predictor's fixed value),
             Gaussian weighting (sigma = patch / 8), ``--batch`` windows per call.
    write:   ``write_volume(mask, out.nii.gz)`` (nibabel, header copied from the input, atomic
             write with fsync).
monai  (the usual MONAI way)
    load:    ``LoadImage(reader="NibabelReader", ensure_channel_first=True)`` (float32) +
             ``ScaleIntensityRange(a_min=L-W/2, a_max=L+W/2, b_min=0, b_max=1, clip=True)`` with
             the same window (checked once against `resunet.data.preprocess.window_ct`, not
             timed), then the axes are permuted from nibabel's (X, Y, Z) to the (Z, Y, X) order the
             model sees on our side (a 2-D network is not transpose-invariant).
    predict: under ``torch.inference_mode()``: ``--mode 2d``: ``SliceInferer(roi_size=(roi, roi),
             sw_batch_size=batch, overlap=0.25, mode="gaussian", spatial_dim=0)``; ``--mode 3d``:
             ``sliding_window_inference(roi_size=(roi_depth, roi, roi), sw_batch_size=batch,
             overlap=0.5, mode="gaussian")`` (sigma_scale 0.125, as ours); argmax over classes.
    write:   ``SaveImage(writer="NibabelWriter", output_dtype=uint8, resample=False)`` with the
             input's metadata (affine).

In 2-D mode the two sides do not do the same arithmetic: ours runs each slice whole, MONAI tiles
each slice into overlapping ``roi`` windows (at 512 / 256 / 0.25: 3 x 3 windows per slice, 2.25x
the pixels). The table reports network calls and network input voxels of each side; ``--roi 512``
(= ``--size``) makes MONAI run whole slices too. ``--mode 3d`` is the window-vs-window comparison
(same roi, overlap and Gaussian blending; window placement may differ slightly: nnU-Net-style
spreading vs MONAI's fixed interval).

Reported: median seconds per phase and in total, peak RSS of each child process
(``VmHWM``, includes imports, model and warm-up) and its RSS after setup (before the warm-up),
the speed ratio MONAI/ours (> 1: ours is faster), the Dice between the two written masks per
foreground class and their mean (also 1 - Dice), and with trained weights each mask's Dice against
the synthetic labels. No assertion on speed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from _machine import machine_line

LABELS = {"background": 0, "organ": 1, "tumour": 2}
CT_WINDOW = "abdomen"
SEED = 0
WARMUP_SHAPE = (2, 64, 64)


# --------------------------------------------------------------------------- setup (parent)


def synthetic_ct(depth: int, size: int, seed: int = SEED) -> tuple[np.ndarray, np.ndarray]:
    """CT-like int16 ``(depth, size, size)`` and its uint8 labels (0 background, 1 organ, 2 tumour).

    Air around an elliptic body of soft tissue (40 HU) with a fat rim (-100 HU); an "organ" (a
    smooth blob at +60 HU, label 1 where its profile exceeds 1/2) holding a hypodense "tumour"
    (-100 HU against the organ, label 2 where its profile exceeds 1/2); lung-, bone- and
    soft-tissue-like smooth blobs beside the organ as distractors; Gaussian noise of 20 HU; values
    clipped to -1000..1000.
    """
    rng = np.random.default_rng(seed)
    z = np.linspace(-1.0, 1.0, depth, dtype=np.float32)[:, None, None]
    y = np.linspace(-1.0, 1.0, size, dtype=np.float32)[None, :, None]
    x = np.linspace(-1.0, 1.0, size, dtype=np.float32)[None, None, :]
    body = (x / 0.85) ** 2 + (y / 0.65) ** 2  # (1, size, size), same body on every slice
    inside = body < 1.0
    hu = np.where(inside, np.float32(40.0), np.float32(-1000.0))
    hu = hu + np.where((body > 0.8) & inside, np.float32(-140.0), np.float32(0.0))  # fat rim
    hu = np.broadcast_to(hu, (depth, size, size)).astype(np.float32)

    def blob(cz: float, cy: float, cx: float, radius: float) -> np.ndarray:
        r2 = ((z - cz) / 2.0) ** 2 + (y - cy) ** 2 + (x - cx) ** 2  # blobs are long along z
        return np.exp(-((r2 / radius**2) ** 2)) * inside

    cz, cy, cx = rng.uniform(-0.3, 0.3), rng.uniform(-0.2, 0.2), rng.uniform(-0.3, 0.3)
    organ = blob(cz, cy, cx, 0.42)
    tz, ty, tx = cz + rng.uniform(-0.1, 0.1), cy + rng.uniform(-0.08, 0.08), cx + rng.uniform(-0.08, 0.08)
    tumour = blob(tz, ty, tx, 0.14) * (organ > 0.5)
    for offset, radius in ((-800.0, 0.30), (-800.0, 0.30), (650.0, 0.10), (-30.0, 0.12), (900.0, 0.06)):
        centre = rng.uniform(-0.8, 0.8), rng.uniform(-0.45, 0.45), rng.uniform(-0.6, 0.6)
        hu += np.float32(offset) * blob(*centre, radius) * np.clip(1.0 - 2.0 * organ, 0.0, 1.0)  # never inside it
    hu += np.float32(60.0) * organ - np.float32(100.0) * tumour
    labels = np.zeros(hu.shape, np.uint8)
    labels[organ > 0.5] = 1
    labels[tumour > 0.5] = 2
    hu += rng.normal(0.0, 20.0, size=hu.shape).astype(np.float32)
    return np.clip(np.rint(hu), -1000, 1000).astype(np.int16), labels


def window_tensor(hu: np.ndarray) -> torch.Tensor:
    from resunet.data.preprocess import CT_WINDOW_PRESETS, window_ct

    return torch.from_numpy(window_ct(hu, *CT_WINDOW_PRESETS[CT_WINDOW]))


@torch.inference_mode()
def balance_head(model: torch.nn.Module, image: np.ndarray, patch: tuple[int, ...]) -> None:
    """Shift the head bias by minus the per-class median logit on a centre crop of ``image``."""
    from resunet.infer.sliding_window import pad_to_multiple

    x = window_tensor(image)
    if model.spatial_dims == 2:
        x = x[x.shape[0] // 2]
    crop = tuple(
        slice(max(0, (s - p) // 2), max(0, (s - p) // 2) + p) for s, p in zip(x.shape, patch)
    )
    x, _ = pad_to_multiple(x[crop][None, None], model.divisor, spatial_ndim=model.spatial_dims)
    logits = model(x)[0].flatten(1)
    model.head.bias -= logits.median(dim=1).values


SPACING = (3.0, 0.8, 0.8)  # mm (z, y, x)
TRAIN_CASES, TRAIN_SLICES = 3, 16  # synthetic training volumes for --weights trained (other seeds)


def train_checkpoint(args: argparse.Namespace, workdir: Path) -> dict:
    """Train the benchmark's ResUNet with `resunet.train.fit` on ``TRAIN_CASES`` synthetic volumes
    of ``TRAIN_SLICES`` x size x size (seeds other than the benchmark volume's), written in the
    nnU-Net raw layout; no augmentation, no validation. Returns the trained checkpoint dict."""
    from resunet.data.augment import AugmentConfig
    from resunet.data.io import write_volume
    from resunet.data.volume import Volume
    from resunet.model.checkpoint import load_checkpoint
    from resunet.train.config import config_from_dict
    from resunet.train.trainer import fit

    data = workdir / "train_data"
    for sub in ("imagesTr", "labelsTr"):
        (data / sub).mkdir(parents=True, exist_ok=True)
    for i in range(TRAIN_CASES):
        hu, labels = synthetic_ct(TRAIN_SLICES, args.size, seed=SEED + 100 + i)
        write_volume(Volume(hu, SPACING, (0.0, 0.0, 0.0), np.eye(3)), data / "imagesTr" / f"synth{i}_0000.nii.gz")
        write_volume(Volume(labels, SPACING, (0.0, 0.0, 0.0), np.eye(3)), data / "labelsTr" / f"synth{i}.nii.gz")
    (data / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"}, "labels": LABELS, "numTraining": TRAIN_CASES, "file_ending": ".nii.gz",
    }))
    patch, batch = ([128, 128], 8) if args.mode == "2d" else ([16, 96, 96], 2)
    config = config_from_dict({
        "data": {"dataset": str(data), "cache_dir": str(workdir / "train_cache"), "val_cases": [],
                 "val_fraction": 0.0, "mode": args.mode, "context": 0, "foreground_fraction": 0.5,
                 "preprocess": {"modality": "ct", "ct_window": CT_WINDOW, "crop_to_nonzero": False}},
        "model": {"name": "resunet", "base_channels": args.base},
        "loss": {"alpha": None},
        "optimizer": {"name": "adamw", "lr": 2e-3},
        "schedule": {"kind": "poly", "warmup_iterations": 10},
        "stages": [{"patch_size": patch, "batch_size": batch, "epochs": args.train_epochs, "iterations_per_epoch": 20}],
        "augment": AugmentConfig.disabled().model_dump(),
        "seed": SEED, "device": "cpu", "output_dir": str(workdir / "train_run"),
    }, "the benchmark's training configuration")
    fit(config)
    return load_checkpoint(workdir / "train_run" / "best.pt")


def cached_training(args: argparse.Namespace, workdir: Path) -> dict:
    """`train_checkpoint`, kept under ``$RESUNET_CACHE/bench_predict`` (default
    ``~/.cache/resunet``) keyed by the arguments and the source of the data generator and the
    training recipe, so repeated runs (other backends, ROIs, sides) reuse the same trained model."""
    import hashlib
    import inspect

    from resunet.model.checkpoint import load_checkpoint, save_checkpoint

    recipe = json.dumps([args.size, args.base, args.mode, args.train_epochs, TRAIN_CASES, TRAIN_SLICES,
                         inspect.getsource(synthetic_ct), inspect.getsource(train_checkpoint)])
    cache = Path(os.environ.get("RESUNET_CACHE", Path.home() / ".cache" / "resunet")) / "bench_predict"
    path = cache / f"{hashlib.sha256(recipe.encode()).hexdigest()[:16]}.pt"
    if path.is_file():
        print(f"trained model reused from {path}")
        return load_checkpoint(path)
    payload = train_checkpoint(args, workdir)
    cache.mkdir(parents=True, exist_ok=True)
    save_checkpoint(path, {k: v for k, v in payload.items() if k != "training_state"})
    return payload


def make_case(args: argparse.Namespace, workdir: Path) -> dict:
    from resunet.data.io import write_volume
    from resunet.data.volume import Volume
    from resunet.nets import build_model, count_parameters, model_config
    from resunet.model.checkpoint import save_checkpoint

    volume, truth = synthetic_ct(args.depth_slices, args.size)
    warmup, _ = synthetic_ct(WARMUP_SHAPE[0], WARMUP_SHAPE[1], seed=SEED + 1)
    for name, arr in (("input", volume), ("warmup", warmup)):
        write_volume(Volume(arr, SPACING, (0.0, 0.0, 0.0), np.eye(3)), workdir / f"{name}.nii.gz")

    dims = 2 if args.mode == "2d" else 3
    patch = (args.roi, args.roi) if dims == 2 else (args.roi_depth, args.roi, args.roi)
    t0 = time.perf_counter()
    if args.weights == "trained":
        payload = cached_training(args, workdir)
        cfg = dict(payload["model"])
        model = build_model(cfg.pop("name"), **cfg)
        model.load_state_dict(payload["state_dict"])
    else:
        torch.manual_seed(SEED)
        model = build_model("resunet", spatial_dims=dims, in_channels=1, out_channels=3, base_channels=args.base)
        model.eval()
        balance_head(model, volume, patch)
    save_checkpoint(
        workdir / "model.pt",
        {
            "state_dict": model.state_dict(),
            "model": model_config(model),
            "preprocess": {"modality": "ct", "ct_window": CT_WINDOW, "crop_to_nonzero": False},
            "labels": LABELS,
            # 3-D: both sides slide the same window; 2-D: ours runs whole slices whatever this says
            "inference": {"mode": args.mode, "context": 0, "patch_size": list(patch)},
        },
    )
    return {
        "params_m": count_parameters(model) / 1e6,
        "input_mb": (workdir / "input.nii.gz").stat().st_size / 2**20,
        "hu_range": (int(volume.min()), int(volume.max())),
        "truth": truth,
        "train_s": time.perf_counter() - t0,
    }


# --------------------------------------------------------------------------- children


def _rss_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


class NetCounter:
    """Forward pre-hook counting network calls and input voxels (batch x spatial); without a
    model, count through `wrap` (backends that are not torch modules)."""

    def __init__(self, model: torch.nn.Module | None = None) -> None:
        self.calls = self.voxels = 0
        if model is not None:
            model.register_forward_pre_hook(self)

    def __call__(self, module: torch.nn.Module, inputs: tuple) -> None:
        x = inputs[0]
        self.calls += 1
        self.voxels += x.shape[0] * int(np.prod(x.shape[2:]))

    def reset(self) -> None:
        self.calls = self.voxels = 0

    def wrap(self, net):
        """A callable counting the calls of ``net`` (for backends that are not torch modules)."""

        def counted(x):
            self(None, (x,))
            return net(x)

        counted.training = False
        return counted


def _timed(pipeline, src: Path, dst: Path, repeats: int, counter: NetCounter) -> dict:
    pipeline(src.with_name("warmup.nii.gz"), dst.with_name(f".warmup_{dst.name}"))
    phases: dict[str, list[float]] = {"load": [], "predict": [], "write": [], "total": []}
    for _ in range(repeats):
        counter.reset()
        t = pipeline(src, dst)
        for k, v in t.items():
            phases[k].append(v)
        phases["total"].append(sum(t.values()))
    return {
        "seconds": {k: statistics.median(v) for k, v in phases.items()},
        "all_totals": phases["total"],
        "net_calls": counter.calls,
        "net_voxels": counter.voxels,
    }


def child_ours(args: argparse.Namespace, workdir: Path) -> dict:
    from resunet.data.io import read_volume, write_volume
    from resunet.infer.predictor import Predictor

    os.environ["RESUNET_CACHE"] = str(workdir / "cache")  # auto calibrates in this run (in the warm-up)
    predictor = Predictor.from_file(workdir / "model.pt", batch_size=args.batch, backend=args.backend)
    # auto: calibrate on this input's own slices now (not timed), as `resunet predict` does on its first case
    predictor.resolve_backend(torch.from_numpy(predictor.prepare([read_volume(workdir / "input.nii.gz")]).image))
    counter = NetCounter()
    predictor.net = counter.wrap(predictor.net)
    setup_rss = _rss_mib("VmRSS")

    def pipeline(src: Path, dst: Path) -> dict[str, float]:
        t0 = time.perf_counter()
        volume = read_volume(src)
        t1 = time.perf_counter()
        mask = predictor.predict([volume])
        t2 = time.perf_counter()
        write_volume(mask, dst)
        t3 = time.perf_counter()
        return {"load": t1 - t0, "predict": t2 - t1, "write": t3 - t2}

    out = _timed(pipeline, workdir / "input.nii.gz", workdir / "ours_mask.nii.gz", args.repeats, counter)
    choice = predictor.backend_choice
    return {**out, "setup_rss_mib": setup_rss, "backend": predictor.backend,
            "calibration_ms": choice.ms if choice else None, "slice_batch": predictor.max_batch_pixels}


def child_monai(args: argparse.Namespace, workdir: Path) -> dict:
    from monai.data import MetaTensor
    from monai.inferers import SliceInferer, sliding_window_inference
    from monai.transforms import LoadImage, SaveImage, ScaleIntensityRange

    from resunet.data.preprocess import CT_WINDOW_PRESETS, window_ct
    from resunet.nets import build_model
    from resunet.model.checkpoint import load_checkpoint

    ckpt = load_checkpoint(workdir / "model.pt")
    cfg = dict(ckpt["model"])
    model = build_model(cfg.pop("name"), **cfg)
    model.load_state_dict(ckpt["state_dict"])
    model.eval()
    counter = NetCounter(model)

    width, level = CT_WINDOW_PRESETS[CT_WINDOW]
    load = LoadImage(reader="NibabelReader", image_only=True, ensure_channel_first=True)
    scale = ScaleIntensityRange(a_min=level - width / 2, a_max=level + width / 2, b_min=0.0, b_max=1.0, clip=True)
    save = SaveImage(
        writer="NibabelWriter", output_ext=".nii.gz", output_dtype=np.uint8, resample=False,
        separate_folder=False, print_log=False,
    )
    if args.mode == "2d":
        inferer = SliceInferer(
            roi_size=(args.roi, args.roi), sw_batch_size=args.batch, overlap=0.25, mode="gaussian",
            spatial_dim=0,
        )

        def infer(x: torch.Tensor) -> torch.Tensor:
            return inferer(x, model)
    else:
        def infer(x: torch.Tensor) -> torch.Tensor:
            return sliding_window_inference(
                x, (args.roi_depth, args.roi, args.roi), args.batch, model, overlap=0.5, mode="gaussian",
                sigma_scale=0.125,
            )

    # Same preprocessing as ours? (checked once, not timed)
    img = load(workdir / "warmup.nii.gz")
    ref = window_ct(np.asarray(img), width, level)
    window_max_diff = float(np.abs(np.asarray(scale(img)) - ref).max())
    setup_rss = _rss_mib("VmRSS")

    def pipeline(src: Path, dst: Path) -> dict[str, float]:
        t0 = time.perf_counter()
        img = scale(load(src))  # (1, X, Y, Z) MetaTensor
        x = img.as_tensor().permute(0, 3, 2, 1)[None]  # (1, 1, Z, Y, X), the order ours feeds the net
        t1 = time.perf_counter()
        with torch.inference_mode():
            logits = infer(x)
            labels = torch.argmax(logits, dim=1).to(torch.uint8)[0]  # (Z, Y, X)
        mask = MetaTensor(labels.permute(2, 1, 0)[None].contiguous(), meta=img.meta)  # input affine
        t2 = time.perf_counter()
        save(mask, filename=str(dst).removesuffix(".nii.gz"))
        t3 = time.perf_counter()
        return {"load": t1 - t0, "predict": t2 - t1, "write": t3 - t2}

    out = _timed(pipeline, workdir / "input.nii.gz", workdir / "monai_mask.nii.gz", args.repeats, counter)
    return {**out, "setup_rss_mib": setup_rss, "window_max_diff": window_max_diff}


def run_child(side: str, argv: list[str], workdir: Path) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--child", side, "--workdir", str(workdir)]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:  # library warnings on stderr are shown only when a child fails
        raise SystemExit(f"{side} child failed with exit status {proc.returncode}:\n{proc.stdout}{proc.stderr}")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT ") :])


# --------------------------------------------------------------------------- agreement (parent)


def dice_table(ours: np.ndarray, monai: np.ndarray) -> list[tuple[str, float, float, float]]:
    """``(class, ours %, monai %, Dice)`` per foreground class; Dice = 1 when both are empty."""
    rows = []
    for name, value in LABELS.items():
        if value == 0:
            continue
        a, b = ours == value, monai == value
        total = int(a.sum()) + int(b.sum())
        dice = 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total
        rows.append((name, 100.0 * a.mean(), 100.0 * b.mean(), dice))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--depth-slices", type=int, default=48, help="slices N of the (N, size, size) volume")
    ap.add_argument("--size", type=int, default=512, help="in-plane size")
    ap.add_argument("--base", type=int, default=64, help="base_channels of the ResUNet")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--mode", choices=("2d", "3d"), default="2d")
    ap.add_argument("--batch", type=int, default=8, help="slices (ours 2d) / windows per network call, both sides")
    ap.add_argument("--roi", type=int, default=256, help="in-plane window: MONAI SliceInferer (2d), both sides (3d)")
    ap.add_argument("--roi-depth", type=int, default=32, help="window depth in 3d mode (multiple of 16)")
    ap.add_argument("--backend", default="auto", help="ours: predictor backend (auto = what resunet predict uses)")
    ap.add_argument("--weights", choices=("trained", "random"), default="trained",
                    help="trained: fit on synthetic cases first (realistic logits); random: seeded init")
    ap.add_argument("--train-epochs", type=int, default=12, help="--weights trained: epochs of 20 iterations")
    ap.add_argument("--sides", default="ours,monai", help="which sides to run (e.g. 'ours' for a memory check)")
    ap.add_argument("--child", choices=("ours", "monai"), help=argparse.SUPPRESS)
    ap.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()

    torch.set_num_threads(os.cpu_count() or 1)  # same on both sides (and in the parent)
    if args.child:
        result = (child_ours if args.child == "ours" else child_monai)(args, args.workdir)
        # VmHWM, not ru_maxrss: Linux keeps ru_maxrss across exec, so it would include the
        # parent's peak (training the model) that this child was forked from
        result["peak_rss_mib"] = _rss_mib("VmHWM")
        result["threads"] = torch.get_num_threads()
        print("RESULT " + json.dumps(result), flush=True)
        return

    print(machine_line())
    passthrough = sys.argv[1:]
    with tempfile.TemporaryDirectory(prefix="bench_predict_") as tmp:
        workdir = Path(tmp)
        info = make_case(args, workdir)
        n, s = args.depth_slices, args.size
        dims = 2 if args.mode == "2d" else 3
        weights_text = (
            f"trained by resunet.train.fit on {TRAIN_CASES} synthetic {TRAIN_SLICES}x{s}x{s} volumes of other "
            f"seeds ({args.train_epochs} x 20 iterations; setup {info['train_s']:.0f} s, not timed)"
            if args.weights == "trained" else "random seeded weights (head bias balanced)"
        )
        print(
            f"volume {n}x{s}x{s} int16 HU {info['hu_range'][0]}..{info['hu_range'][1]} "
            f"({info['input_mb']:.1f} MiB .nii.gz); resunet {dims}-D base {args.base} "
            f"({info['params_m']:.2f} M params), 3 classes, {weights_text}; fp32, "
            f"torch.set_num_threads({os.cpu_count()}) on both sides; median of {args.repeats} "
            f"after 1 warm-up on {'x'.join(map(str, WARMUP_SHAPE))}"
        )
        if args.mode == "2d":
            print(
                f"mode 2d: ours = Predictor (backend {args.backend}, whole slices padded to /16, <= {args.batch} "
                f"slices and <= 2 x 256^2 pixels per call); "
                f"MONAI = SliceInferer roi {args.roi}x{args.roi}, overlap 0.25, gaussian, sw_batch_size {args.batch}"
            )
        else:
            print(
                f"mode 3d: both sliding windows of {args.roi_depth}x{args.roi}x{args.roi}, overlap 0.5, "
                f"gaussian (sigma 1/8), {args.batch} windows per call"
            )
        sides = [x for x in ("ours", "monai") if x in args.sides.split(",")]
        res = {side: run_child(side, passthrough, workdir) for side in sides}

        import nibabel as nib

        imgs = {side: nib.load(str(workdir / f"{side}_mask.nii.gz")) for side in res}
        ref_affine = nib.load(str(workdir / "input.nii.gz")).affine
        masks = {side: np.asanyarray(img.dataobj) for side, img in imgs.items()}
        truth_xyz = info["truth"].transpose(2, 1, 0)  # written masks are nibabel's (X, Y, Z)
        same_grid = all(
            m.shape == truth_xyz.shape and np.allclose(imgs[k].affine, ref_affine, atol=1e-4)
            for k, m in masks.items()
        )

    print()
    print(
        f"{'side':6s} {'total s':>8s} {'load s':>7s} {'predict s':>9s} {'write s':>8s} "
        f"{'net calls':>9s} {'net Mvox':>9s} {'peak RSS MiB':>12s} {'setup RSS MiB':>13s}"
    )
    for side, r in res.items():
        sec = r["seconds"]
        print(
            f"{side:6s} {sec['total']:8.2f} {sec['load']:7.2f} {sec['predict']:9.2f} {sec['write']:8.2f} "
            f"{r['net_calls']:9d} {r['net_voxels'] / 1e6:9.2f} {r['peak_rss_mib']:12.0f} {r['setup_rss_mib']:13.0f}"
        )
    print(
        "  (ours: load = read_volume, predict = Predictor.predict incl. CT windowing; "
        "monai: load = LoadImage + ScaleIntensityRange, predict = inferer + argmax; write = NIfTI .nii.gz)"
    )
    print("  total s of every repeat: " + "; ".join(
        f"{side} " + ", ".join(f"{t:.2f}" for t in r["all_totals"]) for side, r in res.items()
    ))
    ours = res.get("ours")
    if ours:
        print(f"ours: backend {ours['backend']} (calibration ms per batch: {ours['calibration_ms']}), "
              f"at most {ours['slice_batch']} pixels per forward pass")
    if args.weights == "trained" and same_grid:
        print()
        print("segmentation quality, Dice against the synthetic volume's labels:")
        print(f"{'class':8s} " + " ".join(f"{side:>7s}" for side in masks))
        scores = {side: dice_table(m, truth_xyz) for side, m in masks.items()}
        for i, (name, *_) in enumerate(next(iter(scores.values()))):
            print(f"{name:8s} " + " ".join(f"{scores[side][i][3]:7.4f}" for side in masks))
    if len(res) < 2:
        return
    ratio = res["monai"]["seconds"]["total"] / res["ours"]["seconds"]["total"]
    print(f"speed ratio MONAI/ours (total): {ratio:.2f}  (> 1: ours faster)")
    print(
        f"threads: ours {res['ours']['threads']}, monai {res['monai']['threads']}; "
        f"CT window max |ScaleIntensityRange - window_ct| = {res['monai']['window_max_diff']:.1e}"
    )
    print()
    if not same_grid:
        print("agreement: masks do not share the input's shape/affine -- Dice not computed")
        return
    rows = dice_table(masks["ours"], masks["monai"])
    print(f"{'class':8s} {'ours %':>7s} {'monai %':>8s} {'Dice':>7s} {'1 - Dice':>9s}")
    for name, pa, pb, d in rows:
        print(f"{name:8s} {pa:7.2f} {pb:8.2f} {d:7.4f} {1 - d:9.2e}")
    mean = statistics.mean(d for *_, d in rows)
    equal = float((masks["ours"] == masks["monai"]).mean())
    print(f"{'mean':8s} {'':7s} {'':8s} {mean:7.4f} {1 - mean:9.2e}   (voxels with equal labels: {100 * equal:.3f} %)")
    if args.weights == "random":
        print("  (random weights: Dice measures agreement of the two pipelines, not segmentation quality)")


if __name__ == "__main__":
    main()
