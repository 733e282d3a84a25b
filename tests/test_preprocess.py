import json

import numpy as np
import pytest

from resunet.data.preprocess import (
    CT_WINDOW_PRESETS,
    PreprocessConfig,
    crop_to_nonzero,
    dynamic_window,
    preprocess_case,
    resample_image,
    resample_label,
    restore_original_geometry,
    uncrop,
    window_ct,
    zscore,
)
from resunet.data.volume import Volume
from resunet.errors import ConfigError, InputError

# an oblique-ish direction (axis permutation + flip) so geometry bugs cannot hide behind identity
DIRECTION = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, -1.0]])


def _volume(array, spacing=(3.0, 0.8, 0.8), origin=(10.0, -20.0, 30.0), direction=DIRECTION):
    ndim = len(spacing)
    return Volume(array, spacing, origin, direction if ndim == 3 else np.eye(2), spatial_ndim=ndim)


def _sphere_label(shape, spacing, centre_mm, radius_mm, value=1, label=None):
    grids = np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing)], indexing="ij")
    dist2 = sum((g - c) ** 2 for g, c in zip(grids, centre_mm))
    out = np.zeros(shape, np.uint8) if label is None else label
    out[dist2 <= radius_mm**2] = value
    return out


def _dice(a, b):
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


# ---------------------------------------------------------------------------- intensities


def test_window_ct_known_values():
    out = window_ct(np.array([-1000.0, -160.0, 40.0, 240.0, 3000.0]), width=400, level=40)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [0.0, 0.0, 0.5, 1.0, 1.0], atol=1e-6)
    with pytest.raises(ConfigError):
        window_ct(np.zeros(3), width=0, level=0)


def test_presets_plausible():
    for name in ("brain", "subdural", "stroke", "lung", "mediastinum", "abdomen", "liver", "bone"):
        width, level = CT_WINDOW_PRESETS[name]
        assert 0 < width <= 4000 and -1000 < level < 1000
    assert CT_WINDOW_PRESETS["brain"] == (80.0, 40.0)
    assert CT_WINDOW_PRESETS["lung"] == (1500.0, -600.0)
    assert CT_WINDOW_PRESETS["lung"][1] < 0 < CT_WINDOW_PRESETS["bone"][1]


def test_dynamic_window_uses_foreground_percentiles(rng):
    image = np.full((20, 20), -1000.0)
    image[5:15, 5:15] = rng.uniform(0, 100, size=(10, 10))
    mask = image > -500
    width, level = dynamic_window(image, mask, 0.0, 100.0)
    fg = image[mask]
    assert width == pytest.approx(fg.max() - fg.min())
    assert level == pytest.approx((fg.max() + fg.min()) / 2)
    w_all, _ = dynamic_window(image)  # no mask: all voxels, air included
    assert w_all > 1000


def test_zscore_inside_mask(rng):
    image = rng.normal(50, 7, size=(8, 16, 16)).astype(np.float32)
    mask = np.zeros(image.shape, bool)
    mask[2:6, 3:12, 4:10] = True
    image[~mask] = 0
    out = zscore(image, mask)
    assert out[mask].mean() == pytest.approx(0.0, abs=1e-5)
    assert out[mask].std() == pytest.approx(1.0, abs=1e-4)
    assert np.all(out[~mask] == 0)
    whole = zscore(image)
    assert whole.mean() == pytest.approx(0.0, abs=1e-5)
    # constant foreground: no division by zero, only centring
    const = zscore(np.full((4, 4), 7.0), np.ones((4, 4), bool))
    assert np.all(np.isfinite(const)) and np.all(const == 0)


# ---------------------------------------------------------------------------- resampling


@pytest.mark.parametrize("mode", ["nearest", "linear"])
def test_resampled_labels_only_contain_input_values(mode):
    spacing = (3.0, 0.8, 0.8)
    label = _sphere_label((16, 40, 40), spacing, (24, 16, 16), 10, value=2)
    label = _sphere_label((16, 40, 40), spacing, (20, 18, 14), 4, value=5, label=label)
    vol = _volume(label, spacing)
    out = resample_label(vol, (1.1, 1.3, 0.7), mode=mode)
    assert set(np.unique(out.array)) <= {0, 2, 5}
    assert set(np.unique(out.array)) == {0, 2, 5}
    assert out.array.dtype == label.dtype


