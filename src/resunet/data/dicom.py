"""Read a DICOM image series (a folder of slices, or one multi-frame file) into a `Volume`.

How a folder is read:

1. every file below it (any name, any extension, sub-folders included) is checked for the
   ``DICM`` marker (or the start of a DICOM file without preamble); other files (``README.txt``,
   ``DICOMDIR`` ...) are skipped, and so are DICOM files that are no image (no ``PixelData``, or
   SEG / SR / RTSTRUCT / PR / KO objects);
2. image files are grouped by ``SeriesInstanceUID``; with several series ``series_uid`` must name
   one (the `InputError` lists them all);
3. slices are ordered by their ``ImagePositionPatient`` projected on the slice normal
   (row x column direction of ``ImageOrientationPatient``), never by file name or
   ``InstanceNumber``; the slice spacing comes from these positions and must be uniform
   (duplicated positions, gaps from missing slices, mixed orientations or gantry tilt raise
   `InputError`);
4. ``RescaleSlope`` / ``RescaleIntercept`` are applied per slice: the array is ``int16`` when the
   rescaled values are integers that fit, ``float32`` otherwise.

The result follows the `Volume` conventions: array ``(D, H, W)`` (``(3, D, H, W)`` for colour),
spacing ``(z, y, x)`` mm, origin = LPS position of the first slice's first pixel, direction
columns = row direction, column direction, slice normal (what SimpleITK's ImageSeriesReader
gives). ``meta`` keeps, one entry per slice in array order, ``files``, ``sop_instance_uids``,
``frame_numbers`` (1-based; 1 for single-frame files) and ``slice_positions`` (LPS mm); plus
``study_uid``, ``series_uid``, ``frame_of_reference_uid``, ``sop_class_uid``, ``modality`` and,
under ``"dicom"``, the patient/study/series attributes a DICOM SEG writer copies. No dataset is
kept in memory: re-read ``meta["files"]`` when the source datasets are needed.
"""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from resunet.data.volume import Volume
from resunet.errors import InputError

__all__ = ["read_dicom_series", "list_dicom_series", "SeriesSummary", "COPIED_ATTRIBUTES"]

# Objects that carry no image to segment even when they have pixel data (SEG) or none at all.
_NON_IMAGE_MODALITIES = {"SEG", "SR", "RTSTRUCT", "RTPLAN", "RTRECORD", "KO", "PR", "REG", "DOC", "FID"}
_SEG_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.66.4",  # Segmentation Storage
    "1.2.840.10008.5.1.4.1.1.66.7",  # Label Map Segmentation Storage
}

# Patient / study / series attributes a derived object (DICOM SEG) copies from its source.
COPIED_ATTRIBUTES = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "PatientAge",
    "IssuerOfPatientID", "StudyInstanceUID", "StudyDate", "StudyTime", "StudyID",
    "AccessionNumber", "ReferringPhysicianName", "StudyDescription", "SeriesInstanceUID",
    "SeriesNumber", "SeriesDescription", "SeriesDate", "SeriesTime", "Modality",
    "FrameOfReferenceUID", "PositionReferenceIndicator", "BodyPartExamined", "Manufacturer",
    "InstitutionName", "SOPClassUID", "PatientPosition", "Laterality",
)

_POS_TOL = 1e-3  # mm: positions closer than this are duplicates


def _pydicom():
    import pydicom

    return pydicom


@dataclass(frozen=True)
class _FileHeader:
    """What the scan keeps of one DICOM image file (no pixels, no dataset)."""

    path: Path
    series_uid: str
    study_uid: str
    modality: str
    description: str
    sop_uid: str
    frames: int
    rows: int
    columns: int
    position: tuple[float, ...] | None  # ImagePositionPatient (LPS mm)
    orientation: tuple[float, ...] | None  # ImageOrientationPatient


@dataclass(frozen=True)
class SeriesSummary:
    """One image series found in a folder."""

    series_uid: str
    modality: str
    description: str
    num_files: int
    files: tuple[Path, ...]

    def describe(self) -> str:
        desc = f" {self.description!r}" if self.description else ""
        return f"{self.series_uid} ({self.modality or '?'}{desc}, {self.num_files} file(s))"


