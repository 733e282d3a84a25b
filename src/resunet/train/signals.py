"""Stop a training run cleanly on SIGINT (Ctrl-C) or SIGTERM (job schedulers, ``docker stop``).

`StopRequest` replaces the SIGINT / SIGTERM handlers while the training loop runs (and puts the
previous handlers back afterwards). The first signal only records a request; the loop polls
`StopRequest.agreed` at every iteration boundary -- under torchrun an all-reduce of the flag, so
that every rank stops at the same iteration -- then rank 0 writes ``last.pt`` (atomically, with
the full training state) and every rank raises `TrainingInterrupted` (exit code 130 for SIGINT,
143 for SIGTERM). A second signal stops at once (raising `TrainingInterrupted` from the handler,
the run folder keeping its previous, complete ``last.pt``) -- except while the checkpoint is being
written (`StopRequest.saving`), when it is noted and the save finishes first, and once the stop
is done (`StopRequest.finish`: the process is leaving, e.g. torchrun SIGTERMs the other ranks).

Signal handlers can only be installed from the main thread; `fit` called from another thread
trains without them (a signal then behaves as it would without resunet). A signal the process
ignores (``SIG_IGN``, e.g. SIGINT of a background job) stays ignored.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from resunet.train.distributed import DistInfo, all_reduce_sum

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped on a signal; ``exit_code`` is 128 + the signal number (130, 143).

    A `KeyboardInterrupt`, so code that does not expect it behaves as after Ctrl-C; the CLI exits
    with ``exit_code`` and prints the message (where the run stopped, how to resume) without a
    traceback. ``checkpoint`` is the ``last.pt`` written on the way out (None after a forced stop).
    """

    def __init__(self, signum: int, message: str, checkpoint: Any = None) -> None:
        super().__init__(message)
        self.signum = int(signum)
        self.exit_code = 128 + int(signum)
        self.checkpoint = checkpoint

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _say(text: str) -> None:
    """Write to stderr from a signal handler: a raw write, no locks (rich/print may hold one)."""
    try:
        os.write(2, text.encode())
    except OSError:
        pass


class StopRequest:
    """The stop flag the signal handlers set; see the module docstring."""

    def __init__(self, announce: bool = True) -> None:
        self.signum: int | None = None
        self.announce = announce
        self._saving = False
        self._finished = False
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal_name(signum)
        if self.signum is None:
            self.signum = signum
            if self.announce:
                _say(f"\n{name} received: finishing the current iteration, then saving last.pt "
                     f"(send it again to stop at once without saving)\n")
            return
        if self._finished:  # the stop is done, the process is on its way out (e.g. torchrun's SIGTERM)
            return
        if self._saving:
            if self.announce:
                _say(f"{name} received again: the checkpoint is being written; stopping right after\n")
            return
        raise TrainingInterrupted(
            signum, f"stopped at once by a second {name}, without saving; the run folder keeps its "
                    "previous last.pt (resume from there with --resume)")

    def install(self) -> bool:
        """Install the handlers (main thread only); return whether they were installed."""
        if threading.current_thread() is not threading.main_thread():
            return False
        for sig in STOP_SIGNALS:
            if signal.getsignal(sig) is signal.SIG_IGN:  # deliberately ignored (nohup-like launch): keep it so
                continue
            self._previous[sig] = signal.signal(sig, self._handle)
        return True

    def restore(self) -> None:
        """Put back the handlers that were there before `install`."""
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()

    @contextmanager
    def installed(self) -> Iterator["StopRequest"]:
        self.install()
        try:
            yield self
        finally:
            self.restore()

    @contextmanager
    def saving(self) -> Iterator[None]:
        """While inside, a second signal does not interrupt (the checkpoint write completes)."""
        self._saving = True
        try:
            yield
        finally:
            self._saving = False

    def finish(self) -> None:
        """The stop was carried out (checkpoint written): later signals are ignored until `restore`."""
        self._finished = True

    def agreed(self, dist_info: DistInfo) -> bool:
        """Whether any rank was asked to stop (an all-reduce under DDP: call it on every rank).

        A rank that got no signal itself takes the signal of those that did (for its exit code).
        """
        if not dist_info.enabled:
            return self.requested
        mine = torch.tensor([1.0, float(self.signum)] if self.requested else [0.0, 0.0], dtype=torch.float64)
        ranks, signums = (float(v) for v in all_reduce_sum(mine, dist_info))
        if ranks > 0 and self.signum is None:
            self.signum = int(round(signums / ranks))
        return ranks > 0
