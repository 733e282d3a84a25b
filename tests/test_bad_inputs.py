"""The bad-input matrix (issue "Reliability", item 1).

ONE table, `CASES`: every row writes one bad input under ``tmp_path`` and feeds it to one surface:

- ``cli``: ``resunet ...`` must exit with code 2 and print ONE ``error:`` message on stderr, without
  a traceback (in-process through `resunet.cli.main`, or as a real ``python -m resunet`` subprocess
  for the rows marked ``subprocess``: the exit-code / stderr path of the console script itself);
- ``api``: the Python call must raise a `ResunetError` subclass;
- ``dicom``: `read_volume` of a DICOM file / series folder (what ``predict`` and the DICOM node
  call) must raise a `ResunetError` subclass.

In every row the message must match the row's pattern (what is wrong and how to fix it) and name
the file, folder or option at fault, and the tree under ``tmp_path`` must hold no new file
afterwards (no partial output, no temporary file; empty folders are allowed).
"""

from __future__ import annotations

import gzip
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

import resunet.data.dicom  # noqa: F401  (imported now, not while the permission rows act as nobody)
from dicom_series import write_ct_series
from resunet import ResunetError
from resunet.cli import main as cli_main
from resunet.data.datasets import find_dataset, validate_dataset
from resunet.data.io import read_volume
from resunet.errors import ModelError
from resunet.model.onnx_file import OnnxNetwork
from resunet.infer.predictor import Predictor
from resunet.nets import build_model, model_config
from resunet.model.checkpoint import load_checkpoint, save_checkpoint
from resunet.train.config import load_config, parse_overrides
from test_predict import LABELS, make_checkpoint

SHAPE = (20, 16, 6)  # NIfTI (x, y, z)


# --------------------------------------------------------------------------- shared inputs


@dataclass
class Env:
    model: Path  # 2-D, one CT channel, labels background/organ/lesion
    model2: Path  # the same, but two image channels per case
    public: Path  # a folder an unprivileged user may enter (for the permission rows)


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> Env:
    root = tmp_path_factory.mktemp("models")
    model = make_checkpoint(root / "model.pt")
    torch.manual_seed(0)
    net = build_model("resunet", spatial_dims=2, in_channels=2, out_channels=3, base_channels=4, depth=3)
    model2 = root / "model2.pt"
    save_checkpoint(model2, {
        "state_dict": net.state_dict(), "model": model_config(net),
        "preprocess": {"modality": "ct", "ct_window": "abdomen", "crop_to_nonzero": False},
        "labels": LABELS, "inference": {"mode": "2d", "context": 0, "patch_size": [16, 16]},
    })
    public = Path(tempfile.mkdtemp(prefix="resunet-bad-inputs-", dir="/tmp"))
    public.chmod(0o711)
    yield Env(model, model2, public)
    shutil.rmtree(public, ignore_errors=True)


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    # backend choices / ONNX exports must not land in ~/.cache nor in the case folder
    monkeypatch.setenv("RESUNET_CACHE", str(tmp_path_factory.getbasetemp() / "resunet-cache"))


def nifti(path: Path, data: np.ndarray | None = None, affine: np.ndarray | None = None, seed: int = 0) -> Path:
    if data is None:
        data = np.random.default_rng(seed).normal(40, 200, size=SHAPE).astype(np.int16)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), str(path))
    return path


def predict_args(env: Env, image: Path, out: Path, *extra: str, model: Path | None = None) -> list[str]:
    return ["predict", "-m", str(model or env.model), "-i", str(image), "-o", str(out), "--backend", "eager", *extra]


def truncated(path: Path, keep: float = 0.5) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def nnunet_dataset(root: Path, labels: dict | None = None, channels: dict | None = None,
                   cases: tuple[str, ...] = ("a", "b")) -> Path:
    """A valid nnU-Net v2 dataset of small NIfTI cases; rows then break one thing in it."""
    labels = labels or {"background": 0, "organ": 1}
    channels = channels or {"0": "CT"}
    for case in cases:
        for ch in channels:
            nifti(root / "imagesTr" / f"{case}_{int(ch):04d}.nii.gz")
        label = np.zeros(SHAPE, np.uint8)
        label[4:10, 4:10, 1:4] = 1
        nifti(root / "labelsTr" / f"{case}.nii.gz", label)
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": channels, "labels": labels, "numTraining": len(cases), "file_ending": ".nii.gz"}))
    return root