# --------------------------------------------------------------------------- scanning


def _looks_like_dicom(path: Path) -> tuple[bool, bool]:
    """(has the DICM marker, looks like a DICOM stream without preamble)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False, False
    if len(head) == 132 and head[128:132] == b"DICM":
        return True, False
    # A file without preamble/meta starts with a group 0x0002 or 0x0008 tag (little endian).
    return False, len(head) >= 8 and head[:2] in (b"\x02\x00", b"\x08\x00") and head[3:4] == b"\x00"


def _read_header(path: Path, force: bool):
    pydicom = _pydicom()
    return pydicom.dcmread(str(path), defer_size=1024, force=force)


def _is_image(ds) -> bool:
    if "PixelData" not in ds:
        return False
    if str(ds.get("Modality", "")).upper() in _NON_IMAGE_MODALITIES:
        return False
    return str(ds.get("SOPClassUID", "")) not in _SEG_SOP_CLASSES


def _scan(paths: list[Path]) -> tuple[list[_FileHeader], list[tuple[Path, str]], list[tuple[Path, str]]]:
    """Split ``paths`` into image headers, non-image DICOM files and unreadable DICOM files."""
    images: list[_FileHeader] = []
    non_image: list[tuple[Path, str]] = []
    broken: list[tuple[Path, str]] = []
    for path in paths:
        marker, raw = _looks_like_dicom(path)
        if not (marker or raw):
            continue
        try:
            ds = _read_header(path, force=raw)
        except Exception as exc:
            if marker:
                broken.append((path, f"{type(exc).__name__}: {exc}"))
            continue
        if raw and ("SOPClassUID" not in ds or "SeriesInstanceUID" not in ds):
            continue  # not DICOM after all
        if not _is_image(ds):
            kind = str(ds.get("Modality", "")) or "?"
            if "PixelData" not in ds and kind.upper() not in _NON_IMAGE_MODALITIES:
                kind = f"{kind} without PixelData"  # an image object whose pixels are missing
            non_image.append((path, kind))
            continue
        images.append(
            _FileHeader(
                path=path,
                series_uid=str(ds.get("SeriesInstanceUID", "")),
                study_uid=str(ds.get("StudyInstanceUID", "")),
                modality=str(ds.get("Modality", "")),
                description=str(ds.get("SeriesDescription", "")),
                sop_uid=str(ds.get("SOPInstanceUID", "")),
                frames=int(ds.get("NumberOfFrames", 1) or 1),
                rows=int(ds.get("Rows", 0) or 0),
                columns=int(ds.get("Columns", 0) or 0),
                position=_maybe_floats(ds.get("ImagePositionPatient"), 3),
                orientation=_maybe_floats(ds.get("ImageOrientationPatient"), 6),
            )
        )
    return images, non_image, broken


def _maybe_floats(value: Any, n: int) -> tuple[float, ...] | None:
    try:
        out = tuple(float(v) for v in value)
    except Exception:
        return None
    return out if len(out) == n and all(np.isfinite(out)) else None


def _files_below(folder: Path) -> list[Path]:
    files: list[Path] = []
    for dirpath, _dirnames, filenames in os.walk(folder):
        for name in filenames:
            p = Path(dirpath) / name
            if p.is_file():
                files.append(p)
    return sorted(files)


def _group(headers: list[_FileHeader]) -> dict[str, list[_FileHeader]]:
    groups: dict[str, list[_FileHeader]] = defaultdict(list)
    for h in headers:
        groups[h.series_uid].append(h)
    return dict(groups)


def _summaries(groups: dict[str, list[_FileHeader]]) -> list[SeriesSummary]:
    return [
        SeriesSummary(uid, hs[0].modality, hs[0].description, len(hs), tuple(h.path for h in hs))
        for uid, hs in sorted(groups.items(), key=lambda kv: (kv[1][0].modality, kv[0]))
    ]


def list_dicom_series(folder: str | os.PathLike[str]) -> list[SeriesSummary]:
    """List the image series below ``folder`` (UID, modality, description, files)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder} is not a folder")
    images, _, _ = _scan(_files_below(folder))
    return _summaries(_group(images))


