"""DICOM SEG writer/reader: a CT series -> label map -> SEG -> back, checked frame by frame."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicom_series import write_ct_series, write_enhanced_ct
from pydicom import examples

from resunet.data.dicom_seg import SEGMENTATION_STORAGE, read_dicom_seg, segment_codes, write_dicom_seg
from resunet.data.io import read_volume, write_volume
from resunet.errors import InputError

LABELS = {"background": 0, "liver": 1, "liver tumor": 2}


def _ct(shape=(12, 64, 64), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(-200, 300, size=shape).astype(np.float64)


def _boxes(shape) -> np.ndarray:
    lab = np.zeros(shape, np.uint8)
    lab[2:5, 10:30, 12:40] = 1  # slices 2-4
    lab[7:10, 35:60, 20:33] = 2  # slices 7-9; 0, 1, 5, 6, 10, 11 empty
    return lab


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    root = tmp_path_factory.mktemp("seg")
    direction = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]])  # coronal stack
    written = write_ct_series(
        root / "ct", _ct(), spacing=(2.5, 0.75, 0.6), origin=(-24.0, 31.5, 102.25),
        direction=direction, shuffle_names=True, seed=3,
    )
    vol = read_volume(root / "ct")
    labels = _boxes(vol.shape)
    (root / "out").mkdir()
    path = write_dicom_seg(vol.with_array(labels), vol, LABELS, root / "out" / "seg.dcm")
    return written, vol, labels, path


def test_seg_header(series):
    written, vol, _labels, path = series
    assert path.is_file() and not [p for p in path.parent.iterdir() if p != path]  # no temp files
    ds = pydicom.dcmread(path)
    assert ds.SOPClassUID == SEGMENTATION_STORAGE
    assert ds.Modality == "SEG" and ds.SegmentationType == "BINARY"
    assert ds.StudyInstanceUID == written.study_uid
    assert ds.FrameOfReferenceUID == written.frame_of_reference_uid
    assert ds.SeriesInstanceUID not in (written.series_uid, "")
    assert ds.SOPInstanceUID not in written.sop_instance_uids
    assert ds.PatientID == "RESUNET-TEST-1" and ds.SeriesNumber == 900
    assert ds.SeriesDescription == "resunet segmentation"
    segs = ds.SegmentSequence
    assert [int(s.SegmentNumber) for s in segs] == [1, 2]
    assert [s.SegmentLabel for s in segs] == ["liver", "liver tumor"]
    for s in segs:
        assert s.SegmentAlgorithmType == "AUTOMATIC"
        algo = s.SegmentationAlgorithmIdentificationSequence[0]
        assert algo.AlgorithmName == "resunet" and algo.AlgorithmVersion
    assert segs[0].SegmentedPropertyCategoryCodeSequence[0].CodeValue == "91723000"
    assert segs[0].SegmentedPropertyTypeCodeSequence[0].CodeValue == "10200004"  # Liver
    assert segs[1].SegmentedPropertyCategoryCodeSequence[0].CodeValue == "49755003"
    assert segs[1].SegmentedPropertyTypeCodeSequence[0].CodeValue == "108369006"  # Neoplasm


def test_frames_reference_their_source_slices(series):
    written, vol, labels, path = series
    ds = pydicom.dcmread(path)
    n = vol.shape[0]
    assert int(ds.NumberOfFrames) == n * 2  # empty frames kept
    pixels = ds.pixel_array.reshape(-1, *vol.shape[1:])
    slice_of = {uid: k for k, uid in enumerate(written.sop_instance_uids)}
    seen = set()
    for i, item in enumerate(ds.PerFrameFunctionalGroupsSequence):
        src = item.DerivationImageSequence[0].SourceImageSequence[0]
        k = slice_of[src.ReferencedSOPInstanceUID]
        assert src.ReferencedSOPClassUID == pydicom.uid.CTImageStorage
        ipp = [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient]
        assert np.allclose(ipp, written.positions[k], atol=1e-3)
        number = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        np.testing.assert_array_equal(pixels[i], (labels[k] == number).astype(np.uint8))
        seen.add((k, number))
    assert seen == {(k, s) for k in range(n) for s in (1, 2)}


def test_read_back_exactly(series):
    _written, vol, labels, path = series
    back = read_dicom_seg(path, vol)
    assert back.dtype == np.uint8 and back.shape == vol.shape
    np.testing.assert_array_equal(back, labels)
    np.testing.assert_array_equal(read_dicom_seg(path, vol, LABELS), labels)


def test_highdicom_reads_it(series):
    import highdicom as hd

    _written, vol, _labels, path = series
    seg = hd.seg.segread(path)
    assert [d.segment_label for d in seg.SegmentSequence] == ["liver", "liver tumor"]
    assert len(seg.get_source_image_uids()) == vol.shape[0]


def test_non_contiguous_values_and_frames_without_reference(tmp_path):
    written = write_ct_series(tmp_path / "ct", _ct((5, 24, 20), seed=1), spacing=(4.0, 1.0, 1.0))
    vol = read_volume(tmp_path / "ct")
    labels = np.zeros(vol.shape, np.uint8)
    labels[1, 3:9, 4:10] = 7
    labels[3, 10:20, 2:5] = 3
    names = {"kidney": 3, "cyst": 7}
    path = write_dicom_seg(vol.with_array(labels), vol, names, tmp_path / "seg.dcm",
                           series_description="test", series_number=42)
    ds = pydicom.dcmread(path)
    assert [s.SegmentLabel for s in ds.SegmentSequence] == ["kidney", "cyst"]  # value order
    assert ds.SeriesNumber == 42 and ds.SeriesDescription == "test"
    np.testing.assert_array_equal(read_dicom_seg(path, vol, names), labels)
    # without names: segment numbers (1, 2) in value order
    np.testing.assert_array_equal(read_dicom_seg(path, vol), np.select([labels == 3, labels == 7], [1, 2], 0))
    # frames without DerivationImageSequence are placed by their position
    for item in ds.PerFrameFunctionalGroupsSequence:
        del item.DerivationImageSequence
    stripped = tmp_path / "stripped.dcm"
    ds.save_as(stripped)
    np.testing.assert_array_equal(read_dicom_seg(stripped, vol, names), labels)
    assert written.sop_instance_uids == vol.meta["sop_instance_uids"]


def test_pydicom_example_ct_single_slice(tmp_path):
    src = Path(examples.get_path("ct"))
    shutil.copy(src, tmp_path / "ct.dcm")
    vol = read_volume(tmp_path / "ct.dcm")
    assert vol.shape == (1, 128, 128)
    labels = np.zeros(vol.shape, np.uint8)
    labels[0, 40:90, 30:70] = 1
    path = write_dicom_seg(vol.with_array(labels), vol, {"bg": 0, "body": 1}, tmp_path / "seg.dcm")
    ds = pydicom.dcmread(path)
    assert ds.SOPClassUID == SEGMENTATION_STORAGE and int(ds.NumberOfFrames) == 1
    assert ds.StudyInstanceUID == examples.ct.StudyInstanceUID
    assert ds.FrameOfReferenceUID == examples.ct.FrameOfReferenceUID
    ref = ds.PerFrameFunctionalGroupsSequence[0].DerivationImageSequence[0].SourceImageSequence[0]
    assert ref.ReferencedSOPInstanceUID == examples.ct.SOPInstanceUID
    seg = ds.SegmentSequence[0]
    assert seg.SegmentLabel == "body"
    assert seg.SegmentedPropertyTypeCodeSequence[0].CodeMeaning == "Tissue"  # generic fallback
    np.testing.assert_array_equal(read_dicom_seg(path, vol), labels)


def test_enhanced_multi_frame_source(tmp_path):
    order = [3, 0, 4, 1, 2]
    write_enhanced_ct(tmp_path / "enh.dcm", _ct((5, 16, 16), seed=2), spacing=(2.0, 1.0, 1.0),
                      frame_order=order)
    vol = read_volume(tmp_path / "enh.dcm")
    labels = np.zeros(vol.shape, np.uint8)
    labels[0, 2:6, 2:6] = 1
    labels[3, 8:12, 1:15] = 1
    path = write_dicom_seg(vol.with_array(labels), vol, {"lesion": 1}, tmp_path / "seg.dcm")
    ds = pydicom.dcmread(path)
    pixels = ds.pixel_array.reshape(-1, 16, 16)
    for i, item in enumerate(ds.PerFrameFunctionalGroupsSequence):
        src = item.DerivationImageSequence[0].SourceImageSequence[0]
        k = order[int(src.ReferencedFrameNumber) - 1]  # file frame f holds slice order[f]
        np.testing.assert_array_equal(pixels[i], labels[k])
    np.testing.assert_array_equal(read_dicom_seg(path, vol), labels)


# --------------------------------------------------------------------------- errors


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp("seg_err")
    write_ct_series(root / "ct", _ct((3, 16, 16)), spacing=(2.0, 1.0, 1.0))
    return root, read_volume(root / "ct")


def _no_output(folder: Path) -> bool:
    return not any(p.name.endswith(".dcm") or ".tmp" in p.name for p in folder.iterdir())


def test_shape_mismatch(small, tmp_path):
    _root, vol = small
    bad = vol.with_array(np.zeros((2, 16, 16), np.uint8))
    with pytest.raises(InputError, match="shape"):
        write_dicom_seg(bad, vol, {"a": 1}, tmp_path / "seg.dcm")
    assert _no_output(tmp_path)


def test_non_dicom_source(small, tmp_path):
    _root, vol = small
    write_volume(vol, tmp_path / "img.nii.gz")
    nifti = read_volume(tmp_path / "img.nii.gz")
    labels = nifti.with_array(np.zeros(nifti.shape, np.uint8))
    with pytest.raises(InputError, match="SEG output needs a DICOM series input"):
        write_dicom_seg(labels, nifti, {"a": 1}, tmp_path / "seg.dcm")
    assert _no_output(tmp_path)


def test_unknown_label_values(small, tmp_path):
    _root, vol = small
    arr = np.zeros(vol.shape, np.uint8)
    arr[1, 2:4, 2:4] = 1
    arr[2, 5:7, 5:7] = 4
    with pytest.raises(InputError, match=r"\[4\]"):
        write_dicom_seg(vol.with_array(arr), vol, {"background": 0, "liver": 1}, tmp_path / "seg.dcm")
    with pytest.raises(InputError, match="no foreground label"):
        write_dicom_seg(vol.with_array(arr), vol, {"background": 0}, tmp_path / "seg.dcm")
    with pytest.raises(InputError, match="integer"):
        write_dicom_seg(vol.with_array(arr.astype(np.float32)), vol, {"a": 1, "b": 4}, tmp_path / "seg.dcm")
    assert _no_output(tmp_path)


def test_read_onto_other_series(small, series):
    _root, vol = small
    _written, _vol, _labels, path = series
    with pytest.raises(InputError):
        read_dicom_seg(path, vol)


def test_segment_codes():
    assert segment_codes("Liver")[1][0] == "10200004"
    assert segment_codes("left_kidney")[1][2] == "Kidney"
    assert segment_codes("liver-tumour")[0][2] == "Morphologically Abnormal Structure"
    assert segment_codes("foreground") == (("85756007", "SCT", "Tissue"), ("85756007", "SCT", "Tissue"))
