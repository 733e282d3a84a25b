"""Multi-modal inputs: late fusion (one encoder branch per modality), modality dropout in training,
and predicting a case that lacks a modality (zero-filled for a dropout-trained model, refused otherwise)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from resunet.data.augment import AugmentConfig, augment_batch, modality_dropout
from resunet.data.io import read_volume
from resunet.data.sampling import stack_context
from resunet.errors import ConfigError, InputError, ModelError
from resunet.infer.predictor import Predictor
from resunet.infer.run import missing_record_path, predict_inputs
from resunet.model import ModelSpec, load_model, model_from_checkpoint
from resunet.model.checkpoint import load_checkpoint, save_checkpoint
from resunet.nets import build_model, model_config
from resunet.nets.fusion import LateFusionEncoder
from resunet.train.config import config_from_dict
from resunet.train.trainer import fit, make_model


def late(name="resunet", dims=2, modalities=2, context=0, base=4, depth=3, out=2):
    torch.manual_seed(0)
    return build_model(name, spatial_dims=dims, in_channels=modalities * (2 * context + 1), out_channels=out,
                       base_channels=base, depth=depth, modalities=modalities, modality_fusion="late")


# --------------------------------------------------------------------------- the network


@pytest.mark.parametrize("name, dims, context", [
    ("resunet", 2, 0), ("resunet", 2, 1), ("unet", 2, 2), ("attention_unet", 2, 1),
    ("resunet", 3, 0), ("unet", 3, 0), ("attention_unet", 3, 0), ("resunet_transformer", 2, 1),
])
def test_late_fusion_shapes_and_every_branch_gets_gradients(name, dims, context):
    model = late(name, dims, context=context, out=3)
    x = torch.randn(2, model.in_channels, *([16] * dims))
    y = model(x)
    assert y.shape == (2, 3, *([16] * dims))
    y.square().mean().backward()
    encoder = model.encoders
    assert isinstance(encoder, LateFusionEncoder) and len(encoder.branches) == 2
    assert encoder.group == 2 * context + 1
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []
    # the branches are split in width: level i of each of the 2 branches has base * 2**i / 2 channels
    feats = encoder.branch_features(x)
    assert [f.shape[1] for f in feats[0]] == [2, 4, 8]
    assert [f.shape[1] for f in encoder(x)] == [4, 8, 16]  # fused back to the shared widths


def test_early_fusion_is_unchanged_and_wrong_settings_are_refused():
    torch.manual_seed(0)
    old = build_model("resunet", spatial_dims=2, in_channels=6, out_channels=2, base_channels=4, depth=3)
    torch.manual_seed(0)
    early = build_model("resunet", spatial_dims=2, in_channels=6, out_channels=2, base_channels=4, depth=3,
                        modalities=2)
    assert list(old.state_dict()) == list(early.state_dict())  # same tensor names: old checkpoints load
    x = torch.randn(1, 6, 16, 16)
    assert torch.equal(old.eval()(x), early.eval()(x))
    with pytest.raises(ModelError, match="not a multiple of modalities 4"):
        build_model("unet", in_channels=6, modalities=4, modality_fusion="late")
    with pytest.raises(ModelError, match="early, late"):
        build_model("unet", in_channels=2, modalities=2, modality_fusion="middle")


def test_each_branch_sees_only_its_own_modality_in_stack_context_order():
    """2.5-D: the stack of ``stack_context`` is modality-major; branch m reads modality m's slices."""
    context = 1
    model = late(context=context).eval()
    volume = torch.randn(2, 5, 16, 16)  # (modalities, D, H, W)
    x = stack_context(volume, [0, 2, 4], context)  # (3, 6, 16, 16)
    for m in range(2):
        assert torch.equal(model.encoders.modality_input(x, m), stack_context(volume[m:m + 1], [0, 2, 4], context))
    with torch.no_grad():
        before = model.encoders.branch_features(x)
        y = x.clone()
        y[:, 3:] += torch.randn_like(y[:, 3:])  # perturb modality 1 (all its slices)
        after = model.encoders.branch_features(y)
        assert all(torch.equal(a, b) for a, b in zip(before[0], after[0]))  # branch 0: unchanged
        assert all(not torch.allclose(a, b) for a, b in zip(before[1], after[1]))  # branch 1 sees it
        assert not torch.allclose(model(x), model(y))  # and the fused output does too


