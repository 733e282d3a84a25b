"""Predict every case found in an input path and write the masks; one bad case never stops the rest."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from resunet.data.io import read_volume, write_volume
from resunet.errors import ResunetError
from resunet.infer.inputs import IMAGE_SUFFIXES, discover_inputs
from resunet.infer.predictor import Predictor


def output_path(output: Path, case_id: str, suffix: str, single: bool) -> Path:
    """``output`` itself when it names a file for a single case, else ``output/<case><suffix>``."""
    if single and any(output.name.lower().endswith(s) for s in (*IMAGE_SUFFIXES, ".dcm")):
        return output
    return output / f"{case_id}{suffix}"


def predict_inputs(predictor: Predictor, input_path: Path, output: Path) -> tuple[list[Path], dict[str, str]]:
    """Predict all cases of ``input_path``; return the written paths and ``{case: error}`` of failures."""
    cases = discover_inputs(Path(input_path), predictor.num_input_channels)
    output = Path(output)
    single = len(cases) == 1
    written: list[Path] = []
    failed: dict[str, str] = {}
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("{task.fields[case]}"))
    with Progress(*columns, console=Console(stderr=True)) as bar:
        task = bar.add_task("Predicting", total=len(cases), case="")
        for case in cases:
            bar.update(task, case=case.case_id)
            try:
                target = output_path(output, case.case_id, case.suffix, single)
                target.parent.mkdir(parents=True, exist_ok=True)
                images = [read_volume(p) for p in case.paths]
                mask = predictor.predict(images)
                if case.kind == "dicom":
                    from resunet.data.dicom_seg import write_dicom_seg

                    written.append(write_dicom_seg(mask, images[0], predictor.labels, target))
                else:
                    written.append(write_volume(mask, target))
            except ResunetError as err:
                failed[case.case_id] = str(err)
            bar.advance(task)
    return written, failed
