"""The DICOM node's spool: received instances wait on disk until their series is complete.

Layout under the spool root (every folder mode 0700; it holds patient data):

- ``incoming/<StudyUID>/<SeriesUID>/<SOPInstanceUID>.dcm``: instances as received, each written
  atomically before the C-STORE is answered; a duplicate SOP instance overwrites its own file;
- ``processing/<StudyUID>/<SeriesUID>/``: a complete series while it is segmented and sent;
- ``outbox/<SeriesUID>.seg.dcm``: the DICOM SEG while it is sent, and kept there when sending failed;
- ``failed/<StudyUID>/<SeriesUID>[.N]/`` + ``error.txt``: a series that could not be segmented;
- ``aborted/<StudyUID>/<SeriesUID>[.N]/`` + ``reason.txt``: a partial series, never segmented.

Once its SEG is written and sent (or kept in ``outbox/`` after the sends failed), a series is
deleted, not archived: the PACS keeps the originals. A sent SEG is deleted too.
An instance arriving after its series completed starts a new series (a second SEG).

**Completion rule.** A series is complete when no instance of it arrived for ``series_timeout``
seconds AND every association that delivered an instance of it ended with an A-RELEASE.

**Abort rule.** When an association that delivered instances of a series ends any other way
(A-ABORT from either side, network timeout, dropped connection) before that series is complete,
the whole series (also what other associations delivered for it) moves to ``aborted/`` and is
never segmented; a later resend starts a new series from scratch. So no SEG is ever made from a
partial series. Series left in ``incoming/`` by a node that stopped are moved to ``aborted/`` at
start (their completeness is unknown); series left in ``processing/`` are segmented again.
"""

from __future__ import annotations

import os
import re
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Hashable

from resunet.data.io import atomic_write

__all__ = ["Spool", "CompleteSeries", "InvalidInstance", "SeriesTooLarge", "check_uid"]

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_FOLDERS = ("incoming", "processing", "outbox", "failed", "aborted")


class InvalidInstance(ValueError):
    """A received instance cannot be filed (missing or malformed UID)."""


class SeriesTooLarge(RuntimeError):
    """A series already holds ``max_series_instances`` instances, or its instances declare more
    than ``max_series_voxels`` voxels x channels together."""


def check_uid(value: object, what: str) -> str:
    """``value`` as a UID string; `InvalidInstance` unless it is a valid DICOM UID (safe as a file name)."""
    text = str(value or "").strip()
    if not (0 < len(text) <= 64 and _UID.match(text)):
        raise InvalidInstance(f"{what} {text!r} is not a valid DICOM UID")
    return text


def _private_dir(path: Path) -> Path:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def _unique(folder: Path) -> Path:
    """``folder`` itself when free, else ``folder.1``, ``folder.2``, ..."""
    candidate, n = folder, 0
    while candidate.exists():
        n += 1
        candidate = folder.with_name(f"{folder.name}.{n}")
    return candidate


@dataclass(frozen=True)
class CompleteSeries:
    """A complete series moved to ``processing/``; ``error`` is set when it must not be segmented."""

    folder: Path
    study_uid: str
    series_uid: str
    instances: int
    error: str | None = None


@dataclass
class _Series:
    folder: Path
    instances: set[str] = field(default_factory=set)
    associations: set[Hashable] = field(default_factory=set)  # open ones that delivered to it
    last: float = 0.0
    refused: int = 0  # instances refused by the size limits
    voxels: dict[str, int] = field(default_factory=dict)  # declared voxels x channels per SOP instance
    too_many_voxels: bool = False


