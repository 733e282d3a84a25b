"""resunet.data.dicom: DICOM series folders and files, checked against SimpleITK and pydicom data."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from dicom_series import write_ct_series, write_enhanced_ct
from pydicom.data import get_testdata_file
from scipy.spatial.transform import Rotation

from resunet.data.dicom import list_dicom_series, read_dicom_series
from resunet.data.io import read_volume
from resunet.errors import InputError

SPACING = (2.5, 0.7, 0.8)  # (z, y, x) mm
ORIGIN = (-100.25, 30.5, 12.0)  # LPS mm
DIRECTION = Rotation.from_euler("xyz", [10.0, -20.0, 30.0], degrees=True).as_matrix()


def ct_like(rng: np.random.Generator, shape=(9, 20, 24)) -> np.ndarray:
    """HU-like values: air, soft tissue and a bright 'bone' block."""
    hu = rng.normal(40.0, 20.0, size=shape)
    hu[:, :3, :] = -1000.0
    hu[2:5, 8:12, 10:16] = 1200.0
    return hu


def sitk_series(folder: Path, series_uid: str) -> sitk.Image:
    names = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series_uid)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(names)
    return reader.Execute()


def assert_matches_sitk(vol, img: sitk.Image, atol_values: float = 1e-3) -> None:
    np.testing.assert_allclose(vol.spacing, np.asarray(img.GetSpacing())[::-1], atol=1e-5)
    np.testing.assert_allclose(vol.origin, img.GetOrigin(), atol=1e-5)
    np.testing.assert_allclose(vol.direction, np.asarray(img.GetDirection()).reshape(3, 3), atol=1e-5)
    np.testing.assert_allclose(vol.array, sitk.GetArrayFromImage(img), atol=atol_values)


def test_series_matches_simpleitk_with_slope_extra_files_and_shuffled_names(tmp_path, rng):
    folder = tmp_path / "study"
    hu = np.round(ct_like(rng) * 2) / 2  # multiples of 0.5: exact with slope 0.5
    series = write_ct_series(folder, hu, SPACING, ORIGIN, DIRECTION,
                             rescale_slope=0.5, rescale_intercept=-1024.0)
    # noise a real folder holds: a text file and a real non-image DICOM object (an SR document)
    (folder / "README.txt").write_text("exported by a PACS\n")
    shutil.copy(get_testdata_file("test-SR.dcm"), folder / "report")

    vol = read_volume(folder)
    assert vol.array.dtype == np.float32  # slope 0.5: not an integer rescale
    np.testing.assert_array_equal(vol.array, hu.astype(np.float32))
    np.testing.assert_allclose(vol.spacing, SPACING, atol=1e-5)
    np.testing.assert_allclose(vol.origin, ORIGIN, atol=1e-5)
    np.testing.assert_allclose(vol.direction, DIRECTION, atol=1e-5)
    assert_matches_sitk(vol, sitk_series(folder, series.series_uid))

    meta = vol.meta
    assert meta["format"] == "dicom" and meta["modality"] == "CT"
    assert meta["series_uid"] == series.series_uid and meta["study_uid"] == series.study_uid
    assert meta["frame_of_reference_uid"] == series.frame_of_reference_uid
    assert meta["sop_instance_uids"] == series.sop_instance_uids  # array order
    assert [Path(f) for f in meta["files"]] == series.files
    np.testing.assert_allclose(meta["slice_positions"], series.positions, atol=1e-4)
    assert meta["dicom"]["PatientID"] == "RESUNET-TEST-1"
    assert meta["dicom"]["StudyInstanceUID"] == series.study_uid


def test_integer_rescale_gives_int16_and_matches_simpleitk(tmp_path, rng):
    hu = np.round(ct_like(rng, (6, 16, 12)))
    series = write_ct_series(tmp_path / "ct", hu, (1.25, 0.5, 0.5), (0.0, 0.0, -50.0))
    vol = read_dicom_series(tmp_path / "ct")
    assert vol.array.dtype == np.int16
    np.testing.assert_array_equal(vol.array, hu.astype(np.int16))
    assert_matches_sitk(vol, sitk_series(tmp_path / "ct", series.series_uid), atol_values=0)


def test_unsigned_mr_series(tmp_path, rng):
    values = rng.integers(0, 4000, size=(5, 10, 12)).astype(np.float64)
    series = write_ct_series(tmp_path / "mr", values, (3.0, 1.0, 1.0), (1.0, 2.0, 3.0),
                             modality="MR", unsigned=True)
    vol = read_dicom_series(tmp_path / "mr")
    assert vol.meta["modality"] == "MR"
    np.testing.assert_array_equal(vol.array, values)
    assert_matches_sitk(vol, sitk_series(tmp_path / "mr", series.series_uid), atol_values=0)


def test_slices_sorted_along_normal_not_by_name(tmp_path, rng):
    """Slices that run against the normal (z decreasing) come back in ascending normal order."""
    hu = np.round(ct_like(rng, (5, 8, 8)))
    flipped = np.diag([1.0, 1.0, -1.0])  # left-handed: slice k lies at z = -k * dz
    write_ct_series(tmp_path / "ct", hu, (2.0, 1.0, 1.0), (0.0, 0.0, 0.0), flipped)
    vol = read_dicom_series(tmp_path / "ct")
    np.testing.assert_array_equal(vol.array, hu[::-1])
    np.testing.assert_allclose(vol.origin, (0.0, 0.0, -8.0), atol=1e-6)
    np.testing.assert_allclose(vol.direction, np.eye(3), atol=1e-9)


def test_real_ct_small_single_file():
    path = Path(pydicom.examples.ct.filename)
    vol = read_volume(path)
    ds = pydicom.dcmread(path)
    assert vol.array.shape == (1, 128, 128) and vol.array.dtype == np.int16
    expected = ds.pixel_array.astype(np.int32) * int(ds.RescaleSlope) + int(ds.RescaleIntercept)
    np.testing.assert_array_equal(vol.array[0], expected)
    img = sitk.ReadImage(str(path))
    np.testing.assert_allclose(vol.origin, img.GetOrigin(), atol=1e-5)
    np.testing.assert_allclose(vol.spacing[1:], np.asarray(img.GetSpacing())[1::-1], atol=1e-5)
    np.testing.assert_allclose(vol.direction, np.asarray(img.GetDirection()).reshape(3, 3), atol=1e-5)
    np.testing.assert_array_equal(vol.array, sitk.GetArrayFromImage(img))
    assert vol.meta["modality"] == "CT" and vol.meta["sop_instance_uids"] == [ds.SOPInstanceUID]


def test_real_mr_small_single_file():
    path = Path(pydicom.examples.mr.filename)
    vol = read_dicom_series(path)
    img = sitk.ReadImage(str(path))
    np.testing.assert_allclose(vol.origin, img.GetOrigin(), atol=1e-5)
    np.testing.assert_allclose(vol.direction, np.asarray(img.GetDirection()).reshape(3, 3), atol=1e-5)
    np.testing.assert_allclose(vol.array, sitk.GetArrayFromImage(img))


def test_two_series_listed_and_selectable(tmp_path, rng):
    folder = tmp_path / "mixed"
    hu = np.round(ct_like(rng, (4, 8, 8)))
    a = write_ct_series(folder / "a", hu, series_description="arterial", seed=1)
    b = write_ct_series(folder / "b", hu + 10, series_description="venous", seed=2,
                        study_uid=a.study_uid, series_number=2)
    with pytest.raises(InputError) as err:
        read_volume(folder)
    msg = str(err.value)
    assert a.series_uid in msg and b.series_uid in msg
    assert "arterial" in msg and "venous" in msg and "4 file(s)" in msg and "series_uid" in msg
    vol = read_volume(folder, series_uid=b.series_uid)
    np.testing.assert_array_equal(vol.array, hu + 10)
    assert vol.meta["series_uid"] == b.series_uid
    assert {s.series_uid for s in list_dicom_series(folder)} == {a.series_uid, b.series_uid}
    with pytest.raises(InputError, match="1.2.3.4.5"):
        read_volume(folder, series_uid="1.2.3.4.5")


def test_enhanced_multi_frame_ct_with_shuffled_frames(tmp_path, rng):
    hu = np.round(ct_like(rng, (6, 10, 12)))
    path = write_enhanced_ct(tmp_path / "enhanced.dcm", hu, SPACING, ORIGIN, DIRECTION,
                             frame_order=[3, 0, 5, 1, 4, 2])
    vol = read_volume(path)
    np.testing.assert_array_equal(vol.array, hu)
    assert vol.array.dtype == np.int16
    np.testing.assert_allclose(vol.spacing, SPACING, atol=1e-5)
    np.testing.assert_allclose(vol.origin, ORIGIN, atol=1e-5)
    np.testing.assert_allclose(vol.direction, DIRECTION, atol=1e-5)
    assert vol.meta["frame_numbers"] == [2, 4, 6, 1, 5, 3]
    # the same file found in a folder
    folder_vol = read_volume(tmp_path)
    np.testing.assert_array_equal(folder_vol.array, hu)


# --------------------------------------------------------------------------- bad inputs


def test_missing_slice_is_reported(tmp_path, rng):
    series = write_ct_series(tmp_path / "ct", np.round(ct_like(rng, (6, 8, 8))), (2.0, 1.0, 1.0))
    series.files[3].unlink()
    with pytest.raises(InputError, match="missing") as err:
        read_volume(tmp_path / "ct")
    assert series.files[2].name in str(err.value) and series.files[4].name in str(err.value)


def test_duplicated_positions_are_reported(tmp_path, rng):
    hu = np.round(ct_like(rng, (3, 8, 8)))
    series = write_ct_series(tmp_path / "ct", hu, (2.0, 1.0, 1.0))
    ds = pydicom.dcmread(series.files[0])
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(tmp_path / "ct" / "copy_of_first.dcm")
    with pytest.raises(InputError, match="share a position") as err:
        read_volume(tmp_path / "ct")
    assert "copy_of_first.dcm" in str(err.value) or series.files[0].name in str(err.value)


def test_non_uniform_spacing_is_reported(tmp_path, rng):
    series = write_ct_series(tmp_path / "ct", np.round(ct_like(rng, (5, 8, 8))), (2.0, 1.0, 1.0))
    ds = pydicom.dcmread(series.files[4])
    ds.ImagePositionPatient = [0, 0, 8.7]
    ds.save_as(series.files[4])
    with pytest.raises(InputError, match="not uniform") as err:
        read_volume(tmp_path / "ct")
    assert series.files[4].name in str(err.value)


def test_non_image_dicom_only(tmp_path):
    folder = tmp_path / "reports"
    folder.mkdir()
    shutil.copy(get_testdata_file("test-SR.dcm"), folder / "sr_document.dcm")
    with pytest.raises(InputError, match="sr_document.dcm"):
        read_volume(folder)
    with pytest.raises(InputError, match="sr_document.dcm.*without an image"):
        read_volume(folder / "sr_document.dcm")


def test_empty_and_non_dicom_folders(tmp_path):
    empty = tmp_path / "empty_folder"
    empty.mkdir()
    with pytest.raises(InputError, match="empty_folder.*empty"):
        read_volume(empty)
    other = tmp_path / "other"
    other.mkdir()
    (other / "README.txt").write_text("no images here")
    with pytest.raises(InputError, match="README.txt"):
        read_volume(other)
    with pytest.raises(InputError, match="README.txt.*not a DICOM"):
        read_dicom_series(other / "README.txt")


def test_truncated_dicom_file(tmp_path):
    src = Path(get_testdata_file("MR_small.dcm"))
    cut = tmp_path / "cut_slice.dcm"
    cut.write_bytes(src.read_bytes()[: src.stat().st_size - 3000])
    with pytest.raises(InputError, match="cut_slice.dcm"):
        read_volume(cut)
    zero = tmp_path / "zero.dcm"
    zero.touch()
    with pytest.raises(InputError, match="zero.dcm.*0 bytes"):
        read_volume(zero)
