"""Find the cases of a segmentation dataset on disk and check them before training.

Three layouts are recognised by `find_dataset`:

``nnunet`` (nnU-Net v2 raw)
    ``dataset.json`` with ``channel_names`` ``{"0": "CT", ...}``, ``labels`` ``{name: int}``
    (``background: 0``), ``numTraining`` and ``file_ending``; ``imagesTr/CASE_0000<ending>`` (one
    file per channel, ``_0000``, ``_0001`` ...), ``labelsTr/CASE<ending>`` and optional
    ``imagesTs/``. `Case.images` has one path per channel.
``msd`` (Medical Segmentation Decathlon)
    ``dataset.json`` with ``modality`` ``{"0": "FLAIR", ...}``, ``labels`` ``{"0": "background",
    ...}``, ``training: [{"image": ..., "label": ...}]`` and ``test: [...]``. One image file holds
    every channel (4-D NIfTI, channels on the last axis), so `Case.images` has one path.
``images_masks`` (Kvasir-SEG style)
    ``images/`` and ``masks/`` folders of 2-D pictures (PNG, JPEG, BMP, TIFF) paired by file stem;
    an RGB(A) picture is 3 channels R, G, B, a grey one 1 (the rule of `resunet.data.channels`).
    Labels are ``{"background": 0, "foreground": 1}`` unless an optional ``dataset.json`` holds
    ``labels``. Mask rule (`read_label`): JPEG masks (lossy, typically 0/255 with compression
    noise) are binarised at ``> 127`` after taking the maximum over colour channels; PNG/BMP/TIFF
    masks are label indices and are kept as they are, except that a binary dataset's mask whose
    values exceed 1 (a 0/255 PNG) is binarised at ``> 127`` too.

`find_dataset` is lenient: it records what it cannot make sense of in `DatasetInfo.problems`
and lists every expected file in the cases, present or not. `validate_dataset` then checks the
files (cheaply, headers only, except for label values) and raises ONE `InputError` that lists
every problem.

Unlabelled images (semi-supervised training, ``find_dataset(root, unlabelled=True)``)
    A training image without a label is an error unless the caller asks for unlabelled images;
    then it moves from `DatasetInfo.training` to `DatasetInfo.unlabelled`, with the images of an
    optional ``imagesUnlabelled/`` folder. Per layout: ``nnunet``, images in ``imagesTr/`` whose
    ``labelsTr/CASE<ending>`` is missing, plus ``imagesUnlabelled/CASE_0000<ending>`` ... (the
    channel naming of ``imagesTr/``); ``msd``, ``training`` entries without ``"label"`` (or whose
    label file is missing), plus ``imagesUnlabelled/*.nii.gz`` (one file per case, every channel
    in it, as ``imagesTr/``); ``images_masks``, pictures in ``images/`` without a mask. An
    unlabelled case is never in ``training`` (so never in a training or validation split), and
    its case id must differ from every labelled one (the preprocessed cache is keyed by id).
    ``numTraining`` may count either the labelled cases only (nnU-Net's meaning) or all of them.
"""

from __future__ import annotations

import json
import os
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from resunet.data.channels import CHANNEL_FILE, channel_names, file_channels, split_channels
from resunet.data.io import ImageHeader, read_header, read_volume
from resunet.data.volume import Volume
from resunet.errors import InputError

__all__ = [
    "Case",
    "DatasetInfo",
    "LAYOUTS",
    "UNLABELLED_FOLDER",
    "find_dataset",
    "load_case",
    "read_label",
    "validate_dataset",
]

LAYOUTS = ("nnunet", "msd", "images_masks")
PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
_LOSSY_SUFFIXES = (".jpg", ".jpeg")
_GEOMETRY_RTOL = 1e-5
_GEOMETRY_ATOL = 1e-4  # mm (and direction cosines)


@dataclass
class Case:
    """One case: its image file(s) and its label file.

    ``images``: nnU-Net layout, one file per channel in channel order; MSD and image/mask
    layouts, one file holding every channel. Paths are where the files are expected, whether or
    not they exist (`validate_dataset` checks). ``label`` is ``None`` for test and unlabelled
    cases and for training images whose mask (or MSD ``"label"`` entry) could not be found.
    """

    case_id: str
    images: list[Path]
    label: Path | None


