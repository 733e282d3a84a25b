"""Semi-supervised training (mean teacher): the loss, the EMA, the ramp, where unlabelled images come
from, the image-only cache and sampler, and a short `fit` that saves an ordinary model and resumes
exactly."""

from __future__ import annotations

import json
import math
import os
import signal
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from resunet.data.cache import build_cache
from resunet.data.datasets import find_dataset, validate_dataset
from resunet.data.io import read_volume
from resunet.data.sampling import PatchSampler
from resunet.errors import ConfigError, InputError
from resunet.infer.predictor import Predictor
from resunet.model import load_checkpoint, load_model
from resunet.train.config import config_from_dict
from resunet.train.distributed import DistInfo
from resunet.train.precision import StepSettings
from resunet.train.logger import RunLogger
from resunet.train.semi_supervised import (
    MeanTeacher,
    consistency_loss,
    ema_update,
    global_iteration,
    sigmoid_rampup,
    view_configs,
)
from resunet.train.signals import TrainingInterrupted
from resunet.train.trainer import fit, split_cases

SHAPE = (24, 24, 5)  # nibabel (X, Y, Z): 5 slices of 24 x 24
LABELLED = ("case_00", "case_01", "case_02", "case_03")
NO_LABEL = ("case_04", "case_05")  # in imagesTr/, no file in labelsTr/
EXTRA = ("extra_00", "extra_01")  # imagesUnlabelled/


def _save(path: Path, data: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.diag([1.0, 1.0, 2.0, 1.0])), str(path))


