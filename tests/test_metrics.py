"""Tests for resunet.metrics: hand-computed values, agreement with MONAI, empty-mask conventions."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from scipy import ndimage

from resunet import metrics as M
from resunet.errors import ResunetError

monai_metrics = pytest.importorskip("monai.metrics")

SPACING_3D = (2.5, 0.8, 0.7)
SPACING_2D = (0.8, 0.7)


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _random_pair(seed: int, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """A smooth random gt blob field and a prediction that mostly overlaps it."""
    rng = np.random.default_rng(seed)
    base = ndimage.gaussian_filter(rng.standard_normal(shape), 3.0)
    noise = ndimage.gaussian_filter(rng.standard_normal(shape), 2.0)
    noise *= 0.5 * base.std() / noise.std()
    gt = base > 0.05
    pred = (base + noise) > 0.05
    assert gt.any() and pred.any() and not np.array_equal(gt, pred)
    return pred, gt


def _bc(a: np.ndarray) -> torch.Tensor:
    """(B=1, C=1, *spatial) float tensor: one foreground channel, as MONAI's metrics expect."""
    return torch.from_numpy(a[None, None].astype(np.float32))


def _monai(metric, pred: np.ndarray, gt: np.ndarray, spacing) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(metric(_bc(pred), _bc(gt), spacing=list(spacing)).item())


def _square(shape, rows, cols) -> np.ndarray:
    m = np.zeros(shape, dtype=bool)
    m[rows[0] : rows[1], cols[0] : cols[1]] = True
    return m


# --------------------------------------------------------------------------------------------
# known values
# --------------------------------------------------------------------------------------------


def test_overlap_metrics_hand_computed_2d():
    gt = np.array(
        [
            [1, 1, 0, 0],
            [1, 1, 0, 0],
            [0, 0, 0, 0],
        ],
        dtype=np.uint8,
    )
    pred = np.array(
        [
            [1, 1, 1, 0],
            [1, 0, 0, 0],
            [0, 0, 0, 0],
        ],
        dtype=np.uint8,
    )
    # TP=3, FP=1, FN=1, TN=7
    assert M.dice(pred, gt) == pytest.approx(6 / 8)
    assert M.iou(pred, gt) == pytest.approx(3 / 5)
    assert M.sensitivity(pred, gt) == pytest.approx(3 / 4)
    assert M.specificity(pred, gt) == pytest.approx(7 / 8)
    assert M.precision(pred, gt) == pytest.approx(3 / 4)


def test_overlap_metrics_hand_computed_3d():
    gt = np.zeros((2, 3, 3), dtype=bool)
    gt[0, :2, :2] = True  # 4 voxels
    pred = np.zeros_like(gt)
    pred[0, :2, :1] = True  # 2 voxels, both inside gt
    pred[1, 2, 2] = True  # 1 false positive
    # TP=2, FP=1, FN=2, TN=18-5=13
    assert M.dice(pred, gt) == pytest.approx(4 / 7)
    assert M.iou(pred, gt) == pytest.approx(2 / 5)
    assert M.sensitivity(pred, gt) == pytest.approx(2 / 4)
    assert M.specificity(pred, gt) == pytest.approx(13 / 14)
    assert M.precision(pred, gt) == pytest.approx(2 / 3)


def test_boundary_uses_face_connectivity_and_image_border():
    m = np.zeros((5, 5), dtype=bool)
    m[1:4, 1:4] = True
    b = M.boundary(m)
    expected = m.copy()
    expected[2, 2] = False  # the centre has all 4 face neighbours: interior
    np.testing.assert_array_equal(b, expected)
    # a mask filling the whole image: its outer ring touches the border, so it is boundary
    full = np.ones((4, 4), dtype=bool)
    ring = np.ones((4, 4), dtype=bool)
    ring[1:3, 1:3] = False
    np.testing.assert_array_equal(M.boundary(full), ring)
    # a single voxel is its own boundary, also in 3-D
    one = np.zeros((3, 3, 3), dtype=bool)
    one[1, 1, 1] = True
    np.testing.assert_array_equal(M.boundary(one), one)


