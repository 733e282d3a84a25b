"""Semi-supervised training by pseudo-labels: when the model labels, what the sampler draws from,
the label files, and a short `fit` that labels the unlabelled images and resumes exactly."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import resunet.train.trainer as trainer
from resunet.errors import ConfigError, InputError
from resunet.model import load_checkpoint
from resunet.plan.planner import _semi_supervised
from resunet.train.config import config_from_dict
from resunet.train.pseudo_labels import (PSEUDO_LABEL_FOLDER, PseudoLabeller, case_confidence, curriculum_keep,
                                        labelling_epochs, training_cases)
from resunet.train.signals import TrainingInterrupted
from resunet.train.trainer import fit

# the fixtures too: one thread for these tiny networks, and the squares dataset (one per module)
from test_semi_supervised import EXTRA, NO_LABEL, dataset, no_curves, one_thread, semi_config  # noqa: F401


def test_labelling_epochs_have_their_known_values():
    assert labelling_epochs(28, [0.4, 0.7]) == [11, 20]
    assert labelling_epochs(28, [0.7, 0.4, 0.41]) == [11, 20]  # sorted, one labelling per epoch
    assert labelling_epochs(10, [0.01]) == [1]  # never before the model has trained an epoch
    assert labelling_epochs(10, [0.99]) == [9]  # never after the last epoch has started
    assert labelling_epochs(1, [0.5]) == []  # one epoch: nothing to label for


def test_about_half_the_sampled_cases_carry_real_labels():
    labelled, pseudo = [f"l{i}" for i in range(20)], [f"p{i}" for i in range(136)]
    cases = training_cases(labelled, pseudo)
    assert cases.count("l0") == 7 and cases.count("p0") == 1  # round(136 / 20) = 7 copies of each real one
    assert len(cases) == 7 * 20 + 136
    assert training_cases(labelled, []) == labelled  # before the first labelling
    assert training_cases(["l0"] * 10, ["p0"]) == ["l0"] * 10 + ["p0"]  # fewer unlabelled: no repeat


class SignModel(torch.nn.Module):
    """Logits (-x, x) of the first channel: the label is ``image > 0``."""

    divisor = 1

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(()))

    def forward(self, x):
        centre = x[:, x.shape[1] // 2 : x.shape[1] // 2 + 1] * self.w
        return torch.cat([-centre, centre], dim=1)


def _labeller(tmp_path: Path, mode: str = "2d", context: int = 1) -> tuple[PseudoLabeller, list]:
    rng = np.random.default_rng(0)
    cases = [SimpleNamespace(case_id=f"u{i}", image=rng.normal(size=(1, 5, 12, 10)).astype(np.float32))
             for i in range(3)]
    cfg = config_from_dict(semi_config(Path("."), tmp_path / "run", method="pseudo_label"))
    cfg.data.mode, cfg.data.context = mode, context
    return PseudoLabeller(cfg, cases, tmp_path / "run"), cases


@pytest.mark.parametrize("mode, context", [("2d", 1), ("3d", 0)])
def test_relabel_takes_the_models_argmax_and_writes_it(tmp_path, mode, context):
    labeller, cases = _labeller(tmp_path, mode, context)
    stage = labeller.config.stages[0].model_copy(update={"patch_size": [4, 8, 8] if mode == "3d" else [8, 8]})
    labeller.relabel(SignModel(), 1, stage, amp=False)
    assert labeller.epoch == 1 and [c.case_id for c in labeller.labelled] == ["u0", "u1", "u2"]
    for case, got in zip(cases, labeller.labelled):
        expected = (case.image[0] > 0).astype(np.uint8)
        np.testing.assert_array_equal(got.label, expected)
        assert got.image is case.image  # the cached memory map itself, not a copy
        np.testing.assert_array_equal(np.load(tmp_path / "run" / PSEUDO_LABEL_FOLDER / "epoch_0001" / "u0.npy"),
                                      labeller.labelled[0].label)
    assert labeller.state_dict() == {"epoch": 1, "cases": ["u0", "u1", "u2"]}
    assert not labeller.due(1)  # these labels are epoch 1's already


def test_the_lr_schedule_restarts_at_each_labelling_epoch(tmp_path):
    cfg = config_from_dict(semi_config(Path("."), tmp_path / "run", method="pseudo_label"))
    cfg.stages = [cfg.stages[0].model_copy(update={"epochs": 10, "iterations_per_epoch": 10})]
    cfg.schedule.warmup_iterations, cfg.semi_supervised.pseudo_label_at = 0, [0.4, 0.7]
    factor = trainer._lr_schedule(cfg)
    assert labelling_epochs(10, [0.4, 0.7]) == [4, 7]
    assert factor(39) < 0.05 and factor(40) == 1.0 and factor(69) < 0.1 and factor(70) == 1.0
    cfg.semi_supervised.method = "mean_teacher"  # one decay over the run
    assert trainer._lr_schedule(cfg)(40) == pytest.approx((1 - 40 / 100) ** cfg.schedule.poly_exponent)


def test_case_confidence_and_the_curriculum_have_their_known_values():
    logits = torch.tensor([[[2.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [1.0, 3.0]]])  # (K=2, 2, 2)
    p1, p3 = torch.sigmoid(torch.tensor(1.0)), torch.sigmoid(torch.tensor(3.0))  # the two foreground voxels
    assert case_confidence(logits) == pytest.approx(float(p1 + p3) / 2)
    assert case_confidence(torch.zeros(2, 3, 3)) == 0.0  # ties go to class 0: no foreground, least trusted
    assert case_confidence(torch.tensor([[[-4.0, 2.0]]])) == pytest.approx(float(torch.sigmoid(torch.tensor(2.0))))
    confidence = [0.5, 0.9, 0.7, 0.6, 0.9]
    assert curriculum_keep(confidence, 1, 2) == [1, 2, 4]  # ceil(5 / 2) = 3 surest, in case order
    assert curriculum_keep(confidence, 1, 3) == [1, 4]
    assert curriculum_keep(confidence, 2, 2) == [0, 1, 2, 3, 4]


def _scaled_labeller(tmp_path: Path, curriculum: bool = True) -> tuple[PseudoLabeller, list[int]]:
    """Four cases whose intensity scale sets the SignModel's confidence (0.1 least, 3 most sure)."""
    rng = np.random.default_rng(0)
    cases = [SimpleNamespace(case_id=f"u{i}", image=(scale * rng.normal(size=(1, 5, 12, 10))).astype(np.float32))
             for i, scale in enumerate((0.1, 3.0, 1.0, 0.3))]
    cfg = config_from_dict(semi_config(Path("."), tmp_path / "run", method="pseudo_label"))
    cfg.data.mode, cfg.data.context = "2d", 1
    cfg.semi_supervised.pseudo_label_curriculum = curriculum
    cfg.stages = [cfg.stages[0].model_copy(update={"epochs": 10})]  # labellings before epochs 4 and 7
    return PseudoLabeller(cfg, cases, tmp_path / "run"), labelling_epochs(cfg.total_epochs, cfg.semi_supervised.pseudo_label_at)


