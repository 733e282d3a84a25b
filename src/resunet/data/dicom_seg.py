"""Write a label map as a DICOM Segmentation (SEG) object, and read one back onto its source.

`write_dicom_seg` turns a ``(D, H, W)`` label map predicted on a `Volume` read from a DICOM series
(`resunet.data.io.read_volume`) into one BINARY Segmentation Storage instance made with
highdicom:

- one segment per foreground label, numbered 1..N in increasing label value, labelled with the
  label's name, with a coded category/type (`segment_codes`) and algorithm type AUTOMATIC;
- one frame per source slice and segment (empty frames are kept), each frame referencing its
  source instance (``ReferencedSOPInstanceUID``, plus ``ReferencedFrameNumber`` for a multi-frame
  source) in its ``DerivationImageSequence``;
- the StudyInstanceUID, FrameOfReferenceUID and patient/study attributes of the source; a new
  SeriesInstanceUID and SOPInstanceUID.

The source datasets are re-read from ``source.meta["files"]`` at write time without their pixel
data: highdicom only uses the header attributes of the source images (patient/study module,
SOP class/instance UIDs, Rows/Columns, ImagePositionPatient/ImageOrientationPatient,
PixelSpacing, SliceThickness, ...), all of which come before ``PixelData`` in a file.

`read_dicom_seg` does the reverse: each SEG frame is put on the source slice it references (by
SOP instance UID and frame number, never by frame order), falling back to matching its
ImagePositionPatient with the source slice positions for frames without a reference.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from resunet.version import __version__
from resunet.data.io import atomic_write
from resunet.data.volume import Volume
from resunet.errors import InputError

__all__ = ["write_dicom_seg", "read_dicom_seg", "segment_codes", "SEGMENTATION_STORAGE"]

SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
_LABEL_MAP_SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.7"

_POSITION_TOL = 1e-2  # mm: a SEG frame without reference matches a source slice this close

# SNOMED CT concepts (CID 7150 categories, CID 7151 types), as (code value, meaning).
_TISSUE = ("85756007", "Tissue")
_ANATOMICAL_STRUCTURE = ("91723000", "Anatomical Structure")
_ABNORMAL_STRUCTURE = ("49755003", "Morphologically Abnormal Structure")

# Words of a label name -> (category, type). Abnormal structures are looked up first, so that
# "liver tumor" is a neoplasm, not a liver.
_ABNORMAL_TYPES = {
    "tumor": ("108369006", "Neoplasm"),
    "tumour": ("108369006", "Neoplasm"),
    "neoplasm": ("108369006", "Neoplasm"),
    "cancer": ("108369006", "Neoplasm"),
    "lesion": ("52988006", "Lesion"),
    "lesions": ("52988006", "Lesion"),
    "nodule": ("27925004", "Nodule"),
    "nodules": ("27925004", "Nodule"),
    "cyst": ("367643001", "Cyst"),
    "mass": ("4147007", "Mass"),
}
_ANATOMY_TYPES = {
    "liver": ("10200004", "Liver"),
    "kidney": ("64033007", "Kidney"),
    "kidneys": ("64033007", "Kidney"),
    "spleen": ("78961009", "Spleen"),
    "lung": ("39607008", "Lung"),
    "lungs": ("39607008", "Lung"),
    "heart": ("80891009", "Heart"),
    "brain": ("12738006", "Brain"),
    "pancreas": ("15776009", "Pancreas"),
    "prostate": ("41216001", "Prostate"),
    "stomach": ("69695003", "Stomach"),
    "bladder": ("89837001", "Bladder"),
    "aorta": ("15825003", "Aorta"),
    "bone": ("272673000", "Bone"),
    "muscle": ("71616004", "Muscle"),
    "vessel": ("59820001", "Blood Vessel"),
    "vessels": ("59820001", "Blood Vessel"),
}


def segment_codes(name: str) -> tuple[tuple[str, str, str], tuple[str, str, str]]:
    """Segmented property (category, type) for a label name, each ``(value, scheme, meaning)``.

    A word of the name that names a tumour/lesion/nodule/cyst/mass gives category
    "Morphologically Abnormal Structure"; a common organ (liver, kidney, lung, ...) gives
    "Anatomical Structure" with that organ; anything else gives the generic SCT "Tissue" /
    "Tissue".
    """
    words = [w for w in re.split(r"[^a-z]+", name.lower()) if w]
    for table, category in ((_ABNORMAL_TYPES, _ABNORMAL_STRUCTURE), (_ANATOMY_TYPES, _ANATOMICAL_STRUCTURE)):
        for word in words:
            if word in table:
                value, meaning = table[word]
                return (category[0], "SCT", category[1]), (value, "SCT", meaning)
    return (_TISSUE[0], "SCT", _TISSUE[1]), (_TISSUE[0], "SCT", _TISSUE[1])


# --------------------------------------------------------------------------- checks


def _source_instances(source: Volume) -> tuple[list[str], list[str], list[int]]:
    """(files, SOP instance UIDs, 1-based frame numbers) of the source slices, in array order."""
    meta = source.meta or {}
    files = meta.get("files")
    sops = meta.get("sop_instance_uids")
    if meta.get("format") != "dicom" or not files or not sops:
        fmt = meta.get("format") or "unknown"
        raise InputError(
            f"SEG output needs a DICOM series input: the source volume was read from a {fmt} "
            "file, not from a DICOM series (it has no source instances to reference); write a "
            ".nii.gz / .nrrd mask instead, or read the DICOM series with read_volume(folder)"
        )
    frames = list(meta.get("frame_numbers") or [1] * len(files))
    if source.spatial_ndim != 3 or not (len(files) == len(sops) == len(frames) == source.shape[0]):
        raise InputError(
            f"the DICOM metadata of the source volume lists {len(files)} file(s) and {len(sops)} "
            f"SOP instance(s) for {source.shape[0] if source.spatial_ndim == 3 else '?'} slice(s); "
            "the volume was changed after reading (cropped, resampled?): pass the volume as read"
        )
    return [str(f) for f in files], [str(s) for s in sops], [int(f) for f in frames]


def _check_labels(labels: Volume, source: Volume) -> np.ndarray:
    array = np.asarray(labels.array)
    if array.ndim != 3 or labels.shape != source.shape:
        raise InputError(
            f"labels of shape {array.shape} do not fit the source series of shape {source.shape} "
            "(D, H, W): the label map must be one (D, H, W) array on the grid of the source series"
        )
    if not (np.allclose(labels.spacing, source.spacing, atol=1e-3)
            and np.allclose(labels.origin, source.origin, atol=1e-2)
            and np.allclose(labels.direction, source.direction, atol=1e-3)):
        raise InputError(
            f"labels geometry (spacing {labels.spacing}, origin {labels.origin}) differs from the "
            f"source series (spacing {source.spacing}, origin {source.origin}); resample the "
            "labels onto the source grid (e.g. source.with_array(labels)) first"
        )
    if array.dtype == np.bool_:
        return array.view(np.uint8)
    if not np.issubdtype(array.dtype, np.integer):
        raise InputError(
            f"labels must hold integer label values, got dtype {array.dtype}; round or threshold "
            "them first (e.g. array.astype(np.uint8))"
        )
    return array


def _segments(label_names: Mapping[str, int]) -> list[tuple[int, str]]:
    """Foreground ``(value, name)`` pairs in increasing value order (segment 1, 2, ...)."""
    if not isinstance(label_names, Mapping):
        raise InputError(f"label_names must map names to label values, got {type(label_names).__name__}")
    by_value: dict[int, str] = {}
    for name, value in label_names.items():
        try:
            v = int(value)
        except (TypeError, ValueError):
            raise InputError(f"label_names[{name!r}] = {value!r} is not an integer label value") from None
        if v != value or v < 0:
            raise InputError(f"label_names[{name!r}] = {value!r} is not a non-negative integer")
        if v == 0:
            continue  # background
        if not isinstance(name, str) or not name.strip():
            raise InputError(f"label value {v} has an empty or non-text name {name!r}")
        if len(name) > 64 or "\\" in name:
            raise InputError(
                f"label name {name!r} cannot be a DICOM segment label (at most 64 characters, no "
                "backslash); rename it"
            )
        if v in by_value:
            raise InputError(f"label value {v} is named twice: {by_value[v]!r} and {name!r}")
        by_value[v] = name
    if not by_value:
        raise InputError(
            f"label_names {dict(label_names)} has no foreground label (value > 0); a SEG needs at "
            "least one segment"
        )
    return sorted(by_value.items())


def _present_values(array: np.ndarray) -> np.ndarray:
    """Label values present in ``array`` (counted slice by slice to keep memory low)."""
    lo, hi = int(array.min()), int(array.max())
    if lo < 0:
        raise InputError(f"labels hold negative values (min {lo}); label values must be >= 0")
    counts = np.zeros(hi + 1, dtype=np.int64)
    for k in range(array.shape[0]):
        counts += np.bincount(np.asarray(array[k]).ravel(), minlength=hi + 1)
    return np.flatnonzero(counts)


# --------------------------------------------------------------------------- writing


def _read_source_datasets(files: list[str], sops: list[str], frames: list[int]) -> tuple[list[Any], bool]:
    """Source headers (no pixel data) in array order; (datasets, source is one multi-frame file)."""
    import pydicom

    multi_frame = len(set(files)) == 1 and (len(files) > 1 or frames[0] != 1)
    wanted = [files[0]] if multi_frame else files
    datasets = []
    for k, f in enumerate(wanted):
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True, force=True)
        except FileNotFoundError:
            raise InputError(
                f"source DICOM file {f} no longer exists; the SEG must reference the files the "
                "volume was read from"
            ) from None
        except Exception as exc:
            raise InputError(f"cannot re-read source DICOM file {f}: {type(exc).__name__}: {exc}") from exc
        if str(ds.get("SOPInstanceUID", "")) != sops[k]:
            raise InputError(
                f"source DICOM file {f} now holds SOP instance {ds.get('SOPInstanceUID')!r}, not "
                f"{sops[k]!r} it held when the series was read; re-read the series"
            )
        # Type 2 attributes highdicom copies with attribute access: present but empty if missing.
        for kw in ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "AccessionNumber",
                   "StudyID", "StudyDate", "StudyTime", "ReferringPhysicianName"):
            if kw not in ds:
                setattr(ds, kw, "")
        datasets.append(ds)
    if not multi_frame and len(datasets) > 1:
        # The reader accepted orientations equal within 1e-4; highdicom compares them exactly.
        iop = datasets[0].get("ImageOrientationPatient")
        if iop is not None:
            for ds in datasets[1:]:
                if "ImageOrientationPatient" in ds:
                    ds.ImageOrientationPatient = iop
    return datasets, multi_frame


def _segment_numbers(array: np.ndarray, segments: list, datasets: list, multi_frame: bool,
                     frames: list[int], files: list[str]) -> np.ndarray:
    """Label values -> segment numbers 1..N ``(D, H, W)``, in the source file's frame order for a
    multi-frame source; checked against the source images' size."""
    named = [v for v, _ in segments]
    lut = np.zeros(int(max(named)) + 1, dtype=np.uint8 if len(segments) < 256 else np.uint16)
    for number, value in enumerate(named, start=1):
        lut[value] = number
    seg_array = lut[array]
    if multi_frame:  # highdicom wants the frames in the order of the source file's frames
        n_frames = int(datasets[0].get("NumberOfFrames", 1) or 1)
        if sorted(frames) != list(range(1, n_frames + 1)):
            raise InputError(
                f"the source volume holds frames {sorted(frames)[:5]}... of {files[0]}, which has "
                f"{n_frames}; a SEG of a multi-frame source must cover all its frames"
            )
        ordered = np.empty_like(seg_array)
        ordered[np.asarray(frames) - 1] = seg_array
        seg_array = ordered
    rows, cols = int(datasets[0].Rows), int(datasets[0].Columns)
    if seg_array.shape[1:] != (rows, cols):
        raise InputError(
            f"labels of {seg_array.shape[1]}x{seg_array.shape[2]} pixels do not fit the source "
            f"images of {rows}x{cols} pixels ({files[0]})"
        )
    return seg_array


