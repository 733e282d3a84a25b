"""Memory accounting: every request reserves what decoding and predicting it will allocate, first.

A server has one budget (`MemoryBudget`, ``--max-memory-gb``; default half of the physical RAM).
Before an upload is decoded, `Admission.need` reads its header (`resunet.data.headers`), refuses
it when it declares more than ``--max-voxels`` voxels x channels, and estimates its bytes with
`estimate_request_bytes`; the request then holds a reservation of that many bytes until it is
answered. A request that never fits (more than the whole budget) is refused at once
(`OverBudget`: HTTP 413); one that does not fit *now* waits up to ``--memory-wait-s`` seconds for
other requests to finish, then gives up (`BudgetTimeout`: HTTP 503 + ``Retry-After``).

The budget for requests is ``--max-memory-gb`` minus what the server holds at rest: its resident
memory when the budget is made (the model loaded), one forward pass of the network at the
server's batch size (`forward_bytes_per_pixel`) and `SLACK_BYTES` for the HTTP machinery and the
allocator. All sizes are bytes unless a name says otherwise.
"""

from __future__ import annotations

import asyncio
import math
import os
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from resunet.data.headers import declared_case
from resunet.data.limits import DEFAULT_MAX_VOXELS, DeclaredSize, check_voxels
from resunet.errors import ConfigError, ResunetError

__all__ = [
    "Admission",
    "BudgetTimeout",
    "MemoryBudget",
    "ModelFootprint",
    "OverBudget",
    "Reservation",
    "MIN_BUDGET_BYTES",
    "SLACK_BYTES",
    "default_memory_bytes",
    "estimate_request_bytes",
    "forward_bytes_per_pixel",
    "physical_memory_bytes",
    "process_memory_bytes",
]

GIB = 2**30
#: bytes kept free of reservations for the HTTP/DICOM machinery, threads and allocator slack
SLACK_BYTES = 96 * 2**20
#: the smallest budget for requests a server starts with
MIN_BUDGET_BYTES = 64 * 2**20


class OverBudget(ResunetError):
    """A reservation larger than the whole budget: it could never be granted (HTTP 413)."""


class BudgetTimeout(ResunetError):
    """A reservation that did not fit within its wait (HTTP 503 + Retry-After)."""


# --------------------------------------------------------------------------- machine


def physical_memory_bytes() -> int | None:
    """Physical RAM in bytes (``MemTotal`` of /proc/meminfo, else ``os.sysconf``); None if unknown."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):
        return None


def default_memory_bytes() -> int:
    """The default server budget: half of the physical RAM (4 GiB when it cannot be read)."""
    total = physical_memory_bytes()
    return total // 2 if total else 4 * GIB


def process_memory_bytes(field: str = "VmRSS", pid: int | str = "self") -> int | None:
    """``VmRSS`` (resident now) or ``VmHWM`` (peak resident) of a process in bytes; None off Linux."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


# --------------------------------------------------------------------------- the budget


class Reservation:
    """``nbytes`` held in a `MemoryBudget`; given back when the last holder lets go.

    The block that reserved it is one holder; `keep_until` adds another for work handed to a
    thread that may outlive the block (a batch still computing after its client went away).
    """

    def __init__(self, budget: "MemoryBudget", nbytes: int) -> None:
        self.budget, self.nbytes = budget, int(nbytes)
        self._holders = 1
        self._lock = threading.Lock()

    def keep_until(self, future: Any) -> None:
        """Hold the bytes until ``future`` (a `concurrent.futures.Future`) is done as well."""
        with self._lock:
            self._holders += 1
        future.add_done_callback(lambda _done: self.drop())

    def drop(self) -> None:
        """One holder lets go; the last one releases the bytes."""
        with self._lock:
            self._holders -= 1
            last = self._holders == 0
        if last:
            self.budget.release(self.nbytes)


