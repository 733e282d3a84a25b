"""Augmentation settings: one pydantic model per transform and `AugmentConfig` (the defaults table
is in `resunet.data.augment`)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

from resunet.errors import ConfigError

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
    """Multiply each sample by a ``factor`` drawn from the range."""

    enabled: bool = True
    p: Probability = 0.15
    factor: Range = (0.75, 1.25)


class ContrastConfig(_Strict):
    """Scale intensities by ``factor`` about each sample's (and channel's) mean; with ``preserve_range`` the
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
    """``x -> x**gamma`` (``gamma`` drawn from the range) on intensities rescaled to [0, 1] per sample and channel, mapped back
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
    modality_dropout: Probability = Field(
        0.0, description="probability that a sample loses some of its modalities (zero-filled, all 2.5-D slices "
        "of one together; never all); > 0 lets the model predict a case with a modality missing")

    @classmethod
    def disabled(cls) -> AugmentConfig:
        """A configuration with every transform switched off (``augment_batch`` is identity)."""
        cfg = cls()
        for name in _TRANSFORM_FIELDS:
            getattr(cfg, name).enabled = False
        cfg.modality_dropout = 0.0
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
