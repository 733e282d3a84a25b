"""What an image file's header declares, read without decoding its pixels.

`declared_size` (one file or DICOM folder) and `declared_case` (a case's channel files) return a
`resunet.data.limits.DeclaredSize`: shape, channels, spacing and the bytes the reader will
allocate. Per format: NIfTI header (nibabel, data not loaded), PIL size and mode before
``load()``, DICOM headers read with ``stop_before_pixels`` (Rows x Columns x frames summed over
the files; a deflated dataset is inflated in chunks only to count it, because pydicom inflates it
whole even for a header), TIFF / ``.npy`` / ``.npz`` / ITK headers.
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from resunet.data.limits import DEFAULT_MAX_VOXELS, DeclaredSize, TooLarge, dicom_instance_voxels
from resunet.errors import InputError

__all__ = ["declared_case", "declared_size"]

_CHUNK = 1 << 20  # bytes inflated per step while counting
_DEFLATED_DICOM = "1.2.840.10008.1.2.1.99"


# --------------------------------------------------------------------------- per format


def _nifti_size(path: Path) -> DeclaredSize:
    import nibabel as nib

    from resunet.data.io import read_header

    header = read_header(path)  # geometry; also refuses an unreadable header
    img = nib.load(str(path))
    raw = img.get_data_dtype().itemsize
    slope, inter = img.dataobj.slope, img.dataobj.inter
    scaled = not (slope in (1.0, None) and inter in (0.0, None))
    itemsize = 8 if scaled else raw
    voxels = int(np.prod(header.shape, dtype=np.float64)) * header.num_channels
    # raw buffer, scaled copy, the reader's contiguous (Z, Y, X) copy
    decode = voxels * (raw + (8 if scaled else 0) + itemsize)
    return DeclaredSize(path, header.shape, header.num_channels, tuple(header.spacing), header.direction,
                        itemsize, decode)


def _picture_size(path: Path) -> DeclaredSize:
    from resunet.data.io import read_header

    header = read_header(path)  # PIL: size and mode before load()
    pixels = int(np.prod(header.shape, dtype=np.float64))
    item = header.dtype.itemsize
    # Pillow's own buffer (4 bytes per pixel for colour), a converted copy, two numpy copies and
    # the channels-first copy
    decode = pixels * (8 + 3 * header.num_channels * item)
    return DeclaredSize(path, header.shape, header.num_channels, tuple(header.spacing), header.direction,
                        item, decode)


def _tiff_size(path: Path) -> DeclaredSize:
    import tifffile

    try:
        with tifffile.TiffFile(str(path)) as tif:
            series = tif.series[0]
            shape, dtype = tuple(int(s) for s in series.shape), np.dtype(series.dtype)
    except Exception as exc:
        raise InputError(f"cannot read the TIFF header of {path}: {type(exc).__name__}: {exc}") from exc
    return _array_size(path, shape, dtype)


def _array_size(path: Path, shape: tuple[int, ...], dtype: np.dtype) -> DeclaredSize:
    """A bare array's declared size: ``(H, W)``, ``(H, W, 3|4)``, ``(D, H, W)`` or ``(C, D, H, W)``."""
    if len(shape) == 3 and shape[-1] in (3, 4):
        spatial, channels = shape[:2], 3
    elif len(shape) == 4:
        spatial, channels = shape[1:], shape[0]
    else:
        spatial, channels = shape, 1
    n = len(spatial)
    total = int(np.prod(shape, dtype=np.float64))
    return DeclaredSize(path, tuple(spatial), int(channels), (1.0,) * n, np.eye(n), dtype.itemsize,
                        2 * total * dtype.itemsize)


def _numpy_size(path: Path) -> DeclaredSize:
    import zipfile

    try:
        if path.suffix.lower() == ".npy":
            with open(path, "rb") as fh:
                shape, dtype = _npy_header(fh)
        else:
            with zipfile.ZipFile(path) as zf:
                names = [n for n in zf.namelist() if n.endswith(".npy")]
                key = "array.npy" if "array.npy" in names else None
                data = [n for n in names if n[:-4] not in ("spacing", "origin", "direction", "spatial_ndim")]
                key = key or (data[0] if len(data) == 1 else None)
                if key is None:
                    raise ValueError(f"holds {names}, no single image array")
                with zf.open(key) as fh:
                    shape, dtype = _npy_header(fh)
    except Exception as exc:
        raise InputError(f"cannot read the array header of {path}: {type(exc).__name__}: {exc}") from exc
    return _array_size(path, shape, dtype)


def _npy_header(fh: Any) -> tuple[tuple[int, ...], np.dtype]:
    fmt = np.lib.format
    version = fmt.read_magic(fh)
    reader = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
    shape, _, dtype = reader(fh)
    return tuple(int(s) for s in shape), np.dtype(dtype)


def _itk_size(path: Path) -> DeclaredSize:
    from resunet.data.io import read_header

    h = read_header(path)  # SimpleITK ReadImageInformation
    voxels = int(np.prod(h.shape, dtype=np.float64)) * h.num_channels
    return DeclaredSize(path, h.shape, h.num_channels, tuple(h.spacing), h.direction, 8, 3 * 8 * voxels)


