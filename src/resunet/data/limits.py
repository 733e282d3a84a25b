"""Decoding limits for untrusted image files: refuse what a header declares too large, and never
inflate more than it declares.

A compressed upload can declare (and really hold) far more data than its file size suggests: a
1 MB ``.nii.gz`` of zeros decodes to 1 GiB. `resunet.data.headers` reads what a file declares
(`DeclaredSize`) without decoding its pixels; here:

- `check_voxels`: `TooLarge` when the declared voxels x channels are over a limit
  (`DEFAULT_MAX_VOXELS`: a 512 x 512 x 2000 scan);
- `read_nifti_data`: the data of a NIfTI file (the hook of `resunet.data.io`), decompressing a
  ``.nii.gz`` in chunks into a buffer of exactly the declared size and refusing a stream that goes
  on beyond it (`GZIP_TRAILING_SLACK`), so the decoded bytes never exceed what the header declared;
- `dicom_instance_voxels`: Rows x Columns x frames x samples of one DICOM dataset.

Units: voxels are counted per channel (voxels x channels); sizes are in bytes.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from resunet.errors import InputError

__all__ = [
    "DEFAULT_MAX_VOXELS",
    "GZIP_TRAILING_SLACK",
    "DeclaredSize",
    "TooLarge",
    "check_voxels",
    "dicom_instance_voxels",
    "read_nifti_data",
]

#: default per-request limit, voxels x channels: a 512 x 512 x 2000 CT
DEFAULT_MAX_VOXELS = 512 * 512 * 2000
#: bytes a ``.nii.gz`` stream may hold beyond its declared data (padding some writers add)
GZIP_TRAILING_SLACK = 64 * 1024
_CHUNK = 1 << 20  # bytes decompressed per step


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


def dicom_instance_voxels(ds: Any) -> int:
    """Declared voxels x channels of one DICOM image dataset: Rows x Columns x frames x samples."""
    def number(keyword: str, default: int) -> int:
        try:
            return max(0, int(ds.get(keyword, default) or default))
        except (TypeError, ValueError):
            return default

    return number("Rows", 0) * number("Columns", 0) * number("NumberOfFrames", 1) * number("SamplesPerPixel", 1)


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
