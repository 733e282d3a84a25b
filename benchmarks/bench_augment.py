"""Throughput of `resunet.data.augment.augment_batch` against MONAI dictionary transforms.

Run: ``python benchmarks/bench_augment.py [--repeats N] [--threads T]``

Both sides do the same work with probability 1: rotation (+-15 degrees, around every axis in
3-D), isotropic zoom 0.85-1.25, flips of every spatial axis, an elastic deformation, gamma
0.9-1.1 on the image; the label map goes through the same spatial transforms with nearest
neighbour. MONAI applies a Compose of RandRotated, RandZoomd, Rand2DElasticd / Rand3DElasticd,
RandFlipd and RandAdjustContrastd to each sample dict (as a MONAI DataLoader would); ours is one
`augment_batch` call per batch. Metadata tracking is switched off in MONAI so it is measured at
its fastest. The table reports the median over repeats (after warm-up) of samples per second.
Nothing is asserted: the numbers depend on the machine and on what else runs on it.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

from _machine import machine_line
from resunet.data.augment import AugmentConfig, augment_batch


def _our_config() -> AugmentConfig:
    cfg = AugmentConfig.disabled()
    cfg.rotation.enabled, cfg.rotation.p, cfg.rotation.degrees = True, 1.0, (-15.0, 15.0)
    cfg.scale.enabled, cfg.scale.p, cfg.scale.zoom = True, 1.0, (0.85, 1.25)
    cfg.flip.enabled, cfg.flip.p = True, 1.0
    cfg.elastic.enabled, cfg.elastic.p = True, 1.0
    cfg.elastic.alpha, cfg.elastic.sigma = (2.0, 6.0), (8.0, 12.0)
    cfg.gamma.enabled, cfg.gamma.p, cfg.gamma.gamma = True, 1.0, (0.9, 1.1)
    return cfg


def _monai_compose(ndim: int):
    from monai.transforms import (
        Compose,
        Rand2DElasticd,
        Rand3DElasticd,
        RandAdjustContrastd,
        RandFlipd,
        RandRotated,
        RandZoomd,
    )

    keys = ("image", "label")
    modes = ("bilinear", "nearest")
    rad = math.radians(15.0)
    rot = {"range_x": rad} if ndim == 2 else {"range_x": rad, "range_y": rad, "range_z": rad}
    if ndim == 2:
        elastic = Rand2DElasticd(
            keys, spacing=(20, 20), magnitude_range=(1.0, 3.0), prob=1.0, mode=modes,
            padding_mode="zeros",
        )
    else:
        elastic = Rand3DElasticd(
            keys, sigma_range=(8.0, 12.0), magnitude_range=(200.0, 600.0), prob=1.0, mode=modes,
            padding_mode="zeros",
        )
    return Compose(
        [
            RandRotated(keys, **rot, prob=1.0, mode=modes, padding_mode="zeros"),
            RandZoomd(
                keys, prob=1.0, min_zoom=0.85, max_zoom=1.25, mode=modes, padding_mode="constant"
            ),
            elastic,
            *[RandFlipd(keys, prob=1.0, spatial_axis=a) for a in range(ndim)],
            RandAdjustContrastd("image", prob=1.0, gamma=(0.9, 1.1)),
        ]
    )


def _batch(shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """A smooth positive image (sum of blobs) and a 4-label map from thresholds of it."""
    g = torch.Generator().manual_seed(0)
    b, _, *spatial = shape
    coords = torch.meshgrid(*[torch.linspace(-1, 1, s) for s in spatial], indexing="ij")
    img = torch.zeros(shape)
    for _ in range(4):
        centre = torch.rand(b, len(spatial), generator=g) * 1.2 - 0.6
        r2 = sum(
            (c[None] - centre[:, k].reshape(b, *[1] * len(spatial))) ** 2
            for k, c in enumerate(coords)
        )
        img[:, 0] += torch.exp(-r2 / 0.08)
    label = torch.bucketize(img, torch.tensor([0.3, 0.6, 0.9])).to(torch.int64)
    return img.float(), label


def _time_interleaved(fns, repeats: int, warmup: int) -> list[list[float]]:
    """Seconds per call of each function; the functions take turns so that load from other
    processes hits all of them alike."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for k, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return times


CASES = (("2-D 16x1x256x256", (16, 1, 256, 256)), ("3-D 2x1x96^3", (2, 1, 96, 96, 96)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import monai
    from monai.data import set_track_meta
    from monai.utils import set_determinism

    set_track_meta(False)
    set_determinism(seed=0)

    print(machine_line())
    print(f"MONAI {monai.__version__}; median of {args.repeats} interleaved repeats "
          f"after {args.warmup} warm-up")
    print()
    header = (
        f"{'case':<20}{'ours samples/s':>16}{'MONAI samples/s':>17}{'ours ms':>10}"
        f"{'MONAI ms':>10}{'ratio':>8}"
    )
    print(header)
    print("-" * len(header))
    cfg = _our_config()
    for name, shape in CASES:
        image, label = _batch(shape)
        ndim = len(shape) - 2
        gen = torch.Generator().manual_seed(1)

        def ours() -> None:
            augment_batch(image, label, cfg, gen)

        compose = _monai_compose(ndim)
        samples = [{"image": image[i], "label": label[i]} for i in range(shape[0])]

        def theirs() -> None:
            with torch.no_grad():
                for sample in samples:
                    compose(dict(sample))

        times = _time_interleaved([ours, theirs], args.repeats, args.warmup)
        t_ours, t_monai = (statistics.median(t) for t in times)
        sps_ours, sps_monai = shape[0] / t_ours, shape[0] / t_monai
        print(
            f"{name:<20}{sps_ours:>16.1f}{sps_monai:>17.1f}{t_ours * 1e3:>10.0f}"
            f"{t_monai * 1e3:>10.0f}{sps_ours / sps_monai:>7.1f}x"
        )
    print("(ms: one batch; ratio: ours / MONAI samples per second)")


if __name__ == "__main__":
    main()
