"""`resunet_transformer`: ResUNet with a Transformer bottleneck (shapes, gradients, position codes,
checks, MACs, export parity, checkpoints, config wiring, a short training run)."""

from __future__ import annotations

import math

import pytest
import torch

from resunet.errors import ModelError
from resunet.model import ModelSpec, checkpoint_payload, load_model, save_checkpoint
from resunet.model.checkpoint import load_matching_weights
from resunet.nets import ResUNetTransformer, build_model, count_macs, count_parameters, model_config, model_options
from resunet.nets.hybrid import SelfAttention, TransformerBottleneck, sinusoidal_positions
from resunet.train.config import ModelConfig

LABELS = {"background": 0, "a": 1, "b": 2}


def hybrid(dims: int = 2, **settings) -> ResUNetTransformer:
    torch.manual_seed(0)
    kwargs = {"spatial_dims": dims, "in_channels": 2, "out_channels": 3, "base_channels": 4, "depth": 3, **settings}
    return build_model("resunet_transformer", **kwargs)


@pytest.mark.parametrize("dims, size", [(2, (32, 48)), (3, (16, 8, 24))])
def test_multichannel_in_multiclass_logits_out(dims, size):
    model = hybrid(dims)
    assert isinstance(model, ResUNetTransformer) and len(model.transformer.blocks) == 2
    out = model(torch.randn(2, 2, *size))
    assert out.shape == (2, 3, *size)
    assert out.min() < 0 or out.max() > 1  # logits


def test_gradient_reaches_encoder_transformer_and_decoder():
    model = hybrid(transformer_dim=8, transformer_heads=2)
    model(torch.randn(2, 2, 16, 16)).square().mean().backward()
    names = [n for n, _ in model.named_parameters()]
    for part in ("encoders.", "transformer.project_in", "transformer.blocks.1.attention.qkv",
                 "transformer.blocks.1.mlp", "transformer.norm", "transformer.project_out", "decoders.", "head."):
        assert any(n.startswith(part) for n in names), part
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    assert missing == []


def test_position_codes_known_values_and_the_same_at_every_grid_size():
    codes = sinusoidal_positions((2, 3), 10)  # 2 frequencies per axis (1 and 1e-2), 2 channels left over
    assert codes.shape == (6, 10)
    f = torch.tensor([1.0, 1e-2])
    row, col = 1, 2  # token 5 in row-major order
    expected = torch.cat([torch.sin(row * f), torch.cos(row * f), torch.sin(col * f), torch.cos(col * f),
                          torch.zeros(2)])
    assert torch.allclose(codes[5], expected, atol=1e-6)
    big = sinusoidal_positions((4, 5), 10).reshape(4, 5, 10)
    assert torch.allclose(big[:2, :3].reshape(6, 10), codes)
    cube = sinusoidal_positions((2, 3, 4), 12).reshape(2, 3, 4, 12)  # thirds: d, h, w; frequencies 1, 1e-2
    assert torch.allclose(cube[1, 2, 3, 8:10], torch.sin(3 * f)) and torch.allclose(cube[1, 2, 3, :2], torch.sin(f))
    assert len(torch.unique(cube.reshape(24, 12), dim=0)) == 24  # every position its own code
    with pytest.raises(ModelError, match="at least 6"):
        sinusoidal_positions((2, 2, 2), 5)


def test_tokens_are_positions_attention_is_global_and_the_code_breaks_the_symmetry(monkeypatch):
    torch.manual_seed(0)
    stage = TransformerBottleneck(8, layers=1, heads=2).eval()
    x = torch.randn(1, 8, 3, 4)
    def flip(t: torch.Tensor) -> torch.Tensor:  # moves tokens to other grid positions
        return t.flip(-1)

    with torch.no_grad():
        changed = x.clone()
        changed[0, 0, 0, 0] += 1.0  # one token changes (one channel: a shift of all is invisible to LayerNorm) ...
        far = (stage(changed) - stage(x))[..., 2, 3].abs().max()
        assert far > 1e-4  # ... and the farthest token sees it (global attention)
        assert not torch.allclose(stage(flip(x)), flip(stage(x)), atol=1e-4)  # positions matter
        monkeypatch.setattr("resunet.nets.hybrid.sinusoidal_positions", lambda grid, width, **_: torch.zeros(1, width))
        assert torch.allclose(stage(flip(x)), flip(stage(x)), atol=1e-5)  # without codes: permutation-equivariant


