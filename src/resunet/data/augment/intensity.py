"""Intensity transforms (image only): brightness, contrast, gamma, MR bias field, Gaussian and
Rician noise; blur and low-resolution simulation live in `resunet.data.augment.resolution`."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from resunet.data.augment._common import _as_batch_vector, _bc_view, _randn, _uniform
from resunet.errors import InputError

# --------------------------------------------------------------------------------------------
# intensity transforms (image only)
# --------------------------------------------------------------------------------------------


def _spatial_dims(x: torch.Tensor) -> tuple[int, ...]:
    return tuple(range(2, x.ndim))


def adjust_brightness(image: torch.Tensor, factor: torch.Tensor | float) -> torch.Tensor:
    """Multiply sample ``b`` by ``factor[b]``. ``image`` ``(B, C, *S)``; ``factor`` ``(B,)``."""
    f = _as_batch_vector(factor, image.shape[0], image.device).to(image.dtype)
    return image * _bc_view(f, image.ndim)


def adjust_contrast(
    image: torch.Tensor, factor: torch.Tensor | float, *, preserve_range: bool = True
) -> torch.Tensor:
    """``mean + (x - mean) * factor[b]`` with the mean per sample and channel; with
    ``preserve_range`` clipped to each sample's and channel's original ``[min, max]``.
    ``image`` ``(B, C, *S)``; ``factor`` ``(B,)``, dimensionless."""
    dims = _spatial_dims(image)
    f = _bc_view(_as_batch_vector(factor, image.shape[0], image.device).to(image.dtype), image.ndim)
    mean = image.mean(dim=dims, keepdim=True)
    out = (image - mean) * f + mean
    if preserve_range:
        lo, hi = image.amin(dim=dims, keepdim=True), image.amax(dim=dims, keepdim=True)
        out = torch.maximum(torch.minimum(out, hi), lo)
    return out


def adjust_gamma(
    image: torch.Tensor,
    gamma: torch.Tensor | float,
    *,
    retain_stats: bool = False,
    eps: float = 1e-7,
) -> torch.Tensor:
    """nnU-Net gamma: rescale each sample and channel to [0, 1] by its min/max, raise to
    ``gamma[b]``, map back to ``[min, max]`` (so the range is kept); samples with ``gamma == 1``
    are returned unchanged (exactly). ``retain_stats`` then restores each sample's and channel's
    mean and std. ``image`` ``(B, C, *S)``; ``gamma`` ``(B,)`` > 0."""
    dims = _spatial_dims(image)
    g = _as_batch_vector(gamma, image.shape[0], image.device)
    gb = _bc_view(g.to(image.dtype), image.ndim)
    mn = image.amin(dim=dims, keepdim=True)
    mx = image.amax(dim=dims, keepdim=True)
    rng = mx - mn
    out = image - mn
    # x**g as exp(g * log(x)): twice as fast as pow with a per-sample exponent; 0 -> 0, 1 -> 1
    out.div_(rng.clamp_min(eps)).clamp_(0.0, 1.0).log_().mul_(gb).exp_().mul_(rng).add_(mn)
    torch.clamp(out, min=mn, max=mx, out=out)
    if retain_stats:
        mean, std = image.mean(dim=dims, keepdim=True), image.std(dim=dims, keepdim=True)
        o_mean, o_std = out.mean(dim=dims, keepdim=True), out.std(dim=dims, keepdim=True)
        out = (out - o_mean) / o_std.clamp_min(eps) * std + mean
    unchanged = g == 1
    if bool(unchanged.any()):
        out = torch.where(_bc_view(unchanged, image.ndim), image, out)
    return out


def _legendre(order: int, x: torch.Tensor) -> torch.Tensor:
    """``(order+1, N)``: Legendre polynomials ``P_0..P_order`` at ``x`` (in [-1, 1])."""
    ps = [torch.ones_like(x), x]
    for k in range(1, order):
        ps.append(((2 * k + 1) * x * ps[k] - k * ps[k - 1]) / (k + 1))
    return torch.stack(ps[: order + 1])


def bias_field(
    spatial_shape: Sequence[int],
    amplitude: torch.Tensor | Sequence[float],
    *,
    order: int = 3,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Smooth multiplicative bias fields, one per sample.

    ``log(field)`` is a random combination (coefficients uniform in [-1, 1]) of products of
    Legendre polynomials of total degree 1..``order`` over the image (each axis spanning
    [-1, 1]), scaled so ``max |log(field)| = log(1 + amplitude[b])``: the field lies in
    ``[1/(1+a), 1+a]`` (``a = 0.2``: about +-20 %). Evaluated separably (a few small matmuls).

    Args:
        spatial_shape: ``(H, W)`` or ``(D, H, W)``.
        amplitude: ``(B,)`` fractional amplitude ``a`` >= 0.

    Returns:
        ``(B, 1, *spatial_shape)`` float32 field to multiply the image with.
    """
    shape = tuple(int(s) for s in spatial_shape)
    n = len(shape)
    if n not in (2, 3):
        raise InputError(f"spatial_shape must have 2 or 3 axes, got {shape}")
    amp = torch.as_tensor(amplitude, dtype=torch.float32)
    dev = torch.device(device) if device is not None else amp.device
    amp = amp.to(dev).reshape(-1)
    b = amp.shape[0]
    o = int(order)
    coef = _uniform(generator, (b, *([o + 1] * n)), -1.0, 1.0, dev)
    idx = torch.meshgrid(*[torch.arange(o + 1, device=dev)] * n, indexing="ij")
    total = sum(idx)
    keep = (total >= 1) & (total <= o)
    coef = coef * keep.to(coef.dtype)
    polys = [_legendre(o, torch.linspace(-1.0, 1.0, s, device=dev)) for s in shape]
    if n == 2:
        log_f = torch.einsum("bij,iy,jx->byx", coef, polys[0], polys[1])
    else:
        log_f = torch.einsum("bijk,iz,jy,kx->bzyx", coef, polys[0], polys[1], polys[2])
    peak = log_f.abs().flatten(1).amax(1).clamp_min(1e-12)
    log_f = log_f * _bc_view(torch.log1p(amp) / peak, log_f.ndim)
    return torch.exp(log_f).unsqueeze(1)


