"""Determinism guard of the training input pipeline (cache -> PatchSampler -> augment_batch).

Runs exactly what the training loop runs per iteration (`trainer.make_batch` with the per-epoch
RNGs from `trainer.augment_generator`) on a small crop of the demo's real MRI, with every spatial
transform (rotation, zoom, flips, elastic) and gamma switched on with probability 1.
"""

from pathlib import Path

import numpy as np
import pytest
import torch

from resunet.data.augment import AugmentConfig
from resunet.data.cache import build_cache
from resunet.data.datasets import find_dataset, read_label
from resunet.data.preprocess import PreprocessConfig
from resunet.data.sampling import PatchSampler
from resunet.demo import LABELS, prepare_dataset
from resunet.train.trainer import augment_generator, make_batch

BOX = (slice(80, 144), slice(60, 124))  # 64 x 64 voxels through cortex and white matter
PATCH, BATCH, CONTEXT = (48, 48), 8, 1


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    root = tmp_path_factory.mktemp("mni")
    dataset = prepare_dataset(root / "dataset", z_range=(70, 90), thickness=5, test_slabs=(), box=BOX)
    info = find_dataset(dataset)
    index = build_cache(info.training, PreprocessConfig(modality="mr"), root / "cache", progress=False,
                        label_reader=lambda p: read_label(p, info))
    return index.cases()


def full_augment() -> AugmentConfig:
    cfg = AugmentConfig.disabled()
    for name in ("rotation", "scale", "flip", "elastic", "gamma"):
        getattr(cfg, name).enabled = True
        getattr(cfg, name).p = 1.0
    cfg.elastic.alpha = (2.0, 6.0)
    return cfg


def batches(cases, seed: int, epoch: int = 0, rank: int = 0, n: int = 2, augment=None):
    """``n`` batches of one epoch, built as `trainer._fit` builds them (fresh sampler per stage,
    then the epoch's RNGs)."""
    sampler = PatchSampler(cases, PATCH, BATCH, foreground_fraction=0.5, context=CONTEXT, seed=0)
    sampler.reseed(seed, epoch, rank)
    generator = augment_generator(seed, epoch, rank)
    augment = full_augment() if augment is None else augment
    return [make_batch(sampler, augment, generator, "cpu") for _ in range(n)]


def test_same_seed_gives_bitwise_identical_batches(cases):
    first = batches(cases, seed=3, epoch=1)
    # the global RNGs must not matter: only (seed, epoch, rank) decides the batch
    torch.manual_seed(12345)
    np.random.seed(54321)
    second = batches(cases, seed=3, epoch=1)
    for (img_a, lab_a), (img_b, lab_b) in zip(first, second):
        assert img_a.shape == (BATCH, 2 * CONTEXT + 1, *PATCH) and img_a.dtype == torch.float32
        assert lab_a.shape == (BATCH, 1, *PATCH) and lab_a.dtype == torch.int64
        assert torch.equal(img_a, img_b)
        assert torch.equal(lab_a, lab_b)
    # consecutive batches of an epoch differ
    assert not torch.equal(first[0][0], first[1][0])


@pytest.mark.parametrize("other", [dict(seed=4, epoch=1), dict(seed=3, epoch=2), dict(seed=3, epoch=1, rank=1)])
def test_another_seed_epoch_or_rank_gives_another_batch(cases, other):
    (img_a, lab_a), = batches(cases, seed=3, epoch=1, n=1)
    (img_b, lab_b), = batches(cases, n=1, **other)
    assert not torch.equal(img_a, img_b)
    assert not torch.equal(lab_a, lab_b)


def test_augmented_labels_stay_in_the_label_set(cases):
    label_set = set(LABELS.values())
    plain = batches(cases, seed=7, n=3, augment=AugmentConfig.disabled())
    augmented = batches(cases, seed=7, n=3)
    for (_, lab_plain), (img, lab) in zip(plain, augmented):
        assert set(torch.unique(lab).tolist()) <= label_set
        assert torch.isfinite(img).all()
        # the spatial transform really resampled the labels (same slices, same sampler draws)
        assert not torch.equal(lab, lab_plain)
    every = torch.cat([lab for _, lab in augmented])
    assert set(torch.unique(every).tolist()) == label_set  # all classes present, nothing else


def test_no_interpolated_label_values_with_a_sparse_label_set(cases):
    """With labels {0, 3, 7} (any linear mix of two of them is outside the set) every augmented
    label voxel is one of the three: masks are resampled nearest-neighbour only."""
    lut = np.array([0, 3, 7], np.int16)
    sparse = [(case.image, lut[np.asarray(case.label)]) for case in cases]
    for lab in (lab for _, lab in batches(sparse, seed=11, n=3)):
        assert set(torch.unique(lab).tolist()) == {0, 3, 7}