def test_the_first_labelling_trains_the_surest_cases_and_the_last_all(tmp_path):
    labeller, points = _scaled_labeller(tmp_path)
    assert len(points) == 2
    stage = labeller.config.stages[0].model_copy(update={"patch_size": [8, 8]})
    labeller.relabel(SignModel(), points[0], stage, amp=False)
    assert [c.case_id for c in labeller.labelled] == ["u1", "u2"]  # ceil(4 / 2) surest: scales 3 and 1
    assert json.loads((labeller.folder(points[0]) / "confidence.json").read_text())["u1"] > 0.9
    again, _ = _scaled_labeller(tmp_path)
    again.config.stages = [again.config.stages[0].model_copy(update={"epochs": 7})]  # the schedule shrank
    again.load_state_dict(labeller.state_dict())  # a resumed run trains the same cases
    assert [c.case_id for c in again.labelled] == ["u1", "u2"]
    labeller.relabel(SignModel(), points[1], stage, amp=False)
    assert [c.case_id for c in labeller.labelled] == ["u0", "u1", "u2", "u3"]
    everyone, _ = _scaled_labeller(tmp_path / "off", curriculum=False)
    everyone.relabel(SignModel(), points[0], stage, amp=False)
    assert len(everyone.labelled) == 4


def test_resume_reloads_the_labels_of_its_epoch_and_names_a_missing_file(tmp_path):
    labeller, cases = _labeller(tmp_path)
    labeller.relabel(SignModel(), 3, labeller.config.stages[0], amp=False)
    again, _ = _labeller(tmp_path)
    again.load_state_dict({"epoch": 3}, "run/last.pt")
    for a, b in zip(labeller.labelled, again.labelled):
        np.testing.assert_array_equal(a.label, b.label)
    fresh, _ = _labeller(tmp_path)
    fresh.load_state_dict({"epoch": None})
    assert fresh.labelled == [] and fresh.epoch is None
    (tmp_path / "run" / PSEUDO_LABEL_FOLDER / "epoch_0003" / "u1.npy").unlink()
    with pytest.raises(ConfigError, match=r"pseudo-labels of epoch 3.*epoch_0003 lacks \['u1'\]"):
        _labeller(tmp_path)[0].load_state_dict({"epoch": 3}, "run/last.pt")
    with pytest.raises(ConfigError, match="without semi_supervised method pseudo_label"):
        _labeller(tmp_path)[0].load_state_dict({"teacher": {}}, "run/last.pt")  # a mean-teacher run


