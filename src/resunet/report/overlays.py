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


def save_overlay(
    path: Path,
    image: np.ndarray,
    pred: np.ndarray,
    gt: np.ndarray | None = None,
    title: str = "",
    aspect: float = 1.0,
) -> Path:
    """Write ``image`` ``(H, W)`` with contours of every class of ``pred`` (red) and ``gt`` (green).

    ``aspect`` is the pixel height / width ratio in mm, so anisotropic slices look right.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 6 * image.shape[0] / max(1, image.shape[1]) * aspect))
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
