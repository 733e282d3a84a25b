"""Batched, on-device augmentation for segmentation: image and mask transformed together.

Everything here works on whole batches that already sit on their device (CPU now, CUDA
later); every random parameter is drawn per sample from a ``torch.Generator`` so the same seed
gives the same batch. There is no Python loop over pixels or samples; the few per-sample numbers
are drawn as ``(B,)`` tensors.

Layout and units
----------------
- Images: ``(B, C, H, W)`` (2-D) or ``(B, C, D, H, W)`` (3-D), floating point (float32 is the
  intended dtype; float64 works too). ``n`` below is the number of spatial axes (2 or 3).
- Masks: ``(B, K, *spatial)`` or ``(B, *spatial)``: an integer label map (``K = 1``), a one-hot
  / soft float mask or a bool mask. Masks are resampled with nearest neighbour, so they keep
  exactly the values they had (no new labels) and their dtype.
- Spatial coordinates are in PIXELS (voxels), in ARRAY axis order ``(H, W)`` / ``(D, H, W)``,
  centred on the image centre (pixel ``i`` of an axis of length ``N`` sits at ``i - (N-1)/2``).
- A *sampling matrix* ``M`` of shape ``(n, n+1)`` is a pull-back: output pixel ``p`` takes the
  value the input has at ``M[:, :n] @ p + M[:, n] (+ displacement(p))``. This is the convention
  of ``scipy.ndimage.affine_transform`` and ``grid_sample``. Because it is in pixel units, a
  rotation stays a rotation (not a shear) on non-square images.
- Internally pixels are mapped to ``grid_sample``'s normalised ``[-1, 1]`` coordinates with
  ``align_corners=True`` everywhere (the affine grid, ``grid_sample`` and the upsampling of the
  elastic field): ``u = p / ((N - 1) / 2)`` per axis, so the matrix in normalised units is
  ``S^-1 M S`` with ``S = diag((N - 1) / 2)``. The affine grid has exactly the values of
  ``F.affine_grid(theta, size, align_corners=True)``; it is built by broadcasting its separable
  terms, which is several times faster on CPU.
- Samples whose spatial transform is the identity or pure flips are copied / flipped exactly
  (``torch.flip``), never interpolated, so an identity transform returns the input bit for bit.

Speed: one ``grid_sample`` per tensor and batch. The elastic field is drawn on a coarse grid
(spacing ~sigma/2), added to the affine grid THERE and the sum upsampled once (linear
interpolation reproduces the affine part exactly), so affine + elastic cost one full-resolution
grid. Intensity transforms run only on the samples they are applied to.

Pipeline and defaults (:class:`AugmentConfig`, nnU-Net flavoured)
-----------------------------------------------------------------
Each transform is switched by ``enabled`` and applied to each sample independently with
probability ``p``. Order: one spatial resampling (rotation, zoom, flips, elastic fused), then
on the image only: bias field, brightness, contrast, gamma, low resolution, blur, Gaussian
noise, Rician noise.

=============  =======  =====  ===================================================
transform      enabled  p      parameters
=============  =======  =====  ===================================================
rotation       yes      0.2    +-15 degrees (3-D: around each axis, per-axis ranges)
scale (zoom)   yes      0.2    zoom factor 0.85-1.25 (isotropic; > 1 enlarges)
flip           yes      0.5    each spatial axis independently
elastic        no       0.2    alpha 0-6 px (std per component), sigma 8-12 px
bias field     no       0.3    multiplicative, up to +-5..20 %, polynomial order 3
brightness     yes      0.15   multiplicative factor 0.75-1.25
contrast       yes      0.15   factor 0.75-1.25 about the mean, range preserved
gamma          yes      0.3    gamma 0.9-1.1 on intensities rescaled to [0, 1]
Gaussian noise yes      0.1    sigma 0-0.1 x each sample's intensity std
Rician noise   no       0.1    sigma 0-0.05 x each sample's intensity std
blur           no       0.2    Gaussian, sigma 0.5-1 px per axis (before the noise)
low resolution no       0.25   nearest down-sampling to 0.5-1x per axis, linear back up
=============  =======  =====  ===================================================

Blur and low-resolution simulation run after gamma and before the noise (a scanner blurs, then
adds noise); the planner switches them on. ``scale.per_axis`` makes the zoom anisotropic.

Elastic deformation and the bias field are off by default: elastic is costly and rarely helps
with enough data, the bias field only makes sense for MR magnitude images (as does Rician
noise). nnU-Net itself uses wider rotations (+-30 degrees), zooms (0.7-1.4) and gammas (0.7-1.5).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal

import torch
import torch.nn.functional as F
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from resunet.data.resolution import gaussian_blur, simulate_low_resolution
from resunet.errors import ConfigError, InputError

__all__ = [
    "AugmentConfig",
    "RotationConfig",
    "ScaleConfig",
    "FlipConfig",
    "ElasticConfig",
    "BiasFieldConfig",
    "BrightnessConfig",
    "ContrastConfig",
    "GammaConfig",
    "NoiseConfig",
    "RicianNoiseConfig",
    "BlurConfig",
    "LowResConfig",
    "augment_config_from_dict",
    "augment_batch",
    "make_affine_matrices",
    "random_affine_matrices",
    "elastic_displacement",
    "apply_spatial",
    "bias_field",
    "adjust_brightness",
    "adjust_contrast",
    "adjust_gamma",
    "add_gaussian_noise",
    "add_rician_noise",
]

_ALIGN_CORNERS = True

# --------------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------------


def _check_range(value: tuple[float, float]) -> tuple[float, float]:
    lo, hi = float(value[0]), float(value[1])
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"range ({lo}, {hi}) must have finite bounds")
    if lo > hi:
        raise ValueError(f"range ({lo}, {hi}) has its lower bound above its upper bound")
    return (lo, hi)


Range = Annotated[tuple[float, float], AfterValidator(_check_range)]
"""A closed interval ``(low, high)`` from which a value is drawn uniformly per sample."""
Probability = Annotated[float, Field(ge=0.0, le=1.0)]


def _positive(rng: tuple[float, float], name: str) -> None:
    if rng[0] <= 0:
        raise ValueError(f"{name} must be > 0, got range {rng}")


def _non_negative(rng: tuple[float, float], name: str) -> None:
    if rng[0] < 0:
        raise ValueError(f"{name} must be >= 0, got range {rng}")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RotationConfig(_Strict):
    """Rotation in physical pixel space about the image centre.

    ``degrees``: range in degrees (2-D; also used for every axis in 3-D unless ``degrees_3d`` is
    given). ``degrees_3d``: three ranges for rotations AROUND the array axes ``(D, H, W)``.
    """

    enabled: bool = True
    p: Probability = 0.2
    degrees: Range = (-15.0, 15.0)
    degrees_3d: tuple[Range, Range, Range] | None = None


class ScaleConfig(_Strict):
    """Zoom about the image centre; a factor > 1 makes structures larger. ``per_axis``: one
    factor per spatial axis (anisotropic scaling, drawn independently from ``zoom``) instead of
    one isotropic factor."""

    enabled: bool = True
    p: Probability = 0.2
    zoom: Range = (0.85, 1.25)
    per_axis: bool = False

    @model_validator(mode="after")
    def _check(self) -> ScaleConfig:
        _positive(self.zoom, "scale.zoom")
        return self


class FlipConfig(_Strict):
    """Mirroring: each axis in ``axes`` (spatial axis indices in array order, ``0`` = first
    spatial axis; ``None`` = all) is flipped independently with probability ``p``."""

    enabled: bool = True
    p: Probability = 0.5
    axes: tuple[int, ...] | None = None

    @model_validator(mode="after")
    def _check(self) -> FlipConfig:
        if self.axes is not None and any(a < 0 or a > 2 for a in self.axes):
            raise ValueError(f"flip.axes {self.axes} must be spatial axis indices 0, 1 or 2")
        return self


class ElasticConfig(_Strict):
    """Smooth random displacement field, in pixels.

    ``alpha``: standard deviation of each displacement component (pixels). ``sigma``: Gaussian
    smoothing width (pixels), i.e. the correlation length of the deformation. ``coarse``: draw
    the noise on a grid of spacing ~sigma/2 and upsample linearly (much faster, statistically
    the same field); ``False`` smooths full-resolution noise.
    """

    enabled: bool = False
    p: Probability = 0.2
    alpha: Range = (0.0, 6.0)
    sigma: Range = (8.0, 12.0)
    coarse: bool = True

    @model_validator(mode="after")
    def _check(self) -> ElasticConfig:
        _non_negative(self.alpha, "elastic.alpha")
        _positive(self.sigma, "elastic.sigma")
        return self


class BiasFieldConfig(_Strict):
    """Smooth multiplicative field (MR inhomogeneity): ``exp`` of a random polynomial of total
    degree ``order``, scaled so the field spans ``[1/(1+a), 1+a]`` with ``a`` drawn from
    ``amplitude`` (``0.2`` = +-20 %)."""

    enabled: bool = False
    p: Probability = 0.3
    amplitude: Range = (0.05, 0.2)
    order: int = Field(default=3, ge=1, le=6)

    @model_validator(mode="after")
    def _check(self) -> BiasFieldConfig:
        _non_negative(self.amplitude, "bias_field.amplitude")
        return self


class BrightnessConfig(_Strict):
    """Multiply each sample by a factor."""

    enabled: bool = True
    p: Probability = 0.15
    factor: Range = (0.75, 1.25)


class ContrastConfig(_Strict):
    """Scale intensities about each sample's (and channel's) mean; with ``preserve_range`` the
    result is clipped to the sample's original min/max (nnU-Net)."""

    enabled: bool = True
    p: Probability = 0.15
    factor: Range = (0.75, 1.25)
    preserve_range: bool = True

    @model_validator(mode="after")
    def _check(self) -> ContrastConfig:
        _non_negative(self.factor, "contrast.factor")
        return self


