"""Dataset fingerprint: what the planner needs to know about a dataset, measured once and cached.

Per case: spatial shape (array order ``(D, H, W)`` / ``(H, W)``), spacing (mm, array order;
3-D: both in the canonical axis order of `resunet.data.preprocess.canonical_axes`, the order the
planned preprocessing reorients every case to, so they compare across differently stored scans),
orientation (the closest axis codes, e.g. ``"SAR"``... see `orientation_code`), the number of
channels and the shape of the non-zero region (what ``crop_to_nonzero`` keeps).
Per channel: intensity statistics of the FOREGROUND voxels (label > 0) pooled over the cases,
from at most `SAMPLES_PER_CASE` voxels per case (as nnU-Net): mean, sd, 0.5 / 50 / 99.5
percentiles, min, max; plus the per-case foreground means and sds (how much cases differ).
Per class: the mean fraction of voxels it covers, the number of cases it appears in and the
median number of connected components per case where it appears (-1 where counting them would
be slow: more than `COMPONENT_BUDGET` voxels x classes in a case).
Modality per channel from the dataset's channel names (`modality_from_name`).

`fingerprint_dataset` reads every case once (two threads) and caches the result as JSON under
``<cache_dir>/fingerprints/<key>.json``, the key hashing every input file's path, size and mtime,
so an unchanged dataset is fingerprinted only once.
"""

from __future__ import annotations

import hashlib
import json
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict
from scipy import ndimage

from resunet.data.datasets import Case, DatasetInfo, load_case
from resunet.data.io import atomic_write
from resunet.data.preprocess import canonical_axes
from resunet.errors import InputError, ResunetError

__all__ = [
    "FINGERPRINT_VERSION",
    "CaseFingerprint",
    "ChannelStats",
    "ClassStats",
    "DatasetFingerprint",
    "fingerprint_dataset",
    "modality_from_name",
    "orientation_code",
]

FINGERPRINT_VERSION = 2  # 2: 3-D shapes and spacings in the canonical axis order
SAMPLES_PER_CASE = 10_000
#: voxels x classes per case up to which connected components are counted
COMPONENT_BUDGET = 200_000_000

#: channel-name patterns -> modality, checked in this order (case-insensitive, whole words)
_MODALITY_PATTERNS: list[tuple[str, str]] = [
    (r"\bct\b|\bcta\b|\bhu\b|computed tomography|\bpet[- ]?ct\b", "ct"),
    (r"\bmri?\b|\bt1\w*|\bt2\w*|flair|\bdwi\b|\badc\b|\bpd\b|\bswi\b|\bbold\b|\bdti\b|\bmprage\b"
     r"|\bgado|\bt1c\b|\bt1ce\b|\bdce\b|magnetic", "mr"),
    (r"^(r|g|b|red|green|blue|rgb|colou?r)$", "rgb"),
    (r"fluoresc|nucle|dapi|microscop|\bhe\b|h&e|histo|\bem\b|phase|brightfield", "microscopy"),
    (r"^(gray|grey|intensity|image)$", "picture"),
]


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CaseFingerprint(_Frozen):
    case_id: str
    shape: tuple[int, ...]
    spacing: tuple[float, ...]
    orientation: str
    num_channels: int
    nonzero_shape: tuple[int, ...]


class ChannelStats(_Frozen):
    """Foreground intensity statistics of one channel (input units: HU for CT, raw for MR)."""

    name: str
    modality: str
    mean: float
    sd: float
    p00_5: float
    median: float
    p99_5: float
    min: float
    max: float
    case_means: list[float]
    case_sds: list[float]
    integer_valued: bool


class ClassStats(_Frozen):
    name: str
    value: int
    voxel_fraction: float
    cases_present: int
    median_components: float


