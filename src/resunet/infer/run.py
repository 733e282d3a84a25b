"""Predict every case found in an input path and write the masks; one bad case never stops the rest."""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from resunet.data.channels import read_case
from resunet.data.io import make_folder, write_volume
from resunet.data.limits import DEFAULT_MAX_VOXELS
from resunet.errors import ResunetError
from resunet.data.preprocess import PreprocessedCase
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


def predict_inputs(
    predictor: Predictor, input_path: Path, output: Path, png_visible: bool = False,
    max_voxels: int = DEFAULT_MAX_VOXELS, max_memory_gb: float | None = None,
) -> tuple[list[Path], dict[str, str]]:
    """Predict all cases of ``input_path``; return the written paths and ``{case: error}`` of failures.

    Reading and preprocessing of the next case run in a background thread while the model works
    on the current one (at most two cases in memory). A case's channels are read by the rule of
    `resunet.data.channels` (an RGB picture is 3 channels). ``png_visible``: PNG masks hold 0/255
    (binary models) instead of the label indices 0/1, so that an image viewer shows them.
    ``max_voxels`` / ``max_memory_gb``: a case whose headers declare more voxels x channels, or
    whose estimated memory does not fit (`resunet.infer.memory.Admission`), fails before it is
    decoded; the others go on.
    """
    admission = Admission(predictor, max_voxels, None if max_memory_gb is None else int(max_memory_gb * GIB),
                          strict=False)
    cases = discover_inputs(Path(input_path), predictor.num_input_channels)
    output = Path(output)
    single = len(cases) == 1
    # a blocked output path (a file where the folder should be) fails once, before any work
    make_folder(output_path(output, cases[0].case_id, cases[0].suffix, single).parent)
    written: list[Path] = []
    failed: dict[str, str] = {}
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("{task.fields[case]}"))

    def load(case: InputCase) -> tuple[list[Volume], PreprocessedCase]:
        admission.need(case.paths)  # headers only: refuse before decoding
        images = read_case(case.paths, predictor.num_input_channels)
        return images, predictor.prepare(images)

    with Progress(*columns, console=Console(stderr=True)) as bar, ThreadPoolExecutor(1) as pool:
        task = bar.add_task("Predicting", total=len(cases), case="")
        ahead: Future | None = pool.submit(load, cases[0]) if cases else None
        for i, case in enumerate(cases):
            bar.update(task, case=case.case_id)
            current, ahead = ahead, pool.submit(load, cases[i + 1]) if i + 1 < len(cases) else None
            try:
                images, prepared = current.result()
                target = output_path(output, case.case_id, case.suffix, single)
                target.parent.mkdir(parents=True, exist_ok=True)
                mask = predictor.predict_prepared(prepared, images[0])
                if case.kind == "dicom":
                    from resunet.data.dicom_seg import write_dicom_seg

                    written.append(write_dicom_seg(mask, images[0], predictor.labels, target))
                else:
                    if png_visible and target.suffix.lower() == ".png":
                        mask = visible_mask(mask, max(predictor.labels.values(), default=1))
                    written.append(write_volume(mask, target))
            except ResunetError as err:
                failed[case.case_id] = str(err)
            except MemoryError as err:
                failed[case.case_id] = f"out of memory ({err}); lower --max-memory-gb so such cases are refused up front"
            bar.advance(task)
    return written, failed
