"""Find the cases in what a user passes to ``resunet predict -i``.

- a single image file (NIfTI, PNG/JPG, ...) -> one case;
- a DICOM series folder -> one case; a folder of DICOM series folders -> one case per folder;
- a folder of image files: one case per file, or per group of nnU-Net channel files
  ``CASE_0000.nii.gz``, ``CASE_0001.nii.gz``, ... -- how a case's channels are found (an RGB
  picture is 3 channels, a grey one 1) is the rule of `resunet.data.channels`.

Picture inputs (PNG, JPEG, BMP, TIFF) get PNG masks named after the input (``a.jpg`` -> ``a.png``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from resunet.data.channels import (
    CHANNEL_FILE,
    PICTURE_SUFFIXES,
    channel_mismatch,
    file_channels,
    group_case_files,
    missing_channels,
)
from resunet.data.io import file_kind
from resunet.errors import InputError

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".mha", ".nrrd", ".npy", ".npz")


@dataclass
class InputCase:
    """One case to predict: its id, its channel files (or one DICOM folder) and the output suffix;
    ``missing``: the channel indices it has no file for (``CASE_0001.nii.gz`` absent -> ``[1]``)."""

    case_id: str
    paths: list[Path]
    kind: str  # "dicom" or the reader name of the files
    suffix: str  # output extension: the input's (".nii.gz", ".png", ...) or ".dcm" for DICOM SEG
    missing: list[int] = field(default_factory=list)

    def missing_files(self) -> list[str]:
        """The names of the channel files the case lacks (``CASE_0001.nii.gz``)."""
        ending = _split_suffix(self.paths[0])[1] if self.paths else ""
        return [f"{self.case_id}_{c:04d}{ending}" for c in self.missing]


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


def discover_inputs(path: Path, num_channels: int = 1, *, missing_ok: bool = False,
                    channel_names: Sequence[str] = ()) -> list[InputCase]:
    """Cases under ``path`` for a model needing ``num_channels`` channels (see the module docstring).

    `InputError` when there are none, or when a case does not fit the model (the message names
    the file, what it holds and what the model needs). A case of channel files that lacks some
    (``CASE_0001.nii.gz`` absent) is returned with ``missing`` set when ``missing_ok`` (a model
    trained with modality dropout), else refused naming the absent file and the channels
    (``channel_names``: the model's name of each, when known).
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
            found = discover_inputs(path.parent, num_channels, missing_ok=missing_ok, channel_names=channel_names)
            return [c for c in found if c.case_id == m["case"]]
        raise InputError(channel_mismatch([path], held, num_channels))
    if _is_dicom_folder(path):
        return [InputCase(path.name, [path], "dicom", ".dcm")]
    subdirs = sorted(p for p in path.iterdir() if p.is_dir() and _is_dicom_folder(p))
    files = sorted(p for p in path.iterdir() if p.is_file() and _split_suffix(p)[1].lower() in IMAGE_SUFFIXES)
    cases = [InputCase(d.name, [d], "dicom", ".dcm") for d in subdirs]
    grouped, problems = group_case_files([(_split_suffix(f)[0], f) for f in files], num_channels, partial=True)
    for case_id, paths in grouped:
        case = InputCase(case_id, paths, file_kind(paths[0]), _output_suffix(_split_suffix(paths[0])[1]),
                         missing_channels(case_id, paths, num_channels))
        if case.missing and not missing_ok:
            problems.append(_missing_problem(case, num_channels, channel_names))
        else:
            cases.append(case)
    if problems:
        raise InputError(f"input folder {path} has cases that do not fit the model:\n  " + "\n  ".join(problems))
    if not cases:
        raise InputError(f"no images found in {path}; supported: {', '.join(IMAGE_SUFFIXES)} files or DICOM series folders")
    return cases


def _missing_problem(case: InputCase, needed: int, names: Sequence[str]) -> str:
    """Why a case lacking channel files is refused, and what would predict it."""
    ending = _split_suffix(case.paths[0])[1]
    known = len(names) == needed and any(n != str(i) for i, n in enumerate(names))
    channels = ", ".join(f"{case.case_id}_{i:04d}{ending}" + (f" ({names[i]})" if known else "") for i in range(needed))
    absent = ", ".join(case.missing_files())
    verb = "is" if len(case.missing) == 1 else "are"
    return (f"{case.case_id}: {absent} {verb} missing; the model needs {needed} channels per case: {channels}. "
            f"Add the file, or use a model trained with augment.modality_dropout > 0, which can predict "
            f"without a channel (zero-filled)")
