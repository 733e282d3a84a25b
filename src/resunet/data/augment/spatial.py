"""Spatial transforms (image and mask together): affine sampling matrices, elastic displacement,
one fused ``grid_sample`` resampling; pixel-unit conventions in `resunet.data.augment`."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F

from resunet.data.augment._common import (
    _as_batch_vector,
    _bc_view,
    _check_batch,
    _coin,
    _randn,
    _uniform,
)
from resunet.errors import ConfigError, InputError

_ALIGN_CORNERS = True

# --------------------------------------------------------------------------------------------
# affine matrices
# --------------------------------------------------------------------------------------------


def _plane_rotation(n: int, i: int, j: int, angle_rad: torch.Tensor) -> torch.Tensor:
    """``(B, n, n)`` rotation in the plane of array axes ``i < j``: ``R[i,i]=R[j,j]=cos``,
    ``R[i,j]=-sin``, ``R[j,i]=sin``. An angle of exactly 0 gives exactly the identity."""
    b = angle_rad.shape[0]
    r = torch.eye(n, dtype=torch.float32, device=angle_rad.device).repeat(b, 1, 1)
    c, s = torch.cos(angle_rad), torch.sin(angle_rad)
    r[:, i, i] = c
    r[:, j, j] = c
    r[:, i, j] = -s
    r[:, j, i] = s
    return r


def make_affine_matrices(
    angles_deg: torch.Tensor,
    zoom: torch.Tensor,
    flips: torch.Tensor,
    *,
    spacing: Sequence[float] | None = None,
) -> torch.Tensor:
    """Compose per-sample sampling matrices from rotation angles, zoom factors and flips.

    Args:
        angles_deg: ``(B,)`` (2-D: rotation in the ``(H, W)`` plane) or ``(B, 3)`` (3-D: angles
            AROUND the array axes ``D``, ``H``, ``W``), degrees.
        zoom: ``(B,)`` isotropic zoom factors (> 1 enlarges structures), or ``(B, n)`` one
            factor per spatial axis (anisotropic scaling).
        flips: ``(B, n)`` bool, ``True`` mirrors that spatial axis (array order). ``n`` (2 or 3)
            is taken from this shape.
        spacing: optional voxel spacing in array order (e.g. mm); if given, the rotation is a
            rotation in physical space instead of pixel space.

    Returns:
        ``(B, n, n+1)`` float32 pull-back matrices in centred pixel units (translation 0):
        ``A = R(angles) @ diag(sign) / zoom`` with ``R = R_D @ R_H @ R_W`` in 3-D and
        ``R = [[cos, -sin], [sin, cos]]`` in ``(H, W)`` coordinates in 2-D; output pixel ``p``
        takes the input value at ``A @ p``. The flip acts first, so a sample with only flips is
        the exact diagonal sign matrix.
    """
    flips = torch.as_tensor(flips, dtype=torch.bool)
    if flips.ndim != 2 or flips.shape[1] not in (2, 3):
        raise InputError(f"flips must have shape (B, 2) or (B, 3), got {tuple(flips.shape)}")
    b, n = flips.shape
    device = flips.device
    angles = torch.as_tensor(angles_deg, dtype=torch.float32, device=device)
    rad = torch.deg2rad(angles)
    if n == 2:
        rad = rad.reshape(b)
        rot = _plane_rotation(2, 0, 1, rad)
    else:
        rad = rad.reshape(b, 3)
        # around D: plane (H, W); around H: plane (D, W); around W: plane (D, H)
        rot = _plane_rotation(3, 1, 2, rad[:, 0])
        rot = rot @ _plane_rotation(3, 0, 2, rad[:, 1])
        rot = rot @ _plane_rotation(3, 0, 1, rad[:, 2])
    if spacing is not None:
        sp = torch.as_tensor([float(s) for s in spacing], dtype=torch.float32, device=device)
        if sp.shape != (n,) or bool((sp <= 0).any()):
            raise InputError(
                f"spacing {tuple(spacing)} must be {n} positive numbers in array order"
            )
        # pixel matrix = D^-1 R D with D = diag(spacing); the diagonal stays exact (s/s == 1)
        rot = rot * (sp[None, None, :] / sp[None, :, None])
    sign = torch.where(flips, -1.0, 1.0).to(torch.float32)
    zt = torch.as_tensor(zoom, dtype=torch.float32, device=device)
    if zt.ndim == 2:
        lin = rot * (sign / zt)[:, None, :]
    else:
        z = _as_batch_vector(zoom, b, device)
        lin = rot * sign[:, None, :] / z[:, None, None]
    return torch.cat([lin, torch.zeros(b, n, 1, dtype=torch.float32, device=device)], dim=2)


def random_affine_matrices(
    batch_size: int,
    spatial_ndim: int,
    *,
    rotation_deg: tuple[float, float] | Sequence[tuple[float, float]] = (-15.0, 15.0),
    rotation_p: float = 0.2,
    zoom: tuple[float, float] = (0.85, 1.25),
    zoom_p: float = 0.2,
    zoom_per_axis: bool = False,
    flip_axes: Sequence[int] | None = None,
    flip_p: float = 0.5,
    spacing: Sequence[float] | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Draw per-sample sampling matrices (see :func:`make_affine_matrices`).

    Each sample is rotated with probability ``rotation_p`` by angles uniform in
    ``rotation_deg`` (degrees; in 3-D either one range for all three axes or three ranges for
    the rotations around ``D``, ``H``, ``W``), zoomed with probability ``zoom_p`` by a factor
    uniform in ``zoom``, and each axis in ``flip_axes`` (default: all) flipped with probability
    ``flip_p``. Samples not selected get angle 0, zoom 1, no flip, so an unselected sample's
    matrix is exactly the identity. Returns ``(B, n, n+1)`` float32 on ``device``.
    """
    if spatial_ndim not in (2, 3):
        raise InputError(f"spatial_ndim must be 2 or 3, got {spatial_ndim}")
    dev = torch.device(device) if device is not None else (
        generator.device if generator is not None else torch.device("cpu")
    )
    b, n = int(batch_size), spatial_ndim
    n_angles = 1 if n == 2 else 3
    ranges = _angle_ranges(rotation_deg, n)

    rot_sel = _coin(generator, b, rotation_p, dev)
    lo = torch.tensor([r[0] for r in ranges], dtype=torch.float32, device=dev)
    hi = torch.tensor([r[1] for r in ranges], dtype=torch.float32, device=dev)
    angles = _uniform(generator, (b, n_angles), lo, hi, dev)
    angles = torch.where(rot_sel[:, None], angles, torch.zeros_like(angles))

    zoom_sel = _coin(generator, b, zoom_p, dev)
    z = _uniform(generator, (b, n) if zoom_per_axis else (b,), zoom[0], zoom[1], dev)
    z = torch.where(zoom_sel[:, None] if zoom_per_axis else zoom_sel, z, torch.ones_like(z))

    axes = range(n) if flip_axes is None else flip_axes
    allowed = torch.zeros(n, dtype=torch.bool, device=dev)
    for a in axes:
        if not 0 <= int(a) < n:
            raise ConfigError(f"flip axis {a} does not exist for {n}-D images (use 0..{n - 1})")
        allowed[int(a)] = True
    flips = (_uniform(generator, (b, n), 0.0, 1.0, dev) < flip_p) & allowed[None, :]

    angles = angles[:, 0] if n == 2 else angles
    return make_affine_matrices(angles, z, flips, spacing=spacing)