def _noise_scale(
    image: torch.Tensor, sigma: torch.Tensor | float, relative: bool
) -> torch.Tensor:
    s = _bc_view(_as_batch_vector(sigma, image.shape[0], image.device).to(image.dtype), image.ndim)
    if relative:
        s = s * image.std(dim=_spatial_dims(image), keepdim=True)
    return s


def add_gaussian_noise(
    image: torch.Tensor,
    sigma: torch.Tensor | float,
    *,
    relative: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``image + N(0, s^2)`` with ``s = sigma[b]`` (times each sample's and channel's intensity
    std when ``relative``, else in intensity units). ``image`` ``(B, C, *S)``; ``sigma``
    ``(B,)``."""
    s = _noise_scale(image, sigma, relative)
    return image + _randn(generator, tuple(image.shape), image.device).to(image.dtype) * s


def add_rician_noise(
    image: torch.Tensor,
    sigma: torch.Tensor | float,
    *,
    relative: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Rician noise ``sqrt((x + n1)^2 + n2^2)``, ``n1, n2 ~ N(0, s^2)``, ``s`` as in
    :func:`add_gaussian_noise`. For magnitude (non-negative) images; the output is >= 0."""
    s = _noise_scale(image, sigma, relative)
    shape = tuple(image.shape)
    n1 = _randn(generator, shape, image.device).to(image.dtype) * s
    n2 = _randn(generator, shape, image.device).to(image.dtype) * s
    return torch.sqrt((image + n1) ** 2 + n2**2)