def _segment_descriptions(segments: list, algorithm_name: str, algorithm_version: str, manufacturer: str) -> list:
    """One highdicom SegmentDescription per foreground label (coded by `segment_codes`)."""
    import highdicom as hd
    from pydicom.sr.coding import Code

    algorithm = hd.AlgorithmIdentificationSequence(
        name=algorithm_name,
        family=Code("123110", "DCM", "Artificial Intelligence"),
        version=str(algorithm_version),
        source=manufacturer,
    )
    descriptions = []
    for number, (_value, name) in enumerate(segments, start=1):
        category, kind = segment_codes(name)
        descriptions.append(
            hd.seg.SegmentDescription(
                segment_number=number,
                segment_label=name,
                segmented_property_category=Code(*category),
                segmented_property_type=Code(*kind),
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=algorithm,
            )
        )
    return descriptions


def write_dicom_seg(
    labels: Volume,
    source: Volume,
    label_names: Mapping[str, int],
    path: str | os.PathLike[str],
    *,
    series_description: str = "resunet segmentation",
    algorithm_name: str = "resunet",
    algorithm_version: str = __version__,
    manufacturer: str = "resunet",
    series_number: int = 900,
) -> Path:
    """Write the label map ``labels`` of the DICOM series ``source`` as a DICOM SEG file at ``path``.

    ``labels.array`` is an integer ``(D, H, W)`` label map on the grid of ``source`` (a `Volume`
    returned by ``read_volume(dicom_folder)``); ``label_names`` maps names to label values
    (background 0 is skipped). Each foreground label becomes one segment, numbered in increasing
    label value. Written atomically; returns ``path``. Raises `InputError` when the labels do not
    fit the source, the source is not a DICOM series or a label value has no name.
    """
    import highdicom as hd

    path = Path(path)
    files, sops, frames = _source_instances(source)
    array = _check_labels(labels, source)
    segments = _segments(label_names)
    named = {v for v, _ in segments}
    unknown = [int(v) for v in _present_values(array) if v != 0 and int(v) not in named]
    if unknown:
        raise InputError(
            f"labels hold value(s) {unknown} that label_names does not name (it names "
            f"{ {name: v for v, name in segments} }); add them to label_names"
        )

    datasets, multi_frame = _read_source_datasets(files, sops, frames)
    seg_array = _segment_numbers(array, segments, datasets, multi_frame, frames, files)
    descriptions = _segment_descriptions(segments, algorithm_name, algorithm_version, manufacturer)
    try:
        seg = hd.seg.Segmentation(
            source_images=datasets,
            pixel_array=seg_array,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=descriptions,
            series_instance_uid=hd.UID(),
            series_number=int(series_number),
            sop_instance_uid=hd.UID(),
            instance_number=1,
            manufacturer=manufacturer,
            manufacturer_model_name=algorithm_name,
            software_versions=str(algorithm_version),
            device_serial_number="1",
            content_description=f"{algorithm_name} {algorithm_version} automatic segmentation"[:64],
            series_description=series_description[:64],
            omit_empty_frames=False,
        )
    except (ValueError, TypeError, AttributeError) as exc:
        raise InputError(
            f"cannot build a DICOM SEG for the series in {Path(files[0]).parent}: {exc}"
        ) from exc
    del seg_array, datasets
    with atomic_write(path) as tmp:
        seg.save_as(tmp, enforce_file_format=True)
    return path


