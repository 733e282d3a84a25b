"""Segmentation metrics on binary masks and label maps (numpy or torch, 2-D or 3-D).

Every function is a pure function: masks in, a Python ``float`` (or a dict of floats) out.
Torch tensors are moved to the CPU and converted to numpy first.

Inputs
------
- Binary metrics (``dice``, ``hd95``, ...) take two masks of the same shape, ``(D, H, W)`` /
  ``(z, y, x)`` or ``(H, W)`` / ``(y, x)``. A mask is a ``bool`` array or a numeric array holding
  only 0 and 1; anything else (probabilities, label maps) is refused with a `ResunetError`.
- ``spacing`` is the voxel size in mm in array order (``(z, y, x)`` / ``(y, x)``): ``None``
  (1 mm), one number (isotropic) or one number per axis. Distances are returned in mm.
- ``tolerance_mm`` (surface Dice, boundary F1) is a finite distance >= 0 in mm.
- Multi-class helpers (`per_class`, `compute_all`) take integer label maps and a list of labels.

Definitions (the same as MONAI 1.x; the tests check agreement)
-------------------------------------------------------------
- Boundary voxels: ``mask XOR binary_erosion(mask)`` with scipy's default structuring element
  (face connectivity: 4-neighbourhood in 2-D, 6 in 3-D) and background outside the image, which
  is what MONAI's ``get_mask_edges(..., spacing=None)`` does. A voxel touching the image border
  is therefore a boundary voxel.
- Surface distances: for every boundary voxel of one mask, the Euclidean distance in mm to the
  nearest boundary voxel of the other (``scipy.ndimage.distance_transform_edt(~boundary,
  sampling=spacing)``). Both masks are first cropped to the bounding box of their union (plus
  a one-voxel margin), so only the region that holds foreground is transformed.
- ``hausdorff(percentile=p)``: the p-th percentile (linear interpolation, as numpy's default and
  ``torch.quantile``) of the pred->gt distances and of the gt->pred distances, the larger of the
  two (``directed=True``: the pred->gt one only). ``percentile=None`` gives the maximum, the
  classic Hausdorff distance. ``hd95`` is ``hausdorff(percentile=95)``: MONAI's
  ``HausdorffDistanceMetric(percentile=95, directed=False)``. We compute in float64; MONAI
  casts distances to float32 and ``torch.quantile`` computes the interpolation rank in float32,
  so its percentile distances differ from ours by up to ~1e-5 relative (the rest agree to 1e-6).
- ``assd``: the mean of all pred->gt and gt->pred distances pooled together (MONAI's
  ``SurfaceDistanceMetric(symmetric=True)``), not the mean of the two directed means.
- ``surface_dice``: (number of pred boundary voxels within ``tolerance_mm`` of the gt boundary +
  number of gt boundary voxels within ``tolerance_mm`` of the pred boundary) / (number of all
  boundary voxels of both). Boundary voxels are counted, not surface areas: MONAI's
  ``SurfaceDiceMetric(class_thresholds=[tol], use_subvoxels=False)``.
- ``boundary_f1``: precision = fraction of pred boundary voxels within ``tolerance_mm`` of the gt
  boundary, recall = fraction of gt boundary voxels within ``tolerance_mm`` of the pred boundary,
  F1 = their harmonic mean (0 when both are 0).
- "Within the tolerance" means ``distance <= tolerance_mm`` with a relative slack of 1e-6, so a
  distance that equals the tolerance up to rounding (3 voxels of 0.8 mm come out of the EDT as
  2.4000000000000004 mm) counts as within 2.4 mm, as it does in MONAI's float32 comparison.

Empty masks (deliberate conventions)
------------------------------------
- Both masks empty (a structure correctly found absent): ``dice``, ``iou``, ``sensitivity``,
  ``precision``, ``specificity``, ``surface_dice`` and ``boundary_f1`` are 1.0; ``hausdorff``,
  ``hd95`` and ``assd`` are 0.0. A perfect answer scores perfectly, and per-case means stay
  finite. (MONAI returns nan here; nnU-Net reports nan Dice and drops the case from the mean.
  Dropping hides the cases where a model correctly predicts nothing, and makes the mean depend
  on how many such cases there are, so we score them.)
- Exactly one mask empty (a structure missed or hallucinated): ``dice``, ``iou``,
  ``surface_dice``, ``boundary_f1`` are 0.0. So are ``sensitivity`` and ``precision`` whose
  denominator is 0 (sensitivity with an empty gt, precision with an empty pred): a 0/0 ratio is
  1.0 only when both masks are empty. ``hausdorff``, ``hd95`` and ``assd`` are ``inf``. MONAI (with a
  warning) returns ``inf`` for its Hausdorff and average surface distances here; its percentile
  Hausdorff comes out ``nan`` only because ``torch.quantile`` interpolates between ``inf``
  values (``inf - inf``), so we use ``inf`` for all three. ``inf`` rather than ``nan`` because
  the distance from a surface to an empty set is unbounded, and because ``nan`` is what
  ``np.nanmean`` and MONAI's reductions silently drop, which would hide a missed or hallucinated
  structure behind a good-looking mean; ``inf`` makes the mean ``inf`` so the failure shows, and
  a caller who wants a finite number replaces it on purpose (e.g. with the image diagonal).
- ``specificity`` = TN / (TN + FP) is defined on the gt negatives whether or not either mask is
  empty; only when the gt has no negatives at all (all foreground) is it 1.0 (no false positive
  is possible).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from scipy import ndimage

from resunet.errors import ResunetError

__all__ = [
    "METRIC_NAMES",
    "assd",
    "boundary",
    "boundary_f1",
    "compute_all",
    "dice",
    "hausdorff",
    "hd95",
    "iou",
    "per_class",
    "precision",
    "sensitivity",
    "specificity",
    "surface_dice",
    "surface_distances",
]

#: Names (and order) of the metrics `compute_all` returns for each class.
METRIC_NAMES: tuple[str, ...] = (
    "dice",
    "iou",
    "sensitivity",
    "specificity",
    "precision",
    "hd95",
    "assd",
    "surface_dice",
    "boundary_f1",
)

# relative slack for "distance <= tolerance" (see the module docstring)
_TOLERANCE_SLACK = 1e-6
# voxels added around the union's bounding box before extracting boundaries
_CROP_MARGIN = 1


# --------------------------------------------------------------------------------------------
# argument checking and conversion
# --------------------------------------------------------------------------------------------


def _to_numpy(x: Any, name: str) -> np.ndarray:
    """A numpy view/copy of ``x`` (torch tensors are detached and moved to the CPU)."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        torch = None  # type: ignore[assignment]
    if torch is not None and isinstance(x, torch.Tensor):
        t = x.detach().cpu()
        if t.dtype == torch.bfloat16:
            t = t.float()
        return t.numpy()
    try:
        return np.asarray(x)
    except Exception as exc:  # noqa: BLE001 - anything numpy cannot read is a user error
        raise ResunetError(f"{name} must be a numpy array or torch tensor, got {type(x).__name__}") from exc


