"""Test helper: write realistic DICOM CT/MR series (and an enhanced multi-frame CT) with pydicom.

Import it from tests as ``from dicom_series import write_ct_series`` (pytest puts ``tests/`` on
``sys.path`` because it has no ``__init__.py``).

Geometry arguments follow `resunet.data.Volume`: ``array`` is ``(D, H, W)`` in real-world units
(Hounsfield units for CT), ``spacing`` is ``(z, y, x)`` in mm, ``origin`` the LPS ``(x, y, z)`` mm
position of voxel ``[0, 0, 0]`` and ``direction`` the 3x3 matrix whose columns are the LPS
directions of the x (column), y (row) and z (slice) index axes. Slice ``k`` is written at
``origin + k * spacing[0] * direction[:, 2]``; stored values are
``round((array - intercept) / slope)``.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.dataset import Dataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    CTImageStorage,
    EnhancedCTImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)
from pydicom.valuerep import format_number_as_ds

__all__ = ["DicomSeries", "write_ct_series", "write_enhanced_ct"]


@dataclass
class DicomSeries:
    """What `write_ct_series` wrote; per-slice lists are in array (slice) order."""

    folder: Path
    files: list[Path]
    study_uid: str
    series_uid: str
    frame_of_reference_uid: str
    sop_instance_uids: list[str]
    stored_dtype: np.dtype
    positions: list[tuple[float, float, float]] = field(default_factory=list)


def _ds(value: float) -> str:
    return format_number_as_ds(float(value))


def _geometry(
    array: np.ndarray, spacing: Sequence[float], origin: Sequence[float], direction: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if array.ndim != 3:
        raise ValueError(f"array must be (D, H, W), got {array.shape}")
    d = np.eye(3) if direction is None else np.asarray(direction, dtype=np.float64).reshape(3, 3)
    spacing = np.asarray(spacing, dtype=np.float64)
    positions = np.asarray(origin, dtype=np.float64)[None, :] + (
        np.arange(array.shape[0])[:, None] * spacing[0] * d[:, 2][None, :]
    )
    iop = np.concatenate([d[:, 0], d[:, 1]])
    return spacing, positions, iop


def _stored(array: np.ndarray, slope: float, intercept: float, unsigned: bool) -> np.ndarray:
    dtype = np.uint16 if unsigned else np.int16
    values = np.round((np.asarray(array, dtype=np.float64) - intercept) / slope)
    info = np.iinfo(dtype)
    if values.min() < info.min or values.max() > info.max:
        raise ValueError(f"stored values {values.min()}..{values.max()} do not fit {np.dtype(dtype)}")
    return values.astype(dtype)


def _save(ds: FileDataset, path: Path) -> None:
    if int(pydicom.__version__.split(".")[0]) >= 3:
        ds.save_as(path, enforce_file_format=True)
    else:  # pragma: no cover - pydicom 2.x
        ds.is_little_endian, ds.is_implicit_VR = True, False
        ds.save_as(path, write_like_original=False)


def _base_dataset(
    path: Path, sop_class: str, sop_uid: str, *, modality: str, study_uid: str, series_uid: str,
    frame_uid: str, series_number: int, series_description: str, patient_id: str,
    patient_name: str,
) -> FileDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = frame_uid
    ds.PositionReferenceIndicator = ""
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20240101"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
    ds.StudyID = "1"
    ds.AccessionNumber = "RESUNET0001"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "resunet test study"
    ds.Modality = modality
    ds.SeriesNumber = series_number
    ds.SeriesDescription = series_description
    ds.Manufacturer = "resunet tests"
    ds.PatientPosition = "HFS"
    ds.BodyPartExamined = "HEAD"
    return ds


def _pixel_module(ds: Dataset, rows: int, columns: int, unsigned: bool) -> None:
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = columns
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0 if unsigned else 1


def write_ct_series(
    folder: str | Path,
    array: np.ndarray,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    origin: Sequence[float] = (0.0, 0.0, 0.0),
    direction: np.ndarray | None = None,
    *,
    modality: str = "CT",
    rescale_slope: float = 1.0,
    rescale_intercept: float | None = None,
    unsigned: bool = False,
    study_uid: str | None = None,
    series_uid: str | None = None,
    frame_of_reference_uid: str | None = None,
    series_number: int = 1,
    series_description: str = "resunet test series",
    patient_id: str = "RESUNET-TEST-1",
    patient_name: str = "Test^Patient",
    shuffle_names: bool = True,
    seed: int = 0,
) -> DicomSeries:
    """Write ``array`` ``(D, H, W)`` as one single-frame DICOM file per slice into ``folder``.

    ``modality`` is ``"CT"`` (CT Image Storage) or ``"MR"`` (MR Image Storage).
    ``rescale_intercept`` defaults to -1024 for CT and 0 for MR; values are stored as int16
    (uint16 with ``unsigned=True``) after ``round((array - intercept) / slope)``. File names are
    random (``shuffle_names``) and ``InstanceNumber`` runs against the slice order, so a reader
    must sort by position. UIDs are generated unless given. Returns a `DicomSeries`.
    """
    modality = modality.upper()
    if modality not in ("CT", "MR"):
        raise ValueError("modality must be 'CT' or 'MR'")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if rescale_intercept is None:
        rescale_intercept = -1024.0 if modality == "CT" else 0.0
    spacing_arr, positions, iop = _geometry(array, spacing, origin, direction)
    stored = _stored(array, rescale_slope, rescale_intercept, unsigned)
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    frame_uid = frame_of_reference_uid or generate_uid()
    sop_class = CTImageStorage if modality == "CT" else MRImageStorage
    n = array.shape[0]
    rng = random.Random(seed)
    names = [f"{rng.getrandbits(64):016x}.dcm" if shuffle_names else f"slice_{k:04d}.dcm" for k in range(n)]
    files: list[Path] = []
    sops: list[str] = []
    normal = np.cross(iop[:3], iop[3:])
    order = list(range(n))
    rng.shuffle(order)  # write in random order too
    written: dict[int, tuple[Path, str]] = {}
    for k in order:
        sop_uid = generate_uid()
        path = folder / names[k]
        ds = _base_dataset(
            path, sop_class, sop_uid, modality=modality, study_uid=study_uid,
            series_uid=series_uid, frame_uid=frame_uid, series_number=series_number,
            series_description=series_description, patient_id=patient_id,
            patient_name=patient_name,
        )
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.InstanceNumber = n - k  # against the slice order on purpose
        ds.AcquisitionNumber = 1
        ds.ImagePositionPatient = [_ds(v) for v in positions[k]]
        ds.ImageOrientationPatient = [_ds(v) for v in iop]
        ds.SliceLocation = _ds(float(positions[k] @ normal))
        ds.PixelSpacing = [_ds(spacing_arr[1]), _ds(spacing_arr[2])]
        ds.SliceThickness = _ds(spacing_arr[0])
        ds.SpacingBetweenSlices = _ds(spacing_arr[0])
        _pixel_module(ds, array.shape[1], array.shape[2], unsigned)
        if modality == "CT":
            ds.KVP = "120"
            ds.RescaleType = "HU"
            ds.WindowCenter = "40"
            ds.WindowWidth = "400"
        else:
            ds.ScanningSequence = "SE"
            ds.SequenceVariant = "NONE"
            ds.ScanOptions = ""
            ds.MRAcquisitionType = "3D"
            ds.RepetitionTime = "500"
            ds.EchoTime = "15"
            ds.EchoTrainLength = 1
            ds.MagneticFieldStrength = "1.5"
        if modality == "CT" or rescale_slope != 1 or rescale_intercept != 0:
            ds.RescaleSlope = _ds(rescale_slope)
            ds.RescaleIntercept = _ds(rescale_intercept)
        ds.PixelData = np.ascontiguousarray(stored[k]).tobytes()
        _save(ds, path)
        written[k] = (path, sop_uid)
    for k in range(n):
        files.append(written[k][0])
        sops.append(written[k][1])
    return DicomSeries(
        folder=folder, files=files, study_uid=study_uid, series_uid=series_uid,
        frame_of_reference_uid=frame_uid, sop_instance_uids=sops,
        stored_dtype=np.dtype(np.uint16 if unsigned else np.int16),
        positions=[tuple(float(v) for v in p) for p in positions],
    )


def write_enhanced_ct(
    path: str | Path,
    array: np.ndarray,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    origin: Sequence[float] = (0.0, 0.0, 0.0),
    direction: np.ndarray | None = None,
    *,
    rescale_slope: float = 1.0,
    rescale_intercept: float = -1024.0,
    frame_order: Sequence[int] | None = None,
    study_uid: str | None = None,
    series_uid: str | None = None,
) -> Path:
    """Write ``array`` ``(D, H, W)`` as one Enhanced CT multi-frame file.

    Frame ``f`` of the file holds slice ``frame_order[f]`` (default: slice order), with its
    position in the per-frame PlanePositionSequence; orientation, pixel spacing and rescale are in
    the shared functional groups.
    """
    path = Path(path)
    spacing_arr, positions, iop = _geometry(array, spacing, origin, direction)
    stored = _stored(array, rescale_slope, rescale_intercept, unsigned=False)
    n = array.shape[0]
    order = list(range(n)) if frame_order is None else [int(i) for i in frame_order]
    if sorted(order) != list(range(n)):
        raise ValueError("frame_order must be a permutation of the slice indices")
    ds = _base_dataset(
        path, EnhancedCTImageStorage, generate_uid(), modality="CT",
        study_uid=study_uid or generate_uid(), series_uid=series_uid or generate_uid(),
        frame_uid=generate_uid(), series_number=2, series_description="enhanced CT",
        patient_id="RESUNET-TEST-1", patient_name="Test^Patient",
    )
    ds.ImageType = ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
    ds.InstanceNumber = 1
    ds.NumberOfFrames = n
    _pixel_module(ds, array.shape[1], array.shape[2], unsigned=False)

    shared = Dataset()
    orient = Dataset()
    orient.ImageOrientationPatient = [_ds(v) for v in iop]
    shared.PlaneOrientationSequence = DicomSequence([orient])
    measures = Dataset()
    measures.PixelSpacing = [_ds(spacing_arr[1]), _ds(spacing_arr[2])]
    measures.SliceThickness = _ds(spacing_arr[0])
    measures.SpacingBetweenSlices = _ds(spacing_arr[0])
    shared.PixelMeasuresSequence = DicomSequence([measures])
    transform = Dataset()
    transform.RescaleSlope = _ds(rescale_slope)
    transform.RescaleIntercept = _ds(rescale_intercept)
    transform.RescaleType = "HU"
    shared.PixelValueTransformationSequence = DicomSequence([transform])
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])

    per_frame = []
    for f, k in enumerate(order):
        item = Dataset()
        pos = Dataset()
        pos.ImagePositionPatient = [_ds(v) for v in positions[k]]
        item.PlanePositionSequence = DicomSequence([pos])
        content = Dataset()
        content.FrameAcquisitionNumber = 1
        content.InStackPositionNumber = k + 1
        content.StackID = "1"
        item.FrameContentSequence = DicomSequence([content])
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(per_frame)
    ds.PixelData = np.ascontiguousarray(stored[order]).tobytes()
    _save(ds, path)
    return path
