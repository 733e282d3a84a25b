"""`resunet predict` / `resunet evaluate` on real files: geometry kept, bad cases isolated, metrics equal."""

import csv
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from resunet.data.io import read_volume
from resunet.errors import ModelError
from resunet.evaluation import evaluate_folders
from resunet.infer.predictor import Predictor
from resunet.metrics import compute_all
from resunet.nets import build_model, model_config
from resunet.model.checkpoint import save_checkpoint

LABELS = {"background": 0, "organ": 1, "lesion": 2}


def make_checkpoint(path: Path, mode: str = "2d", context: int = 0, preprocess: dict | None = None) -> Path:
    torch.manual_seed(0)
    dims = 2 if mode == "2d" else 3
    model = build_model("resunet", spatial_dims=dims, in_channels=2 * context + 1, out_channels=3,
                        base_channels=4, depth=3)
    save_checkpoint(path, {
        "state_dict": model.state_dict(), "model": model_config(model),
        "preprocess": preprocess or {"modality": "ct", "ct_window": "abdomen", "crop_to_nonzero": False},
        "labels": LABELS, "inference": {"mode": mode, "context": context, "patch_size": [16] * dims},
    })
    return path


def oblique_affine() -> np.ndarray:
    angle = np.deg2rad(12)
    rot = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag([0.8, 0.7, 2.5])
    affine[:3, 3] = [-40.5, 12.25, -80.0]
    return affine