# --------------------------------------------------------------------------- geometry


def _floats(value: Any, n: int, what: str, path: Path) -> np.ndarray:
    try:
        arr = np.asarray([float(v) for v in value], dtype=np.float64)
    except Exception as exc:
        raise InputError(f"{path}: {what} is not numeric ({value!r})") from exc
    if arr.shape != (n,) or not np.all(np.isfinite(arr)):
        raise InputError(f"{path}: {what} must hold {n} numbers, got {value!r}")
    return arr


def _stack_geometry(
    positions: np.ndarray, iop: np.ndarray, labels: list[str], where: str, fallback_dz: float
) -> tuple[np.ndarray, float, np.ndarray]:
    """Order slices along the normal; return (order, slice spacing, direction 3x3).

    ``labels`` name each slice in messages (file names or frame numbers).
    """
    row, col = iop[:3], iop[3:]
    normal = np.cross(row, col)
    norm = np.linalg.norm(normal)
    if norm < 1e-6:
        raise InputError(f"{where}: ImageOrientationPatient {iop.tolist()} is degenerate")
    normal = normal / norm
    direction = np.stack([row, col, normal], axis=1)
    dist = positions @ normal
    order = np.argsort(dist, kind="stable")
    n = len(order)
    if n == 1:
        return order, fallback_dz, direction
    d = dist[order]
    diffs = np.diff(d)
    dup = np.flatnonzero(diffs < _POS_TOL)
    if dup.size:
        i = int(dup[0])
        raise InputError(
            f"{where}: {dup.size} pair(s) of slices share a position, e.g. "
            f"{labels[order[i]]} and {labels[order[i + 1]]} both at {d[i]:.3f} mm along the normal. "
            "The series mixes several acquisitions, echoes or time points; split it or pass the "
            "series_uid of a single stack"
        )
    typical = float(np.median(diffs))
    tol = max(1e-2, 1e-2 * typical)
    bad = np.flatnonzero(np.abs(diffs - typical) > tol)
    if bad.size:
        i = int(bad[0])
        hint = ": a slice is probably missing" if diffs[i] > 1.5 * typical else ""
        raise InputError(
            f"{where}: slice spacing is not uniform: {diffs[i]:.4f} mm between "
            f"{labels[order[i]]} and {labels[order[i + 1]]}, {typical:.4f} mm elsewhere{hint}. "
            "Complete the series (re-export it) or resample it before use"
        )
    spacing = float((d[-1] - d[0]) / (n - 1))
    # All slices must lie on one line along the normal (no gantry tilt / shear).
    offsets = positions[order] - positions[order[0]] - np.outer(d - d[0], normal)
    lateral = np.linalg.norm(offsets, axis=1)
    if np.any(lateral > tol):
        i = int(np.argmax(lateral))
        raise InputError(
            f"{where}: slice {labels[order[i]]} is shifted {lateral[i]:.3f} mm across the slice "
            "normal (gantry tilt or a sheared stack); resample the series to a regular grid first"
        )
    return order, spacing, direction


def _rescale(stored: list[np.ndarray], slopes: list[float], intercepts: list[float]) -> np.ndarray:
    """Apply slope/intercept per slice: int16 when exact and in range, float32 otherwise."""
    integral = all(float(s).is_integer() for s in slopes) and all(
        float(b).is_integer() for b in intercepts
    )
    if integral:
        out = np.empty((len(stored),) + stored[0].shape, dtype=np.int64)
        for k, (a, s, b) in enumerate(zip(stored, slopes, intercepts)):
            out[k] = a.astype(np.int64) * int(s) + int(b)
        info = np.iinfo(np.int16)
        if out.size == 0 or (out.min() >= info.min and out.max() <= info.max):
            return out.astype(np.int16)
        return out.astype(np.float32)
    out32 = np.empty((len(stored),) + stored[0].shape, dtype=np.float32)
    for k, (a, s, b) in enumerate(zip(stored, slopes, intercepts)):
        out32[k] = (a.astype(np.float64) * float(s) + float(b)).astype(np.float32)
    return out32


