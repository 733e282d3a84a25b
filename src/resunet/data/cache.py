"""On-disk cache of preprocessed cases: preprocess once, memory-map while training.

Layout::

    cache_dir/<config fingerprint>/
        config.json                 the PreprocessConfig (+ cache format version)
        index.json                  case ids and their input fingerprints (informational)
        <case_id>_image.npy         float32 (C, D, H, W) / (C, H, W)
        <case_id>_label.npy         uint8 (int16 when the values need it) (D, H, W) / (H, W)
        <case_id>_locations.npz     foreground voxel positions per class (for oversampling)
        <case_id>.json              properties, array shapes and the case's input fingerprint

Fingerprints:

- the folder name hashes the preprocessing config (``model_dump_json``) and the cache format
  version: another config gets another folder;
- each case's key hashes the config AND its input files' ``(resolved path, size, mtime_ns)``.
  A case whose key is unchanged (and whose arrays are there with the recorded shapes) is reused
  without reading its inputs; a changed / touched file rebuilds that case only.

Atomicity: a case is complete only when its ``<case_id>.json`` exists with the right key. A
rebuild first deletes the old JSON, then writes the arrays, then the JSON, every file through
:func:`resunet.data.io.atomic_write` (temporary file, fsync, rename), so a crash at any moment
leaves either the old complete case, or a case without JSON that the next build redoes.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from resunet.data.io import atomic_write, read_volume
from resunet.data.preprocess import (
    PreprocessConfig,
    PreprocessedCase,
    _config,
    preprocess_case,
)
from resunet.data.sampling import foreground_locations
from resunet.errors import InputError, ResunetError

__all__ = [
    "CACHE_FORMAT_VERSION",
    "CacheIndex",
    "CachedCase",
    "build_cache",
    "case_key",
    "config_fingerprint",
    "load_cached_case",
]

#: bump when the cached file layout or the preprocessing code changes what it writes
CACHE_FORMAT_VERSION = 1


def _sha(payload: Any) -> str:
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def config_fingerprint(config: PreprocessConfig) -> str:
    """16 hex digits identifying a preprocessing config (and the cache format version)."""
    return _sha({"format": CACHE_FORMAT_VERSION, "config": config.model_dump_json()})[:16]


def _file_stamp(path: Path | str) -> list[Any]:
    p = Path(path)
    try:
        st = p.stat()
    except OSError as exc:
        raise InputError(f"cannot read input file {p}: {exc.strerror or exc}") from exc
    return [str(p.resolve()), int(st.st_size), int(st.st_mtime_ns)]


def _case_files(case: Any) -> tuple[list[Path], Path | None]:
    images = [Path(p) for p in case.images]
    label = None if getattr(case, "label", None) is None else Path(case.label)
    return images, label


def case_key(case: Any, config: PreprocessConfig) -> str:
    """Hash of the config and the case's input files (path, size, mtime_ns)."""
    images, label = _case_files(case)
    stamps = {
        "images": [_file_stamp(p) for p in images],
        "label": None if label is None else _file_stamp(label),
    }
    return _sha({"config": config_fingerprint(config), "case": str(case.case_id), "files": stamps})


def _check_case_id(case_id: str) -> str:
    case_id = str(case_id)
    if (
        not case_id
        or case_id.startswith(".")
        or any(ch in case_id for ch in ("/", "\\", "\0"))
        or case_id != case_id.strip()
    ):
        raise InputError(
            f"case id {case_id!r} cannot name cache files: use letters, digits, '_', '-', '.'"
        )
    return case_id


def _paths(directory: Path, case_id: str) -> dict[str, Path]:
    return {
        "image": directory / f"{case_id}_image.npy",
        "label": directory / f"{case_id}_label.npy",
        "locations": directory / f"{case_id}_locations.npz",
        "meta": directory / f"{case_id}.json",
    }


def _write_npy(path: Path, array: np.ndarray) -> None:
    with atomic_write(path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, np.ascontiguousarray(array), allow_pickle=False)


