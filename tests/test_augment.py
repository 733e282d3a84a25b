"""Tests for resunet.data.augment: batched on-device augmentation of image + mask."""

from __future__ import annotations

import math

import numpy as np
import pydantic
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from resunet.data.augment import spatial as S
from resunet.data.augment import (
    AugmentConfig,
    add_gaussian_noise,
    add_rician_noise,
    adjust_brightness,
    adjust_contrast,
    adjust_gamma,
    apply_spatial,
    augment_batch,
    augment_config_from_dict,
    bias_field,
    elastic_displacement,
    make_affine_matrices,
    random_affine_matrices,
)
from resunet.errors import ConfigError, InputError

SPATIAL = ("rotation", "scale", "flip", "elastic")
INTENSITY = ("bias_field", "brightness", "contrast", "gamma", "noise", "rician_noise")


# ------------------------------------------------------------------------------------- helpers


def _camera_batch(batch: int = 3) -> tuple[torch.Tensor, torch.Tensor, float]:
    """A smoothed non-square crop of skimage's camera (B, 1, 96, 128) and its thresholded mask."""
    from skimage import data

    cam = data.camera().astype(np.float32) / 255.0
    crop = ndimage.gaussian_filter(cam[60:444:4, 120:632:4][:, :128], 1.0)  # (96, 128)
    thr = float(crop.mean())
    img = torch.from_numpy(np.ascontiguousarray(crop))[None, None].repeat(batch, 1, 1, 1)
    return img, (img > thr).to(torch.int64), thr