def train_yaml(work: Path, dataset: Path, **changes: Any) -> Path:
    cfg: dict[str, Any] = {
        "data": {"dataset": str(dataset), "cache_dir": str(work / "cache"), "preprocess": {"modality": "ct"}},
        "model": {"base_channels": 4, "depth": 3},
        "stages": [{"patch_size": [16, 16], "batch_size": 2, "epochs": 1, "iterations_per_epoch": 1}],
        "device": "cpu",
        "output_dir": str(work / "run"),
    }
    cfg.update(changes)
    path = work / "train.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def series(folder: Path, depth: int = 5, **kwargs: Any):
    ct = np.random.default_rng(0).normal(40, 200, size=(depth, 16, 20)).astype(np.float32)
    return write_ct_series(folder, ct, spacing=(2.0, 0.8, 0.8), **kwargs)


class MarkerPayload:
    """Pickled, it calls ``Path.touch(marker)`` when unpickled: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def onnx_without_metadata(path: Path) -> Path:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["image"], ["logits"])], "plain",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 1, 16, 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 1, 16, 16])],
    )
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


@contextmanager
def unprivileged():
    """Act as user ``nobody``: root reads any file whatever its mode, so permission rows drop it."""
    if os.geteuid() != 0:
        yield
        return
    try:
        os.seteuid(65534)
    except OSError as err:  # no CAP_SETUID in this sandbox
        pytest.skip(f"cannot drop root privileges to provoke EACCES ({err})")
    try:
        yield
    finally:
        os.seteuid(0)


# --------------------------------------------------------------------------- the table


@dataclass
class Scenario:
    run: list[str] | Callable[[], Any]  # CLI arguments, or the API call
    names: str  # the file / folder / option the message must name
    unprivileged: bool = False


@dataclass(frozen=True)
class Bad:
    id: str
    surface: str  # "cli" | "api" | "dicom"
    build: Callable[[Path, Env], Scenario]  # writes the bad input under the case folder
    expect: str  # regular expression the message must match (what is wrong / the fix)
    subprocess: bool = False  # cli only: run `python -m resunet` for real


def reads(path: Path) -> Scenario:
    """`read_volume` of an already written bad file."""
    return Scenario(lambda: read_volume(path), path.name)


def _nifti_huge(work: Path, env: Env, suffix: str) -> Scenario:
    path = nifti(work / f"huge{suffix}", np.zeros((2, 2, 2), np.int16))
    img = nib.load(str(path))
    header = img.header.copy()
    header.set_data_shape((2000, 2000, 2000))  # 16 GB of int16 claimed, a few bytes stored
    raw = header.binaryblock + b"\0" * 4 + np.zeros(8, np.int16).tobytes()
    path.write_bytes(gzip.compress(raw) if suffix.endswith(".gz") else raw)
    return Scenario(lambda: read_volume(path), path.name)


def _mixed_pictures(work: Path) -> Scenario:
    """An images/masks dataset whose first picture is gray and second RGB (mixed channels)."""
    from PIL import Image

    for sub in ("images", "masks"):
        (work / "ds" / sub).mkdir(parents=True)
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(work / "ds" / "images" / "a.png")
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(work / "ds" / "images" / "b.png")
    for case in "ab":
        Image.fromarray(np.zeros((32, 32), np.uint8)).save(work / "ds" / "masks" / f"{case}.png")
    return Scenario(lambda: validate_dataset(find_dataset(work / "ds")), "images/b.png")


def _degenerate_affine(path: Path) -> Path:
    """Zero the sform's y row (qform off): no voxel spacing along y, no geometry."""
    raw = bytearray(path.read_bytes())
    header = nib.Nifti1Header.from_fileobj(__import__("io").BytesIO(bytes(raw)))
    header["qform_code"], header["sform_code"] = 0, 1
    header["srow_y"] = [0.0, 0.0, 0.0, 0.0]
    raw[: len(header.binaryblock)] = header.binaryblock
    path.write_bytes(bytes(raw))
    return path


