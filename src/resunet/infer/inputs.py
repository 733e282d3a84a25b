"""Find the cases in what a user passes to ``resunet predict -i``.

- a single image file (NIfTI, PNG/JPG, ...) -> one case;
- a DICOM series folder -> one case; a folder of DICOM series folders -> one case per folder;
- a folder of image files: one case per file, or per group of nnU-Net channel files
  ``CASE_0000.nii.gz``, ``CASE_0001.nii.gz``, ... -- how a case's channels are found (an RGB
  picture is 3 channels, a grey one 1) is the rule of `resunet.data.channels`.

Picture inputs (PNG, JPEG, BMP, TIFF) get PNG masks named after the input (``a.jpg`` -> ``a.png``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from resunet.data.channels import CHANNEL_FILE, PICTURE_SUFFIXES, channel_mismatch, file_channels, group_case_files
from resunet.data.io import file_kind
from resunet.errors import InputError

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".mha", ".nrrd", ".npy", ".npz")


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


def _output_suffix(suffix: str) -> str:
    """The mask's extension for an input extension: pictures get ``.png``, others keep theirs."""
    return ".png" if suffix.lower() in PICTURE_SUFFIXES else suffix


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
    """Cases under ``path`` for a model needing ``num_channels`` channels (see the module docstring).

    `InputError` when there are none, or when a case does not fit the model (the message names
    the file, what it holds and what the model needs).
    """
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
        m = CHANNEL_FILE.match(stem)
        held = file_channels(path)
        if held == num_channels:  # the file holds the whole case (a grey or an RGB picture, a 4-D NIfTI)
            case_id = m["case"] if m and (num_channels == 1 or m["channel"] == "0000") else stem
            return [InputCase(case_id, [path], kind, _output_suffix(suffix))]
        if m and held < num_channels:  # one channel file of a case: the case is its channel files
            return [c for c in discover_inputs(path.parent, num_channels) if c.case_id == m["case"]]
        raise InputError(channel_mismatch([path], held, num_channels))
    if _is_dicom_folder(path):
        return [InputCase(path.name, [path], "dicom", ".dcm")]
    subdirs = sorted(p for p in path.iterdir() if p.is_dir() and _is_dicom_folder(p))
    files = sorted(p for p in path.iterdir() if p.is_file() and _split_suffix(p)[1].lower() in IMAGE_SUFFIXES)
    cases = [InputCase(d.name, [d], "dicom", ".dcm") for d in subdirs]
    grouped, problems = group_case_files([(_split_suffix(f)[0], f) for f in files], num_channels)
    for case_id, paths in grouped:
        cases.append(InputCase(case_id, paths, file_kind(paths[0]), _output_suffix(_split_suffix(paths[0])[1])))
    if problems:
        raise InputError(f"input folder {path} has cases that do not fit the model:\n  " + "\n  ".join(problems))
    if not cases:
        raise InputError(f"no images found in {path}; supported: {', '.join(IMAGE_SUFFIXES)} files or DICOM series folders")
    return cases
