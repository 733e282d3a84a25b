"""Semi-supervised training by pseudo-labels (self-training; Lee, 2013): the model labels the
unlabelled images during the run, and they train as labelled cases from then on.

``semi_supervised.method: pseudo_label``. The run trains on its labelled cases alone until the
first fraction of ``semi_supervised.pseudo_label_at`` of its epochs (default 0.4 and 0.7); at the
start of each of those epochs (`labelling_epochs`) the current model (eval mode, the run's
precision) predicts every unlabelled case at the cached geometry and its argmax becomes that
case's label (`PseudoLabeller.relabel`). The LR schedule restarts at each labelling epoch
(`resunet.train.stages.lr_factor`'s cycles): the labelling model has finished a decay, as a
separately trained teacher would have, and the student gets a whole decay of its own on the new
labels. From then on each epoch's sampler draws from the labelled cases repeated
``r = round(unlabelled / labelled)`` times plus the pseudo-labelled ones, so about half the
patches carry a real label (`training_cases`).

Curriculum (``semi_supervised.pseudo_label_curriculum``, on by default; Cascante-Bonilla et al.,
AAAI 2021): at the k-th of K labellings only the ``ceil(k / K * n)`` most confident of the ``n`` unlabelled
cases train (`case_confidence`: the mean top-class probability over the voxels the model calls
foreground), so the first, weaker model contributes its surest labels only and the last labels
every case.

Why this method next to the mean teacher: a step costs exactly a supervised step (the mean
teacher runs an unlabelled batch through two networks on every step, which on a CPU budget costs
the steps it should buy); labelling costs one forward pass per unlabelled case per labelling,
about a validation pass over those cases. Trade-off: the labels carry the model's errors of that
moment, hence the later re-labelling with a better model.

State: the labels of labelling epoch ``e`` are written to ``<run>/pseudo_labels/epoch_<e>/<case>.npy``
(uint8, written atomically) and kept, with each case's confidence (``confidence.json``); ``last.pt``'s
training state says which epoch's labels are in use and which cases train on them, so a resumed run
reloads them instead of relabelling with weights from later in the epoch (the
resumed run then equals an uninterrupted one). Under DDP every rank labels every case with the same
synchronised weights (the files are written by rank 0).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from rich.console import Console
from rich.progress import track
from torch import nn

from resunet.data.io import atomic_write
from resunet.errors import ConfigError
from resunet.infer.postprocess import logits_to_labels
from resunet.infer.predictor import predict_case_logits
from resunet.train.config import StageConfig, TrainConfig
from resunet.train.distributed import DistInfo, broadcast_from_main

__all__ = ["PSEUDO_LABEL_FOLDER", "PseudoLabelledCase", "PseudoLabeller", "case_confidence", "curriculum_keep",
           "labelling_epochs", "training_cases"]

PSEUDO_LABEL_FOLDER = "pseudo_labels"
CONFIDENCE_FILE = "confidence.json"

console = Console(stderr=True)


@dataclass
class PseudoLabelledCase:
    """An unlabelled case with the model's label: ``image`` ``(C, *S)`` (the cached memory map),
    ``label`` ``(*S)`` uint8; `PatchSampler` takes it like a cached labelled case."""

    case_id: str
    image: np.ndarray
    label: np.ndarray
    class_locations: dict[int, np.ndarray] | None = None  # the sampler finds them when needed


def labelling_epochs(total_epochs: int, fractions: Sequence[float]) -> list[int]:
    """0-based epochs at whose start the unlabelled cases are (re)labelled: ``round(f * total)``
    for each fraction, at least 1 (a model that has trained), below ``total``, sorted, unique."""
    if total_epochs < 2:
        return []
    return sorted({int(min(total_epochs - 1, max(1, round(f * total_epochs)))) for f in fractions})


def case_confidence(logits: torch.Tensor) -> float:
    """How sure the model is of a case's label: the mean top-class probability over the voxels
    whose label is not background (``logits`` ``(K, *S)``; one channel: sigmoid). 0.0 when no voxel
    is foreground (an empty label is the least trusted)."""
    logits = logits.float()
    if logits.shape[0] == 1:
        p = torch.sigmoid(logits[0])
        top, foreground = torch.maximum(p, 1 - p), p > 0.5
    else:
        probs = torch.softmax(logits, dim=0)
        top, label = probs.max(dim=0)
        foreground = label > 0
    return float(top[foreground].mean()) if bool(foreground.any()) else 0.0


def curriculum_keep(confidence: Sequence[float], labelling: int, labellings: int) -> list[int]:
    """Indices of the cases that train after the ``labelling``-th (1-based) of ``labellings``: the
    ``ceil(labelling / labellings * n)`` most confident, in their original order (ties: earlier first)."""
    n = len(confidence)
    keep = min(n, -(-labelling * n // max(1, labellings)))
    ranked = sorted(range(n), key=lambda i: (-confidence[i], i))[:keep]
    return sorted(ranked)


def training_cases(labelled: Sequence[Any], pseudo: Sequence[Any]) -> list[Any]:
    """The cases an epoch samples from: ``labelled`` repeated ``max(1, round(len(pseudo) /
    len(labelled)))`` times, then ``pseudo`` (the sampler draws cases uniformly, so about half the
    patches come from real labels however many unlabelled images there are)."""
    if not pseudo:
        return list(labelled)
    repeat = max(1, round(len(pseudo) / max(1, len(labelled))))
    return [*labelled] * repeat + [*pseudo]


class PseudoLabeller:
    """The pseudo-label part of a run: when to label, the labels, and their files.

    ``config``: the run's `TrainConfig`; ``cases``: the unlabelled cached cases (``.case_id``,
    ``.image`` ``(C, *S)``); ``run_dir``: where ``pseudo_labels/`` goes; ``dist``: this process's
    place in DDP (rank 0 writes the files).
    """

    def __init__(self, config: TrainConfig, cases: Sequence[Any], run_dir: Path | str,
                 dist: DistInfo = DistInfo()) -> None:
        if not cases:
            raise ConfigError("semi_supervised.enabled needs unlabelled images (see semi_supervised.enabled in "
                              "docs/config.md for where they go)")
        self.config, self.cases, self.run_dir, self.dist = config, list(cases), Path(run_dir), dist
        self.epoch: int | None = None  # the labelling epoch of the labels in use
        self.labelled: list[PseudoLabelledCase] = []

    def due(self, epoch: int) -> bool:
        """Label at the start of ``epoch`` (0-based)? Not when the labels in use are that epoch's."""
        fractions = self.config.semi_supervised.pseudo_label_at
        return epoch in labelling_epochs(self.config.total_epochs, fractions) and self.epoch != epoch

    def folder(self, epoch: int) -> Path:
        return self.run_dir / PSEUDO_LABEL_FOLDER / f"epoch_{epoch:04d}"

    @torch.no_grad()
    def relabel(self, model: nn.Module, epoch: int, stage: StageConfig, amp: bool) -> None:
        """Every unlabelled case through ``model`` (the student, not its DDP wrapper) at the cached
        geometry; the argmax is its label from ``epoch`` on; rank 0 writes the files."""
        t0, data = time.perf_counter(), self.config.data
        was_training = model.training
        model.eval()
        # each rank's BatchNorm statistics are its own after a forward pass: label with rank 0's
        broadcast_from_main([b for b in model.buffers() if b.dtype.is_floating_point], self.dist)
        device = next(model.parameters()).device
        labels, confidence = [], []
        for case in track(self.cases, description=f"pseudo-labels before epoch {epoch + 1}", console=console,
                          transient=True, disable=not self.dist.is_main):
            image = torch.from_numpy(np.array(case.image, dtype=np.float32)).to(device)
            logits = predict_case_logits(model, image, mode=data.mode, context=data.context, divisor=model.divisor,
                                         patch_size=stage.patch_size, batch_size=self.config.val_batch_size, amp=amp)
            labels.append(logits_to_labels(logits).cpu().numpy())
            confidence.append(case_confidence(logits))
        model.train(was_training)
        self._use(epoch, labels, confidence)
        if self.dist.is_main:
            folder = self.folder(epoch)
            folder.mkdir(parents=True, exist_ok=True)
            for case, label in zip(self.cases, labels):
                with atomic_write(folder / f"{case.case_id}.npy") as tmp:
                    np.save(tmp, label)
            with atomic_write(folder / CONFIDENCE_FILE) as tmp:
                Path(tmp).write_text(json.dumps(dict(zip([c.case_id for c in self.cases], confidence))))
            console.print(f"pseudo-labels: {len(labels)} unlabelled case(s) labelled by the model before epoch "
                          f"{epoch + 1} in {time.perf_counter() - t0:.0f} s ({folder}); the "
                          f"{len(self.labelled)} most confident train")

    def _use(self, epoch: int, labels: list[np.ndarray], confidence: Sequence[float]) -> None:
        """Labels of ``epoch`` in use; with the curriculum, only the most confident cases train."""
        keep: Sequence[int] = range(len(self.cases))
        semi = self.config.semi_supervised
        points = labelling_epochs(self.config.total_epochs, semi.pseudo_label_at)
        if semi.pseudo_label_curriculum and epoch in points:
            keep = curriculum_keep(confidence, points.index(epoch) + 1, len(points))
        self._keep(epoch, labels, [self.cases[i].case_id for i in keep])

    def _keep(self, epoch: int, labels: list[np.ndarray], case_ids: Sequence[str]) -> None:
        chosen = set(case_ids)
        self.epoch = epoch
        self.labelled = [PseudoLabelledCase(c.case_id, c.image, lab)
                         for c, lab in zip(self.cases, labels) if c.case_id in chosen]

    def training_cases(self, labelled: Sequence[Any]) -> list[Any]:
        """`training_cases` of ``labelled`` and the pseudo-labelled cases (none before the first labelling)."""
        return training_cases(labelled, self.labelled)

    def state_dict(self) -> dict[str, Any]:
        """What ``last.pt`` keeps to resume: the labelling epoch of the labels in use (None: none yet)
        and the cases that train on them (the curriculum's choice, kept even if the schedule shrinks)."""
        return {"epoch": self.epoch, "cases": [c.case_id for c in self.labelled]}

    def load_state_dict(self, state: dict[str, Any] | None, source: str = "the checkpoint") -> None:
        if not state or "epoch" not in state:
            raise ConfigError(f"{source} holds no pseudo-label state: it was trained without semi_supervised "
                              "method pseudo_label; resume it with its own settings or start a new run")
        if state["epoch"] is None:
            return
        epoch, folder = int(state["epoch"]), self.folder(int(state["epoch"]))
        missing = [c.case_id for c in self.cases if not (folder / f"{c.case_id}.npy").is_file()]
        if missing:
            raise ConfigError(f"{source} trains on the pseudo-labels of epoch {epoch}, but {folder} lacks "
                              f"{missing[:3]}{' ...' if len(missing) > 3 else ''}; restore that folder or start a new run")
        self._keep(epoch, [np.load(folder / f"{c.case_id}.npy") for c in self.cases],
                   state.get("cases", [c.case_id for c in self.cases]))