def _pixel_array(ds, path: Path) -> np.ndarray:
    try:
        return np.asarray(ds.pixel_array)
    except Exception as exc:
        ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        ts_name = getattr(ts, "name", str(ts))
        raise InputError(
            f"cannot decode the pixel data of {path} (transfer syntax {ts_name}): "
            f"{type(exc).__name__}: {exc}. The file may be truncated, or compressed with a codec "
            "that needs an extra package (pip install pylibjpeg pylibjpeg-libjpeg "
            "pylibjpeg-openjpeg, or python-gdcm)"
        ) from exc


def _copied_attributes(ds) -> dict[str, str]:
    out: dict[str, str] = {}
    for kw in COPIED_ATTRIBUTES:
        if kw in ds and ds.data_element(kw) is not None:
            value = ds.data_element(kw).value
            out[kw] = "" if value is None else str(value)
    return out


def _common_meta(ds, path_list: list[Path]) -> dict[str, Any]:
    return {
        "format": "dicom",
        "study_uid": str(ds.get("StudyInstanceUID", "")),
        "series_uid": str(ds.get("SeriesInstanceUID", "")),
        "frame_of_reference_uid": str(ds.get("FrameOfReferenceUID", "")),
        "sop_class_uid": str(ds.get("SOPClassUID", "")),
        "modality": str(ds.get("Modality", "")),
        "series_description": str(ds.get("SeriesDescription", "")),
        "dicom": _copied_attributes(ds),
        "source": str(path_list[0].parent if len(path_list) > 1 else path_list[0]),
    }


def _in_plane_spacing(ds, path: Path) -> np.ndarray:
    for kw in ("PixelSpacing", "ImagerPixelSpacing"):
        if kw in ds and ds.data_element(kw).value:
            return _floats(ds.data_element(kw).value, 2, kw, path)
    return np.ones(2)


def _fallback_dz(ds) -> float:
    for kw in ("SpacingBetweenSlices", "SliceThickness"):
        value = ds.get(kw)
        try:
            if value is not None and float(value) > 0:
                return float(value)
        except (TypeError, ValueError):
            pass
    return 1.0


def _finish(
    stored: list[np.ndarray], slopes: list[float], intercepts: list[float], samples: int
) -> np.ndarray:
    if samples > 1:  # colour: no rescale, channels first
        arr = np.stack(stored)
        return np.ascontiguousarray(np.moveaxis(arr, -1, 0))
    return _rescale(stored, slopes, intercepts)


# --------------------------------------------------------------------------- single-frame series


