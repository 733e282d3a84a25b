"""The demo's pieces: its training plan, its threshold baseline and its configuration."""

from pathlib import Path

import numpy as np
import pytest

from resunet import demo
from resunet.demo import MAX_EPOCHS, MIN_EPOCHS, ThresholdRule, demo_config, plan_epochs, prepare_dataset
from resunet.metrics import dice
from resunet.data.datasets import find_dataset
from resunet.train.trainer import split_cases

BOX = (slice(90, 138), slice(70, 118))


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mni") / "dataset"
    return prepare_dataset(root, z_range=(70, 94), thickness=6, test_slabs=(3,), box=BOX)


def test_plan_fits_the_budget_and_is_clamped():
    # 0.65 s per step: 40 x 0.65 x 1.15 = 29.9 s per epoch; 480 s / 29.9 s = 16.05 -> 16
    assert plan_epochs(0.65, 8.0) == 16
    assert plan_epochs(0.65, 14.0) == 28
    assert plan_epochs(0.26, 8.0) == MAX_EPOCHS  # this box: 480 / 11.96 = 40 -> capped
    assert plan_epochs(5.0, 8.0) == MIN_EPOCHS  # a very slow machine still trains a little
    # more time never plans fewer epochs
    plans = [plan_epochs(0.5, m) for m in np.linspace(1, 30, 59)]
    assert plans == sorted(plans)


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


def test_demo_config_trains_every_training_slab_with_the_planned_epochs(small_dataset, tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "seconds_per_iteration", lambda config: 0.65)
    config = demo_config(small_dataset, tmp_path, minutes=8.0)
    assert config.stages[0].epochs == 16 and config.max_minutes == 8.0
    train, val = split_cases(find_dataset(small_dataset), config)
    assert val == [] and len(train) == len(list((small_dataset / "imagesTr").glob("*_0000.nii.gz")))
    # explicit epochs: no timing at all
    monkeypatch.setattr(demo, "seconds_per_iteration", lambda config: pytest.fail("timed"))
    assert demo_config(small_dataset, tmp_path, minutes=8.0, epochs=3).stages[0].epochs == 3


def test_seconds_per_iteration_times_a_real_training_step(small_dataset, tmp_path):
    config = demo_config(small_dataset, tmp_path, minutes=8.0, epochs=1)
    config.model.base_channels, config.model.depth = 4, 3
    config.stages[0].batch_size, config.stages[0].patch_size = 2, [32, 32]
    seconds = demo.seconds_per_iteration(config, repeats=2)
    assert np.isfinite(seconds) and seconds > 0
