import numpy as np
import pytest
import torch

from resunet.data.preprocess import PreprocessedCase
from resunet.data.sampling import (
    PatchSampler,
    crop_patch,
    foreground_locations,
    sample_patch_centres,
    slice_indices,
    stack_context,
)
from resunet.errors import ConfigError, InputError


def _volume_with_slice_ids(c=2, d=6, h=5, w=4):
    # voxel value = 100 * channel + slice number, so stacks can be read back
    image = np.zeros((c, d, h, w), np.float32)
    image += (100 * np.arange(c))[:, None, None, None] + np.arange(d)[None, :, None, None]
    label = np.broadcast_to(np.arange(d)[:, None, None], (d, h, w)).astype(np.int16)
    return image, label


def test_slice_indices_stride():
    np.testing.assert_array_equal(slice_indices(10), np.arange(10))
    np.testing.assert_array_equal(slice_indices(10, stride=3), [0, 3, 6, 9])
    np.testing.assert_array_equal(slice_indices(10, stride=4), [0, 4, 8])
    np.testing.assert_array_equal(slice_indices(10, stride=4, include_last=True), [0, 4, 8, 9])
    np.testing.assert_array_equal(slice_indices(10, stride=4, offset=1), [1, 5, 9])
    with pytest.raises(ConfigError):
        slice_indices(10, stride=0)


def test_stack_context_order_and_edges():
    image, _ = _volume_with_slice_ids()
    stacks = stack_context(image, [0, 3, 5], context=2)
    assert stacks.shape == (3, 2 * 5, 5, 4)
    seen = stacks[:, :, 0, 0]
    # channel-major: channel c of slice z + j - k at c * (2k + 1) + j; edges replicated
    np.testing.assert_array_equal(seen[0], [0, 0, 0, 1, 2, 100, 100, 100, 101, 102])
    np.testing.assert_array_equal(seen[1], [1, 2, 3, 4, 5, 101, 102, 103, 104, 105])
    np.testing.assert_array_equal(seen[2], [3, 4, 5, 5, 5, 103, 104, 105, 105, 105])
    flat = stack_context(image, slice_indices(6, stride=2), context=0)
    assert flat.shape == (3, 2, 5, 4)
    np.testing.assert_array_equal(flat[:, 0, 0, 0], [0, 2, 4])
    with pytest.raises(InputError):
        stack_context(image, [6], 1)


def test_sampler_stacks_like_inference():
    """A 2.5-D training patch holds exactly what inference's stack_context gives for its slice."""
    image, label = _volume_with_slice_ids(c=2, d=6, h=8, w=8)
    image = image + np.random.default_rng(0).normal(size=image.shape).astype(np.float32)
    case = PreprocessedCase(image, label.copy(), (1.0, 1.0, 1.0), {})
    sampler = PatchSampler([case], (8, 8), 6, 0.0, context=2, seed=3)
    images, labels = sampler.sample()
    for b in range(images.shape[0]):
        z = int(labels[b, 0, 0, 0])
        expected = stack_context(image, [z], 2)[0]
        np.testing.assert_array_equal(np.asarray(images[b]), expected)


def test_crop_patch_pads_at_borders():
    array = np.arange(1, 1 + 2 * 4 * 5, dtype=np.float32).reshape(2, 4, 5)
    inner = crop_patch(array, (2, 2), (2, 3))
    np.testing.assert_array_equal(inner, array[:, 1:3, 1:4])
    corner = crop_patch(array, (0, 0), (4, 4))
    assert corner.shape == (2, 4, 4)
    assert np.all(corner[:, :2] == 0) and np.all(corner[:, :, :2] == 0)
    np.testing.assert_array_equal(corner[:, 2:, 2:], array[:, :2, :2])
    big = crop_patch(array[0], (2, 2), (8, 9))  # patch larger than the array
    assert big.shape == (8, 9) and big.sum() == array[0].sum()
    outside = crop_patch(array[0], (50, 50), (3, 3))
    assert outside.shape == (3, 3) and not outside.any()


def test_foreground_oversampling(rng):
    label = np.zeros((30, 40, 40), np.uint8)
    label[3:5, 30:33, 2:4] = 1  # tiny, off-centre objects of two classes
    label[25, 5, 35] = 2
    centres = sample_patch_centres(label, (8, 8, 8), 50, foreground_fraction=1.0, rng=rng)
    assert centres.shape == (50, 3)
    classes = set()
    for c in centres:
        patch = crop_patch(label, c, (8, 8, 8))
        assert patch.any()
        assert np.all(c >= 4) and np.all(c <= np.array([26, 36, 36]))  # kept inside the image
        classes |= set(np.unique(patch)) - {0}
    # both classes are drawn (class first, then a voxel), not only the big one
    assert classes == {1, 2}
    uniform = sample_patch_centres(label, (8, 8, 8), 200, foreground_fraction=0.0, rng=rng)
    assert uniform.min() >= 4 and np.all(uniform.max(0) <= np.array([26, 36, 36]))
    half = sample_patch_centres(label, (8, 8, 8), 100, foreground_fraction=0.5, rng=rng)
    assert all(crop_patch(label, c, (8, 8, 8)).any() for c in half[:50])
    empty = sample_patch_centres(np.zeros((5, 5)), (3, 3), 4, foreground_fraction=1.0, rng=rng)
    assert empty.shape == (4, 2)  # no foreground: uniform
    locs = foreground_locations(label, max_per_class=3)
    assert len(locs[1]) == 3 and len(locs[2]) == 1
    assert np.all(label[tuple(locs[1].T)] == 1)