def _as_mask(x: Any, name: str) -> np.ndarray:
    """``x`` as a boolean mask; refuses values other than 0 and 1."""
    a = _to_numpy(x, name)
    if a.dtype == np.bool_:
        return a
    if not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)):
        raise ResunetError(f"{name} must be a binary mask (bool or 0/1 numbers), got dtype {a.dtype}")
    nonzero = np.count_nonzero(a)
    if nonzero != np.count_nonzero(a == 1):
        raise ResunetError(
            f"{name} must be a binary mask holding only 0 and 1; it holds other values. "
            "Threshold probabilities first, or use per_class/compute_all for label maps."
        )
    return a != 0


def _check_shapes(pred: np.ndarray, gt: np.ndarray, what: str) -> None:
    if pred.shape != gt.shape:
        raise ResunetError(f"pred and gt {what} must have the same shape, got {pred.shape} and {gt.shape}")
    if pred.ndim not in (2, 3):
        raise ResunetError(
            f"pred and gt {what} must be 2-D (y, x) or 3-D (z, y, x) without batch or channel axes, "
            f"got shape {pred.shape}"
        )


def _masks(pred: Any, gt: Any) -> tuple[np.ndarray, np.ndarray]:
    p = _as_mask(pred, "pred")
    g = _as_mask(gt, "gt")
    _check_shapes(p, g, "masks")
    return p, g