@pytest.mark.parametrize(
    "shape,a,b,spacing",
    [
        ((6, 9, 11), (1, 2, 3), (4, 0, 7), SPACING_3D),
        ((10, 10), (1, 8), (7, 2), SPACING_2D),
    ],
)
def test_single_points_distance_is_euclidean_in_mm(shape, a, b, spacing):
    pred = np.zeros(shape, dtype=bool)
    gt = np.zeros(shape, dtype=bool)
    pred[a] = True
    gt[b] = True
    expected = math.sqrt(sum(((i - j) * s) ** 2 for i, j, s in zip(a, b, spacing)))
    assert M.hausdorff(pred, gt, spacing) == pytest.approx(expected, rel=1e-12)
    assert M.hausdorff(pred, gt, spacing, directed=True) == pytest.approx(expected, rel=1e-12)
    assert M.hd95(pred, gt, spacing) == pytest.approx(expected, rel=1e-12)
    assert M.assd(pred, gt, spacing) == pytest.approx(expected, rel=1e-12)
    d_pg, d_gp = M.surface_distances(pred, gt, spacing)
    np.testing.assert_allclose(d_pg, [expected])
    np.testing.assert_allclose(d_gp, [expected])
    # tolerance just below / at the distance
    assert M.surface_dice(pred, gt, expected * 0.99, spacing) == 0.0
    assert M.surface_dice(pred, gt, expected, spacing) == 1.0
    assert M.boundary_f1(pred, gt, expected, spacing) == 1.0


@pytest.mark.parametrize("shift", [1, 3, 5])
def test_hd95_of_shifted_squares_equals_shift_2d(shift):
    a = _square((30, 30), (5, 25), (3, 23))
    b = _square((30, 30), (5, 25), (3 + shift, 23 + shift))
    for spacing in [(1.0, 1.0), SPACING_2D]:
        expected = shift * spacing[1]
        assert M.hd95(a, b, spacing) == pytest.approx(expected, rel=1e-12)
        assert M.hausdorff(a, b, spacing) == pytest.approx(expected, rel=1e-12)


def test_hd95_of_shifted_cubes_equals_shift_3d():
    a = np.zeros((16, 14, 14), dtype=bool)
    a[2:10, 3:11, 3:11] = True
    b = np.roll(a, 2, axis=0)
    assert M.hd95(a, b, SPACING_3D) == pytest.approx(2 * 2.5, rel=1e-12)
    assert M.hd95(a, b) == pytest.approx(2.0, rel=1e-12)


def test_surface_dice_and_boundary_f1_hand_computed():
    # 10x10 squares shifted by one column: the top and bottom rows overlap on 9 voxels each,
    # so 18 of each square's 36 boundary voxels are at distance 0 and the rest at 1 column.
    a = _square((14, 20), (2, 12), (2, 12))
    b = _square((14, 20), (2, 12), (3, 13))
    assert M.surface_dice(a, b, 0.0, SPACING_2D) == pytest.approx(0.5)
    assert M.boundary_f1(a, b, 0.0, SPACING_2D) == pytest.approx(0.5)
    assert M.surface_dice(a, b, 0.69, SPACING_2D) == pytest.approx(0.5)
    assert M.surface_dice(a, b, 0.7, SPACING_2D) == 1.0  # exactly one column of 0.7 mm
    assert M.boundary_f1(a, b, 0.7, SPACING_2D) == 1.0
    # a distance equal to the tolerance up to float rounding counts as within: the EDT gives
    # 3 columns of 0.8 mm as 2.4000000000000004 (MONAI's float32 comparison also says within)
    c = _square((14, 20), (2, 12), (5, 15))
    spacing = (1.0, 0.8)
    assert M.surface_distances(a, c, spacing)[0].max() > 2.4
    assert M.surface_dice(a, c, 2.4, spacing) == 1.0
    assert M.boundary_f1(a, c, 2.4, spacing) == 1.0
    assert M.surface_dice(a, c, 2.39, spacing) < 1.0
    nsd = monai_metrics.SurfaceDiceMetric(class_thresholds=[2.4], include_background=True)
    assert _monai(nsd, a, c, spacing) == 1.0


