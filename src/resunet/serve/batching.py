"""`DynamicBatcher`: a bounded queue and ONE worker thread that groups single requests into batches.

Callers `submit` one item and get a `concurrent.futures.Future`. The worker takes the first
waiting item, then waits up to ``max_wait_ms`` (milliseconds, counted from the moment it took the
first item) for more until it holds ``max_batch`` items, calls ``process(items)`` once and resolves
every caller's future with its own entry of the returned list. An entry that is an exception
instance becomes that caller's exception; the other callers of the batch are unaffected. If
``process`` itself raises, every caller of that batch gets the exception and the worker goes on.

The queue holds at most ``queue_size`` items that wait for the worker (the batch being processed
is not counted); `submit` raises `QueueFull` beyond that instead of blocking. `stop` makes the
worker finish the batch it is processing, fails every waiting item with `Stopped` and refuses new
ones. Nothing here knows about HTTP.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")

__all__ = ["BatchResult", "DynamicBatcher", "QueueFull", "Stopped"]


class QueueFull(Exception):
    """The queue already holds ``queue_size`` waiting items; try again later."""


class Stopped(Exception):
    """The batcher is stopping or stopped; the item was not (and will not be) processed."""


@dataclass(frozen=True)
class BatchResult(Generic[R]):
    """What a caller's future resolves to: its own result and the size of the batch it ran in."""

    value: R
    batch_size: int


@dataclass
class _Item(Generic[T]):
    payload: T
    future: Future


class DynamicBatcher(Generic[T, R]):
    """Group submitted items into batches for ``process`` (see the module docstring).

    ``on_batch(size, seconds)`` is called after each batch (for metrics); it must not raise.
    """

    def __init__(
        self,
        process: Callable[[list[T]], Sequence[R | BaseException]],
        *,
        max_batch: int = 8,
        max_wait_ms: float = 10.0,
        queue_size: int = 64,
        on_batch: Callable[[int, float], None] | None = None,
        name: str = "resunet-batcher",
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
        if queue_size < 1:
            raise ValueError(f"queue_size must be >= 1, got {queue_size}")
        self.process = process
        self.max_batch, self.max_wait_s, self.queue_size = max_batch, max_wait_ms / 1000.0, queue_size
        self.on_batch = on_batch
        self._queue: deque[_Item[T]] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._busy = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    # ------------------------------------------------------------------ caller side

    def start(self) -> "DynamicBatcher[T, R]":
        self._thread.start()
        return self

    @property
    def depth(self) -> int:
        """Items waiting for the worker (not counting the batch being processed)."""
        with self._cond:
            return len(self._queue)

    @property
    def busy(self) -> bool:
        """True while the worker is inside ``process``."""
        with self._cond:
            return self._busy

    @property
    def running(self) -> bool:
        return self._thread.is_alive() and not self._stopping

    def submit(self, payload: T) -> Future:
        """Queue one item; the future resolves to a `BatchResult` (or raises the item's error).

        Raises `QueueFull` when ``queue_size`` items already wait and `Stopped` after `stop`.
        """
        future: Future = Future()
        with self._cond:
            if self._stopping or not self._thread.is_alive():
                raise Stopped("the batcher is not running")
            if len(self._queue) >= self.queue_size:
                raise QueueFull(f"{len(self._queue)} items already wait (queue_size {self.queue_size})")
            self._queue.append(_Item(payload, future))
            self._cond.notify_all()
        return future

    def stop(self, wait: bool = True, timeout: float | None = 30.0) -> None:
        """Refuse new items, fail the waiting ones with `Stopped`, let the current batch finish.

        ``wait`` joins the worker (at most ``timeout`` seconds). Safe to call more than once and
        from any thread.
        """
        with self._cond:
            self._stopping = True
            pending = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        for item in pending:
            if item.future.set_running_or_notify_cancel():
                item.future.set_exception(Stopped("the server is shutting down"))
        if wait and self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    # ------------------------------------------------------------------ worker side

    def _next_batch(self) -> list[_Item[T]] | None:
        """Block for the first item, then collect more until ``max_batch`` or the deadline."""
        with self._cond:
            while not self._queue and not self._stopping:
                self._cond.wait()
            if self._stopping:
                return None
            batch = [self._queue.popleft()]
            deadline = time.monotonic() + self.max_wait_s
            while len(batch) < self.max_batch:
                if self._queue:
                    batch.append(self._queue.popleft())
                    continue
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._stopping:
                    break
                self._cond.wait(remaining)
            if self._stopping:  # stop() came while collecting: these callers get Stopped too
                self._queue.extendleft(reversed(batch))
                return None
            self._busy = True
            return batch

    def _run(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                self._fail_pending()
                return
            try:
                self._process(batch)
            finally:
                with self._cond:
                    self._busy = False

    def _process(self, batch: list[_Item[T]]) -> None:
        live = [item for item in batch if item.future.set_running_or_notify_cancel()]
        if not live:
            return
        start = time.perf_counter()
        try:
            results: Any = self.process([item.payload for item in live])
            if len(results) != len(live):
                raise RuntimeError(f"process returned {len(results)} results for {len(live)} items")
        except BaseException as err:  # noqa: BLE001 -- every caller of the batch must hear about it
            for item in live:
                item.future.set_exception(err)
            if not isinstance(err, Exception):
                raise
            return
        finally:
            if self.on_batch is not None:
                self.on_batch(len(live), time.perf_counter() - start)
        for item, result in zip(live, results):
            if isinstance(result, BaseException):
                item.future.set_exception(result)
            else:
                item.future.set_result(BatchResult(result, len(live)))

    def _fail_pending(self) -> None:
        with self._cond:
            pending = list(self._queue)
            self._queue.clear()
        for item in pending:
            if item.future.set_running_or_notify_cancel():
                item.future.set_exception(Stopped("the server is shutting down"))