def test_late_fusion_checkpoint_round_trip_and_old_checkpoints(tmp_path):
    model = late("attention_unet", dims=3).eval()
    cfg = model_config(model)
    assert cfg["modalities"] == 2 and cfg["modality_fusion"] == "late"
    payload = {"state_dict": model.state_dict(), "model": cfg, "preprocess": {"modality": "mr"},
               "labels": {"background": 0, "tumour": 1},
               "inference": {"mode": "3d", "context": 0, "patch_size": [16, 16, 16], "modality_dropout": 0.25,
                             "channel_names": ["T1c", "FLAIR"]}}
    save_checkpoint(tmp_path / "m.pt", payload)
    loaded = load_model(tmp_path / "m.pt")
    x = torch.randn(1, 2, 16, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded.network(x), model(x))
    assert isinstance(loaded.network.encoders, LateFusionEncoder)
    assert loaded.spec.accepts_missing_modality and loaded.spec.channel_name(1) == "FLAIR"
    # a checkpoint written before modalities / modality_fusion / modality_dropout existed
    early = build_model("resunet", spatial_dims=2, in_channels=2, out_channels=2, base_channels=4, depth=3)
    old_cfg = {k: v for k, v in model_config(early).items() if k not in ("modalities", "modality_fusion")}
    old = model_from_checkpoint({"state_dict": early.state_dict(), "model": old_cfg, "preprocess": {},
                                 "labels": {"background": 0, "a": 1},
                                 "inference": {"mode": "2d", "context": 0, "patch_size": [16, 16]}})
    assert old.network.modality_fusion == "early" and old.network.modalities == 1
    assert not old.spec.accepts_missing_modality and old.spec.channel_name(1) == "channel 1"


def test_late_fusion_onnx_export_matches_pytorch(tmp_path):
    from resunet.export.onnx import export_checked
    from resunet.model.onnx_file import OnnxNetwork

    model = late(context=1, depth=2).eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    spec = ModelSpec.for_network(model, preprocess={"modality": "mr"}, labels={"background": 0, "a": 1},
                                 inference={"mode": "2d", "context": 1, "patch_size": [32, 32]})
    assert export_checked(model, spec, tmp_path / "late.onnx") <= 1e-4
    onnx_net = OnnxNetwork(tmp_path / "late.onnx")
    y = torch.randn(3, 6, 24, 40)  # a batch and size unseen at export time
    with torch.no_grad():
        assert (onnx_net(y) - model(y)).abs().max().item() <= 1e-4
    assert onnx_net.spec.model["modality_fusion"] == "late"


# --------------------------------------------------------------------------- modality dropout


def test_modality_dropout_zeroes_whole_modalities_never_all():
    context, modalities = 1, 3
    group = 2 * context + 1
    image = torch.rand(64, modalities * group, 8, 8) + 0.5  # no zero anywhere
    out, dropped = modality_dropout(image, 1.0, modalities, torch.Generator().manual_seed(0))
    assert out.shape == image.shape and out.dtype == image.dtype
    assert dropped.any(dim=1).all() and not dropped.all(dim=1).any()  # p=1: every sample, never all
    assert set(dropped.sum(dim=1).tolist()) == {1, 2}  # 1 .. M-1 dropped
    per_channel = dropped.repeat_interleave(group, dim=1)  # (B, C): all slices of a modality together
    assert (out[per_channel] == 0).all()
    assert torch.equal(out[~per_channel], image[~per_channel])
    # p = 0.3: about 30 % of the samples lose something; the draws follow the generator's seed
    again = [modality_dropout(image, 0.3, modalities, torch.Generator().manual_seed(s))[1] for s in (5, 5, 6)]
    assert torch.equal(again[0], again[1]) and not torch.equal(again[0], again[2])
    assert 0.05 < again[0].any(dim=1).float().mean() < 0.6
    with pytest.raises(InputError, match="do not split into 2 modalities"):
        modality_dropout(torch.zeros(1, 3, 4, 4), 0.5, 2)