def test_boundary_f1_asymmetric_precision_recall():
    # pred = gt plus a far-away blob: recall 1, precision = fraction of pred boundary on gt
    gt = _square((20, 40), (2, 8), (2, 8))  # 6x6 -> 20 boundary voxels
    pred = gt | _square((20, 40), (10, 13), (30, 33))  # + 3x3 -> 8 boundary voxels
    prec, rec = 20 / 28, 1.0
    assert M.boundary_f1(pred, gt, 1.0) == pytest.approx(2 * prec * rec / (prec + rec))
    assert M.surface_dice(pred, gt, 1.0) == pytest.approx((20 + 20) / (28 + 20))


def test_percentile_range():
    a = _square((20, 20), (2, 10), (2, 10))
    b = _square((20, 20), (4, 14), (3, 12))
    d_pg, d_gp = M.surface_distances(a, b)
    assert M.hausdorff(a, b, percentile=100) == pytest.approx(max(d_pg.max(), d_gp.max()))
    assert M.hausdorff(a, b, percentile=0) == pytest.approx(max(d_pg.min(), d_gp.min()))
    assert M.hausdorff(a, b, percentile=50, directed=True) == pytest.approx(np.median(d_pg))


# --------------------------------------------------------------------------------------------
# agreement with MONAI
# --------------------------------------------------------------------------------------------

CASES = [(seed, (24, 40, 40), SPACING_3D) for seed in range(4)] + [
    (seed, (64, 64), SPACING_2D) for seed in range(4, 8)
]


@pytest.mark.parametrize("seed,shape,spacing", CASES)
def test_agrees_with_monai(seed, shape, spacing):
    pred, gt = _random_pair(seed, shape)
    close = dict(rtol=1e-6, atol=1e-6)
    d_pg, d_gp = M.surface_distances(pred, gt, spacing)

    def quantile32(d: np.ndarray, q: float) -> float:
        return float(torch.quantile(torch.from_numpy(d.astype(np.float32)), q).item())

    # HD95: MONAI casts the surface distances to float32 and calls torch.quantile (linear
    # interpolation) on them; torch computes the rank q * (n - 1) in float32 too, which moves the
    # result by up to ~1e-5 relative. Ours uses float64 throughout. So: (1) MONAI's number is
    # exactly the float32 quantile of OUR two distance sets (same boundaries, same distances,
    # same percentile definition), and (2) our float64 value is within MONAI's float32 error.
    hd95_monai = _monai(
        monai_metrics.HausdorffDistanceMetric(include_background=True, percentile=95, directed=False),
        pred, gt, spacing,
    )
    np.testing.assert_allclose(max(quantile32(d_pg, 0.95), quantile32(d_gp, 0.95)), hd95_monai, **close)
    np.testing.assert_allclose(M.hd95(pred, gt, spacing), hd95_monai, rtol=2e-5, atol=1e-6)
    exact = max(np.percentile(d_pg, 95), np.percentile(d_gp, 95))
    np.testing.assert_allclose(M.hd95(pred, gt, spacing), exact, rtol=1e-12)

    hd_dir_monai = _monai(
        monai_metrics.HausdorffDistanceMetric(include_background=True, percentile=95, directed=True),
        pred, gt, spacing,
    )
    np.testing.assert_allclose(quantile32(d_pg, 0.95), hd_dir_monai, **close)
    ours_dir = M.hausdorff(pred, gt, spacing, 95, directed=True)
    np.testing.assert_allclose(ours_dir, hd_dir_monai, rtol=2e-5, atol=1e-6)

    hd_monai = _monai(monai_metrics.HausdorffDistanceMetric(include_background=True), pred, gt, spacing)
    np.testing.assert_allclose(M.hausdorff(pred, gt, spacing), hd_monai, **close)

    assd_monai = _monai(
        monai_metrics.SurfaceDistanceMetric(include_background=True, symmetric=True), pred, gt, spacing
    )
    np.testing.assert_allclose(M.assd(pred, gt, spacing), assd_monai, **close)

    for tol in (0.0, 0.75, 1.0, 2.0, 3.3):
        nsd = monai_metrics.SurfaceDiceMetric(
            class_thresholds=[tol], include_background=True, use_subvoxels=False
        )
        nsd_monai = _monai(nsd, pred, gt, spacing)
        np.testing.assert_allclose(M.surface_dice(pred, gt, tol, spacing), nsd_monai, **close)

    dice_fn = monai_metrics.compute_dice(_bc(pred), _bc(gt), include_background=True, ignore_empty=False)
    dice_cls = monai_metrics.DiceMetric(include_background=True, reduction="none", ignore_empty=False)(
        _bc(pred), _bc(gt)
    )
    ours = M.dice(pred, gt)
    np.testing.assert_allclose(ours, float(dice_fn.item()), **close)
    np.testing.assert_allclose(ours, float(dice_cls.item()), **close)


