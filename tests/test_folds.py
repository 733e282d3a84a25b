"""K-fold cross-validation (`resunet.train.folds`), the planner's share of the budget per fold and
the ensemble of the folds at predict (`resunet.infer.ensemble`)."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from resunet.data.io import read_volume
from resunet.errors import ConfigError, InputError, ModelError
from resunet.infer.ensemble import EnsemblePredictor, mean_probabilities_as_logits, open_predictor
from resunet.infer.predictor import Predictor
from resunet.model import model_from_checkpoint
from resunet.nets import build_model, model_config
from resunet.plan import plan_dataset
from resunet.train import folds as folds_module
from resunet.train.config import config_from_dict
from resunet.train.folds import fold_splits, read_ensemble, train_folds

sys.path.insert(0, str(Path(__file__).parent))
from test_plan import _fake_speed, blob_case, write_case, write_json  # noqa: E402
from test_train import tiny_config, tiny_dataset  # noqa: E402,F401


def test_fold_splits_partition_every_case_once():
    ids = [f"c{i}" for i in range(11)]
    parts = fold_splits(ids, 3, seed=0)
    assert len(parts) == 3 and sorted(sum(parts, [])) == sorted(ids)
    assert all(len(set(a) & set(b)) == 0 for i, a in enumerate(parts) for b in parts[i + 1:])
    assert sorted(len(p) for p in parts) == [3, 4, 4]
    assert all(p == sorted(p, key=ids.index) for p in parts)  # each part in the ids' order
    assert fold_splits(ids, 3, seed=0) == parts and fold_splits(ids, 3, seed=1) != parts
    with pytest.raises(ConfigError, match="at least 2 folds"):
        fold_splits(ids, 1)
    with pytest.raises(ConfigError, match="--folds 11 or fewer"):
        fold_splits(ids, 12)


def _blobs(root: Path, n: int) -> Path:
    for i in range(n):
        image, label = blob_case((6, 24, 24), (3, 12, 12), 4 + i % 3)
        write_case(root, f"c{i}", image, label, spacing=(4.0, 1.0, 1.0))
    write_json(root, {"background": 0, "x": 1})
    return root


def test_plan_with_folds_gives_each_fold_its_share_of_the_budget(tmp_path, monkeypatch):
    root = _blobs(tmp_path / "Blobs", 6)
    _fake_speed(monkeypatch, 0.05)
    one = plan_dataset(root, 4, cache_dir=tmp_path / "cache", progress=False).config
    three = plan_dataset(root, 4, cache_dir=tmp_path / "cache", progress=False, folds=3).config
    assert one.folds == 1 and one.data.val_fraction == 0.0  # 6 cases: no validation without folds
    assert three.folds == 3 and three.data.val_fraction == pytest.approx(1 / 3)
    assert three.max_minutes == pytest.approx(one.max_minutes / 3, rel=0.05)
    steps = lambda c: c.stages[0].epochs * c.stages[0].iterations_per_epoch  # noqa: E731
    assert steps(three) < steps(one) / 2.5  # a third of the time, and validations come off it
    assert any(c["key"] == "folds" for c in three.plan["choices"])
    with pytest.raises(InputError, match="--folds 6 or fewer"):
        plan_dataset(root, 4, cache_dir=tmp_path / "cache", progress=False, folds=7)
    _fake_speed(monkeypatch, 2.5)  # 50 steps fit 4 min once (~3.8 min left), not three times
    plan_dataset(root, 4, cache_dir=tmp_path / "cache", progress=False)
    with pytest.raises(InputError, match=r"\(3 folds, one model each\).*or fewer --folds"):
        plan_dataset(root, 4, cache_dir=tmp_path / "cache", progress=False, folds=3)


def _random_predictor(seed: int, labels: dict | None = None, out_channels: int = 3) -> Predictor:
    torch.manual_seed(seed)
    model = build_model("resunet", spatial_dims=2, in_channels=3, out_channels=out_channels, base_channels=4,
                        depth=3).eval()
    with torch.no_grad():  # spread the logits so the classes of a random model differ between voxels
        model.head.weight.mul_(50.0)
    checkpoint = {
        "state_dict": model.state_dict(), "model": model_config(model),
        "preprocess": {"modality": "mr", "normalization": "zscore", "crop_to_nonzero": False,
                       "target_spacing": [2.0, 1.0, 1.0]},
        "labels": labels or {"background": 0, "a": 1, "b": 2},
        "inference": {"mode": "2d", "context": 1, "patch_size": [16, 16]},
    }
    return Predictor(model_from_checkpoint(checkpoint, f"model{seed}.pt"), backend="eager")


def test_ensemble_probabilities_are_the_mean_of_the_members(tmp_path):
    from resunet.data.volume import Volume

    rng = np.random.default_rng(0)
    image = Volume(rng.normal(100, 20, size=(5, 12, 14)).astype(np.float32), (3.0, 1.0, 1.0), (0.0,) * 3,
                   np.eye(3), 3)  # 3 mm slices: resampled to the plan's 2 mm and back
    a, b = _random_predictor(0), _random_predictor(1)
    pa, pb = a.predict_probabilities([image]), b.predict_probabilities([image])
    both = EnsemblePredictor([a, b], "two")
    assert np.allclose(both.predict_probabilities([image]), (pa + pb) / 2, atol=1e-5)
    mask = both.predict([image])
    assert mask.shape == image.shape and np.array_equal(mask.array, ((pa + pb) / 2).argmax(0))
    assert not np.array_equal(mask.array, pa.argmax(0))  # the members disagree somewhere
    # a model ensembled with itself is that model
    assert np.array_equal(EnsemblePredictor([a, a], "self").predict([image]).array, a.predict([image]).array)
    # shared 2-D batches across cases (the server's path) give the same masks
    many = both.predict_many([[image], [image]])
    assert all(np.array_equal(m.array, mask.array) for m in many)
    with pytest.raises(ModelError, match="labels"):
        EnsemblePredictor([a, _random_predictor(2, {"background": 0, "a": 1, "c": 2})], "mixed")


def test_binary_ensemble_keeps_the_mean_sigmoid():
    logits = [torch.tensor([[[-3.0, 0.5]]]), torch.tensor([[[1.0, 2.0]]])]
    mean = torch.sigmoid(mean_probabilities_as_logits(logits))
    expected = (torch.sigmoid(logits[0]) + torch.sigmoid(logits[1])) / 2
    assert torch.allclose(mean, expected, atol=1e-6)
    three = [torch.tensor([[2.0], [0.0], [-1.0]]), torch.tensor([[-1.0], [3.0], [0.0]])]
    probs = torch.softmax(mean_probabilities_as_logits(three), dim=0)
    assert torch.allclose(probs, (torch.softmax(three[0], 0) + torch.softmax(three[1], 0)) / 2, atol=1e-6)


@pytest.mark.slow
def test_train_folds_ensemble_record_resume_and_predict(tiny_dataset, tmp_path, monkeypatch):  # noqa: F811
    import yaml

    from resunet.cli import main

    tree = tiny_config(tiny_dataset, tmp_path, **{
        "stages": [{"patch_size": [32, 32], "batch_size": 4, "epochs": 1, "iterations_per_epoch": 2}]})
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(tree))
    with pytest.raises(SystemExit) as stop:  # `resunet train --config tiny.yaml --folds 2`
        main(["train", "--config", str(tmp_path / "tiny.yaml"), "--folds", "2"])
    assert stop.value.code in (0, None)
    cfg = config_from_dict({**tree, "folds": 2})
    run = Path(cfg.output_dir)
    record = read_ensemble(run)
    assert record["complete"] and record["members"] == ["fold_0/final.pt", "fold_1/final.pt"]  # each fold's final weights
    val = [record["validation"][f"fold_{k}"]["cases"] for k in (0, 1)]
    training = sorted(p.name.split("_0000")[0] for p in (tiny_dataset / "imagesTr").glob("*_0000.nii.gz"))
    assert sorted(val[0] + val[1]) == training and not set(val[0]) & set(val[1])
    for k in (0, 1):  # each fold validated on its own part and trained on the rest
        fold_cfg = (run / f"fold_{k}" / "config.yaml").read_text()
        assert all(c in fold_cfg for c in val[k]) and "folds: 1" in fold_cfg
    dice = [record["validation"][f"fold_{k}"]["best_val_dice"] for k in (0, 1)]
    assert record["cv_dice"] == pytest.approx(np.mean(dice)) and 0 <= record["cv_dice"] <= 1

    # resume (`resunet train --resume RUN`): finished folds are not trained again
    monkeypatch.setattr(folds_module, "fit", lambda *a, **k: pytest.fail("a finished fold was trained again"))
    with pytest.raises(SystemExit) as stop:
        main(["train", "--resume", str(run)])
    assert stop.value.code in (0, None)
    assert train_folds(cfg, resume=True).cv_dice == pytest.approx(record["cv_dice"])

    # predict from the run folder: the ensemble of both folds
    images = sorted((tiny_dataset / "imagesTs").glob("*_0000.nii.gz"))
    predictor = open_predictor(run, batch_size=4)
    assert isinstance(predictor, EnsemblePredictor) and len(predictor.members) == 2
    out = tmp_path / "pred"
    with pytest.raises(SystemExit) as stop:
        main(["predict", "-m", str(run), "-i", str(images[0].parent), "-o", str(out)])
    assert stop.value.code in (0, None)
    mask = read_volume(out / images[0].name.replace("_0000", ""))
    image = read_volume(images[0])
    assert mask.shape == image.shape
    assert np.array_equal(mask.array, predictor.predict([image]).array)

    # a run folder whose record lists a checkpoint that is gone: the error names it
    (run / "fold_1" / "final.pt").unlink()
    with pytest.raises(InputError, match="fold_1/final.pt"):
        open_predictor(run)
    with pytest.raises(InputError, match="without final.pt, best.pt or ensemble.json"):
        open_predictor(tmp_path)


def test_ensemble_json_is_written_after_each_fold(tiny_dataset, tmp_path, monkeypatch):  # noqa: F811
    """An interrupted cross-validation keeps the finished folds: the record lists them, marked incomplete."""
    from resunet.train.trainer import FitResult

    calls = []

    def fake_fit(config, resume=False):
        calls.append((Path(config.output_dir).name, list(config.data.val_cases), resume))
        if len(calls) == 2:
            raise KeyboardInterrupt
        Path(config.output_dir).mkdir(parents=True)
        (Path(config.output_dir) / "best.pt").write_bytes(b"x")
        return FitResult(Path(config.output_dir), 1, 0.5, False)

    monkeypatch.setattr(folds_module, "fit", fake_fit)
    cfg = config_from_dict(tiny_config(tiny_dataset, tmp_path, folds=3))
    with pytest.raises(KeyboardInterrupt):
        train_folds(cfg)
    record = json.loads((Path(cfg.output_dir) / "ensemble.json").read_text())
    assert record["members"] == ["fold_0/best.pt"] and not record["complete"] and record["folds"] == 3
    calls.clear()
    def finishing_fit(config, resume=False):
        calls.append(Path(config.output_dir).name)
        Path(config.output_dir).mkdir(parents=True, exist_ok=True)
        (Path(config.output_dir) / "final.pt").write_bytes(b"x")
        return FitResult(Path(config.output_dir), 1, 0.6, False)

    monkeypatch.setattr(folds_module, "fit", finishing_fit)
    assert len(train_folds(cfg, resume=True).folds) == 3
    assert calls == ["fold_1", "fold_2"]
    record = json.loads((Path(cfg.output_dir) / "ensemble.json").read_text())
    # each fold's model: final.pt where the schedule ran to its end, else best.pt
    assert record["members"] == ["fold_0/best.pt", "fold_1/final.pt", "fold_2/final.pt"] and record["complete"]