class GammaConfig(_Strict):
    """``x -> x**gamma`` on intensities rescaled to [0, 1] per sample and channel, mapped back
    to the original range. ``retain_stats`` restores mean and std afterwards (nnU-Net's option;
    the range is then no longer preserved)."""

    enabled: bool = True
    p: Probability = 0.3
    gamma: Range = (0.9, 1.1)
    retain_stats: bool = False

    @model_validator(mode="after")
    def _check(self) -> GammaConfig:
        _positive(self.gamma, "gamma.gamma")
        return self


class NoiseConfig(_Strict):
    """Additive Gaussian noise; ``sigma`` is relative to each sample's (and channel's) intensity
    standard deviation when ``relative``, else absolute in intensity units."""

    enabled: bool = True
    p: Probability = 0.1
    sigma: Range = (0.0, 0.1)
    relative: bool = True

    @model_validator(mode="after")
    def _check(self) -> NoiseConfig:
        _non_negative(self.sigma, "noise.sigma")
        return self


class RicianNoiseConfig(NoiseConfig):
    """Rician noise ``sqrt((x + n1)**2 + n2**2)`` for MR magnitude images (output >= 0)."""

    enabled: bool = False
    sigma: Range = (0.0, 0.05)


class BlurConfig(_Strict):
    """Gaussian blur, ``sigma`` in pixels drawn per sample (and per axis with ``per_axis``)."""

    enabled: bool = False
    p: Probability = 0.2
    sigma: Range = (0.5, 1.0)
    per_axis: bool = True

    @model_validator(mode="after")
    def _check(self) -> BlurConfig:
        _non_negative(self.sigma, "blur.sigma")
        return self