def _case(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A bright square (label 1) at a random place in noise."""
    label = np.zeros(SHAPE, np.uint8)
    x, y = rng.integers(3, 13, size=2)
    label[x:x + 8, y:y + 8, 1:4] = 1
    image = (rng.normal(100, 10, SHAPE) + 60 * label).astype(np.float32)
    return image, label


def make_dataset(root: Path, extra: bool = True, no_label: bool = True) -> Path:
    rng = np.random.default_rng(0)
    ids = LABELLED + (NO_LABEL if no_label else ())
    for cid in ids:
        image, label = _case(rng)
        _save(root / "imagesTr" / f"{cid}_0000.nii.gz", image)
        if cid in LABELLED:
            _save(root / "labelsTr" / f"{cid}.nii.gz", label)
    for cid in EXTRA if extra else ():
        _save(root / "imagesUnlabelled" / f"{cid}_0000.nii.gz", _case(rng)[0])
    (root / "labelsTr").mkdir(parents=True, exist_ok=True)
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "MR"}, "labels": {"background": 0, "square": 1},
        "numTraining": len(LABELLED), "file_ending": ".nii.gz"}))
    return root


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These networks are tiny: one thread is as fast, and far faster on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("semi") / "Dataset001_Squares")


def semi_config(dataset: Path, out: Path, **semi) -> dict:
    return {
        "data": {"dataset": str(dataset), "cache_dir": str(out.parent / "cache"), "val_cases": ["case_03"],
                 "preprocess": {"modality": "mr"}, "mode": "2d", "foreground_fraction": 0.5},
        "model": {"name": "resunet", "base_channels": 4, "depth": 3},
        "optimizer": {"lr": 0.01},
        "stages": [{"patch_size": [16, 16], "batch_size": 2, "epochs": 1, "iterations_per_epoch": 3},
                   {"patch_size": [24, 24], "batch_size": 2, "epochs": 1, "iterations_per_epoch": 3}],
        "semi_supervised": {"enabled": True, "rampup_fraction": 0.5, "unlabelled_batch_size": 3, **semi},
        "seed": 1, "deterministic": True, "output_dir": str(out),
        "precision": "fp32", "memory_format": "contiguous",  # no timed choice: the compared runs must match
    }


# --------------------------------------------------------------------------- the pieces


def test_consistency_loss_is_zero_on_agreement_and_grows_with_disagreement():
    torch.manual_seed(0)
    for channels in (1, 3):  # binary (sigmoid) and multi-class (softmax)
        teacher = torch.randn(2, channels, 6, 6)
        direction = torch.zeros_like(teacher)
        direction[:, -1] = 1.0  # raise the last class's logit: its probability rises, the others fall
        for kind in ("mse", "kl"):
            assert consistency_loss(teacher.clone(), teacher, kind).item() == 0.0
            values = [consistency_loss(teacher + s * direction, teacher, kind).item() for s in (0.5, 1, 2, 4, 8)]
            assert all(a < b for a, b in zip(values, values[1:])), (channels, kind, values)
    # known value: binary logits 0 (p = 0.5) vs ln 3 (p = 0.75): (0.25^2 + 0.25^2) per voxel
    s, t = torch.zeros(1, 1, 2, 2), torch.full((1, 1, 2, 2), math.log(3.0))
    assert consistency_loss(s, t, "mse").item() == pytest.approx(0.125)
    with pytest.raises(ConfigError, match="mse"):
        consistency_loss(s, t, "l1")


def test_consistency_loss_sends_gradients_to_the_student_only():
    student = torch.zeros(1, 2, 3, 3, requires_grad=True)
    teacher = torch.zeros(1, 2, 3, 3)
    teacher[:, 0] = 2.0
    teacher.requires_grad_()
    consistency_loss(student, teacher).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0 and teacher.grad is None


def test_ema_update_follows_the_formula():
    teacher, student = torch.nn.BatchNorm2d(2), torch.nn.BatchNorm2d(2)
    with torch.no_grad():
        teacher.weight.fill_(1.0), student.weight.fill_(3.0)
        teacher.running_mean.fill_(0.0), student.running_mean.fill_(10.0)
        student.num_batches_tracked.fill_(7)
    # step 0: d = min(0.99, 1 - 1/1) = 0, the teacher becomes the student
    assert ema_update(teacher, student, 0.99, 0) == 0.0
    assert torch.equal(teacher.weight, student.weight) and int(teacher.num_batches_tracked) == 7
    with torch.no_grad():
        teacher.weight.fill_(1.0), teacher.running_mean.fill_(0.0)
    # step 1: d = min(0.99, 1 - 1/2) = 0.5
    assert ema_update(teacher, student, 0.99, 1) == 0.5
    assert torch.allclose(teacher.weight, torch.full((2,), 2.0)) and torch.allclose(teacher.running_mean, torch.full((2,), 5.0))
    # step 500: d = 0.99 -> 0.99 * 2 + 0.01 * 3 = 2.01
    assert ema_update(teacher, student, 0.99, 500) == pytest.approx(0.99)
    assert torch.allclose(teacher.weight, torch.full((2,), 2.01))
    assert torch.equal(student.weight, torch.full((2,), 3.0))  # the student is untouched


def test_the_ramp_has_its_known_values():
    assert sigmoid_rampup(0, 100) == 0.0
    assert sigmoid_rampup(100, 100) == 1.0 and sigmoid_rampup(250, 100) == 1.0
    floor = math.exp(-5)
    assert sigmoid_rampup(50, 100) == pytest.approx((math.exp(-1.25) - floor) / (1 - floor))
    values = [sigmoid_rampup(i, 100) for i in range(0, 101, 10)]
    assert all(a < b for a, b in zip(values, values[1:]))
    assert sigmoid_rampup(0, 0) == 1.0  # no ramp-up: the full weight from the start
    cfg = config_from_dict(semi_config(Path("."), Path("run"), consistency_weight=2.0))
    teacher = MeanTeacher(cfg, torch.nn.Conv2d(1, 1, 1), [(np.zeros((1, 4, 8, 8), np.float32), None)], "cpu")
    total = 3 + 3  # iterations of all stages; ramp-up over half of them
    assert teacher.weight(0) == 0.0 and teacher.weight(total // 2) == 2.0 and teacher.weight(total) == 2.0
    assert 0 < teacher.weight(1) < teacher.weight(2) < 2.0
    assert global_iteration(cfg.stages, 1, 2) == 3 + 2


def test_views_share_the_spatial_transform_and_differ_in_intensity():
    cfg = config_from_dict(semi_config(Path("."), Path("run"), view_noise=0.0))
    for name in ("brightness", "contrast", "gamma"):
        setattr(getattr(cfg.augment, name), "p", 1.0)
    cfg.augment.flip.p = 1.0  # exact flips keep the square's two values (a rotation would interpolate)
    cfg.augment.rotation.enabled = cfg.augment.scale.enabled = False
    spatial, intensity = view_configs(cfg.augment)
    assert spatial.flip.enabled and not spatial.gamma.enabled
    assert intensity.gamma.enabled and not intensity.flip.enabled and not intensity.rotation.enabled
    image = np.zeros((1, 5, 24, 24), np.float32)
    image[:, :, 4:12, 6:14] = 5.0  # a square: where it lands tells the spatial transform
    mt = MeanTeacher(cfg, torch.nn.Conv2d(1, 1, 1), [(image, None)], "cpu")
    student, teacher = mt.views(0, 0)
    assert student.shape == teacher.shape == (3, 1, 16, 16)
    # voxel-aligned: the same voxels are bright in both views, with different intensities
    assert torch.equal(student > student.mean(dim=(2, 3), keepdim=True),
                       teacher > teacher.mean(dim=(2, 3), keepdim=True))
    assert not torch.allclose(student, teacher)
    # the draws depend on (seed, epoch, rank, iteration) only
    again = mt.views(0, 0)
    assert torch.equal(again[0], student) and torch.equal(again[1], teacher)
    assert not torch.equal(mt.views(0, 1)[0], student)
    other_rank = MeanTeacher(cfg, torch.nn.Conv2d(1, 1, 1), [(image, None)], "cpu", DistInfo(rank=1, world_size=2))
    assert not torch.equal(other_rank.views(0, 0)[0], student)


# --------------------------------------------------------------------------- data


def test_unlabelled_cases_are_found_and_never_labelled(dataset):
    with pytest.raises(InputError, match="case_04: image without label.*semi_supervised"):
        validate_dataset(find_dataset(dataset))  # without semi-supervised training: an error, as before
    assert find_dataset(dataset).unlabelled == []
    info = find_dataset(dataset, unlabelled=True)
    validate_dataset(info)
    assert [c.case_id for c in info.training] == list(LABELLED)
    assert sorted(c.case_id for c in info.unlabelled) == sorted(NO_LABEL + EXTRA)
    assert all(c.label is None for c in info.unlabelled)
    assert info.unlabelled_sources == {"imagesTr without label": 2, "imagesUnlabelled/": 2}
    extra = next(c for c in info.unlabelled if c.case_id == "extra_00")
    assert extra.images == [dataset / "imagesUnlabelled" / "extra_00_0000.nii.gz"]
    unlabelled = {c.case_id for c in info.unlabelled}
    for val_fraction in (0.25, 0.5):
        cfg = config_from_dict({**semi_config(dataset, Path("r")), "data": {
            "dataset": str(dataset), "val_fraction": val_fraction, "mode": "2d"}})
        train, val = split_cases(info, cfg)
        assert val and not (set(train) | set(val)) & unlabelled
        assert sorted(train + val) == list(LABELLED)
    cfg = config_from_dict({**semi_config(dataset, Path("r")), "data": {
        "dataset": str(dataset), "val_cases": ["extra_00"], "mode": "2d"}})
    with pytest.raises(ConfigError, match="unlabelled.*extra_00"):
        split_cases(info, cfg)


def test_an_unlabelled_id_that_repeats_a_labelled_one_is_a_problem(tmp_path):
    root = make_dataset(tmp_path / "d", no_label=False)
    os.rename(root / "imagesUnlabelled" / "extra_00_0000.nii.gz", root / "imagesUnlabelled" / "case_00_0000.nii.gz")
    with pytest.raises(InputError, match="case_00: an unlabelled image.*rename"):
        validate_dataset(find_dataset(root, unlabelled=True))


def test_msd_entries_without_label_are_unlabelled(tmp_path):
    root = tmp_path / "Task09"
    rng = np.random.default_rng(0)
    training = []
    for i in range(3):
        image, label = _case(rng)
        _save(root / "imagesTr" / f"sq_{i}.nii.gz", image)
        entry = {"image": f"./imagesTr/sq_{i}.nii.gz"}
        if i < 2:
            _save(root / "labelsTr" / f"sq_{i}.nii.gz", label)
            entry["label"] = f"./labelsTr/sq_{i}.nii.gz"
        training.append(entry)
    _save(root / "imagesUnlabelled" / "more.nii.gz", _case(rng)[0])
    (root / "dataset.json").write_text(json.dumps({
        "modality": {"0": "MR"}, "labels": {"0": "background", "1": "square"}, "numTraining": 2,
        "training": training, "test": []}))
    with pytest.raises(InputError, match="sq_2: image without label"):
        validate_dataset(find_dataset(root))
    info = find_dataset(root, unlabelled=True)
    validate_dataset(info)
    assert [c.case_id for c in info.training] == ["sq_0", "sq_1"]
    assert sorted(c.case_id for c in info.unlabelled) == ["more", "sq_2"]


def test_the_cache_and_the_sampler_take_image_only_cases(dataset, tmp_path):
    info = find_dataset(dataset, unlabelled=True)
    index = build_cache(info.training + info.unlabelled, {"modality": "mr"}, tmp_path / "cache", progress=False)
    case = index.load("extra_00")
    assert case.label is None and case.class_locations is None and case.image.shape[0] == 1
    assert not (index.directory / "extra_00_label.npy").exists()
    assert index.load("case_00").label is not None
    sampler = PatchSampler([index.load(c.case_id) for c in info.unlabelled], (16, 16), 4, 0.0, context=1, seed=0)
    sampler.reseed(1, 2, 0)
    images, labels = sampler.sample()
    assert labels is None and images.shape == (4, 3, 16, 16)
    sampler.reseed(1, 2, 0)
    assert torch.equal(sampler.sample()[0], images)  # seeded like the labelled sampler
    # uniform placements: the same draws as a labelled sampler's uniform (foreground_fraction 0) patches
    plain = [(c.image, np.zeros(c.image.shape[1:], np.uint8)) for c in (index.load(i.case_id) for i in info.unlabelled)]
    labelled = PatchSampler(plain, (16, 16), 4, 0.0, context=1, seed=0)
    labelled.reseed(1, 2, 0)
    assert torch.equal(labelled.sample()[0], images)
    with pytest.raises(ConfigError, match="foreground_fraction=0"):
        PatchSampler([index.load("extra_00")], (16, 16), 2, 0.33)
    with pytest.raises(InputError, match="labelled and unlabelled"):
        PatchSampler([index.load("extra_00"), index.load("case_00")], (16, 16), 2, 0.0)


# --------------------------------------------------------------------------- training


def no_curves(monkeypatch) -> None:
    """Skip the per-epoch plot (tested in test_train; here it would take most of the time)."""
    monkeypatch.setattr(RunLogger, "_write_curves", lambda self: None)


def test_semi_supervised_fit_saves_a_normal_model_and_resumes_exactly(dataset, tmp_path, monkeypatch):
    no_curves(monkeypatch)
    full = fit(config_from_dict(semi_config(dataset, tmp_path / "full")))
    ckpt = load_checkpoint(full.run_dir / "last.pt")
    teacher = ckpt["training_state"]["semi_supervised"]["teacher"]
    assert set(teacher) == set(ckpt["state_dict"])
    assert any(not torch.equal(teacher[k], ckpt["state_dict"][k]) for k in teacher)  # an average, not a copy
    best = load_checkpoint(full.run_dir / "best.pt")
    assert "training_state" not in best
    model = load_model(full.run_dir / "best.pt")  # an ordinary checkpoint: load_model / Predictor use it
    image = read_volume(dataset / "imagesUnlabelled" / "extra_01_0000.nii.gz")
    mask = Predictor(model).predict([image])
    assert mask.shape == image.shape and set(np.unique(mask.array).tolist()) <= {0, 1}

    # stopped by SIGTERM during the 5th step (epoch 2 of 2, iteration 2 of 3: a new stage), then resumed
    real_step, steps = MeanTeacher.step, []

    def step_then_signal(self, *args, **kwargs):
        loss = real_step(self, *args, **kwargs)
        steps.append(loss)
        if len(steps) == 5:
            os.kill(os.getpid(), signal.SIGTERM)
        return loss

    monkeypatch.setattr(MeanTeacher, "step", step_then_signal)
    cfg = config_from_dict(semi_config(dataset, tmp_path / "stopped"))
    with pytest.raises(TrainingInterrupted):
        fit(cfg)
    assert len(steps) == 5
    state = load_checkpoint(tmp_path / "stopped" / "last.pt")["training_state"]
    assert state["iteration"] == 2 and "teacher" in state["semi_supervised"]
    monkeypatch.undo()
    no_curves(monkeypatch)
    fit(cfg, resume=True)
    resumed = load_checkpoint(tmp_path / "stopped" / "last.pt")
    assert resumed["epoch"] == ckpt["epoch"] == 2
    for name, tensor in ckpt["state_dict"].items():
        assert torch.equal(tensor, resumed["state_dict"][name]), name
    for name, tensor in teacher.items():
        assert torch.equal(tensor, resumed["training_state"]["semi_supervised"]["teacher"][name]), name


def test_semi_supervised_without_unlabelled_images_is_a_config_error(tmp_path):
    root = make_dataset(tmp_path / "d", extra=False, no_label=False)
    with pytest.raises(ConfigError, match=r"no unlabelled image.*imagesUnlabelled/"):
        fit(config_from_dict(semi_config(root, tmp_path / "run")))
    assert not (tmp_path / "run" / "last.pt").exists()


def test_resuming_a_supervised_run_as_semi_supervised_is_refused():
    cfg = config_from_dict(semi_config(Path("."), Path("run")))
    mt = MeanTeacher(cfg, torch.nn.Conv2d(1, 1, 1), [(np.zeros((1, 4, 8, 8), np.float32), None)], "cpu")
    with pytest.raises(ConfigError, match="without semi_supervised"):
        mt.load_state_dict(None, "run/last.pt")


def test_the_planner_times_the_semi_supervised_step(dataset, tmp_path, monkeypatch):
    from resunet.plan.timing import time_training

    info = find_dataset(dataset, unlabelled=True)
    cases = build_cache(info.training, {"modality": "mr"}, tmp_path / "cache", progress=False).cases()
    cfg = config_from_dict(semi_config(dataset, tmp_path / "run"))
    real, iterations = MeanTeacher.step, []

    def counted(self, *args):
        iterations.append(args[-1])
        return real(self, *args)

    monkeypatch.setattr(MeanTeacher, "step", counted)
    timing = time_training(cfg, cases, 1, 1, settings=StepSettings(), repeats=2, warmup=1)
    assert iterations == [0, 1, 2] and len(timing.losses) == 3 and np.isfinite(timing.losses).all()
    cfg.semi_supervised.enabled = False
    time_training(cfg, cases, 1, 1, settings=StepSettings(), repeats=2, warmup=1)
    assert iterations == [0, 1, 2]  # a supervised plan times the plain step


def test_the_train_command_tells_the_planner_about_semi_supervised_training(tmp_path):
    from resunet.cli import _semi_requested

    assert _semi_requested(None, {}) is None
    assert _semi_requested(None, {"semi_supervised": {"enabled": True}}) == "mean_teacher"
    yaml_file = tmp_path / "extra.yaml"
    yaml_file.write_text("semi_supervised:\n  enabled: true\n")
    assert _semi_requested(yaml_file, {}) == "mean_teacher"
    assert _semi_requested(yaml_file, {"semi_supervised": {"method": "pseudo_label"}}) == "pseudo_label"
    assert _semi_requested(yaml_file, {"semi_supervised": {"enabled": False}}) is None  # --set wins


DDP_DRIVER = """
import sys
from pathlib import Path

import torch
import yaml

import resunet.train.trainer as trainer
from resunet.train.config import config_from_dict

out = Path(sys.argv[2])
epochs = trainer._train_epochs


def keep_what_each_rank_has(run):  # the teacher and the first unlabelled draw of this rank
    result = epochs(run)
    torch.save({"teacher": run.semi.teacher.state_dict(), "view": run.semi.views(0, 0)[0]},
               out / f"rank{run.dist.rank}.pt")
    return result


trainer._train_epochs = keep_what_each_rank_has
trainer.fit(config_from_dict(yaml.safe_load(Path(sys.argv[1]).read_text())))
"""


def test_under_ddp_each_rank_draws_its_own_patches_and_the_teachers_agree(dataset, tmp_path):
    import subprocess
    import sys

    import yaml

    cfg = semi_config(dataset, tmp_path / "run")
    cfg["stages"] = cfg["stages"][:1]
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    (tmp_path / "driver.py").write_text(DDP_DRIVER)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(tmp_path / "driver.py"), str(tmp_path / "cfg.yaml"), str(tmp_path)],
                       capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{i}.pt") for i in (0, 1)]
    assert not torch.equal(ranks[0]["view"], ranks[1]["view"])
    for name, tensor in ranks[0]["teacher"].items():
        assert torch.equal(tensor, ranks[1]["teacher"][name]), name
    saved = load_checkpoint(tmp_path / "run" / "last.pt")["training_state"]["semi_supervised"]["teacher"]
    assert all(torch.equal(saved[k], v) for k, v in ranks[0]["teacher"].items())
