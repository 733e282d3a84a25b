"""N4 bias correction: it removes a known smooth field from a two-tissue phantom, leaves a flat
image about alone, and runs in preprocessing only on the channels asked for."""

import numpy as np
import pytest

from resunet.data.bias_correction import n4_bias_field, n4_correct
from resunet.data.preprocess import PreprocessConfig, preprocess_case
from resunet.data.volume import Volume
from resunet.errors import InputError


def phantom(shape=(24, 96, 96), seed=0):
    """A head-like ellipsoid of 'white matter' (1.0) with a 'grey matter' shell (0.6) in air (0),
    light noise; returns (image, tissue masks)."""
    grid = np.indices(shape).astype(np.float32)
    centre = [(s - 1) / 2 for s in shape]
    r = np.sqrt(sum(((g - c) / (0.48 * s)) ** 2 for g, c, s in zip(grid[1:], centre[1:], shape[1:])))
    head = r < 1.0
    wm = r < 0.7
    gm = head & ~wm
    rng = np.random.default_rng(seed)
    image = np.where(wm, 1.0, np.where(gm, 0.6, 0.0)).astype(np.float32)
    image[head] += rng.normal(0, 0.01, int(head.sum())).astype(np.float32)
    return image, wm, gm


def smooth_field(shape, amplitude=0.25):
    """exp of a smooth 3-D ramp: +-amplitude across the field of view."""
    z, y, x = (np.linspace(-1, 1, s, dtype=np.float32) for s in shape)
    log = np.log1p(amplitude) * (0.7 * y[None, :, None] + 0.5 * x[None, None, :] + 0.2 * z[:, None, None]
                                 + 0.3 * y[None, :, None] * x[None, None, :]) / 1.7
    return np.exp(log).astype(np.float32)


def cv(values):
    return float(values.std() / values.mean())


def test_n4_removes_most_of_a_known_bias_field():
    image, wm, gm = phantom()
    field = smooth_field(image.shape)
    biased = image * field
    corrected = n4_correct(biased, (1.5, 1.0, 1.0))
    assert corrected.shape == image.shape and corrected.dtype == np.float32
    # the white matter is one tissue: the field spreads it, N4 narrows it back
    assert cv(corrected[wm]) < 0.5 * cv(biased[wm])
    # the two tissues stay apart (the contrast is not flattened away)
    assert np.median(corrected[wm]) / np.median(corrected[gm]) == pytest.approx(1 / 0.6, rel=0.05)
    assert np.all(corrected[image == 0] == 0)  # air stays zero


def test_n4_field_has_mean_one_and_leaves_a_flat_image_alone():
    image, wm, _ = phantom()
    biased = image * smooth_field(image.shape)
    field = n4_bias_field(biased, (1.5, 1.0, 1.0))
    mask = biased > 0.3
    assert float(field[mask].mean()) == pytest.approx(1.0, abs=0.02)  # the overall scale is kept
    flat_field = n4_bias_field(image, (1.5, 1.0, 1.0))
    assert float(np.abs(flat_field[wm] - 1).max()) < 0.05  # nothing to correct: about no change
    assert np.all(n4_bias_field(np.zeros((8, 16, 16), np.float32), (1, 1, 1)) == 1)  # empty image


def test_n4_accepts_a_few_negative_voxels_and_checks_shapes():
    image, wm, _ = phantom((20, 64, 64))
    image[0, 0, 0] = -0.01  # interpolation ringing in a resampled scan
    out = n4_correct(image * smooth_field(image.shape), (1, 1, 1))
    assert np.isfinite(out).all() and out[0, 0, 0] < 0
    with pytest.raises(InputError, match="spacing per axis"):
        n4_bias_field(image, (1.0, 1.0))


def test_preprocess_corrects_only_the_named_channels():
    image, wm, _ = phantom((20, 64, 64))
    field = smooth_field(image.shape)
    two = np.stack([image * field, image * field])
    vol = Volume(two, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), np.eye(3), 3)
    out = preprocess_case([vol], None, PreprocessConfig(n4_channels=(0,), normalization="none",
                                                         crop_to_nonzero=False))
    assert cv(out.image[0][wm]) < 0.5 * cv(out.image[1][wm])
    np.testing.assert_array_equal(out.image[1], two[1])  # channel 1 untouched
    with pytest.raises(InputError, match=r"n4_channels \[2\].*2 channel"):
        preprocess_case([vol], None, PreprocessConfig(n4_channels=(2,)))
