"""Plain U-Net baseline (Ronneberger et al., 2015) with BatchNorm: double-conv blocks, concat skips.

2-D, 1 in, 1 out, depth 5: base 32 -> about 7.8 M parameters (the seed's U-Net figure); base 64 ->
about 31 M.
"""

from __future__ import annotations

from resunet.nets.blocks import DoubleConv
from resunet.nets.encoder_decoder import ConcatFusion, EncoderDecoder


class UNet(EncoderDecoder):
    """Plain U-Net. Input ``(B, C_in, *S)`` -> logits ``(B, C_out, *S)``."""

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        out_channels: int = 1,
        base_channels: int = 64,
        depth: int = 5,
    ) -> None:
        super().__init__(
            block=DoubleConv,
            fusion=ConcatFusion,
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            out_channels=out_channels,
            base_channels=base_channels,
            depth=depth,
        )
