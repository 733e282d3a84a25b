"""Reading a case and writing its outputs, for every front end: `predict_inputs` (``resunet
predict``: every case of an input path, one bad case never stops the rest; probabilities,
shards, ``--continue``, cases missing a modality) and `write_mask` (also used by the HTTP server
and the DICOM node)."""

from __future__ import annotations

import json
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from resunet.data.channels import read_case
from resunet.data.io import atomic_write, make_folder, read_header, write_volume
from resunet.data.limits import DEFAULT_MAX_VOXELS
from resunet.data.preprocess import PreprocessedCase
from resunet.errors import ConfigError, ResunetError
from resunet.data.volume import Volume
from resunet.infer.inputs import IMAGE_SUFFIXES, InputCase, discover_inputs
from resunet.infer.predictor import Predictor
from resunet.infer.memory import GIB, Admission


def output_path(output: Path, case_id: str, suffix: str, single: bool) -> Path:
    """``output`` itself when it names a file for a single case, else ``output/<case><suffix>``."""
    if single and any(output.name.lower().endswith(s) for s in (*IMAGE_SUFFIXES, ".dcm")):
        return output
    return output / f"{case_id}{suffix}"


def visible_mask(mask: Volume, top_label: int) -> Volume:
    """A label map ``(*S)`` for the eye: label ``v`` -> ``v * (255 // top_label)``.

    Binary models (``top_label`` 1): 0/1 -> 0/255; labels 0..2: 0, 127, 254.
    """
    if top_label < 1:
        return mask
    scale = 255 // top_label
    return mask.with_array((np.asarray(mask.array).astype(np.uint16) * scale).astype(np.uint8))


DICOM_FORMATS = ("seg", "rtstruct")
#: voxel types a label map may be written as (`write_mask` ``dtype``; MONAI Label's ``result_dtype``)
MASK_DTYPES = ("uint8", "int8", "uint16", "int16", "uint32", "int32", "float32", "float64")


def mask_as(mask: Volume, dtype: str) -> Volume:
    """``mask`` with its labels stored as ``dtype`` (a name of `MASK_DTYPES`); `ConfigError`
    naming the choices for another name, or when the largest label does not fit ``dtype``."""
    if str(dtype) not in MASK_DTYPES:
        raise ConfigError(f"mask type {dtype!r} is not supported; use one of {', '.join(MASK_DTYPES)}")
    array, kind = np.asarray(mask.array), np.dtype(dtype)
    top = int(array.max()) if array.size else 0
    if kind.kind in "ui" and top > np.iinfo(kind).max:
        raise ConfigError(f"mask type {dtype} cannot hold label {top}; use uint16 or a wider type")
    return mask.with_array(array.astype(kind, copy=False))


def write_mask(mask: Volume, target: Path, *, labels: dict[str, int] | None = None, source: Volume | None = None,
               dicom_format: str | None = None, png_visible: bool = False, dtype: str | None = None) -> Path:
    """Write a predicted label map the way every front end does: for a DICOM ``source`` series a
    DICOM SEG (``dicom_format="seg"``) or an RT Structure Set (``"rtstruct"``) referencing it (both
    need ``labels``, name -> value), else
    ``target``'s format (NIfTI, NRRD, PNG, ...) in ``mask``'s geometry; ``png_visible`` spreads PNG
    labels over 0..255; ``dtype`` (`mask_as`) sets the voxel type of an image file (default: the
    mask's own, uint8). Atomic; returns ``target``."""
    labels = labels or {}
    if dicom_format is not None and source is None:
        raise ConfigError(f"--dicom-format {dicom_format} needs the DICOM series the mask was predicted from")
    if dicom_format == "seg":
        from resunet.data.dicom_seg import write_dicom_seg

        return write_dicom_seg(mask, source, labels, target)
    if dicom_format == "rtstruct":
        from resunet.data.rtstruct import write_rtstruct

        return write_rtstruct(mask, source, labels, target)
    if dicom_format is not None:
        raise ConfigError(f"--dicom-format must be one of {', '.join(DICOM_FORMATS)}, got {dicom_format!r}")
    if png_visible and target.suffix.lower() == ".png":
        mask = visible_mask(mask, max(labels.values(), default=1))
    if dtype is not None:
        mask = mask_as(mask, dtype)
    return write_volume(mask, target)


