import pytest
import torch

from resunet import ResunetError
from resunet.nets import (
    MODELS,
    ResidualBlock,
    SpatialAttention,
    build_model,
    count_macs,
    count_parameters,
    model_config,
)


@pytest.mark.parametrize(
    "name, base, expected_millions",
    [("resunet", 64, 32.4), ("resunet", 32, 8.1), ("unet", 32, 7.8)],
)
def test_parameter_counts_match_the_seed(name, base, expected_millions):
    n = count_parameters(build_model(name, base_channels=base))
    assert abs(n / 1e6 - expected_millions) / expected_millions < 0.03


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("dims, size", [(2, (32, 48)), (3, (16, 16, 32))])
def test_output_shape_is_logits_per_class(name, dims, size):
    model = build_model(name, spatial_dims=dims, in_channels=4, out_channels=3, base_channels=4, depth=4)
    out = model(torch.randn(2, 4, *size))
    assert out.shape == (2, 3, *size)
    # logits, not probabilities: no activation inside forward
    assert out.min() < 0 or out.max() > 1


@pytest.mark.parametrize("name", list(MODELS))
def test_gradient_reaches_every_parameter(name):
    torch.manual_seed(0)
    model = build_model(name, in_channels=2, out_channels=2, base_channels=4, depth=3)
    model(torch.randn(2, 2, 16, 16)).square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    assert not missing


def test_size_not_divisible_is_rejected_with_the_size_to_pad_to():
    model = build_model("resunet", base_channels=4)  # depth 5 -> divisor 16
    with pytest.raises(ResunetError, match=r"\(250, 256\).*16.*pad the input to \(256, 256\)"):
        model(torch.randn(1, 1, 250, 256))


def test_wrong_channels_and_rank_are_rejected():
    model = build_model("unet", base_channels=4, depth=3)
    with pytest.raises(ResunetError, match="1 input channel"):
        model(torch.randn(1, 3, 16, 16))
    with pytest.raises(ResunetError, match="4-D tensor"):
        model(torch.randn(1, 1, 16, 16, 16))


def test_unknown_model_lists_valid_names():
    with pytest.raises(ResunetError, match="resunet, unet, attention_unet"):
        build_model("segformer")


def test_model_config_rebuilds_the_same_architecture():
    model = build_model("attention_unet", spatial_dims=3, in_channels=2, out_channels=3, base_channels=8, depth=3)
    cfg = model_config(model)
    rebuilt = build_model(cfg.pop("name"), **cfg)
    rebuilt.load_state_dict(model.state_dict())  # strict: same tensors, same shapes


def test_residual_block_shortcut_identity_or_projection():
    same = ResidualBlock(2, 8, 8)
    assert isinstance(same.shortcut, torch.nn.Identity)
    proj = ResidualBlock(2, 4, 8)
    assert isinstance(proj.shortcut[0], torch.nn.Conv2d) and proj.shortcut[0].kernel_size == (1, 1)
    assert isinstance(proj.shortcut[1], torch.nn.BatchNorm2d)
    # ReLU after the sum: outputs are non-negative
    assert proj(torch.randn(2, 4, 8, 8)).min() >= 0


def test_residual_block_with_zero_body_is_relu_of_input():
    block = ResidualBlock(2, 4, 4).eval()
    torch.nn.init.zeros_(block.body[4].weight)  # last BN scale 0 -> body contributes 0
    x = torch.randn(1, 4, 6, 6)
    assert torch.equal(block(x), torch.relu(x))


def test_spatial_attention_uses_channel_mean_and_max():
    att = SpatialAttention(2)
    assert att.conv.in_channels == 2 and att.conv.kernel_size == (7, 7)
    with torch.no_grad():
        att.conv.weight.zero_()
        att.conv.weight[0, 1, 3, 3] = 1.0  # look only at the channel max, centre tap
        att.conv.bias.zero_()
    x = torch.randn(1, 3, 5, 5)
    expected = x * torch.sigmoid(x.amax(dim=1, keepdim=True))
    assert torch.allclose(att(x), expected, atol=1e-6)


def test_macs_of_a_single_conv_known_value():
    conv = torch.nn.Conv2d(3, 8, 3, padding=1)
    assert count_macs(conv, (1, 3, 10, 10)) == 10 * 10 * 8 * 3 * 9