def test_resample_geometry_and_round_trip(rng):
    spacing = (3.0, 0.8, 0.8)
    image = rng.normal(size=(2, 12, 30, 25)).astype(np.float32)  # two channels
    vol = _volume(image, spacing)
    target = (1.0, 1.0, 1.0)
    out = resample_image(vol, target, order=3)
    assert out.array.shape[0] == 2
    assert out.spacing == target and out.origin == vol.origin
    np.testing.assert_allclose(out.direction, vol.direction)
    old_extent = np.array(vol.shape) * np.array(spacing)
    new_extent = np.array(out.shape) * np.array(target)
    assert np.all(np.abs(new_extent - old_extent) <= np.array(target))
    back = resample_image(out, spacing, order=1)
    assert back.array.shape == image.shape
    # voxel 0 keeps its world position (ITK convention)
    np.testing.assert_allclose(out.index_to_world()[:3, 3], vol.index_to_world()[:3, 3])


def test_resample_same_spacing_is_identity(rng):
    image = rng.normal(size=(6, 7, 8)).astype(np.float32)
    vol = _volume(image, (2.0, 1.0, 1.0))
    for order in (1, 3):
        same = resample_image(vol, (2.0, 1.0, 1.0), order=order)
        np.testing.assert_array_equal(same.array, image)
    label = (image > 0).astype(np.uint8)
    for mode in ("nearest", "linear"):
        out = resample_label(vol.with_array(label), (2.0, 1.0, 1.0), mode=mode)
        np.testing.assert_array_equal(out.array, label)


def test_resample_linear_image_samples_world_positions():
    # a linear ramp along z is reproduced exactly by linear interpolation at the new positions
    z = np.arange(10, dtype=np.float32)
    image = np.broadcast_to(z[:, None, None], (10, 4, 4)).copy()
    vol = _volume(image, (2.0, 1.0, 1.0))
    out = resample_image(vol, (1.0, 1.0, 1.0), order=1)
    assert out.shape == (20, 4, 4)
    # new voxel i sits at old index i / 2; beyond the last old voxel values are clamped
    np.testing.assert_allclose(out.array[:19, 0, 0], np.arange(19) / 2.0, atol=1e-5)
    assert out.array[19, 0, 0] == pytest.approx(9.0)


@pytest.mark.parametrize("order", [0, 1, 3])
def test_resample_matches_scipy_affine_transform(order, rng):
    from scipy import ndimage

    image = rng.normal(size=(9, 13, 11)).astype(np.float32)
    spacing, target = (2.0, 0.7, 1.1), (1.3, 1.0, 0.6)
    out = resample_image(_volume(image, spacing), target, order=order)
    factors = np.array(target) / np.array(spacing)
    if order == 0:  # exact index selection: round(i * factor)
        idx = [np.minimum(np.floor(np.arange(m) * f + 0.5).astype(int), n - 1)
               for m, f, n in zip(out.shape, factors, image.shape)]
        np.testing.assert_array_equal(out.array, image[np.ix_(*idx)])
        return
    ref = ndimage.affine_transform(
        image, factors, output_shape=out.shape, order=order, mode="nearest", prefilter=order > 1
    )
    np.testing.assert_allclose(out.array, ref, atol=1e-4)


def test_resample_2d_volume(rng):
    image = rng.normal(size=(3, 20, 30)).astype(np.float32)  # RGB-like 2-D
    vol = Volume(image, (0.5, 0.5), (0.0, 0.0), np.eye(2), spatial_ndim=2)
    out = resample_image(vol, (1.0, 1.0), order=1)
    assert out.array.shape == (3, 10, 15)
    label = Volume((image[0] > 0).astype(np.uint8), (0.5, 0.5), (0, 0), np.eye(2), spatial_ndim=2)
    assert resample_label(label, (1.0, 1.0), mode="linear").array.shape == (10, 15)
    with pytest.raises(ConfigError):
        resample_image(vol, (1.0, 1.0, 1.0))


