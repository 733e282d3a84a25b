"""Tests for resunet.infer.sliding_window: padding, windows, stitching, slices, flip TTA."""

from __future__ import annotations

import functools
import itertools

import numpy as np
import pytest
import torch
from torch import nn

from resunet.errors import ConfigError, InputError, ModelError, ResunetError
from resunet.infer.sliding_window import (
    crop_padding,
    flip_tta,
    gaussian_importance_map,
    pad_to_multiple,
    predict_slices,
    sliding_window_positions,
    sliding_window_predict,
    stack_context,
)

# --------------------------------------------------------------------------- helpers


def conv_net(ndim: int, cin: int = 2, cout: int = 3, width: int = 4, seed: int = 0) -> nn.Module:
    """Two 3x3(x3) convs with zero padding: receptive-field radius 2."""
    torch.manual_seed(seed)
    conv = nn.Conv2d if ndim == 2 else nn.Conv3d
    net = nn.Sequential(
        conv(cin, width, 3, padding=1), nn.ReLU(), conv(width, cout, 3, padding=1)
    )
    return net.eval()


def pointwise_net(ndim: int, cin: int = 2, cout: int = 3, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    conv = nn.Conv2d if ndim == 2 else nn.Conv3d
    return nn.Sequential(conv(cin, 5, 1), nn.Tanh(), conv(5, cout, 1)).eval()


class ConstantNet(nn.Module):
    def __init__(self, values: list[float]) -> None:
        super().__init__()
        self.values = torch.tensor(values)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (x.shape[0], len(self.values), *x.shape[2:])
        v = self.values.reshape(1, -1, *([1] * (x.ndim - 2)))
        return v.expand(shape).clone()


class Recorder(nn.Module):
    """Wraps a net; records input shapes and checks divisibility like a U-Net would."""

    def __init__(self, net: nn.Module | None = None, divisor: int = 1) -> None:
        super().__init__()
        self.net = net
        self.divisor = divisor
        self.shapes: list[tuple[int, ...]] = []
        self.inputs: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert all(s % self.divisor == 0 for s in x.shape[2:]), x.shape
        self.shapes.append(tuple(x.shape))
        self.inputs.append(x.clone())
        return x.clone() if self.net is None else self.net(x)


# --------------------------------------------------------------------------- padding


@pytest.mark.parametrize(
    "shape, divisor, min_size, spatial_ndim",
    [
        ((1, 2, 13, 17), 16, None, None),
        ((2, 1, 32, 31), (8, 4), None, None),
        ((1, 1, 5, 7, 9), 4, (8, 1, 12), None),
        ((3, 5, 6, 7), 2, None, 3),  # (C, D, H, W)
        ((1, 1, 16, 16), 16, None, None),  # nothing to pad
    ],
)
@pytest.mark.parametrize("mode", ["constant", "replicate", "reflect"])
def test_pad_crop_round_trip(shape, divisor, min_size, spatial_ndim, mode):
    x = torch.randn(shape)
    padded, spec = pad_to_multiple(
        x, divisor, mode=mode, value=-3.0, min_size=min_size, spatial_ndim=spatial_ndim
    )
    n = len(spec)
    divs = (divisor,) * n if isinstance(divisor, int) else divisor
    mins = (1,) * n if min_size is None else min_size
    for size, orig, d, m, (before, after) in zip(
        padded.shape[-n:], x.shape[-n:], divs, mins, spec
    ):
        assert size % d == 0 and size >= max(orig, m)
        assert size - orig < d or size == -(-m // d) * d  # the next multiple, not more
        assert 0 <= after - before <= 1  # symmetric-ish
    assert padded.shape[: x.ndim - n] == x.shape[: x.ndim - n]
    assert torch.equal(crop_padding(padded, spec), x)
    if mode == "constant" and padded.shape != x.shape:
        assert (padded == -3.0).sum() == padded.numel() - x.numel()
    if all(b == a == 0 for b, a in spec):
        assert padded is x


def test_pad_integer_tensor_and_crop_other_channels():
    x = torch.arange(2 * 5 * 7).reshape(1, 2, 5, 7)
    padded, spec = pad_to_multiple(x, 4, mode="replicate")
    assert padded.dtype == x.dtype and padded.shape == (1, 2, 8, 8)
    assert torch.equal(crop_padding(padded, spec), x)
    logits = torch.randn(1, 9, 8, 8)  # different channel count: only spatial axes are cropped
    assert crop_padding(logits, spec).shape == (1, 9, 5, 7)


def test_pad_errors():
    with pytest.raises(ConfigError):
        pad_to_multiple(torch.zeros(1, 1, 3, 3), 16, mode="reflect")  # pad longer than the axis
    with pytest.raises(ConfigError):
        pad_to_multiple(torch.zeros(1, 1, 3, 3), 4, mode="wrap")
    with pytest.raises(ConfigError):
        pad_to_multiple(torch.zeros(1, 1, 3, 3), (4, 4, 4), spatial_ndim=2)
    with pytest.raises(ConfigError):
        pad_to_multiple(torch.zeros(1, 1, 3, 3), 0)
    with pytest.raises(InputError):
        crop_padding(torch.zeros(1, 1, 3, 3), ((2, 2), (0, 0)))


# --------------------------------------------------------------------------- windows


@pytest.mark.parametrize(
    "image, patch, overlap",
    [
        ((100, 37), (32, 16), 0.5),
        ((64, 64), (32, 32), 0.5),
        ((32, 33), (32, 32), 0.5),
        ((17, 50, 9), (8, 16, 9), 0.25),
        ((97,), (10,), 0.0),
        ((40, 41), (8, 8), (0.0, 0.9)),
    ],
)
def test_positions_cover_and_flush(image, patch, overlap):
    starts = sliding_window_positions(image, patch, overlap)
    assert len(set(starts)) == len(starts)
    covered = np.zeros(image, dtype=int)
    for s in starts:
        covered[tuple(slice(a, a + p) for a, p in zip(s, patch))] += 1
        assert all(0 <= a <= i - p for a, i, p in zip(s, image, patch))
    assert covered.min() >= 1  # every voxel is covered
    ovs = (overlap,) * len(image) if isinstance(overlap, float) else overlap
    for axis, (i, p, o) in enumerate(zip(image, patch, ovs)):
        axis_starts = sorted({s[axis] for s in starts})
        assert axis_starts[0] == 0 and axis_starts[-1] == i - p  # last window flush
        steps = np.diff(axis_starts)
        assert np.all(steps <= max(1, round(p * (1 - o))) + 1)  # never larger than asked (+round)
        assert np.all(steps >= 1)


def test_positions_errors():
    with pytest.raises(InputError):
        sliding_window_positions((10, 10), (16, 8))
    with pytest.raises(ConfigError):
        sliding_window_positions((10, 10), (8, 8), overlap=1.0)
    with pytest.raises(ConfigError):
        sliding_window_positions((10, 10), (8, 8, 8))


@pytest.mark.parametrize("patch", [(16, 16), (15, 20), (8, 12, 9)])
def test_gaussian_map(patch):
    g = gaussian_importance_map(patch)
    assert g.shape == patch and g.dtype == torch.float32
    assert g.max().item() == 1.0 and g.min().item() > 0
    for axis in range(len(patch)):
        assert torch.equal(g, g.flip(axis))  # symmetric
    # sigma = patch / 8: one sigma from the centre the weight is exp(-1/2) along that axis
    p = 33
    line = gaussian_importance_map((p,))
    d = round(p / 8)
    assert line[16 + d].item() == pytest.approx(np.exp(-0.5 * (d / (p / 8)) ** 2))


def test_gaussian_map_floor_has_no_zeros():
    g = gaussian_importance_map((64, 64), sigma_scale=1 / 64, dtype=torch.float16)
    assert g.min().item() > 0 and g.max().item() == 1.0
    g = gaussian_importance_map((8, 8), floor=0.25)
    assert g.min().item() == 0.25


# --------------------------------------------------------------------------- sliding window


@pytest.mark.parametrize("ndim, size", [(2, (24, 32)), (3, (8, 12, 16))])
def test_single_window_equals_whole_forward(ndim, size):
    net = conv_net(ndim)
    x = torch.randn(2, 2, *size)
    with torch.inference_mode():
        expected = net(x)
    got = sliding_window_predict(x, net, size, overlap=0.5, batch_size=1)
    assert got.shape == expected.shape and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    whole = sliding_window_predict(x, net, None, divisor=4)  # one window, already a multiple
    torch.testing.assert_close(whole, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "ndim, size, patch", [(2, (37, 29), (16, 32)), (3, (11, 21, 18), (8, 8, 8))]
)
def test_pointwise_net_exact_everywhere(ndim, size, patch):
    net = pointwise_net(ndim)
    x = torch.randn(2, 2, *size)
    with torch.inference_mode():
        expected = net(x)
    got = sliding_window_predict(x, net, patch, overlap=0.5, batch_size=3)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_small_receptive_field_matches_whole_forward_away_from_window_borders():
    net = conv_net(2, cin=1, cout=2)
    size, patch, radius = (64, 80), (32, 32), 2
    x = torch.randn(1, 1, *size)
    with torch.inference_mode():
        expected = net(x)
    got = sliding_window_predict(x, net, patch, overlap=0.5, batch_size=4)
    plain = sliding_window_predict(x, net, patch, overlap=0.5, gaussian=False)

    # voxels within the receptive radius of a window edge that is not an image edge see zeros
    dirty = torch.zeros(size, dtype=torch.bool)
    for start in sliding_window_positions(size, patch, 0.5):
        for axis, (s, p, n) in enumerate(zip(start, patch, size)):
            band = [slice(a, a + q) for a, q in zip(start, patch)]
            if s > 0:
                band[axis] = slice(s, s + radius)
                dirty[tuple(band)] = True
            if s + p < n:
                band[axis] = slice(s + p - radius, s + p)
                dirty[tuple(band)] = True
    clean = ~dirty
    assert clean.sum() > 0.4 * clean.numel()
    torch.testing.assert_close(got[..., clean], expected[..., clean], atol=1e-5, rtol=0)
    # everywhere else Gaussian weighting keeps the border error small ...
    scale = expected.abs().max().item()
    err_gauss = (got - expected).abs().max().item()
    err_plain = (plain - expected).abs().max().item()
    assert err_gauss < 0.01 * scale
    # ... much smaller than a plain average of the windows
    assert err_gauss < 0.1 * err_plain


@pytest.mark.parametrize(
    "size, patch", [((37, 29), (16, 16)), ((9, 23, 15), (8, 8, 8)), ((5, 7), (16, 16))]
)
def test_constant_net_gives_seamless_constant_output(size, patch):
    values = [1.0, -2.0, 0.5]  # powers of two: the weighted average is exact
    got = sliding_window_predict(
        torch.randn(2, 1, *size), ConstantNet(values), patch, overlap=0.5, batch_size=5
    )
    assert got.shape == (2, 3, *size)
    for k, v in enumerate(values):
        assert torch.all(got[:, k] == v)
    got = sliding_window_predict(torch.randn(1, 1, *size), ConstantNet([0.3]), patch)
    torch.testing.assert_close(got, torch.full_like(got, 0.3), atol=1e-6, rtol=0)


def test_batches_are_bounded_and_outputs_checked():
    rec = Recorder(pointwise_net(2), divisor=8)
    x = torch.randn(3, 2, 40, 40)
    out = sliding_window_predict(x, rec, 16, overlap=0.5, batch_size=4, num_out_channels=3)
    n_windows = len(sliding_window_positions((40, 40), (16, 16), 0.5))
    assert sum(s[0] for s in rec.shapes) == 3 * n_windows
    assert all(s[0] <= 4 and s[2:] == (16, 16) for s in rec.shapes)
    assert out.shape == (3, 3, 40, 40)
    with pytest.raises(ModelError):
        sliding_window_predict(x, pointwise_net(2), 16, num_out_channels=2)
    with pytest.raises(ModelError):
        sliding_window_predict(x, lambda t: t[..., :-1], 16)
    with pytest.raises(ConfigError):
        sliding_window_predict(x, pointwise_net(2), 20, divisor=16)
    with pytest.raises(InputError):
        sliding_window_predict(x[0], pointwise_net(2), (16, 16))
    with pytest.raises(InputError):
        sliding_window_predict(x, pointwise_net(2), (16, 16, 16))
    with pytest.raises(ConfigError):
        sliding_window_predict(x, pointwise_net(2), 16, batch_size=0)
    with pytest.raises(ConfigError):
        sliding_window_predict(x, pointwise_net(2), 16, amp_dtype=torch.float64)
    assert issubclass(ModelError, ResunetError)


def test_options_amp_tuple_output_progress_and_cpu_accumulator():
    net = conv_net(3, cin=1, cout=2)
    x = torch.randn(1, 1, 12, 20, 20)
    ref = sliding_window_predict(x, net, (8, 16, 16))
    calls = []
    got = sliding_window_predict(
        x,
        lambda t: (net(t), None),  # deep-supervision style output: element 0 is used
        (8, 16, 16),
        device="cpu",
        accumulate_device="cpu",
        accumulate_dtype=torch.float64,
        progress=lambda done, total: calls.append((done, total)),
    )
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, ref.double(), atol=1e-5, rtol=0)
    assert calls and calls[-1][0] == calls[-1][1]
    amp = sliding_window_predict(x, net, (8, 16, 16), amp_dtype=torch.bfloat16)
    assert amp.dtype == torch.float32
    torch.testing.assert_close(amp, ref, atol=0.1, rtol=0.05)


def test_training_mode_warns():
    net = nn.Sequential(conv_net(2), nn.Dropout(0.1)).train()
    with pytest.warns(UserWarning, match="eval"):
        sliding_window_predict(torch.randn(1, 2, 16, 16), net, 16)


# --------------------------------------------------------------------------- slices


def test_stack_context_order_and_edges():
    depth = 5
    vol = torch.stack([torch.full((2, 3), float(z)) for z in range(depth)])  # (D, H, W)
    vol = torch.stack([vol, vol + 100])  # (C=2, D, H, W): channel 1 is slice + 100
    got = stack_context(vol, [0, 2, 4], context=1)
    assert got.shape == (3, 6, 2, 3)
    values = got[:, :, 0, 0].tolist()
    assert values[0] == [0, 0, 1, 100, 100, 101]  # first slice replicated
    assert values[1] == [1, 2, 3, 101, 102, 103]
    assert values[2] == [3, 4, 4, 103, 104, 104]  # last slice replicated
    as_numpy = stack_context(vol.numpy(), np.array([0, 2, 4]), 1)
    assert isinstance(as_numpy, np.ndarray) and np.array_equal(as_numpy, got.numpy())
    assert torch.equal(stack_context(vol, [3], 0), vol[:, 3][None])
    with pytest.raises(InputError):
        stack_context(vol, [5], 1)
    with pytest.raises(ConfigError):
        stack_context(vol, [0], -1)


def test_predict_slices_context_feeds_neighbours_and_pads_to_divisor():
    depth, h, w = 6, 10, 21
    vol = torch.randn(1, depth, h, w)
    rec = Recorder(divisor=16)  # returns its input: logits == the 2.5-D input channels
    out = predict_slices(vol, rec, batch_size=4, context=1, divisor=16)
    assert out.shape == (3, depth, h, w)
    assert all(s[2:] == (16, 32) and s[1] == 3 for s in rec.shapes)
    assert [s[0] for s in rec.shapes] == [4, 2]
    s0, s1 = vol[0, 0], vol[0, 1]
    torch.testing.assert_close(out[:, 0], torch.stack([s0, s0, s1]), atol=0, rtol=0)
    last = torch.stack([vol[0, -2], vol[0, -1], vol[0, -1]])
    torch.testing.assert_close(out[:, -1], last, atol=0, rtol=0)
    first_input = rec.inputs[0][0]  # padded in-plane with zeros around the slice
    assert first_input.abs().sum() == pytest.approx(torch.stack([s0, s0, s1]).abs().sum().item())


def test_predict_slices_matches_per_slice_forward_and_sliding_window():
    net = conv_net(2, cin=2, cout=3)
    vol = torch.randn(2, 5, 16, 24)
    with torch.inference_mode():
        expected = net(vol.transpose(0, 1)).transpose(0, 1)
    got = predict_slices(vol, net, batch_size=2, divisor=8)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)

    pw = pointwise_net(2, cin=6, cout=3)  # context=1 with C=2 -> 6 input channels
    vol = torch.randn(2, 7, 30, 45)
    with torch.inference_mode():
        direct = pw(stack_context(vol, range(7), 1)).transpose(0, 1)
    windowed = predict_slices(vol, pw, batch_size=3, context=1, divisor=16, patch_size=(16, 32))
    assert windowed.shape == (3, 7, 30, 45)
    torch.testing.assert_close(windowed, direct, atol=1e-5, rtol=0)
    with pytest.raises(InputError):
        predict_slices(vol[0], pw)
    with pytest.raises(ConfigError):
        predict_slices(vol, pw, divisor=16, patch_size=(24, 24))


