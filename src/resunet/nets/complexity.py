"""Model size and cost: parameter count and multiply-accumulates (MACs) of one forward pass."""

from __future__ import annotations

import math

import torch
from torch import nn


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def count_macs(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """MACs of convolutions (incl. transposed) for one input of shape ``(B, C, *S)``.

    Normalisation, activations, pooling and the attention's elementwise products are ignored
    (together well under 1 % of the total for these networks).
    """
    total = 0

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        nonlocal total
        k = math.prod(module.kernel_size)
        if isinstance(module, (nn.ConvTranspose2d, nn.ConvTranspose3d)):
            total += inputs[0].numel() * module.out_channels * k // module.groups
        else:
            total += output.numel() * (module.in_channels // module.groups) * k

    kinds = (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)
    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, kinds)]
    try:
        was_training = model.training
        model.eval()
        with torch.no_grad():
            model(torch.zeros(input_shape))
        model.train(was_training)
    finally:
        for h in handles:
            h.remove()
    return total