def _angle_ranges(rotation_deg: Any, n: int) -> list[tuple[float, float]]:
    rd = list(rotation_deg)
    if len(rd) == 2 and all(isinstance(v, (int, float)) for v in rd):
        return [(float(rd[0]), float(rd[1]))] * (1 if n == 2 else 3)
    if n == 3 and len(rd) == 3:
        return [(float(r[0]), float(r[1])) for r in rd]
    raise ConfigError(
        f"rotation range {rotation_deg!r}: give (low, high) in degrees, or in 3-D three such ranges"
    )


# --------------------------------------------------------------------------------------------
# elastic displacement
# --------------------------------------------------------------------------------------------


def _gaussian_kernels(sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """``(B, 2r+1)`` normalised Gaussian kernels, one per sigma (all with the same radius)."""
    x = torch.arange(-radius, radius + 1, dtype=torch.float32, device=sigma.device)
    k = torch.exp(-0.5 * (x[None, :] / sigma[:, None]) ** 2)
    return k / k.sum(dim=1, keepdim=True)


def _conv_axis_valid(field: torch.Tensor, kernels: torch.Tensor, axis: int) -> torch.Tensor:
    """Convolve ``field`` ``(B, n, *S)`` along dim ``axis`` (``2..``) with one kernel per sample
    (``kernels`` ``(B, K)``), 'valid' (the axis shrinks by ``K - 1``): a grouped ``conv1d`` on
    the field's device."""
    b, n = field.shape[:2]
    k = kernels.shape[1]
    moved = field.movedim(axis, -1)
    mid_shape = moved.shape[2:-1]
    length = moved.shape[-1]
    x = moved.reshape(b * n, -1, length).transpose(0, 1)  # (M, B*n, L)
    w = kernels.repeat_interleave(n, dim=0).unsqueeze(1)  # (B*n, 1, K)
    y = F.conv1d(x, w, groups=b * n)  # (M, B*n, L-K+1)
    y = y.transpose(0, 1).reshape(b, n, *mid_shape, length - k + 1)
    return y.movedim(-1, axis)


def _coarse_displacement(
    shape: tuple[int, ...],
    alpha: torch.Tensor,
    sigma: torch.Tensor,
    coarse: bool,
    generator: torch.Generator | None,
    device: torch.device,
) -> torch.Tensor:
    """The displacement of :func:`elastic_displacement` before upsampling: ``(B, n, *C)``
    pixels, on a grid ``C`` whose corners coincide with the image's corner pixels (upsample with
    ``align_corners=True`` to get the full-resolution field)."""
    n, b = len(shape), alpha.shape[0]
    step = max(1.0, math.floor(float(sigma.min()) / 2.0)) if coarse else 1.0
    coarse_shape, steps = [], []
    for size in shape:
        m = 1 if size <= 1 else int(math.ceil((size - 1) / step)) + 1
        coarse_shape.append(m)
        steps.append((size - 1) / (m - 1) if m > 1 else 1.0)
    radii, kernels = [], []
    for k in range(n):
        sig_c = sigma / steps[k]
        r = max(1, int(math.ceil(3.0 * float(sig_c.max()))))
        radii.append(r)
        kernels.append(_gaussian_kernels(sig_c, r))
    # noise padded by the kernel radius, smoothed 'valid': no border effects, stationary field
    field = _randn(generator, (b, n, *[m + 2 * r for m, r in zip(coarse_shape, radii)]), device)
    var = torch.ones(b, dtype=torch.float32, device=device)
    for k in range(n):
        field = _conv_axis_valid(field, kernels[k], k + 2)
        var = var * (kernels[k] ** 2).sum(dim=1)  # variance of smoothed unit white noise
    return field * _bc_view(alpha / var.sqrt(), field.ndim)


def _linear_upsample_matrix(m: int, size: int, device) -> torch.Tensor:
    """``(size, m)`` matrix of 1-D linear interpolation from ``m`` to ``size`` samples with
    the end points aligned (``align_corners=True``); two non-zeros per row."""
    if m == 1:
        return torch.ones(size, 1, dtype=torch.float32, device=device)
    pos = torch.linspace(0.0, m - 1.0, size, dtype=torch.float32, device=device)
    i0 = pos.floor().clamp(max=m - 2).long()
    w = pos - i0
    mat = torch.zeros(size, m, dtype=torch.float32, device=device)
    rows = torch.arange(size, device=device)
    mat[rows, i0] = 1.0 - w
    mat[rows, i0 + 1] = w
    return mat


def _upsample(field: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Bi/trilinear upsampling (``align_corners=True``) of ``(B, c, *C)`` to ``(B, c, *shape)``.
    2-D: ``F.interpolate``. 3-D: separably, one small matmul per axis (the same values up to
    rounding, about 5x faster than trilinear ``F.interpolate`` on CPU)."""
    shape = tuple(int(s) for s in shape)
    cshape = tuple(field.shape[2:])
    if cshape == shape:
        return field
    if len(shape) == 2:
        return F.interpolate(field, size=shape, mode="bilinear", align_corners=_ALIGN_CORNERS)
    dev = field.device
    b, c = field.shape[:2]
    n = len(shape)
    x = field @ _linear_upsample_matrix(cshape[-1], shape[-1], dev).T  # last axis
    if n == 3:
        x = torch.matmul(_linear_upsample_matrix(cshape[1], shape[1], dev), x)  # (..., m1, N2)
    # first spatial axis: flatten the others so it is one batched matmul
    up0 = _linear_upsample_matrix(cshape[0], shape[0], dev)
    x = torch.matmul(up0, x.reshape(b, c, cshape[0], -1))
    return x.reshape(b, c, *shape)


def elastic_displacement(
    spatial_shape: Sequence[int],
    alpha: torch.Tensor | Sequence[float],
    sigma: torch.Tensor | Sequence[float],
    *,
    coarse: bool = True,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Random smooth displacement fields, one per sample.

    White Gaussian noise smoothed by a Gaussian of width ``sigma`` (separable grouped
    ``conv1d`` on the device, on a noise field padded by the kernel radius so there are no
    border effects), normalised to unit variance and scaled by ``alpha``. With ``coarse`` the
    noise lives on a grid of spacing about ``min(sigma)/2`` pixels and is upsampled
    (bi/trilinear): much cheaper and, as the field is smooth on that scale, statistically the
    same field.

    Args:
        spatial_shape: ``(H, W)`` or ``(D, H, W)``.
        alpha: ``(B,)`` standard deviation of each displacement component, pixels.
        sigma: ``(B,)`` smoothing width (correlation length), pixels, > 0.
        device: where to build the field (default: ``alpha``'s device).

    Returns:
        ``(B, n, *spatial_shape)`` float32 displacement in pixels; channel ``k`` displaces along
        spatial axis ``k`` (array order). It is added to the input coordinates a sampling matrix
        gives (see :func:`apply_spatial`).
    """
    shape = tuple(int(s) for s in spatial_shape)
    if len(shape) not in (2, 3):
        raise InputError(f"spatial_shape must have 2 or 3 axes, got {shape}")
    a = torch.as_tensor(alpha, dtype=torch.float32)
    dev = torch.device(device) if device is not None else a.device
    a = a.to(dev).reshape(-1)
    b = a.shape[0]
    sig = _as_batch_vector(torch.as_tensor(sigma, dtype=torch.float32).to(dev), b, dev)
    if bool((sig <= 0).any()):
        raise InputError("elastic sigma must be > 0 pixels")
    if b == 0:
        return torch.zeros(0, len(shape), *shape, dtype=torch.float32, device=dev)
    field = _coarse_displacement(shape, a, sig, coarse, generator, dev)
    return _upsample(field, shape).contiguous()


# --------------------------------------------------------------------------------------------
# spatial resampling
# --------------------------------------------------------------------------------------------


def _half_extent(shape: Sequence[int], device) -> torch.Tensor:
    """Pixels per normalised unit along each axis (``align_corners=True``): ``(N-1)/2``."""
    return torch.tensor(
        [(s - 1) / 2.0 if s > 1 else 1.0 for s in shape], dtype=torch.float32, device=device
    )


def _normalised_theta(matrices: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Pixel-unit pull-back matrices (array order) -> ``affine_grid`` thetas ``(b, n, n+1)``
    (normalised coordinates, ``x, y[, z]`` order, ``align_corners=True``)."""
    n = len(shape)
    half = _half_extent(shape, matrices.device)
    lin = matrices[:, :, :n] * (half[None, None, :] / half[None, :, None])  # S^-1 A S
    t = matrices[:, :, n] / half
    # array order (D, H, W) -> grid order (x=W, y=H, z=D): reverse rows and columns
    return torch.cat([lin.flip(1).flip(2), t.flip(1).unsqueeze(-1)], dim=2)


def _norm_coords(size: int, device) -> torch.Tensor:
    """Normalised pixel centres along one axis, as ``affine_grid(align_corners=True)`` uses."""
    if size <= 1:
        return torch.zeros(max(size, 1), dtype=torch.float32, device=device)
    return torch.linspace(-1.0, 1.0, size, dtype=torch.float32, device=device)


def _affine_grid(
    theta: torch.Tensor, shape: Sequence[int], *, channels_first: bool = False
) -> torch.Tensor:
    """``F.affine_grid(theta, (b, 1, *shape), align_corners=True)`` built by broadcasting the
    separable terms (several times faster on CPU, same values). ``(b, *shape, n)``, or
    ``(b, n, *shape)`` with ``channels_first``."""
    b, n = theta.shape[0], len(shape)
    dev = theta.device
    coords = [_norm_coords(s, dev) for s in shape]
    out_shape = (b, n, *shape) if channels_first else (b, *shape, n)
    out = torch.empty(out_shape, dtype=torch.float32, device=dev)
    for j in range(n):
        terms = []
        for k in range(n):  # grid coordinate k (x, y, z) runs along array axis n-1-k
            ax = n - 1 - k
            view_shape = [b] + [1] * n
            view_shape[1 + ax] = shape[ax]
            terms.append((theta[:, j, k : k + 1] * coords[ax][None, :]).reshape(view_shape))
        partial = terms[0]
        for term in terms[1:-1]:
            partial = partial + term
        partial = partial + theta[:, j, n].reshape(b, *([1] * n))
        torch.add(partial, terms[-1], out=out[:, j] if channels_first else out[..., j])
    return out


def _deformed_grid(
    theta: torch.Tensor, displacement: torch.Tensor, shape: Sequence[int]
) -> torch.Tensor:
    """Sampling grid ``(b, *shape, n)`` for thetas plus a displacement ``(b, n, *C)`` in pixels,
    array order, given on the full grid (``C == shape``) or on a coarse grid with the same
    corners. Affine part and displacement are added on ``C`` and upsampled together (linear
    interpolation reproduces the affine part exactly), so the full-resolution grid is written
    once."""
    n = len(shape)
    cshape = tuple(displacement.shape[2:])
    half = _half_extent(shape, theta.device)
    grid = _affine_grid(theta, cshape, channels_first=True)
    grid += (displacement / half.reshape(1, n, *([1] * n))).flip(1)
    return _upsample(grid, shape).movedim(1, -1)


def _resample(
    image: torch.Tensor,
    mask: torch.Tensor | None,
    grid: torch.Tensor,
    padding_mode: str,
    interpolation: str,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One ``grid_sample`` for the image (``interpolation``) and one for the mask (nearest)."""
    img = F.grid_sample(
        image, grid.to(image.dtype), mode=interpolation, padding_mode=padding_mode,
        align_corners=_ALIGN_CORNERS,
    )
    out_mask = None
    if mask is not None:
        # float32 holds every label value up to 2**24 exactly; nearest sampling copies values
        work = torch.float64 if mask.dtype == torch.float64 else torch.float32
        m = F.grid_sample(
            mask.to(work), grid.to(work), mode="nearest", padding_mode=padding_mode,
            align_corners=_ALIGN_CORNERS,
        )
        out_mask = (m > 0.5) if mask.dtype == torch.bool else m.to(mask.dtype)
    return img, out_mask


def _exact_flips(x: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    """Flip spatial axis ``k`` of sample ``b`` where ``flips[b, k]``; exact (no resampling)."""
    out = x
    for k in range(flips.shape[1]):
        col = flips[:, k]
        if bool(col.all()):
            out = out.flip(k + 2)
        elif bool(col.any()):
            out = torch.where(_bc_view(col, out.ndim), out.flip(k + 2), out)
    return out


def _pure_flip_samples(matrices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Which matrices are exactly a diagonal of +-1 with zero translation, and their flips."""
    n = matrices.shape[1]
    lin, t = matrices[:, :, :n], matrices[:, :, n]
    diag = torch.diagonal(lin, dim1=1, dim2=2)
    off = (lin - torch.diag_embed(diag)).flatten(1)
    pure = (off == 0).all(1) & (diag.abs() == 1).all(1) & (t == 0).all(1)
    return pure, diag < 0


def _spatial(
    image: torch.Tensor,
    mask: torch.Tensor | None,
    matrices: torch.Tensor,
    deform: torch.Tensor,
    grid_fn,
    padding_mode: str,
    interpolation: str,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Samples whose matrix is a pure flip (or identity) and which are not deformed
    (``deform`` ``(B,)`` bool) are flipped / copied exactly; all others are resampled with one
    ``grid_sample`` per tensor on the grid ``grid_fn(index or None for all)`` returns.
    The results never share memory with the inputs."""
    pure, flips = _pure_flip_samples(matrices)
    pure = pure & ~deform
    if bool(pure.all()):
        idx = torch.arange(image.shape[0], device=image.device)
        img = _exact_flips(image[idx], flips)  # indexing copies, so the result is a new tensor
        msk = _exact_flips(mask[idx], flips) if mask is not None else None
        return img, msk
    if not bool(pure.any()):
        return _resample(image, mask, grid_fn(None), padding_mode, interpolation)
    res_idx = torch.nonzero(~pure).squeeze(1)
    pure_idx = torch.nonzero(pure).squeeze(1)
    img_r, msk_r = _resample(
        image[res_idx], mask[res_idx] if mask is not None else None, grid_fn(res_idx),
        padding_mode, interpolation,
    )
    img = torch.empty_like(image)
    img[res_idx] = img_r
    img[pure_idx] = _exact_flips(image[pure_idx], flips[pure_idx])
    msk = None
    if mask is not None:
        msk = torch.empty_like(mask)
        msk[res_idx] = msk_r
        msk[pure_idx] = _exact_flips(mask[pure_idx], flips[pure_idx])
    return img, msk


def apply_spatial(
    image: torch.Tensor,
    mask: torch.Tensor | None,
    matrices: torch.Tensor,
    displacement: torch.Tensor | None = None,
    *,
    padding_mode: Literal["zeros", "border", "reflection"] = "zeros",
    interpolation: Literal["bilinear", "nearest"] = "bilinear",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Resample image and mask with one ``grid_sample`` call each.

    Args:
        image: ``(B, C, *S)`` floating point.
        mask: ``(B, K, *S)``, ``(B, *S)`` or None; resampled with nearest neighbour, dtype kept.
        matrices: ``(B, n, n+1)`` (or ``(B, n, n)``) pull-back matrices in centred pixel units,
            array axis order (see the module docstring and :func:`make_affine_matrices`).
        displacement: optional ``(B, n, *S)`` extra displacement in pixels, array axis order
            (e.g. from :func:`elastic_displacement`).
        padding_mode: value outside the input, for image and mask.
        interpolation: ``"bilinear"`` (trilinear in 3-D) or ``"nearest"`` for the image.

    Samples whose matrix is exactly a +-1 diagonal (identity or flips) and whose displacement is
    zero are copied / flipped exactly instead of being resampled. Returns new tensors with the
    shapes and dtypes of the inputs.
    """
    image, mask, squeeze = _check_batch(image, mask)
    b, n = image.shape[0], image.ndim - 2
    shape = tuple(image.shape[2:])
    m = torch.as_tensor(matrices, dtype=torch.float32, device=image.device)
    if m.shape == (b, n, n):
        m = torch.cat([m, torch.zeros(b, n, 1, dtype=m.dtype, device=m.device)], dim=2)
    if m.shape != (b, n, n + 1):
        raise InputError(f"matrices must have shape ({b}, {n}, {n + 1}), got {tuple(m.shape)}")
    if displacement is not None:
        displacement = displacement.to(device=image.device, dtype=torch.float32)
        if tuple(displacement.shape) != (b, n, *shape):
            raise InputError(
                f"displacement must have shape {(b, n, *shape)}, got {tuple(displacement.shape)}"
            )
        deform = displacement.flatten(1).ne(0).any(1)
    else:
        deform = torch.zeros(b, dtype=torch.bool, device=image.device)

    def grid_fn(idx: torch.Tensor | None) -> torch.Tensor:
        mats = m if idx is None else m[idx]
        theta = _normalised_theta(mats, shape)
        if displacement is None:
            return _affine_grid(theta, shape)
        return _deformed_grid(theta, displacement if idx is None else displacement[idx], shape)

    img, msk = _spatial(image, mask, m, deform, grid_fn, padding_mode, interpolation)
    return img, (msk.squeeze(1) if squeeze and msk is not None else msk)