def _gt_pred(work: Path, pred_shape=SHAPE, pred_name="c1.nii.gz") -> tuple[Path, Path]:
    gt, pred = work / "gt", work / "pred"
    label = np.zeros(SHAPE, np.uint8)
    label[4:10, 4:10, 1:4] = 1
    nifti(gt / "c1.nii.gz", label)
    nifti(pred / pred_name, np.zeros(pred_shape, np.uint8))
    return gt, pred


def _evaluate(work: Path, gt: Path, pred: Path, *extra: str) -> list[str]:
    return ["evaluate", "--pred", str(pred), "--gt", str(gt), "--out", str(work / "eval"), *extra]


def _dicom_without_pixels(work: Path, env: Env) -> Scenario:
    import pydicom

    s = series(work / "src", depth=2)
    ds = pydicom.dcmread(s.files[0])
    del ds.PixelData
    path = work / "nopixels.dcm"
    ds.save_as(path)
    shutil.rmtree(work / "src")
    return Scenario(lambda: read_volume(path), path.name)


def _dicom_duplicate(work: Path, env: Env) -> Scenario:
    import pydicom
    from pydicom.uid import generate_uid

    s = series(work / "ct")
    ds = pydicom.dcmread(s.files[2])
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.save_as(work / "ct" / "copy_of_slice_2.dcm")
    return Scenario(lambda: read_volume(work / "ct"), "copy_of_slice_2.dcm")


def _checkpoint_with(work: Path, env: Env, change: Callable[[dict], None], name: str = "model.pt",
                     raw: bool = False) -> Scenario:
    payload = load_checkpoint(env.model)
    change(payload)
    path = work / name
    if raw:  # bypass save_checkpoint (which would recompute the checksum)
        torch.save(payload, path)
    else:
        save_checkpoint(path, payload)
    return Scenario(lambda: Predictor.from_file(path), path.name)


def _corrupt_weights(payload: dict) -> None:
    name = next(iter(payload["state_dict"]))
    payload["state_dict"][name] = payload["state_dict"][name] + 1  # the stored digest no longer fits


def _pickle_checkpoint(work: Path, env: Env, via_torch: bool) -> Scenario:
    marker = work.parent / "EXECUTED"
    path = work / "model.pt"
    if via_torch:
        torch.save({"state_dict": MarkerPayload(marker)}, path)
    else:
        path.write_bytes(pickle.dumps(MarkerPayload(marker)))
    # the payload is live: a plain unpickler would create the marker (checked in a throwaway copy)
    probe = Path(tempfile.mkdtemp()) / "EXECUTED"
    pickle.loads(pickle.dumps(MarkerPayload(probe)))
    assert probe.exists()
    shutil.rmtree(probe.parent)
    return Scenario(predict_args(env, nifti(work / "ct.nii.gz"), work / "out", model=path), path.name)


def _unreadable_file(work: Path, env: Env) -> Scenario:
    folder = env.public / work.parent.name
    folder.mkdir()
    folder.chmod(0o711)
    path = nifti(folder / "ct.nii.gz")
    path.chmod(0)
    return Scenario(lambda: read_volume(path), str(path), unprivileged=True)


def _unreadable_folder(work: Path, env: Env) -> Scenario:
    folder = env.public / work.parent.name
    series(folder / "series")
    (folder / "series").chmod(0)
    folder.chmod(0o711)
    return Scenario(lambda: read_volume(folder / "series"), str(folder / "series"), unprivileged=True)


