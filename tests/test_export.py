"""`resunet export` + the onnx backend: parity with PyTorch on real-sized inputs, self-describing files."""

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import onnx
import pytest
import torch

from resunet.data.io import read_volume
from resunet.errors import ModelError
from resunet.export.onnx import export_onnx
from resunet.model.onnx_file import METADATA_KEY, OnnxNetwork
from resunet.export.torchscript import EXTRA_FILE
from resunet.infer.predictor import Predictor
from resunet.nets import build_model, model_config
from resunet.model.checkpoint import save_checkpoint

LABELS = {"background": 0, "liver": 1, "lesion": 2}


def checkpoint(path: Path, dims: int, base: int) -> Path:
    torch.manual_seed(dims)
    model = build_model("resunet", spatial_dims=dims, in_channels=1, out_channels=3, base_channels=base, depth=4)
    with torch.no_grad():  # non-trivial BatchNorm statistics, so eval-mode folding is exercised
        for m in model.modules():
            if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    save_checkpoint(path, {
        "state_dict": model.state_dict(), "model": model_config(model),
        "preprocess": {"modality": "ct", "ct_window": "liver", "crop_to_nonzero": False},
        "labels": LABELS, "inference": {"mode": f"{dims}d", "context": 0, "patch_size": [32] * dims},
    })
    return path


def run_cli(*args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "resunet", *args], capture_output=True, text=True,
                          timeout=600, env=env)


@pytest.fixture(scope="module")
def exported_2d(tmp_path_factory):
    root = tmp_path_factory.mktemp("export2d")
    ckpt = checkpoint(root / "model.pt", dims=2, base=16)
    r = run_cli("export", "-m", str(ckpt), "-o", str(root / "model.onnx"))
    assert r.returncode == 0, r.stderr
    return ckpt, root / "model.onnx", r.stdout


