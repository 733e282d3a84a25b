"""Reading, preprocessing, sampling and augmenting medical images.

The everyday entry points: `Volume` (array + geometry), `read_volume` / `write_volume` / `read_header`
(NIfTI, DICOM series, PNG/JPG, MHA/NRRD), `find_dataset` / `validate_dataset` (nnU-Net, Decathlon,
images+masks folders), `PreprocessConfig` / `preprocess_case` (normalise, reorient, crop, resample).
Augmentation lives in `resunet.data.augment`, slice / patch sampling in `resunet.data.sampling`.
"""

from resunet.data.datasets import DatasetInfo, find_dataset, validate_dataset
from resunet.data.io import read_header, read_volume, write_volume
from resunet.data.preprocess import PreprocessConfig, preprocess_case, restore_original_geometry
from resunet.data.volume import Volume

__all__ = [
    "DatasetInfo",
    "PreprocessConfig",
    "Volume",
    "find_dataset",
    "preprocess_case",
    "read_header",
    "read_volume",
    "restore_original_geometry",
    "validate_dataset",
    "write_volume",
]
