"""Plain U-Net baseline (Ronneberger et al., 2015) with BatchNorm: double-conv blocks, concat skips.

2-D, 1 in, 1 out, depth 5: base 32 -> about 7.8 M parameters (the seed's U-Net figure); base 64 ->
about 31 M.
"""

from __future__ import annotations

from resunet.nets.blocks import DoubleConv
from resunet.nets.encoder_decoder import ConcatFusion, EncoderDecoder


class UNet(EncoderDecoder):
    """Plain U-Net. Input ``(B, C_in, *S)`` -> logits ``(B, C_out, *S)``."""

    block = DoubleConv
    fusion = ConcatFusion
