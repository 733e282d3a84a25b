"""Model size and cost: parameter count and multiply-accumulates (MACs) of one forward pass."""

from __future__ import annotations

import math

import torch
from torch import nn

_CONVS = (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def _module_macs(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> int:
    if isinstance(module, (nn.ConvTranspose2d, nn.ConvTranspose3d)):
        return inputs[0].numel() * module.out_channels * math.prod(module.kernel_size) // module.groups
    if isinstance(module, _CONVS):
        return output.numel() * (module.in_channels // module.groups) * math.prod(module.kernel_size)
    if isinstance(module, nn.Linear):
        return output.numel() * module.in_features
    return int(module.matmul_macs(*inputs))


def count_macs(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """MACs of one forward pass of an input of shape ``(B, C, *S)``.

    Counted: convolutions (incl. transposed), linear layers (the Transformer's projections and
    MLPs), and the products of modules that report them with a ``matmul_macs(*inputs)`` method
    (self-attention: ``Q K^T`` and ``weights V``, ``2 * B * N**2 * E`` for ``N`` tokens of width ``E``).
    Ignored: normalisation, activations, softmax, pooling, position codes and the attention's
    elementwise products (together well under 1 % of the total for these networks).
    """
    total = 0

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        nonlocal total
        total += _module_macs(module, inputs, output)

    counted = [m for m in model.modules() if isinstance(m, (*_CONVS, nn.Linear)) or hasattr(m, "matmul_macs")]
    handles = [m.register_forward_hook(hook) for m in counted]
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