class LowResConfig(_Strict):
    """Low-resolution simulation: nearest down-sampling by ``zoom`` (per sample, and per axis with
    ``per_axis``), then linear up-sampling back (`simulate_low_resolution`)."""

    enabled: bool = False
    p: Probability = 0.25
    zoom: Range = (0.5, 1.0)
    per_axis: bool = True

    @model_validator(mode="after")
    def _check(self) -> LowResConfig:
        if not 0.0 < self.zoom[0] <= self.zoom[1] <= 1.0:
            raise ValueError(f"low_resolution.zoom {self.zoom} must lie in (0, 1]")
        return self


class AugmentConfig(_Strict):
    """All augmentation settings; every field has a default (see the module docstring).

    ``padding_mode``: what the spatial transform samples outside the image, for image and mask
    alike (``"zeros"``: 0 = background; ``"border"``; ``"reflection"``).
    ``interpolation``: image interpolation (``"bilinear"`` is trilinear in 3-D); masks are
    always nearest.
    """

    padding_mode: Literal["zeros", "border", "reflection"] = "zeros"
    interpolation: Literal["bilinear", "nearest"] = "bilinear"
    rotation: RotationConfig = Field(default_factory=RotationConfig)
    scale: ScaleConfig = Field(default_factory=ScaleConfig)
    flip: FlipConfig = Field(default_factory=FlipConfig)
    elastic: ElasticConfig = Field(default_factory=ElasticConfig)
    bias_field: BiasFieldConfig = Field(default_factory=BiasFieldConfig)
    brightness: BrightnessConfig = Field(default_factory=BrightnessConfig)
    contrast: ContrastConfig = Field(default_factory=ContrastConfig)
    gamma: GammaConfig = Field(default_factory=GammaConfig)
    noise: NoiseConfig = Field(default_factory=NoiseConfig)
    rician_noise: RicianNoiseConfig = Field(default_factory=RicianNoiseConfig)
    blur: BlurConfig = Field(default_factory=BlurConfig)
    low_resolution: LowResConfig = Field(default_factory=LowResConfig)

    @classmethod
    def disabled(cls) -> AugmentConfig:
        """A configuration with every transform switched off (``augment_batch`` is identity)."""
        cfg = cls()
        for name in _TRANSFORM_FIELDS:
            getattr(cfg, name).enabled = False
        return cfg


