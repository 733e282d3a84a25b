"""`resunet bench`: how much faster the ``auto`` backend predicts than plain fp32 PyTorch, on this machine.

Setup (not timed): a seeded random ResUNet (``base`` channels, 2-D, 1 -> 3 classes, head bias
centred so all classes occur) saved as a checkpoint with CT abdomen windowing; a synthetic CT
volume of ``slices`` x ``size`` x ``size`` (air, a soft-tissue body with a fat rim, smooth denser
and lighter blobs, noise). Two predictors on the same checkpoint: ``eager`` (fp32 PyTorch) and
``auto`` (calibrated once on the first call, which is not timed). Timed: ``Predictor.predict``
of the whole volume (preprocessing, batched slices, labels back on the input grid), one warm-up
then the median of ``repeats`` runs, each side in turn in the same process. Reported: seconds,
ms per slice, the ratio eager / auto, the backend ``auto`` chose with its calibration timings,
and the Dice per class between the two masks. No assertion on speed.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

LABELS = {"background": 0, "organ": 1, "lesion": 2}


def synthetic_ct(slices: int, size: int, seed: int = 0) -> np.ndarray:
    """CT-like int16 ``(slices, size, size)`` in HU: body, fat rim, blobs, noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[-1:1:size * 1j, -1:1:size * 1j].astype(np.float32)
    body = (xx / 0.85) ** 2 + (yy / 0.65) ** 2
    base = np.where(body < 1, 40.0, -1000.0) + np.where((body > 0.8) & (body < 1), -140.0, 0.0)
    out = np.empty((slices, size, size), np.float32)
    centres = rng.uniform(-0.5, 0.5, size=(6, 2))
    offsets = np.array([-700.0, 600.0, 30.0, -40.0, 80.0, 200.0])
    for z in range(slices):
        hu = base.copy()
        for (cy, cx), off in zip(centres, offsets):
            r = 0.12 + 0.08 * np.sin(z / max(1, slices) * np.pi)
            hu += off * np.exp(-(((yy - cy) ** 2 + (xx - cx) ** 2) / r**2) ** 2) * (body < 1)
        out[z] = hu
    out += rng.normal(0, 20, size=out.shape).astype(np.float32)
    return np.clip(np.rint(out), -1000, 1000).astype(np.int16)


def make_checkpoint(path: Path, base: int, seed: int = 0) -> Path:
    """Seeded random 2-D ResUNet checkpoint; head bias centred on windowed CT-like input."""
    from resunet.data.preprocess import CT_WINDOW_PRESETS, window_ct
    from resunet.model import ModelSpec, checkpoint_payload, save_checkpoint
    from resunet.nets import build_model

    torch.manual_seed(seed)
    model = build_model("resunet", spatial_dims=2, in_channels=1, out_channels=3, base_channels=base).eval()
    with torch.no_grad():
        x = torch.from_numpy(window_ct(synthetic_ct(1, 128, seed + 1), *CT_WINDOW_PRESETS["abdomen"]))[None]
        logits = model(x)
        model.head.bias -= logits.transpose(0, 1).flatten(1).median(dim=1).values
    spec = ModelSpec.for_network(model, preprocess={"modality": "ct", "ct_window": "abdomen", "crop_to_nonzero": False},
                                 labels=LABELS, inference={"mode": "2d", "context": 0, "patch_size": [256, 256]})
    save_checkpoint(path, checkpoint_payload(spec, model.state_dict()))
    return path


def class_dice(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Dice per foreground class of `LABELS` between two label maps."""
    from resunet.metrics import dice

    return {name: dice(a == v, b == v) for name, v in LABELS.items() if v}


def bench_backends(base: int = 64, size: int = 256, slices: int = 16, repeats: int = 3,
                   batch_size: int = 8) -> dict:
    """Run the benchmark described in the module docstring; returns the figures."""
    from resunet.data.volume import Volume
    from resunet.hardware import set_threads
    from resunet.infer.predictor import Predictor

    threads = set_threads()
    previous_cache = os.environ.get("RESUNET_CACHE")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            os.environ["RESUNET_CACHE"] = str(Path(tmp) / "cache")  # calibrate afresh, leave no cache behind
            ckpt = make_checkpoint(Path(tmp) / "model.pt", base)
            volume = Volume(synthetic_ct(slices, size), (2.5, 0.8, 0.8), (0.0, 0.0, 0.0), np.eye(3))
            sides = {name: Predictor.from_file(ckpt, backend=name, batch_size=batch_size) for name in ("eager", "auto")}
            sides["auto"].predict([Volume(volume.array[:batch_size], volume.spacing, volume.origin, volume.direction)])
            times: dict[str, list[float]] = {name: [] for name in sides}
            masks = {}
            for name, predictor in sides.items():
                masks[name] = predictor.predict([volume]).array  # warm-up
            for _ in range(repeats):
                for name, predictor in sides.items():
                    t = time.perf_counter()
                    predictor.predict([volume])
                    times[name].append(time.perf_counter() - t)
    finally:
        if previous_cache is None:
            os.environ.pop("RESUNET_CACHE", None)
        else:
            os.environ["RESUNET_CACHE"] = previous_cache
    seconds = {name: statistics.median(v) for name, v in times.items()}
    choice = sides["auto"].backend_choice
    return {
        "threads": threads, "base": base, "size": size, "slices": slices, "repeats": repeats,
        "seconds": seconds, "ms_per_slice": {k: 1000 * v / slices for k, v in seconds.items()},
        "ratio": seconds["eager"] / seconds["auto"], "chosen": choice.name, "calibration_ms": choice.ms,
        "rejected": choice.rejected, "dice": class_dice(masks["auto"], masks["eager"]),
    }
