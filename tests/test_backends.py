"""`--backend auto`: picks a backend whose masks equal fp32 eager, rejects one that does not, caches."""

import json
import os

import nibabel as nib
import numpy as np
import pytest
import torch

from resunet.data.io import read_volume
from resunet.errors import ConfigError
from resunet import hardware
from resunet.infer import backends
from resunet.infer.predictor import Predictor
from resunet.nets import build_model, model_config
from resunet.model.checkpoint import save_checkpoint


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RESUNET_CACHE", str(tmp_path / "cache"))


def checkpoint(path, base=8):
    torch.manual_seed(5)
    model = build_model("resunet", spatial_dims=2, in_channels=1, out_channels=3, base_channels=base, depth=4).eval()
    with torch.no_grad():  # centre the per-class logits so a random model predicts all three classes
        logits = model(torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(0)))
        model.head.bias -= logits.transpose(0, 1).flatten(1).median(dim=1).values
    save_checkpoint(path, {
        "state_dict": model.state_dict(), "model": model_config(model),
        "preprocess": {"modality": "ct", "ct_window": "abdomen", "crop_to_nonzero": False},
        "labels": {"background": 0, "a": 1, "b": 2}, "inference": {"mode": "2d", "context": 0, "patch_size": [64, 64]},
    })
    return path


def ct_file(path, shape=(512, 512, 4)):
    rng = np.random.default_rng(2)
    data = np.clip(rng.normal(50, 90, size=shape), -1000, 1500).astype(np.int16)
    nib.save(nib.Nifti1Image(data, np.diag([0.75, 0.75, 2.5, 1.0])), str(path))
    return read_volume(path)


def test_auto_backend_masks_equal_fp32_eager_on_ct_sized_slices(tmp_path):
    ckpt = checkpoint(tmp_path / "m.pt")
    image = ct_file(tmp_path / "ct.nii.gz")
    reference = Predictor.from_file(ckpt, backend="eager").predict([image]).array
    auto = Predictor.from_file(ckpt, backend="auto")
    mask = auto.predict([image]).array
    choice = auto.backend_choice
    assert choice is not None and auto.backend == choice.name and choice.name in choice.ms
    assert set(choice.ms) == set(backends.candidates(2, torch.device("cpu")))
    assert len(np.unique(reference)) == 3
    assert backends.mask_dice(torch.from_numpy(mask), torch.from_numpy(reference)) >= 0.999
    # the calibration batch is one forward pass of this case: on the CPU <= 2 x 256^2 pixels -> one 512^2 slice
    assert json.loads(next(iter(json.loads((tmp_path / "cache" / "backends.json").read_text()))))[2] == [1, 1, 512, 512]


def test_the_choice_is_cached_per_model_and_machine(tmp_path):
    ckpt = checkpoint(tmp_path / "m.pt", base=4)
    image = ct_file(tmp_path / "ct.nii.gz", shape=(64, 48, 3))
    first = Predictor.from_file(ckpt, backend="auto")
    first.predict([image])
    again = Predictor.from_file(ckpt, backend="auto")
    again.predict([image])
    assert not first.backend_choice.cached and again.backend_choice.cached
    assert again.backend == first.backend
    other = Predictor.from_file(checkpoint(tmp_path / "other.pt", base=8), backend="auto")
    other.predict([image])
    assert not other.backend_choice.cached  # another model's timings are not reused


def test_a_backend_whose_masks_differ_is_never_chosen(tmp_path, monkeypatch):
    ckpt = checkpoint(tmp_path / "m.pt", base=4)
    real = backends.make_network

    def fast_but_wrong(name, model, spec, device):
        if name == "channels_last":
            return lambda x: -model(x)  # instant and wrong
        return real(name, model, spec, device)

    monkeypatch.setattr(backends, "make_network", fast_but_wrong)
    model = Predictor.from_file(ckpt).model
    x = torch.randn(2, 1, 64, 64)
    choice, net = backends.choose_backend(model, Predictor.from_file(ckpt).spec, x, torch.device("cpu"),
                                          names=["eager", "channels_last"])
    assert choice.name == "eager" and "channels_last" in choice.rejected
    assert choice.dice["channels_last"] < 0.999 and net is model


def test_threads_and_bad_backend_names(tmp_path):
    assert 1 <= hardware.physical_cores() <= os.cpu_count()
    assert hardware.set_threads(1) == 1 and torch.get_num_threads() == 1
    hardware.set_threads()
    with pytest.raises(ConfigError, match="backend 'tensorrt8' is not available"):
        Predictor.from_file(checkpoint(tmp_path / "m.pt"), backend="tensorrt8")


@pytest.mark.skipif(backends.tensorrt_available(), reason="a TensorRT-capable GPU is present")
def test_tensorrt_without_a_gpu_is_refused_clearly(tmp_path):
    import subprocess
    import sys

    ckpt = checkpoint(tmp_path / "m.pt", base=4)
    ct_file(tmp_path / "ct.nii.gz", shape=(32, 32, 2))
    r = subprocess.run([sys.executable, "-m", "resunet", "predict", "-m", str(ckpt), "-i", str(tmp_path / "ct.nii.gz"),
                        "-o", str(tmp_path / "out"), "--backend", "tensorrt"], capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "tensorrt needs an NVIDIA GPU" in r.stderr and "--backend onnx or auto" in r.stderr
    assert not (tmp_path / "out").exists()


def test_resunet_bench_prints_the_speed_up_and_identical_masks(tmp_path):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "resunet", "bench", "--base", "4", "--size", "64", "--slices", "2",
                        "--repeats", "1", "--no-peers"], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    out = " ".join(r.stdout.split())
    assert "speed-up auto / eager:" in out and "calibration (ms per batch): eager" in out
    import re

    dice = [float(v) for v in re.findall(r"(?:organ|lesion) ([0-9.]+)", out)]
    assert len(dice) == 2 and min(dice) >= 0.999  # auto's masks match fp32 eager's (its own gate)
    assert not list(tmp_path.iterdir())  # no cache or model left in the working folder
