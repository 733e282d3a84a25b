"""Read and write images as `Volume` objects, whatever the file format.

`read_volume` dispatches on what a path is:

- ``.nii`` / ``.nii.gz`` (nibabel): the NIfTI RAS affine becomes the LPS ``origin`` /
  ``direction`` / ``spacing`` of `Volume` (x and y negated, exactly what SimpleITK does);
  ``meta["nifti_affine"]`` and ``meta["nifti_header"]`` keep the source so that `write_volume`
  writes the same affine bit for bit. 4-D NIfTI images (the Medical Segmentation Decathlon puts
  modalities on the 4th axis) become ``(C, D, H, W)``.
- a folder, a ``.dcm`` file or any file with the ``DICM`` marker: `resunet.data.dicom`.
- ``.png`` / ``.jpg`` / ``.jpeg`` / ``.bmp`` (Pillow): grayscale -> ``(H, W)``; colour ->
  ``(3, H, W)`` (RGB, channels first, alpha dropped and noted in ``meta["alpha_dropped"]``;
  `resunet.data.channels` has the rule for a case's channels); palette images keep their palette *indices*
  (the label-mask convention of PASCAL VOC style masks); spacing ``(1, 1)`` (pixels).
- ``.tif`` / ``.tiff`` (tifffile): 2-D -> ``(H, W)``; ``(H, W, 3|4)`` -> ``(3, H, W)``;
  other 3-D stacks -> ``(D, H, W)``; spacing 1.
- ``.mha`` / ``.mhd`` / ``.nrrd`` / ``.nhdr`` (SimpleITK).
- ``.npy``: a bare array (2-D -> ``(H, W)``, 3-D -> ``(D, H, W)``, 4-D -> ``(C, D, H, W)``), spacing
  1, origin 0, identity direction. ``.npz``: key ``array`` (or its only array) plus optional
  ``spacing``, ``origin``, ``direction`` and ``spatial_ndim`` (what `write_volume` stores).

`write_volume` writes NIfTI, ``.mha``/``.nrrd``, PNG label masks, ``.npy`` and ``.npz``; every
writer goes through `atomic_write`, so an output path holds either the old file or the complete
new one, never a half-written file.

Every problem a user can cause (missing, empty, truncated or corrupt file, unknown extension)
raises `resunet.errors.InputError` naming the file.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from resunet.data.limits import read_nifti_data
from resunet.data.volume import Volume
from resunet.errors import InputError

__all__ = [
    "ImageHeader",
    "SUPPORTED_READ",
    "SUPPORTED_WRITE",
    "atomic_write",
    "file_kind",
    "make_folder",
    "nifti_affine_to_geometry",
    "geometry_to_nifti_affine",
    "read_header",
    "read_volume",
    "write_volume",
]

NIFTI_SUFFIXES = (".nii", ".nii.gz")
PIL_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
TIFF_SUFFIXES = (".tif", ".tiff")
ITK_SUFFIXES = (".mha", ".mhd", ".nrrd", ".nhdr")
NUMPY_SUFFIXES = (".npy", ".npz")
DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")

SUPPORTED_READ = (
    "NIfTI (.nii, .nii.gz), DICOM (a series folder, a .dcm file or any file with the DICM marker), "
    "PNG/JPEG/BMP (.png, .jpg, .jpeg, .bmp), TIFF (.tif, .tiff), MetaImage/NRRD "
    "(.mha, .mhd, .nrrd, .nhdr), NumPy (.npy, .npz)"
)
SUPPORTED_WRITE = ".nii, .nii.gz, .mha, .nrrd, .png (2-D label masks), .npy, .npz"

# NIfTI world space is RAS, ITK/DICOM world space is LPS: negate x and y.
_RAS_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


# --------------------------------------------------------------------------- atomic writes


def _full_suffix(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(".nii.gz"):
        return path.name[-len(".nii.gz") :]
    return path.suffix


@contextmanager
def atomic_write(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success fsync it and rename it onto ``path``.

    The temporary file keeps the extension of ``path`` (``.nii.gz`` included) so that writers
    that pick the format from the name work. The caller must create the file at the yielded
    path. If the block raises, the temporary file is removed and ``path`` is left untouched.
    """
    path = Path(path)
    folder = path.parent
    if not folder.is_dir():
        raise InputError(f"cannot write {path}: folder {folder} does not exist; create it first")
    tmp = folder / f".{path.name}.{secrets.token_hex(6)}.tmp{_full_suffix(path)}"
    try:
        yield tmp
        if not tmp.is_file():
            raise RuntimeError(f"writer did not create the temporary file {tmp}")
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable (not possible on every platform)
        dir_fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def make_folder(folder: str | os.PathLike[str], what: str = "output folder") -> Path:
    """``mkdir -p folder``; an `InputError` naming the path when it cannot be created."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        blocker = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)
        why = f"{blocker} is a file, not a folder" if blocker is not None else (exc.strerror or str(exc))
        raise InputError(f"cannot create the {what} {folder}: {why}; choose another path") from None
    return folder


# --------------------------------------------------------------------------- dispatch


def _has_dicm_marker(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


def file_kind(path: str | os.PathLike[str]) -> str:
    """Name the reader for ``path``: ``nifti``, ``dicom``, ``pil``, ``tiff``, ``itk`` or ``numpy``.

    Raises `InputError` when the path does not exist, is an empty file or has an unknown type.
    """
    path = Path(path)
    try:
        exists = path.exists()
        if exists:  # an unreadable file or folder fails here, not deep inside a reader
            if path.is_dir():
                with os.scandir(path) as entries:
                    next(entries, None)
            elif path.is_file():  # (not a FIFO or device: opening those could block)
                with open(path, "rb"):
                    pass
    except PermissionError:
        raise InputError(
            f"{path}: permission denied; make it readable for this user (e.g. chmod a+r on the "
            "file, a+rx on its folders) or run as a user who may read it"
        ) from None
    if not exists:
        raise InputError(f"{path} does not exist; check the path (supported: {SUPPORTED_READ})")
    if path.is_dir():
        return "dicom"
    if path.stat().st_size == 0:
        raise InputError(f"{path} is an empty file (0 bytes); re-export or re-copy it")
    name = path.name.lower()
    if name.endswith(NIFTI_SUFFIXES):
        return "nifti"
    suffix = path.suffix.lower()
    if suffix in PIL_SUFFIXES:
        return "pil"
    if suffix in TIFF_SUFFIXES:
        return "tiff"
    if suffix in ITK_SUFFIXES:
        return "itk"
    if suffix in NUMPY_SUFFIXES:
        return "numpy"
    if suffix in DICOM_SUFFIXES or _has_dicm_marker(path):
        return "dicom"
    raise InputError(
        f"{path}: unsupported file type {suffix or '(no extension)'!r}; supported: {SUPPORTED_READ}"
    )


def read_volume(path: str | os.PathLike[str], series_uid: str | None = None) -> Volume:
    """Read an image file or a DICOM series folder into a `Volume`.

    ``series_uid`` picks one series when a DICOM folder holds several (ignored for other
    formats). See the module docstring for the array layout of each format.
    """
    path = Path(path)
    kind = file_kind(path)
    if kind == "dicom":
        from resunet.data.dicom import read_dicom_series

        return read_dicom_series(path, series_uid=series_uid)
    reader = {
        "nifti": _read_nifti,
        "pil": _read_pil,
        "tiff": _read_tiff,
        "itk": _read_itk,
        "numpy": _read_numpy,
    }[kind]
    return reader(path)


# --------------------------------------------------------------------------- NIfTI geometry


def nifti_affine_to_geometry(
    affine: np.ndarray,
) -> tuple[tuple[float, float, float], tuple[float, float, float], np.ndarray]:
    """Convert a NIfTI voxel->RAS affine to `Volume` ``(spacing, origin, direction)``.

    ``spacing`` is in mm in array order ``(z, y, x)``, ``origin`` the LPS position of voxel 0 and
    ``direction`` the 3x3 matrix whose columns are the LPS unit vectors of NIfTI axes i, j, k
    (= ITK x, y, z). A sheared affine gives a non-orthogonal ``direction`` (kept as is).
    """
    lps = _RAS_LPS @ np.asarray(affine, dtype=np.float64)
    steps = lps[:3, :3]
    itk_spacing = np.linalg.norm(steps, axis=0)
    if np.any(itk_spacing == 0) or not np.all(np.isfinite(steps)):
        raise ValueError(f"degenerate NIfTI affine (a zero or non-finite column):\n{affine}")
    direction = steps / itk_spacing[None, :]
    spacing = tuple(float(s) for s in itk_spacing[::-1])
    origin = tuple(float(o) for o in lps[:3, 3])
    return spacing, origin, direction  # type: ignore[return-value]


def geometry_to_nifti_affine(volume: Volume) -> np.ndarray:
    """The 4x4 NIfTI voxel (i, j, k) -> RAS affine of a `Volume` (2-D volumes lie in z = 0)."""
    spacing, origin, direction = _geometry_3d(volume)
    lps = np.eye(4)
    lps[:3, :3] = direction * np.asarray(spacing[::-1])[None, :]
    lps[:3, 3] = origin
    return _RAS_LPS @ lps


def _geometry_3d(volume: Volume) -> tuple[tuple[float, ...], tuple[float, ...], np.ndarray]:
    if volume.spatial_ndim == 3:
        return volume.spacing, volume.origin, volume.direction
    direction = np.eye(3)
    direction[:2, :2] = volume.direction
    return (1.0, *volume.spacing), (*volume.origin, 0.0), direction


def _nib():
    import nibabel

    return nibabel


# DEFLATE cannot compress by more than 1032:1, so a .nii.gz of n bytes holds < 1032 n bytes of data
_DEFLATE_MAX_RATIO = 1032


def _physical_memory() -> int | None:
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):
        return None


def _check_nifti_size(img: Any, path: Path) -> None:
    """Refuse a header whose data cannot be in the file (or in memory) before reading it.

    A corrupt header claiming e.g. 2000^3 voxels would otherwise make the reader allocate the
    whole array (gigabytes) before finding out that the file is a few bytes long.
    """
    header = img.header
    shape = tuple(int(s) for s in header.get_data_shape())
    if any(s < 0 for s in shape):  # pragma: no cover - nibabel refuses these itself
        raise InputError(f"{path}: the header gives negative dimensions {shape}; the header is corrupt")
    nbytes = int(np.prod(shape, dtype=np.float64)) * header.get_data_dtype().itemsize
    claim = f"the header claims shape {shape} of {header.get_data_dtype()} ({nbytes / 2**30:.3g} GiB)"
    size = path.stat().st_size
    offset = int(header.get_data_offset())
    if path.name.lower().endswith(".gz"):
        if nbytes > _DEFLATE_MAX_RATIO * size + 4096:
            raise InputError(
                f"{path}: {claim} but the compressed file ({size} bytes) cannot hold that much: it is "
                "truncated or its header is wrong; re-export or re-copy it"
            )
    elif size < offset + nbytes:
        raise InputError(
            f"{path}: {claim} but the file holds only {max(0, size - offset)} bytes of data: it is "
            "truncated or its header is wrong; re-export or re-copy it"
        )
    memory = _physical_memory()
    if memory is not None and nbytes > memory:
        raise InputError(
            f"{path}: {claim}, more than this machine's memory ({memory / 2**30:.3g} GiB); if the "
            "header is right, crop or downsample the image first"
        )


def _read_nifti(path: Path) -> Volume:
    nib = _nib()
    try:
        img = nib.load(str(path), mmap=False)
    except Exception as exc:  # not NIfTI at all, unreadable header, gzip error
        raise InputError(
            f"cannot read NIfTI file {path}: {type(exc).__name__}: {exc}. The file is corrupt "
            "or truncated (e.g. an interrupted download or copy); re-export or re-copy it"
        ) from exc
    _check_nifti_size(img, path)
    try:
        # Force the read now: a truncated .nii.gz fails here, not later in training. A .nii.gz is
        # inflated in chunks up to the size its header declares, never beyond (resunet.data.limits).
        data = read_nifti_data(img, path)
    except InputError:
        raise
    except Exception as exc:  # nibabel, gzip, zlib, EOFError, ValueError, OSError ...
        raise InputError(
            f"cannot read NIfTI file {path}: {type(exc).__name__}: {exc}. The file is corrupt "
            "or truncated (e.g. an interrupted download or copy); re-export or re-copy it"
        ) from exc
    data = np.asarray(data)
    if data.ndim < 2 or data.size == 0:
        raise InputError(
            f"{path}: NIfTI array of shape {data.shape} is {data.ndim}-D or empty, not an image; "
            "resunet reads 2-D and 3-D images (4-D with channels on the last axis)"
        )
    if data.ndim == 5 and data.shape[3] == 1:  # ITK vector images: (X, Y, Z, 1, C)
        data = data[:, :, :, 0, :]
    while data.ndim < 3:
        data = data[..., np.newaxis]
    if data.ndim > 4:
        raise InputError(
            f"{path}: NIfTI image of shape {data.shape} has more than 4 dimensions; "
            "resunet reads 3-D volumes and 4-D volumes with channels on the last axis"
        )
    try:
        spacing, origin, direction = nifti_affine_to_geometry(img.affine)
    except ValueError as exc:
        raise InputError(f"{path}: {exc}; fix the qform/sform of this file") from exc
    # nibabel (X, Y, Z[, C]) -> Volume (Z, Y, X) / (C, Z, Y, X)
    axes = (2, 1, 0) if data.ndim == 3 else (3, 2, 1, 0)
    array = np.ascontiguousarray(np.transpose(data, axes))
    meta: dict[str, Any] = {
        "format": "nifti",
        "path": str(path),
        "nifti_affine": np.array(img.affine, dtype=np.float64),
        "nifti_header": img.header.copy(),
    }
    return Volume(array, spacing, origin, direction, spatial_ndim=3, meta=meta)


def _nifti_dtype(array: np.ndarray) -> np.ndarray:
    if array.dtype == np.bool_:
        return array.astype(np.uint8)
    if array.dtype == np.float16:
        return array.astype(np.float32)
    if array.dtype in (np.int64, np.uint64):
        if array.size == 0 or (array.min() >= np.iinfo(np.int32).min and array.max() <= np.iinfo(np.int32).max):
            return array.astype(np.int32)
    return array


def _write_nifti(volume: Volume, path: Path) -> None:
    nib = _nib()
    array = _nifti_dtype(np.asarray(volume.array))
    if volume.spatial_ndim == 2:  # (H, W) -> (1, H, W), (C, H, W) -> (C, 1, H, W)
        array = array[np.newaxis] if array.ndim == 2 else array[:, np.newaxis]
    data = np.transpose(array, (2, 1, 0) if array.ndim == 3 else (3, 2, 1, 0))

    source_header = volume.meta.get("nifti_header")
    source_affine = volume.meta.get("nifti_affine")
    header_class = nib.Nifti1Header
    if source_header is not None and isinstance(source_header, nib.Nifti2Header):
        header_class = nib.Nifti2Header
    image_class = nib.Nifti2Image if header_class is nib.Nifti2Header else nib.Nifti1Image

    same = False
    if source_header is not None and source_affine is not None and volume.spatial_ndim == 3:
        src_shape = tuple(int(s) for s in source_header.get_data_shape()[:3])
        src_shape = (src_shape + (1, 1, 1))[:3]
        try:
            spacing, origin, direction = nifti_affine_to_geometry(source_affine)
            same = (
                src_shape[::-1] == volume.shape
                and np.allclose(spacing, volume.spacing, rtol=1e-9, atol=1e-7)
                and np.allclose(origin, volume.origin, rtol=1e-9, atol=1e-7)
                and np.allclose(direction, volume.direction, rtol=1e-9, atol=1e-9)
            )
        except ValueError:
            same = False

    if same:
        # Unchanged geometry: the source header's qform/sform (and their codes) stay as they were,
        # so the affine written is bit-identical to the one read.
        header = header_class.from_header(source_header)
        header.set_data_dtype(data.dtype)
        header.set_slope_inter(np.nan, np.nan)
        affine = np.array(source_affine, dtype=np.float64)
        img = image_class(data, affine, header=header)
    else:
        affine = geometry_to_nifti_affine(volume)
        if source_header is not None:
            header = header_class.from_header(source_header)
            qcode = int(header["qform_code"]) or 1
            scode = int(header["sform_code"]) or 1
        else:
            header = header_class()
            qcode = scode = 1
        header.set_data_shape(data.shape)
        header.set_data_dtype(data.dtype)
        header.set_slope_inter(np.nan, np.nan)
        header.set_qform(affine, code=qcode)  # also sets pixdim, which ITK reads for spacing
        header.set_sform(affine, code=scode)
        header.set_xyzt_units(xyz="mm")
        img = image_class(data, affine, header=header)
    with atomic_write(path) as tmp:
        nib.save(img, str(tmp))


# --------------------------------------------------------------------------- 2-D pictures


def _picture_volume(array: np.ndarray, path: Path, fmt: str) -> Volume:
    if array.ndim == 2:
        return Volume(array, (1.0, 1.0), (0.0, 0.0), np.eye(2), spatial_ndim=2,
                      meta={"format": fmt, "path": str(path)})
    if array.ndim == 3 and array.shape[-1] in (3, 4):
        rgb = np.ascontiguousarray(np.moveaxis(array[..., :3], -1, 0))
        meta: dict[str, Any] = {"format": fmt, "path": str(path)}
        if array.shape[-1] == 4:
            meta["alpha_dropped"] = True
        return Volume(rgb, (1.0, 1.0), (0.0, 0.0), np.eye(2), spatial_ndim=2, meta=meta)
    if array.ndim == 3:
        return Volume(np.ascontiguousarray(array), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), np.eye(3),
                      spatial_ndim=3, meta={"format": fmt, "path": str(path)})
    raise InputError(f"{path}: image of shape {array.shape} is neither 2-D, RGB(A) nor a 3-D stack")


#: picture modes whose alpha channel the reader drops (RGBA -> RGB, LA -> L)
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La")


def _read_pil(path: Path) -> Volume:
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.load()  # decode now so truncated files fail here
            mode = img.mode
            if mode in ("RGBA", "RGBX", "RGBa"):
                array = np.asarray(img.convert("RGB"))
            elif mode in ("CMYK", "YCbCr", "LAB", "HSV"):
                array = np.asarray(img.convert("RGB"))
            elif mode in ("LA", "La"):
                array = np.asarray(img.convert("L"))
            elif mode == "PA":  # palette indices + alpha: keep the indices
                array = np.asarray(img)[..., 0]
            elif mode == "1":
                array = np.asarray(img).astype(np.uint8)
            else:  # L, P (palette indices), I, I;16, F, RGB
                array = np.asarray(img)
    except Exception as exc:  # PIL.UnidentifiedImageError, OSError (truncated), ...
        raise InputError(
            f"cannot read image {path}: {type(exc).__name__}: {exc}. The file is corrupt, "
            "truncated or not really a PNG/JPEG; re-export it"
        ) from exc
    volume = _picture_volume(np.array(array), path, "png" if path.suffix.lower() == ".png" else "image")
    if mode in _ALPHA_MODES:
        volume.meta["alpha_dropped"] = True  # `resunet.data.channels.split_channels` warns
    return volume


def _read_tiff(path: Path) -> Volume:
    import tifffile

    try:
        array = tifffile.imread(str(path))
    except Exception as exc:
        raise InputError(f"cannot read TIFF file {path}: {type(exc).__name__}: {exc}") from exc
    return _picture_volume(np.asarray(array), path, "tiff")


def _write_png(volume: Volume, path: Path) -> None:
    """Write a 2-D label mask: values are label indices (0, 1, 2, ...), stored as uint8 as is.

    A binary mask therefore looks black in an image viewer (1 of 255); this keeps the file a
    lossless label map that `read_volume` returns unchanged.
    """
    from PIL import Image

    array = np.asarray(volume.array)
    if volume.spatial_ndim == 3 and volume.shape[0] == 1 and array.ndim == 3:
        array = array[0]
    if array.ndim != 2:
        raise InputError(
            f"cannot write {path}: a PNG mask must be one 2-D (H, W) label array, got shape "
            f"{array.shape}; write 3-D or multi-channel data as .nii.gz or .npy"
        )
    if array.dtype == np.bool_:
        array = array.astype(np.uint8)
    if not np.issubdtype(array.dtype, np.integer):
        raise InputError(
            f"cannot write {path}: PNG masks hold integer label indices, got dtype {array.dtype}; "
            "threshold or round the array (e.g. array.astype(np.uint8)) first"
        )
    if array.size and (array.min() < 0 or array.max() > 255):
        raise InputError(
            f"cannot write {path}: label values {int(array.min())}..{int(array.max())} do not fit "
            "in an 8-bit PNG (0..255); write a .nii.gz or .npy instead"
        )
    img = Image.fromarray(np.ascontiguousarray(array.astype(np.uint8)))
    with atomic_write(path) as tmp:
        img.save(tmp, format="PNG")


# --------------------------------------------------------------------------- ITK formats


def _read_itk(path: Path) -> Volume:
    import SimpleITK as sitk

    try:
        img = sitk.ReadImage(str(path))
    except Exception as exc:
        raise InputError(f"cannot read {path}: {exc}".strip()) from exc
    dim = img.GetDimension()
    if dim not in (2, 3):
        raise InputError(f"{path}: {dim}-D images are not supported (2-D or 3-D only)")
    array = sitk.GetArrayFromImage(img)
    if img.GetNumberOfComponentsPerPixel() > 1:
        array = np.moveaxis(array, -1, 0)
    return Volume(
        np.ascontiguousarray(array),
        img.GetSpacing()[::-1],
        img.GetOrigin(),
        np.asarray(img.GetDirection()).reshape(dim, dim),
        spatial_ndim=dim,
        meta={"format": "itk", "path": str(path)},
    )


def _write_itk(volume: Volume, path: Path) -> None:
    import SimpleITK as sitk

    array = np.asarray(volume.array)
    if array.dtype == np.bool_:
        array = array.astype(np.uint8)
    if volume.num_channels > 1 or array.ndim == volume.spatial_ndim + 1:
        img = sitk.GetImageFromArray(np.moveaxis(array, 0, -1), isVector=True)
    else:
        img = sitk.GetImageFromArray(array)
    img.SetSpacing(volume.spacing[::-1])
    img.SetOrigin(volume.origin)
    img.SetDirection(tuple(float(v) for v in volume.direction.ravel()))
    with atomic_write(path) as tmp:
        sitk.WriteImage(img, str(tmp), useCompression=True)


# --------------------------------------------------------------------------- NumPy


def _array_volume(array: np.ndarray, path: Path, fmt: str) -> Volume:
    if array.ndim not in (2, 3, 4):
        raise InputError(
            f"{path}: array of shape {array.shape} must be 2-D (H, W), 3-D (D, H, W) or 4-D "
            "(C, D, H, W)"
        )
    n = 2 if array.ndim == 2 else 3
    return Volume(array, (1.0,) * n, (0.0,) * n, np.eye(n), spatial_ndim=n,
                  meta={"format": fmt, "path": str(path)})


def _read_numpy(path: Path) -> Volume:
    try:
        loaded = np.load(path, allow_pickle=False)
    except Exception as exc:
        raise InputError(
            f"cannot read {path}: {type(exc).__name__}: {exc}. The file is corrupt or truncated "
            "(object arrays saved with pickle are refused)"
        ) from exc
    if isinstance(loaded, np.ndarray):
        return _array_volume(loaded, path, "npy")
    with loaded:
        keys = list(loaded.files)
        key = "array" if "array" in keys else None
        geometry_keys = {"spacing", "origin", "direction", "spatial_ndim"}
        data_keys = [k for k in keys if k not in geometry_keys]
        if key is None and len(data_keys) == 1:
            key = data_keys[0]
        if key is None:
            raise InputError(
                f"{path}: .npz holds {keys}; store the image under the key 'array' "
                "(optionally with 'spacing', 'origin', 'direction', 'spatial_ndim')"
            )
        try:
            array = loaded[key]
            extra = {k: loaded[k] for k in geometry_keys & set(keys)}
        except Exception as exc:
            raise InputError(f"cannot read {path}: {type(exc).__name__}: {exc}") from exc
    if not extra:
        return _array_volume(array, path, "npz")
    if "spatial_ndim" in extra:
        n = int(extra["spatial_ndim"])
    elif "spacing" in extra:
        n = int(np.asarray(extra["spacing"]).size)
    else:
        n = 2 if array.ndim == 2 else 3
    try:
        return Volume(
            array,
            tuple(np.asarray(extra.get("spacing", np.ones(n))).ravel()),
            tuple(np.asarray(extra.get("origin", np.zeros(n))).ravel()),
            np.asarray(extra.get("direction", np.eye(n))),
            spatial_ndim=n,
            meta={"format": "npz", "path": str(path)},
        )
    except ValueError as exc:
        raise InputError(f"{path}: geometry does not fit the array: {exc}") from exc


def _write_npy(volume: Volume, path: Path) -> None:
    with atomic_write(path) as tmp:
        np.save(tmp, np.asarray(volume.array), allow_pickle=False)


def _write_npz(volume: Volume, path: Path) -> None:
    with atomic_write(path) as tmp:
        np.savez_compressed(
            tmp,
            array=np.asarray(volume.array),
            spacing=np.asarray(volume.spacing),
            origin=np.asarray(volume.origin),
            direction=volume.direction,
            spatial_ndim=np.asarray(volume.spatial_ndim),
        )


# --------------------------------------------------------------------------- writing


def write_volume(volume: Volume, path: str | os.PathLike[str]) -> Path:
    """Write ``volume`` to ``path`` (format from the extension) atomically; return the path.

    - ``.nii`` / ``.nii.gz``: geometry kept. When ``volume.meta`` holds the source
      ``nifti_affine``/``nifti_header`` and the geometry is unchanged, that exact affine and the
      source qform/sform codes are written; otherwise the affine is built from the geometry.
    - ``.mha`` / ``.nrrd``: geometry kept (SimpleITK).
    - ``.png``: one 2-D integer label mask, values 0..255 stored as uint8 label indices.
    - ``.npy``: the bare array (no geometry); ``.npz``: array plus spacing/origin/direction.
    """
    path = Path(path)
    name = path.name.lower()
    if name.endswith(NIFTI_SUFFIXES):
        _write_nifti(volume, path)
    elif path.suffix.lower() == ".png":
        _write_png(volume, path)
    elif path.suffix.lower() in (".mha", ".nrrd"):
        _write_itk(volume, path)
    elif path.suffix.lower() == ".npy":
        _write_npy(volume, path)
    elif path.suffix.lower() == ".npz":
        _write_npz(volume, path)
    else:
        raise InputError(
            f"cannot write {path}: unsupported extension {path.suffix or '(none)'!r}; "
            f"supported: {SUPPORTED_WRITE} (DICOM SEG has its own writer)"
        )
    return path


# --------------------------------------------------------------------------- headers


@dataclass(frozen=True)
class ImageHeader:
    """Geometry of an image file without its pixels (same conventions as `Volume`).

    ``shape`` is the spatial shape in array order; ``num_channels`` counts the leading channel
    axis (1 when there is none); ``alpha`` is True for pictures whose alpha channel the reader
    drops (RGBA counts 3 channels).
    """

    path: Path
    shape: tuple[int, ...]
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: np.ndarray
    spatial_ndim: int
    num_channels: int
    dtype: np.dtype
    alpha: bool = False

    def index_to_world(self) -> np.ndarray:
        """Homogeneous index ``(z, y, x, 1)`` -> LPS mm matrix, as `Volume.index_to_world`."""
        n = self.spatial_ndim
        steps = self.direction * np.asarray(self.spacing[::-1])[None, :]
        m = np.eye(n + 1)
        m[:n, :n] = steps[:, ::-1]
        m[:n, n] = self.origin
        return m


def read_header(path: str | os.PathLike[str]) -> ImageHeader:
    """Read only the geometry of an image: cheap for NIfTI, PNG/JPEG, ``.npy`` and ITK files.

    Other formats (DICOM, TIFF, ``.npz``) are read in full.
    """
    path = Path(path)
    kind = file_kind(path)
    if kind == "nifti":
        nib = _nib()
        try:
            img = nib.load(str(path))
            shape = tuple(int(s) for s in img.shape)
            spacing, origin, direction = nifti_affine_to_geometry(img.affine)
            dtype = img.get_data_dtype()
        except Exception as exc:
            raise InputError(
                f"cannot read the NIfTI header of {path}: {type(exc).__name__}: {exc}; the file "
                "is corrupt or not NIfTI"
            ) from exc
        if len(shape) == 5 and shape[3] == 1:
            shape = shape[:3] + shape[4:]
        shape = (shape + (1, 1, 1))[:3] if len(shape) < 3 else shape
        channels = shape[3] if len(shape) == 4 else 1
        return ImageHeader(path, shape[:3][::-1], spacing, origin, direction, 3, channels, dtype)
    if kind == "pil":
        from PIL import Image

        try:
            with Image.open(path) as img:
                width, height = img.size
                mode = img.mode
        except Exception as exc:
            raise InputError(f"cannot read image {path}: {type(exc).__name__}: {exc}") from exc
        channels = 3 if mode in ("RGB", "RGBA", "RGBX", "RGBa", "CMYK", "YCbCr", "LAB", "HSV") else 1
        dtype = np.dtype(np.uint16) if mode.startswith("I;16") else np.dtype(np.uint8)
        return ImageHeader(path, (height, width), (1.0, 1.0), (0.0, 0.0), np.eye(2), 2, channels, dtype,
                           alpha=mode in _ALPHA_MODES)
    if kind == "numpy" and path.suffix.lower() == ".npy":
        try:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        except Exception as exc:
            raise InputError(f"cannot read {path}: {type(exc).__name__}: {exc}") from exc
        vol = _array_volume(arr, path, "npy")
        return _header_of(vol, path)
    if kind == "itk":
        import SimpleITK as sitk

        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        try:
            reader.ReadImageInformation()
        except Exception as exc:
            raise InputError(f"cannot read {path}: {exc}".strip()) from exc
        dim = reader.GetDimension()
        return ImageHeader(
            path, tuple(int(s) for s in reader.GetSize()[::-1]), reader.GetSpacing()[::-1],
            reader.GetOrigin(), np.asarray(reader.GetDirection()).reshape(dim, dim), dim,
            reader.GetNumberOfComponents(), np.dtype(np.float32),
        )
    return _header_of(read_volume(path), path)


def _header_of(vol: Volume, path: Path) -> ImageHeader:
    return ImageHeader(path, vol.shape, vol.spacing, vol.origin, vol.direction, vol.spatial_ndim,
                       vol.num_channels, vol.array.dtype, alpha=bool(vol.meta.get("alpha_dropped")))