def test_modality_dropout_in_the_pipeline():
    gen = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    image = torch.rand(16, 4, 12, 12) + 0.5  # 2 modalities x 2 channels
    mask = torch.zeros(16, 1, 12, 12, dtype=torch.int64)
    # p = 0 (the default) draws nothing: the same batch as without modalities
    default = augment_batch(image, mask, AugmentConfig(), gen(), modalities=2)
    assert torch.equal(default[0], augment_batch(image, mask, AugmentConfig(), gen())[0])
    off = AugmentConfig.disabled()
    assert torch.equal(augment_batch(image, mask, off, gen(), modalities=2)[0], image)  # identity
    drop = off.model_copy(update={"modality_dropout": 1.0})
    out, out_mask = augment_batch(image, mask, drop, gen(), modalities=2)
    assert torch.equal(out_mask, mask)
    zero = (out == 0).flatten(2).all(dim=2)  # (B, C) channels all zero
    assert torch.equal(zero[:, 0], zero[:, 1]) and torch.equal(zero[:, 2], zero[:, 3])
    assert torch.equal(zero[:, 0], ~zero[:, 2])  # exactly one of the two modalities, every sample
    assert torch.equal(out, augment_batch(image, mask, drop, gen(), modalities=2)[0])  # seeded
    assert AugmentConfig.disabled().modality_dropout == 0.0


# --------------------------------------------------------------------------- training and prediction

NAMES = {"0": "T1", "1": "FLAIR"}