def _spacing(spacing: Any, ndim: int) -> tuple[float, ...]:
    """Validated spacing as one positive float per axis."""
    if spacing is None:
        return (1.0,) * ndim
    try:
        import torch

        if isinstance(spacing, torch.Tensor):
            spacing = spacing.detach().cpu().numpy()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(spacing, (str, bytes)):
        raise ResunetError(f"spacing must be a number or a sequence of {ndim} numbers (mm), got {spacing!r}")
    arr = np.asarray(spacing, dtype=object)
    if arr.ndim == 0:
        values = [spacing] * ndim
    elif arr.ndim == 1:
        values = list(arr)
        if len(values) != ndim:
            raise ResunetError(
                f"spacing must have one value per axis of the {ndim}-D masks "
                f"({'(z, y, x)' if ndim == 3 else '(y, x)'}, in mm), got {len(values)}: {tuple(values)}"
            )
    else:
        raise ResunetError(f"spacing must be a number or a sequence of {ndim} numbers, got {spacing!r}")
    out = []
    for v in values:
        try:
            f = float(v)
        except (TypeError, ValueError) as exc:
            raise ResunetError(f"spacing values must be numbers, got {spacing!r}") from exc
        if not math.isfinite(f) or f <= 0:
            raise ResunetError(f"spacing values must be finite and > 0 (mm), got {spacing!r}")
        out.append(f)
    return tuple(out)


def _tolerance(tolerance_mm: Any, what: str = "tolerance_mm") -> float:
    try:
        t = float(tolerance_mm)
    except (TypeError, ValueError) as exc:
        raise ResunetError(f"{what} must be a number of mm, got {tolerance_mm!r}") from exc
    if not math.isfinite(t) or t < 0:
        raise ResunetError(f"{what} must be finite and >= 0 (mm), got {tolerance_mm!r}")
    return t


def _percentile(percentile: Any) -> float | None:
    if percentile is None:
        return None
    try:
        p = float(percentile)
    except (TypeError, ValueError) as exc:
        raise ResunetError(f"percentile must be None or a number in [0, 100], got {percentile!r}") from exc
    if not (0.0 <= p <= 100.0):
        raise ResunetError(f"percentile must be None or a number in [0, 100], got {percentile!r}")
    return p


# --------------------------------------------------------------------------------------------
# core computations on validated boolean arrays
# --------------------------------------------------------------------------------------------


def _counts(p: np.ndarray, g: np.ndarray) -> tuple[int, int, int, int]:
    """(TP, FP, FN, TN) as Python ints."""
    tp = int(np.count_nonzero(p & g))
    n_pred = int(np.count_nonzero(p))
    n_gt = int(np.count_nonzero(g))
    fp = n_pred - tp
    fn = n_gt - tp
    tn = int(p.size) - tp - fp - fn
    return tp, fp, fn, tn


def _ratio(num: int, den: int, both_empty: bool) -> float:
    """num / den, with 0/0 -> 1.0 if both masks are empty else 0.0."""
    if den == 0:
        return 1.0 if both_empty else 0.0
    return num / den


def dice_from_counts(tp: Any, fp: Any, fn: Any) -> Any:
    """Dice ``2 TP / (2 TP + FP + FN)`` from voxel counts: Python numbers, or numpy arrays / torch
    tensors elementwise (the same type back). 1.0 where both masks are empty (TP + FP + FN = 0).
    The one Dice formula of the package: metrics, validation, backend checks and benchmarks use it."""
    denom = 2 * tp + fp + fn
    if isinstance(denom, (int, float)):
        return 1.0 if denom == 0 else 2 * tp / denom
    empty = denom == 0
    return 2 * tp / denom.clip(min=1) * ~empty + empty * 1.0


def _overlap(tp: int, fp: int, fn: int, tn: int) -> dict[str, float]:
    both_empty = tp + fp + fn == 0
    return {
        "dice": float(dice_from_counts(tp, fp, fn)),
        "iou": _ratio(tp, tp + fp + fn, both_empty),
        "sensitivity": _ratio(tp, tp + fn, both_empty),
        "specificity": 1.0 if tn + fp == 0 else tn / (tn + fp),
        "precision": _ratio(tp, tp + fp, both_empty),
    }


