"""`EnsemblePredictor`: several models of one plan (the folds of `resunet train --folds K`) as one
`Predictor` whose probabilities are the mean of the members'.

Every member preprocesses a case the same way (the ensemble refuses members whose preprocessing,
labels, input or window differ), so the case is prepared once; each member computes its logits
(with its own backend and the ensemble's TTA), the class probabilities (softmax; sigmoid for one
channel) are averaged on the preprocessed grid, as nnU-Net ensembles its folds, and the mean is
handed on as log-probabilities (``log p``; ``logit p`` for one channel). Softmax / sigmoid of those
give back the mean exactly, so resampling to the input grid, the argmax, ``--save-probabilities``
and post-processing are `Predictor`'s own code.

`open_predictor` opens what ``resunet predict -m`` names: a checkpoint or ONNX file, a run folder
holding ``ensemble.json`` (`resunet.train.folds`) or that file itself, or any other run folder
(its model: `resunet.model.run_checkpoint`, ``final.pt`` else ``best.pt``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from resunet.errors import InputError, ModelError
from resunet.infer.predictor import PostprocessConfig, Predictor
from resunet.model import find_run_checkpoint

#: probabilities are clamped to [EPS, 1 - EPS] before the log, so a class no member predicts stays finite
EPS = 1e-7


def mean_probabilities_as_logits(logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """Logits ``(K, *S)`` of several models -> ``log`` of their mean class probabilities (softmax
    over K), or for K = 1 the logit of their mean sigmoid: softmax / sigmoid of the result is the mean."""
    if logits[0].shape[0] == 1:
        p = torch.stack([torch.sigmoid(x.float()) for x in logits]).mean(0).clamp(EPS, 1 - EPS)
        return torch.log(p) - torch.log1p(-p)
    p = torch.stack([torch.softmax(x.float(), dim=0) for x in logits]).mean(0)
    return torch.log(p.clamp_min(EPS))


def _signature(p: Predictor) -> dict[str, Any]:
    spec = p.spec
    return {"preprocess": spec.preprocess.model_dump(mode="json"), "labels": dict(spec.labels),
            "mode": spec.inference.mode, "context": spec.inference.context,
            "patch_size": list(spec.inference.patch_size), "channels": spec.num_input_channels}


class EnsemblePredictor(Predictor):
    """``members`` (`Predictor`, same plan) predicting as one; see the module docstring.
    ``source`` names the ensemble (its folder) in messages; ``tta`` / ``postprocess`` are the
    ensemble's (the members' own are not used)."""

    def __init__(self, members: Sequence[Predictor], source: str, *, tta: bool = False,
                 postprocess: PostprocessConfig | None = None) -> None:
        if not members:
            raise ModelError(f"{source}: an ensemble needs at least one model")
        first = _signature(members[0])
        for m in members[1:]:
            differs = sorted(k for k, v in _signature(m).items() if v != first[k])
            if differs:
                raise ModelError(f"{source}: {m.source} differs from {members[0].source} in {', '.join(differs)}; "
                                 "an ensemble's models must come from one plan (`resunet train --folds K`)")
        self.members = list(members)
        lead = self.members[0]
        self.device, self.spec, self.model, self.source = lead.device, lead.spec, lead.model, source
        self.preprocess, self.labels = lead.preprocess, dict(lead.labels)
        self.mode, self.context, self.patch_size = lead.mode, lead.context, list(lead.patch_size)
        self.batch_size, self.amp, self.max_batch_pixels = lead.batch_size, lead.amp, lead.max_batch_pixels
        self.tta = tta
        for m in self.members:
            m.tta = tta
        self.postprocess = postprocess or PostprocessConfig()
        self.net = None

    @property
    def backend(self) -> str:  # type: ignore[override]
        return self.members[0].backend

    @property
    def backend_choice(self) -> Any:  # type: ignore[override]
        return self.members[0].backend_choice

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "ensemble": [str(m.source) for m in self.members]}

    def resolve_backend(self, image: torch.Tensor, context: int | None = None) -> None:
        for m in self.members:
            m.resolve_backend(image, context)

    def case_logits(self, image: torch.Tensor) -> torch.Tensor:
        """`mean_probabilities_as_logits` of the members' logits ``(K, *S)`` of ``image`` ``(C, *S)``."""
        return mean_probabilities_as_logits([m.case_logits(image) for m in self.members])

    def _shared_slice_logits(self, images: list[np.ndarray]) -> list[torch.Tensor]:
        per_member = [m._shared_slice_logits(images) for m in self.members]
        return [mean_probabilities_as_logits(list(case)) for case in zip(*per_member)]


def ensemble_members(path: Path) -> list[Path]:
    """The checkpoints an ``ensemble.json`` (or the run folder holding it) lists; `InputError`
    naming the file when it lists none or one is missing."""
    record_path = path / "ensemble.json" if path.is_dir() else path
    try:
        record = json.loads(record_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise InputError(f"cannot read the ensemble record {record_path}: {err}") from None
    members = [record_path.parent / m for m in record.get("members", [])]
    if not members:
        raise InputError(f"{record_path} lists no finished fold; finish the run with `resunet train --resume "
                         f"{record_path.parent}`")
    missing = [str(m) for m in members if not m.is_file()]
    if missing:
        raise InputError(f"{record_path} lists checkpoints that are not there: {', '.join(missing)}")
    if not record.get("complete", True):
        import warnings

        warnings.warn(f"{record_path}: {len(members)} of {record.get('folds')} folds finished; predicting with those")
    return members


def open_predictor(path: str | Path, **kwargs: Any) -> Predictor:
    """The `Predictor` of what ``path`` names (module docstring); ``kwargs`` go to every member
    (``tta`` and ``postprocess`` to the ensemble)."""
    path = Path(path)
    is_record = path.is_file() and path.suffix == ".json"
    if path.is_dir() and not (path / "ensemble.json").is_file():
        model = find_run_checkpoint(path)
        if model is not None:
            return Predictor.from_file(model, **kwargs)
        raise InputError(f"{path} is a folder without final.pt, best.pt or ensemble.json; pass a checkpoint, an "
                         "exported .onnx file or the folder of a `resunet train` run")
    if not (path.is_dir() or is_record):
        return Predictor.from_file(path, **kwargs)
    tta, postprocess = kwargs.pop("tta", False), kwargs.pop("postprocess", None)
    members = [Predictor.from_file(m, **kwargs) for m in ensemble_members(path)]
    return EnsemblePredictor(members, str(path), tta=tta, postprocess=postprocess)