def test_the_plan_names_the_method_and_refuses_an_unknown_one():
    tree: dict = {}
    choice = _semi_supervised(tree, "pseudo_label", 12)
    assert tree["semi_supervised"] == {"enabled": True, "method": "pseudo_label", "pseudo_label_at": [0.4, 0.7]}
    assert "12 unlabelled" in choice.reason
    _semi_supervised(tree, "mean_teacher", 12)
    assert tree["semi_supervised"] == {"enabled": True, "method": "mean_teacher"}
    with pytest.raises(InputError, match="mean_teacher or pseudo_label"):
        _semi_supervised(tree, "fixmatch", 12)
    with pytest.raises(ConfigError):
        config_from_dict(semi_config(Path("."), Path("run"), method="pseudo_label", pseudo_label_at=[1.0]))


def test_pseudo_label_fit_trains_on_the_labelled_images_and_resumes_exactly(dataset, tmp_path, monkeypatch):
    no_curves(monkeypatch)
    drawn: list[list[str]] = []
    real_sampler = trainer.PatchSampler

    def recording_sampler(cases, *args, **kwargs):
        drawn.append([getattr(c, "case_id", "?") for c in cases])
        return real_sampler(cases, *args, **kwargs)

    monkeypatch.setattr(trainer, "PatchSampler", recording_sampler)
    full = fit(config_from_dict(semi_config(dataset, tmp_path / "full", method="pseudo_label")))
    unlabelled = sorted(NO_LABEL + EXTRA)
    folder = full.run_dir / PSEUDO_LABEL_FOLDER / "epoch_0001"  # 2 epochs: labelled after the first
    assert sorted(p.stem for p in folder.glob("*.npy")) == unlabelled
    epoch_samplers = [d for d in drawn if len(d) > 1]  # the precision timing's sampler is not an epoch's
    assert not set(unlabelled) & set(epoch_samplers[0])  # epoch 1: real labels only
    assert set(unlabelled) <= set(epoch_samplers[-1])  # epoch 2: the pseudo-labelled cases too
    assert "case_03" not in epoch_samplers[-1]  # the validation case never trains
    ckpt = load_checkpoint(full.run_dir / "last.pt")
    assert ckpt["training_state"]["semi_supervised"] == {"epoch": 1, "cases": unlabelled}  # one labelling: all

    real_step, steps = trainer.train_step, []

    def step_then_signal(*args, **kwargs):
        loss = real_step(*args, **kwargs)
        steps.append(loss)
        if len(steps) == 5:  # epoch 2, iteration 2 of 3: after the labelling
            os.kill(os.getpid(), signal.SIGTERM)
        return loss

    monkeypatch.setattr(trainer, "train_step", step_then_signal)
    cfg = config_from_dict(semi_config(dataset, tmp_path / "stopped", method="pseudo_label"))
    with pytest.raises(TrainingInterrupted):
        fit(cfg)
    assert load_checkpoint(tmp_path / "stopped" / "last.pt")["training_state"]["semi_supervised"] == {"epoch": 1, "cases": unlabelled}
    monkeypatch.setattr(trainer, "train_step", real_step)
    relabelled = []
    real_relabel = PseudoLabeller.relabel
    monkeypatch.setattr(PseudoLabeller, "relabel", lambda self, *a, **k: relabelled.append(a) or real_relabel(self, *a, **k))
    fit(cfg, resume=True)
    assert relabelled == []  # the resumed epoch trains on the saved labels, not new ones
    resumed = load_checkpoint(tmp_path / "stopped" / "last.pt")
    for name, tensor in ckpt["state_dict"].items():
        assert torch.equal(tensor, resumed["state_dict"][name]), name
