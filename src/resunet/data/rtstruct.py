"""DICOM RT Structure Set (RTSTRUCT) output: one ROI per foreground label, planar contours per slice.

`write_rtstruct(labels, source, label_names, path)` turns a ``(D, H, W)`` label map on the grid of
a single-frame DICOM series (a `Volume` read by ``read_volume(folder)``) into an RTSTRUCT that
references the series: ROI names are the label names (ROI numbers 1..N in increasing label
value), each slice's region of a label becomes CLOSED_PLANAR contours in patient coordinates (mm),
each contour referencing its source image. Contours are the 0.5 iso-lines of the slice's mask
(`skimage.measure.find_contours`), so they pass half-way between inside and outside pixel
centres; a hole is an inner contour (viewers combine a slice's contours by the even-odd rule,
and so does `read_rtstruct`).

`read_rtstruct(path, source)` rasterises the contours back: a pixel belongs to an ROI on a slice
when its centre lies inside an odd number of that slice's contours.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from resunet.data.dicom_seg import _check_labels, _read_source_datasets, _segments, _source_instances
from resunet.data.io import atomic_write
from resunet.data.volume import Volume
from resunet.errors import InputError
from resunet.version import __version__

RT_STRUCTURE_SET_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"
#: the SOP class RTReferencedStudySequence items reference (Detached Study Management, retired but required)
_STUDY_COMPONENT = "1.2.840.10008.3.1.2.3.1"
_COLOURS = ((255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255), (255, 128, 0))
#: patient-level and study-level attributes copied from the source series (type 2: empty when absent)
_COPIED = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate",
           "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber")


def _slice_frames(datasets: list[Any], path_hint: str) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per slice ``(position (3,), [row direction, column direction] (2, 3), pixel spacing (2,))``."""
    frames = []
    for ds in datasets:
        try:
            ipp = np.asarray([float(v) for v in ds.ImagePositionPatient])
            iop = np.asarray([float(v) for v in ds.ImageOrientationPatient]).reshape(2, 3)
            spacing = np.asarray([float(v) for v in ds.PixelSpacing])
        except (AttributeError, TypeError, ValueError):
            raise InputError(f"{path_hint}: a source slice lacks ImagePositionPatient / ImageOrientationPatient / "
                             "PixelSpacing; RTSTRUCT contours need them") from None
        frames.append((ipp, iop, spacing))
    return frames


def _to_patient(points_rc: np.ndarray, frame: tuple[np.ndarray, np.ndarray, np.ndarray]) -> np.ndarray:
    """Pixel ``(row, column)`` positions ``(N, 2)`` -> patient coordinates ``(N, 3)`` mm."""
    ipp, iop, spacing = frame
    return ipp + np.outer(points_rc[:, 1] * spacing[1], iop[0]) + np.outer(points_rc[:, 0] * spacing[0], iop[1])


def _to_pixels(points_xyz: np.ndarray, frame: tuple[np.ndarray, np.ndarray, np.ndarray]) -> np.ndarray:
    """Patient coordinates ``(N, 3)`` mm -> pixel ``(row, column)`` ``(N, 2)`` (in-plane projection)."""
    ipp, iop, spacing = frame
    d = points_xyz - ipp
    return np.stack([d @ iop[1] / spacing[0], d @ iop[0] / spacing[1]], axis=1)


def mask_contours(mask: np.ndarray) -> list[np.ndarray]:
    """Closed contours ``(N, 2)`` (row, column; last point not repeated) of a 2-D boolean mask."""
    from skimage.measure import find_contours

    padded = np.pad(mask.astype(np.float32), 1)
    out = []
    for c in find_contours(padded, 0.5):
        c = c[:-1] - 1.0 if len(c) > 1 and np.allclose(c[0], c[-1]) else c - 1.0
        if len(c) >= 3:
            out.append(c)
    return out


def _dataset_base(source_ds: Any, series_description: str) -> Any:
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = RT_STRUCTURE_SET_STORAGE
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
    now = datetime.datetime.now()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID, ds.SOPInstanceUID = RT_STRUCTURE_SET_STORAGE, meta.MediaStorageSOPInstanceUID
    ds.InstanceCreationDate, ds.InstanceCreationTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    for kw in _COPIED:
        setattr(ds, kw, source_ds.get(kw, ""))
    ds.Modality, ds.SeriesInstanceUID, ds.SeriesNumber = "RTSTRUCT", generate_uid(), 901
    ds.SeriesDescription, ds.OperatorsName = series_description[:64], ""
    ds.Manufacturer, ds.ManufacturerModelName, ds.SoftwareVersions = "resunet", "resunet", __version__
    ds.FrameOfReferenceUID = source_ds.get("FrameOfReferenceUID", "")
    ds.PositionReferenceIndicator = ""
    ds.StructureSetLabel = "resunet"
    ds.StructureSetDate, ds.StructureSetTime = ds.InstanceCreationDate, ds.InstanceCreationTime
    ds.InstanceNumber = 1
    return ds


def _item(**attributes: Any) -> Any:
    from pydicom.dataset import Dataset

    item = Dataset()
    for kw, value in attributes.items():
        setattr(item, kw, value)
    return item