# A builder with several steps is written ``lambda w, e: (step, step, ..., Scenario(...))[-1]``: the
# steps run in order (writing the bad input under ``w``), the Scenario is what the row acts on.
CASES: list[Bad] = [
    # ---- NIfTI and other image files
    Bad("nifti-truncated", "cli", lambda w, e: Scenario(
        predict_args(e, truncated(nifti(w / "ct.nii.gz")), w / "out"), "ct.nii.gz"),
        r"corrupt or truncated.*re-copy", subprocess=True),
    Bad("nifti-corrupt-gzip", "api", lambda w, e: (
        (w / "ct.nii.gz").write_bytes(b"\x1f\x8b\x08\x00" + bytes(range(256)) * 4),
        Scenario(lambda: read_volume(w / "ct.nii.gz"), "ct.nii.gz"))[-1],
        r"cannot read NIfTI file .*corrupt or truncated"),
    Bad("nifti-huge-dims", "api", lambda w, e: _nifti_huge(w, e, ".nii"),
        r"shape \(2000, 2000, 2000\).*(only|holds) \d+ bytes"),
    Bad("nifti-gz-huge-dims", "api", lambda w, e: _nifti_huge(w, e, ".nii.gz"),
        r"shape \(2000, 2000, 2000\).*header is wrong"),
    Bad("zero-byte-nifti", "cli", lambda w, e: (
        (w / "ct.nii.gz").write_bytes(b""),
        Scenario(predict_args(e, w / "ct.nii.gz", w / "out"), "ct.nii.gz"))[-1],
        r"empty file \(0 bytes\)"),
    Bad("nifti-1d", "api", lambda w, e: reads(nifti(w / "line.nii.gz", np.arange(10, dtype=np.float32))),
        r"1-D .*not an image"),
    Bad("nifti-5d", "api", lambda w, e: reads(nifti(w / "5d.nii.gz", np.zeros((4, 4, 4, 2, 3), np.float32))),
        r"more than 4 dimensions"),
    Bad("nifti-degenerate-affine", "api", lambda w, e: reads(_degenerate_affine(nifti(w / "flat.nii"))),
        r"degenerate NIfTI affine.*fix the qform/sform"),
    Bad("nan-voxels", "cli", lambda w, e: Scenario(predict_args(e, nifti(
        w / "nan.nii.gz", np.where(np.arange(np.prod(SHAPE)).reshape(SHAPE) == 7, np.nan, 1.0).astype(np.float32)),
        w / "out"), "nan.nii.gz"), r"1 NaN/Inf voxel.*nan_to_num"),
    Bad("inf-voxels", "api", lambda w, e: (lambda path: Scenario(
        lambda: Predictor.from_file(e.model, backend="eager").predict([read_volume(path)]), path.name))(
        nifti(w / "inf.nii.gz", np.full(SHAPE, np.inf, np.float32))),
        r"NaN/Inf voxel"),
    Bad("png-is-text", "api", lambda w, e: (
        (w / "photo.png").write_text("this is not a picture\n"),
        Scenario(lambda: read_volume(w / "photo.png"), "photo.png"))[-1],
        r"cannot read image .*not really a PNG"),
    Bad("png-truncated", "cli", lambda w, e: (
        __import__("PIL.Image").Image.fromarray(
            np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)).save(w / "slice.png"),
        Scenario(predict_args(e, truncated(w / "slice.png", 0.6), w / "out"), "slice.png"))[-1],
        r"truncated"),
    Bad("unknown-extension", "api", lambda w, e: (
        (w / "scan.xyz").write_bytes(b"1234"),
        Scenario(lambda: read_volume(w / "scan.xyz"), "scan.xyz"))[-1],
        r"unsupported file type '\.xyz'; supported: NIfTI"),
    Bad("npy-with-pickled-objects", "api", lambda w, e: (
        np.save(w / "arr.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True),
        Scenario(lambda: read_volume(w / "arr.npy"), "arr.npy"))[-1],
        r"pickle are refused"),
    Bad("unreadable-file", "api", _unreadable_file, r"permission denied.*chmod"),
    Bad("unreadable-folder", "dicom", _unreadable_folder, r"permission denied.*chmod"),
    Bad("input-missing", "cli", lambda w, e: Scenario(
        predict_args(e, w / "nowhere.nii.gz", w / "out"), "nowhere.nii.gz"),
        r"does not exist; pass an image file, a DICOM series folder or a folder of cases"),
    # ---- datasets (training input)
    Bad("dataset-mixed-gray-and-rgb-pictures", "api", lambda w, e: _mixed_pictures(w),
        r"hold 3 channel\(s\) but the dataset has 1"),
    Bad("label-values-out-of-range", "api", lambda w, e: (
        nnunet_dataset(w / "ds"),
        nifti(w / "ds" / "labelsTr" / "b.nii.gz", np.full(SHAPE, 3, np.uint8)),
        Scenario(lambda: validate_dataset(find_dataset(w / "ds")), "labelsTr/b.nii.gz"))[-1],
        r"holds values \[3\] that are not in the dataset labels.*add them to dataset.json"),
    Bad("label-not-integer", "api", lambda w, e: (
        nnunet_dataset(w / "ds"),
        nifti(w / "ds" / "labelsTr" / "a.nii.gz", np.full(SHAPE, 0.5, np.float32)),
        Scenario(lambda: validate_dataset(find_dataset(w / "ds")), "a.nii.gz"))[-1],
        r"non-integer values"),
    Bad("image-label-geometry-mismatch", "api", lambda w, e: (
        nnunet_dataset(w / "ds"),
        nifti(w / "ds" / "labelsTr" / "a.nii.gz", np.zeros(SHAPE, np.uint8), affine=np.diag([2.0, 2.0, 2.0, 1.0])),
        Scenario(lambda: validate_dataset(find_dataset(w / "ds")), "labelsTr/a.nii.gz"))[-1],
        r"does not match .*resample or fix the header"),
    Bad("dataset-inconsistent-channels", "api", lambda w, e: (
        nnunet_dataset(w / "ds"),
        nifti(w / "ds" / "imagesTr" / "b_0001.nii.gz"),
        Scenario(lambda: validate_dataset(find_dataset(w / "ds")), "b_0001.nii.gz"))[-1],
        r"channel 1 but dataset.json channel_names has only 1"),
    Bad("dataset-image-without-label", "api", lambda w, e: (
        nnunet_dataset(w / "ds"), (w / "ds" / "labelsTr" / "b.nii.gz").unlink(),
        Scenario(lambda: validate_dataset(find_dataset(w / "ds")), "labelsTr/b.nii.gz"))[-1],
        r"image without label"),
    Bad("dataset-without-dataset-json", "api", lambda w, e: (
        nnunet_dataset(w / "ds"), (w / "ds" / "dataset.json").unlink(),
        Scenario(lambda: find_dataset(w / "ds"), str(w / "ds")))[-1],
        r"no dataset.json; write one"),
    Bad("dataset-wrong-layout", "api", lambda w, e: (
        nifti(w / "ds" / "scans" / "a.nii.gz"),
        Scenario(lambda: find_dataset(w / "ds"), str(w / "ds")))[-1],
        r"is not a dataset folder: expected dataset.json"),
    Bad("dataset-json-invalid", "api", lambda w, e: (
        nnunet_dataset(w / "ds"), (w / "ds" / "dataset.json").write_text('{"labels": {'),
        Scenario(lambda: find_dataset(w / "ds"), "dataset.json"))[-1],
        r"not valid JSON.*fix the file"),
    Bad("train-dataset-bad-labels", "cli", lambda w, e: (
        nnunet_dataset(w / "ds"),
        nifti(w / "ds" / "labelsTr" / "a.nii.gz", np.full(SHAPE, 7, np.uint8)),
        Scenario(["train", "--config", str(train_yaml(w, w / "ds"))], "labelsTr/a.nii.gz"))[-1],
        r"holds values \[7\]"),
    # ---- training configuration
    Bad("yaml-unknown-key", "cli", lambda w, e: Scenario(
        ["train", "--config", str(train_yaml(w, w, optimiser={"lr": 0.1}))], "train.yaml"),
        r"optimiser: unknown key \(check the spelling"),
    Bad("yaml-wrong-type", "cli", lambda w, e: Scenario(["train", "--config", str(train_yaml(
        w, w, stages=[{"patch_size": [16, 16], "batch_size": "many", "epochs": 1}]))], "train.yaml"),
        r"stages\.0\.batch_size: .*'many'"),
    Bad("yaml-invalid-syntax", "cli", lambda w, e: (
        (w / "train.yaml").write_text("data: [unclosed\n"),
        Scenario(["train", "--config", str(w / "train.yaml")], "train.yaml"))[-1],
        r"is not valid YAML", subprocess=True),
    Bad("yaml-missing-file", "api", lambda w, e: Scenario(lambda: load_config(w / "nope.yaml"), "nope.yaml"),
        r"config file .* does not exist; check the --config path"),
    Bad("config-missing-dataset", "cli", lambda w, e: Scenario(
        ["train", "--config", str(train_yaml(w, w / "no_such_dataset"))], "no_such_dataset"),
        r"dataset folder .* does not exist or is not a folder; check the path \(training config: data.dataset\)"),
    Bad("override-without-equals", "api", lambda w, e: Scenario(
        lambda: parse_overrides(["stages.0.epochs"]), "stages.0.epochs"), r"must look like key.subkey=value"),
    Bad("resume-folder-without-run", "cli", lambda w, e: (
        (w / "run").mkdir(),
        Scenario(["train", "--resume", str(w / "run")], str(w / "run")))[-1],
        r"no run to resume"),
    # ---- checkpoints
    Bad("checkpoint-of-another-model", "api", lambda w, e: _checkpoint_with(
        w, e, lambda p: p["model"].update(base_channels=8)), r"weights do not fit"),
    Bad("checkpoint-truncated", "api", lambda w, e: (
        shutil.copy(e.model, w / "model.pt"), truncated(w / "model.pt"),
        Scenario(lambda: Predictor.from_file(w / "model.pt"), "model.pt"))[-1],
        r"not a readable resunet checkpoint.*truncated"),
    Bad("checkpoint-bad-checksum", "api", lambda w, e: _checkpoint_with(w, e, _corrupt_weights, raw=True),
        r"failed its checksum.*another copy"),
    Bad("checkpoint-plain-state-dict", "api", lambda w, e: (
        torch.save(load_checkpoint(e.model)["state_dict"], w / "weights.pt"),
        Scenario(lambda: Predictor.from_file(w / "weights.pt"), "weights.pt"))[-1],
        r"not a resunet checkpoint"),
    Bad("checkpoint-from-the-future", "api", lambda w, e: _checkpoint_with(
        w, e, lambda p: p.update(version=99), raw=True), r"newer resunet.*upgrade"),
    Bad("checkpoint-pickle-payload", "cli", lambda w, e: _pickle_checkpoint(w, e, via_torch=False),
        r"pickled objects other than tensors .*refuses without running them", subprocess=True),
    Bad("checkpoint-torch-save-payload", "api", lambda w, e: (lambda s: Scenario(
        lambda: Predictor.from_file(s.run[2]), "model.pt"))(_pickle_checkpoint(w, e, via_torch=True)),
        r"pickled objects other than tensors .*refuses without running them"),
    Bad("checkpoint-missing", "cli", lambda w, e: Scenario(
        predict_args(e, nifti(w / "ct.nii.gz"), w / "out", model=w / "best.pt"), "best.pt"),
        r"does not exist; pass the final.pt, best.pt"),
    # ---- ONNX
    Bad("onnx-not-onnx", "cli", lambda w, e: (
        (w / "model.onnx").write_text("not a protobuf"),
        Scenario(predict_args(e, nifti(w / "ct.nii.gz"), w / "out", model=w / "model.onnx"), "model.onnx"))[-1],
        r"not a loadable ONNX model.*resunet export"),
    Bad("onnx-without-metadata", "api", lambda w, e: (lambda path: Scenario(lambda: OnnxNetwork(path), path.name))(
        onnx_without_metadata(w / "plain.onnx")),
        r"without resunet metadata.*export it with `resunet export`"),
    # ---- DICOM
    Bad("dicom-without-pixel-data", "dicom", _dicom_without_pixels, r"without an image \(CT without PixelData\)"),
    Bad("dicom-missing-slice", "cli", lambda w, e: (
        (lambda s: s.files[2].unlink())(series(w / "ct", depth=6)),
        Scenario(predict_args(e, w / "ct", w / "out"), "ct"))[-1],
        r"a slice is probably missing", subprocess=True),
    Bad("dicom-duplicate-positions", "dicom", _dicom_duplicate, r"share a position"),
    Bad("dicom-two-series", "dicom", lambda w, e: (
        series(w / "mixed", series_description="first"), series(w / "mixed", series_description="second", seed=1),
        Scenario(lambda: read_volume(w / "mixed"), "mixed"))[-1],
        r"holds 2 image series.*own folder"),
    Bad("dicom-not-dicom", "dicom", lambda w, e: (
        (w / "image.dcm").write_text("just text"),
        Scenario(lambda: read_volume(w / "image.dcm"), "image.dcm"))[-1],
        r"is not a DICOM file"),
    Bad("dicom-truncated-slice", "dicom", lambda w, e: (lambda s: (
        truncated(s.files[1], 0.7), Scenario(lambda: read_volume(w / "ct"), s.files[1].name))[-1])(series(w / "ct")),
        r"cannot decode the pixel data|truncated"),
    Bad("dicom-empty-folder", "dicom", lambda w, e: (
        (w / "empty").mkdir(),
        Scenario(lambda: read_volume(w / "empty"), "empty"))[-1],
        r"is empty; point to the folder"),
    # ---- predict
    Bad("two-channel-model-one-image", "cli", lambda w, e: Scenario(
        predict_args(e, nifti(w / "ct.nii.gz"), w / "out", model=e.model2), "ct.nii.gz"),
        r"needs 2 channels; name the files CASE_0000"),
    Bad("folder-with-inconsistent-channels", "cli", lambda w, e: (
        nifti(w / "in" / "a_0000.nii.gz"), nifti(w / "in" / "a_0001.nii.gz"), nifti(w / "in" / "b_0000.nii.gz"),
        Scenario(predict_args(e, w / "in", w / "out", model=e.model2), "b: b_0001.nii.gz is missing"))[-1],
        r"do not fit the model.*needs 2 channels.*augment\.modality_dropout"),
    Bad("predict-output-under-a-file", "cli", lambda w, e: (
        (w / "taken").write_text("a file, not a folder"),
        Scenario(predict_args(e, nifti(w / "ct.nii.gz"), w / "taken" / "out"), "taken"))[-1],
        r"cannot (create|write).*not a folder"),
    # ---- CLI numbers and options
    Bad("batch-size-0", "cli", lambda w, e: Scenario(
        predict_args(e, nifti(w / "ct.nii.gz"), w / "out", "--batch-size", "0"), "--batch-size"),
        r"--batch-size must be >= 1, got 0"),
    Bad("min-size-negative", "cli", lambda w, e: Scenario(
        predict_args(e, nifti(w / "ct.nii.gz"), w / "out", "--min-size", "-5"), "--min-size"),
        r"--min-size must be >= 0"),
    Bad("minutes-0", "cli", lambda w, e: Scenario(["demo", "--out", str(w / "demo"), "--minutes", "0"], "--minutes"),
        r"--minutes must be positive"),
    Bad("tolerance-negative", "cli", lambda w, e: (lambda gp: Scenario(
        _evaluate(w, *gp, "--tolerance", "-1"), "--tolerance"))(_gt_pred(w)), r"--tolerance must be >= 0 mm"),
    Bad("device-cuda-without-gpu", "cli", lambda w, e: Scenario(
        predict_args(e, nifti(w / "ct.nii.gz"), w / "out", "--device", "cuda"), "--device"),
        r"no CUDA GPU is available; use --device cpu"),
    Bad("backend-unknown", "cli", lambda w, e: Scenario(
        predict_args(e, nifti(w / "ct.nii.gz"), w / "out", "--backend", "tpu"), "tpu"),
        r"backend 'tpu' is not available; choose one of"),
    # ---- evaluate
    Bad("evaluate-missing-folder", "cli", lambda w, e: (lambda gp: Scenario(
        _evaluate(w, w / "no_gt", gp[1]), "no_gt"))(_gt_pred(w)), r"is not a folder of label files; pass the folder holding them"),
    Bad("evaluate-shape-mismatch", "cli", lambda w, e: (lambda gp: Scenario(
        _evaluate(w, *gp), "c1.nii.gz"))(_gt_pred(w, pred_shape=(10, 16, 6))), r"no case could be evaluated.*shape"),
    Bad("evaluate-no-common-case", "cli", lambda w, e: (lambda gp: Scenario(
        _evaluate(w, *gp), "pred"))(_gt_pred(w, pred_name="other.nii.gz")), r"no case could be evaluated.*file names"),
    Bad("evaluate-bad-labels-json", "cli", lambda w, e: (lambda gp: (
        (w / "labels.json").write_text("[1, 2]"),
        Scenario(_evaluate(w, *gp, "--labels", str(w / "labels.json")), "labels.json"))[-1])(_gt_pred(w)),
        r"cannot read a 'labels' mapping"),
    # ---- export
    Bad("export-to-unwritable-path", "cli", lambda w, e: (
        (w / "taken").write_text("a file, not a folder"),
        Scenario(["export", "-m", str(e.model), "-o", str(w / "taken" / "model.onnx")], "taken"))[-1],
        r"cannot (create|write).*not a folder", subprocess=True),
    Bad("export-unknown-format", "cli", lambda w, e: Scenario(
        ["export", "-m", str(e.model), "-o", str(w / "m.bin"), "--format", "tflite"], "--format"),
        r"--format must be onnx or torchscript"),
]


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if not p.is_dir()}