def test_compute_all_agrees_with_monai_multiclass():
    """compute_all on a 3-class label map vs MONAI on its one-hot form (background excluded)."""
    rng = np.random.default_rng(7)
    shape = (20, 36, 36)
    field = ndimage.gaussian_filter(rng.standard_normal(shape), 3.0)
    noise = ndimage.gaussian_filter(rng.standard_normal(shape), 2.0) * 0.4 * field.std()
    edges = np.quantile(field, [0.5, 0.7, 0.85])
    gt = np.digitize(field, edges)  # labels 0..3
    pred = np.digitize(field + noise, edges)
    tol = {1: 1.0, 2: 2.0, 3: 0.5}
    res = M.compute_all(pred, gt, labels=[1, 2, 3], spacing=SPACING_3D, tolerance_mm=tol)
    assert list(res) == [1, 2, 3]
    assert all(list(row) == list(M.METRIC_NAMES) for row in res.values())

    def onehot(lab):
        return torch.from_numpy(np.stack([lab == c for c in range(4)])[None].astype(np.float32))

    kw = dict(spacing=list(SPACING_3D))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hd = monai_metrics.HausdorffDistanceMetric(include_background=False, percentile=95)(
            onehot(pred), onehot(gt), **kw
        )[0]
        asd = monai_metrics.SurfaceDistanceMetric(include_background=False, symmetric=True)(
            onehot(pred), onehot(gt), **kw
        )[0]
        nsd = monai_metrics.SurfaceDiceMetric(
            class_thresholds=[tol[1], tol[2], tol[3]], include_background=False, use_subvoxels=False
        )(onehot(pred), onehot(gt), **kw)[0]
        dsc = monai_metrics.compute_dice(
            onehot(pred), onehot(gt), include_background=False, ignore_empty=False
        )[0]
    for i, c in enumerate([1, 2, 3]):
        np.testing.assert_allclose(res[c]["hd95"], float(hd[i]), rtol=2e-5, atol=1e-6)  # float32 quantile
        np.testing.assert_allclose(res[c]["assd"], float(asd[i]), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(res[c]["surface_dice"], float(nsd[i]), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(res[c]["dice"], float(dsc[i]), rtol=1e-6, atol=1e-6)
        # and compute_all equals the single functions
        p, g = pred == c, gt == c
        assert res[c]["iou"] == M.iou(p, g)
        assert res[c]["sensitivity"] == M.sensitivity(p, g)
        assert res[c]["specificity"] == M.specificity(p, g)
        assert res[c]["precision"] == M.precision(p, g)
        assert res[c]["boundary_f1"] == M.boundary_f1(p, g, tol[c], SPACING_3D)


def test_crop_does_not_change_results():
    pred, gt = _random_pair(11, (20, 30, 30))
    pred[:, :, :5] = gt[:, :, :5] = False  # room around the foreground
    big_p = np.zeros((30, 50, 60), dtype=bool)
    big_g = np.zeros_like(big_p)
    big_p[5:25, 10:40, 20:50] = pred
    big_g[5:25, 10:40, 20:50] = gt
    for fn in (M.hd95, M.assd):
        assert fn(big_p, big_g, SPACING_3D) == pytest.approx(fn(pred, gt, SPACING_3D), rel=1e-12)
    assert M.surface_dice(big_p, big_g, 1.0, SPACING_3D) == M.surface_dice(pred, gt, 1.0, SPACING_3D)


# --------------------------------------------------------------------------------------------
# empty masks
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(8, 9), (4, 8, 9)])
def test_both_empty(shape):
    z = np.zeros(shape, dtype=bool)
    for fn in (M.dice, M.iou, M.sensitivity, M.specificity, M.precision):
        assert fn(z, z) == 1.0
    assert M.surface_dice(z, z, 1.0) == 1.0
    assert M.boundary_f1(z, z, 1.0) == 1.0
    assert M.hd95(z, z) == 0.0
    assert M.hausdorff(z, z) == 0.0
    assert M.assd(z, z) == 0.0
    d_pg, d_gp = M.surface_distances(z, z)
    assert d_pg.size == 0 and d_gp.size == 0