# --------------------------------------------------------------------------- DICOM


def _inflated_size(path: Path, data_offset: int, cap: int) -> int:
    """Bytes the deflated dataset of a DICOM file (from ``data_offset``) inflates to, counted in
    chunks without keeping them; stops once more than ``cap`` bytes came out."""
    inflater, total = zlib.decompressobj(-zlib.MAX_WBITS), 0
    with open(path, "rb") as fh:
        fh.seek(data_offset)
        while total <= cap and (chunk := fh.read(_CHUNK)):
            while chunk and total <= cap:
                total += len(inflater.decompress(chunk, _CHUNK))
                chunk = inflater.unconsumed_tail
    return total


def _dicom_header(path: Path, cap: int) -> tuple[Any, int]:
    """Header (no pixels) of one DICOM file and the bytes reading it costs beyond its pixels."""
    import pydicom

    from resunet.data.dicom import _looks_like_dicom

    marker, raw = _looks_like_dicom(path)
    if not (marker or raw):
        return None, 0
    extra = 0
    try:
        if marker:
            meta = pydicom.filereader.read_file_meta_info(str(path))
            if str(meta.get("TransferSyntaxUID", "")) == _DEFLATED_DICOM:
                # preamble + "DICM" + the (0002,0000) group length element + the group it counts
                offset = 132 + 12 + int(meta.get("FileMetaInformationGroupLength", 0))
                extra = _inflated_size(path, offset, cap)  # pydicom inflates the whole dataset in memory
                if extra > cap:
                    raise TooLarge(f"{path}: its deflated dataset inflates to more than {cap} bytes; "
                                   "re-export it uncompressed, or raise --max-voxels")
        return pydicom.dcmread(str(path), stop_before_pixels=True, force=raw), extra
    except TooLarge:
        raise
    except Exception:
        return None, 0  # not DICOM after all / unreadable: the reader reports it


def _dicom_size(path: Path, max_voxels: int) -> DeclaredSize:
    from resunet.data.dicom import _files_below

    files = _files_below(path) if path.is_dir() else [path]
    voxels, extra, first = 0, 0, None
    for f in files:
        ds, inflated = _dicom_header(f, cap=8 * max_voxels)
        if ds is None or "Rows" not in ds:
            continue
        first = first or ds
        voxels += dicom_instance_voxels(ds)
        extra = max(extra, 2 * inflated)
    if first is None:
        return DeclaredSize(path, (0, 0, 0), 1, (1.0, 1.0, 1.0), np.eye(3), 2, 0)
    rows, cols = int(first.get("Rows", 0) or 0), int(first.get("Columns", 0) or 0)
    depth = voxels // max(1, rows * cols)
    try:
        dy, dx = (float(v) for v in first.get("PixelSpacing", (1.0, 1.0)))
        dz = float(first.get("SpacingBetweenSlices", first.get("SliceThickness", 1.0)) or 1.0)
    except (TypeError, ValueError):
        dz, dy, dx = 1.0, 1.0, 1.0
    # stored pixels, int64 rescaling buffer, the int16/float32 result; plus an inflated dataset
    decode = voxels * (2 + 8 + 4) + extra
    return DeclaredSize(path, (depth, rows, cols), 1, (dz, dy, dx), _dicom_direction(first), 4, decode)


def _dicom_direction(ds: Any) -> np.ndarray:
    try:
        o = np.asarray([float(v) for v in ds.ImageOrientationPatient], dtype=np.float64)
        normal = np.cross(o[:3], o[3:])
        if o.size == 6 and np.linalg.norm(normal) > 1e-6:
            return np.stack([o[:3], o[3:], normal / np.linalg.norm(normal)], axis=1)
    except Exception:
        pass
    return np.eye(3)


# --------------------------------------------------------------------------- entry points


def declared_size(path: str | os.PathLike[str], max_voxels: int = DEFAULT_MAX_VOXELS) -> DeclaredSize:
    """What the header of ``path`` (file or DICOM folder) declares; no pixel data is decoded.

    ``max_voxels`` only bounds how far a deflated DICOM dataset is inflated while counting it.
    """
    from resunet.data.io import file_kind

    path = Path(path)
    kind = file_kind(path)
    if kind == "dicom":
        return _dicom_size(path, max_voxels)
    reader = {"nifti": _nifti_size, "pil": _picture_size, "tiff": _tiff_size, "numpy": _numpy_size,
              "itk": _itk_size}[kind]
    return reader(path)


def declared_case(paths: Sequence[str | os.PathLike[str]], max_voxels: int = DEFAULT_MAX_VOXELS) -> DeclaredSize:
    """`declared_size` of a case's channel files together: channels and decode bytes add up."""
    sizes = [declared_size(p, max_voxels) for p in paths]
    first = sizes[0]
    return DeclaredSize(
        first.path, first.shape, sum(s.channels for s in sizes), first.spacing, first.direction,
        max(s.itemsize for s in sizes), sum(s.decode_bytes for s in sizes),
    )