class Spool:
    """Thread-safe spool of incoming series (see the module docstring for the rules)."""

    def __init__(
        self, root: str | os.PathLike[str], series_timeout: float, max_series_instances: int,
        clock: Callable[[], float] = time.monotonic, max_series_voxels: int | None = None,
    ) -> None:
        self.root = Path(root)
        self.series_timeout = float(series_timeout)
        self.max_series_instances = int(max_series_instances)
        self.max_series_voxels = max_series_voxels
        self._clock = clock
        self._lock = threading.Lock()
        self._series: dict[tuple[str, str], _Series] = {}
        self._open: dict[Hashable, set[tuple[str, str]]] = {}

    def folder(self, name: str) -> Path:
        """One of the spool's sub-folders (``incoming``, ``processing``, ``outbox``, ...)."""
        return self.root / name

    def prepare(self) -> list[CompleteSeries]:
        """Create the folders (mode 0700); quarantine left-over incoming series; return left-over processing ones."""
        _private_dir(self.root)
        os.chmod(self.root, 0o700)
        for name in _FOLDERS:
            os.chmod(_private_dir(self.folder(name)), 0o700)
        for study, series in self._series_folders("incoming"):
            self._move(self.folder("incoming") / study / series, "aborted", study, series,
                       "reason.txt", "the node stopped before this series was complete; send it again")
        return [
            CompleteSeries(self.folder("processing") / study / series, study, series,
                           len(list((self.folder("processing") / study / series).glob("*.dcm"))))
            for study, series in self._series_folders("processing")
        ]

    def _series_folders(self, name: str) -> list[tuple[str, str]]:
        base = self.folder(name)
        return sorted((s.name, d.name) for s in base.iterdir() if s.is_dir() for d in s.iterdir() if d.is_dir())

    # ----------------------------------------------------------------------- receiving

    def store(self, association: Hashable, study_uid: str, series_uid: str, sop_uid: str, data: bytes,
              voxels: int = 0) -> Path:
        """File one instance atomically (overwriting a duplicate); raises `SeriesTooLarge` or `OSError`.

        ``voxels``: what the instance's header declares (Rows x Columns x frames x samples); the
        series' sum must stay within ``max_series_voxels``.
        """
        key = (study_uid, series_uid)
        with self._lock:
            series = self._series.get(key)
            if series is None:
                series = self._series[key] = _Series(_private_dir(self.folder("incoming") / study_uid / series_uid))
            series.associations.add(association)
            self._open.setdefault(association, set()).add(key)
            series.last = self._clock()
            if sop_uid not in series.instances and len(series.instances) >= self.max_series_instances:
                series.refused += 1
                raise SeriesTooLarge(
                    f"series {series_uid} already holds {self.max_series_instances} instances; "
                    "raise --max-series-instances to accept larger series"
                )
            declared = sum(series.voxels.values()) - series.voxels.get(sop_uid, 0) + int(voxels)
            if self.max_series_voxels is not None and declared > self.max_series_voxels:
                series.refused += 1
                series.too_many_voxels = True
                raise SeriesTooLarge(
                    f"series {series_uid} would declare {declared} voxels (Rows x Columns x frames summed over "
                    f"its instances), over the limit of {self.max_series_voxels}; raise --max-voxels to accept it"
                )
            series.voxels[sop_uid] = int(voxels)
            target = series.folder / f"{sop_uid}.dcm"
        # Safe outside the lock: the series cannot complete while this association is open.
        with atomic_write(target) as tmp:
            tmp.write_bytes(data)
        with self._lock:
            series.instances.add(sop_uid)
            series.last = self._clock()
        return target

    def released(self, association: Hashable) -> None:
        """The association ended with an A-RELEASE: its series may now complete."""
        with self._lock:
            for key in self._open.pop(association, set()):
                series = self._series.get(key)
                if series is not None:
                    series.associations.discard(association)

    def aborted(self, association: Hashable, reason: str) -> list[Path]:
        """The association ended without A-RELEASE: move the series it touched to ``aborted/``."""
        moved = []
        with self._lock:
            for study, series_uid in sorted(self._open.pop(association, set())):
                series = self._series.get((study, series_uid))
                if series is None or association not in series.associations:
                    continue
                del self._series[(study, series_uid)]
                text = f"{reason}\n{len(series.instances)} instance(s) received; the series was never segmented.\n"
                moved.append(self._move(series.folder, "aborted", study, series_uid, "reason.txt", text))
        return moved

    def open_associations(self) -> list[Hashable]:
        """Associations that delivered instances and have not ended yet (as far as the spool knows)."""
        with self._lock:
            return list(self._open)

    def pending(self) -> int:
        """Series in ``incoming/`` not yet complete."""
        with self._lock:
            return len(self._series)

    # ----------------------------------------------------------------------- completing

    def take_complete(self) -> list[CompleteSeries]:
        """Move every complete series to ``processing/`` and return them."""
        now = self._clock()
        done = []
        with self._lock:
            for (study, series_uid), series in list(self._series.items()):
                if series.associations or now - series.last < self.series_timeout:
                    continue
                del self._series[(study, series_uid)]
                if not series.instances:
                    shutil.rmtree(series.folder, ignore_errors=True)
                    self._remove_empty_parent(series.folder)
                    continue
                folder = self._move(series.folder, "processing", study, series_uid)
                error = None
                if series.too_many_voxels:
                    error = (f"series {series_uid} declares more than {self.max_series_voxels} voxels (Rows x "
                             f"Columns x frames summed; {series.refused} instance(s) refused), so it was not "
                             "assembled; raise --max-voxels (and --max-memory-gb) and send it again")
                elif series.refused:
                    error = (f"series {series_uid} has more than {self.max_series_instances} instances "
                             f"({series.refused} refused); raise --max-series-instances and send it again")
                done.append(CompleteSeries(folder, study, series_uid, len(series.instances), error))
        return done

    def finish(self, series: CompleteSeries) -> None:
        """The series' SEG was sent: delete its instances."""
        shutil.rmtree(series.folder, ignore_errors=True)
        self._remove_empty_parent(series.folder)

    def fail(self, series: CompleteSeries, error: str) -> Path:
        """Move a series that could not be segmented to ``failed/`` with ``error.txt``."""
        with self._lock:
            return self._move(series.folder, "failed", series.study_uid, series.series_uid, "error.txt", error)

    def outbox_path(self, series: CompleteSeries) -> Path:
        return self.folder("outbox") / f"{series.series_uid}.seg.dcm"

    # ----------------------------------------------------------------------- helpers

    def _move(self, folder: Path, to: str, study: str, series_uid: str, note: str = "", text: str = "") -> Path:
        target = _unique(_private_dir(self.folder(to) / study) / series_uid)
        os.rename(folder, target)
        self._remove_empty_parent(folder)
        if note:
            (target / note).write_text(text if text.endswith("\n") else text + "\n")
        return target

    @staticmethod
    def _remove_empty_parent(folder: Path) -> None:
        try:
            folder.parent.rmdir()
        except OSError:
            pass
