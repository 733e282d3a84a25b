"""`augment_batch`: a batch through one spatial resampling, the intensity transforms, then
modality dropout."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from resunet.data.augment._common import _check_batch, _coin, _uniform
from resunet.data.augment.config import AugmentConfig, augment_config_from_dict
from resunet.data.augment.intensity import (
    add_gaussian_noise,
    add_rician_noise,
    adjust_brightness,
    adjust_contrast,
    adjust_gamma,
    bias_field,
)
from resunet.data.augment.modality import modality_dropout
from resunet.data.augment.resolution import gaussian_blur, simulate_low_resolution
from resunet.data.augment.spatial import (
    _affine_grid,
    _coarse_displacement,
    _deformed_grid,
    _normalised_theta,
    _spatial,
    random_affine_matrices,
)

# --------------------------------------------------------------------------------------------
# pipeline
# --------------------------------------------------------------------------------------------


def _apply_bias(x: torch.Tensor, field: torch.Tensor) -> torch.Tensor:
    """Multiply by the field RELATIVE TO each sample's minimum (its background level):
    ``(x - min) * field + min``. For raw magnitude images (min 0) this is ``x * field``; for
    z-scored ones (negative background) it scales the tissue, not the sign of the values."""
    low = x.amin(dim=tuple(range(1, x.ndim)), keepdim=True)
    return (x - low) * field + low


def _on_subset(x: torch.Tensor, sel: torch.Tensor, fn) -> torch.Tensor:
    """``fn(x[idx], idx)`` written into the samples where ``sel`` (IN PLACE: ``x`` must be a
    tensor this module created); the other samples are left untouched."""
    if bool(sel.all()):
        return fn(x, torch.arange(x.shape[0], device=x.device))
    if bool(sel.any()):
        idx = torch.nonzero(sel).squeeze(1)
        x[idx] = fn(x[idx], idx)
    return x


@torch.no_grad()
def augment_batch(
    image: torch.Tensor,
    mask: torch.Tensor | None,
    config: AugmentConfig | Mapping[str, Any] | None = None,
    generator: torch.Generator | None = None,
    *,
    spacing: Sequence[float] | None = None,
    modalities: int = 1,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Augment a batch in one call: one spatial resampling, the intensity transforms, then
    modality dropout (``config.modality_dropout``, `resunet.data.augment.modality`).

    Args:
        image: ``(B, C, H, W)`` or ``(B, C, D, H, W)`` floating point, on any device.
        mask: ``(B, K, *S)`` / ``(B, *S)`` label map, one-hot or bool mask, or None. It gets the
            same spatial transform (nearest neighbour) and no intensity transform.
        config: :class:`AugmentConfig` (or a mapping validated into one; default settings if None).
        generator: ``torch.Generator`` for every random draw (same seed -> same batch); ideally
            on the batch's device (a CPU generator works for any device, via a copy). None uses
            torch's global RNG.
        spacing: optional voxel spacing in array order, so rotations are rotations in physical
            space for anisotropic voxels (default: isotropic pixels).
        modalities: how many modalities the ``C`` channels hold, modality-major (each
            ``C / modalities`` channels: its 2.5-D slices); modality dropout drops whole ones.

    Returns:
        ``(image, mask)``: new tensors of the input shapes and dtypes (mask None if None).
        Runs under ``torch.no_grad()``.
    """
    cfg = augment_config_from_dict(config)
    image, mask, squeeze = _check_batch(image, mask)
    img, msk = _spatial_step(cfg, image, mask, generator, spacing)
    img = _intensity_step(cfg, img, generator)
    img = modality_dropout(img, cfg.modality_dropout, modalities, generator)[0]  # draws only when p > 0
    if msk is not None and squeeze:
        msk = msk.squeeze(1)
    return img, msk