def test_two_input_sizes_and_the_divisor_check_of_the_others():
    model = hybrid().eval()
    with torch.no_grad():
        for size in ((16, 16), (24, 40)):
            assert model(torch.randn(1, 2, *size)).shape == (1, 3, *size)
    plain = build_model("resunet", in_channels=2, out_channels=3, base_channels=4, depth=3)
    x = torch.randn(1, 2, 18, 16)
    with pytest.raises(ModelError) as ours:
        model(x)
    with pytest.raises(ModelError) as theirs:
        plain(x)
    assert str(ours.value) == str(theirs.value) and "pad the input to (20, 16)" in str(ours.value)


def test_bad_settings_are_rejected_with_the_fix():
    with pytest.raises(ModelError, match=r"heads=3 does not divide the token width 16 .*base_channels.*\[1, 2, 4, 8, 16\]"):
        hybrid(transformer_heads=3)
    with pytest.raises(ModelError, match=r"transformer_heads=4 does not divide the token width 6 \(transformer_dim\)"):
        hybrid(transformer_dim=6)
    with pytest.raises(ModelError, match="transformer_layers must be at least 1"):
        hybrid(transformer_layers=0)
    with pytest.raises(ModelError, match="token width 4 is below 6"):
        hybrid(3, transformer_dim=4, transformer_heads=2)
    with pytest.raises(ModelError, match=r"'unet' has no setting transformer_heads; it takes none"):
        build_model("unet", transformer_heads=4)
    with pytest.raises(ModelError, match=r"no setting heads; it takes transformer_layers, transformer_heads"):
        build_model("resunet_transformer", heads=4)