def _cases(n=3, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        d, h, w = 12 + i, 20, 24
        label = np.zeros((d, h, w), np.uint8)
        label[2 + i : 4 + i, 3:6, 17:20] = 1
        image = rng.normal(size=(2, d, h, w)).astype(np.float32)
        out.append(PreprocessedCase(image, label, (1.0, 1.0, 1.0), {}))
    return out


def test_patch_sampler_3d_reproducible():
    cases = _cases()
    a = PatchSampler(cases, (8, 8, 8), batch_size=4, foreground_fraction=1.0, seed=7)
    b = PatchSampler(cases, (8, 8, 8), batch_size=4, foreground_fraction=1.0, seed=7)
    for (xa, ya), (xb, yb) in zip(a.batches(3), b.batches(3)):
        assert xa.shape == (4, 2, 8, 8, 8) and ya.shape == (4, 1, 8, 8, 8)
        assert xa.dtype == torch.float32 and ya.dtype == torch.int64
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
        assert all(ya[i].sum() > 0 for i in range(4))
    c = PatchSampler(cases, (8, 8, 8), batch_size=4, foreground_fraction=1.0, seed=8)
    other = PatchSampler(cases, (8, 8, 8), batch_size=4, foreground_fraction=1.0, seed=7)
    assert not torch.equal(c.sample()[0], other.sample()[0])


def test_patch_sampler_2d_context_and_padding():
    cases = _cases()
    # slices are 20 x 24: a 32 x 32 patch must be zero-padded in-plane
    sampler = PatchSampler(
        cases, (32, 32), batch_size=6, foreground_fraction=1.0, context=1, seed=0, as_tensor=False
    )
    assert sampler.in_channels == 6
    images, labels = sampler.sample()
    assert images.shape == (6, 6, 32, 32) and labels.shape == (6, 1, 32, 32)
    assert images.dtype == np.float32
    for i in range(6):
        assert labels[i].sum() > 0
        # padding: at most 20 x 24 non-zero pixels per channel
        assert np.count_nonzero(images[i, 1]) <= 20 * 24
        assert np.count_nonzero(images[i, 1]) > 0
    # stacks: channel c * 3 + j is slice clamp(z + j - 1) of channel c (value 100 c + slice + 1)
    image, _ = _volume_with_slice_ids(c=2, d=6, h=20, w=24)
    image += 1
    label = np.zeros((6, 20, 24), np.uint8)
    label[0, 5, 5] = label[5, 10, 10] = label[3, 15, 20] = 1
    ids = PatchSampler(
        [(image, label)], (32, 32), 12, foreground_fraction=1.0, context=1, seed=0, as_tensor=False
    )
    seen = set()
    for stack in ids.sample()[0]:
        values = [np.unique(ch[ch != 0]) for ch in stack]
        assert all(v.size == 1 for v in values)  # one slice per channel, padding is 0
        z = int(values[1][0]) - 1
        seen.add(z)
        expected = [max(z - 1, 0), z, min(z + 1, 5)]
        assert [int(v[0]) - 1 for v in values[:3]] == expected
        assert [int(v[0]) - 101 for v in values[3:]] == expected
    assert seen == {0, 3, 5}
    # 2-D cases work in 2-D mode too
    flat = PreprocessedCase(
        np.ones((1, 10, 12), np.float32), np.ones((10, 12), np.uint8), (1.0, 1.0), {}
    )
    x, y = PatchSampler([flat], (16, 16), 2, context=1, seed=0).sample()
    assert tuple(x.shape) == (2, 3, 16, 16) and int(y.sum()) == 2 * 120
    with pytest.raises(ConfigError):
        PatchSampler(cases, (8, 8, 8), context=1)
    with pytest.raises(InputError):
        PatchSampler([flat], (8, 8, 8))


def test_patch_sampler_uses_memmaps(tmp_path):
    case = _cases(1)[0]
    np.save(tmp_path / "img.npy", case.image)
    np.save(tmp_path / "lab.npy", case.label)
    image = np.load(tmp_path / "img.npy", mmap_mode="r")
    label = np.load(tmp_path / "lab.npy", mmap_mode="r")
    x, y = PatchSampler([(image, label)], (4, 16, 16), batch_size=3, seed=1).sample()
    assert tuple(x.shape) == (3, 2, 4, 16, 16) and tuple(y.shape) == (3, 1, 4, 16, 16)