# --------------------------------------------------------------------------- reading


def _first(item: Any, sequence: str, keyword: str) -> Any:
    seq = item.get(sequence) if item is not None else None
    if seq and keyword in seq[0]:
        return seq[0].data_element(keyword).value
    return None


def _frame_references(item: Any) -> list[tuple[str, int | None]]:
    refs: list[tuple[str, int | None]] = []
    for derivation in item.get("DerivationImageSequence", None) or []:
        for src in derivation.get("SourceImageSequence", None) or []:
            uid = src.get("ReferencedSOPInstanceUID")
            if uid is None:
                continue
            number = src.get("ReferencedFrameNumber")
            if isinstance(number, Sequence) and not isinstance(number, str):
                number = number[0] if len(number) else None  # several frames: the first
            refs.append((str(uid), int(number) if number not in (None, "") else None))
    return refs


def _segment_values(ds: Any, numbers: list[int], label_names: Mapping[str, int] | None, path: Path) -> dict[int, int]:
    """Segment number -> label value (the rule in `read_dicom_seg`'s docstring)."""
    names = {int(item.SegmentNumber): str(item.get("SegmentLabel", "")) for item in ds.get("SegmentSequence", [])}
    if label_names is None:
        return {n: n for n in numbers}
    fg = _segments(label_names)
    by_name = {name: v for v, name in fg}
    if numbers and all(names[n] in by_name for n in numbers):
        return {n: by_name[names[n]] for n in numbers}
    if len(fg) == len(numbers):
        return {n: fg[i][0] for i, n in enumerate(sorted(numbers))}
    raise InputError(
        f"{path}: the SEG has {len(numbers)} segment(s) {sorted(names.values())}, which do "
        f"not fit the {len(fg)} label(s) of label_names {dict(label_names)}"
    )