class DatasetFingerprint(_Frozen):
    """Everything the planner reads about a dataset (see the module docstring)."""

    version: int = FINGERPRINT_VERSION
    root: str
    layout: str
    spatial_ndim: int
    labels: dict[str, int]
    cases: list[CaseFingerprint]
    channels: list[ChannelStats]
    classes: list[ClassStats]

    @property
    def num_cases(self) -> int:
        return len(self.cases)

    @property
    def median_spacing(self) -> tuple[float, ...]:
        return tuple(float(v) for v in np.median([c.spacing for c in self.cases], axis=0))

    @property
    def median_shape(self) -> tuple[float, ...]:
        """Median spatial shape of the non-zero regions (what training sees before resampling)."""
        return tuple(float(v) for v in np.median([c.nonzero_shape for c in self.cases], axis=0))

    @property
    def is_flat(self) -> bool:
        """2-D data: 2-D images, or 3-D files holding one slice each (2-D NIfTI)."""
        return self.spatial_ndim == 2 or all(min(c.shape) == 1 for c in self.cases)

    @property
    def modalities(self) -> list[str]:
        return [c.modality for c in self.channels]

    def with_first_axis(self, axis: int) -> "DatasetFingerprint":
        """This fingerprint with spatial axis ``axis`` moved first in every case's shapes and
        spacing (the others keep their order): the array order `PreprocessConfig.slice_axis`
        gives the preprocessed cases."""
        if axis == 0:
            return self
        order = [axis, *(t for t in range(self.spatial_ndim) if t != axis)]
        cases = [c.model_copy(update={key: tuple(getattr(c, key)[t] for t in order)
                                      for key in ("shape", "spacing", "nonzero_shape")}) for c in self.cases]
        return self.model_copy(update={"cases": cases})

    def median_shape_at(self, spacing: tuple[float, ...]) -> tuple[float, ...]:
        """Median non-zero shape after resampling every case to ``spacing`` (mm, array order)."""
        shapes = [np.asarray(c.nonzero_shape) * np.asarray(c.spacing) / np.asarray(spacing) for c in self.cases]
        return tuple(float(v) for v in np.median(shapes, axis=0))

    def to_json(self) -> str:
        return self.model_dump_json(indent=1)


def modality_from_name(name: str, spatial_ndim: int) -> str:
    """``"ct"``, ``"mr"``, ``"rgb"``, ``"microscopy"`` or ``"picture"`` from a channel name
    (nnU-Net ``channel_names`` / MSD ``modality``). Unknown names: ``"mr"`` for 3-D data (MR is
    the common 3-D modality whose units are arbitrary, so the per-case z-score is the safe
    choice) and ``"picture"`` for 2-D data."""
    text = str(name).strip().lower()
    for pattern, modality in _MODALITY_PATTERNS:
        if re.search(pattern, text):
            return modality
    return "mr" if spatial_ndim == 3 else "picture"


def orientation_code(direction: np.ndarray) -> str:
    """Closest anatomical axis codes of the ARRAY axes ``(z, y, x)``, in LPS terms: the letter of
    the world direction each array axis increases towards (``L``/``R``, ``P``/``A``, ``S``/``I``),
    e.g. ``"SPL"`` for the canonical orientation (direction = identity). 2-D: two letters."""
    direction = np.asarray(direction, dtype=np.float64)
    n = direction.shape[0]
    letters = (("L", "R"), ("P", "A"), ("S", "I"))
    code = []
    for a in range(n):  # array axis a is ITK axis n-1-a
        v = direction[:, n - 1 - a]
        w = int(np.argmax(np.abs(v)))
        code.append(letters[w][0] if v[w] >= 0 else letters[w][1])
    return "".join(code)


def _nonzero_shape(image: np.ndarray, spatial_ndim: int) -> tuple[int, ...]:
    mask = (image != 0).reshape(-1, *image.shape[-spatial_ndim:]).any(axis=0)
    if not mask.any():
        return tuple(int(s) for s in mask.shape)
    idx = np.nonzero(mask)
    return tuple(int(i.max() - i.min() + 1) for i in idx)


def _case_record(case: Case, info: DatasetInfo, seed: int) -> dict[str, Any]:
    image, label = load_case(case, info)
    n = image.spatial_ndim
    array = np.asarray(image.array)
    array = array.reshape(-1, *image.shape)
    lab = None if label is None else np.asarray(label.array)
    rng = np.random.default_rng(seed)
    if lab is not None and (lab > 0).any():
        fg = lab > 0
    else:  # no foreground: sample the non-zero region (or everything)
        fg = (array != 0).any(axis=0)
        if not fg.any():
            fg = np.ones(image.shape, bool)
    flat = np.flatnonzero(fg)
    pick = flat if flat.size <= SAMPLES_PER_CASE else rng.choice(flat, SAMPLES_PER_CASE, replace=False)
    samples = [array[c].reshape(-1)[pick].astype(np.float64) for c in range(array.shape[0])]
    classes: dict[int, tuple[float, int]] = {}
    if lab is not None:
        values, counts = np.unique(lab, return_counts=True)
        # components cost one labelling pass per class: skipped (-1) where that would be slow
        count_components = lab.size * max(1, len(values) - 1) <= COMPONENT_BUDGET
        for v, k in zip(values.tolist(), counts.tolist()):
            if v == 0:
                continue
            components = ndimage.label(lab == v)[1] if count_components else -1
            classes[int(v)] = (k / lab.size, int(components))
    order = canonical_axes(image.direction)[0] if n == 3 else list(range(n))
    nonzero = _nonzero_shape(array, n)
    return {
        "case": CaseFingerprint(
            case_id=case.case_id, shape=tuple(image.shape[a] for a in order), spacing=tuple(image.spacing[a] for a in order),
            orientation=orientation_code(image.direction), num_channels=array.shape[0],
            nonzero_shape=tuple(nonzero[a] for a in order),
        ),
        "samples": samples,
        "integer": [bool(np.issubdtype(array.dtype, np.integer)) for _ in range(array.shape[0])],
        "classes": classes,
        "spatial_ndim": n,
    }