def test_onnx_logits_match_pytorch_on_ct_sized_slices(exported_2d):
    ckpt, onnx_path, stdout = exported_2d
    assert "max |logit diff|" in stdout
    torch_net = Predictor.from_file(ckpt).model
    onnx_net = OnnxNetwork(onnx_path)
    x = torch.randn(3, 1, 512, 512, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = torch_net(x)
    got = onnx_net(x)
    assert got.shape == ref.shape == (3, 3, 512, 512)
    assert (got - ref).abs().max().item() <= 1e-4
    assert torch.equal(got.argmax(1), ref.argmax(1))
    # a batch size and a non-square size never seen at export time (dynamic axes)
    y = torch.randn(1, 1, 96, 320)
    with torch.no_grad():
        assert (onnx_net(y) - torch_net(y)).abs().max().item() <= 1e-4


def test_onnx_file_describes_itself(exported_2d):
    ckpt, onnx_path, _ = exported_2d
    proto = onnx.load(str(onnx_path))
    meta = {p.key: p.value for p in proto.metadata_props}
    spec = json.loads(meta[METADATA_KEY])
    assert spec["labels"] == LABELS
    assert spec["preprocess"]["ct_window"] == "liver"
    assert spec["inference"]["mode"] == "2d" and spec["divisor"] == 8
    assert not list(onnx_path.parent.glob("*.data"))  # one self-contained file
    predictor = Predictor.from_file(onnx_path)
    assert predictor.backend == "onnx" and predictor.labels == LABELS


def test_predict_with_onnx_gives_the_same_masks_as_pytorch(exported_2d, tmp_path):
    ckpt, onnx_path, _ = exported_2d
    rng = np.random.default_rng(0)
    ct = np.clip(rng.normal(60, 80, size=(512, 512, 3)), -1000, 2000).astype(np.int16)
    affine = np.diag([0.7, 0.7, 3.0, 1.0])
    nib.save(nib.Nifti1Image(ct, affine), str(tmp_path / "ct.nii.gz"))
    env = {**os.environ, "RESUNET_CACHE": str(tmp_path / "cache")}
    outs = {}
    for name, args in {"torch": ["-m", str(ckpt)], "onnx_file": ["-m", str(onnx_path)],
                       "onnx_backend": ["-m", str(ckpt), "--backend", "onnx"]}.items():
        r = run_cli("predict", *args, "-i", str(tmp_path / "ct.nii.gz"), "-o", str(tmp_path / name), env=env)
        assert r.returncode == 0, r.stderr
        outs[name] = nib.load(str(tmp_path / name / "ct.nii.gz"))
    ref = np.asarray(outs["torch"].dataobj)
    assert len(np.unique(ref)) > 1
    for name in ("onnx_file", "onnx_backend"):
        assert np.array_equal(np.asarray(outs[name].dataobj), ref), name
        assert np.array_equal(outs[name].affine, outs["torch"].affine)
    assert len(list((tmp_path / "cache" / "onnx").glob("*.onnx"))) == 1  # the checkpoint's export is cached


def test_3d_export_parity(tmp_path):
    ckpt = checkpoint(tmp_path / "m3.pt", dims=3, base=4)
    predictor = Predictor.from_file(ckpt)
    path = export_onnx(predictor.model, predictor.spec, tmp_path / "m3.onnx")
    x = torch.randn(2, 1, 48, 64, 80)
    with torch.no_grad():
        ref = predictor.model(x)
    got = OnnxNetwork(path)(x)
    assert (got - ref).abs().max().item() <= 1e-4 and torch.equal(got.argmax(1), ref.argmax(1))
    image = read_volume(_write_small_ct(tmp_path / "ct.nii.gz"))
    assert np.array_equal(Predictor.from_file(path).predict([image]).array, predictor.predict([image]).array)


def _write_small_ct(path: Path) -> Path:
    data = np.random.default_rng(3).normal(40, 150, size=(40, 36, 20)).astype(np.int16)
    nib.save(nib.Nifti1Image(data, np.diag([0.9, 0.9, 2.0, 1.0])), str(path))
    return path


def test_torchscript_export_runs_and_carries_the_spec(tmp_path):
    ckpt = checkpoint(tmp_path / "m.pt", dims=2, base=4)
    r = run_cli("export", "-m", str(ckpt), "-o", str(tmp_path / "m.ts"), "--format", "torchscript")
    assert r.returncode == 0, r.stderr
    extra = {EXTRA_FILE: ""}
    traced = torch.jit.load(str(tmp_path / "m.ts"), _extra_files=extra)
    assert json.loads(extra[EXTRA_FILE])["labels"] == LABELS
    net = Predictor.from_file(ckpt).model
    x = torch.randn(2, 1, 72, 136)
    with torch.no_grad():
        assert (traced(x) - net(x)).abs().max().item() <= 1e-5


def test_files_that_are_not_resunet_onnx_are_refused(tmp_path):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"this is not a protobuf")
    with pytest.raises(ModelError, match="junk.onnx is not a loadable ONNX model"):
        Predictor.from_file(junk)
    # a valid ONNX graph without resunet metadata
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["x"], ["y"])], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
    bare = tmp_path / "bare.onnx"
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]), str(bare))
    with pytest.raises(ModelError, match="without resunet metadata"):
        Predictor.from_file(bare)
    r = run_cli("predict", "-m", str(junk), "-i", str(tmp_path), "-o", str(tmp_path / "out"))
    assert r.returncode == 2 and "Traceback" not in r.stderr and "junk.onnx" in r.stderr
    assert not (tmp_path / "out").exists()


def test_export_that_disagrees_with_pytorch_leaves_no_file(tmp_path, monkeypatch, capsys):
    import resunet.export.onnx as onnx_module
    from resunet.cli import main

    ckpt = checkpoint(tmp_path / "m.pt", dims=2, base=4)

    def fake_export(model, spec, path):  # stands in for an exporter bug: a file that computes something else
        Path(path).write_bytes(b"onnx")
        return Path(path)

    class OffByOne:
        def __init__(self, source):
            self.net = Predictor.from_file(ckpt).model

        def __call__(self, x):
            with torch.no_grad():
                return self.net(x) + 1.0

    monkeypatch.setattr(onnx_module, "export_onnx", fake_export)
    monkeypatch.setattr(onnx_module, "OnnxNetwork", OffByOne)
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "-m", str(ckpt), "-o", str(tmp_path / "bad.onnx")])
    assert exit_info.value.code == 2
    assert "differs from PyTorch by 1.00e+00" in capsys.readouterr().err
    assert not (tmp_path / "bad.onnx").exists()