def _run_cli(args: list[str], real_process: bool, capsys) -> tuple[int, str]:
    if real_process:
        r = subprocess.run([sys.executable, "-m", "resunet", *args], capture_output=True, text=True, timeout=300,
                           env={**os.environ, "COLUMNS": "400"})
        return r.returncode, r.stderr + r.stdout
    capsys.readouterr()
    with pytest.raises(SystemExit) as done:
        cli_main(args)
    captured = capsys.readouterr()
    return done.value.code, captured.err + captured.out


def test_the_table_is_complete():
    assert len(CASES) >= 40
    assert len({c.id for c in CASES}) == len(CASES)
    assert {c.surface for c in CASES} == {"cli", "api", "dicom"}
    assert sum(c.subprocess for c in CASES) >= 4 and all(c.surface == "cli" for c in CASES if c.subprocess)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Bad, env: Env, tmp_path: Path, capsys):
    work = tmp_path / "case"
    work.mkdir()
    scenario = case.build(work, env)
    before = _files(tmp_path)
    if case.surface == "cli":
        code, output = _run_cli(scenario.run, case.subprocess, capsys)
        assert "Traceback" not in output
        assert code == 2, output
        assert sum(line.startswith("error:") for line in output.splitlines()) == 1, output
        message = " ".join(output.split())
    else:
        with pytest.raises(ResunetError) as raised:
            if scenario.unprivileged:
                with unprivileged():
                    scenario.run()
            else:
                scenario.run()
        message = " ".join(str(raised.value).split())
    assert re.search(case.expect, message), message
    assert scenario.names in message, f"the message does not name {scenario.names}: {message}"
    assert _files(tmp_path) == before, "output or temporary files left behind"
    assert not (tmp_path.parent / "EXECUTED").exists() and not (tmp_path / "EXECUTED").exists()


def test_an_all_zero_image_is_segmented_as_all_background(env: Env, tmp_path: Path, capsys):
    """Not an error: an empty (all-zero) scan has nothing to segment, the mask is all background."""
    image = nifti(tmp_path / "blank.nii.gz", np.zeros(SHAPE, np.int16))
    code, output = _run_cli(predict_args(env, image, tmp_path / "out"), False, capsys)
    assert code in (0, None), output
    mask = read_volume(tmp_path / "out" / "blank.nii.gz")
    assert mask.shape == read_volume(image).shape and not mask.array.any()


def test_a_refused_pickle_never_ran(env: Env, tmp_path: Path):
    """The pickled checkpoint rows above are refused by ``weights_only``; here the proof that the
    refusal happens before any code of the file runs, for both disguises, in this process."""
    for via_torch in (False, True):
        work = tmp_path / f"torch{via_torch}"
        work.mkdir()
        _pickle_checkpoint(work, env, via_torch)
        with pytest.raises(ModelError, match="not a readable resunet checkpoint"):
            load_checkpoint(work / "model.pt")
        assert not (tmp_path / "EXECUTED").exists()