@pytest.mark.parametrize("empty_side", ["pred", "gt"])
def test_one_empty(empty_side):
    m = _square((12, 12), (2, 6), (3, 9))
    z = np.zeros_like(m)
    pred, gt = (z, m) if empty_side == "pred" else (m, z)
    assert M.dice(pred, gt) == 0.0
    assert M.iou(pred, gt) == 0.0
    assert M.sensitivity(pred, gt) == 0.0
    assert M.precision(pred, gt) == 0.0
    assert M.surface_dice(pred, gt, 5.0) == 0.0
    assert M.boundary_f1(pred, gt, 5.0) == 0.0
    assert M.hd95(pred, gt) == math.inf
    assert M.hausdorff(pred, gt) == math.inf
    assert M.hausdorff(pred, gt, directed=True) == math.inf
    assert M.assd(pred, gt) == math.inf
    # specificity is defined on the gt negatives
    n_neg = gt.size - int(gt.sum())
    assert M.specificity(pred, gt) == pytest.approx((n_neg - int((pred & ~gt).sum())) / n_neg)
    # MONAI returns inf for these too (its percentile version gives nan, see the module docstring)
    hd = monai_metrics.HausdorffDistanceMetric(include_background=True)
    asd = monai_metrics.SurfaceDistanceMetric(include_background=True, symmetric=True)
    assert _monai(hd, pred, gt, (1, 1)) == math.inf
    assert _monai(asd, pred, gt, (1, 1)) == math.inf


def test_specificity_without_negatives():
    full = np.ones((4, 5), dtype=bool)
    part = full.copy()
    part[0, 0] = False
    assert M.specificity(part, full) == 1.0
    assert M.specificity(full, full) == 1.0
    assert M.sensitivity(part, full) == pytest.approx(19 / 20)


# --------------------------------------------------------------------------------------------
# input types
# --------------------------------------------------------------------------------------------


def test_torch_input_equals_numpy_input():
    pred, gt = _random_pair(3, (16, 24, 24))
    tp_bool, tg_bool = torch.from_numpy(pred), torch.from_numpy(gt)
    tp_float, tg_long = tp_bool.float(), tg_bool.long()
    for fn in (M.dice, M.iou, M.sensitivity, M.specificity, M.precision):
        assert fn(tp_bool, tg_bool) == fn(pred, gt) == fn(tp_float, tg_long)
    for fn in (M.hd95, M.assd, M.hausdorff):
        assert fn(tp_float, tg_long, SPACING_3D) == fn(pred, gt, SPACING_3D)
    ref = M.surface_dice(pred, gt, 1.0, SPACING_3D)
    assert M.surface_dice(tp_bool, tg_bool, 1.0, torch.tensor(SPACING_3D)) == ref
    assert M.boundary_f1(tp_float, tg_bool, 1.0, SPACING_3D) == M.boundary_f1(pred, gt, 1.0, SPACING_3D)
    lp, lg = pred.astype(np.int64) * 2, gt.astype(np.int64)
    from_torch = M.compute_all(torch.from_numpy(lp), torch.from_numpy(lg), [1, 2], SPACING_3D, 1.0)
    assert from_torch == M.compute_all(lp, lg, [1, 2], SPACING_3D, 1.0)
    assert isinstance(M.dice(tp_bool, tg_bool), float)
    assert isinstance(M.hd95(tp_bool, tg_bool), float)