def _source_slice(item: Any, i: int, index: dict, single_frame: dict, positions: np.ndarray, path: Path) -> int:
    """The source slice SEG frame ``i`` (its per-frame functional group ``item``) belongs to: by its
    referenced instance / frame, else by its ImagePositionPatient."""
    k = None
    refs = _frame_references(item)
    for uid, frame in refs:
        k = index.get((uid, frame)) if frame is not None else single_frame.get(uid)
        if k is not None:
            return k
    if refs:
        raise InputError(
            f"{path}: frame {i + 1} references source instance {refs[0][0]} (frame "
            f"{refs[0][1] or 1}), which is not a slice of the source series; the SEG belongs "
            "to another series"
        )
    ipp = _first(item, "PlanePositionSequence", "ImagePositionPatient")
    if ipp is not None and len(positions):
        dist = np.linalg.norm(positions - np.asarray([float(v) for v in ipp]), axis=1)
        if dist.min() <= _POSITION_TOL:
            return int(np.argmin(dist))
    raise InputError(
        f"{path}: frame {i + 1} neither references a source instance nor lies on a "
        "source slice; it cannot be placed"
    )


def read_dicom_seg(
    path: str | os.PathLike[str],
    source: Volume,
    label_names: Mapping[str, int] | None = None,
) -> np.ndarray:
    """Read the DICOM SEG at ``path`` as a ``(D, H, W)`` label map in ``source``'s array order.

    Each frame goes to the source slice it references (``ReferencedSOPInstanceUID`` /
    ``ReferencedFrameNumber`` in its DerivationImageSequence; frames without a reference are
    placed by their ImagePositionPatient). Segment numbers become label values: without
    ``label_names`` segment ``n`` gives value ``n``; with it, segments whose labels are all names
    of ``label_names`` take those values, otherwise segment ``n`` takes the ``n``-th smallest
    foreground value (the order `write_dicom_seg` writes). Where segments overlap the higher
    value wins. Returns ``uint8`` (``uint16`` for values above 255).
    """
    import pydicom
    from pydicom.pixels import iter_pixels

    path = Path(path)
    _files, sops, frames = _source_instances(source)
    try:
        ds = pydicom.dcmread(str(path))
    except Exception as exc:
        raise InputError(f"cannot read DICOM SEG {path}: {type(exc).__name__}: {exc}") from exc
    sop_class = str(ds.get("SOPClassUID", ""))
    if sop_class not in (SEGMENTATION_STORAGE, _LABEL_MAP_SEGMENTATION_STORAGE):
        raise InputError(f"{path} is not a DICOM Segmentation (SOP class {sop_class or '?'})")
    depth, rows, cols = source.shape
    if (int(ds.Rows), int(ds.Columns)) != (rows, cols):
        raise InputError(
            f"{path}: SEG frames of {ds.Rows}x{ds.Columns} pixels do not fit the source images of "
            f"{rows}x{cols} pixels"
        )
    seg_for = str(ds.get("FrameOfReferenceUID", ""))
    src_for = str(source.meta.get("frame_of_reference_uid", ""))
    if seg_for and src_for and seg_for != src_for:
        raise InputError(
            f"{path}: the SEG is in frame of reference {seg_for}, the source series in {src_for}; "
            "it does not belong to this series"
        )

    numbers = [int(item.SegmentNumber) for item in ds.get("SegmentSequence", [])]
    value_of = _segment_values(ds, numbers, label_names, path)
    max_value = max(value_of.values(), default=0)
    out = np.zeros(source.shape, dtype=np.uint8 if max_value <= 255 else np.uint16)

    index = {(sop, frame): k for k, (sop, frame) in enumerate(zip(sops, frames))}
    single_frame = {sop: k for k, (sop, frame) in enumerate(zip(sops, frames)) if frame == 1}
    positions = np.asarray(source.meta.get("slice_positions") or [], dtype=np.float64)
    shared = (ds.get("SharedFunctionalGroupsSequence") or [None])[0]
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    if len(per_frame) != n_frames:
        raise InputError(f"{path}: {n_frames} frames but {len(per_frame)} per-frame functional groups")
    label_map_seg = sop_class == _LABEL_MAP_SEGMENTATION_STORAGE
    fractional = str(ds.get("SegmentationType", "BINARY")) == "FRACTIONAL"
    max_fraction = float(ds.get("MaximumFractionalValue", 255) or 255)
    if label_map_seg:
        lut = np.zeros(max(numbers, default=0) + 1, dtype=out.dtype)
        for n, v in value_of.items():
            lut[n] = v

    for i, pixels in enumerate(iter_pixels(ds)):
        item = per_frame[i]
        k = _source_slice(item, i, index, single_frame, positions, path)
        if label_map_seg:
            frame_values = lut[np.minimum(pixels, len(lut) - 1)]
            np.maximum(out[k], frame_values, out=out[k])
            continue
        number = _first(item, "SegmentIdentificationSequence", "ReferencedSegmentNumber")
        if number is None:
            number = _first(shared, "SegmentIdentificationSequence", "ReferencedSegmentNumber")
        if number is None or int(number) not in value_of:
            raise InputError(f"{path}: frame {i + 1} has no (known) ReferencedSegmentNumber")
        mask = pixels >= max_fraction / 2 if fractional else pixels != 0
        value = value_of[int(number)]
        if value:
            out[k][mask] = np.maximum(out[k][mask], value)
    return out
