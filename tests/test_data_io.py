"""resunet.data.io: NIfTI / PNG / NumPy / MetaImage reading and writing on real files."""

from __future__ import annotations

import dataclasses
import gzip
import importlib.resources
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image
from scipy.spatial.transform import Rotation

from resunet.data.io import (
    atomic_write,
    nifti_affine_to_geometry,
    read_header,
    read_volume,
    write_volume,
)
from resunet.data.volume import Volume
from resunet.errors import InputError


def oblique_affine() -> np.ndarray:
    """Non-identity, oblique, anisotropic voxel->RAS affine (no shear, so qform can hold it)."""
    rot = Rotation.from_euler("xyz", [12.0, -25.0, 33.0], degrees=True).as_matrix()
    affine = np.eye(4)
    affine[:3, :3] = rot * np.array([0.7, 1.3, 2.9])[None, :]
    affine[:3, 3] = [-90.5, 12.25, 40.125]
    return affine


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray, qcode: int = 1, scode: int = 2) -> Path:
    img = nib.Nifti1Image(data, affine)
    img.header.set_qform(affine, code=qcode)
    img.header.set_sform(affine, code=scode)
    nib.save(img, str(path))
    return path


def sitk_geometry(img: sitk.Image) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    dim = img.GetDimension()
    return (
        np.asarray(img.GetSpacing())[::-1],
        np.asarray(img.GetOrigin()),
        np.asarray(img.GetDirection()).reshape(dim, dim),
    )


# --------------------------------------------------------------------------- NIfTI


def test_nifti_round_trip_keeps_affine_header_and_array_exactly(tmp_path, rng):
    data = rng.normal(size=(11, 13, 7)).astype(np.float32)
    src = write_nifti(tmp_path / "src.nii.gz", data, oblique_affine(), qcode=1, scode=2)
    vol = read_volume(src)
    assert vol.shape == (7, 13, 11) and vol.spatial_ndim == 3
    np.testing.assert_array_equal(vol.array, np.transpose(data, (2, 1, 0)))

    out = write_volume(vol, tmp_path / "out.nii.gz")
    a, b = nib.load(str(src)), nib.load(str(out))
    assert np.array_equal(a.affine, b.affine)  # bit-exact
    assert np.array_equal(a.get_sform(), b.get_sform())
    assert np.array_equal(a.get_qform(), b.get_qform())
    assert int(b.header["sform_code"]) == 2 and int(b.header["qform_code"]) == 1
    for key in ("quatern_b", "quatern_c", "quatern_d", "qoffset_x", "pixdim"):
        assert np.array_equal(a.header[key], b.header[key]), key
    np.testing.assert_array_equal(np.asarray(b.dataobj), data)
    # a mask derived from the image keeps the geometry too (with_array keeps meta)
    mask = vol.with_array((vol.array > 0).astype(np.uint8))
    out_mask = write_volume(mask, tmp_path / "mask.nii")
    m = nib.load(str(out_mask))
    assert np.array_equal(m.affine, a.affine) and m.get_data_dtype() == np.uint8


def test_nifti_geometry_agrees_with_simpleitk(tmp_path, rng):
    data = rng.integers(0, 1000, size=(11, 13, 7)).astype(np.int16)
    path = write_nifti(tmp_path / "img.nii.gz", data, oblique_affine(), qcode=1, scode=1)
    vol = read_volume(path)
    img = sitk.ReadImage(str(path))
    spacing, origin, direction = sitk_geometry(img)
    np.testing.assert_allclose(vol.spacing, spacing, atol=1e-5)
    np.testing.assert_allclose(vol.origin, origin, atol=1e-5)
    np.testing.assert_allclose(vol.direction, direction, atol=1e-5)
    np.testing.assert_array_equal(vol.array, sitk.GetArrayFromImage(img))
    assert vol.array.dtype == np.int16
    # world position of one voxel agrees with ITK
    idx = (3, 5, 8)  # (z, y, x)
    world = vol.index_to_world() @ np.array([*idx, 1.0])
    np.testing.assert_allclose(world[:3], img.TransformIndexToPhysicalPoint(idx[::-1]), atol=1e-4)