def _read_single_frame_series(headers: list[_FileHeader], where: str) -> Volume:
    pydicom = _pydicom()
    paths = [h.path for h in headers]
    names = [p.name for p in paths]
    h0 = headers[0]
    for h in headers[1:]:
        if (h.rows, h.columns) != (h0.rows, h0.columns):
            raise InputError(
                f"{where}: {h.path.name} is {h.rows}x{h.columns} pixels but {h0.path.name} is "
                f"{h0.rows}x{h0.columns}; the series mixes images of different sizes (a "
                "localizer?): remove them or pass another series_uid"
            )
    first = pydicom.dcmread(str(paths[0]), stop_before_pixels=True, force=True)
    in_plane = _in_plane_spacing(first, paths[0])
    fallback = _fallback_dz(first)
    incomplete = [h for h in headers if h.position is None or h.orientation is None]
    if incomplete:
        if len(paths) > 1:
            raise InputError(
                f"{where}: {incomplete[0].path.name} has no valid ImagePositionPatient/"
                "ImageOrientationPatient, so the slices of this series cannot be ordered in "
                "space; read the files one at a time"
            )
        order = np.array([0])
        dz = fallback
        direction = np.eye(3)
        if h0.orientation is not None:
            o = np.asarray(h0.orientation)
            n = np.cross(o[:3], o[3:])
            if np.linalg.norm(n) > 1e-6:
                direction = np.stack([o[:3], o[3:], n / np.linalg.norm(n)], axis=1)
        positions = np.asarray([h0.position if h0.position is not None else (0.0, 0.0, 0.0)])
    else:
        iops = np.asarray([h.orientation for h in headers], dtype=np.float64)
        bad = np.flatnonzero(np.abs(iops - iops[0]).max(axis=1) > 1e-4)
        if bad.size:
            raise InputError(
                f"{where}: {paths[bad[0]].name} has ImageOrientationPatient "
                f"{iops[bad[0]].tolist()} but {paths[0].name} has {iops[0].tolist()}; the series "
                "mixes orientations (a localizer?): remove those files or pass another series_uid"
            )
        positions = np.asarray([h.position for h in headers], dtype=np.float64)
        order, dz, direction = _stack_geometry(positions, iops[0], names, where, fallback)

    stored: list[np.ndarray] = []
    slopes: list[float] = []
    intercepts: list[float] = []
    sops: list[str] = []
    samples = int(first.get("SamplesPerPixel", 1) or 1)
    for idx in order:
        path = paths[idx]
        ds = pydicom.dcmread(str(path), force=True)
        arr = _pixel_array(ds, path)
        expected = (int(first.Rows), int(first.Columns)) + ((samples,) if samples > 1 else ())
        if arr.shape != expected:
            raise InputError(
                f"{path}: pixel array of shape {arr.shape}, expected {expected} like the rest of "
                "the series (multi-frame files cannot be mixed with single-frame ones)"
            )
        stored.append(arr)
        slopes.append(float(ds.get("RescaleSlope", 1) or 1))
        intercepts.append(float(ds.get("RescaleIntercept", 0) or 0))
        sops.append(str(ds.get("SOPInstanceUID", "")))
        del ds
    array = _finish(stored, slopes, intercepts, samples)
    meta = _common_meta(first, paths)
    meta.update(
        files=[str(paths[i]) for i in order],
        sop_instance_uids=sops,
        frame_numbers=[1] * len(order),
        slice_positions=[tuple(float(v) for v in positions[i]) for i in order],
    )
    return _stacked_volume(array, dz, in_plane, positions[order[0]], direction, meta)


# --------------------------------------------------------------------------- multi-frame files


def _functional(ds, frame: int, sequence: str, keyword: str):
    """Look ``keyword`` up in the per-frame, then the shared functional group ``sequence``."""
    for groups, index in (("PerFrameFunctionalGroupsSequence", frame),
                          ("SharedFunctionalGroupsSequence", 0)):
        seq = ds.get(groups)
        if not seq or index >= len(seq):
            continue
        item = seq[index]
        inner = item.get(sequence)
        if inner and keyword in inner[0]:
            return inner[0].data_element(keyword).value
    return None


def _stacked_volume(array: np.ndarray, dz: float, in_plane: Any, first_position: Any, direction: np.ndarray,
                    meta: dict[str, Any]) -> Volume:
    """The `Volume` of a sorted slice stack: spacing ``(dz, row, column)`` mm, origin at the first slice."""
    return Volume(array, (dz, float(in_plane[0]), float(in_plane[1])), tuple(first_position), direction,
                  spatial_ndim=3, meta=meta)