def test_spacing_forms():
    pred, gt = _random_pair(5, (40, 40))
    assert M.hd95(pred, gt) == M.hd95(pred, gt, 1.0) == M.hd95(pred, gt, (1, 1))
    assert M.hd95(pred, gt, 0.5) == pytest.approx(0.5 * M.hd95(pred, gt), rel=1e-12)
    assert M.assd(pred, gt, np.array([0.8, 0.7])) == M.assd(pred, gt, SPACING_2D)


def test_per_class():
    gt = np.zeros((10, 12), dtype=np.uint8)
    gt[1:4, 1:4] = 1
    gt[6:9, 6:11] = 2
    pred = gt.copy()
    pred[1, 1] = 0
    res = M.per_class(M.dice, pred, gt)
    assert list(res) == [1, 2]
    assert res[1] == pytest.approx(16 / 17)
    assert res[2] == 1.0
    # absent label: both-empty convention; kwargs are passed through
    res = M.per_class(M.hd95, pred, gt, labels=[2, 5], spacing=SPACING_2D)
    assert res == {2: 0.0, 5: 0.0}
    res = M.per_class(M.surface_dice, pred, gt, labels=[1], tolerance_mm=0.1)
    assert 0.0 < res[1] < 1.0
    # float label maps holding whole numbers are accepted
    assert M.per_class(M.dice, pred.astype(np.float32), gt, labels=[1]) == {1: pytest.approx(16 / 17)}
    assert M.compute_all(np.zeros((4, 4), int), np.zeros((4, 4), int)) == {}
    both_empty = M.compute_all(np.zeros((4, 4), int), np.zeros((4, 4), int), labels=[1])[1]
    assert both_empty["dice"] == 1.0 and both_empty["hd95"] == 0.0


# --------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------


def test_validation_errors():
    a = np.zeros((5, 6), dtype=bool)
    a3 = np.zeros((3, 5, 6), dtype=bool)
    with pytest.raises(ResunetError, match="same shape"):
        M.dice(a, np.zeros((5, 7), dtype=bool))
    with pytest.raises(ResunetError, match="same shape"):
        M.compute_all(np.zeros((5, 6), int), np.zeros((6, 5), int))
    with pytest.raises(ResunetError, match="one value per axis"):
        M.hd95(a3, a3, spacing=(1.0, 1.0))
    with pytest.raises(ResunetError, match="one value per axis"):
        M.compute_all(a3.astype(int), a3.astype(int), spacing=(1.0, 1.0, 1.0, 1.0))
    with pytest.raises(ResunetError, match="> 0"):
        M.assd(a, a, spacing=(1.0, -0.5))
    with pytest.raises(ResunetError, match="> 0"):
        M.assd(a, a, spacing=0)
    with pytest.raises(ResunetError, match="spacing"):
        M.assd(a, a, spacing="1.0")
    with pytest.raises(ResunetError, match=">= 0"):
        M.surface_dice(a, a, -1.0)
    with pytest.raises(ResunetError, match=">= 0"):
        M.boundary_f1(a, a, float("nan"))
    with pytest.raises(ResunetError, match=">= 0"):
        M.compute_all(a.astype(int), a.astype(int), labels=[1], tolerance_mm=-0.1)
    with pytest.raises(ResunetError, match="no value for label"):
        M.compute_all(a.astype(int), a.astype(int), labels=[1, 2], tolerance_mm={1: 1.0})
    with pytest.raises(ResunetError, match="percentile"):
        M.hausdorff(a, a, percentile=101)
    with pytest.raises(ResunetError, match="binary mask"):
        M.dice(np.full((5, 6), 0.5), a)
    with pytest.raises(ResunetError, match="binary mask"):
        M.hd95(a, np.full((5, 6), 2))
    with pytest.raises(ResunetError, match="2-D"):
        M.dice(np.zeros((1, 1, 5, 6), bool), np.zeros((1, 1, 5, 6), bool))
    with pytest.raises(ResunetError, match="integer label map"):
        M.per_class(M.dice, np.full((5, 6), 0.5), np.zeros((5, 6)))
    with pytest.raises(ResunetError, match="repeat"):
        M.per_class(M.dice, a.astype(int), a.astype(int), labels=[1, 1])
    with pytest.raises(ResunetError, match="integers"):
        M.per_class(M.dice, a.astype(int), a.astype(int), labels=[1.5])