def test_nifti_changed_geometry_writes_affine_from_geometry(tmp_path, rng):
    data = rng.normal(size=(11, 13, 7)).astype(np.float32)
    vol = read_volume(write_nifti(tmp_path / "src.nii.gz", data, oblique_affine()))
    # crop 2 rows: the origin moves by 2 steps along y
    new_origin = tuple((vol.index_to_world() @ np.array([0.0, 2.0, 0.0, 1.0]))[:3])
    cropped = dataclasses.replace(vol, array=vol.array[:, 2:, :].copy(), origin=new_origin,
                                  meta=dict(vol.meta))
    out = write_volume(cropped, tmp_path / "crop.nii.gz")
    back = read_volume(out)
    assert back.same_geometry(cropped, atol=1e-4)
    np.testing.assert_array_equal(back.array, cropped.array)
    img = sitk.ReadImage(str(out))
    spacing, origin, direction = sitk_geometry(img)
    np.testing.assert_allclose(spacing, cropped.spacing, atol=1e-5)
    np.testing.assert_allclose(origin, cropped.origin, atol=1e-4)
    np.testing.assert_allclose(direction, cropped.direction, atol=1e-5)


def test_volume_without_nifti_meta_writes_consistent_nifti(tmp_path, rng):
    direction = Rotation.from_euler("z", 30, degrees=True).as_matrix()
    vol = Volume(rng.normal(size=(4, 5, 6)).astype(np.float32), (3.0, 0.5, 0.8),
                 (10.0, -20.0, 5.5), direction)
    out = write_volume(vol, tmp_path / "new.nii.gz")
    back = read_volume(out)
    assert back.same_geometry(vol, atol=1e-5)
    img = sitk.ReadImage(str(out))
    spacing, origin, direction_itk = sitk_geometry(img)
    np.testing.assert_allclose(origin, vol.origin, atol=1e-4)
    np.testing.assert_allclose(direction_itk, vol.direction, atol=1e-5)
    np.testing.assert_allclose(spacing, vol.spacing, atol=1e-5)


def test_4d_nifti_reads_channels_first(tmp_path, rng):
    data = rng.normal(size=(6, 5, 4, 3)).astype(np.float32)  # (X, Y, Z, C) as in the Decathlon
    path = write_nifti(tmp_path / "multi.nii.gz", data, oblique_affine())
    vol = read_volume(path)
    assert vol.array.shape == (3, 4, 5, 6) and vol.num_channels == 3 and vol.shape == (4, 5, 6)
    np.testing.assert_array_equal(vol.array[1], data[..., 1].T)
    header = read_header(path)
    assert header.shape == (4, 5, 6) and header.num_channels == 3
    out = write_volume(vol, tmp_path / "multi_out.nii.gz")
    np.testing.assert_array_equal(np.asarray(nib.load(str(out)).dataobj), data)


