"""How the image channels of a case are found: ONE rule, used by dataset discovery and validation
(`resunet.data.datasets`, hence training), `resunet predict` (`resunet.infer.inputs`,
`resunet.infer.run`, `resunet.infer.predictor`) and the HTTP server (`resunet.serve.http`).

A case's channels are the channels of its files, in order:

- ONE file may hold every channel: a grey picture (PNG/JPEG/BMP/TIFF) is 1 channel; an RGB
  picture is 3 (R, G, B); an RGBA picture is 3 as well -- its alpha channel is dropped, with a
  warning; a 4-D NIfTI or vector MetaImage holds its channels on one axis.
- nnU-Net channel files ``CASE_0000<ext>``, ``CASE_0001<ext>``, ... are one case read in that
  order; their channels add up (an RGB ``CASE_0000.png`` alone is channels R, G, B, as nnU-Net's
  natural-image reader takes it).

A model needs C channels per case. A case with another count is refused with an `InputError`
that names the file(s), says what they hold and what the model needs (`channel_mismatch`).
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np

from resunet.data.volume import Volume
from resunet.errors import InputError

__all__ = [
    "CHANNEL_FILE",
    "PICTURE_SUFFIXES",
    "channel_mismatch",
    "channel_names",
    "check_channels",
    "describe_channels",
    "file_channels",
    "group_case_files",
    "missing_channels",
    "read_case",
    "split_channels",
]

#: an nnU-Net channel file name without its extension: ``CASE_0000`` -> case ``CASE``, channel 0
CHANNEL_FILE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")
#: 2-D picture files: grey -> 1 channel, RGB / RGBA -> 3
PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def channel_names(count: int) -> list[str]:
    """Names of the channels of a picture with ``count`` channels: ``gray`` or ``R, G, B``."""
    if count == 1:
        return ["gray"]
    if count == 3:
        return ["R", "G", "B"]
    return [str(i) for i in range(count)]


def describe_channels(count: int, picture: bool = True) -> str:
    """``"1 channel (grey)"``, ``"3 channels (RGB)"`` (pictures) or ``"N channel(s)"``."""
    if picture and count == 1:
        return "1 channel (grey)"
    if picture and count == 3:
        return "3 channels (RGB)"
    return f"{count} channel" + ("" if count == 1 else "s")


def _is_picture(path: str | os.PathLike[str]) -> bool:
    return Path(path).suffix.lower() in PICTURE_SUFFIXES


def file_channels(path: str | os.PathLike[str]) -> int:
    """Channels one image file holds, from its header (pixels are not decoded for pictures)."""
    from resunet.data.io import read_header

    return int(read_header(path).num_channels)


def channel_mismatch(paths: Sequence[str | os.PathLike[str]], has: int, needed: int) -> str:
    """The message for a case whose files ``paths`` hold ``has`` channels, not ``needed``.

    It names the file(s), what they hold, what the model needs and how to fix it.
    """
    first = Path(paths[0]) if paths else Path("CASE.png")
    picture = _is_picture(first)
    names = ", ".join(Path(p).name for p in paths) or "the case"
    verb = "has" if len(paths) == 1 else "have"
    text = (f"{names} {verb} {describe_channels(has, picture)} but the model needs "
            f"{describe_channels(needed, picture)}")
    ending = ".nii.gz" if first.name.lower().endswith(".nii.gz") else first.suffix
    if needed == 3 and has == 1 and picture:
        fix = ("give it a colour (RGB) picture, as the model was trained on, or put the channel files "
               f"CASE_0000{ending}, CASE_0001{ending}, CASE_0002{ending} of each case in a folder and "
               "pass the folder")
    elif needed == 1 and has == 3 and picture:
        fix = ("the model was trained on grey images: convert the picture to grey (e.g. "
               "PIL.Image.open(path).convert('L')) or use a model trained on RGB pictures")
    elif needed > 1:
        fix = (f"name the files CASE_0000{ending}, CASE_0001{ending}, ... (one per channel) and pass "
               f"the folder, or pass one file holding all {needed} channels")
    else:
        fix = "pass one single-channel image per case, or use a model trained on this kind of image"
    return f"{text}; {fix}"


def check_channels(paths: Sequence[str | os.PathLike[str]], counts: Sequence[int], needed: int) -> None:
    """Raise `InputError` (`channel_mismatch`) unless files holding ``counts`` channels make ``needed``."""
    has = int(sum(counts))
    if has != needed:
        raise InputError(channel_mismatch(paths, has, needed))


def split_channels(volume: Volume) -> list[Volume]:
    """A volume ``(C, *S)`` -> C single-channel volumes ``(*S)`` (same geometry); ``(*S)`` -> itself.

    Warns when the file's reader dropped an alpha channel (RGBA -> RGB, grey + alpha -> grey);
    the returned volumes no longer carry that note, so it is given once per file.
    """
    meta = dict(volume.meta)
    if meta.pop("alpha_dropped", False):
        kept = "R, G, B" if volume.num_channels == 3 else "grey"
        warnings.warn(f"{meta.get('path', 'a picture')}: its alpha (transparency) channel is dropped; "
                      f"the model sees its {kept} channel(s)", stacklevel=2)
    array = np.asarray(volume.array)
    if array.ndim == volume.spatial_ndim:
        return [replace(volume, meta=meta)]
    return [replace(volume, array=np.ascontiguousarray(array[c]), meta=dict(meta)) for c in range(array.shape[0])]


def missing_channels(
    case_id: str,
    paths: Sequence[str | os.PathLike[str]],
    needed: int,
    counts: Callable[[Path], int] = file_channels,
) -> list[int]:
    """Channel indices ``0 .. needed - 1`` that case ``case_id`` has no channel file for: ``[]``
    unless every path is a channel file ``{case_id}_XXXX`` and together they hold fewer than
    ``needed`` channels (a case `group_case_files` formed with ``partial``)."""
    numbers = []
    for p in paths:
        m = CHANNEL_FILE.match(_stem(Path(p)))
        if m is None or m["case"] != case_id:
            return []
        numbers.append(int(m["channel"]))
    if len(numbers) >= needed or sum(counts(Path(p)) for p in paths) >= needed:
        return []
    return [c for c in range(needed) if c not in set(numbers)]


def _stem(path: Path) -> str:
    name = path.name
    return name[: -len(".nii.gz")] if name.lower().endswith(".nii.gz") else path.stem


def read_case(
    paths: Sequence[str | os.PathLike[str]],
    needed: int | None = None,
    reader: Callable[[Path], Volume] | None = None,
) -> list[Volume]:
    """Read a case's files and return its channels, one single-channel volume ``(*S)`` each.

    ``needed``: the model's channel count; another count raises `InputError` naming the files.
    ``reader`` defaults to `resunet.data.io.read_volume`.
    """
    if reader is None:
        from resunet.data.io import read_volume as reader
    volumes = [reader(Path(p)) for p in paths]
    if needed is not None:
        check_channels(paths, [v.num_channels for v in volumes], needed)
    return [c for v in volumes for c in split_channels(v)]


def group_case_files(
    files: Sequence[tuple[str, Path]],
    needed: int,
    counts: Callable[[Path], int] = file_channels,
    partial: bool = False,
) -> tuple[list[tuple[str, list[Path]]], list[str]]:
    """Group the image files of a folder into cases for a model needing ``needed`` channels.

    ``files``: ``(stem, path)`` pairs (stem = name without its extension). Channel files
    ``X_0000``, ``X_0001``, ... form case ``X`` when their channels add up to ``needed``; a file
    that holds ``needed`` channels by itself (e.g. RGB pictures named ``frame_0001.png`` for a
    3-channel model) is its own case, named by its full stem; any other file is its own case.
    Headers are read (``counts``) only where the names alone cannot decide. ``partial``: channel
    files ``X_0000`` .. of single-channel files that are SOME of the channels ``0 .. needed - 1``
    form case ``X`` too (a case missing a modality; `missing_channels` names the absent ones).
    Returns ``[(case_id, paths)]`` in name order and the problems (one line each) of files that fit
    no case.
    """
    groups: dict[str, dict[int, Path]] = {}
    singles: list[tuple[str, Path]] = []
    for stem, path in files:
        m = CHANNEL_FILE.match(stem)
        if m:
            groups.setdefault(m["case"], {})[int(m["channel"])] = path
        else:
            singles.append((stem, path))
    cases: list[tuple[str, list[Path]]] = []
    problems: list[str] = []
    stems = {path: stem for stem, path in files}
    for case, channels in sorted(groups.items()):
        order = sorted(channels)
        paths = [channels[i] for i in order]
        contiguous = order == list(range(len(order)))
        if contiguous and len(order) == needed:  # one single-channel file per channel (checked on reading)
            cases.append((case, paths))
            continue
        try:
            held = [counts(p) for p in paths]
        except InputError as err:
            problems.append(f"{case}: {err}")
            continue
        if contiguous and sum(held) == needed:
            cases.append((case, paths))
        elif partial and order[-1] < needed and all(h == 1 for h in held):
            cases.append((case, paths))
        elif all(h == needed for h in held):
            cases.extend((stems[p], [p]) for p in paths)
        else:
            picture = _is_picture(paths[0])
            found = ", ".join(f"{p.name}: {describe_channels(h, picture)}" for p, h in zip(paths, held))
            problems.append(
                f"{case}: channels {order} found ({found}), the model needs "
                f"{describe_channels(needed, picture)}"
                f"; give each case the channel files {case}_0000.. to {case}_{needed - 1:04d}.. (or one "
                f"file holding all {needed} channels)"
            )
    for stem, path in singles:
        if needed == 1:  # the count is checked when the file is read
            cases.append((stem, [path]))
            continue
        try:
            held_one = counts(path)
        except InputError as err:
            problems.append(str(err))
            continue
        if held_one == needed:
            cases.append((stem, [path]))
        else:
            problems.append(channel_mismatch([path], held_one, needed))
    cases.sort(key=lambda c: c[0])
    return cases, problems