def _bbox(union: np.ndarray, margin: int) -> tuple[slice, ...] | None:
    """Bounding box of the True voxels, grown by ``margin`` and clipped to the array."""
    slices = []
    for axis in range(union.ndim):
        other = tuple(a for a in range(union.ndim) if a != axis)
        idx = np.flatnonzero(union.any(axis=other))
        if idx.size == 0:
            return None
        slices.append(slice(max(int(idx[0]) - margin, 0), min(int(idx[-1]) + 1 + margin, union.shape[axis])))
    return tuple(slices)


def _edges(mask: np.ndarray) -> np.ndarray:
    # scipy's default structure is the face-connected cross (rank, 1); border_value=0 treats
    # the outside of the array as background, exactly as MONAI's get_mask_edges.
    return mask ^ ndimage.binary_erosion(mask)


def _distances(
    p: np.ndarray, g: np.ndarray, spacing: tuple[float, ...]
) -> tuple[np.ndarray, np.ndarray]:
    """Directed surface distances (pred boundary -> gt boundary, gt boundary -> pred boundary).

    An empty mask has no boundary, so its own array is empty; the other mask's distances are
    then all ``inf``.
    """
    box = _bbox(p | g, _CROP_MARGIN)
    if box is None:
        empty = np.zeros(0, dtype=np.float64)
        return empty, empty.copy()
    # Cropping is exact: outside the box both masks are background, the erosion treats the
    # outside of the crop as background too, and the EDT measures straight-line distances, so
    # distances between boundary voxels inside the box do not depend on what lies outside it.
    pc, gc = p[box], g[box]
    pe, ge = _edges(pc), _edges(gc)
    has_p, has_g = bool(pe.any()), bool(ge.any())
    if has_p and has_g:
        d_pg = ndimage.distance_transform_edt(~ge, sampling=spacing)[pe]
        d_gp = ndimage.distance_transform_edt(~pe, sampling=spacing)[ge]
    else:
        d_pg = np.full(int(np.count_nonzero(pe)), np.inf)
        d_gp = np.full(int(np.count_nonzero(ge)), np.inf)
    return d_pg.astype(np.float64, copy=False), d_gp.astype(np.float64, copy=False)


def _hausdorff_from(d_pg: np.ndarray, d_gp: np.ndarray, percentile: float | None, directed: bool) -> float:
    if d_pg.size == 0 and d_gp.size == 0:
        return 0.0
    if d_pg.size == 0 or d_gp.size == 0:
        return math.inf

    def one(d: np.ndarray) -> float:
        return float(d.max()) if percentile is None else float(np.percentile(d, percentile))

    if directed:
        return one(d_pg)
    return max(one(d_pg), one(d_gp))


def _assd_from(d_pg: np.ndarray, d_gp: np.ndarray) -> float:
    n = d_pg.size + d_gp.size
    if n == 0:
        return 0.0
    if d_pg.size == 0 or d_gp.size == 0:
        return math.inf
    return float((d_pg.sum() + d_gp.sum()) / n)


def _within(d: np.ndarray, tol: float) -> int:
    return int(np.count_nonzero(d <= tol * (1.0 + _TOLERANCE_SLACK) + 1e-12))


def _surface_dice_from(d_pg: np.ndarray, d_gp: np.ndarray, tol: float) -> float:
    n = d_pg.size + d_gp.size
    if n == 0:
        return 1.0
    return (_within(d_pg, tol) + _within(d_gp, tol)) / n


def _boundary_f1_from(d_pg: np.ndarray, d_gp: np.ndarray, tol: float) -> float:
    if d_pg.size == 0 and d_gp.size == 0:
        return 1.0
    if d_pg.size == 0 or d_gp.size == 0:
        return 0.0
    prec = _within(d_pg, tol) / d_pg.size
    rec = _within(d_gp, tol) / d_gp.size
    if prec + rec == 0:
        return 0.0
    return 2.0 * prec * rec / (prec + rec)


# --------------------------------------------------------------------------------------------
# public binary metrics
# --------------------------------------------------------------------------------------------


def dice(pred: Any, gt: Any) -> float:
    """Dice coefficient 2|P∩G| / (|P| + |G|); 1.0 if both masks are empty."""
    return _overlap(*_counts(*_masks(pred, gt)))["dice"]


def iou(pred: Any, gt: Any) -> float:
    """Intersection over union (Jaccard) |P∩G| / |P∪G|; 1.0 if both masks are empty."""
    return _overlap(*_counts(*_masks(pred, gt)))["iou"]


