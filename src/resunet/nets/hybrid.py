"""ResUNet with a Transformer stage at the bottleneck: a Transformer-CNN hybrid (TransUNet-like).

The ResUNet encoder and decoder are unchanged (residual blocks, concat + spatial attention skips,
same parameter names, so the CNN weights of a ``resunet`` checkpoint load into it with
``init_from``). Between the deepest encoder level and the first up-sampling, every spatial
position of the bottleneck ``(B, C, *G)`` becomes one token of a sequence ``(B, N, C)``,
``N = prod(G)``; the tokens get a position code and pass through pre-norm Transformer blocks
(``x + MHSA(LN(x))``, then ``x + MLP(LN(x))``), a final LayerNorm, and are folded back to
``(B, C, *G)``. Optionally the tokens are projected to a smaller width ``transformer_dim`` and back.

Position code: fixed sinusoids of each token's grid index, computed in ``forward`` from the
bottleneck grid size (2-D: half the channels code the row, half the column; 3-D: thirds). Chosen
over a learned table because it has no size of its own: any input whose sizes are multiples of
the divisor gets a code, a grid position has the same code at every input size (a sliding window
sees what training saw), and it exports to ONNX / TorchScript as ``arange`` / ``sin`` / ``cos``
on the dynamic shape -- no interpolated table whose resize would have to match across runtimes.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from resunet.errors import ModelError
from resunet.nets.resunet import ResUNet

#: hidden width of each Transformer block's MLP, as a multiple of the token width
MLP_RATIO = 4
#: the sinusoids' longest wavelength scale (as in "Attention is all you need")
POSITION_BASE = 10000.0


def sinusoidal_positions(grid: tuple[int, ...] | torch.Size, width: int, *, device: torch.device | None = None,
                         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Position codes ``(N, width)`` of a grid ``(H, W)`` or ``(D, H, W)``, ``N = prod(grid)``.

    Tokens are in row-major order (``x.flatten(2)``). Each axis gets ``F = width // (2 * len(grid))``
    frequencies ``POSITION_BASE ** (-k / F)``, ``k = 0..F-1``, and contributes ``sin`` then ``cos``
    of ``index * frequency``; channels left over (``width`` not a multiple of ``2 * len(grid)``) are 0.
    """
    dims = len(grid)
    per_axis = width // (2 * dims)
    if per_axis < 1:
        raise ModelError(f"a {dims}-D position code needs a token width of at least {2 * dims}, got {width}")
    freqs = POSITION_BASE ** (-torch.arange(per_axis, device=device, dtype=torch.float32) / per_axis)
    codes = []
    for axis, size in enumerate(grid):
        shape = [1] * dims
        shape[axis] = -1
        index = torch.arange(size, device=device, dtype=torch.float32).reshape(shape).expand(*grid).reshape(-1, 1)
        angles = index * freqs
        codes += [torch.sin(angles), torch.cos(angles)]
    out = torch.cat(codes, dim=1)
    return nn.functional.pad(out, (0, width - 2 * dims * per_axis)).to(dtype)


class SelfAttention(nn.Module):
    """Multi-head self-attention on tokens ``(B, N, E)`` -> ``(B, N, E)`` (no mask, no dropout)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        b, width = tokens.shape[0], self.out.in_features
        head = width // self.heads
        q, k, v = self.qkv(tokens).reshape(b, -1, 3, self.heads, head).permute(2, 0, 3, 1, 4).unbind(0)
        weights = torch.softmax((q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(head)), dim=-1)
        return self.out((weights @ v).transpose(1, 2).reshape(b, -1, width))

    @staticmethod
    def matmul_macs(tokens: torch.Tensor) -> int:
        """MACs of the two attention products (``Q K^T`` and ``weights V``) for ``tokens`` (B, N, E);
        the linear layers are counted on their own (`resunet.nets.complexity.count_macs`)."""
        b, n, e = tokens.shape
        return 2 * b * n * n * e


class TransformerBlock(nn.Module):
    """Pre-norm block: ``x + attention(LN(x))``, then ``x + MLP(LN(x))`` (GELU); ``(B, N, E)``."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attention = SelfAttention(width, heads)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, MLP_RATIO * width), nn.GELU(), nn.Linear(MLP_RATIO * width, width))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        tokens = tokens + self.attention(self.norm1(tokens))
        return tokens + self.mlp(self.norm2(tokens))