# --------------------------------------------------------------------------- flip TTA


@pytest.mark.parametrize("ndim", [2, 3])
def test_flip_tta_is_mean_of_flipped_predictions(ndim):
    net = conv_net(ndim)
    x = torch.randn(2, 2, *([6] * ndim))
    axes = tuple(range(-ndim, 0))
    calls = []

    def predict(t):
        calls.append(t)
        return net(t)

    got = flip_tta(predict, x, axes)
    assert len(calls) == 2**ndim
    with torch.inference_mode():
        preds = []
        for r in range(ndim + 1):
            for combo in itertools.combinations(axes, r):
                if combo:
                    preds.append(net(x.flip(combo)).flip(combo))
                else:
                    preds.append(net(x))
        expected = torch.stack(preds).mean(0)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    # TTA actually changes something for an asymmetric net
    with torch.inference_mode():
        assert not torch.allclose(got, net(x), atol=1e-4)


def test_flip_tta_composes_with_sliding_window_and_slices():
    net = pointwise_net(2)
    x = torch.randn(1, 2, 20, 27)
    swp = functools.partial(sliding_window_predict, net=net, patch_size=(16, 16))
    tta = flip_tta(swp, x, (-2, -1))
    torch.testing.assert_close(tta, swp(x), atol=1e-5, rtol=0)  # pointwise: flip-equivariant
    per_window = sliding_window_predict(x, lambda w: flip_tta(net, w, (-2, -1)), (16, 16))
    torch.testing.assert_close(per_window, tta, atol=1e-5, rtol=0)
    vol = torch.randn(2, 4, 9, 11)
    slices = flip_tta(functools.partial(predict_slices, net=net, divisor=4), vol, (-2, -1))
    assert slices.shape == (3, 4, 9, 11)
    with pytest.raises(ConfigError):
        flip_tta(net, x, (-1, 3))
    with pytest.raises(ConfigError):
        flip_tta(net, x, (5,))