def probabilities_path(mask_path: Path) -> Path:
    """Where ``--save-probabilities`` puts a case's probabilities: ``<case>.npz`` beside its mask."""
    name = mask_path.name
    stem = next((name[: -len(s)] for s in (*IMAGE_SUFFIXES, ".dcm") if name.lower().endswith(s)), mask_path.stem)
    return mask_path.with_name(f"{stem}.npz")


def write_probabilities(probabilities: np.ndarray, template: Volume, labels: dict[str, int], path: Path) -> Path:
    """Class probabilities ``(C, *S)`` (C = every label value 0..C-1, on ``template``'s grid) as a
    compressed ``.npz``: ``probabilities`` float32, ``spacing`` / ``origin`` (mm, array order),
    ``direction``, ``labels`` (JSON name -> value). ``argmax`` over axis 0 is the mask."""
    import json

    with atomic_write(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez_compressed(
                f, probabilities=probabilities.astype(np.float32), spacing=np.asarray(template.spacing, float),
                origin=np.asarray(template.origin, float), direction=np.asarray(template.direction, float),
                labels=np.array(json.dumps(labels)),
            )
    return path


def missing_record_path(mask_path: Path) -> Path:
    """Where predict records the modalities a case lacked: ``<case>.missing.json`` beside its mask."""
    return probabilities_path(mask_path).with_suffix(".missing.json")


def missing_record(case: InputCase, predictor: Predictor) -> dict:
    """What `predict_inputs` records (and warns) about a case predicted without some channels."""
    spec = predictor.spec
    return {
        "case": case.case_id, "model": str(predictor.source), "filled_with": 0.0,
        "missing": [{"channel": c, "name": spec.channel_name(c), "file": f}
                    for c, f in zip(case.missing, case.missing_files())],
        "note": "predicted without these channels: zero-filled after normalisation (the model was trained "
                "with augment.modality_dropout)",
    }


def _note_missing(case: InputCase, predictor: Predictor, mask_path: Path) -> Path | None:
    """Write the case's `missing_record` beside its mask (removing a stale one for a complete case)."""
    path = missing_record_path(mask_path)
    if not case.missing:
        path.unlink(missing_ok=True)
        return None
    with atomic_write(path) as tmp:
        Path(tmp).write_text(json.dumps(missing_record(case, predictor), indent=1))
    return path


def select_part(cases: list[InputCase], num_parts: int = 1, part_id: int = 0) -> list[InputCase]:
    """nnU-Net's sharding: of the cases sorted by id, those at positions ``part_id``,
    ``part_id + num_parts``, ...; the ``num_parts`` parts cover every case exactly once."""
    if num_parts < 1 or not 0 <= part_id < num_parts:
        raise ConfigError(f"--part-id must be in 0..{num_parts - 1} for --num-parts {num_parts}, got {part_id}")
    return sorted(cases, key=lambda c: c.case_id)[part_id::num_parts]


def output_complete(path: Path) -> bool:
    """An output file is there and readable (every writer renames a complete temporary file into
    place, so a killed run leaves no partial file under the final name)."""
    if not path.is_file() or path.stat().st_size == 0:
        return False
    try:
        if path.suffix == ".npz":
            with np.load(path) as data:
                return "probabilities" in data.files
        if path.suffix == ".dcm":
            import pydicom

            pydicom.dcmread(str(path), stop_before_pixels=True)
            return True
        read_header(path)
        return True
    except Exception:  # unreadable: predict it again
        return False


def predict_inputs(
    predictor: Predictor, input_path: Path, output: Path, png_visible: bool = False, *,
    save_probabilities: bool = False, num_parts: int = 1, part_id: int = 0, skip_complete: bool = False,
    dicom_format: str = "seg", max_voxels: int = DEFAULT_MAX_VOXELS, max_memory_gb: float | None = None,
) -> tuple[list[Path], dict[str, str], list[str]]:
    """Predict the cases of ``input_path``; return the written paths, ``{case: error}`` of
    failures and the ids of cases skipped because their outputs were already complete.

    Reading and preprocessing of the next case run in a background thread while the model works
    on the current one (at most two cases in memory). A case's channels are read by the rule of
    `resunet.data.channels` (an RGB picture is 3 channels). ``png_visible``: PNG masks hold 0/255
    (binary models) instead of the label indices 0/1, so that an image viewer shows them.
    ``save_probabilities``: also `write_probabilities` beside each mask. ``num_parts`` /
    ``part_id``: only this part of the cases (`select_part`). ``skip_complete``: cases whose
    outputs are all complete (`output_complete`) are not predicted again (``--continue``).
    ``dicom_format``: what a DICOM series input gets, ``seg`` or ``rtstruct`` (`write_mask`).
    ``max_voxels`` / ``max_memory_gb``: a case whose headers declare more voxels x channels, or
    whose estimated memory does not fit (`resunet.infer.memory.Admission`), fails before it is
    decoded; the others go on. A case of channel files lacking one (``CASE_0001.nii.gz``): with a
    model trained with modality dropout it is predicted with that channel zero-filled after
    normalisation, a warning names the file and the case, and ``<case>.missing.json`` beside the
    mask records it (`missing_record`); any other model refuses the input (`InputError` naming
    the file and the channels the model needs).
    """
    if dicom_format not in DICOM_FORMATS:
        raise ConfigError(f"--dicom-format must be one of {', '.join(DICOM_FORMATS)}, got {dicom_format!r}")
    admission = Admission(predictor, max_voxels, None if max_memory_gb is None else int(max_memory_gb * GIB),
                          strict=False)
    spec = predictor.spec
    every = discover_inputs(Path(input_path), predictor.num_input_channels,
                            missing_ok=spec.accepts_missing_modality, channel_names=spec.inference.channel_names)
    output = Path(output)
    single = len(every) == 1

    def targets(case: InputCase) -> list[Path]:
        mask = output_path(output, case.case_id, case.suffix, single)
        return [mask, probabilities_path(mask)] if save_probabilities else [mask]

    cases = select_part(every, num_parts, part_id)
    skipped = [c.case_id for c in cases if skip_complete and all(output_complete(t) for t in targets(c))]
    cases = [c for c in cases if c.case_id not in set(skipped)]
    written: list[Path] = []
    failed: dict[str, str] = {}
    if not cases:
        return written, failed, skipped
    # a blocked output path (a file where the folder should be) fails once, before any work
    make_folder(targets(cases[0])[0].parent)
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("{task.fields[case]}"))

    def load(case: InputCase) -> tuple[list[Volume], PreprocessedCase]:
        admission.need(case.paths)  # headers only: refuse before decoding
        images = read_case(case.paths, predictor.num_input_channels - len(case.missing))
        if case.missing:
            names = ", ".join(f"{f} ({spec.channel_name(c)})" for c, f in zip(case.missing, case.missing_files()))
            warnings.warn(f"case {case.case_id}: {names} missing; predicted with that channel zero-filled after "
                          f"normalisation (the model was trained with modality dropout)")
        return images, predictor.prepare(images, case.missing)

    with Progress(*columns, console=Console(stderr=True)) as bar, ThreadPoolExecutor(1) as pool:
        task = bar.add_task("Predicting", total=len(cases), case="")
        ahead: Future | None = pool.submit(load, cases[0])
        for i, case in enumerate(cases):
            bar.update(task, case=case.case_id)
            current, ahead = ahead, pool.submit(load, cases[i + 1]) if i + 1 < len(cases) else None
            try:
                images, prepared = current.result()
                target, *probabilities_target = targets(case)
                target.parent.mkdir(parents=True, exist_ok=True)
                if save_probabilities:
                    mask, probs = predictor.predict_prepared_with_probabilities(prepared, images[0])
                    written.append(write_probabilities(probs, images[0], predictor.labels, probabilities_target[0]))
                else:
                    mask = predictor.predict_prepared(prepared, images[0])
                written.append(write_mask(mask, target, labels=predictor.labels, source=images[0],
                                          dicom_format=dicom_format if case.kind == "dicom" else None,
                                          png_visible=png_visible))
                written.extend(p for p in [_note_missing(case, predictor, target)] if p is not None)
            except ResunetError as err:
                failed[case.case_id] = str(err)
            except MemoryError as err:
                failed[case.case_id] = f"out of memory ({err}); lower --max-memory-gb so such cases are refused up front"
            bar.advance(task)
    return written, failed, skipped