class MemoryBudget:
    """``total`` bytes shared by concurrent requests; thread-safe, and usable from asyncio.

    ``reserve(nbytes, timeout)`` (threads) and ``reserve_async(nbytes, timeout)`` (coroutines)
    are context managers holding ``nbytes`` until the block ends, whatever happens in it (or
    later, see `Reservation.keep_until`).
    ``in_use`` and ``peak`` (the most ever held at once) are in bytes.
    """

    def __init__(self, total: int) -> None:
        if total <= 0:
            raise ConfigError(f"a memory budget must be positive, got {total} bytes")
        self.total = int(total)
        self.in_use = 0
        self.peak = 0
        self._cond = threading.Condition()

    def _check(self, nbytes: int) -> int:
        nbytes = int(nbytes)
        if nbytes < 0:
            raise ValueError(f"cannot reserve a negative size ({nbytes} bytes)")
        if nbytes > self.total:
            raise OverBudget(f"{nbytes / GIB:.3g} GiB asked, more than the whole budget of {self.total / GIB:.3g} GiB")
        return nbytes

    def try_acquire(self, nbytes: int) -> bool:
        """Take ``nbytes`` if they fit now; never waits. `OverBudget` if they never can."""
        nbytes = self._check(nbytes)
        with self._cond:
            if self.in_use + nbytes > self.total:
                return False
            self.in_use += nbytes
            self.peak = max(self.peak, self.in_use)
            return True

    def acquire(self, nbytes: int, timeout: float | None) -> None:
        """Take ``nbytes``, waiting up to ``timeout`` s (None: forever) for them to be released.

        `OverBudget` when ``nbytes`` exceed the whole budget; `BudgetTimeout` when the wait ends.
        """
        nbytes = self._check(nbytes)
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self.in_use + nbytes > self.total:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise BudgetTimeout(self._busy(nbytes, timeout))
                self._cond.wait(left)
            self.in_use += nbytes
            self.peak = max(self.peak, self.in_use)

    def release(self, nbytes: int) -> None:
        """Give back ``nbytes`` taken by `try_acquire` / `acquire`."""
        with self._cond:
            self.in_use -= int(nbytes)
            if self.in_use < 0:  # a caller bug; never let the budget grow beyond its total
                self.in_use = 0
                raise RuntimeError("released more memory than was reserved")
            self._cond.notify_all()

    def snapshot(self) -> dict[str, int]:
        """``budget_bytes``, ``reserved_bytes`` (now) and ``peak_reserved_bytes`` (ever), for /metrics."""
        with self._cond:
            return {"budget_bytes": self.total, "reserved_bytes": self.in_use, "peak_reserved_bytes": self.peak}

    def _busy(self, nbytes: int, timeout: float | None) -> str:
        return (f"{nbytes / GIB:.3g} GiB did not fit within {timeout:g} s ({self.in_use / GIB:.3g} of "
                f"{self.total / GIB:.3g} GiB held by other requests)")

    @contextmanager
    def reserve(self, nbytes: int, timeout: float | None) -> Iterator[Reservation]:
        """Hold ``nbytes`` for the ``with`` block (blocking wait; see `acquire`)."""
        self.acquire(nbytes, timeout)
        held = Reservation(self, nbytes)
        try:
            yield held
        finally:
            held.drop()

    @asynccontextmanager
    async def reserve_async(self, nbytes: int, timeout: float) -> AsyncIterator[Reservation]:
        """Hold ``nbytes`` for the ``async with`` block; waits without blocking the event loop
        (polling every 5..50 ms) up to ``timeout`` s, then `BudgetTimeout`."""
        deadline, delay = time.monotonic() + timeout, 0.005
        while not self.try_acquire(nbytes):
            left = deadline - time.monotonic()
            if left <= 0:
                raise BudgetTimeout(self._busy(nbytes, timeout))
            await asyncio.sleep(min(delay, left))
            delay = min(2 * delay, 0.05)
        held = Reservation(self, nbytes)
        try:
            yield held
        finally:
            held.drop()


# --------------------------------------------------------------------------- the estimate