def _write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    with atomic_write(path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **arrays)


def _write_json(path: Path, payload: Any) -> None:
    with atomic_write(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        json.dump(payload, fh, indent=1, sort_keys=True)


def _npy_shape(path: Path) -> tuple[int, ...] | None:
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError):
        return None
    return tuple(arr.shape)


def _read_meta(path: Path) -> dict[str, Any] | None:
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


def _is_complete(directory: Path, case_id: str, key: str) -> bool:
    paths = _paths(directory, case_id)
    meta = _read_meta(paths["meta"])
    if meta is None or meta.get("case_key") != key:
        return False
    if _npy_shape(paths["image"]) != tuple(meta.get("image_shape", ())):
        return False
    if meta.get("label_shape") is not None:
        if _npy_shape(paths["label"]) != tuple(meta["label_shape"]):
            return False
        if not paths["locations"].exists():
            return False
    return True


@dataclass
class CachedCase:
    """A cached case; ``image`` / ``label`` are read-only memory maps (``np.memmap``)."""

    case_id: str
    image: np.ndarray
    label: np.ndarray | None
    properties: dict[str, Any]
    directory: Path
    _locations: dict[int, np.ndarray] | None = field(default=None, repr=False)

    @property
    def spacing(self) -> tuple[float, ...]:
        return tuple(self.properties["spacing_after_resampling"])

    @property
    def class_locations(self) -> dict[int, np.ndarray] | None:
        """``{class: (K, ndim) voxel indices}`` for foreground oversampling (None: no label)."""
        if self._locations is None and self.label is not None:
            path = _paths(self.directory, self.case_id)["locations"]
            with np.load(path, allow_pickle=False) as data:
                self._locations = {int(k.split("_", 1)[1]): data[k] for k in data.files}
        return self._locations


@dataclass
class CacheIndex:
    """What :func:`build_cache` produced: the cache folder, its fingerprint and the case ids
    (in input order); ``built`` / ``reused`` say which cases were (re)computed this time."""

    directory: Path
    fingerprint: str
    config: PreprocessConfig
    case_ids: list[str]
    built: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.case_ids)

    def __iter__(self) -> Iterator[CachedCase]:
        for case_id in self.case_ids:
            yield self.load(case_id)

    def load(self, case_id: str) -> CachedCase:
        return load_cached_case(self.directory, case_id)

    def cases(self) -> list[CachedCase]:
        return [self.load(c) for c in self.case_ids]


def _build_one(
    case: Any,
    config: PreprocessConfig,
    directory: Path,
    key: str,
    reader: Callable[[Path], Any],
    label_reader: Callable[[Path], Any],
) -> None:
    case_id = str(case.case_id)
    images, label = _case_files(case)
    try:
        volumes = [reader(p) for p in images]
        label_volume = None if label is None else label_reader(label)
        pre: PreprocessedCase = preprocess_case(volumes, label_volume, config)
    except ResunetError as exc:
        raise type(exc)(f"case {case_id}: {exc}") from exc
    paths = _paths(directory, case_id)
    # invalidate first: from here until the new JSON lands the case is incomplete
    paths["meta"].unlink(missing_ok=True)
    _write_npy(paths["image"], pre.image)
    if pre.label is not None:
        _write_npy(paths["label"], pre.label)
        locations = foreground_locations(pre.label, rng=0)
        _write_npz(paths["locations"], {f"class_{k}": v for k, v in locations.items()})
    else:
        paths["label"].unlink(missing_ok=True)
        paths["locations"].unlink(missing_ok=True)
    meta = {
        "case_id": case_id,
        "case_key": key,
        "format": CACHE_FORMAT_VERSION,
        "inputs": {
            "images": [str(p) for p in images],
            "label": None if label is None else str(label),
        },
        "image_shape": list(pre.image.shape),
        "label_shape": None if pre.label is None else list(pre.label.shape),
        "label_dtype": None if pre.label is None else str(pre.label.dtype),
        "properties": pre.properties,
    }
    _write_json(paths["meta"], meta)