# ---------------------------------------------------------------------------- cropping


def test_crop_uncrop_round_trip_and_geometry(rng):
    image = np.zeros((2, 10, 20, 30), np.float32)
    image[0, 2:5, 4:9, 10:20] = rng.uniform(1, 2, size=(3, 5, 10))
    image[1, 6, 15, 25] = 3.0
    label = (image[0] > 0).astype(np.uint8)
    vol = _volume(image, (2.5, 0.7, 0.9))
    lab = _volume(label, (2.5, 0.7, 0.9))
    cimg, clab, bbox = crop_to_nonzero(vol, lab, margin=1)
    assert bbox == (slice(1, 8), slice(3, 17), slice(9, 27))
    assert cimg.array.shape == (2, 7, 14, 18) and clab.array.shape == (7, 14, 18)
    # a voxel keeps its world position
    for idx in [(2, 4, 10), (6, 15, 25), (1, 3, 9)]:
        full = vol.index_to_world() @ np.array([*idx, 1.0])
        local = np.array([i - s.start for i, s in zip(idx, bbox)] + [1.0])
        np.testing.assert_allclose(cimg.index_to_world() @ local, full)
        np.testing.assert_allclose(clab.index_to_world() @ local, full)
    np.testing.assert_array_equal(uncrop(cimg.array, bbox, vol.shape), image)
    np.testing.assert_array_equal(uncrop(clab.array, bbox, vol.shape), label)
    filled = uncrop(clab.array, bbox, vol.shape, fill=7)
    assert filled[0, 0, 0] == 7
    # an all-zero image is not cropped
    _, _, full_box = crop_to_nonzero(vol.with_array(np.zeros_like(image)))
    assert full_box == tuple(slice(0, n) for n in vol.shape)


# ---------------------------------------------------------------------------- config


def test_config_round_trip_and_validation():
    cfg = PreprocessConfig(
        modality="ct", ct_window=(400, 40), target_spacing=(1.5, 1, 1), label_resampling="nearest"
    )
    dumped = cfg.model_dump()
    assert PreprocessConfig.model_validate(dumped) == cfg
    assert PreprocessConfig.model_validate_json(cfg.model_dump_json()) == cfg
    assert PreprocessConfig.model_validate(json.loads(cfg.model_dump_json())) == cfg
    assert PreprocessConfig(ct_window="dynamic").ct_window == "dynamic"
    assert PreprocessConfig(modality="ct").resolved_normalization == "ct_window"
    assert PreprocessConfig(modality="mr").resolved_normalization == "zscore"
    for bad in (
        {"unknown_key": 1},
        {"ct_window": "no_such_window"},
        {"ct_window": (-5, 40)},
        {"target_spacing": (1.0, -1.0, 1.0)},
        {"label_resampling": "cubic"},
        {"modality": "pet"},
    ):
        with pytest.raises(Exception):
            PreprocessConfig(**bad)


# ---------------------------------------------------------------------------- whole case