def sensitivity(pred: Any, gt: Any) -> float:
    """Recall TP / (TP + FN); with an empty gt: 1.0 if pred is empty too, else 0.0."""
    return _overlap(*_counts(*_masks(pred, gt)))["sensitivity"]


def specificity(pred: Any, gt: Any) -> float:
    """TN / (TN + FP), over the gt negatives; 1.0 if the gt has no negatives."""
    return _overlap(*_counts(*_masks(pred, gt)))["specificity"]


def precision(pred: Any, gt: Any) -> float:
    """Positive predictive value TP / (TP + FP); with an empty pred: 1.0 if gt is empty too, else 0.0."""
    return _overlap(*_counts(*_masks(pred, gt)))["precision"]


def boundary(mask: Any) -> np.ndarray:
    """Boundary voxels of a binary mask: ``mask XOR erosion(mask)`` (face connectivity)."""
    m = _as_mask(mask, "mask")
    if m.ndim not in (2, 3):
        raise ResunetError(f"mask must be 2-D (y, x) or 3-D (z, y, x), got shape {m.shape}")
    return _edges(m)


def surface_distances(pred: Any, gt: Any, spacing: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """Distances in mm from each pred boundary voxel to the gt boundary, and the reverse.

    Returns ``(pred_to_gt, gt_to_pred)`` as float64 arrays with one value per boundary voxel
    (in C order). An empty mask yields an empty array for itself and ``inf`` for the other.
    """
    p, g = _masks(pred, gt)
    return _distances(p, g, _spacing(spacing, p.ndim))


def hausdorff(
    pred: Any,
    gt: Any,
    spacing: Any = None,
    percentile: float | None = None,
    directed: bool = False,
) -> float:
    """(Percentile) Hausdorff distance in mm between the boundaries of two masks.

    ``percentile=None`` gives the maximum surface distance; a number in [0, 100] gives that
    percentile of each directed set of distances (linear interpolation) and then the larger of
    the two (only pred->gt when ``directed``). Both empty: 0.0; one empty: ``inf``.
    Note: MONAI treats ``percentile=0`` like ``None`` (the maximum); here 0 is the minimum.
    """
    p, g = _masks(pred, gt)
    sp = _spacing(spacing, p.ndim)
    pct = _percentile(percentile)
    return _hausdorff_from(*_distances(p, g, sp), pct, bool(directed))


def hd95(pred: Any, gt: Any, spacing: Any = None) -> float:
    """95th-percentile symmetric Hausdorff distance in mm (MONAI's ``percentile=95``)."""
    return hausdorff(pred, gt, spacing=spacing, percentile=95.0)


def assd(pred: Any, gt: Any, spacing: Any = None) -> float:
    """Average symmetric surface distance in mm (mean of both directions' distances pooled)."""
    p, g = _masks(pred, gt)
    return _assd_from(*_distances(p, g, _spacing(spacing, p.ndim)))


def surface_dice(pred: Any, gt: Any, tolerance_mm: float, spacing: Any = None) -> float:
    """Normalised surface Dice at ``tolerance_mm``, counting boundary voxels (not areas)."""
    p, g = _masks(pred, gt)
    sp = _spacing(spacing, p.ndim)
    tol = _tolerance(tolerance_mm)
    return _surface_dice_from(*_distances(p, g, sp), tol)


def boundary_f1(pred: Any, gt: Any, tolerance_mm: float, spacing: Any = None) -> float:
    """Boundary F1 at ``tolerance_mm``: harmonic mean of boundary precision and recall."""
    p, g = _masks(pred, gt)
    sp = _spacing(spacing, p.ndim)
    tol = _tolerance(tolerance_mm)
    return _boundary_f1_from(*_distances(p, g, sp), tol)


# --------------------------------------------------------------------------------------------
# multi-class helpers
# --------------------------------------------------------------------------------------------


def _as_labels(x: Any, name: str) -> np.ndarray:
    a = _to_numpy(x, name)
    if a.dtype == np.bool_ or np.issubdtype(a.dtype, np.integer):
        return a
    if np.issubdtype(a.dtype, np.floating):
        if not np.all(np.isfinite(a)) or not np.array_equal(a, np.round(a)):
            raise ResunetError(
                f"{name} must be an integer label map; it holds non-integer values "
                "(pass argmax'ed labels, not probabilities)"
            )
        return a
    raise ResunetError(f"{name} must be an integer label map, got dtype {a.dtype}")


def _label_maps(pred_labels: Any, gt_labels: Any) -> tuple[np.ndarray, np.ndarray]:
    p = _as_labels(pred_labels, "pred_labels")
    g = _as_labels(gt_labels, "gt_labels")
    _check_shapes(p, g, "label maps")
    return p, g


def _present_labels(a: np.ndarray) -> set[int]:
    if a.size == 0:
        return set()
    if a.dtype == np.bool_:
        return {1} if a.any() else set()
    if np.issubdtype(a.dtype, np.integer):
        lo, hi = int(a.min()), int(a.max())
        if lo >= 0 and hi <= 1 << 16:  # bincount is much faster than unique on big volumes
            return {int(v) for v in np.flatnonzero(np.bincount(a.ravel()))}
    return {int(v) for v in np.unique(a)}


def _labels(labels: Any, p: np.ndarray, g: np.ndarray) -> list[int]:
    if labels is None:
        return sorted((_present_labels(p) | _present_labels(g)) - {0})
    if isinstance(labels, (int, np.integer)):
        labels = [labels]
    out: list[int] = []
    for lab in labels:
        if isinstance(lab, (bool, np.bool_)) or not isinstance(lab, (int, np.integer)):
            raise ResunetError(f"labels must be integers, got {lab!r} in {labels!r}")
        if int(lab) in out:
            raise ResunetError(f"labels must not repeat, got {int(lab)} twice in {list(labels)!r}")
        out.append(int(lab))
    return out


def per_class(
    metric_fn: Callable[..., float],
    pred_labels: Any,
    gt_labels: Any,
    labels: Sequence[int] | None = None,
    **kwargs: Any,
) -> dict[int, float]:
    """``{label: metric_fn(pred_labels == label, gt_labels == label, **kwargs)}``.

    ``labels=None`` uses every non-zero label found in either map (sorted); a listed label that
    occurs in neither map is scored with the both-empty convention.
    Example: ``per_class(hd95, pred, gt, labels=[1, 2], spacing=(2.5, 0.8, 0.8))``.
    """
    p, g = _label_maps(pred_labels, gt_labels)
    return {lab: float(metric_fn(p == lab, g == lab, **kwargs)) for lab in _labels(labels, p, g)}


def compute_all(
    pred_labels: Any,
    gt_labels: Any,
    labels: Sequence[int] | None = None,
    spacing: Any = None,
    tolerance_mm: float | Mapping[int, float] = 1.0,
) -> dict[int, dict[str, float]]:
    """All metrics of `METRIC_NAMES` for each label: ``{label: {metric name: value}}``.

    Boundaries and surface distances are computed once per label and shared by ``hd95``,
    ``assd``, ``surface_dice`` and ``boundary_f1``. ``tolerance_mm`` is one value for every
    label or a mapping ``{label: mm}`` covering all of them. ``labels=None`` uses every
    non-zero label found in either map (so two empty maps give ``{}``: pass ``labels``
    explicitly to score absent classes).
    """
    p, g = _label_maps(pred_labels, gt_labels)
    sp = _spacing(spacing, p.ndim)
    labs = _labels(labels, p, g)
    if isinstance(tolerance_mm, Mapping):
        missing = [lab for lab in labs if lab not in tolerance_mm]
        if missing:
            raise ResunetError(
                f"tolerance_mm has no value for label(s) {missing}; it covers {sorted(tolerance_mm)}"
            )
        tols = {lab: _tolerance(tolerance_mm[lab], f"tolerance_mm[{lab}]") for lab in labs}
    else:
        t = _tolerance(tolerance_mm)
        tols = {lab: t for lab in labs}
    out: dict[int, dict[str, float]] = {}
    for lab in labs:
        pm, gm = p == lab, g == lab
        row = _overlap(*_counts(pm, gm))
        d_pg, d_gp = _distances(pm, gm, sp)
        row["hd95"] = _hausdorff_from(d_pg, d_gp, 95.0, False)
        row["assd"] = _assd_from(d_pg, d_gp)
        row["surface_dice"] = _surface_dice_from(d_pg, d_gp, tols[lab])
        row["boundary_f1"] = _boundary_f1_from(d_pg, d_gp, tols[lab])
        out[lab] = {name: float(row[name]) for name in METRIC_NAMES}
    return out