def test_macs_count_linear_layers_and_attention_products():
    assert count_macs(torch.nn.Linear(5, 7), (2, 3, 5)) == 2 * 3 * 7 * 5
    attention = SelfAttention(8, heads=2)
    qkv_out = 10 * 8 * 24 + 10 * 8 * 8
    assert count_macs(attention, (1, 10, 8)) == qkv_out + 2 * 10 * 10 * 8
    # the hybrid costs the ResUNet's MACs plus, per layer, 12 N C^2 (projections, MLP) + 2 N^2 C (attention)
    size, c, layers = (32, 48), 16, 3
    n = (32 // 4) * (48 // 4)
    plain = build_model("resunet", in_channels=2, out_channels=3, base_channels=4, depth=3)
    extra = count_macs(hybrid(transformer_layers=layers), (1, 2, *size)) - count_macs(plain, (1, 2, *size))
    assert extra == layers * (12 * n * c * c + 2 * n * n * c)


def test_model_config_records_the_settings_and_the_cnn_weights_of_a_resunet_fit():
    model = hybrid(3, transformer_layers=1, transformer_heads=2, transformer_dim=8)
    cfg = model_config(model)
    assert cfg == {"name": "resunet_transformer", "spatial_dims": 3, "in_channels": 2, "out_channels": 3,
                   "base_channels": 4, "depth": 3, "transformer_layers": 1, "transformer_heads": 2, "transformer_dim": 8}
    rebuilt = build_model(cfg.pop("name"), **cfg)
    rebuilt.load_state_dict(model.state_dict())  # strict
    assert model_options("resunet") == () and "transformer_layers" not in model_config(build_model("resunet"))
    # a config without the transformer keys (as a default) builds the defaults
    assert model_config(build_model("resunet_transformer"))["transformer_heads"] == 4
    resunet = build_model("resunet", spatial_dims=3, in_channels=2, out_channels=3, base_channels=4, depth=3)
    report = load_matching_weights(model, resunet.state_dict())
    assert len(report.loaded) == len(resunet.state_dict())  # every ResUNet tensor has its place
    assert all(name.startswith("transformer.") for name, _ in report.skipped)


@pytest.mark.parametrize("dims, sizes", [(2, [(6, 10), (12, 8)]), (3, [(6, 4, 8), (4, 4, 2)])])
def test_onnx_and_torchscript_exports_match_pytorch_at_two_sizes(tmp_path, dims, sizes):
    from resunet.export.onnx import export_checked
    from resunet.export.torchscript import export_torchscript
    from resunet.model.onnx_file import OnnxNetwork

    model = hybrid(dims, depth=2, transformer_layers=1, transformer_dim=8, transformer_heads=2).eval()
    spec = ModelSpec.for_network(model, preprocess={"modality": "mr"}, labels=LABELS,
                                 inference={"mode": f"{dims}d", "context": 0, "patch_size": [8] * dims})
    assert export_checked(model, spec, tmp_path / "m.onnx") <= 1e-4
    onnx_net = OnnxNetwork(tmp_path / "m.onnx")
    export_torchscript(model, spec, tmp_path / "m.ts")
    traced = torch.jit.load(str(tmp_path / "m.ts"))
    for size in sizes:  # sizes never seen at export time: dynamic axes, codes computed from the grid
        x = torch.randn(2, 2, *size)
        with torch.no_grad():
            ref = model(x)
            assert (onnx_net(x) - ref).abs().max().item() <= 1e-4
            assert (traced(x) - ref).abs().max().item() <= 1e-4


def test_checkpoint_round_trip_through_the_model_spec(tmp_path):
    model = hybrid(transformer_layers=1, transformer_heads=8).eval()
    spec = ModelSpec.for_network(model, preprocess={"modality": "mr"}, labels=LABELS,
                                 inference={"mode": "2d", "context": 0, "patch_size": [32, 32]})
    assert type(spec.build_network()) is ResUNetTransformer and spec.build_network().transformer_heads == 8
    save_checkpoint(tmp_path / "m.pt", checkpoint_payload(spec, model.state_dict(), epoch=1))
    loaded = load_model(tmp_path / "m.pt")
    assert loaded.spec.model == spec.model and loaded.network.transformer_layers == 1
    x = torch.randn(1, 2, 32, 24)
    with torch.no_grad():
        assert torch.equal(loaded.network(x), model(x))
    payload = checkpoint_payload(spec, model.state_dict())
    payload["model"] = {**payload["model"], "transformer_heads": 3}
    save_checkpoint(tmp_path / "bad.pt", payload)
    with pytest.raises(ModelError, match=r"bad\.pt.*transformer_heads=3 does not divide"):
        load_model(tmp_path / "bad.pt")


def test_model_config_passes_only_the_settings_a_network_takes():
    cfg = ModelConfig(name="resunet_transformer", base_channels=8, depth=3, transformer_heads=2, transformer_dim=16)
    kwargs = cfg.build_kwargs()
    assert kwargs == {"base_channels": 8, "depth": 3, "transformer_layers": 2, "transformer_heads": 2,
                      "transformer_dim": 16}
    net = build_model(cfg.name, spatial_dims=2, in_channels=1, out_channels=2, **kwargs)
    assert net.transformer.width == 16
    assert ModelConfig(name="unet", transformer_heads=3).build_kwargs() == {"base_channels": 32, "depth": 5}
    # 2 layers of width 512 at base 32: 2 * (12 C^2 + 13 C) + 2 C (final norm) on top of the ResUNet
    c = 512
    extra = count_parameters(build_model("resunet_transformer", base_channels=32)) - count_parameters(
        build_model("resunet", base_channels=32))
    assert extra == 2 * (12 * c * c + 13 * c) + 2 * c
    assert math.isclose(count_parameters(build_model("resunet_transformer", base_channels=32)) / 1e6, 14.42,
                        abs_tol=0.01)


def test_a_short_fit_trains_and_predicts(tmp_path):
    from test_train import BOX, tiny_config
    from resunet.demo import prepare_dataset
    from resunet.infer.predictor import Predictor
    from resunet.train.config import config_from_dict
    from resunet.train.trainer import fit

    dataset = prepare_dataset(tmp_path / "mni", z_range=(70, 82), thickness=6, test_slabs=(), box=BOX)
    cfg = config_from_dict(tiny_config(dataset, tmp_path, **{
        "data.val_cases": ["mni_slab1"], "model.name": "resunet_transformer", "model.transformer_heads": 2,
        "stages": [{"patch_size": [32, 32], "batch_size": 2, "epochs": 1, "iterations_per_epoch": 2}]}))
    result = fit(cfg)
    predictor = Predictor.from_file(result.run_dir / "best.pt")
    assert isinstance(predictor.model, ResUNetTransformer) and predictor.model.transformer_heads == 2
    assert model_config(predictor.model)["transformer_layers"] == 2