@pytest.mark.parametrize("mode", ["nearest", "linear"])
@pytest.mark.parametrize("target", [(0.8, 0.8, 0.8), (1.0, 1.0, 1.0)])
def test_preprocess_and_restore_anisotropic(mode, target, rng):
    spacing = (3.0, 0.8, 0.8)
    shape = (24, 64, 64)
    label = _sphere_label(shape, spacing, (36, 25, 26), 18, value=1)
    label = _sphere_label(shape, spacing, (38, 28, 24), 9, value=2, label=label)
    body = _sphere_label(shape, spacing, (36, 25, 25), 23) > 0
    image = np.zeros(shape, np.float32)
    image[body] = rng.normal(100, 10, size=body.sum())
    image += label * 50.0 * body
    cfg = PreprocessConfig(
        modality="mr", target_spacing=target, label_resampling=mode, crop_margin=2
    )
    pre = preprocess_case([_volume(image, spacing)], _volume(label, spacing), cfg)
    props = pre.properties
    assert pre.image.dtype == np.float32 and pre.image.ndim == 4 and pre.image.shape[0] == 1
    assert pre.label.dtype == np.uint8 and pre.label.shape == pre.image.shape[1:]
    assert pre.spacing == target
    assert props["shape_after_crop"] != props["original_shape"]  # it did crop
    assert props["label_values"] == [0, 1, 2]
    json.dumps(props)  # serialisable

    restored = restore_original_geometry(pre.label, props)
    assert restored.shape == shape and restored.dtype == pre.label.dtype
    assert _dice(restored > 0, label > 0) > 0.98
    # upsampling only (target = in-plane spacing): every original voxel is recovered exactly;
    # 0.8 -> 1.0 mm in-plane loses detail, so the small inner sphere only gets > 0.97
    floor = 0.999 if target[1] == spacing[1] else 0.97
    for value in (1, 2):
        assert _dice(restored == value, label == value) > floor
    probs = np.stack([pre.label == k for k in (0, 1, 2)]).astype(np.float32)
    back = restore_original_geometry(probs, props)
    assert back.shape == (3, *shape) and back.dtype == np.float32
    outside = np.ones(shape, bool)
    outside[tuple(slice(a, b) for a, b in props["crop_bbox"])] = False
    assert outside.any() and np.all(back[:, outside] == 0)  # outside the crop box: fill value
    assert _dice(back.argmax(0) > 0, label > 0) > 0.98

    # before resampling: z-scored inside the non-zero region, background 0
    plain = preprocess_case([_volume(image, spacing)], None, {"modality": "mr"})
    box = tuple(slice(a, b) for a, b in plain.properties["crop_bbox"])
    inside = body[box]
    assert plain.image[0][inside].mean() == pytest.approx(0.0, abs=1e-4)
    assert plain.image[0][inside].std() == pytest.approx(1.0, abs=1e-3)
    assert np.all(plain.image[0][~inside] == 0)


def test_preprocess_ct_window_2d_and_multichannel(rng):
    hu = rng.uniform(-1000, 1000, size=(20, 30)).astype(np.float32)
    vol = Volume(hu, (0.5, 0.5), (0, 0), np.eye(2), spatial_ndim=2)
    cfg = PreprocessConfig(modality="ct", ct_window="abdomen", crop_to_nonzero=False)
    pre = preprocess_case([vol, vol], None, cfg)
    assert pre.image.shape == (2, 20, 30) and pre.label is None
    np.testing.assert_allclose(pre.image[0], window_ct(hu, 400, 50))
    assert restore_original_geometry(pre.image, pre.properties).shape == (2, 20, 30)
    dyn = preprocess_case([vol], None, PreprocessConfig(modality="ct", ct_window="dynamic"))
    assert dyn.image.min() >= 0 and dyn.image.max() <= 1


def test_preprocess_rejects_mismatched_inputs():
    a = _volume(np.ones((4, 5, 6), np.float32))
    b = _volume(np.ones((4, 5, 7), np.float32))
    with pytest.raises(InputError):
        preprocess_case([a, b], None, PreprocessConfig())
    with pytest.raises(InputError):
        preprocess_case([a], b.with_array(np.zeros((4, 5, 7), np.uint8)), PreprocessConfig())
    with pytest.raises(InputError):
        preprocess_case([a], a.with_array(np.full((4, 5, 6), 0.5)), PreprocessConfig())
    with pytest.raises(ConfigError):
        preprocess_case([a], None, {"target_spacing": (1.0, 1.0)})


def test_fixed_normalisation_uses_the_given_statistics():
    from resunet.data.preprocess import PreprocessConfig, preprocess_case
    from resunet.data.volume import Volume

    image = Volume(np.array([[[0.0, 100.0], [200.0, 300.0]]]), (1, 1, 1), (0, 0, 0), np.eye(3))
    cfg = PreprocessConfig(normalization="fixed", intensity_mean=100.0, intensity_std=50.0, crop_to_nonzero=False)
    out = preprocess_case([image], None, cfg).image
    assert np.allclose(out, [[[[-2.0, 0.0], [2.0, 4.0]]]])