def _enhanced_frames(ds: Any, n: int, path: Path) -> tuple:
    """Per-frame geometry and rescale of an enhanced multi-frame file: ``(positions (n, 3) mm,
    orientation (6,), in-plane spacing (2,) mm, fallback slice step mm, slopes, intercepts)``."""
    ipp_list = []
    for i in range(n):
        ipp = _functional(ds, i, "PlanePositionSequence", "ImagePositionPatient")
        if ipp is None:
            raise InputError(
                f"{path}: frame {i + 1} has no PlanePositionSequence/ImagePositionPatient; "
                "its frames cannot be placed in space"
            )
        ipp_list.append(_floats(ipp, 3, "ImagePositionPatient", path))
    iops = []
    for i in range(n):
        iop = _functional(ds, i, "PlaneOrientationSequence", "ImageOrientationPatient")
        if iop is None:
            raise InputError(f"{path}: frame {i + 1} has no PlaneOrientationSequence")
        iops.append(_floats(iop, 6, "ImageOrientationPatient", path))
    iop_arr = np.stack(iops)
    if np.abs(iop_arr - iop_arr[0]).max() > 1e-4:
        raise InputError(
            f"{path}: frames have different orientations; only single-stack multi-frame "
            "files are supported"
        )
    positions = np.stack(ipp_list)
    ps = _functional(ds, 0, "PixelMeasuresSequence", "PixelSpacing")
    in_plane = _floats(ps, 2, "PixelSpacing", path) if ps else _in_plane_spacing(ds, path)
    thickness = _functional(ds, 0, "PixelMeasuresSequence", "SpacingBetweenSlices") or \
        _functional(ds, 0, "PixelMeasuresSequence", "SliceThickness")
    fallback = float(thickness) if thickness else _fallback_dz(ds)
    slopes = []
    intercepts = []
    for i in range(n):
        s = _functional(ds, i, "PixelValueTransformationSequence", "RescaleSlope")
        b = _functional(ds, i, "PixelValueTransformationSequence", "RescaleIntercept")
        slopes.append(float(s if s is not None else ds.get("RescaleSlope", 1) or 1))
        intercepts.append(float(b if b is not None else ds.get("RescaleIntercept", 0) or 0))
    return positions, iop_arr[0], in_plane, fallback, slopes, intercepts


def _read_multi_frame(path: Path, where: str) -> Volume:
    pydicom = _pydicom()
    ds = pydicom.dcmread(str(path), force=True)
    n = int(ds.get("NumberOfFrames", 1) or 1)
    labels = [f"{path.name} frame {i + 1}" for i in range(n)]
    if "PerFrameFunctionalGroupsSequence" in ds:
        positions, iop, in_plane, fallback, slopes, intercepts = _enhanced_frames(ds, n, path)
        order, dz, direction = _stack_geometry(positions, iop, labels, where, fallback)
    elif "GridFrameOffsetVector" in ds and "ImagePositionPatient" in ds:
        # RT Dose style: one position plus offsets along the normal.
        iop = _floats(ds.ImageOrientationPatient, 6, "ImageOrientationPatient", path)
        ipp = _floats(ds.ImagePositionPatient, 3, "ImagePositionPatient", path)
        offsets = _floats(ds.GridFrameOffsetVector, n, "GridFrameOffsetVector", path)
        normal = np.cross(iop[:3], iop[3:])
        positions = ipp[None, :] + offsets[:, None] * normal[None, :]
        in_plane = _in_plane_spacing(ds, path)
        scale = float(ds.get("DoseGridScaling", ds.get("RescaleSlope", 1)) or 1)
        slopes = [scale] * n
        intercepts = [float(ds.get("RescaleIntercept", 0) or 0)] * n
        order, dz, direction = _stack_geometry(positions, iop, labels, where, _fallback_dz(ds))
    else:
        raise InputError(
            f"{path}: multi-frame file ({n} frames) without per-frame plane positions "
            "(PerFrameFunctionalGroupsSequence) is not supported; convert it to single-frame "
            "slices or to NIfTI first"
        )
    pixels = _pixel_array(ds, path)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if pixels.shape[0] != n or pixels.ndim != (3 if samples == 1 else 4):
        raise InputError(f"{path}: pixel array of shape {pixels.shape} does not hold {n} frames")
    stored = [pixels[i] for i in order]
    array = _finish(stored, [slopes[i] for i in order], [intercepts[i] for i in order], samples)
    meta = _common_meta(ds, [path])
    sop = str(ds.get("SOPInstanceUID", ""))
    meta.update(
        files=[str(path)] * n,
        sop_instance_uids=[sop] * n,
        frame_numbers=[int(i) + 1 for i in order],
        slice_positions=[tuple(float(v) for v in positions[i]) for i in order],
    )
    return _stacked_volume(array, dz, in_plane, positions[order[0]], direction, meta)


