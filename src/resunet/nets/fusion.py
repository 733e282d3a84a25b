"""Late (intermediate) fusion of modalities: one encoder branch per modality, fused at every scale.

Early fusion (the default) stacks the modalities as input channels of one shared encoder. Late
fusion gives each modality its own encoder branch and joins them level by level:

- The input ``(B, M * G, *S)`` holds ``M`` modalities of ``G = in_channels / M`` channels each,
  modality-major: with 2.5-D context ``k`` the ``G = 2k + 1`` channels of a modality are its
  slices ``z - k .. z + k``, in the order `resunet.data.sampling.stack_context` writes them
  (channel ``m * G + j`` is modality ``m``, slice ``z - k + j``). Branch ``m`` sees only the
  channels ``m * G .. (m + 1) * G - 1``.
- Branch level ``i`` has ``max(1, widths[i] // M)`` channels (the encoder is split in width, so
  M branches cost about 1/M of one shared encoder's convolutions) and the network's block.
- Fusion per level: the M branch features are concatenated and mapped to ``widths[i]`` channels
  by a 1x1 convolution + BN + ReLU. That is the skip (and at the deepest level the bottleneck) the
  one shared decoder reads, so the decoder and head are those of early fusion.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from resunet.errors import ModelError
from resunet.nets.blocks import batch_norm, conv, max_pool

#: how the modalities of a case meet: ``early`` (input channels) or ``late`` (per-modality encoders)
FUSION_MODES = ("early", "late")


def check_modalities(in_channels: int, modalities: int, fusion: str) -> None:
    """`ModelError` unless ``fusion`` is a `FUSION_MODES` name and ``modalities`` divides ``in_channels``."""
    if fusion not in FUSION_MODES:
        raise ModelError(f"modality fusion must be one of {', '.join(FUSION_MODES)}, got {fusion!r}")
    if isinstance(modalities, bool) or not isinstance(modalities, int) or modalities < 1:
        raise ModelError(f"modalities must be a positive integer, got {modalities!r}")
    if in_channels % modalities:
        raise ModelError(
            f"in_channels {in_channels} is not a multiple of modalities {modalities}: each modality needs "
            "the same number of input channels (its 2.5-D slices)"
        )


class LateFusionEncoder(nn.Module):
    """One encoder branch per modality, fused per level (see the module docstring).

    ``block(spatial_dims, in_ch, out_ch)`` builds one level; ``widths`` are the fused channels per
    level (finest first). ``forward`` returns the fused features of every level, finest first:
    ``(B, widths[i], *S / 2**i)``.
    """

    def __init__(self, block: Callable[[int, int, int], nn.Module], spatial_dims: int, in_channels: int,
                 modalities: int, widths: Sequence[int]) -> None:
        super().__init__()
        check_modalities(in_channels, modalities, "late")
        self.modalities = modalities
        self.group = in_channels // modalities  # input channels of one modality
        branch = [max(1, w // modalities) for w in widths]
        self.branches = nn.ModuleList([
            nn.ModuleList([block(spatial_dims, self.group if i == 0 else branch[i - 1], branch[i])
                           for i in range(len(widths))])
            for _ in range(modalities)
        ])
        self.fuse = nn.ModuleList([
            nn.Sequential(conv(spatial_dims, modalities * b, w, 1), batch_norm(spatial_dims, w), nn.ReLU(inplace=True))
            for b, w in zip(branch, widths)
        ])
        self.pool = max_pool(spatial_dims)

    def modality_input(self, x: torch.Tensor, m: int) -> torch.Tensor:
        """The channels of modality ``m``: ``(B, G, *S)``."""
        return x[:, m * self.group:(m + 1) * self.group]

    def branch_features(self, x: torch.Tensor) -> list[list[torch.Tensor]]:
        """Per modality, the features of every level of its own branch (before fusion):
        ``out[m][i]`` is ``(B, max(1, widths[i] // M), *S / 2**i)``."""
        out = []
        for m, levels in enumerate(self.branches):
            h, features = self.modality_input(x, m), []
            for i, level in enumerate(levels):
                h = level(h if i == 0 else self.pool(h))
                features.append(h)
            out.append(features)
        return out

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        per_modality = self.branch_features(x)
        return [fuse(torch.cat([f[i] for f in per_modality], dim=1)) for i, fuse in enumerate(self.fuse)]