def _blob_batch(batch: int = 2, shape=(48, 56, 52)) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Two anisotropic Gaussian blobs in a non-cubic volume, (B, 1, D, H, W), and their mask.

    Big enough (~10k voxels inside) that the unavoidable nearest-vs-trilinear disagreement on
    the boundary stays well under 5 % of the Dice."""
    axes = [torch.arange(s, dtype=torch.float32) for s in shape]
    zz, yy, xx = torch.meshgrid(*axes, indexing="ij")
    c = [s / 2 for s in shape]
    img = torch.exp(
        -(((zz - c[0] + 1) / 11) ** 2 + ((yy - c[1] + 3) / 14) ** 2 + ((xx - c[2] + 2) / 12.5) ** 2)
    )
    img = img + 0.8 * torch.exp(
        -(((zz - c[0] - 2) / 7) ** 2 + ((yy - c[1] - 14) / 7) ** 2 + ((xx - c[2] - 6) / 9) ** 2)
    )
    img = img[None, None].repeat(batch, 1, 1, 1, 1)
    return img, (img > 0.4).to(torch.int64), 0.4


def _only(*names: str, p: float = 1.0, **overrides) -> AugmentConfig:
    """Config with just the named transforms enabled, each with probability p."""
    cfg = AugmentConfig.disabled()
    for name in names:
        sub = getattr(cfg, name)
        sub.enabled, sub.p = True, p
    for path, value in overrides.items():
        section, key = path.split("__")
        setattr(getattr(cfg, section), key, value)
    return cfg


def _dice(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.bool(), b.bool()
    return float(2 * (a & b).sum() / (a.sum() + b.sum()).clamp_min(1))


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _centroid(img: torch.Tensor) -> torch.Tensor:
    """Intensity centroid of a (*S) tensor in centred pixel coordinates, array order."""
    coords = torch.meshgrid(
        *[torch.arange(s, dtype=torch.float64) - (s - 1) / 2 for s in img.shape], indexing="ij"
    )
    w = img.double().clamp_min(0)
    return torch.stack([(c * w).sum() / w.sum() for c in coords])


# ------------------------------------------------------------------------------------ identity


@pytest.mark.parametrize("dims", [2, 3])
def test_identity_config_returns_input_exactly(dims):
    img, mask, _ = _camera_batch() if dims == 2 else _blob_batch()
    img = img + 0.01 * torch.randn(img.shape, generator=_gen(5))  # no accidental symmetry
    zero_p = AugmentConfig()
    for name in SPATIAL + INTENSITY:
        sub = getattr(zero_p, name)
        sub.enabled, sub.p = True, 0.0
    for cfg in (zero_p, AugmentConfig.disabled()):
        out, out_mask = augment_batch(img, mask, cfg, _gen())
        assert torch.equal(out, img) and torch.equal(out_mask, mask)
        assert out.data_ptr() != img.data_ptr() and out_mask.data_ptr() != mask.data_ptr()


def test_apply_spatial_identity_matrix_is_exact():
    img, mask, _ = _camera_batch(2)
    eye = torch.eye(2).repeat(2, 1, 1)
    out, out_mask = apply_spatial(img, mask, eye, torch.zeros(2, 2, *img.shape[2:]))
    assert torch.equal(out, img) and torch.equal(out_mask, mask)


# ----------------------------------------------------------------------------------- alignment


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("which", ["rotation", "scale", "flip", "elastic", "all"])
def test_mask_stays_aligned_with_image(dims, which):
    img, mask, thr = _camera_batch(3) if dims == 2 else _blob_batch(2)
    names = SPATIAL if which == "all" else (which,)
    cfg = _only(*names, rotation__degrees=(10.0, 20.0), elastic__alpha=(2.0, 4.0),
                elastic__sigma=(6.0, 8.0) if dims == 3 else (8.0, 12.0))
    out, out_mask = augment_batch(img, mask, cfg, _gen(1))
    assert out.shape == img.shape and out_mask.shape == mask.shape
    for b in range(img.shape[0]):
        assert _dice(out[b] > thr, out_mask[b]) > 0.95, (which, b)
    if which != "flip":
        assert not torch.equal(out_mask, mask)  # something happened


def test_mask_keeps_original_label_values():
    img, _, _ = _camera_batch(4)
    labels = torch.bucketize(img, torch.tensor([0.25, 0.45, 0.65]))  # 0..3, int64
    assert set(labels.unique().tolist()) == {0, 1, 2, 3}
    cfg = _only(*SPATIAL)
    for mask in (labels, labels.to(torch.uint8), labels[:, 0].to(torch.int32)):
        _, out = augment_batch(img, mask, cfg, _gen(2))
        assert out.dtype == mask.dtype and out.shape == mask.shape
        assert set(out.unique().tolist()) <= {0, 1, 2, 3}
    one_hot = F.one_hot(labels[:, 0], 4).movedim(-1, 1).float()  # (B, 4, H, W)
    _, out = augment_batch(img, one_hot, cfg, _gen(2))
    assert set(out.unique().tolist()) <= {0.0, 1.0}
    assert bool((out.sum(1) <= 1).all())
    _, out = augment_batch(img, labels > 1, cfg, _gen(2))
    assert out.dtype == torch.bool


def test_label_map_3d_keeps_values():
    img, _, _ = _blob_batch(2)
    labels = torch.bucketize(img, torch.tensor([0.2, 0.5, 0.8]))
    _, out = augment_batch(img, labels, _only(*SPATIAL), _gen(3))
    assert set(out.unique().tolist()) <= set(labels.unique().tolist())


# --------------------------------------------------------------------------------- known cases


@pytest.mark.parametrize("dims", [2, 3])
def test_flip_along_w_equals_torch_flip(dims):
    img, mask, _ = _camera_batch(2) if dims == 2 else _blob_batch(2)
    flips = torch.zeros(2, dims, dtype=torch.bool)
    flips[:, -1] = True
    angles = torch.zeros(2) if dims == 2 else torch.zeros(2, 3)
    mats = make_affine_matrices(angles, torch.ones(2), flips)
    out, out_mask = apply_spatial(img, mask, mats)
    assert torch.equal(out, torch.flip(img, [-1])) and torch.equal(out_mask, torch.flip(mask, [-1]))
    cfg = _only("flip", flip__axes=(dims - 1,))
    out, out_mask = augment_batch(img, mask, cfg, _gen())
    assert torch.equal(out, torch.flip(img, [-1])) and torch.equal(out_mask, torch.flip(mask, [-1]))


def test_flip_through_grid_sample_matches_torch_flip():
    """The resampling path (flip fused with a zoom of exactly 1 + tiny) agrees with torch.flip."""
    img, _, _ = _camera_batch(1)
    flips = torch.tensor([[False, True]])
    mats = make_affine_matrices(torch.zeros(1), torch.ones(1), flips)
    theta = S._normalised_theta(mats, img.shape[2:])
    out = F.grid_sample(img, S._affine_grid(theta, img.shape[2:]), align_corners=True)
    torch.testing.assert_close(out, torch.flip(img, [-1]), atol=1e-5, rtol=0)


def test_per_sample_flips_mixed_with_resampling():
    img, mask, _ = _camera_batch(4)
    angles = torch.tensor([0.0, 12.0, 0.0, -7.0])
    flips = torch.tensor([[True, False], [False, True], [False, True], [False, False]])
    out, out_mask = apply_spatial(img, mask, make_affine_matrices(angles, torch.ones(4), flips))
    assert torch.equal(out[0], torch.flip(img[0], [-2]))
    assert torch.equal(out[2], torch.flip(img[2], [-1]))
    assert torch.equal(out_mask[0], torch.flip(mask[0], [-2]))
    assert not torch.equal(out[1], torch.flip(img[1], [-1]))


@pytest.mark.parametrize("angle,zoom", [(30.0, 1.0), (-17.0, 1.2), (41.0, 0.9)])
def test_rotation_moves_point_blob_where_expected_2d(angle, zoom):
    h, w = 64, 100  # non-square: a wrong aspect conversion would shear and miss
    q = torch.tensor([12.0, -25.0])  # blob position (row, col), centred pixel coordinates
    yy, xx = torch.meshgrid(
        torch.arange(h) - (h - 1) / 2, torch.arange(w) - (w - 1) / 2, indexing="ij"
    )
    img = torch.exp(-((yy - q[0]) ** 2 + (xx - q[1]) ** 2) / (2 * 1.5**2))[None, None].float()
    no_flip = torch.zeros(1, 2, dtype=torch.bool)
    mats = make_affine_matrices(torch.tensor([angle]), torch.tensor([zoom]), no_flip)
    out, _ = apply_spatial(img, None, mats)
    lin = mats[0, :, :2].double()
    expected = torch.linalg.solve(lin, q.double())  # output p with A p = q
    a = math.radians(angle)  # the documented convention, written out
    c, s = math.cos(a), math.sin(a)
    rot = torch.tensor([[c, -s], [s, c]], dtype=torch.float64)
    torch.testing.assert_close(expected, zoom * rot.T @ q.double())
    assert float((_centroid(out[0, 0]) - expected).abs().max()) < 1.0
    assert float((_centroid(out[0, 0]) - expected).norm()) < 1.0


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_rotation_moves_point_blob_where_expected_3d(axis):
    shape = (30, 40, 36)
    q = torch.tensor([6.0, -8.0, 9.0])
    coords = torch.meshgrid(*[torch.arange(s) - (s - 1) / 2 for s in shape], indexing="ij")
    r2 = sum((c - q[k]) ** 2 for k, c in enumerate(coords))
    img = torch.exp(-r2 / (2 * 1.5**2))[None, None].float()
    angles = torch.zeros(1, 3)
    angles[0, axis] = 25.0
    mats = make_affine_matrices(angles, torch.ones(1), torch.zeros(1, 3, dtype=torch.bool))
    out, _ = apply_spatial(img, None, mats)
    expected = torch.linalg.solve(mats[0, :, :3].double(), q.double())
    assert abs(float(expected[axis] - q[axis])) < 1e-9  # rotation AROUND that axis keeps it
    assert float((_centroid(out[0, 0]) - expected).norm()) < 1.0


def test_physical_spacing_makes_rotation_isotropic_in_mm():
    spacing = (2.0, 1.0)
    no_flip = torch.zeros(1, 2, dtype=torch.bool)
    mats = make_affine_matrices(torch.tensor([20.0]), torch.ones(1), no_flip, spacing=spacing)
    d = torch.diag(torch.tensor(spacing))
    mm = d @ mats[0, :, :2] @ torch.linalg.inv(d)  # back in mm: must be a rotation
    torch.testing.assert_close(mm @ mm.T, torch.eye(2), atol=1e-6, rtol=0)


def test_random_matrices_are_scaled_rotations():
    mats = random_affine_matrices(64, 3, rotation_p=1.0, zoom_p=1.0, flip_p=0.5, generator=_gen())
    lin = mats[:, :, :3]
    gram = lin @ lin.transpose(1, 2)
    z2 = gram.diagonal(dim1=1, dim2=2).mean(1)
    torch.testing.assert_close(gram, z2[:, None, None] * torch.eye(3), atol=1e-5, rtol=0)
    zoom = 1 / z2.sqrt()
    assert bool(((zoom > 0.85 - 1e-4) & (zoom < 1.25 + 1e-4)).all())
    assert torch.equal(mats[:, :, 3], torch.zeros(64, 3))
    none = random_affine_matrices(8, 2, rotation_p=0.0, zoom_p=0.0, flip_p=0.0, generator=_gen())
    assert torch.equal(none[:, :, :2], torch.eye(2).repeat(8, 1, 1))


@pytest.mark.filterwarnings("ignore:Since version 1.3.0, affine_grid")
@pytest.mark.parametrize("shape", [(17, 23), (9, 1, 12), (5, 7, 6)])
def test_affine_grid_matches_torch(shape):
    b, n = 3, len(shape)
    theta = torch.randn(b, n, n + 1, generator=_gen(4))
    ref = F.affine_grid(theta, [b, 1, *shape], align_corners=True)
    torch.testing.assert_close(S._affine_grid(theta, shape), ref, atol=1e-6, rtol=0)
    first = S._affine_grid(theta, shape, channels_first=True)
    torch.testing.assert_close(first.movedim(1, -1), ref, atol=1e-6, rtol=0)


def test_displacement_is_in_pixels():
    """A constant displacement of +3 px along W pulls the image 3 px to the left."""
    img, _, _ = _camera_batch(1)
    disp = torch.zeros(1, 2, *img.shape[2:])
    disp[:, 1] = 3.0
    out, _ = apply_spatial(img, None, torch.eye(2)[None], disp)
    torch.testing.assert_close(out[..., :-3], img[..., 3:], atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------- elastic


def test_elastic_displacement_statistics():
    alpha = torch.tensor([4.0, 2.0, 0.0])
    sigma = torch.tensor([10.0, 8.0, 9.0])
    for coarse in (True, False):
        d = elastic_displacement((128, 112), alpha, sigma, coarse=coarse, generator=_gen(7))
        assert d.shape == (3, 2, 128, 112) and d.dtype == torch.float32
        std = d.std(dim=(2, 3))
        ratio = std[:2] / alpha[:2, None]
        assert bool((ratio > 0.6).all()) and bool((ratio < 1.4).all())
        assert torch.equal(d[2], torch.zeros_like(d[2]))
        # smooth: neighbouring pixels move almost together (gradient std ~ alpha / (1.4 sigma))
        step = (d[:2, :, 1:] - d[:2, :, :-1]).abs()
        assert float(step.mean()) < 0.3 and float(step.max()) < 2.0
    d3 = elastic_displacement((24, 30, 20), [3.0], [6.0], generator=_gen())
    assert d3.shape == (1, 3, 24, 30, 20)


@pytest.mark.parametrize("shape", [(70, 90), (20, 26, 23)])
def test_fused_coarse_grid_equals_full_resolution_path(shape):
    """augment_batch adds affine + coarse displacement before upsampling; that must equal
    apply_spatial with the full-resolution elastic_displacement drawn from the same seed."""
    n = len(shape)
    alpha, sigma = torch.tensor([3.0, 5.0]), torch.tensor([6.0, 9.0])
    full = elastic_displacement(shape, alpha, sigma, generator=_gen(8))
    coarse = S._coarse_displacement(shape, alpha, sigma, True, _gen(8), torch.device("cpu"))
    assert coarse.shape[2:] != shape  # really coarse
    mats = random_affine_matrices(2, n, rotation_p=1.0, zoom_p=1.0, flip_p=0.5, generator=_gen(9))
    theta = S._normalised_theta(mats, shape)
    torch.testing.assert_close(
        S._deformed_grid(theta, coarse, shape), S._deformed_grid(theta, full, shape),
        atol=2e-6, rtol=0,
    )
    img = torch.rand(2, 1, *shape, generator=_gen(1))
    ref = F.grid_sample(img, S._deformed_grid(theta, full, shape), align_corners=True)
    torch.testing.assert_close(apply_spatial(img, None, mats, full)[0], ref)


def test_elastic_seeded():
    a = elastic_displacement((40, 40), [3.0, 3.0], [8.0, 8.0], generator=_gen(1))
    b = elastic_displacement((40, 40), [3.0, 3.0], [8.0, 8.0], generator=_gen(1))
    assert torch.equal(a, b) and not torch.equal(a[0], a[1])


# --------------------------------------------------------------------------------- intensity


def test_gamma_one_is_identity_and_range_is_kept():
    img, _, _ = _camera_batch(3)
    img = img * 300 - 50
    assert torch.equal(adjust_gamma(img, 1.0), img)
    out = adjust_gamma(img, torch.tensor([0.7, 1.0, 1.5]))
    assert torch.equal(out[1], img[1])
    dims = (1, 2, 3)
    torch.testing.assert_close(out.amin(dims), img.amin(dims))
    torch.testing.assert_close(out.amax(dims), img.amax(dims))
    mn, mx = img[0].min(), img[0].max()
    expected = ((img[0] - mn) / (mx - mn)) ** 0.7 * (mx - mn) + mn
    torch.testing.assert_close(out[0], expected, atol=1e-3, rtol=1e-5)
    kept = adjust_gamma(img, torch.tensor([0.8, 1.2, 1.3]), retain_stats=True)
    torch.testing.assert_close(kept.mean(dims), img.mean(dims), atol=1e-2, rtol=1e-4)


def test_brightness_contrast():
    img, _, _ = _camera_batch(2)
    torch.testing.assert_close(adjust_brightness(img, torch.tensor([1.2, 0.5])),
                               img * torch.tensor([1.2, 0.5])[:, None, None, None])
    out = adjust_contrast(img, torch.tensor([1.3, 0.7]))
    dims = (1, 2, 3)
    assert bool((out.amin(dims) >= img.amin(dims)).all())
    assert bool((out.amax(dims) <= img.amax(dims)).all())
    # a factor < 1 never clips, so the mean is kept
    torch.testing.assert_close(out[1].mean(), img[1].mean(), atol=1e-5, rtol=0)
    assert float(out[0].std()) > float(img[0].std()) and float(out[1].std()) < float(img[1].std())


def test_bias_field_is_smooth_and_bounded():
    f = bias_field((64, 80), torch.tensor([0.2, 0.05]), generator=_gen(3))
    assert f.shape == (2, 1, 64, 80)
    for b, a in enumerate((0.2, 0.05)):
        assert float(f[b].min()) >= 1 / (1 + a) - 1e-5 and float(f[b].max()) <= 1 + a + 1e-5
        assert abs(float(f[b].log().abs().max()) - math.log1p(a)) < 1e-5
    assert float((f[:, :, 1:] - f[:, :, :-1]).abs().max()) < 0.02
    f3 = bias_field((10, 12, 14), [0.1], order=2, generator=_gen())
    assert f3.shape == (1, 1, 10, 12, 14)


def test_noise():
    img = torch.rand(2, 1, 64, 64, generator=_gen(0)) + 1.0
    g = add_gaussian_noise(img, torch.tensor([0.5, 0.0]), generator=_gen(1))
    assert torch.equal(g[1], img[1])
    ratio = float((g[0] - img[0]).std() / img[0].std())
    assert 0.45 < ratio < 0.55
    ab = add_gaussian_noise(img, 0.1, relative=False, generator=_gen(1))
    assert 0.09 < float((ab - img).std()) < 0.11
    r = add_rician_noise(img - 1.5, torch.tensor([0.0, 0.3]), generator=_gen(2))
    torch.testing.assert_close(r[0], (img[0] - 1.5).abs())
    assert bool((r >= 0).all())


def test_intensity_transforms_leave_mask_untouched():
    img, mask, _ = _camera_batch(3)
    out, out_mask = augment_batch(img, mask, _only(*INTENSITY), _gen(4))
    assert torch.equal(out_mask, mask)
    assert not torch.equal(out, img)
    assert out.shape == img.shape and out.dtype == img.dtype
    assert torch.isfinite(out).all()


# ------------------------------------------------------------------------ seeds, shapes, config


@pytest.mark.parametrize("dims", [2, 3])
def test_same_seed_same_batch_different_seed_different(dims):
    img, mask, _ = _camera_batch(4) if dims == 2 else _blob_batch(2)
    cfg = _only(*SPATIAL, *INTENSITY, p=0.7)
    a = augment_batch(img, mask, cfg, _gen(11))
    b = augment_batch(img, mask, cfg, _gen(11))
    c = augment_batch(img, mask, cfg, _gen(12))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_parameters_are_per_sample():
    img, mask, _ = _camera_batch(6)  # identical samples
    out, _ = augment_batch(img, mask, _only("rotation", "scale"), _gen(5))
    for b in range(1, 6):
        assert not torch.equal(out[0], out[b])
    out, _ = augment_batch(img, mask, _only("rotation", p=0.5), _gen(5))
    same = [torch.equal(out[b], img[b]) for b in range(6)]
    assert any(same) and not all(same)


@pytest.mark.parametrize(
    "shape", [(1, 1, 40, 72), (2, 3, 33, 20), (1, 2, 12, 20, 16), (3, 1, 9, 14, 11)]
)
def test_shapes_and_dtypes_preserved(shape):
    img = torch.rand(shape, generator=_gen())
    mask = (img[:, :1] > 0.5).to(torch.uint8)
    cfg = _only(*SPATIAL, *INTENSITY, elastic__sigma=(3.0, 4.0))
    out, out_mask = augment_batch(img, mask, cfg, _gen(1))
    assert out.shape == img.shape and out.dtype == torch.float32
    assert out_mask.shape == mask.shape and out_mask.dtype == torch.uint8
    out, out_mask = augment_batch(img.double(), mask[:, 0], cfg, _gen(1))
    assert out.dtype == torch.float64 and out_mask.shape == mask[:, 0].shape
    out, none = augment_batch(img, None, cfg, _gen(1))
    assert none is None and out.shape == img.shape


def test_defaults_run_and_no_grad():
    img, mask, _ = _camera_batch(4)
    img.requires_grad_(False)
    with torch.no_grad():
        out, out_mask = augment_batch(img, mask, None, _gen())
    assert out.shape == img.shape and out_mask.dtype == torch.int64
    out, _ = augment_batch(img, mask, {"elastic": {"enabled": True}}, _gen())
    assert not out.requires_grad


def test_config_validation():
    cfg = AugmentConfig()
    assert cfg.rotation.degrees == (-15.0, 15.0) and not cfg.elastic.enabled
    with pytest.raises(pydantic.ValidationError):
        AugmentConfig(rotaton={"p": 0.1})
    with pytest.raises(pydantic.ValidationError):
        AugmentConfig(rotation={"p": 0.1, "prob": 0.3})
    bad_settings = (
        {"rotation": {"p": 1.5}},
        {"scale": {"zoom": (1.2, 0.9)}},
        {"gamma": {"gamma": (0.0, 1.0)}},
        {"elastic": {"sigma": (-1.0, 2.0)}},
        {"flip": {"axes": [3]}},
        {"foo": 1},
    )
    for bad in bad_settings:
        with pytest.raises(ConfigError):
            augment_config_from_dict(bad)
    cfg = augment_config_from_dict({"rotation": {"degrees_3d": [[-5, 5], [-10, 10], [0, 30]]}})
    assert cfg.rotation.degrees_3d[2] == (0.0, 30.0)
    img, mask, _ = _blob_batch(1)
    augment_batch(img, mask, cfg, _gen())
    with pytest.raises(ConfigError):
        augment_batch(torch.rand(1, 1, 8, 8), None, {"flip": {"axes": [2]}}, _gen())


def test_bad_inputs():
    with pytest.raises(InputError):
        augment_batch(torch.zeros(2, 1, 8, 8, dtype=torch.int16), None)
    with pytest.raises(InputError):
        augment_batch(torch.zeros(2, 8, 8), None)
    with pytest.raises(InputError):
        augment_batch(torch.zeros(2, 1, 8, 8), torch.zeros(2, 1, 8, 9))


# ---------------------------------------------------------------- blur, low resolution, per-axis zoom


def test_gaussian_blur_known_values_and_per_sample_sigma():
    from resunet.data.augment.resolution import gaussian_blur

    x = torch.zeros(2, 1, 1, 21)
    x[:, 0, 0, 10] = 1.0  # an impulse: the blur returns the (normalised) kernel itself
    y = gaussian_blur(x, torch.tensor([[0.0, 1.0], [0.0, 2.0]]))
    for i, sigma in enumerate((1.0, 2.0)):
        k = torch.exp(-0.5 * (torch.arange(-10, 11.0) / sigma) ** 2)
        radius = int(np.ceil(3 * 2.0))  # one radius for the batch (the largest sigma's)
        k[(torch.arange(-10, 11).abs() > radius)] = 0
        assert torch.allclose(y[i, 0, 0], k / k.sum(), atol=1e-6)
    const = torch.full((3, 2, 5, 6, 7), 4.0)
    assert torch.allclose(gaussian_blur(const, torch.tensor([0.5, 1.0, 3.0])), const)


def test_low_resolution_identity_at_zoom_one_and_blocky_below():
    from resunet.data.augment.resolution import simulate_low_resolution

    x = torch.randn(2, 1, 16, 16)
    out = simulate_low_resolution(x, torch.tensor([1.0, 0.5]))
    assert torch.equal(out[0], x[0]) and out.shape == x.shape
    # half resolution keeps the mean roughly and removes the finest detail (less variance)
    assert out[1].std() < x[1].std()


def test_new_transforms_off_leave_the_draws_unchanged():
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    x, m = torch.randn(4, 1, 24, 24), torch.randint(0, 3, (4, 1, 24, 24))
    cfg = AugmentConfig()
    assert not cfg.blur.enabled and not cfg.low_resolution.enabled and not cfg.scale.per_axis
    a = augment_batch(x, m, cfg, g1)
    b = augment_batch(x, m, AugmentConfig.model_validate(cfg.model_dump()), g2)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_per_axis_zoom_scales_axes_independently():
    from resunet.data.augment import make_affine_matrices

    m = make_affine_matrices(torch.zeros(1), torch.tensor([[2.0, 0.5]]), torch.zeros(1, 2, dtype=torch.bool))
    assert torch.allclose(m[0, :, :2], torch.diag(torch.tensor([0.5, 2.0])))
    cfg = AugmentConfig.disabled()
    cfg.scale.enabled, cfg.scale.p, cfg.scale.per_axis = True, 1.0, True
    x = torch.zeros(1, 1, 33, 33)
    x[0, 0, 12:21, 12:21] = 1.0  # a square: an anisotropic zoom makes it a rectangle
    out, _ = augment_batch(x, None, cfg, torch.Generator().manual_seed(1))
    rows, cols = (out[0, 0] > 0.5).any(dim=1).sum(), (out[0, 0] > 0.5).any(dim=0).sum()
    assert rows != cols
