"""`BatchLoader`: an epoch's training batches, made ahead in a background thread.

Making a batch (patch sampling from the memory-mapped cache, then batched augmentation) and the
optimisation step are independent, so the loader makes batch ``i + 1`` while the model trains
on batch ``i``. Every batch is made by ONE thread in order, from the same RNGs (the sampler's and
the epoch's augmentation generator), so the batches are bit-identical to making them in the loop
(``prefetch=0``); only when they are made changes. `prefetch_for` decides the default: on CUDA
only. ``wait_seconds`` is the time the training loop spent blocked waiting for a batch -- the part
of the data work the overlap did not hide.

Threads, not processes: the sampler reads memory maps and `augment_batch` runs in PyTorch
kernels that release the GIL, and a thread shares the RNG state with nothing else, so exact
resume (which replays an epoch's draws) is unchanged.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Callable, Generic, Iterator, TypeVar

import torch

__all__ = ["BatchLoader", "prefetch_for"]

T = TypeVar("T")
_DONE = object()


def prefetch_for(prefetch: int | None, device: torch.device | str) -> int:
    """Batches to make ahead: ``prefetch`` when set, else 1 on CUDA (the CPU makes the next batch
    while the GPU trains) and 0 on the CPU. There the step already uses every core, and a second
    thread of PyTorch kernels competes with it: measured on 2 cores, epochs took 17-25 % longer
    with the thread than without (the demo's 2.5-D base-8 plan and Hippocampus' base-32 plan;
    benchmarks/RESULTS.md), for identical batches."""
    if prefetch is not None:
        return prefetch
    return 1 if torch.device(device).type == "cuda" else 0


class BatchLoader(Generic[T]):
    """Iterate ``count`` results of ``make()``; ``prefetch`` > 0 makes at most that many batches
    ahead of the one the loop holds (counting the one being made), in a background thread. An
    exception there is raised in the loop, at the batch it broke on. Use as a context manager, so
    a loop that stops early also stops the thread."""

    def __init__(self, make: Callable[[], T], count: int, prefetch: int = 1) -> None:
        self.make, self.count, self.prefetch = make, count, prefetch
        self.wait_seconds = 0.0
        self._stop = threading.Event()
        self._queue: queue.Queue = queue.Queue()
        self._slots = threading.Semaphore(max(1, prefetch))  # batches that may be made ahead
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "BatchLoader[T]":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _produce(self) -> None:
        try:
            for _ in range(self.count):
                while not self._slots.acquire(timeout=0.1):
                    if self._stop.is_set():
                        return
                if self._stop.is_set():
                    return
                self._queue.put((self.make(), None))
        except BaseException as err:  # handed to the loop, raised there
            self._queue.put((_DONE, err))
            return
        self._queue.put((_DONE, None))

    def __iter__(self) -> Iterator[T]:
        if self.prefetch <= 0:
            for _ in range(self.count):
                t0 = time.perf_counter()
                item = self.make()
                self.wait_seconds += time.perf_counter() - t0
                yield item
            return
        self._thread = threading.Thread(target=self._produce, name="resunet-batches", daemon=True)
        self._thread.start()
        while True:
            t0 = time.perf_counter()
            item, err = self._queue.get()
            self.wait_seconds += time.perf_counter() - t0
            if err is not None:
                raise err
            if item is _DONE:
                return
            self._slots.release()  # the loop holds this one: the thread may make the next
            yield item

    def wait_next(self) -> float:
        """Block until the next batch is made (or none is left); the seconds waited. For a caller
        that must keep the thread's work inside its own time slot (`benchmarks/bench_train.py`)."""
        t0 = time.perf_counter()
        while self._thread is not None and self._thread.is_alive() and self._queue.empty():
            time.sleep(0.001)
        return time.perf_counter() - t0

    def close(self) -> None:
        """Stop the background thread (it finishes the batch it is making) and wait for it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