def _spatial_step(cfg: AugmentConfig, image: torch.Tensor, mask: torch.Tensor | None,
                  generator: torch.Generator | None, spacing: Sequence[float] | None
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rotation, zoom, flips and elastic fused into one resampling of image and mask."""
    b, n = image.shape[0], image.ndim - 2
    shape = tuple(image.shape[2:])
    dev = image.device
    rc, sc, fc, ec = cfg.rotation, cfg.scale, cfg.flip, cfg.elastic
    rot_range: Any = rc.degrees if (n == 2 or rc.degrees_3d is None) else rc.degrees_3d
    matrices = random_affine_matrices(
        b, n,
        rotation_deg=rot_range, rotation_p=rc.p if rc.enabled else 0.0,
        zoom=sc.zoom, zoom_p=sc.p if sc.enabled else 0.0, zoom_per_axis=sc.per_axis,
        flip_axes=fc.axes, flip_p=fc.p if fc.enabled else 0.0,
        spacing=spacing, generator=generator, device=dev,
    )
    deform = _coin(generator, b, ec.p if ec.enabled else 0.0, dev)
    alpha = _uniform(generator, (b,), ec.alpha[0], ec.alpha[1], dev)
    sigma = _uniform(generator, (b,), ec.sigma[0], ec.sigma[1], dev)
    alpha = torch.where(deform, alpha, torch.zeros_like(alpha))
    deform = deform & (alpha > 0)

    def grid_fn(idx: torch.Tensor | None) -> torch.Tensor:
        mats, dfm, a, s = (
            (matrices, deform, alpha, sigma) if idx is None
            else (matrices[idx], deform[idx], alpha[idx], sigma[idx])
        )
        theta = _normalised_theta(mats, shape)
        if not bool(dfm.any()):
            return _affine_grid(theta, shape)
        # elastic + affine fused: added on the coarse noise grid, upsampled once
        field = _coarse_displacement(shape, a, s, ec.coarse, generator, dev)
        return _deformed_grid(theta, field, shape)

    return _spatial(image, mask, matrices, deform, grid_fn, cfg.padding_mode, cfg.interpolation)


def _intensity_step(cfg: AugmentConfig, img: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Image only, in the documented order. Parameters are drawn for every sample (fixed draw
    order); low resolution and blur draw only when enabled, so other settings' draws are unchanged."""
    b, n = img.shape[0], img.ndim - 2
    shape = tuple(img.shape[2:])
    dev = img.device
    bc = cfg.bias_field
    sel = _coin(generator, b, bc.p if bc.enabled else 0.0, dev)
    amp = _uniform(generator, (b,), bc.amplitude[0], bc.amplitude[1], dev)
    img = _on_subset(img, sel, lambda x, i: _apply_bias(x, bias_field(
        shape, amp[i], order=bc.order, generator=generator, device=dev).to(x.dtype)))

    br = cfg.brightness
    sel = _coin(generator, b, br.p if br.enabled else 0.0, dev)
    fac = _uniform(generator, (b,), br.factor[0], br.factor[1], dev)
    img = _on_subset(img, sel, lambda x, i: adjust_brightness(x, fac[i]))

    ct = cfg.contrast
    sel = _coin(generator, b, ct.p if ct.enabled else 0.0, dev)
    cfac = _uniform(generator, (b,), ct.factor[0], ct.factor[1], dev)
    img = _on_subset(img, sel, lambda x, i: adjust_contrast(x, cfac[i], preserve_range=ct.preserve_range))

    gm = cfg.gamma
    sel = _coin(generator, b, gm.p if gm.enabled else 0.0, dev)
    gam = _uniform(generator, (b,), gm.gamma[0], gm.gamma[1], dev)
    img = _on_subset(img, sel, lambda x, i: adjust_gamma(x, gam[i], retain_stats=gm.retain_stats))

    lr = cfg.low_resolution
    if lr.enabled:
        sel = _coin(generator, b, lr.p, dev)
        zoom = _uniform(generator, (b, n) if lr.per_axis else (b,), lr.zoom[0], lr.zoom[1], dev)
        img = _on_subset(img, sel, lambda x, i: simulate_low_resolution(x, zoom[i]))
    bl = cfg.blur
    if bl.enabled:
        sel = _coin(generator, b, bl.p, dev)
        bsig = _uniform(generator, (b, n) if bl.per_axis else (b,), bl.sigma[0], bl.sigma[1], dev)
        img = _on_subset(img, sel, lambda x, i: gaussian_blur(x, bsig[i]))

    ns = cfg.noise
    sel = _coin(generator, b, ns.p if ns.enabled else 0.0, dev)
    nsig = _uniform(generator, (b,), ns.sigma[0], ns.sigma[1], dev)
    img = _on_subset(img, sel, lambda x, i: add_gaussian_noise(x, nsig[i], relative=ns.relative, generator=generator))

    rn = cfg.rician_noise
    sel = _coin(generator, b, rn.p if rn.enabled else 0.0, dev)
    rsig = _uniform(generator, (b,), rn.sigma[0], rn.sigma[1], dev)
    return _on_subset(img, sel, lambda x, i: add_rician_noise(x, rsig[i], relative=rn.relative, generator=generator))