_TRANSFORM_FIELDS = (
    "rotation",
    "scale",
    "flip",
    "elastic",
    "bias_field",
    "brightness",
    "contrast",
    "gamma",
    "noise",
    "rician_noise",
    "blur",
    "low_resolution",
)


def augment_config_from_dict(data: Mapping[str, Any] | AugmentConfig | None) -> AugmentConfig:
    """Validate a mapping (e.g. the ``augment:`` section of a YAML file) into an
    :class:`AugmentConfig`; raises :class:`~resunet.errors.ConfigError` naming the bad keys."""
    if data is None:
        return AugmentConfig()
    if isinstance(data, AugmentConfig):
        return data
    try:
        return AugmentConfig.model_validate(dict(data))
    except ValidationError as exc:
        problems = "; ".join(
            f"augment.{'.'.join(str(x) for x in err['loc'])}: {err['msg']}" for err in exc.errors()
        )
        raise ConfigError(f"bad augmentation settings: {problems}") from None
    except TypeError as exc:
        raise ConfigError(f"augmentation settings must be a mapping: {exc}") from None


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


# --------------------------------------------------------------------------------------------
# pipeline
# --------------------------------------------------------------------------------------------


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
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Augment a batch in one call: one spatial resampling, then the intensity transforms.

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

    Returns:
        ``(image, mask)``: new tensors of the input shapes and dtypes (mask None if None).
        Runs under ``torch.no_grad()``.
    """
    cfg = augment_config_from_dict(config)
    image, mask, squeeze = _check_batch(image, mask)
    b, n = image.shape[0], image.ndim - 2
    shape = tuple(image.shape[2:])
    dev = image.device

    # ---- spatial: rotation, zoom, flips, elastic -> one resampling
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

    img, msk = _spatial(image, mask, matrices, deform, grid_fn, cfg.padding_mode, cfg.interpolation)

    # ---- intensity, image only. Parameters are drawn for every sample (fixed draw order).
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
    img = _on_subset(
        img, sel, lambda x, i: adjust_contrast(x, cfac[i], preserve_range=ct.preserve_range)
    )

    gm = cfg.gamma
    sel = _coin(generator, b, gm.p if gm.enabled else 0.0, dev)
    gam = _uniform(generator, (b,), gm.gamma[0], gm.gamma[1], dev)
    img = _on_subset(img, sel, lambda x, i: adjust_gamma(x, gam[i], retain_stats=gm.retain_stats))

    # acquisition resolution (drawn only when enabled, so the draws of other settings are unchanged)
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
    img = _on_subset(
        img,
        sel,
        lambda x, i: add_gaussian_noise(x, nsig[i], relative=ns.relative, generator=generator),
    )

    rn = cfg.rician_noise
    sel = _coin(generator, b, rn.p if rn.enabled else 0.0, dev)
    rsig = _uniform(generator, (b,), rn.sigma[0], rn.sigma[1], dev)
    img = _on_subset(
        img,
        sel,
        lambda x, i: add_rician_noise(x, rsig[i], relative=rn.relative, generator=generator),
    )

    if msk is not None and squeeze:
        msk = msk.squeeze(1)
    return img, msk
