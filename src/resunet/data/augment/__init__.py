"""Batched, on-device augmentation for segmentation: image and mask transformed together.

Modules: `config` (settings), `spatial` (affine + elastic, one resampling), `intensity` (image
only), `resolution` (blur, low resolution), `modality` (modality dropout), `pipeline`
(`augment_batch`).

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
noise, Rician noise, and last modality dropout.

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
modality drop  no       0      ``modality_dropout``: 1..M-1 of M modalities zeroed
=============  =======  =====  ===================================================

Blur and low-resolution simulation run after gamma and before the noise (a scanner blurs, then
adds noise); the planner switches them on. ``scale.per_axis`` makes the zoom anisotropic.

Elastic deformation and the bias field are off by default: elastic is costly and rarely helps
with enough data, the bias field only makes sense for MR magnitude images (as does Rician
noise). nnU-Net itself uses wider rotations (+-30 degrees), zooms (0.7-1.4) and gammas (0.7-1.5).
"""

from resunet.data.augment.config import (
    AugmentConfig,
    BiasFieldConfig,
    BlurConfig,
    BrightnessConfig,
    ContrastConfig,
    ElasticConfig,
    FlipConfig,
    GammaConfig,
    LowResConfig,
    NoiseConfig,
    RicianNoiseConfig,
    RotationConfig,
    ScaleConfig,
    augment_config_from_dict,
)
from resunet.data.augment.intensity import (
    add_gaussian_noise,
    add_rician_noise,
    adjust_brightness,
    adjust_contrast,
    adjust_gamma,
    bias_field,
)
from resunet.data.augment.modality import modality_dropout
from resunet.data.augment.pipeline import augment_batch
from resunet.data.augment.resolution import gaussian_blur, simulate_low_resolution
from resunet.data.augment.spatial import (
    apply_spatial,
    elastic_displacement,
    make_affine_matrices,
    random_affine_matrices,
)

__all__ = [
    "AugmentConfig", "BiasFieldConfig", "BlurConfig", "BrightnessConfig", "ContrastConfig", "ElasticConfig",
    "FlipConfig", "GammaConfig", "LowResConfig", "NoiseConfig", "RicianNoiseConfig", "RotationConfig",
    "ScaleConfig", "add_gaussian_noise", "add_rician_noise", "adjust_brightness", "adjust_contrast",
    "adjust_gamma", "apply_spatial", "augment_batch", "augment_config_from_dict", "bias_field",
    "elastic_displacement", "gaussian_blur", "make_affine_matrices", "modality_dropout", "random_affine_matrices",
    "simulate_low_resolution",
]
