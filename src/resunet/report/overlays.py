"""PNG overlays: an image slice with the contours of the prediction and of the ground truth."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from resunet.data.io import atomic_write

PRED_COLOR = "#ff3b30"  # red
GT_COLOR = "#34c759"  # green


def best_slice(labels: np.ndarray) -> int:
    """Index along axis 0 of the slice with the most foreground (middle slice when empty)."""
    counts = (labels > 0).reshape(labels.shape[0], -1).sum(1)
    return int(np.argmax(counts)) if counts.any() else labels.shape[0] // 2


def _unit_range(image: np.ndarray) -> np.ndarray:
    """``image`` scaled to 0..1 (float) over its finite range."""
    data = np.asarray(image, dtype=np.float64)
    lo, hi = float(np.nanmin(data)), float(np.nanmax(data))
    return np.clip((data - lo) / (hi - lo), 0.0, 1.0) if hi > lo else np.zeros_like(data)


def save_overlay(
    path: Path,
    image: np.ndarray,
    pred: np.ndarray,
    gt: np.ndarray | None = None,
    title: str = "",
    aspect: float = 1.0,
) -> Path:
    """Write ``image`` with contours of every class of ``pred`` (red) and ``gt`` (green).

    ``image``: a grey slice ``(H, W)`` (contrast from its 0.5 / 99.5 percentiles) or an RGB picture
    ``(H, W, 3)`` (uint8 shown as is, other types scaled to their range). ``aspect`` is the pixel
    height / width ratio in mm, so anisotropic slices look right.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 6 * image.shape[0] / max(1, image.shape[1]) * aspect))
    if image.ndim == 3:  # RGB
        shown = image if image.dtype == np.uint8 else _unit_range(image)
        ax.imshow(shown, aspect=aspect, interpolation="nearest")
    else:
        lo, hi = np.percentile(image, [0.5, 99.5])
        ax.imshow(image, cmap="gray", vmin=lo, vmax=hi, aspect=aspect, interpolation="nearest")
    for labels, color in ((gt, GT_COLOR), (pred, PRED_COLOR)):
        if labels is None:
            continue
        for c in np.unique(labels):
            if c != 0:
                ax.contour(labels == c, levels=[0.5], colors=color, linewidths=0.9)
    ax.set_title(title + ("  (green: ground truth, red: prediction)" if gt is not None else ""), fontsize=9)
    ax.axis("off")
    fig.tight_layout()
    with atomic_write(Path(path)) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return Path(path)