def _image_reference(ds: Any) -> Any:
    return _item(ReferencedSOPClassUID=ds.SOPClassUID, ReferencedSOPInstanceUID=ds.SOPInstanceUID)


def _frame_of_reference(datasets: list[Any]) -> Any:
    """ReferencedFrameOfReferenceSequence item: frame of reference -> study -> series -> every image."""
    first = datasets[0]
    series = _item(SeriesInstanceUID=first.SeriesInstanceUID, ContourImageSequence=[_image_reference(d) for d in datasets])
    study = _item(ReferencedSOPClassUID=_STUDY_COMPONENT, ReferencedSOPInstanceUID=first.StudyInstanceUID,
                  RTReferencedSeriesSequence=[series])
    return _item(FrameOfReferenceUID=first.FrameOfReferenceUID, RTReferencedStudySequence=[study])


def _roi_contours(array: np.ndarray, value: int, datasets: list[Any], frames: list) -> list[Any]:
    """ContourSequence items of label ``value``: every contour of every slice, in patient mm."""
    items = []
    for k in range(array.shape[0]):
        region = array[k] == value
        if not region.any():
            continue
        for contour in mask_contours(region):
            xyz = _to_patient(contour, frames[k])
            items.append(_item(ContourImageSequence=[_image_reference(datasets[k])], ContourGeometricType="CLOSED_PLANAR",
                               NumberOfContourPoints=len(xyz),
                               ContourData=[f"{v:.3f}" for v in xyz.ravel()]))
    return items


def write_rtstruct(
    labels: Volume,
    source: Volume,
    label_names: Mapping[str, int],
    path: str | os.PathLike[str],
    *,
    series_description: str = "resunet contours",
) -> Path:
    """Write ``labels`` ``(D, H, W)`` of the DICOM series ``source`` as an RTSTRUCT at ``path``.

    One ROI per named foreground label (``label_names``: name -> value), present or not. Atomic;
    returns ``path``. `InputError` when the source is no single-frame DICOM series or the labels
    do not fit it.
    """
    path = Path(path)
    files, sops, frame_numbers = _source_instances(source)
    array = _check_labels(labels, source)
    datasets, multi_frame = _read_source_datasets(files, sops, frame_numbers)
    if multi_frame:
        raise InputError(f"{files[0]} is a multi-frame image; RTSTRUCT output needs a single-frame series "
                         "(use --dicom-format seg for this one)")
    frames = _slice_frames(datasets, str(Path(files[0]).parent))
    ds = _dataset_base(datasets[0], series_description)
    ds.ReferencedFrameOfReferenceSequence = [_frame_of_reference(datasets)]
    rois, contours, observations = [], [], []
    for number, (value, name) in enumerate(_segments(label_names), start=1):
        rois.append(_item(ROINumber=number, ReferencedFrameOfReferenceUID=datasets[0].FrameOfReferenceUID,
                          ROIName=name[:64], ROIGenerationAlgorithm="AUTOMATIC"))
        entry = _item(ROIDisplayColor=list(_COLOURS[(number - 1) % len(_COLOURS)]), ReferencedROINumber=number)
        sequence = _roi_contours(array, value, datasets, frames)
        if sequence:
            entry.ContourSequence = sequence
        contours.append(entry)
        observations.append(_item(ObservationNumber=number, ReferencedROINumber=number, RTROIInterpretedType="ORGAN",
                                  ROIInterpreter=""))
    ds.StructureSetROISequence, ds.ROIContourSequence = rois, contours
    ds.RTROIObservationsSequence = observations
    with atomic_write(path) as tmp:
        ds.save_as(tmp, enforce_file_format=True)
    return path


def read_rtstruct(path: str | os.PathLike[str], source: Volume) -> dict[str, np.ndarray]:
    """ROI name -> boolean ``(D, H, W)`` mask on ``source``'s grid (even-odd rule per slice)."""
    import pydicom
    from skimage.draw import polygon2mask

    path = Path(path)
    files, sops, frame_numbers = _source_instances(source)
    datasets, _ = _read_source_datasets(files, sops, frame_numbers)
    frames = _slice_frames(datasets, str(Path(files[0]).parent))
    slice_of = {str(d.SOPInstanceUID): k for k, d in enumerate(datasets)}
    try:
        ds = pydicom.dcmread(str(path))
    except Exception as exc:
        raise InputError(f"cannot read RTSTRUCT {path}: {type(exc).__name__}: {exc}") from exc
    names = {int(r.ROINumber): str(r.ROIName) for r in ds.get("StructureSetROISequence", [])}
    out = {}
    for roi in ds.get("ROIContourSequence", []):
        mask = np.zeros(source.shape, bool)
        for contour in roi.get("ContourSequence", []):
            sop = str(contour.ContourImageSequence[0].ReferencedSOPInstanceUID)
            if sop not in slice_of:
                raise InputError(f"{path}: a contour references image {sop}, which is not in the source series")
            k = slice_of[sop]
            xyz = np.asarray([float(v) for v in contour.ContourData]).reshape(-1, 3)
            mask[k] ^= polygon2mask(source.shape[1:], _to_pixels(xyz, frames[k]))
        out[names.get(int(roi.ReferencedROINumber), str(roi.ReferencedROINumber))] = mask
    return out