def test_real_mni_template_matches_simpleitk():
    """The MNI ICBM152 2009a T1 template shipped in the nilearn wheel (real MRI)."""
    data_dir = importlib.resources.files("nilearn") / "datasets" / "data"
    path = Path(str(data_dir / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"))
    if not path.is_file():
        pytest.skip("nilearn data files not installed")
    vol = read_volume(path)
    img = sitk.ReadImage(str(path))
    assert vol.shape == (189, 233, 197)
    spacing, origin, direction = sitk_geometry(img)
    np.testing.assert_allclose(vol.spacing, spacing, atol=1e-5)
    np.testing.assert_allclose(vol.origin, origin, atol=1e-5)
    np.testing.assert_allclose(vol.direction, direction, atol=1e-5)
    np.testing.assert_array_equal(vol.array, sitk.GetArrayFromImage(img))


def test_nifti_affine_to_geometry_flips_x_and_y():
    affine = np.diag([2.0, 3.0, 4.0, 1.0])
    affine[:3, 3] = [10.0, 20.0, 30.0]
    spacing, origin, direction = nifti_affine_to_geometry(affine)
    assert spacing == (4.0, 3.0, 2.0)
    assert origin == (-10.0, -20.0, 30.0)
    np.testing.assert_array_equal(direction, np.diag([-1.0, -1.0, 1.0]))


# --------------------------------------------------------------------------- bad inputs


def test_truncated_nifti_gz_raises_input_error_naming_file(tmp_path, rng):
    data = rng.normal(size=(32, 32, 16)).astype(np.float32)
    good = write_nifti(tmp_path / "good.nii.gz", data, np.eye(4))
    raw = good.read_bytes()
    bad = tmp_path / "truncated_case.nii.gz"
    bad.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(InputError, match="truncated_case.nii.gz"):
        read_volume(bad)


def test_garbage_nifti_raises_input_error(tmp_path):
    bad = tmp_path / "garbage.nii.gz"
    bad.write_bytes(gzip.compress(b"this is not a nifti header" * 3))
    with pytest.raises(InputError, match="garbage.nii.gz"):
        read_volume(bad)
    plain = tmp_path / "garbage.nii"
    plain.write_bytes(b"\x00" * 400)
    with pytest.raises(InputError, match="garbage.nii"):
        read_volume(plain)


def test_empty_missing_and_unknown_files(tmp_path):
    empty = tmp_path / "empty_scan.nii.gz"
    empty.touch()
    with pytest.raises(InputError, match="empty_scan.nii.gz.*0 bytes"):
        read_volume(empty)
    with pytest.raises(InputError, match="no_such_file.nii.gz.*does not exist"):
        read_volume(tmp_path / "no_such_file.nii.gz")
    odd = tmp_path / "notes.xyz"
    odd.write_text("hello")
    with pytest.raises(InputError, match=r"notes\.xyz.*\.nii\.gz.*\.png.*\.npy") as err:
        read_volume(odd)
    assert "DICOM" in str(err.value)
    with pytest.raises(InputError, match=r"out\.jpg.*\.nii\.gz"):
        write_volume(Volume(np.zeros((2, 2), np.uint8), (1, 1), (0, 0), np.eye(2), 2),
                     tmp_path / "out.jpg")


def test_unreadable_png_raises_input_error(tmp_path, rng):
    bad = tmp_path / "broken_image.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png")
    with pytest.raises(InputError, match="broken_image.png"):
        read_volume(bad)
    # a PNG cut in half (truncated download)
    good = tmp_path / "good.png"
    Image.fromarray(rng.integers(0, 255, size=(64, 64, 3), dtype=np.uint8)).save(good)
    cut = tmp_path / "cut_image.png"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(InputError, match="cut_image.png"):
        read_volume(cut)


# --------------------------------------------------------------------------- pictures


def test_png_gray_rgb_rgba_layouts(tmp_path, rng):
    gray = rng.integers(0, 255, size=(20, 30), dtype=np.uint8)
    rgb = rng.integers(0, 255, size=(20, 30, 3), dtype=np.uint8)
    rgba = rng.integers(0, 255, size=(20, 30, 4), dtype=np.uint8)
    Image.fromarray(gray).save(tmp_path / "gray.png")
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(rgb).save(tmp_path / "photo.jpg", quality=95)
    g = read_volume(tmp_path / "gray.png")
    assert g.array.shape == (20, 30) and g.spatial_ndim == 2 and g.spacing == (1.0, 1.0)
    np.testing.assert_array_equal(g.array, gray)
    c = read_volume(tmp_path / "rgb.png")
    assert c.array.shape == (3, 20, 30) and c.num_channels == 3
    np.testing.assert_array_equal(c.array, np.moveaxis(rgb, -1, 0))
    a = read_volume(tmp_path / "rgba.png")
    np.testing.assert_array_equal(a.array, np.moveaxis(rgba[..., :3], -1, 0))
    j = read_volume(tmp_path / "photo.jpg")
    assert j.array.shape == (3, 20, 30) and j.array.dtype == np.uint8
    assert read_header(tmp_path / "rgb.png").num_channels == 3
    assert read_header(tmp_path / "gray.png").shape == (20, 30)


def test_png_mask_round_trip(tmp_path, rng):
    labels = rng.integers(0, 4, size=(17, 23)).astype(np.int64)
    vol = Volume(labels, (1.0, 1.0), (0.0, 0.0), np.eye(2), spatial_ndim=2)
    out = write_volume(vol, tmp_path / "mask.png")
    with Image.open(out) as img:
        assert img.mode == "L"
    back = read_volume(out)
    assert back.array.dtype == np.uint8
    np.testing.assert_array_equal(back.array, labels)  # label indices kept, not scaled
    # bool masks and (1, H, W) volumes are accepted; out-of-range / float masks are not
    write_volume(Volume(labels[None] > 1, (1, 1, 1), (0, 0, 0), np.eye(3)), tmp_path / "b.png")
    np.testing.assert_array_equal(read_volume(tmp_path / "b.png").array, (labels > 1).astype(np.uint8))
    with pytest.raises(InputError, match="big.png"):
        write_volume(vol.with_array(labels + 300), tmp_path / "big.png")
    with pytest.raises(InputError, match="float.png"):
        write_volume(vol.with_array(labels.astype(np.float32)), tmp_path / "float.png")
    assert not (tmp_path / "big.png").exists()


def test_palette_png_keeps_indices(tmp_path):
    idx = np.array([[0, 1, 2], [2, 1, 0]], dtype=np.uint8)
    img = Image.fromarray(idx).convert("P")
    img.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * (256 * 3 - 9))
    img.save(tmp_path / "pal.png")
    np.testing.assert_array_equal(read_volume(tmp_path / "pal.png").array, idx)


