"""The dataset fingerprint (known answers), each planner rule, the plan YAML round trip and the
datasets a planner must refuse clearly (or plan anyway)."""

import json
from pathlib import Path

import numpy as np
import pytest

from resunet.data.datasets import find_dataset
from resunet.data.io import write_volume
from resunet.data.volume import Volume
from resunet.errors import InputError
from resunet.plan import fingerprint_dataset, plan_dataset, rules
from resunet.plan.fingerprint import modality_from_name, orientation_code
from resunet.train.precision import precision_guard
from resunet.train.config import load_config


def write_case(root: Path, case: str, image: np.ndarray, label: np.ndarray, spacing=(1.0, 1.0, 1.0),
               direction=None, split: str = "Tr") -> None:
    n = image.ndim
    direction = np.eye(n) if direction is None else direction
    for sub in (f"images{split}", f"labels{split}"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    write_volume(Volume(image, spacing, (0.0,) * n, direction, n), root / f"images{split}" / f"{case}_0000.nii.gz")
    write_volume(Volume(label.astype(np.uint8), spacing, (0.0,) * n, direction, n),
                 root / f"labels{split}" / f"{case}.nii.gz")


def write_json(root: Path, labels: dict, channel: str = "MRI", n: int | None = None) -> None:
    n = n if n is not None else len(list((root / "imagesTr").glob("*_0000.nii.gz")))
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": channel}, "labels": labels, "numTraining": n, "file_ending": ".nii.gz"}))


def blob_case(shape, centre, radius, value_fg=100.0, value_bg=10.0, second=None):
    """Image with a bright ball (label 1) and optionally a second ball (label 2) in a dimmer box."""
    grid = np.indices(shape).astype(np.float32)
    dist = np.sqrt(sum((g - c) ** 2 for g, c in zip(grid, centre)))
    label = (dist <= radius).astype(np.uint8)
    if second is not None:
        d2 = np.sqrt(sum((g - c) ** 2 for g, c in zip(grid, second)))
        label[d2 <= radius] = 2
    image = np.where(label > 0, value_fg, value_bg).astype(np.float32)
    return image, label


@pytest.fixture
def tiny_mr(tmp_path):
    """Three 3-D cases with known foreground intensities, fractions and component counts."""
    root = tmp_path / "Dataset001_Tiny"
    for i in range(3):
        image, label = blob_case((12, 20, 20), (6, 6, 6), 3, value_fg=100.0 + 10 * i, second=(6, 14, 14))
        write_case(root, f"c{i}", image, label, spacing=(2.0, 1.0, 1.0))
    write_json(root, {"background": 0, "a": 1, "b": 2})
    return root


def test_fingerprint_known_values(tiny_mr, tmp_path):
    info = find_dataset(tiny_mr)
    fp = fingerprint_dataset(info, tmp_path / "cache", progress=False)
    assert fp.num_cases == 3 and fp.spatial_ndim == 3
    assert fp.median_spacing == (2.0, 1.0, 1.0)
    assert all(c.shape == (12, 20, 20) and c.orientation == "SPL" for c in fp.cases)
    ch = fp.channels[0]
    assert ch.modality == "mr" and ch.name == "MRI"
    # foreground voxels hold 100 / 110 / 120 exactly, equally many per case
    assert ch.case_means == pytest.approx([100.0, 110.0, 120.0])
    assert ch.mean == pytest.approx(110.0) and ch.min == 100.0 and ch.max == 120.0
    assert ch.p00_5 == pytest.approx(100.0) and ch.p99_5 == pytest.approx(120.0)
    ball = int(blob_case((12, 20, 20), (6, 6, 6), 3)[1].sum())
    a, b = fp.classes
    assert a.voxel_fraction == pytest.approx(ball / (12 * 20 * 20))
    assert a.cases_present == 3 and a.median_components == 1 and b.median_components == 1
    # cached: a second call reads the JSON (same object), a touched file measures again
    cached = list((tmp_path / "cache" / "fingerprints").glob("*.json"))
    assert len(cached) == 1
    assert fingerprint_dataset(info, tmp_path / "cache", progress=False) == fp


def test_fingerprint_sees_differently_stored_scans_in_one_axis_order(tmp_path):
    """A case stored sagittally (array axes permuted, one reversed) has the canonical case's shape
    and spacing in the fingerprint: the order the planned reorientation trains in."""
    root = tmp_path / "Dataset003_Mixed"
    image, label = blob_case((12, 20, 16), (6, 8, 8), 3)
    write_case(root, "axial", image, label, spacing=(3.0, 1.0, 0.8))
    # array axis 0 <- old x (reversed), 1 <- old y, 2 <- old z: the columns of direction say where each goes
    perm = np.flip(np.transpose(image, (2, 1, 0)), axis=0).copy()
    perm_label = np.flip(np.transpose(label, (2, 1, 0)), axis=0).copy()
    direction = np.array([[0.0, 0.0, -1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])  # ITK columns (x, y, z)
    write_case(root, "sagittal", perm, perm_label, spacing=(0.8, 1.0, 3.0), direction=direction)
    write_json(root, {"background": 0, "a": 1})
    fp = fingerprint_dataset(find_dataset(root), tmp_path / "cache", progress=False)
    by_id = {c.case_id: c for c in fp.cases}
    assert by_id["sagittal"].orientation != by_id["axial"].orientation
    for case in by_id.values():
        assert case.spacing == pytest.approx((3.0, 1.0, 0.8)) and case.shape == (12, 20, 16)
        assert case.nonzero_shape == by_id["axial"].nonzero_shape
    assert fp.median_spacing == pytest.approx((3.0, 1.0, 0.8))


def test_component_counts_and_absent_class(tmp_path):
    root = tmp_path / "D"
    image, label = blob_case((10, 24, 24), (5, 6, 6), 2)
    label[5, 18, 18] = 1  # a second component of class 1
    write_case(root, "c0", image, label)
    write_json(root, {"background": 0, "organ": 1, "tumour": 2})
    fp = fingerprint_dataset(find_dataset(root), None, progress=False)
    assert fp.classes[0].median_components == 2
    assert fp.classes[1].cases_present == 0
    with pytest.raises(InputError, match="tumour.*appear in no training label"):
        plan_dataset(root, 2, cache_dir=tmp_path / "cache", progress=False)


@pytest.mark.parametrize("name, dims, expected", [
    ("CT", 3, "ct"), ("T1", 3, "mr"), ("FLAIR", 3, "mr"), ("MRI", 3, "mr"), ("T2w", 3, "mr"),
    ("R", 2, "rgb"), ("nuclei fluorescence", 2, "microscopy"), ("whatever", 3, "mr"), ("whatever", 2, "picture"),
])
def test_modality_from_channel_names(name, dims, expected):
    assert modality_from_name(name, dims) == expected


def test_orientation_code():
    assert orientation_code(np.eye(3)) == "SPL"
    ras = np.diag([-1.0, -1.0, 1.0])  # NIfTI RAS axes in LPS terms
    assert orientation_code(ras) == "SAR"


def _fp(tmp_path, spacing=(1.0, 1.0, 1.0), shape=(12, 20, 20), channel="MRI", n=3, dims=3, scales=(1.0, 1.0, 1.0)):
    root = tmp_path / f"D{spacing[0]}{channel}{shape[0]}{scales[1]}"
    for i in range(n):
        image, label = blob_case(shape, tuple(s // 2 for s in shape), 3, value_fg=(100.0 + i) * scales[i])
        write_case(root, f"c{i}", image, label, spacing=spacing[-dims:])
    write_json(root, {"background": 0, "x": 1}, channel=channel)
    return fingerprint_dataset(find_dataset(root), None, progress=False)


def test_rule_anisotropy_means_2d(tmp_path):
    fp = _fp(tmp_path, spacing=(5.0, 1.0, 1.0))
    three_d, two_d, reason = rules.geometry_candidates(fp, [5.0, 1.0, 1.0], 10)
    assert three_d == [] and "anisotropic" in reason
    assert two_d[0]["mode"] == "2d" and two_d[0]["context"] == 1
    iso = _fp(tmp_path, spacing=(1.0, 1.0, 1.0))
    three_d, _, _ = rules.geometry_candidates(iso, [1.0, 1.0, 1.0], 10)
    assert three_d and three_d[0]["mode"] == "3d"


def test_rule_ct_gets_the_ct_scheme(tmp_path):
    pre, why = rules.plan_preprocessing(_fp(tmp_path, channel="CT"), 10)
    assert pre["modality"] == "ct" and pre["normalization"] == "fixed"
    assert pre["intensity_clip"][0] == pytest.approx(100.0) and pre["intensity_clip"][1] <= 102.0
    # MR in arbitrary units (each case its own scale): per-case z-score
    mr, _ = rules.plan_preprocessing(_fp(tmp_path, channel="T2", scales=(1.0, 3.0, 20.0)), 10)
    assert mr["normalization"] == "zscore" and "intensity_clip" not in mr
    # MR on one scale (foreground means 100, 101, 102): one dataset-wide mean / sd
    same, why = rules.plan_preprocessing(_fp(tmp_path, channel="T2"), 10)
    assert same["normalization"] == "fixed" and same["intensity_mean"] == [pytest.approx(101.0, abs=0.01)]
    assert "one intensity scale" in why[-1].reason


def test_rule_more_minutes_never_fewer_epochs():
    steps = [rules.plan_schedule(0.3, m * 60, m)[:2] for m in (1, 2, 5, 10, 20, 60)]
    totals = [e * i for e, i in steps]
    assert totals == sorted(totals) and totals[-1] > totals[0]


def test_rule_budget_too_small_says_how_much(tmp_path):
    with pytest.raises(InputError, match=r"--minutes \d+"):
        rules.plan_schedule(5.0, 60, 1)


def test_rule_tiny_image_gets_small_patch_and_depth(tmp_path):
    fp = _fp(tmp_path, shape=(12, 12), dims=2, spacing=(1.0, 1.0), channel="gray")
    assert fp.is_flat  # a 2-D NIfTI reads as one slice
    three_d, two_d, _ = rules.geometry_candidates(fp, [1.0, 1.0, 1.0], 10)
    assert three_d == [] and two_d[0]["context"] == 0
    assert two_d[0]["depth"] == 3 and two_d[0]["patch_size"] == [12, 12]
    assert rules.network_depth([128, 128]) == 5 and rules.network_depth([40, 56]) == 4
    assert rules.network_depth([6, 6]) == 3


def test_rule_large_images_are_coarsened_within_the_budget(tmp_path):
    fp = _fp(tmp_path, shape=(4, 600, 300), spacing=(1.0, 0.5, 0.5))
    pre, why = rules.plan_preprocessing(fp, 10)
    assert pre["target_spacing"][0] == 1.0
    assert pre["target_spacing"][1] == pytest.approx(0.5 * 600 / 256, rel=1e-3)
    more, _ = rules.plan_preprocessing(fp, 600)
    assert more["target_spacing"][1] < pre["target_spacing"][1]


def test_precision_guard_rejects_divergence():
    ok, _ = precision_guard([1.0, 0.9, 0.8], [1.0, 0.91, 0.82])
    assert ok
    bad, why = precision_guard([1.0, 0.9, 0.8], [1.0, 1.5, 3.0])
    assert not bad and "apart" in why
    nan, why = precision_guard([1.0, 0.9], [1.0, float("nan")])
    assert not nan and "non-finite" in why


@pytest.mark.slow
def test_plan_yaml_round_trip_and_cli(tiny_mr, tmp_path, monkeypatch):
    monkeypatch.setenv("RESUNET_CACHE", str(tmp_path / "cache"))
    from resunet.cli import main

    out = tmp_path / "plan.yaml"
    with pytest.raises(SystemExit) as stop:
        main(["plan", str(tiny_mr), "--minutes", "6", "-o", str(out)])
    assert stop.value.code in (0, None)
    config = load_config(out)
    assert config.plan["minutes"] == 6 and config.data.preprocess.reorient
    assert config.data.mode in ("2d", "3d") and config.stages[0].epochs >= 1
    keys = {c["key"] for c in config.plan["choices"]}
    assert {"data.preprocess.target_spacing", "data.mode", "model.base_channels", "precision", "stages.0.epochs"} <= keys
    again = load_config(out)
    assert again == config  # YAML round trip


def test_mixed_spacings_one_case_and_gapped_labels(tmp_path):
    root = tmp_path / "Mixed"
    for i, sp in enumerate([(1.0, 1.0, 1.0), (2.0, 1.0, 1.0), (1.5, 0.8, 0.8)]):
        image, label = blob_case((10, 16, 16), (5, 8, 8), 3)
        write_case(root, f"c{i}", image, label, spacing=sp)
    write_json(root, {"background": 0, "x": 1})
    fp = fingerprint_dataset(find_dataset(root), None, progress=False)
    pre, why = rules.plan_preprocessing(fp, 10)
    assert pre["target_spacing"] == [1.5, 1.0, 1.0] and "differ" in why[0].reason

    gaps = tmp_path / "Gaps"
    image, label = blob_case((10, 16, 16), (5, 8, 8), 3)
    label[label == 1] = 5
    write_case(gaps, "c0", image, label)
    write_json(gaps, {"background": 0, "a": 1, "b": 5})
    with pytest.raises(InputError, match="without gaps"):
        plan_dataset(gaps, 2, cache_dir=tmp_path / "cache", progress=False)


def test_four_d_image_in_nnunet_layout_is_refused(tmp_path):
    root = tmp_path / "FourD"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir(parents=True)
    import nibabel as nib

    nib.save(nib.Nifti1Image(np.ones((8, 8, 8, 3), np.float32), np.eye(4)), root / "imagesTr" / "c0_0000.nii.gz")
    nib.save(nib.Nifti1Image(np.ones((8, 8, 8), np.uint8), np.eye(4)), root / "labelsTr" / "c0.nii.gz")
    write_json(root, {"background": 0, "x": 1}, n=1)
    with pytest.raises(InputError) as err:
        plan_dataset(root, 2, cache_dir=tmp_path / "cache", progress=False)
    assert "c0" in str(err.value)


def test_predict_sees_every_scan_at_the_training_geometry(tmp_path):
    """A scan stored with permuted / flipped axes and another spacing is reoriented and resampled
    to the plan's geometry before the model runs: its mask is the mask of the canonical scan,
    permuted back, on the input's own grid (shape, spacing, origin, direction unchanged)."""
    import nibabel as nib
    import torch

    from resunet.data.io import read_volume
    from resunet.infer.predictor import Predictor
    from resunet.model import model_from_checkpoint
    from resunet.nets import build_model, model_config

    torch.manual_seed(0)
    model = build_model("resunet", spatial_dims=2, in_channels=3, out_channels=3, base_channels=4, depth=3)
    model.eval()
    with torch.no_grad():  # centre the logits so the masks of a random model are not constant
        model.head.weight.mul_(50.0)
        model.head.bias.mul_(50.0)
        model.head.bias.sub_(model(torch.randn(4, 3, 16, 16)).mean(dim=(0, 2, 3)))
    checkpoint = {
        "state_dict": model.state_dict(), "model": model_config(model),
        "preprocess": {"modality": "mr", "normalization": "zscore", "crop_to_nonzero": False,
                       "reorient": True, "target_spacing": [2.0, 1.0, 1.0]},
        "labels": {"background": 0, "a": 1, "b": 2},
        "inference": {"mode": "2d", "context": 1, "patch_size": [16, 16]},
    }
    predictor = Predictor(model_from_checkpoint(checkpoint), backend="eager")
    rng = np.random.default_rng(0)
    data = rng.normal(100, 20, size=(10, 12, 7)).astype(np.float32)  # NIfTI (i, j, k)
    canonical = np.diag([-1.0, -1.0, 2.0, 1.0])  # RAS: LPS-flipped x, y; 2 mm slices along k
    nib.save(nib.Nifti1Image(data, canonical), tmp_path / "a.nii.gz")
    # the same voxels stored with i and k swapped and j reversed (another scanner's convention)
    perm = np.flip(np.transpose(data, (2, 1, 0)), axis=1).copy()
    affine = np.zeros((4, 4))
    affine[:3, 0] = canonical[:3, 2]  # new i = old k
    affine[:3, 1] = -canonical[:3, 1]  # new j = old j reversed
    affine[:3, 2] = canonical[:3, 0]  # new k = old i
    affine[:3, 3] = canonical[:3, 1] * (data.shape[1] - 1)
    affine[3, 3] = 1
    nib.save(nib.Nifti1Image(perm, affine), tmp_path / "b.nii.gz")
    a, b = read_volume(tmp_path / "a.nii.gz"), read_volume(tmp_path / "b.nii.gz")
    mask_a, mask_b = predictor.predict([a]), predictor.predict([b])
    assert mask_b.shape == b.shape and mask_b.spacing == b.spacing
    assert mask_b.origin == b.origin and np.array_equal(mask_b.direction, b.direction)
    assert len(np.unique(mask_a.array)) > 1
    # b's array is (k, j, i) of its own file: map a's mask into b's axes and compare
    a_as_b = np.flip(np.transpose(mask_a.array, (2, 1, 0)), axis=1)
    assert np.array_equal(mask_b.array, a_as_b)


def _fake_speed(monkeypatch, seconds: float):
    from resunet.plan import planner, timing

    from resunet.train.precision import StepChoice, StepSettings

    def fake(config, cases, in_channels, out_channels, *, settings, **kw):
        return timing.StepTiming(seconds, [1.0, 0.9, 0.8], settings)

    monkeypatch.setattr(planner, "time_training", fake)
    monkeypatch.setattr(planner, "planned_step_settings", lambda *a, **k: StepChoice(StepSettings(), "fp32 (faked)"))


def test_one_case_plans_without_validation_and_a_tiny_budget_says_how_much(tmp_path, monkeypatch):
    root = tmp_path / "One"
    image, label = blob_case((6, 24, 24), (3, 12, 12), 4)
    write_case(root, "only", image, label, spacing=(4.0, 1.0, 1.0))
    write_json(root, {"background": 0, "x": 1})
    _fake_speed(monkeypatch, 0.05)
    plan = plan_dataset(root, 2, cache_dir=tmp_path / "cache", output_dir=tmp_path / "run", progress=False)
    assert plan.config.data.val_fraction == 0.0
    assert plan.config.data.mode == "2d" and plan.config.data.context == 1  # 4 mm slices: anisotropic
    assert plan.config.stages[0].patch_size == [24, 24]
    _fake_speed(monkeypatch, 30.0)
    with pytest.raises(InputError, match=r"give at least --minutes (\d+)") as err:
        plan_dataset(root, 2, cache_dir=tmp_path / "cache", progress=False)
    assert int(err.value.args[0].rsplit(" ", 1)[1]) >= 25  # 50 steps of 30 s


def test_sagittal_anisotropic_data_is_sliced_along_its_coarse_axis(tmp_path, monkeypatch):
    """x (sagittal) 4 mm, y / z 1 mm: the planner slices 2.5-D along x, the preprocessed arrays
    put x first, and a prediction comes back on the input's own grid, axes in place."""
    import torch

    from resunet.data.io import read_volume
    from resunet.data.preprocess import PreprocessConfig, preprocess_case
    from resunet.infer.predictor import Predictor
    from resunet.model import model_from_checkpoint
    from resunet.nets import build_model, model_config

    fp = _fp(tmp_path, spacing=(1.0, 1.0, 4.0), shape=(20, 24, 8))
    axis, why = rules.plan_slice_axis(fp)
    assert axis == 2 and "x (sagittal)" in why.reason
    moved = fp.with_first_axis(2)
    assert moved.median_spacing == (4.0, 1.0, 1.0) and moved.cases[0].shape == (8, 20, 24)
    assert rules.plan_slice_axis(_fp(tmp_path, spacing=(1.0, 1.0, 1.0)))[0] == 0  # isotropic: axial
    assert rules.plan_slice_axis(_fp(tmp_path, spacing=(5.0, 1.0, 1.0)))[0] == 0  # already first
    flat = _fp(tmp_path, spacing=(1.0, 1.0, 1.0), shape=(20, 1, 24), channel="T1")
    assert rules.plan_slice_axis(flat)[0] == 1  # one coronal slice per file

    image = read_volume(next((tmp_path / "D1.0MRI201.0" / "imagesTr").glob("c0_*")))
    cfg = PreprocessConfig(modality="mr", reorient=True, slice_axis=2, crop_to_nonzero=False,
                           target_spacing=(4.0, 1.0, 1.0))
    prepared = preprocess_case([image], None, cfg)
    assert prepared.image.shape[1:] == (8, 20, 24)
    torch.manual_seed(0)
    model = build_model("resunet", spatial_dims=2, in_channels=3, out_channels=2, base_channels=4, depth=3).eval()
    checkpoint = {"state_dict": model.state_dict(), "model": model_config(model), "preprocess": cfg.model_dump(),
                  "labels": {"background": 0, "x": 1}, "inference": {"mode": "2d", "context": 1, "patch_size": [24, 24]}}
    predictor = Predictor(model_from_checkpoint(checkpoint), backend="eager")
    mask = predictor.predict([image])
    assert mask.shape == image.shape and mask.spacing == image.spacing
    assert mask.origin == image.origin and np.array_equal(mask.direction, image.direction)
    _fake_speed(monkeypatch, 0.05)
    plan = plan_dataset(tmp_path / "D1.0MRI201.0", 2, cache_dir=tmp_path / "cache", output_dir=tmp_path / "run",
                        progress=False)
    assert plan.config.data.preprocess.slice_axis == 2 and plan.config.data.mode == "2d"
    assert plan.config.data.preprocess.target_spacing == (4.0, 1.0, 1.0)
    assert plan.config.stages[0].patch_size == [20, 24]  # the (z, y) plane, not (y, x)
