"""A case that lacks some of its modalities: preprocess the channels it has, zero-fill the others.

For a model trained with modality dropout (`resunet.data.augment.modality`): the present
channels go through `preprocess_case` with the statistics of THEIR channel indices (a ``fixed``
normalisation with one mean / std per channel keeps each channel's own), and each missing
channel is inserted as zeros AFTER normalisation and resampling -- the value the training's
modality dropout used (the foreground mean after a z-score).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from resunet.data.preprocess import PreprocessConfig, PreprocessedCase, preprocess_case
from resunet.data.volume import Volume
from resunet.errors import InputError


def present_channels_config(config: PreprocessConfig, present: Sequence[int], total: int) -> PreprocessConfig:
    """``config`` for the channels ``present`` of ``total`` (per-channel statistics sub-selected)."""
    update = {}
    for key in ("intensity_mean", "intensity_std"):
        value = getattr(config, key)
        if isinstance(value, tuple) and len(value) == total:
            update[key] = tuple(value[c] for c in present)
    return config.model_copy(update=update) if update else config


def preprocess_missing(images: Sequence[Volume], missing: Sequence[int], total: int,
                       config: PreprocessConfig) -> PreprocessedCase:
    """`preprocess_case` of a case whose channels ``missing`` (indices in ``0 .. total - 1``) are
    absent: ``images`` hold the others, in channel order. The result has all ``total`` channels
    ``(total, *S)``, the missing ones 0; ``properties["missing_channels"]`` lists them."""
    missing = sorted({int(c) for c in missing})
    if not missing or missing[0] < 0 or missing[-1] >= total or len(missing) >= total:
        raise InputError(f"missing channels {missing} must be some, not all, of 0..{total - 1}")
    present = [c for c in range(total) if c not in missing]
    have = sum(v.num_channels for v in images)
    if have != len(present):
        raise InputError(f"the case has {have} image channel(s); with channel(s) {missing} missing it needs "
                         f"{len(present)} of {total}")
    case = preprocess_case(list(images), None, present_channels_config(config, present, total))
    full = np.zeros((total, *case.image.shape[1:]), dtype=np.float32)
    full[present] = case.image
    properties = {**case.properties, "num_channels": total, "missing_channels": missing}
    return PreprocessedCase(full, None, case.spacing, properties)