# --------------------------------------------------------------------------- numpy / ITK


def test_npy_and_npz_round_trip(tmp_path, rng):
    arr = rng.normal(size=(3, 4, 5)).astype(np.float32)
    vol = Volume(arr, (2.0, 1.0, 0.5), (1.0, 2.0, 3.0), np.eye(3))
    write_volume(vol, tmp_path / "a.npy")
    a = read_volume(tmp_path / "a.npy")
    np.testing.assert_array_equal(a.array, arr)
    assert a.spacing == (1.0, 1.0, 1.0)
    write_volume(vol, tmp_path / "a.npz")
    z = read_volume(tmp_path / "a.npz")
    np.testing.assert_array_equal(z.array, arr)
    assert z.same_geometry(vol)
    np.savez(tmp_path / "b.npz", array=arr[0], spacing=np.array([0.3, 0.4]))
    b = read_volume(tmp_path / "b.npz")
    assert b.spatial_ndim == 2 and b.spacing == (0.3, 0.4)
    assert read_volume(tmp_path / "a.npy").array.shape == read_header(tmp_path / "a.npy").shape
    (tmp_path / "cut.npy").write_bytes((tmp_path / "a.npy").read_bytes()[:100])
    with pytest.raises(InputError, match="cut.npy"):
        read_volume(tmp_path / "cut.npy")


def test_mha_round_trip_keeps_geometry(tmp_path, rng):
    direction = Rotation.from_euler("xy", [20, 10], degrees=True).as_matrix()
    vol = Volume(rng.integers(0, 5, size=(4, 6, 8)).astype(np.uint8), (2.5, 0.9, 0.7),
                 (-5.0, 6.0, 7.0), direction)
    out = write_volume(vol, tmp_path / "x.mha")
    back = read_volume(out)
    assert back.same_geometry(vol, atol=1e-6)
    np.testing.assert_array_equal(back.array, vol.array)
    assert read_header(out).shape == (4, 6, 8)


# --------------------------------------------------------------------------- atomic writes


def test_atomic_write_replaces_only_on_success(tmp_path):
    target = tmp_path / "result.nii.gz"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_write(target) as tmp:
            assert tmp.parent == tmp_path and tmp.name.endswith(".nii.gz")
            tmp.write_text("half")
            raise RuntimeError("writer crashed")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.nii.gz"]
    with atomic_write(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.nii.gz"]
    with pytest.raises(InputError, match="missing_dir"):
        with atomic_write(tmp_path / "missing_dir" / "x.npy"):
            pass
