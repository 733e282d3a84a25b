"""Decoding limits for untrusted image files: the header first, then only what it declares.

A compressed upload can declare (and really hold) far more data than its file size suggests: a
1 MB ``.nii.gz`` of zeros decodes to 1 GiB. Everything here reads headers only, so a caller can
refuse a file *before* its pixels are decompressed:

- `declared_size` / `declared_case`: shape, channels, spacing and the bytes a reader will
  allocate for a file (NIfTI header, PIL size before ``load()``, DICOM headers read with
  ``stop_before_pixels``, TIFF / NumPy / ITK headers);
- `check_voxels`: `TooLarge` when the declared voxels x channels are over a limit
  (`DEFAULT_MAX_VOXELS`: a 512 x 512 x 2000 scan);
- `read_nifti_data`: the data of a NIfTI file, decompressing a ``.nii.gz`` in chunks into a
  buffer of exactly the declared size and refusing a stream that goes on beyond it
  (`GZIP_TRAILING_SLACK`), so the decoded bytes never exceed what the header declared.

Units: voxels are counted per channel (voxels x channels); sizes are in bytes.
"""

from __future__ import annotations

import gzip
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from resunet.errors import InputError

__all__ = [
    "DEFAULT_MAX_VOXELS",
    "GZIP_TRAILING_SLACK",
    "DeclaredSize",
    "TooLarge",
    "check_voxels",
    "declared_case",
    "declared_size",
    "dicom_instance_voxels",
    "read_nifti_data",
]

#: default per-request limit, voxels x channels: a 512 x 512 x 2000 CT
DEFAULT_MAX_VOXELS = 512 * 512 * 2000
#: bytes a ``.nii.gz`` stream may hold beyond its declared data (padding some writers add)
GZIP_TRAILING_SLACK = 64 * 1024
_CHUNK = 1 << 20  # bytes decompressed per step
_DEFLATED_DICOM = "1.2.840.10008.1.2.1.99"


class TooLarge(InputError):
    """A file declares more voxels (or inflates to more bytes) than the limit allows."""


@dataclass(frozen=True)
class DeclaredSize:
    """What a file's header declares, and what reading it will cost (bytes).

    ``shape``: spatial shape in array order (as `Volume`); ``channels``: channels per voxel;
    ``spacing`` (mm) and ``direction`` as `Volume`; ``itemsize``: bytes per voxel and channel of
    the array the reader returns; ``decode_bytes``: the reader's peak allocation while decoding,
    the returned array included.
    """

    path: Path
    shape: tuple[int, ...]
    channels: int
    spacing: tuple[float, ...]
    direction: np.ndarray
    itemsize: int
    decode_bytes: int

    @property
    def voxels(self) -> int:
        """Declared voxels x channels."""
        return int(np.prod(self.shape, dtype=np.float64)) * self.channels


def check_voxels(declared: DeclaredSize, max_voxels: int, name: str | None = None,
                 flag: str = "--max-voxels") -> None:
    """`TooLarge` (naming the file, its shape and ``flag``) when ``declared.voxels > max_voxels``."""
    if declared.voxels <= max_voxels:
        return
    shape = " x ".join(str(s) for s in declared.shape)
    raise TooLarge(
        f"{name or declared.path} declares {declared.voxels} voxels x channels ({shape}, {declared.channels} "
        f"channel(s)), over the limit of {max_voxels}; crop or downsample the image, or raise {flag}"
    )


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


def dicom_instance_voxels(ds: Any) -> int:
    """Declared voxels x channels of one DICOM image dataset: Rows x Columns x frames x samples."""
    def number(keyword: str, default: int) -> int:
        try:
            return max(0, int(ds.get(keyword, default) or default))
        except (TypeError, ValueError):
            return default

    return number("Rows", 0) * number("Columns", 0) * number("NumberOfFrames", 1) * number("SamplesPerPixel", 1)


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


# --------------------------------------------------------------------------- bounded NIfTI data


def read_nifti_data(img: Any, path: Path) -> np.ndarray:
    """The data array of a nibabel image, scaled as ``np.asanyarray(img.dataobj)`` would be.

    A ``.nii.gz`` is decompressed in 1 MiB chunks straight into a buffer of the declared size
    (header shape x dtype bytes); a stream shorter than that is truncated, one that goes on more
    than `GZIP_TRAILING_SLACK` bytes beyond it is refused (`InputError`) without inflating the
    rest. Uncompressed files are read by nibabel (their size is checked against the header).
    """
    if not path.name.lower().endswith(".gz"):
        return np.asanyarray(img.dataobj)
    from nibabel.volumeutils import apply_read_scaling

    proxy = img.dataobj  # nibabel's ArrayProxy: shape, dtype, offset and order of the data
    shape, dtype = tuple(int(s) for s in proxy.shape), np.dtype(proxy.dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    buffer = np.empty(nbytes, dtype=np.uint8)
    with gzip.open(path, "rb") as fh:
        _skip(fh, int(proxy.offset), path)
        view, done = memoryview(buffer), 0
        while done < nbytes:
            n = fh.readinto(view[done:done + _CHUNK])
            if not n:
                raise InputError(f"{path}: the compressed data ends after {done} of the {nbytes} bytes its "
                                 "header declares: the file is truncated; re-export or re-copy it")
            done += n
        if len(fh.read(GZIP_TRAILING_SLACK + 1)) > GZIP_TRAILING_SLACK:
            raise InputError(
                f"{path}: the compressed stream holds more than {GZIP_TRAILING_SLACK} bytes beyond the {nbytes} "
                f"bytes of data its header declares (shape {shape}, {dtype}); the header does not describe "
                "the file (corrupt or crafted): re-export it"
            )
    data = buffer.view(dtype).reshape(shape, order=proxy.order)
    return apply_read_scaling(data, np.asanyarray(proxy.slope), np.asanyarray(proxy.inter))


def _skip(fh: Any, nbytes: int, path: Path) -> None:
    left = nbytes
    while left > 0:
        got = len(fh.read(min(left, _CHUNK)))
        if not got:
            raise InputError(f"{path}: the compressed file ends inside its header; re-export or re-copy it")
        left -= got
