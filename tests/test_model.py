"""The model contract (`resunet.model`), the hardware rules (`resunet.hardware`) and the one Dice formula."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from resunet.errors import ConfigError, ModelError
from resunet.hardware import Autocast, amp_dtype, resolve_device
from resunet.metrics import dice, dice_from_counts
from resunet.model import ModelSpec, checkpoint_payload, load_model, save_checkpoint
from resunet.nets import build_model

PREPROCESS = {"modality": "mr", "normalization": "zscore", "target_spacing": [1.0, 1.0, 1.0], "reorient": True}
LABELS = {"background": 0, "a": 1, "b": 2}


def _spec_and_net(context: int = 1):
    torch.manual_seed(0)
    net = build_model("resunet", spatial_dims=2, in_channels=2 * (2 * context + 1), out_channels=3,
                      base_channels=4, depth=3).eval()
    spec = ModelSpec.for_network(net, preprocess=PREPROCESS, labels=LABELS, plan={"minutes": 3},
                                 inference={"mode": "2d", "context": context, "patch_size": [32, 32]})
    return spec, net


def test_spec_describes_the_network_and_round_trips():
    spec, net = _spec_and_net()
    assert (spec.spatial_dims, spec.in_channels, spec.out_channels, spec.divisor) == (2, 6, 3, 4)
    assert spec.num_input_channels == 2 and spec.label_values == [1, 2]
    data = spec.to_dict()
    assert data["format"] == "resunet-model-spec" and data["plan"] == {"minutes": 3}
    assert ModelSpec.from_dict(data, "x") == spec
    rebuilt = spec.build_network()
    assert type(rebuilt) is type(net) and rebuilt.in_channels == 6


def test_checkpoint_and_onnx_load_to_the_same_spec(tmp_path):
    from resunet.export.onnx import export_checked

    spec, net = _spec_and_net()
    path = tmp_path / "m.pt"
    save_checkpoint(path, checkpoint_payload(spec, net.state_dict(), epoch=4))
    loaded = load_model(path)
    assert loaded.record["epoch"] == 4 and not loaded.is_onnx
    assert loaded.spec.model_dump(exclude={"weights_sha256"}) == spec.model_dump(exclude={"weights_sha256"})
    assert loaded.spec.weights_sha256  # the checksum the checkpoint carries
    x = torch.randn(2, 6, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.network(x), net(x))
    assert export_checked(loaded.network, loaded.spec, tmp_path / "m.onnx") < 1e-4
    onnx = load_model(tmp_path / "m.onnx")
    assert onnx.is_onnx and onnx.spec == loaded.spec


def test_an_incomplete_spec_names_the_file_and_the_field(tmp_path):
    spec, net = _spec_and_net()
    payload = checkpoint_payload(spec, net.state_dict())
    payload["inference"] = {"mode": "4d", "context": 0, "patch_size": [32, 32]}
    save_checkpoint(tmp_path / "bad.pt", payload)
    with pytest.raises(ModelError, match=r"bad\.pt.*mode"):
        load_model(tmp_path / "bad.pt")
    with pytest.raises(ModelError, match="somewhere.onnx"):
        ModelSpec.from_dict({"model": {}}, "somewhere.onnx")


def test_bf16_backend_is_not_wrapped_in_autocast_twice(tmp_path):
    from resunet.infer.predictor import Predictor

    spec, net = _spec_and_net()
    save_checkpoint(tmp_path / "m.pt", checkpoint_payload(spec, net.state_dict()))
    predictor = Predictor.from_file(tmp_path / "m.pt", backend="bf16", amp=True)
    assert isinstance(predictor.net, Autocast) and predictor.amp is False
    assert Predictor.from_file(tmp_path / "m.pt", amp=True).amp is True  # eager + amp: autocast once


def test_device_rules():
    assert resolve_device("cpu") == torch.device("cpu")
    assert amp_dtype("cpu") is torch.bfloat16 and amp_dtype("cuda") is torch.float16 and amp_dtype("cpu", False) is None
    with pytest.raises(ConfigError, match="unknown device"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA GPU"):
            resolve_device("cuda")
        assert resolve_device("auto") == torch.device("cpu")


def test_dice_from_counts_on_numbers_arrays_and_tensors():
    assert dice_from_counts(3, 1, 1) == pytest.approx(0.75)
    assert dice_from_counts(0, 0, 0) == 1.0 and dice_from_counts(0, 2, 0) == 0.0
    got = dice_from_counts(np.array([3, 0, 0]), np.array([1, 0, 2]), np.array([1, 0, 0]))
    np.testing.assert_allclose(got, [0.75, 1.0, 0.0])
    t = dice_from_counts(torch.tensor([3.0, 0.0]), torch.tensor([1.0, 0.0]), torch.tensor([1.0, 0.0]))
    assert isinstance(t, torch.Tensor) and torch.allclose(t, torch.tensor([0.75, 1.0]))
    rng = np.random.default_rng(0)
    a, b = rng.random((20, 20)) > 0.5, rng.random((20, 20)) > 0.4
    tp = int((a & b).sum())
    assert dice(a, b) == pytest.approx(dice_from_counts(tp, int(a.sum()) - tp, int(b.sum()) - tp))
