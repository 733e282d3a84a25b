"""`resunet serve http` under concurrent load on loopback: dynamic batching on vs off, same run.

Run: python benchmarks/bench_serve.py [--clients 16] [--duration 20] [--warmup 3] [--size 256]
                                      [--base 16] [--max-batch 8] [--max-wait-ms 10] [--queue-size 64]
     60-s load test of the reliability issue: python benchmarks/bench_serve.py --duration 60 --clients 32

Setup (not timed): a randomly initialised (seeded) 2-D ``resunet`` (``--base`` channels, depth 5,
1 input channel, 3 classes; z-score normalisation, no crop) is saved with `save_checkpoint`, and
one synthetic ``--size`` x ``--size`` 8-bit grayscale PNG (smooth blobs plus noise, fixed seed) is
written to a temporary folder. Random weights make meaningless masks; only speed is measured.

For each mode -- ``on``: ``--max-batch 8 --max-wait-ms 10``, ``off``: ``--max-batch 1`` -- a fresh
server is started as a subprocess (``python -m resunet serve http --port 0 --log-level warning``,
torch's default thread count, the same model, payload and queue size). Then:

1. warm-up, not measured: ``--clients`` clients post for ``--warmup`` seconds;
2. measured: ``--clients`` threads in this process, each with its own keep-alive ``httpx2``
   client, post the PNG as multipart field ``file`` back to back for ``--duration`` seconds and
   wait for each answer (a closed loop: at most ``--clients`` requests in flight). A client starts
   no request after the deadline; requests still running then finish and are counted.

Reported per mode: requests completed, throughput (completed / seconds from the start of the
measured phase to the last answer), client-side latency p50/p99 in ms (request sent -> whole mask
received, all statuses), mean batch size (items / batches of the server's ``/metrics`` during the
measured phase), 5xx answers (503 counted apart: it is the designed overload answer), and the
server's RSS (``VmRSS`` of the subprocess, MiB) right after the warm-up, at the end and its growth
in %. Last line: throughput ratio on / off. ``--forward-batch`` (the server's ``--batch-size``, default
8) caps how many images one network forward takes inside a model call: with 8, a batch of 8
requests is one forward of 8 images; with 1, batching only saves per-call overhead. The 1-minute
load average before and after is printed because other processes on the machine skew the numbers. Clients and server share this machine's CPUs, so the
client threads' own CPU time is part of the picture (the same for both modes). No assertions.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx2 as httpx
import numpy as np
import torch
from PIL import Image

from _machine import machine_line

SEED = 0
LABELS = {"background": 0, "organ": 1, "lesion": 2}


def make_inputs(folder: Path, size: int, base: int) -> tuple[Path, Path]:
    """Checkpoint of a seeded random 2-D ResUNet and one synthetic PNG."""
    from resunet.nets import build_model, count_parameters, model_config
    from resunet.model.checkpoint import save_checkpoint

    torch.manual_seed(SEED)
    model = build_model("resunet", spatial_dims=2, in_channels=1, out_channels=3, base_channels=base)
    save_checkpoint(folder / "model.pt", {
        "state_dict": model.state_dict(), "model": model_config(model),
        "preprocess": {"modality": "none", "normalization": "zscore", "crop_to_nonzero": False},
        "labels": LABELS, "inference": {"mode": "2d", "context": 0, "patch_size": [size, size]},
    })
    rng = np.random.default_rng(SEED)
    y, x = np.mgrid[0:size, 0:size] / size
    img = np.zeros((size, size))
    for _ in range(6):
        cy, cx, r = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.05, 0.2)
        img += rng.uniform(40, 120) * np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / r**2)
    img += rng.normal(0, 8, img.shape)
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(folder / "image.png")
    print(f"model: resunet 2-D base {base} ({count_parameters(model) / 1e6:.2f} M params, random weights); "
          f"payload {size}x{size} PNG ({(folder / 'image.png').stat().st_size / 1024:.0f} KiB)")
    return folder / "model.pt", folder / "image.png"


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))


def start_server(model: Path, log: Path, max_batch: int, args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "resunet", "serve", "http", "-m", str(model), "--port", "0",
           "--max-batch", str(max_batch), "--max-wait-ms", str(args.max_wait_ms),
           "--queue-size", str(args.queue_size), "--batch-size", str(args.forward_batch), "--log-level", "warning"]
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=fh, env={k: v for k, v in os.environ.items()
                                                                  if k != "RESUNET_TOKEN"})
    deadline = time.monotonic() + 120
    while "listening on" not in (text := log.read_text()):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise SystemExit(f"server did not start:\n{text}")
        time.sleep(0.05)
    return proc, text.split("listening on ")[1].split()[0]


def load(url: str, payload: bytes, clients: int, seconds: float) -> tuple[list[tuple[int, float]], float]:
    """Closed-loop load; returns ``[(status, latency s)]`` and the seconds until the last answer."""
    results: list[tuple[int, float]] = []
    lock = threading.Lock()
    start = time.perf_counter()
    stop_at = start + seconds
    last = [start]

    def client() -> None:
        with httpx.Client(timeout=120) as c:
            while time.perf_counter() < stop_at:
                t0 = time.perf_counter()
                try:
                    r = c.post(f"{url}/v1/segment", files={"file": ("image.png", payload, "image/png")})
                    status = r.status_code
                except httpx.HTTPError:
                    status = -1  # connection-level failure
                t1 = time.perf_counter()
                with lock:
                    results.append((status, t1 - t0))
                    last[0] = max(last[0], t1)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, last[0] - start


def run_mode(name: str, model: Path, payload: bytes, folder: Path, args: argparse.Namespace, max_batch: int) -> dict:
    proc, url = start_server(model, folder / f"server_{name}.log", max_batch, args)
    try:
        load(url, payload, args.clients, args.warmup)
        before = httpx.get(f"{url}/metrics").json()["batches"]
        rss_warm = rss_mib(proc.pid)
        rss_peak = [rss_warm]
        done = threading.Event()

        def sample() -> None:
            while not done.wait(1.0):
                rss_peak[0] = max(rss_peak[0], rss_mib(proc.pid))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        results, elapsed = load(url, payload, args.clients, args.duration)
        done.set()
        sampler.join()
        rss_end = rss_mib(proc.pid)
        after = httpx.get(f"{url}/metrics").json()["batches"]
    finally:
        proc.terminate()
        proc.wait(60)
    lat = np.asarray([s for _, s in results]) * 1000.0
    statuses = [st for st, _ in results]
    batches, items = after["total"] - before["total"], after["items"] - before["items"]
    return {
        "mode": name, "max_batch": max_batch, "requests": len(results), "ok": statuses.count(200),
        "throughput": len(results) / elapsed, "p50": float(np.percentile(lat, 50)), "p99": float(np.percentile(lat, 99)),
        "mean_batch": items / batches if batches else 0.0,
        "5xx": sum(1 for st in statuses if st >= 500 and st != 503), "503": statuses.count(503),
        "failed": statuses.count(-1), "rss_warm": rss_warm, "rss_end": rss_end, "rss_peak": rss_peak[0],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=16, help="concurrent clients (closed loop)")
    ap.add_argument("--duration", type=float, default=20.0, help="measured seconds per mode")
    ap.add_argument("--warmup", type=float, default=3.0, help="unmeasured seconds of load first")
    ap.add_argument("--size", type=int, default=256, help="PNG side in pixels")
    ap.add_argument("--base", type=int, default=16, help="base_channels of the ResUNet")
    ap.add_argument("--max-batch", type=int, default=8, help="max batch of the 'on' mode")
    ap.add_argument("--max-wait-ms", type=float, default=10.0, help="batching wait (ms), both modes")
    ap.add_argument("--queue-size", type=int, default=64, help="server queue size, both modes")
    ap.add_argument("--forward-batch", type=int, default=8,
                    help="server --batch-size: images (slices) per network forward inside one model call")
    ap.add_argument("--modes", default="on,off", help="on, off or on,off")
    args = ap.parse_args()

    print(machine_line())
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    with tempfile.TemporaryDirectory(prefix="bench_serve_") as tmp:
        folder = Path(tmp)
        model, image = make_inputs(folder, args.size, args.base)
        payload = image.read_bytes()
        print(f"{args.clients} clients, closed loop, {args.warmup:g} s warm-up + {args.duration:g} s measured per mode; "
              f"max-wait {args.max_wait_ms:g} ms, queue {args.queue_size}, forward batch {args.forward_batch}; "
              f"load average before: {os.getloadavg()[0]:.2f}")
        rows = [run_mode(m, model, payload, folder, args, args.max_batch if m == "on" else 1) for m in modes]

    print()
    print(f"{'batching':9s} {'max':>4s} {'requests':>8s} {'req/s':>7s} {'p50 ms':>8s} {'p99 ms':>8s} "
          f"{'mean batch':>10s} {'5xx':>4s} {'503':>4s} {'conn err':>8s} {'RSS warm':>8s} {'RSS end':>8s} "
          f"{'RSS peak':>8s} {'growth':>7s}")
    for r in rows:
        growth = 100.0 * (r["rss_end"] - r["rss_warm"]) / r["rss_warm"]
        print(f"{r['mode']:9s} {r['max_batch']:4d} {r['requests']:8d} {r['throughput']:7.1f} {r['p50']:8.1f} "
              f"{r['p99']:8.1f} {r['mean_batch']:10.2f} {r['5xx']:4d} {r['503']:4d} {r['failed']:8d} "
              f"{r['rss_warm']:8.0f} {r['rss_end']:8.0f} {r['rss_peak']:8.0f} {growth:6.1f}%")
    print("  (RSS of the server process in MiB: after warm-up, at the end, peak of 1-s samples; "
          "growth = end vs after warm-up)")
    print(f"load average (1 min) after: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs "
          "(above the CPU count: other processes competed for the CPUs)")
    by = {r["mode"]: r for r in rows}
    if "on" in by and "off" in by:
        print(f"throughput ratio batching on / off: {by['on']['throughput'] / by['off']['throughput']:.2f}  "
              f"(p50 latency on / off: {by['on']['p50'] / by['off']['p50']:.2f})")


if __name__ == "__main__":
    main()
