"""Building blocks shared by every network, for 2-D and 3-D from one code path.

Tensors are ``(B, C, H, W)`` when ``spatial_dims == 2`` and ``(B, C, D, H, W)`` when 3.
"""

from __future__ import annotations

import torch
from torch import nn

from resunet.errors import ModelError


def _check_dims(spatial_dims: int) -> int:
    if spatial_dims not in (2, 3):
        raise ModelError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
    return spatial_dims


def conv(spatial_dims: int, in_ch: int, out_ch: int, kernel_size: int, bias: bool = False) -> nn.Module:
    """Same-padding convolution (odd kernel)."""
    cls = nn.Conv2d if _check_dims(spatial_dims) == 2 else nn.Conv3d
    return cls(in_ch, out_ch, kernel_size, padding=kernel_size // 2, bias=bias)


def batch_norm(spatial_dims: int, channels: int) -> nn.Module:
    return (nn.BatchNorm2d if _check_dims(spatial_dims) == 2 else nn.BatchNorm3d)(channels)


def max_pool(spatial_dims: int) -> nn.Module:
    return (nn.MaxPool2d if _check_dims(spatial_dims) == 2 else nn.MaxPool3d)(2)


def up_conv(spatial_dims: int, in_ch: int, out_ch: int) -> nn.Module:
    """Transposed convolution, kernel 2 stride 2: doubles every spatial size."""
    cls = nn.ConvTranspose2d if _check_dims(spatial_dims) == 2 else nn.ConvTranspose3d
    return cls(in_ch, out_ch, kernel_size=2, stride=2)


class DoubleConv(nn.Module):
    """(conv3x3 - BN - ReLU) x 2: the plain U-Net block."""

    def __init__(self, spatial_dims: int, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            conv(spatial_dims, in_ch, out_ch, 3),
            batch_norm(spatial_dims, out_ch),
            nn.ReLU(inplace=True),
            conv(spatial_dims, out_ch, out_ch, 3),
            batch_norm(spatial_dims, out_ch),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class ResidualBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus a shortcut, ReLU after the sum.

    The shortcut is the identity when ``in_ch == out_ch`` and a 1x1 conv + BN otherwise.
    """

    def __init__(self, spatial_dims: int, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            conv(spatial_dims, in_ch, out_ch, 3),
            batch_norm(spatial_dims, out_ch),
            nn.ReLU(inplace=True),
            conv(spatial_dims, out_ch, out_ch, 3),
            batch_norm(spatial_dims, out_ch),
        )
        if in_ch == out_ch:
            self.shortcut: nn.Module = nn.Identity()
        else:
            self.shortcut = nn.Sequential(
                conv(spatial_dims, in_ch, out_ch, 1), batch_norm(spatial_dims, out_ch)
            )
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.body(x) + self.shortcut(x))


class SpatialAttention(nn.Module):
    """Spatial attention (CBAM-style): channel mean and max -> 7x7 conv -> sigmoid -> x * map.

    Input and output ``(B, C, *spatial)``; the attention map is ``(B, 1, *spatial)``.
    """

    def __init__(self, spatial_dims: int, kernel_size: int = 7) -> None:
        super().__init__()
        self.conv = conv(spatial_dims, 2, 1, kernel_size, bias=True)

    def attention_map(self, x: torch.Tensor) -> torch.Tensor:
        pooled = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        return torch.sigmoid(self.conv(pooled))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.attention_map(x)


class AdditiveAttentionGate(nn.Module):
    """Additive attention gate of Attention U-Net (Oktay et al., 2018).

    ``skip`` (B, Cs, *S) is weighted by ``sigmoid(psi(relu(Wx skip + Wg gate)))`` where ``gate``
    (B, Cg, *S) is the up-sampled decoder feature at the same resolution.
    """

    def __init__(self, spatial_dims: int, skip_ch: int, gate_ch: int, inter_ch: int) -> None:
        super().__init__()
        self.w_x = nn.Sequential(conv(spatial_dims, skip_ch, inter_ch, 1), batch_norm(spatial_dims, inter_ch))
        self.w_g = nn.Sequential(conv(spatial_dims, gate_ch, inter_ch, 1), batch_norm(spatial_dims, inter_ch))
        self.psi = nn.Sequential(
            conv(spatial_dims, inter_ch, 1, 1), batch_norm(spatial_dims, 1), nn.Sigmoid()
        )
        self.act = nn.ReLU(inplace=True)

    def forward(self, skip: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        return skip * self.psi(self.act(self.w_x(skip) + self.w_g(gate)))
