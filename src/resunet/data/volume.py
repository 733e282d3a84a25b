"""`Volume`: an image or label array together with its geometry in millimetres.

Conventions (the same as SimpleITK / DICOM, so DICOM and NIfTI share one code path):

- ``array`` is indexed ``(D, H, W)`` = ``(z, y, x)`` for 3-D and ``(H, W)`` for 2-D images.
  Images with several channels (RGB PNG, several MR modalities) carry a leading channel axis:
  ``(C, D, H, W)`` / ``(C, H, W)``; ``spatial_ndim`` says how many trailing axes are spatial.
- ``spacing`` is in mm, in array order ``(z, y, x)`` (``(y, x)`` for 2-D).
- ``origin`` is the world position (LPS, mm, as ``(x, y, z)``) of voxel ``[0, 0, 0]``.
- ``direction`` is the 3x3 (2x2 for 2-D) matrix whose COLUMNS are the LPS unit vectors of the
  index axes in ITK order ``(i=x/W, j=y/H, k=z/D)``, exactly what SimpleITK's GetDirection returns.
- ``meta`` holds what a writer needs to put results back where they came from
  (``"format"``; NIfTI: ``"nifti_affine"``, ``"nifti_header"``; DICOM: ``"study_uid"``,
  ``"series_uid"``, ``"frame_of_reference_uid"``, ``"sop_instance_uids"`` and
  ``"slice_positions"`` in array order, ``"files"``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np


@dataclass
class Volume:
    """An array with its geometry; see the module docstring for axis and unit conventions."""

    array: np.ndarray
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: np.ndarray
    spatial_ndim: int = 3
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.spacing = tuple(float(s) for s in self.spacing)
        self.origin = tuple(float(o) for o in self.origin)
        self.direction = np.asarray(self.direction, dtype=np.float64).reshape(
            self.spatial_ndim, self.spatial_ndim
        )
        if self.array.ndim not in (self.spatial_ndim, self.spatial_ndim + 1):
            raise ValueError(
                f"array of shape {self.array.shape} does not fit spatial_ndim={self.spatial_ndim}"
            )
        if len(self.spacing) != self.spatial_ndim or len(self.origin) != self.spatial_ndim:
            raise ValueError("spacing and origin need one value per spatial axis")

    @property
    def shape(self) -> tuple[int, ...]:
        """Spatial shape in array order, ``(D, H, W)`` or ``(H, W)``."""
        return tuple(self.array.shape[-self.spatial_ndim :])

    @property
    def num_channels(self) -> int:
        return 1 if self.array.ndim == self.spatial_ndim else int(self.array.shape[0])

    def index_to_world(self) -> np.ndarray:
        """Homogeneous matrix mapping array indices ``(z, y, x, 1)`` to LPS mm ``(x, y, z, 1)``."""
        n = self.spatial_ndim
        itk_spacing = np.asarray(self.spacing[::-1])  # (x, y, z)
        m = np.eye(n + 1)
        # column j of direction*spacing is the step of ITK index j; array axis a = n-1-j
        steps = self.direction * itk_spacing[None, :]
        m[:n, :n] = steps[:, ::-1]
        m[:n, n] = self.origin
        return m

    def same_geometry(self, other: "Volume", atol: float = 1e-4) -> bool:
        """True when shape, spacing, origin and direction agree (within ``atol`` mm)."""
        return (
            self.shape == other.shape
            and np.allclose(self.spacing, other.spacing, atol=atol)
            and np.allclose(self.origin, other.origin, atol=atol)
            and np.allclose(self.direction, other.direction, atol=atol)
        )

    def with_array(self, array: np.ndarray) -> "Volume":
        """A copy with the same geometry and metadata and a new array (e.g. a mask)."""
        return replace(self, array=array, meta=dict(self.meta))
