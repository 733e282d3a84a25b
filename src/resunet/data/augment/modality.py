"""Modality dropout: some samples of a batch lose whole modalities (zero-filled), so a model learns
to segment a case whose scan lacks one (`resunet.infer` zero-fills a missing modality the same way).

Zero is the value of "no information" here: after the z-score normalisation of MR
(`resunet.data.preprocess.zscore`) it is each channel's foreground mean (and the value of the
background outside the non-zero mask).
"""

from __future__ import annotations

import torch

from resunet.data.augment._common import _coin, _uniform
from resunet.errors import InputError


def modality_dropout(
    image: torch.Tensor, p: float, modalities: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero whole modalities of some samples.

    ``image`` ``(B, M * G, *S)``: ``M = modalities`` modalities of ``G`` channels each,
    modality-major (modality ``m`` is channels ``m * G .. (m + 1) * G - 1``: its 2.5-D context
    slices, as `resunet.data.sampling.stack_context` orders them), so a dropped modality loses all
    its slices together. Each sample is chosen with probability ``p``; a chosen sample loses
    ``k`` of its modalities, ``k`` uniform in ``1 .. M - 1`` and the ``k`` drawn uniformly, so at
    least one modality always stays. Returns the new image (same shape and dtype; dropped
    channels exactly 0) and the dropped modalities ``(B, M)`` bool. With ``p == 0`` or ``M == 1``
    nothing is drawn and the image is returned as is.
    """
    b, c = image.shape[:2]
    if isinstance(modalities, bool) or not isinstance(modalities, int) or modalities < 1 or c % modalities:
        raise InputError(f"modality dropout: {c} image channels do not split into {modalities!r} modalities "
                         "of equal size")
    dev = image.device
    if p <= 0 or modalities == 1:
        return image, torch.zeros(b, modalities, dtype=torch.bool, device=dev)
    chosen = _coin(generator, b, p, dev)
    count = 1 + (_uniform(generator, (b,), 0.0, 1.0, dev) * (modalities - 1)).long().clamp_(max=modalities - 2)
    # a uniformly random order of the modalities per sample; the first `count` of it are dropped
    rank = _uniform(generator, (b, modalities), 0.0, 1.0, dev).argsort(dim=1).argsort(dim=1)
    dropped = chosen[:, None] & (rank < count[:, None])
    channels = dropped.repeat_interleave(c // modalities, dim=1)
    return image.masked_fill(channels.reshape(b, c, *([1] * (image.ndim - 2))), 0.0), dropped
