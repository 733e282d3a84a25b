"""From logits to a label map, and optional clean-up of that label map.

``logits`` are ``(K, *S)``: ``K == 1`` is a binary task (foreground where the logit > 0),
``K > 1`` is multi-class (argmax; class 0 is background).
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import torch
from scipy import ndimage


def logits_to_labels(logits: torch.Tensor) -> torch.Tensor:
    """``(K, *S)`` logits -> ``(*S)`` uint8 labels."""
    if logits.shape[0] == 1:
        return (logits[0] > 0).to(torch.uint8)
    return logits.argmax(dim=0).to(torch.uint8)


def keep_largest_component(labels: np.ndarray, classes: Iterable[int]) -> np.ndarray:
    """Keep only the largest connected component (face connectivity) of each class in ``classes``."""
    out = labels.copy()
    for c in classes:
        comp, n = ndimage.label(labels == c)
        if n > 1:
            sizes = np.bincount(comp.ravel())[1:]
            out[(comp > 0) & (comp != 1 + int(np.argmax(sizes)))] = 0
    return out


def remove_small_components(labels: np.ndarray, min_voxels: int) -> np.ndarray:
    """Set components smaller than ``min_voxels`` (per class) to background."""
    out = labels.copy()
    for c in np.unique(labels):
        if c == 0:
            continue
        comp, n = ndimage.label(labels == c)
        sizes = np.bincount(comp.ravel())
        small = np.flatnonzero(sizes < min_voxels)
        small = small[small > 0]
        out[np.isin(comp, small)] = 0
    return out


def fill_holes(labels: np.ndarray, classes: Iterable[int]) -> np.ndarray:
    """Fill background holes fully enclosed by one class (3-D / 2-D binary hole filling)."""
    out = labels.copy()
    for c in classes:
        filled = ndimage.binary_fill_holes(labels == c)
        out[filled & (labels == 0)] = c
    return out
