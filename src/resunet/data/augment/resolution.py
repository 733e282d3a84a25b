"""Resolution degradations for augmentation: Gaussian blur and low-resolution simulation.

Both act on batches ``(B, C, H, W)`` / ``(B, C, D, H, W)`` with per-sample parameters (``(B,)``
tensors), on the batch's device, and are what a scan acquired with thicker slices or a blurrier
point-spread function looks like after it is resampled to the training spacing (the predictor
resamples every input to the plan's spacing first). Parameters are in PIXELS along the spatial
axes, in array order.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["gaussian_blur", "simulate_low_resolution"]


def _kernels(sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """``(N, 2 * radius + 1)`` normalised 1-D Gaussians for the ``(N,)`` sigmas (pixels)."""
    x = torch.arange(-radius, radius + 1, dtype=torch.float32, device=sigma.device)
    k = torch.exp(-0.5 * (x[None, :] / sigma.clamp_min(1e-3)[:, None]) ** 2)
    return k / k.sum(dim=1, keepdim=True)


def gaussian_blur(image: torch.Tensor, sigma: torch.Tensor, axes: tuple[int, ...] | None = None) -> torch.Tensor:
    """Blur each sample of ``image`` ``(B, C, *S)`` with its own Gaussian ``sigma`` ``(B,)`` or
    ``(B, n)`` (pixels; per spatial axis) along ``axes`` (spatial axis indices, default all).
    Separable, edge values replicated; a sigma of 0 leaves that axis unchanged."""
    b, c = image.shape[:2]
    n = image.ndim - 2
    sigma = sigma.to(device=image.device, dtype=torch.float32)
    sigma = sigma[:, None].expand(b, n) if sigma.ndim == 1 else sigma
    axes = tuple(range(n)) if axes is None else axes
    conv = F.conv2d if n == 2 else F.conv3d
    x = image.float().reshape(1, b * c, *image.shape[2:])
    for a in axes:
        s = sigma[:, a]
        if bool((s <= 0).all()):
            continue
        radius = max(1, int(math.ceil(3.0 * float(s.max()))))
        k = _kernels(s, radius)  # (B, K)
        k = torch.where((s > 0)[:, None], k, F.one_hot(torch.tensor(radius, device=k.device), 2 * radius + 1).float())
        weight = k.repeat_interleave(c, dim=0)  # (B*C, K)
        shape = [b * c, 1] + [1] * n
        shape[2 + a] = 2 * radius + 1
        pad = [0, 0] * n
        pad[2 * (n - 1 - a)] = pad[2 * (n - 1 - a) + 1] = radius  # F.pad lists the last axis first
        x = conv(F.pad(x, pad, mode="replicate"), weight.reshape(shape), groups=b * c)
    return x.reshape(image.shape).to(image.dtype)


def simulate_low_resolution(image: torch.Tensor, zoom: torch.Tensor) -> torch.Tensor:
    """Down-sample each sample by its ``zoom`` ``(B,)`` or ``(B, n)`` (in ``(0, 1]`` per spatial
    axis; 0.5 = half the pixels) with nearest neighbour, then back to the input size with
    (bi/tri)linear interpolation: the detail of a coarser acquisition on the input's grid.
    One small interpolation per sample (the sizes differ per sample)."""
    b = image.shape[0]
    n = image.ndim - 2
    zoom = zoom.to(torch.float32)
    zoom = zoom[:, None].expand(b, n) if zoom.ndim == 1 else zoom
    size = image.shape[2:]
    mode = "bilinear" if n == 2 else "trilinear"
    out = image.clone()
    for i in range(b):
        small = [max(1, int(round(s * float(z)))) for s, z in zip(size, zoom[i])]
        if list(small) == list(size):
            continue
        low = F.interpolate(image[i : i + 1].float(), size=small, mode="nearest")
        out[i] = F.interpolate(low, size=size, mode=mode, align_corners=False)[0].to(image.dtype)
    return out
