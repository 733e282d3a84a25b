"""The demo's pieces: its data, its threshold baseline, and the plan the planner makes for it."""

from pathlib import Path

import numpy as np
import pytest

from resunet import demo
from resunet.demo import ThresholdRule, prepare_dataset
from resunet.metrics import dice
from resunet.data.datasets import find_dataset
from resunet.train.trainer import split_cases

BOX = (slice(90, 138), slice(70, 118))


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mni") / "dataset"
    return prepare_dataset(root, z_range=(70, 94), thickness=6, test_slabs=(3,), box=BOX)


def test_threshold_rule_recovers_known_thresholds():
    rng = np.random.default_rng(0)
    image = rng.uniform(0, 300, size=(4, 64, 64)).astype(np.float32)
    truth = np.zeros(image.shape, np.uint8)
    truth[(image >= 100) & (image < 200)] = 1
    truth[image >= 200] = 2
    rule = ThresholdRule.fit([image], [truth], bins=300)
    assert rule.low == pytest.approx(100, abs=1.0) and rule.high == pytest.approx(200, abs=1.0)
    labels = rule.apply(image)
    assert dice(labels == 1, truth == 1) > 0.99 and dice(labels == 2, truth == 2) > 0.99


def fake_speed(monkeypatch, seconds_2d: float, seconds_3d: float = 5.0):
    """Make the planner's timed steps return fixed figures (3-D / 2-D by patch length)."""
    from resunet.plan import planner, timing

    from resunet.train.precision import StepChoice, StepSettings

    def fake(config, cases, in_channels, out_channels, *, settings, **kw):
        s = seconds_3d if config.data.mode == "3d" else seconds_2d * config.model.base_channels / 8
        return timing.StepTiming(s / (1.5 if settings.precision == "bf16" else 1.0), [1.0, 0.9, 0.8], settings)

    def fake_choice(config, *args, **kw):  # bf16 measured 1.5x faster, its losses tracking fp32's
        return StepChoice(StepSettings("bf16", "contiguous"), "bf16 / contiguous: 1.50x faster (faked)")

    monkeypatch.setattr(planner, "time_training", fake)
    monkeypatch.setattr(planner, "planned_step_settings", fake_choice)


def test_the_demo_plan_trains_every_slab_and_fills_the_budget(small_dataset, tmp_path, monkeypatch):
    from resunet.plan import plan_dataset

    fake_speed(monkeypatch, seconds_2d=0.2)
    plan = plan_dataset(small_dataset, 8.0, output_dir=tmp_path / "run", cache_dir=tmp_path / "cache", progress=False)
    config = plan.config
    train, val = split_cases(find_dataset(small_dataset), config)
    assert val == [] and len(train) == len(list((small_dataset / "imagesTr").glob("*_0000.nii.gz")))
    assert config.data.mode == "2d" and config.data.context == 1  # 3-D at 5 s a step does not fit
    assert config.precision == "bf16"  # measured 1.5x faster, its losses tracking fp32's
    # base 8 at 0.2 / 1.5 s a step: widths 32 and 16 leave fewer than 1000 steps in 8 minutes
    assert config.model.base_channels in (8, 16)
    step = 0.2 * config.model.base_channels / 8 / 1.5
    steps = config.stages[0].epochs * config.stages[0].iterations_per_epoch
    assert 0.8 * 8 * 60 / step <= steps <= 8 * 60 / step
    # twice the minutes: never fewer steps
    more = plan_dataset(small_dataset, 16.0, output_dir=tmp_path / "run", cache_dir=tmp_path / "cache", progress=False)
    assert more.config.stages[0].epochs * more.config.stages[0].iterations_per_epoch >= steps


def test_reacquire_builds_an_oblique_coarser_grid_with_world_consistent_labels():
    from resunet.data.volume import Volume
    from resunet.demo import reacquire

    rng = np.random.default_rng(0)
    labels = np.zeros((30, 40, 36), np.uint8)
    labels[5:25, 8:32, 6:30] = 1
    labels[10:20, 14:26, 12:24] = 2
    image = Volume((50.0 + 50 * labels + rng.normal(0, 1, labels.shape)).astype(np.float32), (1.0, 1.0, 1.0),
                   (10.0, -20.0, 5.0), np.eye(3), 3)
    img, lab = reacquire(image, labels, 5, 25, spacing=(2.0, 1.2, 1.2), tilt_deg=(10.0, 6.0), seed=0)
    assert img.spacing == (2.0, 1.2, 1.2) and img.shape == lab.shape == (10, 33, 30)
    assert not np.allclose(img.direction, np.eye(3), atol=0.05)  # oblique
    assert np.allclose(img.direction.T @ img.direction, np.eye(3), atol=1e-9)  # still a rotation
    # every new voxel carries the label of the source voxel nearest to its world position
    new, src = lab.index_to_world(), image.index_to_world()
    for idx in [(0, 0, 0), (5, 16, 15), (9, 32, 29), (3, 10, 20)]:
        world = new @ np.array([*idx, 1.0])
        j = np.clip(np.rint(np.linalg.solve(src, world)[:3]).astype(int), 0, np.array(labels.shape) - 1)
        assert lab.array[idx] == labels[tuple(j)]
    # partial volume + corruption: the image is no longer the source's two clean levels
    assert set(np.unique(lab.array)) == {0, 1, 2} and np.std(img.array[lab.array == 2]) > 1.0