def build_cache(
    cases: Sequence[Any],
    config: PreprocessConfig | dict[str, Any],
    cache_dir: Path | str,
    progress: bool = True,
    reader: Callable[[Path], Any] | None = None,
    label_reader: Callable[[Path], Any] | None = None,
) -> CacheIndex:
    """Preprocess every case not yet cached under ``cache_dir/<fingerprint>/``.

    ``cases``: objects with ``case_id``, ``images`` (paths) and ``label`` (path or None), e.g.
    :class:`resunet.data.datasets.Case`. ``reader`` (default :func:`resunet.data.io.read_volume`)
    turns a path into a :class:`Volume`; ``label_reader`` (default ``reader``) reads label files,
    e.g. ``lambda p: datasets.read_label(p, info)`` so picture masks follow the dataset's rule. Cases already cached with the same key are not read
    again. ``progress`` shows a rich progress bar.
    """
    config = _config(config)
    fingerprint = config_fingerprint(config)
    directory = Path(cache_dir) / fingerprint
    directory.mkdir(parents=True, exist_ok=True)
    config_path = directory / "config.json"
    if not config_path.exists():
        _write_json(
            config_path, {"format": CACHE_FORMAT_VERSION, "config": config.model_dump(mode="json")}
        )
    case_ids = [_check_case_id(c.case_id) for c in cases]
    dupes = sorted({c for c in case_ids if case_ids.count(c) > 1})
    if dupes:
        raise InputError(f"duplicate case ids: {dupes}")
    index = CacheIndex(
        directory=directory, fingerprint=fingerprint, config=config, case_ids=case_ids
    )
    keys = {c: case_key(case, config) for c, case in zip(case_ids, cases)}
    todo = []
    for case_id, case in zip(case_ids, cases):
        if _is_complete(directory, case_id, keys[case_id]):
            index.reused.append(case_id)
        else:
            todo.append((case_id, case))
    if todo:
        read = reader if reader is not None else read_volume
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        columns = (
            TextColumn("[progress.description]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[case]}"),
        )
        with Progress(*columns, disable=not progress, transient=False) as bar:
            task = bar.add_task("Preprocessing", total=len(todo), case="")
            for case_id, case in todo:
                bar.update(task, case=case_id)
                _build_one(case, config, directory, keys[case_id], read, label_reader or read)
                index.built.append(case_id)
                bar.advance(task)
    if todo or not (directory / "index.json").exists():
        _write_json(
            directory / "index.json",
            {
                "fingerprint": fingerprint,
                "cases": [{"case_id": c, "case_key": keys[c]} for c in case_ids],
            },
        )
    return index


def load_cached_case(directory: Path | str, case_id: str) -> CachedCase:
    """Open a cached case from the fingerprint folder (:attr:`CacheIndex.directory`); arrays
    are memory-mapped read-only (``np.load(mmap_mode="r")``)."""
    directory = Path(directory)
    case_id = _check_case_id(case_id)
    paths = _paths(directory, case_id)
    meta = _read_meta(paths["meta"])
    if meta is None:
        raise InputError(
            f"case {case_id!r} is not (completely) cached in {directory}; run build_cache first"
        )
    try:
        image = np.load(paths["image"], mmap_mode="r", allow_pickle=False)
        label = None
        if meta.get("label_shape") is not None:
            label = np.load(paths["label"], mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise InputError(
            f"cached case {case_id!r} in {directory} is damaged ({exc}); delete the folder and "
            "build the cache again"
        ) from exc
    if list(image.shape) != meta["image_shape"] or (
        label is not None and list(label.shape) != meta["label_shape"]
    ):
        raise InputError(
            f"cached case {case_id!r} in {directory} does not match its metadata; delete the "
            "folder and build the cache again"
        )
    return CachedCase(
        case_id=case_id,
        image=image,
        label=label,
        properties=meta["properties"],
        directory=directory,
    )