# --------------------------------------------------------------------------- entry point


def read_dicom_series(folder_or_file: str | os.PathLike[str], series_uid: str | None = None) -> Volume:
    """Read one DICOM image series (folder) or one DICOM image file into a `Volume`.

    ``series_uid`` picks a series when the folder holds several. A single file is read alone
    (a 1-slice volume ``(1, H, W)``, or ``(D, H, W)`` for a multi-frame file).
    """
    path = Path(folder_or_file)
    if not path.exists():
        raise InputError(f"{path} does not exist; pass a DICOM series folder or a DICOM file")
    if path.is_file():
        if path.stat().st_size == 0:
            raise InputError(f"{path} is an empty file (0 bytes); re-export or re-copy it")
        marker, raw = _looks_like_dicom(path)
        if not (marker or raw):
            raise InputError(
                f"{path} is not a DICOM file (no 'DICM' marker at byte 128); pass a DICOM file "
                "or a series folder"
            )
        images, non_image, broken = _scan([path])
        if broken:
            raise InputError(f"cannot read DICOM file {path}: {broken[0][1]}; the file is corrupt")
        if not images:
            kind = non_image[0][1] if non_image else "?"
            raise InputError(
                f"{path} is a DICOM file without an image ({kind}); pass an image file or series"
            )
        header = images[0]
        if series_uid is not None and header.series_uid != series_uid:
            raise InputError(
                f"{path} belongs to series {header.series_uid}, not to the requested {series_uid}"
            )
        if header.frames > 1:
            return _read_multi_frame(path, str(path))
        return _read_single_frame_series([header], str(path))

    files = _files_below(path)
    if not files:
        raise InputError(f"folder {path} is empty; point to the folder holding the DICOM series")
    images, non_image, broken = _scan(files)
    if broken:
        listing = "; ".join(f"{p.name}: {why}" for p, why in broken[:5])
        raise InputError(
            f"folder {path}: {len(broken)} DICOM file(s) cannot be read ({listing}); remove or "
            "re-copy them"
        )
    if not images:
        if non_image:
            listing = ", ".join(f"{p.name} ({kind})" for p, kind in non_image[:10])
            raise InputError(
                f"folder {path} holds DICOM files but no image: {listing}; point to the folder of "
                "an image series (CT, MR, ...)"
            )
        sample = ", ".join(p.name for p in files[:5])
        raise InputError(
            f"folder {path} holds no DICOM file ({len(files)} other file(s), e.g. {sample}); "
            "point to the folder of a DICOM series"
        )
    groups = _group(images)
    if series_uid is None:
        if len(groups) > 1:
            listing = "\n".join("  - " + s.describe() for s in _summaries(groups))
            raise InputError(
                f"folder {path} holds {len(groups)} image series:\n{listing}\n"
                "move each series into its own folder (resunet predict reads one series per folder), "
                "or pass series_uid=<one of these SeriesInstanceUIDs> to read_volume to pick one"
            )
        series_uid = next(iter(groups))
    elif series_uid not in groups:
        listing = "\n".join("  - " + s.describe() for s in _summaries(groups))
        raise InputError(
            f"folder {path} has no image series {series_uid}; its series are:\n{listing}"
        )
    headers = sorted(groups[series_uid], key=lambda h: str(h.path))
    where = f"DICOM series {series_uid} in {path}"
    multi = [h for h in headers if h.frames > 1]
    if multi:
        if len(headers) > 1:
            raise InputError(
                f"{where}: mixes {len(multi)} multi-frame file(s) (e.g. {multi[0].path.name}) with "
                f"{len(headers) - 1} other file(s); read each multi-frame file on its own"
            )
        return _read_multi_frame(headers[0].path, where)
    return _read_single_frame_series(headers, where)