def write_ct(path: Path, shape=(37, 29, 11), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    data = rng.normal(40, 200, size=shape).astype(np.int16)
    nib.save(nib.Nifti1Image(data, oblique_affine()), str(path))
    return data


def run_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "resunet", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("mode, context", [("2d", 0), ("2d", 1), ("3d", 0)])
def test_prediction_keeps_the_input_affine_and_shape(tmp_path, mode, context):
    model = make_checkpoint(tmp_path / "m.pt", mode, context)
    write_ct(tmp_path / "ct.nii.gz")
    r = run_cli("predict", "-m", str(model), "-i", str(tmp_path / "ct.nii.gz"), "-o", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    src, out = nib.load(str(tmp_path / "ct.nii.gz")), nib.load(str(tmp_path / "out" / "ct.nii.gz"))
    assert out.shape == src.shape
    assert np.array_equal(out.affine, src.affine)
    assert set(np.unique(np.asanyarray(out.dataobj))) <= {0, 1, 2}


def test_prediction_with_resampling_returns_to_the_original_grid(tmp_path):
    model = make_checkpoint(tmp_path / "m.pt", preprocess={
        "modality": "ct", "target_spacing": [1.5, 1.0, 1.0], "crop_to_nonzero": True})
    write_ct(tmp_path / "ct.nii.gz")
    image = read_volume(tmp_path / "ct.nii.gz")
    mask = Predictor.from_file(model).predict([image])
    assert mask.shape == image.shape and mask.same_geometry(image)


def test_one_unreadable_case_does_not_stop_the_others(tmp_path):
    model = make_checkpoint(tmp_path / "m.pt")
    cases = tmp_path / "imagesTs"
    cases.mkdir()
    write_ct(cases / "a_0000.nii.gz", seed=1)
    (cases / "b_0000.nii.gz").write_bytes(b"\x1f\x8b\x08\x00truncated")
    write_ct(cases / "c_0000.nii.gz", seed=2)
    r = run_cli("predict", "-m", str(model), "-i", str(cases), "-o", str(tmp_path / "out"))
    assert r.returncode == 2
    assert "b:" in r.stderr and "Traceback" not in r.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.nii.gz", "c.nii.gz"]


def test_tta_equals_the_mean_of_flipped_predictions(tmp_path):
    from resunet.infer.predictor import predict_case_logits

    torch.manual_seed(0)
    net = build_model("unet", in_channels=1, out_channels=2, base_channels=4, depth=3).eval()
    x = torch.randn(1, 5, 24, 16)
    kw = dict(mode="2d", context=0, divisor=4, patch_size=[16, 16], batch_size=4)
    tta = predict_case_logits(net, x, tta=True, **kw)
    flips = [(), (-1,), (-2,), (-2, -1)]
    manual = []
    for axes in flips:
        xf = x.flip(axes) if axes else x
        y = predict_case_logits(net, xf, tta=False, **kw)
        manual.append(y.flip(axes) if axes else y)
    assert torch.allclose(tta, torch.stack(manual).mean(0), atol=1e-5)


def test_evaluate_numbers_equal_the_metrics_module(tmp_path):
    rng = np.random.default_rng(0)
    pred_dir, gt_dir = tmp_path / "pred", tmp_path / "gt"
    pred_dir.mkdir(), gt_dir.mkdir()
    affine = oblique_affine()
    arrays = {}
    for case in ("c1", "c2"):
        gt = np.zeros((30, 30, 8), np.uint8)
        gt[5:20, 6:22, 2:6] = 1
        gt[8:12, 9:13, 3:5] = 2
        pred = np.roll(gt, rng.integers(1, 3), axis=0)
        nib.save(nib.Nifti1Image(gt, affine), str(gt_dir / f"{case}.nii.gz"))
        nib.save(nib.Nifti1Image(pred, affine), str(pred_dir / f"{case}.nii.gz"))
        arrays[case] = (pred, gt)
    nib.save(nib.Nifti1Image(gt, affine), str(gt_dir / "only_gt.nii.gz"))
    labels_json = tmp_path / "dataset.json"
    labels_json.write_text('{"labels": {"background": 0, "organ": 1, "lesion": 2}}')
    r = run_cli("evaluate", "--pred", str(pred_dir), "--gt", str(gt_dir), "--labels", str(labels_json),
                "--tolerance", "2", "--out", str(tmp_path / "eval"), "--images", str(gt_dir))
    assert r.returncode == 0, r.stderr
    assert "only_gt" in r.stdout  # missing prediction listed
    rows = list(csv.DictReader(open(tmp_path / "eval" / "per_case.csv")))
    assert len(rows) == 4
    spacing = read_volume(gt_dir / "c1.nii.gz").spacing
    for row in rows:
        pred, gt = arrays[row["case"]]
        # files are (x, y, z); the metrics module sees (z, y, x) arrays with (z, y, x) spacing
        expected = compute_all(pred.T, gt.T, [1, 2], spacing, 2.0)[int(row["label"])]
        for metric, value in expected.items():
            assert float(row[metric]) == pytest.approx(value, rel=1e-9), metric
    md = (tmp_path / "eval" / "summary.md").read_text()
    assert "| organ (1) |" in md and "| lesion (2) |" in md
    report = (tmp_path / "eval" / "report.md").read_text()
    assert "worst: c" in report and "only_gt" in report
    overlays = sorted((tmp_path / "eval" / "overlays").glob("*.png"))
    assert overlays and all(p.read_bytes()[:4] == b"\x89PNG" for p in overlays)


def test_evaluate_reports_a_broken_case_and_continues(tmp_path):
    pred_dir, gt_dir = tmp_path / "pred", tmp_path / "gt"
    pred_dir.mkdir(), gt_dir.mkdir()
    gt = np.zeros((10, 10, 4), np.uint8)
    gt[2:6, 2:6, 1:3] = 1
    for case in ("ok", "bad"):
        nib.save(nib.Nifti1Image(gt, np.eye(4)), str(gt_dir / f"{case}.nii.gz"))
    nib.save(nib.Nifti1Image(gt, np.eye(4)), str(pred_dir / "ok.nii.gz"))
    (pred_dir / "bad.nii.gz").write_bytes(b"not a nifti")
    result = evaluate_folders(pred_dir, gt_dir, {"background": 0, "organ": 1})
    assert [r["case"] for r in result.rows] == ["ok"] and result.rows[0]["dice"] == 1.0
    assert "bad" in result.failed and "bad.nii.gz" in result.failed["bad"]


def test_dicom_series_in_gives_a_dicom_seg_out_that_overlays_the_right_slices(tmp_path):
    import pydicom

    from dicom_series import write_ct_series
    from resunet.data.dicom_seg import read_dicom_seg

    rng = np.random.default_rng(0)
    ct = rng.normal(40, 300, size=(6, 32, 48)).astype(np.float32)
    series = write_ct_series(tmp_path / "series", ct, spacing=(2.5, 0.7, 0.7), origin=(-20.0, 15.0, 100.0))
    model = make_checkpoint(tmp_path / "m.pt")
    r = run_cli("predict", "-m", str(model), "-i", str(tmp_path / "series"), "-o", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    seg_path = tmp_path / "out" / "series.dcm"
    seg = pydicom.dcmread(seg_path)
    assert seg.Modality == "SEG" and seg.StudyInstanceUID == series.study_uid
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["organ", "lesion"]
    source = read_volume(tmp_path / "series")
    # every frame references a source slice with the same position
    by_uid = dict(zip(source.meta["sop_instance_uids"], source.meta["slice_positions"]))
    for frame in seg.PerFrameFunctionalGroupsSequence:
        ref = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        pos = [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient]
        assert np.allclose(pos, by_uid[ref], atol=1e-3)
    # the decoded SEG equals the NIfTI-path prediction of the same series
    offline = Predictor.from_file(model).predict([source]).array
    assert np.array_equal(read_dicom_seg(seg_path, source, LABELS), offline)


def test_predict_many_equals_one_case_at_a_time_and_isolates_bad_cases(tmp_path):
    # 2.5-D model (context 1): shared batches must not mix neighbouring slices of different cases
    model = make_checkpoint(tmp_path / "m.pt", "2d", context=1)
    predictor = Predictor.from_file(model, batch_size=4)
    volumes = []
    for seed, shape in enumerate([(37, 29, 11), (37, 29, 5), (20, 16, 7), (37, 29, 1)]):
        write_ct(tmp_path / f"ct{seed}.nii.gz", shape=shape, seed=seed)
        volumes.append(read_volume(tmp_path / f"ct{seed}.nii.gz"))
    cases = [[v] for v in volumes]
    cases.insert(2, [volumes[0], volumes[1]])  # two channels for a one-channel model
    results = predictor.predict_many(cases)
    assert isinstance(results[2], ModelError) and "1 image channel" in str(results[2])
    for case, got in zip(cases[:2] + cases[3:], results[:2] + results[3:]):
        expected = predictor.predict(case)
        assert got.same_geometry(case[0]) and np.array_equal(got.array, expected.array)
    # TTA goes through the same shared path
    predictor.tta = True
    got = predictor.predict_many(cases[:2])
    assert all(np.array_equal(g.array, predictor.predict(c).array) for g, c in zip(got, cases[:2]))


def test_slice_batches_are_capped_by_pixels():
    from resunet.infer.predictor import slice_batch_size

    assert slice_batch_size(8, (512, 512), 16, 8 * 256 * 256) == 2
    assert slice_batch_size(8, (250, 250), 16, 8 * 256 * 256) == 8  # padded to 256 x 256
    assert slice_batch_size(8, (2048, 2048), 16, 8 * 256 * 256) == 1
    assert slice_batch_size(8, (512, 512), 16, None) == 8
