"""2-D / 2.5-D slices and 2-D / 3-D patches from preprocessed (possibly memory-mapped) cases.

Conventions
-----------
- Images are ``(C, D, H, W)`` (or ``(C, H, W)`` for 2-D cases), labels ``(D, H, W)`` / ``(H, W)``.
- **2.5-D stacks** (`stack_context`, the one function training and inference both use): the stack for slice ``z`` with ``context=k`` holds slices ``z-k .. z+k`` of
  every channel, channel-major: output channel ``c * (2k + 1) + j`` is channel ``c`` of slice
  ``z + j - k`` (so the centre slice of channel ``c`` is at ``c * (2k + 1) + k``). Slices beyond
  the first / last one are **clamped** (the edge slice is replicated).
- **Patches**: a patch of size ``p`` centred on voxel ``c`` covers indices
  ``c - p // 2 .. c - p // 2 + p - 1`` on each axis, so the centre voxel is always inside the
  patch; whatever lies outside the array is filled with 0 (image and label alike).
- **Foreground oversampling** (as nnU-Net): of ``n`` patches, ``floor(n * f)`` plus one more with
  probability ``frac(n * f)`` contain a labelled voxel: first a foreground class (label
  value != 0) is drawn uniformly among the classes present, then one of its voxels uniformly;
  the patch is centred on it, then shifted as little as needed to stay inside the image where
  the image is large enough (the voxel always stays inside the patch). The others are drawn
  uniformly among the placements that keep the patch inside the image (an image smaller than
  the patch is placed uniformly inside the patch).
- Everything is driven by a :class:`numpy.random.Generator`, so a seed fixes every batch.
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch

from resunet.errors import ConfigError, InputError

__all__ = [
    "PatchSampler",
    "context_indices",
    "crop_patch",
    "foreground_locations",
    "sample_patch_centres",
    "slice_indices",
    "stack_context",
]

#: at most this many voxel positions are kept per class for foreground oversampling
MAX_LOCATIONS_PER_CLASS = 10_000


def slice_indices(
    depth: int, stride: int = 1, offset: int = 0, include_last: bool = False
) -> np.ndarray:
    """Centre slices ``offset, offset + stride, ...`` below ``depth`` (one stack every ``stride``
    slices; with ``stride < 2 * context + 1`` neighbouring stacks overlap). ``include_last``
    appends ``depth - 1`` when the stride skips it, so every slice is near a stack."""
    depth, stride, offset = int(depth), int(stride), int(offset)
    if depth < 1:
        raise InputError(f"depth must be >= 1, got {depth}")
    if stride < 1:
        raise ConfigError(f"slice stride must be >= 1, got {stride}")
    if not 0 <= offset < depth:
        raise ConfigError(f"slice offset must be in [0, {depth}), got {offset}")
    idx = np.arange(offset, depth, stride, dtype=np.intp)
    if include_last and idx[-1] != depth - 1:
        idx = np.append(idx, depth - 1)
    return idx


def context_indices(indices: np.ndarray, depth: int, context: int) -> np.ndarray:
    """``(N, 2k+1)`` slice numbers ``z-k .. z+k`` of each centre slice, clamped to ``0 .. depth-1``."""
    offsets = np.arange(-context, context + 1, dtype=np.int64)
    return np.clip(np.asarray(indices, dtype=np.int64)[:, None] + offsets[None, :], 0, depth - 1)


def stack_context(
    volume: torch.Tensor | np.ndarray,
    indices: Sequence[int] | torch.Tensor | np.ndarray,
    context: int,
) -> torch.Tensor | np.ndarray:
    """Gather 2.5-D model inputs: each slice with ``context`` neighbours on each side.

    Args:
        volume: ``(C, D, H, W)`` tensor or array.
        indices: ``N`` slice indices along ``D``.
        context: ``k >= 0``; neighbours beyond the volume are clamped (the first/last slice is
            repeated).

    Returns:
        ``(N, C * (2k + 1), H, W)``, same type (tensor/array) and dtype as ``volume``.
        Channel order: for each input channel ``c``, slices ``z-k, ..., z+k``; i.e. channel
        ``c * (2k + 1) + j`` holds channel ``c`` of slice ``clamp(z - k + j, 0, D - 1)``.
        With ``context=0`` this is the plain ``(N, C, H, W)`` slice batch.
    """
    if volume.ndim != 4:
        raise InputError(
            f"stack_context needs a (C, D, H, W) volume, got shape {tuple(volume.shape)}"
        )
    if isinstance(context, bool) or not isinstance(context, (int, np.integer)) or context < 0:
        raise ConfigError(f"context={context!r} must be a non-negative integer")
    depth = int(volume.shape[1])
    idx = np.asarray(
        indices.detach().cpu().numpy() if isinstance(indices, torch.Tensor) else indices,
        dtype=np.int64,
    ).reshape(-1)
    if idx.size and (idx.min() < 0 or idx.max() >= depth):
        raise InputError(f"slice indices {idx.tolist()} are outside 0..{depth - 1}")
    gather = context_indices(idx, depth, context)  # (N, 2k+1)
    n, width = gather.shape
    c, _, h, w = volume.shape
    if isinstance(volume, torch.Tensor):
        picked = volume[:, torch.from_numpy(gather.reshape(-1)).to(volume.device)]
        return picked.reshape(c, n, width, h, w).permute(1, 0, 2, 3, 4).reshape(n, c * width, h, w)
    picked = np.asarray(volume)[:, gather.reshape(-1)]
    return picked.reshape(c, n, width, h, w).transpose(1, 0, 2, 3, 4).reshape(n, c * width, h, w)


@torch.inference_mode()


def crop_patch(
    array: np.ndarray, centre: Sequence[int], patch_size: Sequence[int], fill: float = 0
) -> np.ndarray:
    """The patch of ``patch_size`` around ``centre`` over the LAST ``len(patch_size)`` axes of
    ``array`` (leading axes, e.g. channels, are kept whole); out-of-array parts are ``fill``.
    Reads only the overlapping region, so memory-mapped arrays stay cheap."""
    ps = tuple(int(p) for p in patch_size)
    n = len(ps)
    if array.ndim < n:
        raise InputError(f"array of shape {array.shape} has fewer than {n} axes")
    centre = [int(c) for c in centre]
    if len(centre) != n:
        raise InputError(f"centre {centre} needs {n} values")
    spatial = array.shape[-n:]
    src, dst = [], []
    empty = False
    for c, p, size in zip(centre, ps, spatial):
        lo = c - p // 2
        hi = lo + p
        s0, s1 = max(lo, 0), min(hi, size)
        if s1 <= s0:
            empty = True
            s0 = s1 = 0
        src.append(slice(s0, s1))
        dst.append(slice(s0 - lo, s0 - lo + (s1 - s0)))
    out = np.full((*array.shape[:-n], *ps), fill, dtype=array.dtype)
    if not empty:
        out[(Ellipsis, *dst)] = array[(Ellipsis, *src)]
    return out


def foreground_locations(
    label: np.ndarray,
    max_per_class: int = MAX_LOCATIONS_PER_CLASS,
    rng: np.random.Generator | int | None = 0,
) -> dict[int, np.ndarray]:
    """``{class value: (K, ndim) int array of voxel indices}`` for every non-zero label value,
    at most ``max_per_class`` positions each (a uniform random subset beyond that)."""
    rng = np.random.default_rng(rng)
    label = np.asarray(label)
    flat = label.reshape(-1)
    idx = np.flatnonzero(flat)
    out: dict[int, np.ndarray] = {}
    if idx.size == 0:
        return out
    values = flat[idx]
    order = np.argsort(values, kind="stable")
    values, idx = values[order], idx[order]
    classes, starts = np.unique(values, return_index=True)
    ends = np.append(starts[1:], values.size)
    for value, s, e in zip(classes, starts, ends):
        chosen = idx[s:e]
        if chosen.size > max_per_class:
            chosen = np.sort(rng.choice(chosen, size=max_per_class, replace=False))
        out[int(value)] = np.stack(np.unravel_index(chosen, label.shape), axis=1).astype(np.int32)
    return out


def _n_foreground(n: int, fraction: float, rng: np.random.Generator) -> int:
    if not 0.0 <= fraction <= 1.0:
        raise ConfigError(f"foreground_fraction must be in [0, 1], got {fraction}")
    expected = n * fraction
    whole = int(np.floor(expected))
    return min(n, whole + int(rng.random() < expected - whole))


def _uniform_centres(
    shape: Sequence[int], patch_size: Sequence[int], n: int, rng: np.random.Generator
) -> np.ndarray:
    shape = np.asarray(shape, dtype=np.int64)
    ps = np.asarray(patch_size, dtype=np.int64)
    lo = np.minimum(0, shape - ps)
    hi = np.maximum(0, shape - ps)
    starts = rng.integers(lo, hi + 1, size=(n, len(shape)))
    return (starts + ps // 2).astype(np.int64)


def _foreground_centre(
    locations: Mapping[int, np.ndarray], rng: np.random.Generator
) -> np.ndarray | None:
    classes = [k for k, v in locations.items() if len(v)]
    if not classes:
        return None
    cls = classes[int(rng.integers(len(classes)))]
    locs = locations[cls]
    return np.asarray(locs[int(rng.integers(len(locs)))], dtype=np.int64)


def sample_patch_centres(
    label: np.ndarray,
    patch_size: Sequence[int],
    n: int,
    foreground_fraction: float = 0.33,
    rng: np.random.Generator | int | None = None,
    class_locations: Mapping[int, np.ndarray] | None = None,
) -> np.ndarray:
    """``(n, ndim)`` patch centres for ``label`` (foreground oversampling, module docstring).

    ``class_locations`` (from :func:`foreground_locations`) avoids scanning ``label``; without
    foreground every centre is uniform. Foreground-centred patches come first in the result.
    """
    rng = np.random.default_rng(rng)
    shape = tuple(label.shape)
    if len(patch_size) != len(shape):
        raise InputError(f"patch size {tuple(patch_size)} does not fit a label of shape {shape}")
    n_fg = _n_foreground(int(n), float(foreground_fraction), rng)
    centres = _uniform_centres(shape, patch_size, int(n), rng)
    if n_fg:
        if class_locations is None:
            class_locations = foreground_locations(label, rng=rng)
        ps = np.asarray(patch_size, dtype=np.int64)
        lo = np.minimum(0, np.asarray(shape) - ps)
        hi = np.maximum(0, np.asarray(shape) - ps)
        for i in range(n_fg):
            voxel = _foreground_centre(class_locations, rng)
            if voxel is None:
                break
            # shift the patch as little as needed to stay inside the image (the voxel stays in)
            centres[i] = np.clip(voxel - ps // 2, lo, hi) + ps // 2
    return centres


class _SamplerCase:
    __slots__ = ("image", "label", "locations", "name")

    def __init__(self, image: np.ndarray, label: np.ndarray | None, locations: Any, name: str) -> None:
        self.image = image
        self.label = label
        self.locations = locations
        self.name = name

    @property
    def grid(self) -> np.ndarray:
        """The label, or for an unlabelled case a zero-memory stand-in of its spatial shape (the
        placements of a uniform patch depend on the shape only)."""
        if self.label is not None:
            return self.label
        return np.broadcast_to(np.zeros((), np.uint8), self.image.shape[1:])


class PatchSampler:
    """Seeded batches ``(B, C', *patch)`` images + ``(B, 1, *patch)`` labels from cases.

    ``cases``: objects with ``.image`` ``(C, D, H, W)`` / ``(C, H, W)`` and ``.label`` arrays
    (:class:`resunet.data.cache.CachedCase`, :class:`resunet.data.preprocess.PreprocessedCase`;
    memory-mapped arrays are read patch by patch) or ``(image, label)`` tuples. An optional
    ``.class_locations`` (dict from :func:`foreground_locations`) is used when present, else it is
    computed once per case on first use.

    ``patch_size`` of length 3: 3-D patches from 3-D cases. Length 2: 2-D patches - from 3-D cases
    one slice (with ``context`` neighbours on each side as extra channels, C' = C * (2k + 1),
    edge slices replicated) cropped / zero-padded in-plane to the patch size; 2-D cases are used
    directly (as a single slice, so context repeats it). Cases are drawn uniformly.

    Output: torch tensors (``float32`` images, ``int64`` labels) when ``as_tensor`` else numpy
    (``float32`` / ``int16``). Iterating yields batches forever.

    Unlabelled cases (``.label`` None, semi-supervised training): every case must be unlabelled
    and ``foreground_fraction`` 0 (there is no foreground to oversample), images must have their
    channel axis; patches are placed uniformly, with the same draws as a labelled sampler's
    uniform patches, and the labels of a batch are ``None``.
    """

    def __init__(
        self,
        cases: Sequence[Any],
        patch_size: Sequence[int],
        batch_size: int = 2,
        foreground_fraction: float = 0.33,
        context: int = 0,
        seed: int | None = 0,
        as_tensor: bool = True,
    ) -> None:
        self.patch_size = tuple(int(p) for p in patch_size)
        if len(self.patch_size) not in (2, 3) or min(self.patch_size) < 1:
            raise ConfigError(f"patch_size needs 2 or 3 positive values, got {patch_size}")
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        if context < 0:
            raise ConfigError(f"context must be >= 0, got {context}")
        if context and len(self.patch_size) == 3:
            raise ConfigError("2.5-D context only applies to 2-D patches (patch_size of length 2)")
        if not 0.0 <= foreground_fraction <= 1.0:
            raise ConfigError(f"foreground_fraction must be in [0, 1], got {foreground_fraction}")
        self.batch_size = int(batch_size)
        self.foreground_fraction = float(foreground_fraction)
        self.context = int(context)
        self.as_tensor = bool(as_tensor)
        self.rng = np.random.default_rng(seed)
        self.mode = "2d" if len(self.patch_size) == 2 else "3d"
        self._cases = [self._wrap(c, i) for i, c in enumerate(cases)]
        if not self._cases:
            raise InputError("PatchSampler needs at least one case")
        kinds = {c.label is not None for c in self._cases}
        if len(kinds) != 1:
            raise InputError("PatchSampler got labelled and unlabelled cases; give it one kind (two samplers)")
        self.labelled = kinds.pop()
        if not self.labelled and self.foreground_fraction > 0:
            raise ConfigError("unlabelled cases have no foreground to oversample; use foreground_fraction=0")
        channels = {c.image.shape[0] for c in self._cases}
        if len(channels) != 1:
            raise InputError(f"cases have different channel counts: {sorted(channels)}")
        #: image channels (modalities) of a case; a batch has ``in_channels``, modality-major
        self.modalities = channels.pop()
        self.in_channels = self.modalities * (2 * self.context + 1 if self.mode == "2d" else 1)

    def _wrap(self, case: Any, i: int) -> _SamplerCase:
        if isinstance(case, tuple):
            image, label = case
            locations, name = None, f"#{i}"
        else:
            image, label = case.image, case.label
            locations = getattr(case, "class_locations", None)
            name = str(getattr(case, "case_id", f"#{i}"))
        if label is None:
            return self._wrap_unlabelled(image, name)
        if image.ndim == label.ndim:  # no channel axis
            image = image[None]
        if image.shape[1:] != label.shape:
            raise InputError(
                f"case {name}: image shape {image.shape} does not fit label shape {label.shape}"
            )
        if self.mode == "3d" and label.ndim != 3:
            raise InputError(
                f"case {name} is 2-D (shape {label.shape}); 3-D patches need 3-D cases"
            )
        if self.mode == "2d" and label.ndim == 2:
            image, label = image[:, None], label[None]
            if locations is not None:
                locations = {
                    k: np.concatenate([np.zeros((len(v), 1), v.dtype), v], axis=1)
                    for k, v in locations.items()
                }
        return _SamplerCase(image, label, locations, name)

    def _wrap_unlabelled(self, image: np.ndarray, name: str) -> _SamplerCase:
        """An image-only case ``(C, D, H, W)`` / ``(C, H, W)`` (a 2-D case gets a slice axis in 2-D mode)."""
        spatial = image.ndim - 1
        if spatial not in (2, 3):
            raise InputError(f"unlabelled case {name}: image of shape {image.shape} must be (C, D, H, W) or (C, H, W)")
        if self.mode == "3d" and spatial != 3:
            raise InputError(f"case {name} is 2-D (shape {image.shape}); 3-D patches need 3-D cases")
        if self.mode == "2d" and spatial == 2:
            image = image[:, None]
        return _SamplerCase(image, None, None, name)

    def _locations(self, case: _SamplerCase) -> Mapping[int, np.ndarray]:
        if case.locations is None:
            case.locations = foreground_locations(np.asarray(case.label), rng=0)
        return case.locations

    def sample(self) -> tuple[Any, Any]:
        """One batch: ``(images (B, C', *patch), labels (B, 1, *patch))`` (labels None: unlabelled cases)."""
        b = self.batch_size
        n_fg = _n_foreground(b, self.foreground_fraction, self.rng)
        forced = np.zeros(b, dtype=bool)
        forced[self.rng.permutation(b)[:n_fg]] = True
        which = self.rng.integers(len(self._cases), size=b)
        ps = self.patch_size
        images = np.empty((b, self.in_channels, *ps), dtype=np.float32)
        labels = np.empty((b, 1, *ps), dtype=np.int16) if self.labelled else None
        for i in range(b):
            case = self._cases[int(which[i])]
            grid_patch = ps if self.mode == "3d" else (1, *ps)
            centre = sample_patch_centres(
                case.grid,
                grid_patch,
                1,
                foreground_fraction=1.0 if forced[i] else 0.0,
                rng=self.rng,
                class_locations=self._locations(case) if forced[i] else None,
            )[0]
            if self.mode == "3d":
                images[i] = crop_patch(case.image, centre, ps)
                if self.labelled:
                    labels[i, 0] = crop_patch(case.label, centre, ps)
            else:
                z = int(centre[0])
                zz = context_indices(np.array([z]), case.grid.shape[0], self.context)[0]
                # the in-plane patch of the 2k+1 slices (C, 2k+1, *ps), read by basic slicing, then
                # stacked by the one function inference uses too (so the channel order is the same)
                around = np.stack([crop_patch(case.image[:, int(zj)], centre[1:], ps) for zj in zz], axis=1)
                images[i] = stack_context(around, [self.context], self.context)[0]
                if self.labelled:
                    labels[i, 0] = crop_patch(case.label[z], centre[1:], ps)
        if not self.labelled:
            return (torch.from_numpy(images) if self.as_tensor else images), None
        if self.as_tensor:
            return torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64))
        return images, labels

    def reseed(self, *key: int) -> None:
        """Restart the placement stream from ``key`` (training passes ``(seed, epoch, rank)``, so an
        epoch's batches depend on nothing else and a resumed run sees the same ones)."""
        self.rng = np.random.default_rng([int(k) for k in key])

    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        while True:
            yield self.sample()

    def batches(self, n: int) -> Iterator[tuple[Any, Any]]:
        """``n`` batches."""
        for _ in range(int(n)):
            yield self.sample()
