"""Patch-based inference as pure tensor functions.

Conventions (shared by every function here):

- A *model* is any callable ``net(x) -> logits`` with ``x`` of shape ``(B, C, H, W)`` (2-D) or
  ``(B, C, D, H, W)`` (3-D) and logits of shape ``(B, K, *same spatial)``. A model that returns a
  list/tuple (deep supervision) is read at element 0, the full-resolution output. The caller
  puts an ``nn.Module`` in eval mode; nothing here changes a model's state.
- Spatial axes are always the trailing ones and are given in array order (``(D, H, W)`` /
  ``(H, W)``); sizes, patch sizes, divisors and overlaps may be one int/float for every axis or
  one value per spatial axis.
- Everything runs under ``torch.inference_mode()``. ``amp_dtype`` (``None``, ``torch.bfloat16``
  or ``torch.float16``) wraps only the model call in ``torch.autocast``; logits are accumulated
  in ``accumulate_dtype`` (float32 by default).
- Bad arguments raise `ResunetError` subclasses before any work is done: `InputError` for the
  image/volume, `ConfigError` for settings, `ModelError` when the model's output does not fit.

Window placement follows nnU-Net: windows are spread evenly so that neighbouring windows
overlap by at least ``overlap`` of the patch, the first starts at 0 and the last is flush with
the (padded) border. Gaussian importance weighting (sigma = patch/8) down-weights window borders
so stitched outputs have no seams.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from resunet.data.sampling import stack_context
from resunet.errors import ConfigError, InputError, ModelError
from resunet.hardware import autocast

__all__ = [
    "PadSpec",
    "crop_padding",
    "flip_tta",
    "gaussian_importance_map",
    "pad_to_multiple",
    "predict_slices",
    "sliding_window_positions",
    "sliding_window_predict",
]

Model = Callable[[torch.Tensor], Any]
SizeArg = Union[int, Sequence[int]]
#: ``((before, after), ...)`` padding per trailing spatial axis, in array order.
PadSpec = tuple[tuple[int, int], ...]
ProgressArg = Union[bool, Callable[[int, int], None]]

_AMP_DTYPES = (None, torch.bfloat16, torch.float16)
_PAD_MODES = ("constant", "reflect", "replicate", "circular")


# --------------------------------------------------------------------------- argument helpers


def _as_tuple(value: Any, ndim: int, name: str, kind: type = int) -> tuple:
    """Expand a scalar to ``ndim`` values or check a sequence has ``ndim`` values."""
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
        values = (value,) * ndim
    else:
        try:
            values = tuple(value)
        except TypeError:
            raise ConfigError(f"{name} must be a number or a sequence of numbers, got {value!r}")
        if len(values) != ndim:
            raise ConfigError(
                f"{name}={tuple(values)} has {len(values)} values but there are {ndim} spatial "
                f"axes; give one value per axis (array order) or a single number"
            )
    if kind is int:
        out = []
        for v in values:
            if isinstance(v, bool) or not float(v).is_integer():
                raise ConfigError(f"{name}={tuple(values)} must hold whole numbers")
            out.append(int(v))
        return tuple(out)
    return tuple(float(v) for v in values)


def _positive(values: tuple, name: str) -> tuple:
    if any(v < 1 for v in values):
        raise ConfigError(f"{name}={values} must be positive")
    return values


def _check_overlap(overlap: tuple[float, ...]) -> None:
    if any(not (0.0 <= o < 1.0) for o in overlap):
        raise ConfigError(f"overlap={overlap} must be in [0, 1) (0.5 is the usual choice)")


def _check_amp(amp_dtype: torch.dtype | None) -> None:
    if amp_dtype not in _AMP_DTYPES:
        raise ConfigError(
            f"amp_dtype={amp_dtype!r} is not supported; use None, torch.bfloat16 or torch.float16"
        )


def _check_accumulate_dtype(dtype: torch.dtype) -> None:
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ConfigError(f"accumulate_dtype={dtype!r} must be a floating torch dtype")


def _check_batch_size(batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)):
        raise ConfigError(f"batch_size={batch_size!r} must be a positive integer")
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size} must be at least 1")


def _warn_if_training(net: Model) -> None:
    """Warn when dropout or batch norm would behave as in training (the caller forgot eval())."""
    if not isinstance(net, nn.Module):
        return
    live = (nn.modules.dropout._DropoutNd, nn.modules.batchnorm._BatchNorm)
    if any(m.training and isinstance(m, live) for m in net.modules()):
        import warnings

        warnings.warn(
            "the model is in training mode (dropout/batch-norm statistics are live); "
            "call net.eval() before inference",
            stacklevel=3,
        )


class _Progress:
    """``progress=True`` shows a rich progress bar; a callable gets ``(done, total)``."""

    def __init__(self, progress: ProgressArg, total: int, description: str) -> None:
        self._callback: Callable[[int, int], None] | None = None
        self._bar = None
        self.total = total
        self.done = 0
        if callable(progress):
            self._callback = progress
        elif progress:
            from rich.progress import Progress

            self._bar = Progress(transient=True)
            self._task = self._bar.add_task(description, total=total)
            self._bar.start()

    def advance(self, n: int) -> None:
        self.done += n
        if self._callback is not None:
            self._callback(self.done, self.total)
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()


def _run_net(net: Model, x: torch.Tensor, amp_dtype: torch.dtype | None) -> torch.Tensor:
    """Call the model (under autocast if asked) and check the output is ``(B, K, *spatial)``."""
    with autocast(x.device, amp_dtype):
        y = net(x)
    if isinstance(y, (list, tuple)):
        if not y:
            raise ModelError("the model returned an empty list/tuple instead of logits")
        y = y[0]
    if not isinstance(y, torch.Tensor):
        raise ModelError(f"the model returned {type(y).__name__}, expected a tensor of logits")
    if y.ndim != x.ndim or y.shape[0] != x.shape[0] or y.shape[2:] != x.shape[2:]:
        raise ModelError(
            f"the model mapped an input of shape {tuple(x.shape)} to {tuple(y.shape)}; expected "
            f"(B, K, *spatial) with the input's batch size and spatial size {tuple(x.shape[2:])}"
        )
    return y


def _check_channels(y: torch.Tensor, num_out_channels: int | None) -> None:
    if num_out_channels is not None and y.shape[1] != num_out_channels:
        raise ModelError(
            f"the model returned {y.shape[1]} channels but num_out_channels={num_out_channels}"
        )


# --------------------------------------------------------------------------- padding


@torch.inference_mode()
def pad_to_multiple(
    x: torch.Tensor,
    divisor: SizeArg,
    mode: str = "constant",
    value: float = 0.0,
    min_size: SizeArg | None = None,
    spatial_ndim: int | None = None,
) -> tuple[torch.Tensor, PadSpec]:
    """Pad the trailing spatial axes of ``x`` up to a multiple of ``divisor``.

    Each spatial axis of size ``s`` becomes ``ceil(max(s, min_size) / divisor) * divisor``;
    the extra ``t`` voxels are split ``t // 2`` before and ``t - t // 2`` after.

    Args:
        x: ``(..., *spatial)``, e.g. ``(B, C, H, W)`` or ``(C, D, H, W)``.
        divisor: int or one int per spatial axis (1 = no constraint).
        mode: ``"constant"`` (fill with ``value``), ``"reflect"``, ``"replicate"`` or
            ``"circular"`` (as `torch.nn.functional.pad`).
        value: fill value for ``mode="constant"``.
        min_size: optional smallest size per axis (int or one per axis), e.g. a patch size.
        spatial_ndim: number of trailing spatial axes. Default: the length of ``divisor`` or
            ``min_size`` if one is a sequence, else ``x.ndim - 2`` (batched ``(B, C, ...)``).

    Returns:
        ``(padded, pad_spec)`` with ``pad_spec = ((before, after), ...)`` per spatial axis;
        ``crop_padding(padded, pad_spec)`` gives ``x`` back exactly. When nothing needs
        padding, ``padded`` is ``x`` itself.
    """
    if not isinstance(x, torch.Tensor):
        raise InputError(f"pad_to_multiple needs a torch.Tensor, got {type(x).__name__}")
    if spatial_ndim is None:
        for arg in (divisor, min_size):
            if arg is not None and not isinstance(arg, (int, np.integer)):
                try:
                    spatial_ndim = len(arg)  # type: ignore[arg-type]
                    break
                except TypeError:
                    pass
        else:
            spatial_ndim = x.ndim - 2
    if not (1 <= spatial_ndim <= x.ndim):
        raise InputError(
            f"cannot pad {spatial_ndim} spatial axes of a tensor of shape {tuple(x.shape)}; "
            f"pass spatial_ndim explicitly"
        )
    div = _positive(_as_tuple(divisor, spatial_ndim, "divisor"), "divisor")
    low = (1,) * spatial_ndim if min_size is None else _as_tuple(min_size, spatial_ndim, "min_size")
    if mode not in _PAD_MODES:
        raise ConfigError(f"pad mode {mode!r} is unknown; use one of {', '.join(_PAD_MODES)}")

    spatial = tuple(x.shape[-spatial_ndim:])
    if any(s < 1 for s in spatial):
        raise InputError(f"cannot pad a tensor with an empty spatial axis: {tuple(x.shape)}")
    spec = []
    for s, d, m in zip(spatial, div, low):
        total = math.ceil(max(s, m) / d) * d - s
        spec.append((total // 2, total - total // 2))
    pad_spec: PadSpec = tuple(spec)
    if all(b == 0 and a == 0 for b, a in pad_spec):
        return x, pad_spec

    if mode == "reflect":
        for s, (b, a) in zip(spatial, pad_spec):
            if b >= s or a >= s:
                raise ConfigError(
                    f"reflect padding of {b}/{a} voxels needs an axis longer than that, got "
                    f"{s}; use mode='replicate' or 'constant' for images this small"
                )
    # F.pad wants the last axis first: (last_before, last_after, 2nd-last_before, ...).
    flat = [p for pair in reversed(pad_spec) for p in pair]
    if mode == "constant":
        return F.pad(x, flat, mode="constant", value=value), pad_spec
    if spatial_ndim > 3:
        raise InputError(f"mode={mode!r} pads at most 3 spatial axes, got {spatial_ndim}")
    # The non-constant modes want (N, C, *spatial): fold all leading axes into the channels.
    lead = tuple(x.shape[:-spatial_ndim])
    folded = x.reshape(1, -1, *spatial)
    if not x.dtype.is_floating_point:
        padded = F.pad(folded.float(), flat, mode=mode).to(x.dtype)
    else:
        padded = F.pad(folded, flat, mode=mode)
    return padded.reshape(*lead, *padded.shape[2:]), pad_spec


def crop_padding(y: torch.Tensor, pad_spec: PadSpec) -> torch.Tensor:
    """Undo `pad_to_multiple`: cut ``pad_spec`` off the trailing ``len(pad_spec)`` axes.

    ``y`` may have other leading axes than the padded tensor (e.g. ``K`` logit channels instead
    of ``C`` image channels); only the trailing spatial axes must match. Returns a view.
    """
    n = len(pad_spec)
    if y.ndim < n:
        raise InputError(f"cannot crop {n} spatial axes from a tensor of shape {tuple(y.shape)}")
    index: list[slice] = [slice(None)] * (y.ndim - n)
    for size, (before, after) in zip(y.shape[-n:], pad_spec):
        if before < 0 or after < 0 or before + after > size:
            raise InputError(f"pad spec {pad_spec} does not fit tensor shape {tuple(y.shape)}")
        index.append(slice(before, size - after))
    return y[tuple(index)]


# --------------------------------------------------------------------------- windows


def gaussian_importance_map(
    patch_size: Sequence[int],
    sigma_scale: float | Sequence[float] = 1.0 / 8,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    floor: float | None = None,
) -> torch.Tensor:
    """Gaussian weight map of shape ``patch_size`` for blending overlapping windows.

    ``sigma = patch_size * sigma_scale`` per axis, centred at ``(p - 1) / 2`` (exactly
    symmetric, so flips of a window see the same weights), normalised so the maximum is 1.
    As in nnU-Net, no weight is zero: entries below ``floor`` are raised to ``floor``.
    ``floor=None`` uses the smallest positive entry of the map in ``dtype`` (never below the
    smallest normal number of ``dtype``), so nothing changes unless ``dtype`` underflows.
    """
    size = tuple(int(p) for p in patch_size)
    if not size or any(p < 1 for p in size):
        raise ConfigError(f"patch_size={size} must hold positive integers")
    scales = _as_tuple(sigma_scale, len(size), "sigma_scale", kind=float)
    if any(s <= 0 for s in scales):
        raise ConfigError(f"sigma_scale={scales} must be positive")
    gmap = torch.ones((), dtype=torch.float64)
    for axis, (p, scale) in enumerate(zip(size, scales)):
        sigma = p * scale
        coords = torch.arange(p, dtype=torch.float64) - (p - 1) / 2.0
        g = torch.exp(-0.5 * (coords / sigma) ** 2)
        g = g / g.max()  # product of per-axis maxima 1 -> map maximum exactly 1
        shape = [1] * len(size)
        shape[axis] = p
        gmap = gmap * g.reshape(shape)
    gmap = gmap.to(dtype)
    if floor is None:
        positive = gmap[gmap > 0]
        floor = float(positive.min()) if positive.numel() else 1.0
        floor = max(floor, float(torch.finfo(dtype).tiny))
    elif floor <= 0:
        raise ConfigError(f"floor={floor} must be positive")
    gmap = torch.clamp_min(gmap, floor)
    return gmap.to(device) if device is not None else gmap


def sliding_window_positions(
    image_size: Sequence[int],
    patch_size: SizeArg,
    overlap: float | Sequence[float] = 0.5,
) -> list[tuple[int, ...]]:
    """Start indices of windows of ``patch_size`` that cover ``image_size``.

    Per axis the target step is ``patch * (1 - overlap)`` (at least 1); the number of windows is
    the fewest reaching the border with that step, and the starts are spread evenly between 0
    and ``image - patch`` (rounded half up), so the real step never exceeds the target, the
    first window starts at 0 and the last one is flush with the border. The image must be at
    least as large as the patch on every axis (pad it first, e.g. with `pad_to_multiple`).

    Returns the list of start tuples (array order), all axis combinations, last axis fastest.
    """
    image = tuple(int(s) for s in image_size)
    ndim = len(image)
    if ndim == 0:
        raise InputError("image_size is empty")
    patch = _positive(_as_tuple(patch_size, ndim, "patch_size"), "patch_size")
    ov = _as_tuple(overlap, ndim, "overlap", kind=float)
    _check_overlap(ov)
    if any(p > s for p, s in zip(patch, image)):
        raise InputError(
            f"patch_size={patch} is larger than the image {image}; pad the image to at least "
            f"the patch size first"
        )
    per_axis = []
    for s, p, o in zip(image, patch, ov):
        span = s - p
        target = max(1.0, p * (1.0 - o))
        steps = math.ceil(span / target) + 1
        if steps == 1:
            per_axis.append([0])
            continue
        step = span / (steps - 1)
        starts = [int(math.floor(step * i + 0.5)) for i in range(steps)]
        starts[-1] = span
        per_axis.append(starts)
    return list(itertools.product(*per_axis))


# --------------------------------------------------------------------------- sliding window


@torch.inference_mode()
def sliding_window_predict(
    image: torch.Tensor,
    net: Model,
    patch_size: SizeArg | None,
    overlap: float | Sequence[float] = 0.5,
    batch_size: int = 4,
    gaussian: bool = True,
    num_out_channels: int | None = None,
    accumulate_dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    progress: ProgressArg = False,
    *,
    accumulate_device: torch.device | str | None = None,
    divisor: SizeArg = 1,
    amp_dtype: torch.dtype | None = None,
    sigma_scale: float | Sequence[float] = 1.0 / 8,
    pad_mode: str = "constant",
    pad_value: float = 0.0,
) -> torch.Tensor:
    """Predict logits for a whole image by blending overlapping patch predictions.

    The image is padded (``pad_mode``/``pad_value``, split evenly before/after) to at least
    ``patch_size``; windows from `sliding_window_positions` are cut, sent to ``device`` in
    batches of ``batch_size`` and their (Gaussian-weighted) logits are added into one
    preallocated accumulator, together with the weights; at the end the sum is divided by the
    weights and the padding is cropped off. Only ``batch_size`` windows exist at a time.

    Args:
        image: ``(B, C, H, W)`` or ``(B, C, D, H, W)``; windows of all batch items are pooled
            into the model batches. Integer images are cast to float32.
        net: the model; must accept ``(n, C, *patch_size)`` and return ``(n, K, *patch_size)``.
        patch_size: window size (int or one per spatial axis), a multiple of ``divisor``.
            ``None`` = one window: the whole image padded up to ``divisor``.
        overlap: fraction of the patch shared by neighbouring windows, in [0, 1).
        batch_size: windows per model call.
        gaussian: weight windows by `gaussian_importance_map` (else a plain average).
        num_out_channels: ``K``; checked against the model when given, read from the model's
            first output when ``None``.
        accumulate_dtype: dtype of the accumulator and of the result.
        device: where the model runs (default: the image's device).
        progress: ``True`` for a progress bar or a callable ``(done, total)`` per batch.
        accumulate_device: where the accumulator (and the result) lives; default ``device``.
            Use ``"cpu"`` to keep big volumes off the GPU.
        divisor: the model's spatial divisibility constraint (int or one per axis).
        amp_dtype: ``None``, ``torch.bfloat16`` or ``torch.float16`` autocast around the model.
        sigma_scale: Gaussian sigma as a fraction of the patch size.
        pad_mode, pad_value: how the image is padded (see `pad_to_multiple`).

    Returns:
        Logits ``(B, K, *spatial)`` on ``accumulate_device`` in ``accumulate_dtype`` (a view
        into the padded accumulator when padding was needed).
    """
    patch, ov = _window_settings(image, patch_size, divisor, overlap)
    image, run_device, acc_device = _run_settings(image, net, batch_size, amp_dtype, accumulate_dtype,
                                                  num_out_channels, device, accumulate_device)
    padded, pad_spec = pad_to_multiple(
        image, 1, mode=pad_mode, value=pad_value, min_size=patch, spatial_ndim=len(patch)
    )
    positions = sliding_window_positions(tuple(padded.shape[2:]), patch, ov)
    if gaussian:
        weight_map = gaussian_importance_map(patch, sigma_scale, device=acc_device, dtype=accumulate_dtype)
    else:
        weight_map = torch.ones(patch, device=acc_device, dtype=accumulate_dtype)
    out = _blend_windows(padded, net, positions, patch, weight_map, batch_size, num_out_channels,
                         run_device, amp_dtype, progress)
    return crop_padding(out, pad_spec)


def _run_settings(x: torch.Tensor, net: Model, batch_size: int, amp_dtype: torch.dtype | None,
                  accumulate_dtype: torch.dtype, num_out_channels: int | None, device: Any,
                  accumulate_device: Any) -> tuple[torch.Tensor, torch.device, torch.device]:
    """The checks both predictors share; ``(x as float, model device, accumulator device)``."""
    _check_batch_size(batch_size)
    _check_amp(amp_dtype)
    _check_accumulate_dtype(accumulate_dtype)
    if num_out_channels is not None and num_out_channels < 1:
        raise ConfigError(f"num_out_channels={num_out_channels} must be positive")
    _warn_if_training(net)
    run_device = torch.device(device) if device is not None else x.device
    acc_device = torch.device(accumulate_device) if accumulate_device is not None else run_device
    return (x if x.dtype.is_floating_point else x.float()), run_device, acc_device


def _window_settings(image: torch.Tensor, patch_size: SizeArg | None, divisor: SizeArg,
                     overlap: float | Sequence[float]) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """Checked window size and overlap per spatial axis for ``image`` ``(B, C, *S)``."""
    if not isinstance(image, torch.Tensor):
        raise InputError(f"sliding_window_predict needs a torch.Tensor, got {type(image).__name__}")
    if patch_size is not None and not isinstance(patch_size, (int, np.integer)):
        ndim = len(patch_size)
        if image.ndim != ndim + 2:
            raise InputError(
                f"image of shape {tuple(image.shape)} does not fit a {ndim}-D patch_size "
                f"{tuple(patch_size)}; expected (B, C, *spatial) with {ndim} spatial axes"
            )
    else:
        ndim = image.ndim - 2
    if ndim not in (2, 3) or image.ndim != ndim + 2:
        raise InputError(
            f"image of shape {tuple(image.shape)} is not (B, C, H, W) or (B, C, D, H, W)"
        )
    if image.shape[0] < 1 or image.shape[1] < 1 or any(s < 1 for s in image.shape[2:]):
        raise InputError(f"image of shape {tuple(image.shape)} is empty")
    div = _positive(_as_tuple(divisor, ndim, "divisor"), "divisor")
    if patch_size is None:
        patch = tuple(math.ceil(s / d) * d for s, d in zip(image.shape[2:], div))
    else:
        patch = _positive(_as_tuple(patch_size, ndim, "patch_size"), "patch_size")
        bad = [(p, d) for p, d in zip(patch, div) if p % d]
        if bad:
            raise ConfigError(
                f"patch_size={patch} is not a multiple of the model's divisor {div}; round the "
                f"patch size to a multiple of {div}"
            )
    ov = _as_tuple(overlap, ndim, "overlap", kind=float)
    _check_overlap(ov)
    return patch, ov


def _blend_windows(padded: torch.Tensor, net: Model, positions: list, patch: tuple[int, ...],
                   weight_map: torch.Tensor, batch_size: int, num_out_channels: int | None,
                   run_device: torch.device, amp_dtype: torch.dtype | None, progress: ProgressArg) -> torch.Tensor:
    """Weighted sum of the window logits over ``padded`` ``(B, C, *S)`` divided by the summed
    weights: ``(B, K, *S)`` on ``weight_map``'s device and dtype."""
    acc_device, acc_dtype = weight_map.device, weight_map.dtype
    spatial, batch = tuple(padded.shape[2:]), padded.shape[0]
    weight_run_map = weight_map.to(run_device)
    # The weight sum only depends on the window positions: one spatial map for every b and k.
    weights = torch.zeros(spatial, device=acc_device, dtype=acc_dtype)
    for start in positions:
        weights[tuple(slice(s, s + p) for s, p in zip(start, patch))] += weight_map
    out: torch.Tensor | None = None
    if num_out_channels is not None:
        out = torch.zeros((batch, num_out_channels, *spatial), device=acc_device, dtype=acc_dtype)
    jobs = [(b, start) for b in range(batch) for start in positions]
    bar = _Progress(progress, len(jobs), "sliding window")
    try:
        for first in range(0, len(jobs), batch_size):
            chunk = jobs[first : first + batch_size]
            slicers = [tuple(slice(s, s + p) for s, p in zip(start, patch)) for _, start in chunk]
            x = torch.cat(
                [padded[(slice(b, b + 1), slice(None), *sl)] for (b, _), sl in zip(chunk, slicers)]
            ).to(run_device)
            logits = _run_net(net, x, amp_dtype)
            _check_channels(logits, num_out_channels)
            if out is None:
                out = torch.zeros((batch, logits.shape[1], *spatial), device=acc_device, dtype=acc_dtype)
            weighted = (logits.to(acc_dtype) * weight_run_map).to(acc_device)
            for i, ((b, _), sl) in enumerate(zip(chunk, slicers)):
                out[(b, slice(None), *sl)] += weighted[i]
            bar.advance(len(chunk))
    finally:
        bar.close()
    assert out is not None  # at least one window always exists
    out /= weights
    return out


# --------------------------------------------------------------------------- slices (2.5-D)


def predict_slices(
    volume: torch.Tensor,
    net: Model,
    batch_size: int = 8,
    context: int = 0,
    divisor: SizeArg = 16,
    *,
    patch_size: SizeArg | None = None,
    overlap: float | Sequence[float] = 0.5,
    gaussian: bool = True,
    num_out_channels: int | None = None,
    accumulate_dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    accumulate_device: torch.device | str | None = None,
    amp_dtype: torch.dtype | None = None,
    pad_mode: str = "constant",
    pad_value: float = 0.0,
    progress: ProgressArg = False,
) -> torch.Tensor:
    """Apply a 2-D model slice by slice along ``D`` of a 3-D volume.

    Slices are fed in batches of ``batch_size``; each input is built by `stack_context`
    (``C * (2 * context + 1)`` channels, order documented there). Without ``patch_size`` every
    slice is padded in-plane to a multiple of ``divisor``, predicted whole and cropped back;
    with ``patch_size`` (in-plane ``(h, w)``, a multiple of ``divisor``) each batch of slices
    goes through `sliding_window_predict` (2-D windows, ``batch_size`` windows per call).

    Args:
        volume: ``(C, D, H, W)``.
        net: 2-D model, ``(n, C * (2k + 1), h, w) -> (n, K, h, w)``.
        Other arguments as in `sliding_window_predict`.

    Returns:
        Logits ``(K, D, H, W)`` on ``accumulate_device`` (default ``device``, default the
        volume's) in ``accumulate_dtype``.
    """
    div, patch = _slice_settings(volume, context, divisor, patch_size)
    volume, run_device, acc_device = _run_settings(volume, net, batch_size, amp_dtype, accumulate_dtype,
                                                   num_out_channels, device, accumulate_device)
    depth, height, width = volume.shape[1:]

    def predict_batch(x: torch.Tensor) -> torch.Tensor:  # (n, C', H, W) -> (n, K, H, W)
        if patch is None:
            x, pad_spec = pad_to_multiple(x, div, mode=pad_mode, value=pad_value, spatial_ndim=2)
            y = crop_padding(_run_net(net, x.to(run_device), amp_dtype), pad_spec)
            _check_channels(y, num_out_channels)
            return y
        return sliding_window_predict(
            x, net, patch, overlap=overlap, batch_size=batch_size, gaussian=gaussian,
            num_out_channels=num_out_channels, accumulate_dtype=accumulate_dtype, device=run_device,
            accumulate_device=acc_device, divisor=div, amp_dtype=amp_dtype, pad_mode=pad_mode,
            pad_value=pad_value,
        )

    out: torch.Tensor | None = None
    if num_out_channels is not None:
        out = torch.empty((num_out_channels, depth, height, width), device=acc_device, dtype=accumulate_dtype)
    bar = _Progress(progress, depth, "slices")
    try:
        for z0 in range(0, depth, batch_size):
            z1 = min(depth, z0 + batch_size)
            y = predict_batch(stack_context(volume, range(z0, z1), context))
            if out is None:
                out = torch.empty((y.shape[1], depth, height, width), device=acc_device, dtype=accumulate_dtype)
            out[:, z0:z1] = y.to(device=acc_device, dtype=accumulate_dtype).transpose(0, 1)
            bar.advance(z1 - z0)
    finally:
        bar.close()
    assert out is not None
    return out


def _slice_settings(volume: torch.Tensor, context: int, divisor: SizeArg, patch_size: SizeArg | None
                    ) -> tuple[tuple[int, ...], tuple[int, ...] | None]:
    """Checked in-plane divisor and window size (None: whole slices) for `predict_slices`."""
    if not isinstance(volume, torch.Tensor):
        raise InputError(f"predict_slices needs a torch.Tensor, got {type(volume).__name__}")
    if volume.ndim != 4 or any(s < 1 for s in volume.shape):
        raise InputError(
            f"predict_slices needs a non-empty (C, D, H, W) volume, got {tuple(volume.shape)}"
        )
    if isinstance(context, bool) or not isinstance(context, (int, np.integer)) or context < 0:
        raise ConfigError(f"context={context!r} must be a non-negative integer")
    div = _positive(_as_tuple(divisor, 2, "divisor"), "divisor")
    if patch_size is None:
        return div, None
    patch = _positive(_as_tuple(patch_size, 2, "patch_size"), "patch_size")
    if any(p % d for p, d in zip(patch, div)):
        raise ConfigError(f"patch_size={patch} is not a multiple of the model's divisor {div}")
    return div, patch


# --------------------------------------------------------------------------- test-time flips


@torch.inference_mode()
def flip_tta(
    predict_fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    spatial_axes: Sequence[int],
) -> torch.Tensor:
    """Mean prediction over all ``2**n`` flip combinations of ``spatial_axes``.

    Each flipped input's prediction is flipped back on the same axes and added to a running
    float32 (or wider) sum, so only one extra prediction is held at a time.

    Args:
        predict_fn: e.g. a model, or ``functools.partial(sliding_window_predict, net=...)``
            (its output must keep the input's spatial axes at the same positions).
            Passing ``lambda w: flip_tta(net, w, axes)`` as the ``net`` of
            `sliding_window_predict` flips each window instead of the whole image.
        x: input tensor, e.g. ``(B, C, H, W)``.
        spatial_axes: axes to flip, e.g. ``(-2, -1)`` for 2-D and ``(-3, -2, -1)`` for 3-D
            (negative axes recommended: they mean the same in input and output).

    Returns:
        The mean prediction, dtype ``promote(prediction dtype, float32)``.
    """
    axes = tuple(int(a) for a in spatial_axes)
    if not axes:
        raise ConfigError("flip_tta needs at least one spatial axis to flip")
    normal = []
    for a in axes:
        if not -x.ndim <= a < x.ndim:
            raise ConfigError(
                f"flip axis {a} is out of range for an input of shape {tuple(x.shape)}"
            )
        normal.append(a % x.ndim)
    if len(set(normal)) != len(normal):
        raise ConfigError(f"flip axes {axes} repeat an axis")
    total: torch.Tensor | None = None
    count = 0
    for r in range(len(axes) + 1):
        for combo in itertools.combinations(axes, r):
            if combo:
                y = predict_fn(torch.flip(x, combo))
                y = torch.flip(y, combo)
            else:
                y = predict_fn(x)
            if isinstance(y, (list, tuple)):
                y = y[0]
            if total is None:
                total = y.to(torch.promote_types(y.dtype, torch.float32), copy=True)
            else:
                if y.shape != total.shape:
                    raise ModelError(
                        f"predictions of flipped inputs have shape {tuple(y.shape)}, the first "
                        f"had {tuple(total.shape)}"
                    )
                total += y
            count += 1
    assert total is not None
    total /= count
    return total
