"""Shared by the transforms: per-sample random draws from a ``torch.Generator`` (``(B,)`` tensors)
and the check of a batch's shapes."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from resunet.errors import InputError

# --------------------------------------------------------------------------------------------
# random helpers
# --------------------------------------------------------------------------------------------


def _uniform(
    generator: torch.Generator | None,
    shape: tuple[int, ...],
    low: float | torch.Tensor,
    high: float | torch.Tensor,
    device: torch.device,
) -> torch.Tensor:
    """Uniform float32 in [low, high), drawn with ``generator`` on its device, moved to
    ``device``."""
    gen_device = generator.device if generator is not None else device
    u = torch.rand(shape, generator=generator, device=gen_device, dtype=torch.float32).to(device)
    return low + (high - low) * u


def _randn(
    generator: torch.Generator | None, shape: tuple[int, ...], device: torch.device
) -> torch.Tensor:
    gen_device = generator.device if generator is not None else device
    noise = torch.randn(shape, generator=generator, device=gen_device, dtype=torch.float32)
    return noise.to(device)


def _coin(
    generator: torch.Generator | None, batch: int, p: float, device: torch.device
) -> torch.Tensor:
    """``(B,)`` bool: which samples get a transform applied with probability ``p``."""
    return _uniform(generator, (batch,), 0.0, 1.0, device) < p


def _as_batch_vector(
    value: float | Sequence[float] | torch.Tensor, batch: int, device
) -> torch.Tensor:
    t = torch.as_tensor(value, dtype=torch.float32, device=device)
    if t.ndim == 0:
        t = t.expand(batch)
    if t.shape != (batch,):
        raise InputError(
            f"expected a scalar or one value per sample ({batch}), got shape {tuple(t.shape)}"
        )
    return t


def _bc_view(v: torch.Tensor, ndim: int) -> torch.Tensor:
    """``(B,)`` -> ``(B, 1, 1, ...)`` broadcastable against a tensor with ``ndim`` dims."""
    return v.reshape(v.shape[0], *([1] * (ndim - 1)))


def _check_batch(
    image: torch.Tensor, mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None, bool]:
    if not isinstance(image, torch.Tensor):
        raise InputError(f"image must be a torch.Tensor, got {type(image).__name__}")
    if image.ndim not in (4, 5):
        raise InputError(
            f"image must be (B, C, H, W) or (B, C, D, H, W), got shape {tuple(image.shape)}"
        )
    if not image.is_floating_point():
        raise InputError(f"image must be floating point (e.g. float32), got {image.dtype}")
    squeeze = False
    if mask is not None:
        if not isinstance(mask, torch.Tensor):
            raise InputError(f"mask must be a torch.Tensor or None, got {type(mask).__name__}")
        if mask.ndim == image.ndim - 1:
            mask, squeeze = mask.unsqueeze(1), True
        if (
            mask.ndim != image.ndim
            or mask.shape[0] != image.shape[0]
            or mask.shape[2:] != image.shape[2:]
        ):
            raise InputError(
                f"mask shape {tuple(mask.shape)} does not fit image shape {tuple(image.shape)}: "
                "it must be (B, K, *spatial) or (B, *spatial) with the image's B and spatial size"
            )
        if mask.device != image.device:
            raise InputError(f"mask is on {mask.device} but image on {image.device}")
    return image, mask, squeeze
