"""Attention U-Net baseline (Oktay et al., 2018): additive attention gates on the skips.

The gate weights each encoder skip by a map computed from the skip and the up-sampled decoder
feature of the same level; the gated skip is concatenated with the up-sampled feature and passed
through a double-conv block.
"""

from __future__ import annotations

import torch
from torch import nn

from resunet.nets.blocks import AdditiveAttentionGate, DoubleConv
from resunet.nets.encoder_decoder import EncoderDecoder


class GatedConcat(nn.Module):
    """``cat([gate(skip, up), up])``: ``(B, 2C, *S)``."""

    def __init__(self, spatial_dims: int, channels: int) -> None:
        super().__init__()
        self.gate = AdditiveAttentionGate(spatial_dims, channels, channels, max(1, channels // 2))

    def forward(self, skip: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.gate(skip, up), up], dim=1)


class AttentionUNet(EncoderDecoder):
    """Attention U-Net. Input ``(B, C_in, *S)`` -> logits ``(B, C_out, *S)``."""

    block = DoubleConv
    fusion = GatedConcat