class TransformerBottleneck(nn.Module):
    """Feature map ``(B, C, *G)`` -> tokens ``(B, N, E)`` + position code -> blocks -> LN ->
    ``(B, C, *G)``. ``E = dim`` (a linear projection in and out) or ``C`` when ``dim`` is None."""

    def __init__(self, channels: int, layers: int, heads: int, dim: int | None = None) -> None:
        super().__init__()
        width = channels if dim is None else dim
        if layers < 1:
            raise ModelError(f"transformer_layers must be at least 1, got {layers}")
        if width < 1:
            raise ModelError(f"transformer_dim must be positive (or None: the bottleneck width), got {dim}")
        if heads < 1 or width % heads:
            divisors = [h for h in range(1, min(width, 64) + 1) if width % h == 0]
            raise ModelError(
                f"transformer_heads={heads} does not divide the token width {width} "
                f"({'transformer_dim' if dim is not None else 'the bottleneck width, base_channels * 2**(depth-1)'}); "
                f"choose heads among {divisors} or another transformer_dim"
            )
        self.width = width
        self.project_in: nn.Module = nn.Identity() if dim is None else nn.Linear(channels, width)
        self.blocks = nn.Sequential(*[TransformerBlock(width, heads) for _ in range(layers)])
        self.norm = nn.LayerNorm(width)
        self.project_out: nn.Module = nn.Identity() if dim is None else nn.Linear(width, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        grid = x.shape[2:]
        tokens = self.project_in(x.flatten(2).transpose(1, 2))
        tokens = tokens + sinusoidal_positions(grid, self.width, device=x.device, dtype=tokens.dtype)
        tokens = self.project_out(self.norm(self.blocks(tokens)))
        return tokens.transpose(1, 2).reshape(b, c, *grid)


class ResUNetTransformer(ResUNet):
    """ResUNet + Transformer bottleneck. Input ``(B, C_in, *S)`` -> logits ``(B, C_out, *S)``.

    ``transformer_layers`` blocks of ``transformer_heads`` heads; ``transformer_heads`` must divide
    the token width (``transformer_dim``, or the bottleneck width ``base_channels * 2**(depth-1)``
    when it is None). Spatial sizes must be multiples of `divisor`, as for the other networks.
    """

    #: the keyword arguments beyond the shared five (`resunet.nets.build_model`, `model_config`)
    options = ("transformer_layers", "transformer_heads", "transformer_dim")

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        out_channels: int = 1,
        base_channels: int = 64,
        depth: int = 5,
        transformer_layers: int = 2,
        transformer_heads: int = 4,
        transformer_dim: int | None = None,
    ) -> None:
        super().__init__(spatial_dims, in_channels, out_channels, base_channels, depth)
        self.transformer_layers = transformer_layers
        self.transformer_heads = transformer_heads
        self.transformer_dim = transformer_dim
        width = base_channels * 2 ** (depth - 1)
        self.transformer = TransformerBottleneck(width, transformer_layers, transformer_heads, transformer_dim)
        if self.transformer.width < 2 * spatial_dims:
            raise ModelError(f"the token width {self.transformer.width} is below {2 * spatial_dims}, the least a "
                             f"{spatial_dims}-D position code needs; raise base_channels or transformer_dim")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # EncoderDecoder.forward with the Transformer applied to the bottleneck (the deepest level)
        self.check_input(x)
        skips = []
        for i, enc in enumerate(self.encoders):
            x = enc(x if i == 0 else self.pool(x))
            skips.append(x)
        x = self.transformer(skips.pop())
        for i in reversed(range(self.depth - 1)):
            x = self.decoders[i](self.fusions[i](skips[i], self.ups[i](x)))
        return self.head(x)
