"""The U-shaped skeleton every network here shares; the networks differ in block and skip fusion.

Encoder level ``i`` has ``base_channels * 2**i`` channels (default 64-128-256-512-1024); levels are
joined by 2x max-pooling. Each decoder level up-samples with a transposed convolution, fuses the
up-sampled tensor with the encoder skip of the same level, and applies one block. A 1x1 convolution
maps to ``out_channels`` logits (no activation: losses, metrics and the predictor apply it).

``modality_fusion="late"`` replaces the shared encoder by one branch per modality, fused per
level (`resunet.nets.fusion.LateFusionEncoder`); the decoder is the same.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from resunet.errors import ModelError
from resunet.nets.blocks import conv, max_pool, up_conv
from resunet.nets.fusion import LateFusionEncoder, check_modalities

BlockFactory = Callable[[int, int, int], nn.Module]  # (spatial_dims, in_ch, out_ch) -> block
FusionFactory = Callable[[int, int], nn.Module]  # (spatial_dims, channels of one side) -> fusion


class ConcatFusion(nn.Module):
    """Concatenate skip and up-sampled features along channels: ``(B, 2C, *S)``."""

    def __init__(self, spatial_dims: int, channels: int) -> None:
        super().__init__()

    def forward(self, skip: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return torch.cat([skip, up], dim=1)


class EncoderDecoder(nn.Module):
    """U-Net skeleton. Input ``(B, in_channels, *S)``, output logits ``(B, out_channels, *S)``.

    Subclasses choose the ``block`` (used at every level) and the skip ``fusion``. Every spatial
    size in ``S`` must be divisible by ``2**(depth-1)``; other sizes raise a `ModelError` naming
    the size to pad to (the predictor pads; the model never crops).

    ``modalities``: how many modalities the ``in_channels`` hold (each ``in_channels / modalities``
    channels: its 2.5-D slices); ``modality_fusion``: ``"early"`` (one encoder over all channels)
    or ``"late"`` (one encoder branch per modality, see `resunet.nets.fusion`).
    """

    block: BlockFactory
    fusion: FusionFactory

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        out_channels: int = 1,
        base_channels: int = 64,
        depth: int = 5,
        modalities: int = 1,
        modality_fusion: str = "early",
    ) -> None:
        super().__init__()
        if depth < 2:
            raise ModelError(f"depth must be at least 2, got {depth}")
        if base_channels < 1 or in_channels < 1 or out_channels < 1:
            raise ModelError("base_channels, in_channels and out_channels must be positive")
        check_modalities(in_channels, modalities, modality_fusion)
        self.modalities, self.modality_fusion = modalities, modality_fusion
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.depth = depth
        self.base_channels = base_channels
        widths = [base_channels * 2**i for i in range(depth)]
        if modality_fusion == "late":
            self.encoders: nn.Module = LateFusionEncoder(self.block, spatial_dims, in_channels, modalities, widths)
        else:
            self.encoders = nn.ModuleList(
                [self.block(spatial_dims, in_channels if i == 0 else widths[i - 1], widths[i]) for i in range(depth)]
            )
        self.pool = max_pool(spatial_dims)
        self.ups = nn.ModuleList([up_conv(spatial_dims, widths[i + 1], widths[i]) for i in range(depth - 1)])
        self.fusions = nn.ModuleList([self.fusion(spatial_dims, widths[i]) for i in range(depth - 1)])
        self.decoders = nn.ModuleList([self.block(spatial_dims, 2 * widths[i], widths[i]) for i in range(depth - 1)])
        self.head = conv(spatial_dims, widths[0], out_channels, 1, bias=True)

    @property
    def divisor(self) -> int:
        """Every spatial input size must be a multiple of this."""
        return 2 ** (self.depth - 1)

    def check_input(self, x: torch.Tensor) -> None:
        if x.ndim != self.spatial_dims + 2:
            raise ModelError(
                f"expected a {self.spatial_dims + 2}-D tensor (B, C, {'D, ' if self.spatial_dims == 3 else ''}H, W), "
                f"got shape {tuple(x.shape)}"
            )
        if x.shape[1] != self.in_channels:
            raise ModelError(f"model expects {self.in_channels} input channel(s), got {x.shape[1]}")
        size = tuple(x.shape[2:])
        d = self.divisor
        if any(s % d for s in size):
            padded = tuple(-(-s // d) * d for s in size)
            raise ModelError(
                f"spatial size {size} is not divisible by {d} (= 2**(depth-1)); pad the input to {padded}"
            )

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The encoder features of every level, finest first: ``(B, base_channels * 2**i, *S / 2**i)``."""
        if isinstance(self.encoders, LateFusionEncoder):
            return self.encoders(x)
        skips = []
        for i, enc in enumerate(self.encoders):
            x = enc(x if i == 0 else self.pool(x))
            skips.append(x)
        return skips

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        skips = self.encode(x)
        x = self.bottleneck(skips.pop())
        for i in reversed(range(self.depth - 1)):
            x = self.decoders[i](self.fusions[i](skips[i], self.ups[i](x)))
        return self.head(x)

    def bottleneck(self, x: torch.Tensor) -> torch.Tensor:
        """The deepest encoder features on their way to the decoder (identity here; the hybrid
        network applies its Transformer)."""
        return x

    def encoder_parameters(self):
        """Parameters of the encoder path, per-modality branches and their fusion included (for
        freezing during transfer learning)."""
        return self.encoders.parameters()
