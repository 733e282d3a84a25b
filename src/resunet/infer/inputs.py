"""Find the cases in what a user passes to ``resunet predict -i``.

- a single image file (NIfTI, PNG/JPG, ...) -> one case;
- a DICOM series folder -> one case; a folder of DICOM series folders -> one case per folder;
- a folder of image files: nnU-Net naming ``CASE_0000.nii.gz``, ``CASE_0001.nii.gz`` (channels)
  groups files into cases; other names are one case per file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from resunet.data.io import file_kind
from resunet.errors import InputError

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".mha", ".nrrd", ".npy", ".npz")
_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


@dataclass
class InputCase:
    """One case to predict: its id, its channel files (or one DICOM folder) and the output suffix."""

    case_id: str
    paths: list[Path]
    kind: str  # "dicom" or the reader name of the files
    suffix: str  # output extension: the input's (".nii.gz", ".png", ...) or ".dcm" for DICOM SEG


def _split_suffix(path: Path) -> tuple[str, str]:
    name = path.name
    for s in IMAGE_SUFFIXES:
        if name.lower().endswith(s):
            return name[: -len(s)], s
    return path.stem, path.suffix


def _is_dicom_folder(folder: Path) -> bool:
    for p in folder.iterdir():
        if p.is_file():
            try:
                if file_kind(p) == "dicom":
                    return True
            except InputError:
                continue
    return False


def discover_inputs(path: Path, num_channels: int = 1) -> list[InputCase]:
    """Cases under ``path`` (see the module docstring); `InputError` when there are none."""
    path = Path(path)
    if not path.exists():
        raise InputError(
            f"input {path} does not exist; pass an image file, a DICOM series folder or a folder of cases"
        )
    if path.is_file():
        kind = file_kind(path)
        stem, suffix = _split_suffix(path)
        if kind == "dicom":
            return [InputCase(stem, [path], "dicom", ".dcm")]
        m = _CHANNEL.match(stem)
        if num_channels > 1:
            if not m:
                raise InputError(f"the model needs {num_channels} channels; name the files CASE_0000{suffix}, "
                                 f"CASE_0001{suffix}, ... and pass the folder instead of {path}")
            return [c for c in discover_inputs(path.parent, num_channels) if c.case_id == m["case"]]
        return [InputCase(m["case"] if m else stem, [path], kind, suffix)]
    if _is_dicom_folder(path):
        return [InputCase(path.name, [path], "dicom", ".dcm")]
    subdirs = sorted(p for p in path.iterdir() if p.is_dir() and _is_dicom_folder(p))
    files = sorted(p for p in path.iterdir() if p.is_file() and _split_suffix(p)[1].lower() in IMAGE_SUFFIXES)
    cases = [InputCase(d.name, [d], "dicom", ".dcm") for d in subdirs]
    groups: dict[str, dict[int, Path]] = {}
    singles = []
    for f in files:
        stem, suffix = _split_suffix(f)
        m = _CHANNEL.match(stem)
        if m:
            groups.setdefault(m["case"], {})[int(m["channel"])] = f
        else:
            singles.append(f)
    problems = []
    for case, channels in sorted(groups.items()):
        expected = list(range(num_channels))
        if sorted(channels) != expected:
            problems.append(f"{case}: channels {sorted(channels)} found, the model needs {expected}")
            continue
        first = channels[0]
        cases.append(InputCase(case, [channels[i] for i in expected], file_kind(first), _split_suffix(first)[1]))
    for f in singles:
        if num_channels > 1:
            problems.append(f"{f.name}: the model needs {num_channels} channels named CASE_0000.., CASE_0001..")
            continue
        stem, suffix = _split_suffix(f)
        cases.append(InputCase(stem, [f], file_kind(f), suffix))
    if problems:
        raise InputError(f"input folder {path} has cases that do not fit the model:\n  " + "\n  ".join(problems))
    if not cases:
        raise InputError(f"no images found in {path}; supported: {', '.join(IMAGE_SUFFIXES)} files or DICOM series folders")
    return cases