def _file_stamps(info: DatasetInfo) -> list[Any]:
    stamps: list[Any] = [FINGERPRINT_VERSION, info.layout, sorted(info.labels.items()), info.channel_names]
    for case in info.training:
        for p in [*case.images, case.label]:
            if p is None:
                continue
            st = Path(p).stat()
            stamps.append([str(Path(p).resolve()), st.st_size, st.st_mtime_ns])
    return stamps


def fingerprint_key(info: DatasetInfo) -> str:
    """Hash of the dataset's files (path, size, mtime) and layout: the fingerprint cache key."""
    return hashlib.sha256(json.dumps(_file_stamps(info), default=str).encode()).hexdigest()[:16]


def fingerprint_dataset(info: DatasetInfo, cache_dir: Path | None = None, progress: bool = True) -> DatasetFingerprint:
    """Measure (or load from ``cache_dir``) the fingerprint of ``info``'s labelled training cases."""
    cases = [c for c in info.training if c.label is not None]
    if not cases:
        raise InputError(f"dataset {info.root} has no labelled training case; a plan needs at least one")
    cached = None
    if cache_dir is not None:
        cached = Path(cache_dir) / "fingerprints" / f"{fingerprint_key(info)}.json"
        if cached.is_file():
            try:
                return DatasetFingerprint.model_validate_json(cached.read_text())
            except ValueError:
                pass  # damaged or older: measure again
    records = _measure(cases, info, progress)
    fp = _combine(info, records)
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(cached) as tmp:
            Path(tmp).write_text(fp.to_json())
    return fp


def _measure(cases: list[Case], info: DatasetInfo, progress: bool) -> list[dict[str, Any]]:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    def one(i: int) -> dict[str, Any]:
        try:
            return _case_record(cases[i], info, seed=i)
        except ResunetError as err:
            raise type(err)(f"case {cases[i].case_id}: {err}") from None

    columns = (TextColumn("[bold]Fingerprint"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    records: list[dict[str, Any]] = []
    with Progress(*columns, console=Console(stderr=True), disable=not progress, transient=True) as bar, \
            ThreadPoolExecutor(2) as pool:
        task = bar.add_task("fingerprint", total=len(cases))
        for record in pool.map(one, range(len(cases))):
            records.append(record)
            bar.advance(task)
    return records


def _combine(info: DatasetInfo, records: list[dict[str, Any]]) -> DatasetFingerprint:
    dims = {r["spatial_ndim"] for r in records}
    if len(dims) > 1:
        raise InputError(f"dataset {info.root} mixes 2-D and 3-D images; keep one kind per dataset")
    channels = {r["case"].num_channels for r in records}
    if len(channels) > 1:
        odd = [r["case"].case_id for r in records if r["case"].num_channels != records[0]["case"].num_channels]
        raise InputError(
            f"dataset {info.root}: cases have different channel counts {sorted(channels)} (e.g. {odd[:3]}); "
            "every case needs the same channels"
        )
    n_channels = records[0]["case"].num_channels
    spatial_ndim = dims.pop()
    names = list(info.channel_names) if len(info.channel_names) == n_channels else [f"channel {c}" for c in range(n_channels)]
    stats = []
    for c in range(n_channels):
        pooled = np.concatenate([r["samples"][c] for r in records])
        stats.append(ChannelStats(
            name=names[c], modality=modality_from_name(names[c], spatial_ndim),
            mean=float(pooled.mean()), sd=float(pooled.std()),
            p00_5=float(np.percentile(pooled, 0.5)), median=float(np.median(pooled)),
            p99_5=float(np.percentile(pooled, 99.5)), min=float(pooled.min()), max=float(pooled.max()),
            case_means=[float(r["samples"][c].mean()) for r in records],
            case_sds=[float(r["samples"][c].std()) for r in records],
            integer_valued=all(r["integer"][c] for r in records),
        ))
    classes = []
    for name, value in sorted(info.labels.items(), key=lambda kv: kv[1]):
        if value == 0:
            continue
        present = [r["classes"][value] for r in records if value in r["classes"]]
        classes.append(ClassStats(
            name=name, value=value,
            voxel_fraction=float(np.sum([p[0] for p in present]) / len(records)),
            cases_present=len(present),
            median_components=float(np.median([p[1] for p in present])) if present and min(p[1] for p in present) >= 0 else -1.0,
        ))
    return DatasetFingerprint(
        root=str(info.root), layout=info.layout, spatial_ndim=spatial_ndim, labels=dict(info.labels),
        cases=[r["case"] for r in records], channels=stats, classes=classes,
    )