def estimate_request_bytes(
    shape: Sequence[int],
    channels: int,
    itemsize: int,
    num_classes: int,
    *,
    resampled_shape: Sequence[int] | None = None,
    decode_bytes: int = 0,
    context: int = 0,
    forward_bytes: int = 0,
) -> int:
    """Bytes one request holds at its peak, from the shape its header declares.

    ``shape``: spatial shape (V voxels); ``channels`` (C); ``itemsize``: bytes per voxel and
    channel of the decoded array (b); ``num_classes``: the network's output channels (K);
    ``resampled_shape``: the shape at the model's target spacing (R voxels; default: V, no
    resampling); ``decode_bytes``: the reader's peak while decoding (default: the decoded array);
    ``context``: 2.5-D slices on each side; ``forward_bytes``: network activations beyond the
    server's fixed forward reserve (a slice larger than one forward batch).

    The result is what the request holds throughout -- the decoded channels V*C*b and the uint8
    mask V -- plus the largest of its phases (float32 = 4 bytes):

    - decode: ``decode_bytes`` and a copy per channel when C > 1;
    - prepare: float32 stack, reoriented copy, cropped copy and normalised image, 4 x V*C*4,
      plus two boolean masks 2*V*C;
    - resample (M = max(V, R)): the normalised image V*C*4 and, per axis step, its input, output
      and interpolation temporary, 3 x M*C*4;
    - model: the prepared image R*C*4, its 2.5-D context stack (2*context+1)*C*R*4, logits
      K*R*4, the window weights R*4 and ``forward_bytes``;
    - finish: prepared image and logits (R*C*4 + K*R*4), then with resampling the probabilities
      K*R*4, the temporaries of resampling them back 2 x K*M*4, their copy on the input grid
      K*V*4 and the int64 argmax V*8 (without: the argmax R*8), plus post-processing and
      encoding copies 2*V.

    Measured against the peak RSS of real requests (2-D and 3-D ResUNets, with and without
    resampling, NIfTI and PNG) this is 1.2 to 1.5 x the real need (3 x for a slice larger than
    one forward batch, where ``forward_bytes`` dominates).
    """
    v = float(np.prod([int(s) for s in shape], dtype=np.float64))
    r = float(np.prod([int(s) for s in resampled_shape], dtype=np.float64)) if resampled_shape is not None else v
    c, b, k = int(channels), int(itemsize), int(num_classes)
    resampled = resampled_shape is not None and tuple(resampled_shape) != tuple(shape)
    decoded = v * c * b
    held = decoded + v
    decode = max(float(decode_bytes), decoded) + (decoded if c > 1 else 0.0)
    prepare = 4 * v * c * 4 + 2 * v * c
    m = max(v, r)
    resample = (v * c * 4 + 3 * m * c * 4) if resampled else 0.0
    model = r * c * 4 + (2 * context + 1) * c * r * 4 + k * r * 4 + r * 4 + forward_bytes
    back = (k * r * 4 + 2 * k * m * 4 + k * v * 4 + v * 8) if resampled else r * 8
    finish = r * c * 4 + k * r * 4 + back + 2 * v
    return int(math.ceil(held + max(decode, prepare, resample, model, finish)))


def forward_bytes_per_pixel(model: Any, in_channels: int, spatial_dims: int, divisor: int) -> float:
    """Activation bytes per input pixel (voxel) of one fp32 forward pass of a torch ``model``.

    Sums the outputs of every leaf module on a small zero input (4 x divisor per side in 2-D,
    2 x divisor in 3-D). Under ``no_grad`` most of these are freed while the pass goes on, so
    the sum is an upper bound of what lives at once (about 4x the measured peak of a ResUNet).
    """
    import torch

    side = (4 if spatial_dims == 2 else 2) * int(divisor)
    probe = torch.zeros(1, int(in_channels), *([side] * spatial_dims))
    total = [0]

    def count(_module: Any, _inputs: Any, output: Any) -> None:
        for t in output if isinstance(output, (tuple, list)) else (output,):
            if isinstance(t, torch.Tensor):
                total[0] += t.numel() * t.element_size()

    hooks = [m.register_forward_hook(count) for m in model.modules() if not list(m.children())]
    try:
        with torch.no_grad():
            model(probe)
    finally:
        for h in hooks:
            h.remove()
    return total[0] / float(side**spatial_dims)


