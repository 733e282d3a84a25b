"""Does ``torch.compile`` pay for training inside a CPU time budget? Compile time vs step gain.

Run: python benchmarks/bench_compile.py [--base 8] [--batch 16] [--size 128] [--steps 12]
                                        [--precision fp32|bf16] [--dims 2|3]

One ResUNet (2-D, 3 input slices as 2.5-D; or 3-D 1 channel), the trainer's `train_step` (AdamW,
Dice + focal, grad clip) on fixed random batches with 3 classes, in ``--precision``; eager vs
``torch.compile(model)`` (inductor, default mode) from the same initial weights. Reported: the
first compiled step (compilation + one step), the median of the following steps for each, and
the number of steps after which the compiled run has caught up with eager (compile overhead /
per-step gain) -- compared with the steps a 10-minute budget holds. No assertion.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

import torch

from _machine import machine_line


def run(model, batches, dtype, steps):
    from resunet.losses import DiceFocalLoss
    from resunet.train.steps import train_step

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    loss_fn = DiceFocalLoss()
    times = []
    for i in range(steps):
        x, y = batches[i % len(batches)]
        t0 = time.perf_counter()
        train_step(model, x, y, loss_fn, optimizer, scaler, dtype)
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=int, default=8)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="bf16")
    parser.add_argument("--dims", type=int, choices=(2, 3), default=2)
    args = parser.parse_args()
    from resunet.nets import build_model

    torch.set_num_threads(os.cpu_count() or 1)
    print(machine_line())
    channels = 3 if args.dims == 2 else 1
    torch.manual_seed(0)
    model = build_model("resunet", spatial_dims=args.dims, in_channels=channels, out_channels=3,
                        base_channels=args.base, depth=5 if args.dims == 2 else 4)
    shape = (args.batch, channels, *([args.size] * args.dims))
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(shape, generator=gen), torch.randint(0, 3, (shape[0], 1, *shape[2:]), generator=gen))
               for _ in range(3)]
    dtype = torch.bfloat16 if args.precision == "bf16" else None
    eager = run(copy.deepcopy(model), batches, dtype, args.steps)
    t0 = time.perf_counter()
    compiled_model = torch.compile(copy.deepcopy(model))
    compiled = run(compiled_model, batches, dtype, args.steps)
    wrap_s = time.perf_counter() - t0 - sum(compiled)
    e, c = statistics.median(eager[2:]), statistics.median(compiled[2:])
    overhead = compiled[0] + compiled[1] + wrap_s - 2 * e
    print(f"ResUNet {args.dims}-D base {args.base}, batch {shape}, {args.precision}, {args.steps} steps each")
    print(f"eager: {e:.3f} s per step (median after 2)")
    print(f"compiled: first step {compiled[0]:.1f} s, second {compiled[1]:.2f} s, then {c:.3f} s per step")
    if c < e:
        print(f"compile overhead {overhead:.0f} s; per-step gain {e - c:.3f} s ({e / c:.2f}x): pays after "
              f"{overhead / (e - c):.0f} steps; a 10-minute budget holds about {600 / e:.0f} eager steps")
    else:
        print(f"compiled steps are not faster ({c:.3f} s vs {e:.3f} s): compile never pays here")


if __name__ == "__main__":
    main()
