"""Parameters, GMAC and median CPU forward latency of the three networks at 256x256, with MONAI's
`UNet` (residual units) and `AttentionUnet` of similar size measured in the same run.

Run: python benchmarks/bench_models.py [--repeats 10] [--size 256]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from _machine import machine_line
from resunet.nets import build_model, count_macs, count_parameters


def median_latency_ms(net: torch.nn.Module, x: torch.Tensor, repeats: int) -> float:
    net.eval()
    times = []
    with torch.inference_mode():
        net(x)  # warm-up
        for _ in range(repeats):
            t0 = time.perf_counter()
            net(x)
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def monai_peers(base: int) -> dict[str, torch.nn.Module]:
    from monai.networks.nets import AttentionUnet, UNet

    channels = tuple(base * 2**i for i in range(5))
    return {
        "monai UNet (2 res units)": UNet(2, 1, 1, channels=channels, strides=(2, 2, 2, 2), num_res_units=2),
        "monai AttentionUnet": AttentionUnet(2, 1, 1, channels=channels, strides=(2, 2, 2, 2)),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--size", type=int, default=256)
    args = ap.parse_args()
    torch.manual_seed(0)
    x = torch.randn(1, 1, args.size, args.size)
    print(machine_line())
    print(f"input 1x1x{args.size}x{args.size}, fp32 eager, median of {args.repeats}\n")
    print(f"{'model':28s} {'base':>4s} {'params M':>9s} {'GMAC':>6s} {'ms':>8s} {'vs ResUNet':>10s}")
    for base in (32, 64):
        rows = {name: build_model(name, base_channels=base) for name in ("resunet", "unet", "attention_unet")}
        rows.update(monai_peers(base))
        ref = None
        for name, net in rows.items():
            ms = median_latency_ms(net, x, args.repeats)
            ref = ref or ms
            macs = count_macs(net, tuple(x.shape)) / 1e9
            print(f"{name:28s} {base:4d} {count_parameters(net) / 1e6:9.2f} {macs:6.1f} {ms:8.1f} {ms / ref:10.2f}")


if __name__ == "__main__":
    main()