@dataclass
class DatasetInfo:
    """A dataset found on disk.

    ``labels`` maps label name -> integer value, background 0. ``file_ending`` is the image file
    ending (``.nii.gz``, ``.png`` ...). ``problems`` lists what discovery already found wrong.
    ``unlabelled``: image-only cases, filled only by ``find_dataset(root, unlabelled=True)``;
    ``unlabelled_sources`` counts them per origin (e.g. ``{"imagesTr without label": 3,
    "imagesUnlabelled/": 10}``).
    """

    root: Path
    layout: str
    channel_names: list[str]
    labels: dict[str, int]
    file_ending: str
    training: list[Case]
    test: list[Case]
    dataset_json: Path | None = None
    problems: list[str] = field(default_factory=list)
    unlabelled: list[Case] = field(default_factory=list)
    unlabelled_sources: dict[str, int] = field(default_factory=dict)

    @property
    def num_channels(self) -> int:
        return len(self.channel_names)

    @property
    def channels_in_one_file(self) -> bool:
        """True when one image file holds every channel (MSD, image/mask layouts)."""
        return self.layout != "nnunet"


# --------------------------------------------------------------------------- helpers


def _visible_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def _load_json(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read {path}: {exc}") from exc
    if not text.strip():
        raise InputError(f"{path} is empty; it must hold the dataset description (a JSON object)")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(
            f"{path} is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}; fix "
            "the file"
        ) from exc
    if not isinstance(data, dict):
        raise InputError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def _index_dict(value: Any, key: str, path: Path, problems: list[str]) -> list[str]:
    """Parse ``{"0": "CT", "1": "PET"}`` into ``["CT", "PET"]``; record problems."""
    if not isinstance(value, dict) or not value:
        problems.append(
            f"{path}: key {key!r} must be a non-empty object like {{\"0\": \"CT\"}}, got {value!r}"
        )
        return []
    try:
        items = sorted((int(k), str(v)) for k, v in value.items())
    except (TypeError, ValueError):
        problems.append(f"{path}: the keys of {key!r} must be channel indices \"0\", \"1\", ...")
        return [str(v) for v in value.values()]
    if [i for i, _ in items] != list(range(len(items))):
        problems.append(
            f"{path}: the keys of {key!r} must be 0, 1, ..., {len(items) - 1} without gaps, got "
            f"{[i for i, _ in items]}"
        )
    return [name for _, name in items]


def _check_background(labels: dict[str, int], path: Path, problems: list[str]) -> None:
    if labels and 0 not in labels.values():
        problems.append(f"{path}: 'labels' must contain the background with value 0, e.g. \"background\": 0")
    values = list(labels.values())
    if len(set(values)) != len(values):
        problems.append(f"{path}: 'labels' gives the same value to several names: {labels}")


def _strip_ending(name: str, ending: str) -> str | None:
    return name[: -len(ending)] if ending and name.lower().endswith(ending.lower()) else None


def _rel(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


# --------------------------------------------------------------------------- nnU-Net v2


def _guess_ending(folder: Path) -> str:
    counts: dict[str, int] = defaultdict(int)
    for p in _visible_files(folder):
        name = p.name.lower()
        ending = ".nii.gz" if name.endswith(".nii.gz") else p.suffix.lower()
        counts[ending] += 1
    return max(counts, key=counts.__getitem__) if counts else ".nii.gz"


def _parse_nnunet_labels(value: Any, path: Path, problems: list[str]) -> dict[str, int]:
    if not isinstance(value, dict) or not value:
        problems.append(
            f"{path}: key 'labels' must be an object {{name: value}} like "
            f"{{\"background\": 0, \"tumor\": 1}}, got {value!r}"
        )
        return {}
    labels: dict[str, int] = {}
    for name, v in value.items():
        if isinstance(v, bool) or not isinstance(v, int):
            if isinstance(v, list):
                problems.append(
                    f"{path}: label {name!r} is a region {v} (region-based nnU-Net training); "
                    "resunet needs one integer per label"
                )
            else:
                problems.append(f"{path}: label {name!r} must be an integer, got {v!r}")
            continue
        labels[str(name)] = int(v)
    _check_background(labels, path, problems)
    return labels


def _nnunet_cases(
    folder: Path, ending: str, n_channels: int, root: Path, problems: list[str]
) -> dict[str, dict[int, Path]]:
    cases: dict[str, dict[int, Path]] = defaultdict(dict)
    for p in _visible_files(folder):
        stem = _strip_ending(p.name, ending)
        if stem is None:
            problems.append(
                f"{_rel(p, root)}: does not end with file_ending {ending!r} of dataset.json; "
                "rename it or fix file_ending"
            )
            continue
        m = CHANNEL_FILE.match(stem)
        if m is None:
            problems.append(
                f"{_rel(p, root)}: name must be CASE_XXXX{ending} (XXXX = 4-digit channel index, "
                f"e.g. {stem}_0000{ending})"
            )
            continue
        channel = int(m.group("channel"))
        if n_channels and channel >= n_channels:
            problems.append(
                f"{_rel(p, root)}: channel {channel} but dataset.json channel_names has only "
                f"{n_channels} channel(s)"
            )
            continue
        cases[m.group("case")][channel] = p
    return cases


def _files_per_case(cases: dict[str, dict[int, Path]], n_channels: int) -> int:
    """Files per case: one per channel, except that one picture may hold all of them.

    nnU-Net's natural-image reader takes an RGB ``CASE_0000.png`` as channels R, G, B (the rule
    of `resunet.data.channels`).
    """
    first = next((chans[0] for chans in cases.values() if 0 in chans), None)
    if first is None or n_channels <= 1 or first.suffix.lower() not in PICTURE_SUFFIXES:
        return n_channels
    if any(len(chans) > 1 for chans in cases.values()):
        return n_channels
    try:
        k = file_channels(first)
    except InputError:
        return n_channels
    return n_channels // k if k > 1 and n_channels % k == 0 else n_channels


def _find_nnunet(root: Path, js: Path, data: dict[str, Any]) -> DatasetInfo:
    problems: list[str] = []
    for key in ("channel_names", "labels", "numTraining", "file_ending"):
        if key not in data:
            problems.append(f"{js}: missing key {key!r} (nnU-Net v2 dataset.json)")
    channel_names = (
        _index_dict(data["channel_names"], "channel_names", js, problems)
        if "channel_names" in data else []
    )
    labels = _parse_nnunet_labels(data["labels"], js, problems) if "labels" in data else {}
    ending = data.get("file_ending")
    if "file_ending" in data and (not isinstance(ending, str) or not ending.startswith(".")):
        problems.append(f"{js}: 'file_ending' must be a string like \".nii.gz\", got {ending!r}")
        ending = None
    if not isinstance(ending, str) or not ending:
        ending = _guess_ending(root / "imagesTr")

    images_tr, labels_tr, images_ts = root / "imagesTr", root / "labelsTr", root / "imagesTs"
    if not images_tr.is_dir():
        problems.append(f"{root}: folder 'imagesTr' is missing (nnU-Net v2 layout)")
    if not labels_tr.is_dir():
        problems.append(f"{root}: folder 'labelsTr' is missing (nnU-Net v2 layout)")
    tr = _nnunet_cases(images_tr, ending, len(channel_names), root, problems)
    if not channel_names and tr:  # infer the channel count from the files
        n = 1 + max(c for chans in tr.values() for c in chans)
        channel_names = [str(i) for i in range(n)]
    n_files = _files_per_case(tr, len(channel_names))

    training = [
        Case(cid, [images_tr / f"{cid}_{c:04d}{ending}" for c in range(n_files)], labels_tr / f"{cid}{ending}")
        for cid in sorted(tr)
    ]
    for p in _visible_files(labels_tr):
        stem = _strip_ending(p.name, ending)
        if stem is None:
            problems.append(f"{_rel(p, root)}: does not end with file_ending {ending!r}")
        elif stem not in tr:
            problems.append(
                f"{_rel(p, root)}: label without image (no imagesTr/{stem}_0000{ending}); add the "
                "image or remove the label"
            )
    num = data.get("numTraining")
    if "numTraining" in data:
        if isinstance(num, bool) or not isinstance(num, int):
            problems.append(f"{js}: 'numTraining' must be an integer, got {num!r}")
        elif num not in (len(training), sum(c.label.exists() for c in training)):
            problems.append(
                f"{js}: numTraining is {num} but imagesTr holds {len(training)} case(s); fix "
                "numTraining or add the missing cases"
            )
    ts = _nnunet_cases(images_ts, ending, len(channel_names), root, problems) if images_ts.is_dir() else {}
    test = [
        Case(cid, [images_ts / f"{cid}_{c:04d}{ending}" for c in range(n_files)], None)
        for cid in sorted(ts)
    ]
    return DatasetInfo(root, "nnunet", channel_names, labels, ending, training, test, js, problems)


# --------------------------------------------------------------------------- Decathlon


def _msd_path(root: Path, value: Any) -> Path | None:
    if not isinstance(value, str) or not value:
        return None
    return (root / value).resolve() if not Path(value).is_absolute() else Path(value)


def _msd_case_id(path: Path) -> str:
    name = path.name
    return name[: -len(".nii.gz")] if name.lower().endswith(".nii.gz") else path.stem


def _find_msd(root: Path, js: Path, data: dict[str, Any]) -> DatasetInfo:
    problems: list[str] = []
    root = root.resolve()
    for key in ("modality", "labels", "training"):
        if key not in data:
            problems.append(f"{js}: missing key {key!r} (Medical Segmentation Decathlon dataset.json)")
    channel_names = _index_dict(data["modality"], "modality", js, problems) if "modality" in data else []
    labels: dict[str, int] = {}
    raw_labels = data.get("labels")
    if "labels" in data:
        if not isinstance(raw_labels, dict) or not raw_labels:
            problems.append(
                f"{js}: key 'labels' must be an object like {{\"0\": \"background\", \"1\": "
                f"\"tumour\"}}, got {raw_labels!r}"
            )
        else:
            for k, name in raw_labels.items():
                try:
                    labels[str(name)] = int(k)
                except (TypeError, ValueError):
                    problems.append(f"{js}: label key {k!r} must be an integer value like \"1\"")
            _check_background(labels, js, problems)

    training: list[Case] = []
    entries = data.get("training", [])
    if not isinstance(entries, list):
        problems.append(f"{js}: 'training' must be a list of {{\"image\": ..., \"label\": ...}}")
        entries = []
    for i, entry in enumerate(entries):
        image = _msd_path(root, entry.get("image")) if isinstance(entry, dict) else None
        label = _msd_path(root, entry.get("label")) if isinstance(entry, dict) else None
        if image is not None and isinstance(entry, dict) and entry.get("label") is None:
            training.append(Case(_msd_case_id(image), [image], None))  # unlabelled, or a problem
            continue
        if image is None or label is None:
            problems.append(
                f"{js}: training[{i}] must be {{\"image\": \"./imagesTr/X.nii.gz\", \"label\": "
                f"\"./labelsTr/X.nii.gz\"}}, got {entry!r}"
            )
            continue
        training.append(Case(_msd_case_id(image), [image], label))
    test: list[Case] = []
    tests = data.get("test", [])
    if not isinstance(tests, list):
        problems.append(f"{js}: 'test' must be a list of image paths")
        tests = []
    for i, entry in enumerate(tests):
        value = entry.get("image") if isinstance(entry, dict) else entry
        image = _msd_path(root, value)
        if image is None:
            problems.append(f"{js}: test[{i}] must be an image path, got {entry!r}")
            continue
        test.append(Case(_msd_case_id(image), [image], None))
    num = data.get("numTraining")
    if isinstance(num, int) and not isinstance(num, bool) and \
            num not in (len(training), sum(c.label is not None for c in training)):
        problems.append(f"{js}: numTraining is {num} but 'training' lists {len(training)} case(s)")

    listed_labels = {c.label for c in training if c.label is not None}
    listed_images = {p for c in training + test for p in c.images}
    for p in _visible_files(root / "labelsTr"):
        if p.resolve() not in listed_labels:
            problems.append(f"{_rel(p, root)}: label without image (not listed in {js.name} 'training')")
    for p in _visible_files(root / "imagesTr"):
        if p.resolve() not in listed_images:
            problems.append(f"{_rel(p, root)}: image not listed in {js.name} 'training'")
    endings = {(".nii.gz" if c.images[0].name.lower().endswith(".nii.gz") else c.images[0].suffix) for c in training}
    ending = endings.pop() if len(endings) == 1 else ".nii.gz"
    return DatasetInfo(root, "msd", channel_names, labels, ending, training, test, js, problems)


# --------------------------------------------------------------------------- images + masks


def _picture_channels(path: Path) -> list[str]:
    """Channel names of an images/masks dataset from its first picture: ``gray`` or ``R, G, B``."""
    try:
        return channel_names(file_channels(path))
    except InputError:
        return ["gray"]


def _find_images_masks(root: Path, data: dict[str, Any] | None, js: Path | None) -> DatasetInfo:
    problems: list[str] = []
    labels = {"background": 0, "foreground": 1}
    if data is not None and js is not None and "labels" in data:
        labels = _parse_nnunet_labels(data["labels"], js, problems)
    images_dir, masks_dir = root / "images", root / "masks"
    images: dict[str, Path] = {}
    for p in _visible_files(images_dir):
        if p.suffix.lower() not in PICTURE_SUFFIXES:
            problems.append(
                f"{_rel(p, root)}: not a picture file (expected one of {', '.join(PICTURE_SUFFIXES)})"
            )
            continue
        if p.stem in images:
            problems.append(f"{_rel(p, root)}: two images share the stem {p.stem!r}")
        images[p.stem] = p
    masks: dict[str, Path] = {}
    for p in _visible_files(masks_dir):
        if p.suffix.lower() not in PICTURE_SUFFIXES:
            problems.append(f"{_rel(p, root)}: not a picture file")
            continue
        if p.stem in masks:
            problems.append(f"{_rel(p, root)}: two masks share the stem {p.stem!r}")
        masks[p.stem] = p
    for stem in sorted(set(masks) - set(images)):
        problems.append(f"{_rel(masks[stem], root)}: label without image (no images/{stem}.*)")
    if not images:
        problems.append(f"{images_dir}: no images found ({', '.join(PICTURE_SUFFIXES)})")
    training = [Case(stem, [images[stem]], masks.get(stem)) for stem in sorted(images)]
    first = next(iter(images.values()), None)
    channel_names = _picture_channels(first) if first is not None else ["gray"]
    endings: dict[str, int] = defaultdict(int)
    for p in images.values():
        endings[p.suffix.lower()] += 1
    ending = max(endings, key=endings.__getitem__) if endings else ".png"
    return DatasetInfo(root, "images_masks", channel_names, labels, ending, training, [], js, problems)


# --------------------------------------------------------------------------- unlabelled images

UNLABELLED_FOLDER = "imagesUnlabelled"


def _unlabelled_folder_cases(info: DatasetInfo) -> list[Case]:
    """The cases of ``imagesUnlabelled/``: nnU-Net channel files, or one file per case (MSD)."""
    folder = info.root / UNLABELLED_FOLDER
    if not folder.is_dir() or info.layout == "images_masks":
        return []
    if info.layout == "nnunet":
        found = _nnunet_cases(folder, info.file_ending, info.num_channels, info.root, info.problems)
        n_files = _files_per_case(found, info.num_channels) if found else info.num_channels
        return [Case(cid, [folder / f"{cid}_{c:04d}{info.file_ending}" for c in range(n_files)], None)
                for cid in sorted(found)]
    cases = []
    for p in _visible_files(folder):
        if not p.name.lower().endswith((".nii.gz", ".nii")):
            info.problems.append(f"{_rel(p, info.root)}: not a NIfTI image (.nii.gz / .nii)")
            continue
        cases.append(Case(_msd_case_id(p), [p.resolve()], None))
    return cases


def _collect_unlabelled(info: DatasetInfo) -> None:
    """Move training images without a label to ``info.unlabelled``; add ``imagesUnlabelled/``."""
    labelled = [c for c in info.training if c.label is not None and c.label.exists()]
    moved = [c for c in info.training if c.label is None or not c.label.exists()]
    extra = _unlabelled_folder_cases(info)
    where = {"nnunet": "imagesTr", "msd": "training entries", "images_masks": "images/"}[info.layout]
    info.training = labelled
    info.unlabelled = [Case(c.case_id, c.images, None) for c in moved] + extra
    info.unlabelled_sources = {f"{where} without label": len(moved), f"{UNLABELLED_FOLDER}/": len(extra)}


# --------------------------------------------------------------------------- discovery


def find_dataset(root: str | os.PathLike[str], *, unlabelled: bool = False) -> DatasetInfo:
    """Detect the layout of the dataset at ``root`` and list its cases.

    ``unlabelled`` (semi-supervised training): training images without a label, and the images
    of ``imagesUnlabelled/``, go to ``DatasetInfo.unlabelled`` instead of being problems (module
    docstring). Raises `InputError` only when nothing can be discovered (missing folder,
    unreadable or invalid ``dataset.json``, unknown layout); other problems go to
    ``DatasetInfo.problems`` (`validate_dataset` reports them).
    """
    info = _find_layout(Path(root))
    if unlabelled:
        _collect_unlabelled(info)
    return info


def _find_layout(root: Path) -> DatasetInfo:
    """`find_dataset` without the unlabelled images: the layout's own discovery."""
    if not root.is_dir():
        raise InputError(
            f"dataset folder {root} does not exist or is not a folder; check the path (training config: "
            "data.dataset)"
        )
    js = root / "dataset.json"
    data = _load_json(js) if js.is_file() else None
    if data is not None:
        if "channel_names" in data or "file_ending" in data:
            return _find_nnunet(root, js, data)
        if "modality" in data or "training" in data:
            return _find_msd(root, js, data)
    if (root / "images").is_dir() and (root / "masks").is_dir():
        return _find_images_masks(root, data, js if data is not None else None)
    if data is not None:
        raise InputError(
            f"{js}: cannot tell the dataset layout: nnU-Net v2 needs 'channel_names', 'labels', "
            "'numTraining' and 'file_ending'; the Decathlon needs 'modality', 'labels' and "
            f"'training'. Found keys: {sorted(data)}"
        )
    if (root / "imagesTr").is_dir():
        raise InputError(
            f"{root} has imagesTr/ but no dataset.json; write one (nnU-Net v2: channel_names, "
            "labels, numTraining, file_ending)"
        )
    raise InputError(
        f"{root} is not a dataset folder: expected dataset.json with imagesTr/ and labelsTr/ "
        "(nnU-Net v2 or Medical Segmentation Decathlon) or images/ and masks/ folders of pictures"
    )


# --------------------------------------------------------------------------- validation


def _same_geometry(a: ImageHeader, b: ImageHeader) -> bool:
    return (
        a.shape == b.shape
        and np.allclose(a.spacing, b.spacing, rtol=_GEOMETRY_RTOL, atol=_GEOMETRY_ATOL)
        and np.allclose(a.origin, b.origin, rtol=_GEOMETRY_RTOL, atol=_GEOMETRY_ATOL)
        and np.allclose(a.direction, b.direction, rtol=_GEOMETRY_RTOL, atol=_GEOMETRY_ATOL)
    )


def _describe(h: ImageHeader) -> str:
    spacing = ", ".join(f"{s:g}" for s in h.spacing)
    origin = ", ".join(f"{o:.3f}" for o in h.origin)
    return f"shape {h.shape}, spacing ({spacing}), origin ({origin})"


def _header_or_problem(path: Path, what: str, case: Case, root: Path, problems: list[str]) -> ImageHeader | None:
    if not path.exists():
        problems.append(f"case {case.case_id}: {what} {_rel(path, root)} is missing")
        return None
    try:
        return read_header(path)
    except InputError as exc:
        problems.append(f"case {case.case_id}: {exc}")
        return None


def _case_problems(info: DatasetInfo, case: Case, labelled: bool, check_geometry: bool,
                   check_label_values: bool, with_alpha: list[Path]) -> list[str]:
    """What `validate_dataset` finds wrong with one case (``with_alpha`` collects RGBA images)."""
    problems: list[str] = []
    root = info.root
    headers: list[ImageHeader] = []
    for c, path in enumerate(case.images):
        name = info.channel_names[c] if c < len(info.channel_names) else "?"
        what = f"channel {c} ({name}) file" if not info.channels_in_one_file else "image"
        h = _header_or_problem(path, what, case, root, problems)
        if h is not None:
            headers.append(h)
            if h.alpha:
                with_alpha.append(path)
    label_header = _label_header(info, case, problems) if labelled else None
    # channel counts (checked when every image file could be read)
    if len(headers) == len(case.images) and info.channel_names:
        total = sum(h.num_channels for h in headers)
        if total != len(info.channel_names):
            files = ", ".join(_rel(h.path, root) for h in headers)
            problems.append(
                f"case {case.case_id}: {files} hold {total} channel(s) but the dataset "
                f"has {len(info.channel_names)} ({', '.join(info.channel_names)})"
            )
    if label_header is not None and label_header.num_channels != 1:
        if not (info.layout == "images_masks" and label_header.num_channels == 3):
            problems.append(
                f"case {case.case_id}: label {_rel(label_header.path, root)} has "
                f"{label_header.num_channels} channels; a label map has one"
            )
    if check_geometry and headers:
        ref = headers[0]
        for h in headers[1:] + ([label_header] if label_header is not None else []):
            if not _same_geometry(ref, h):
                problems.append(
                    f"case {case.case_id}: {_rel(h.path, root)} ({_describe(h)}) does "
                    f"not match {_rel(ref.path, root)} ({_describe(ref)}); resample or "
                    "fix the header so channels and label share one grid"
                )
    if check_label_values and label_header is not None and info.labels:
        problems += _label_value_problems(info, case)
    return problems


def _label_header(info: DatasetInfo, case: Case, problems: list[str]) -> ImageHeader | None:
    """The header of a training case's label, or None with the problem recorded."""
    hint = "; add it, or enable semi_supervised to train on the image as unlabelled"
    if case.label is None:
        why = ("has no mask in masks/ with the same stem" if info.layout == "images_masks"
               else "has no 'label' in dataset.json 'training'")
        problems.append(f"case {case.case_id}: image without label ({_rel(case.images[0], info.root)} {why}){hint}")
        return None
    if not case.label.exists():
        problems.append(f"case {case.case_id}: image without label ({_rel(case.label, info.root)} is missing){hint}")
        return None
    return _header_or_problem(case.label, "label", case, info.root, problems)


def _label_value_problems(info: DatasetInfo, case: Case) -> list[str]:
    """Label values of ``case`` that ``info.labels`` does not name (reads the label array)."""
    allowed = set(info.labels.values())
    try:
        values = np.unique(read_label(case.label, info).array)
    except InputError as exc:
        return [f"case {case.case_id}: {exc}"]
    extra = sorted(int(v) for v in values if int(v) not in allowed)
    if not extra:
        return []
    return [f"case {case.case_id}: label {_rel(case.label, info.root)} holds values "
            f"{extra} that are not in the dataset labels {info.labels}; fix the "
            "label or add them to dataset.json"]


def validate_dataset(
    info: DatasetInfo, check_geometry: bool = True, check_label_values: bool = True
) -> None:
    """Check every case of ``info``; raise ONE `InputError` listing every problem found.

    Checks: problems found by `find_dataset` (``dataset.json`` keys, orphan labels, misnamed
    files), missing channel files, images without label, unreadable headers, channel counts,
    shape and geometry (spacing, origin, direction) agreement between channels and label
    (``check_geometry``), and label values against ``info.labels`` (``check_label_values``,
    which reads the label arrays; everything else reads headers only). Unlabelled cases are
    checked as images only, and their ids must not repeat a labelled case's.
    """
    problems = list(info.problems)
    root = info.root
    with_alpha: list[Path] = []
    labelled_ids = {c.case_id for c in info.training}
    for case in info.unlabelled:
        if case.case_id in labelled_ids:
            problems.append(f"case {case.case_id}: an unlabelled image ({_rel(case.images[0], root)}) has the id of a "
                            "labelled case; rename one of them")
    for split, cases in (("training", info.training), ("test", info.test), ("unlabelled", info.unlabelled)):
        for case in cases:
            problems += _case_problems(info, case, split == "training", check_geometry, check_label_values,
                                       with_alpha)
    if with_alpha:
        warnings.warn(
            f"{len(with_alpha)} image(s) of {root} have an alpha (transparency) channel, e.g. "
            f"{_rel(with_alpha[0], root)}; it is dropped: the model sees their R, G, B (or grey) channels",
            stacklevel=2,
        )
    if not info.training:
        problems.append(f"{root}: no training case found")
    if problems:
        where = f"{info.dataset_json}" if info.dataset_json else str(root)
        listing = "\n".join(f"  - {p}" for p in problems)
        raise InputError(
            f"dataset {root} ({info.layout} layout, {where}) has {len(problems)} problem(s):\n{listing}"
        )


# --------------------------------------------------------------------------- loading


def _as_label_array(array: np.ndarray, path: Path) -> np.ndarray:
    if np.issubdtype(array.dtype, np.floating):
        if not np.all(np.isfinite(array)) or not np.all(array == np.round(array)):
            raise InputError(
                f"label {path} holds non-integer values; a label map holds integer class values"
            )
    if array.size and (array.min() < 0):
        raise InputError(f"label {path} holds negative values ({array.min()})")
    top = int(array.max()) if array.size else 0
    return array.astype(np.uint8 if top <= 255 else np.int32)


def read_label(path: str | os.PathLike[str], info: DatasetInfo) -> Volume:
    """Read a label map as integers (uint8 when values fit), spatial axes only.

    Picture masks follow the rule in the module docstring (JPEG: binarised at ``> 127``; PNG:
    label indices kept, binarised at ``> 127`` when a binary dataset's mask holds values > 1).
    """
    path = Path(path)
    vol = read_volume(path)
    array = np.asarray(vol.array)
    if vol.spatial_ndim == 2 and array.ndim == 3:  # colour mask: max over channels
        array = array.max(axis=0)
    elif array.ndim != vol.spatial_ndim:
        raise InputError(f"label {path} has {vol.num_channels} channels; a label map has one")
    if vol.spatial_ndim == 2 and path.suffix.lower() in PICTURE_SUFFIXES:
        binary = sorted(info.labels.values()) == [0, 1]
        if path.suffix.lower() in _LOSSY_SUFFIXES:
            array = (array > 127).astype(np.uint8)
        elif binary and array.size and array.max() > 1:
            array = (array > 127).astype(np.uint8)
    return Volume(_as_label_array(array, path), vol.spacing, vol.origin, vol.direction,
                  spatial_ndim=vol.spatial_ndim, meta=dict(vol.meta))


def load_case(case: Case, info: DatasetInfo) -> tuple[Volume, Volume | None]:
    """Read a case: image ``(C, *spatial)`` (always with a channel axis) and label or ``None``.

    nnU-Net channel files must share one grid (else `InputError`); the image keeps the geometry
    and ``meta`` of its first file.
    """
    vols = [read_volume(p) for p in case.images]
    for p, v in zip(case.images, vols):
        if not v.same_geometry(vols[0]):
            raise InputError(
                f"case {case.case_id}: {p} and {case.images[0]} do not share one grid; resample "
                "them"
            )
    channels = [c.array for v in vols for c in split_channels(v)]  # RGB picture: 3 channels
    image = vols[0].with_array(np.stack(channels, axis=0))
    label = read_label(case.label, info) if case.label is not None else None
    if label is not None and label.shape != image.shape:
        raise InputError(
            f"case {case.case_id}: label {case.label} has shape {label.shape}, image "
            f"{case.images[0]} has {image.shape}"
        )
    return image, label


def label_layout(info: DatasetInfo) -> tuple[dict[str, int], int]:
    """Label names -> values (must be 0..K-1) and the number of output channels (1 when binary)."""
    labels = dict(sorted(info.labels.items(), key=lambda kv: kv[1]))
    values = sorted(labels.values())
    if values != list(range(len(values))) or len(values) < 2:
        raise InputError(
            f"{info.dataset_json or info.root}: labels must be 0 (background), 1, ..., K-1 without gaps, "
            f"got {labels}; renumber the label maps and dataset.json (e.g. 0, 1, 5 -> 0, 1, 2)"
        )
    return labels, 1 if len(values) == 2 else len(values)