@dataclass(frozen=True)
class ModelFootprint:
    """What the estimate needs from a model: classes, geometry of its input, forward cost.

    ``forward_pixels``: input pixels (voxels) of one forward pass at the server's batch size;
    ``per_pixel``: activation bytes per input pixel (`forward_bytes_per_pixel`).
    """

    num_classes: int
    mode: str
    context: int
    divisor: int
    target_spacing: tuple[float, ...] | None
    reorient: bool
    forward_pixels: int
    per_pixel: float
    slice_axis: int = 0

    @classmethod
    def of(cls, predictor: Any) -> "ModelFootprint":
        """The footprint of a `resunet.infer.predictor.Predictor` (checkpoint or ONNX file)."""
        import torch

        net = predictor.model
        if not isinstance(net, torch.nn.Module):  # an ONNX file: count on the same architecture
            net = predictor.spec.build_network().eval()
        dims, div = int(net.spatial_dims), int(net.divisor)
        if predictor.mode == "2d":
            pixels = int(predictor.max_batch_pixels or predictor.batch_size * 256 * 256)
        else:
            pixels = int(predictor.batch_size) * int(np.prod(predictor.patch_size))
        pre = predictor.preprocess
        target = tuple(float(s) for s in pre.target_spacing) if pre.target_spacing is not None else None
        return cls(int(net.out_channels), str(predictor.mode), int(predictor.context), div, target,
                   bool(pre.reorient), pixels, forward_bytes_per_pixel(net, net.in_channels, dims, div),
                   int(pre.slice_axis))

    @property
    def fixed_bytes(self) -> int:
        """Activations of one forward pass at the server's batch size (one runs at a time)."""
        return int(self.forward_pixels * self.per_pixel)

    def request_bytes(self, declared: DeclaredSize) -> int:
        """`estimate_request_bytes` for a file (or case) this model will segment."""
        from resunet.data.preprocess import canonical_axes, resampled_shape

        shape, spacing = tuple(declared.shape), tuple(declared.spacing)
        n = len(shape)
        if self.reorient and n == 3:
            axes = canonical_axes(declared.direction, self.slice_axis)[0]
            shape, spacing = tuple(shape[a] for a in axes), tuple(spacing[a] for a in axes)
        target = shape
        if self.target_spacing is not None and len(self.target_spacing) == n and all(s > 0 for s in spacing):
            target = resampled_shape(shape, spacing, self.target_spacing)
        extra = 0
        if self.mode == "2d":  # one slice per forward at least: a huge slice costs more than the reserve
            area = int(np.prod([-(-int(s) // self.divisor) * self.divisor for s in target[-2:]], dtype=np.float64))
            extra = int(max(0, area - self.forward_pixels) * self.per_pixel)
        return estimate_request_bytes(
            shape, declared.channels, declared.itemsize, self.num_classes, resampled_shape=target,
            decode_bytes=declared.decode_bytes, context=self.context, forward_bytes=extra,
        )


# --------------------------------------------------------------------------- admission


class Admission:
    """The per-request limits of one server (or of `resunet predict`).

    ``max_voxels``: voxels x channels a request may declare (``--max-voxels``);
    ``max_memory_bytes``: the whole process's budget (``--max-memory-gb``, default
    `default_memory_bytes`); ``wait_s``: how long a request waits for memory (``--memory-wait-s``).
    ``budget`` holds ``max_memory_bytes`` minus the process's resident memory now, the model's
    fixed forward reserve and `SLACK_BYTES`; when less than `MIN_BUDGET_BYTES` is left a
    `ConfigError` says so (``strict``, the servers), or the budget is `MIN_BUDGET_BYTES` (a
    command that handles one case at a time in a process that is already large).
    """

    def __init__(self, predictor: Any, max_voxels: int = DEFAULT_MAX_VOXELS, max_memory_bytes: int | None = None,
                 wait_s: float = 5.0, strict: bool = True) -> None:
        if max_voxels < 1:
            raise ConfigError(f"--max-voxels must be at least 1, got {max_voxels}")
        if wait_s < 0:
            raise ConfigError(f"--memory-wait-s must be >= 0 seconds, got {wait_s}")
        self.max_voxels, self.wait_s = int(max_voxels), float(wait_s)
        self.max_memory = int(max_memory_bytes) if max_memory_bytes is not None else default_memory_bytes()
        self.footprint = ModelFootprint.of(predictor)
        self.at_rest = (process_memory_bytes() or 0) + self.footprint.fixed_bytes + SLACK_BYTES
        if strict and self.max_memory - self.at_rest < MIN_BUDGET_BYTES:
            raise ConfigError(
                f"--max-memory-gb {self.max_memory / GIB:.3g} leaves nothing for requests: the server itself "
                f"holds {self.at_rest / GIB:.3g} GiB (the loaded model, one forward pass and slack); "
                "raise --max-memory-gb"
            )
        self.budget = MemoryBudget(max(self.max_memory - self.at_rest, MIN_BUDGET_BYTES))

    def describe(self) -> dict[str, float | int]:
        """The limits, JSON-able (bytes, seconds), for ``GET /v1/model``."""
        return {"max_voxels": self.max_voxels, "max_memory_bytes": self.max_memory,
                "request_budget_bytes": self.budget.total, "wait_s": self.wait_s}

    def need(self, paths: Sequence[str | os.PathLike[str]], name: str | None = None) -> int:
        """Bytes a request for the case ``paths`` must reserve, from their headers only.

        `resunet.data.limits.TooLarge` over ``max_voxels``; `OverBudget` when the estimate is
        over the whole budget. Both messages name the file (``name``, default the first path),
        the limit and the flag that changes it.
        """
        declared = declared_case([Path(p) for p in paths], self.max_voxels)
        shown = name or str(paths[0])
        check_voxels(declared, self.max_voxels, shown)
        nbytes = self.footprint.request_bytes(declared)
        if nbytes > self.budget.total:
            shape = " x ".join(str(s) for s in declared.shape)
            raise OverBudget(
                f"{shown} ({shape}, {declared.channels} channel(s)) needs about {nbytes / GIB:.3g} GiB to "
                f"decode and segment, more than the {self.budget.total / GIB:.3g} GiB available to requests "
                f"(--max-memory-gb {self.max_memory / GIB:.3g} minus {self.at_rest / GIB:.3g} GiB the process "
                "holds at rest); raise --max-memory-gb, or crop or downsample the image"
            )
        return nbytes