def write_case(folder: Path, case: str, seed: int, channels=(0, 1)) -> np.ndarray:
    """A (x, y, z) = (24, 24, 5) two-modality case: a square lesion, dark on T1, bright on FLAIR."""
    rng = np.random.default_rng(seed)
    label = np.zeros((24, 24, 5), np.uint8)
    x0, y0 = rng.integers(3, 12, size=2)
    label[x0:x0 + 8, y0:y0 + 8, :] = 1
    images = [100 - 40 * label + rng.normal(0, 5, label.shape), 100 + 60 * label + rng.normal(0, 5, label.shape)]
    folder.mkdir(parents=True, exist_ok=True)
    for c in channels:
        nib.save(nib.Nifti1Image(images[c].astype(np.float32), np.eye(4)), str(folder / f"{case}_{c:04d}.nii.gz"))
    return label


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A late-fusion 2.5-D model trained 2 iterations with modality dropout on a tiny nnU-Net dataset."""
    root = tmp_path_factory.mktemp("fusion")
    ds = root / "Dataset001_Two"
    for i in range(4):
        label = write_case(ds / "imagesTr", f"c{i}", i)
        (ds / "labelsTr").mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(label, np.eye(4)), str(ds / "labelsTr" / f"c{i}.nii.gz"))
    (ds / "dataset.json").write_text(json.dumps({"channel_names": NAMES, "labels": {"background": 0, "lesion": 1},
                                                 "numTraining": 4, "file_ending": ".nii.gz"}))
    config = config_from_dict({
        "data": {"dataset": str(ds), "cache_dir": str(root / "cache"), "val_cases": ["c3"],
                 "preprocess": {"modality": "mr"}, "mode": "2d", "context": 1},
        "model": {"name": "resunet", "base_channels": 4, "depth": 3, "fusion": "late"},
        "stages": [{"patch_size": [16, 16], "batch_size": 2, "epochs": 1, "iterations_per_epoch": 2}],
        "augment": {"modality_dropout": 0.5}, "device": "cpu", "seed": 1, "output_dir": str(root / "run"),
    })
    fit(config)
    return root / "run" / "best.pt"


def test_training_records_fusion_and_modality_dropout(trained):
    ckpt = load_checkpoint(trained)
    assert ckpt["model"]["modality_fusion"] == "late" and ckpt["model"]["modalities"] == 2
    assert ckpt["model"]["in_channels"] == 6  # 2 modalities x 3 slices
    assert ckpt["inference"]["modality_dropout"] == 0.5
    assert ckpt["inference"]["channel_names"] == ["T1", "FLAIR"]
    with pytest.raises(ConfigError, match="needs at least 2 modalities"):
        make_model(config_from_dict({**ckpt["train_config"], "model": {"fusion": "late"}}), 3, 2)


def test_predict_a_case_missing_a_modality(trained, tmp_path):
    inputs = tmp_path / "in"
    write_case(inputs, "full", 10)
    write_case(inputs, "part", 11, channels=(0,))
    write_case(inputs, "part_full", 11)  # the same case with its FLAIR, for comparison
    predictor = Predictor(load_model(trained))
    with pytest.warns(UserWarning, match=r"case part: part_0001\.nii\.gz \(FLAIR\) missing"):
        written, failed, _ = predict_inputs(predictor, inputs, tmp_path / "out")
    assert failed == {}
    masks = sorted(p.name for p in written if p.name.endswith(".nii.gz"))
    assert masks == ["full.nii.gz", "part.nii.gz", "part_full.nii.gz"]
    assert read_volume(tmp_path / "out" / "part.nii.gz").shape == (5, 24, 24)
    record = json.loads(missing_record_path(tmp_path / "out" / "part.nii.gz").read_text())
    assert record["case"] == "part" and record["filled_with"] == 0.0
    assert record["missing"] == [{"channel": 1, "name": "FLAIR", "file": "part_0001.nii.gz"}]
    assert not missing_record_path(tmp_path / "out" / "full.nii.gz").exists()
    # zero-filled AFTER normalisation: channel 0 is normalised as in the complete case, channel 1 is 0
    t1 = read_volume(inputs / "part_0000.nii.gz")
    prepared = predictor.prepare([t1], missing=[1])
    complete = predictor.prepare([t1, read_volume(inputs / "part_full_0001.nii.gz")])
    assert prepared.image.shape == complete.image.shape and prepared.properties["missing_channels"] == [1]
    assert np.array_equal(prepared.image[0], complete.image[0]) and not prepared.image[1].any()
    # the written mask is the prediction of that zero-filled case
    zero_filled = predictor.predict_prepared(prepared, t1).array
    assert np.array_equal(read_volume(tmp_path / "out" / "part.nii.gz").array, zero_filled)


def test_a_model_without_modality_dropout_refuses_a_missing_channel(trained, tmp_path):
    payload = load_checkpoint(trained)
    payload["inference"] = {**payload["inference"], "modality_dropout": 0.0}
    save_checkpoint(tmp_path / "no_dropout.pt", payload)
    predictor = Predictor.from_file(tmp_path / "no_dropout.pt")
    write_case(tmp_path / "in", "full", 10)
    write_case(tmp_path / "in", "part", 11, channels=(0,))
    with pytest.raises(InputError) as err:
        predict_inputs(predictor, tmp_path / "in", tmp_path / "out")
    message = str(err.value)
    for part in ("part_0001.nii.gz is missing", "needs 2 channels", "part_0000.nii.gz (T1)",
                 "part_0001.nii.gz (FLAIR)", "augment.modality_dropout"):
        assert part in message, message
    assert not (tmp_path / "out").exists()  # refused before any work
    # a single channel file of the case as -i: the same refusal
    with pytest.raises(InputError, match="part_0001.nii.gz is missing"):
        predict_inputs(predictor, tmp_path / "in" / "part_0000.nii.gz", tmp_path / "out")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ModelError, match="cannot predict without FLAIR"):
            predictor.prepare([read_volume(tmp_path / "in" / "part_0000.nii.gz")], missing=[1])
