"""resunet.data.datasets: nnU-Net v2, Decathlon and images/masks layouts on real files."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from resunet.data.datasets import find_dataset, load_case, read_label, validate_dataset
from resunet.errors import InputError

AFFINE = np.array([
    [-0.8, 0.0, 0.0, 90.0],
    [0.0, 0.8, 0.0, -120.0],
    [0.0, 0.0, 2.5, -40.0],
    [0.0, 0.0, 0.0, 1.0],
])
SHAPE = (12, 10, 6)  # nibabel (X, Y, Z)


def save_nii(path: Path, data: np.ndarray, affine: np.ndarray = AFFINE) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), str(path))


def make_nnunet(root: Path, rng: np.random.Generator, cases=("case_001", "case_002", "case_003")) -> Path:
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for cid in cases:
        for c in range(2):
            save_nii(root / "imagesTr" / f"{cid}_{c:04d}.nii.gz", rng.normal(size=SHAPE).astype(np.float32))
        save_nii(root / "labelsTr" / f"{cid}.nii.gz", rng.integers(0, 3, size=SHAPE).astype(np.uint8))
    for c in range(2):
        save_nii(root / "imagesTs" / f"case_900_{c:04d}.nii.gz", rng.normal(size=SHAPE).astype(np.float32))
    dataset = {
        "channel_names": {"0": "T1", "1": "FLAIR"},
        "labels": {"background": 0, "edema": 1, "tumour": 2},
        "numTraining": len(cases),
        "file_ending": ".nii.gz",
    }
    (root / "dataset.json").write_text(json.dumps(dataset, indent=2))
    return root


def make_msd(root: Path, rng: np.random.Generator) -> Path:
    training = []
    for i in (1, 2):
        save_nii(root / "imagesTr" / f"BRATS_{i:03d}.nii.gz", rng.normal(size=SHAPE + (3,)).astype(np.float32))
        save_nii(root / "labelsTr" / f"BRATS_{i:03d}.nii.gz", rng.integers(0, 2, size=SHAPE).astype(np.uint8))
        training.append({"image": f"./imagesTr/BRATS_{i:03d}.nii.gz",
                          "label": f"./labelsTr/BRATS_{i:03d}.nii.gz"})
    save_nii(root / "imagesTs" / "BRATS_100.nii.gz", rng.normal(size=SHAPE + (3,)).astype(np.float32))
    dataset = {
        "name": "BRATS", "tensorImageSize": "4D",
        "modality": {"0": "FLAIR", "1": "T1w", "2": "T2w"},
        "labels": {"0": "background", "1": "tumour"},
        "numTraining": 2, "numTest": 1,
        "training": training, "test": ["./imagesTs/BRATS_100.nii.gz"],
    }
    (root / "dataset.json").write_text(json.dumps(dataset))
    return root


def make_images_masks(root: Path, rng: np.random.Generator) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(3):
        rgb = rng.integers(0, 255, size=(24, 32, 3), dtype=np.uint8)
        mask = np.zeros((24, 32), np.uint8)
        mask[5:15, 8 + i:20] = 255
        Image.fromarray(rgb).save(root / "images" / f"polyp{i}.jpg", quality=90)
        # Kvasir-SEG style: JPEG masks, RGB, 0/255 with compression noise
        Image.fromarray(np.stack([mask] * 3, -1)).save(root / "masks" / f"polyp{i}.jpg", quality=75)
    return root


# --------------------------------------------------------------------------- discovery


def test_nnunet_layout_discovered_validated_and_loaded(tmp_path, rng):
    root = make_nnunet(tmp_path / "Dataset001_Brain", rng)
    info = find_dataset(root)
    assert info.layout == "nnunet"
    assert info.channel_names == ["T1", "FLAIR"]
    assert info.labels == {"background": 0, "edema": 1, "tumour": 2}
    assert info.file_ending == ".nii.gz" and not info.problems
    assert [c.case_id for c in info.training] == ["case_001", "case_002", "case_003"]
    assert info.training[0].images == [root / "imagesTr" / "case_001_0000.nii.gz",
                                       root / "imagesTr" / "case_001_0001.nii.gz"]
    assert info.training[0].label == root / "labelsTr" / "case_001.nii.gz"
    assert [c.case_id for c in info.test] == ["case_900"] and info.test[0].label is None
    validate_dataset(info)
    image, label = load_case(info.training[1], info)
    assert image.array.shape == (2, 6, 10, 12) and label.array.shape == (6, 10, 12)
    assert label.array.dtype == np.uint8 and image.same_geometry(label)
    np.testing.assert_allclose(image.spacing, (2.5, 0.8, 0.8))


def test_msd_layout_discovered_validated_and_loaded(tmp_path, rng):
    root = make_msd(tmp_path / "Task01_BrainTumour", rng)
    info = find_dataset(root)
    assert info.layout == "msd"
    assert info.channel_names == ["FLAIR", "T1w", "T2w"]
    assert info.labels == {"background": 0, "tumour": 1}
    assert [c.case_id for c in info.training] == ["BRATS_001", "BRATS_002"]
    assert len(info.training[0].images) == 1 and info.training[0].images[0].is_file()
    assert [c.case_id for c in info.test] == ["BRATS_100"]
    validate_dataset(info)
    image, label = load_case(info.training[0], info)
    assert image.array.shape == (3, 6, 10, 12) and label.shape == (6, 10, 12)


def test_images_masks_layout_discovered_and_masks_binarised(tmp_path, rng):
    root = make_images_masks(tmp_path / "Kvasir-SEG", rng)
    info = find_dataset(root)
    assert info.layout == "images_masks"
    assert info.channel_names == ["R", "G", "B"]
    assert info.labels == {"background": 0, "foreground": 1}
    assert [c.case_id for c in info.training] == ["polyp0", "polyp1", "polyp2"]
    validate_dataset(info)
    image, label = load_case(info.training[0], info)
    assert image.array.shape == (3, 24, 32) and label.array.shape == (24, 32)
    assert set(np.unique(label.array)) == {0, 1}
    assert label.array[10, 12] == 1 and label.array[0, 0] == 0


def test_png_masks_label_indices_kept_and_0_255_binarised(tmp_path, rng):
    root = tmp_path / "pngs"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    Image.fromarray(rng.integers(0, 255, size=(8, 8), dtype=np.uint8)).save(root / "images" / "a.png")
    Image.fromarray(rng.integers(0, 255, size=(8, 8), dtype=np.uint8)).save(root / "images" / "b.png")
    idx = np.zeros((8, 8), np.uint8)
    idx[2:5, 2:5] = 1
    Image.fromarray(idx).save(root / "masks" / "a.png")
    Image.fromarray(idx * 255).save(root / "masks" / "b.png")
    info = find_dataset(root)
    assert info.channel_names == ["gray"]
    validate_dataset(info)
    np.testing.assert_array_equal(read_label(root / "masks" / "a.png", info).array, idx)
    np.testing.assert_array_equal(read_label(root / "masks" / "b.png", info).array, idx)
    # multi-class PNG labels declared in an optional dataset.json are kept as indices
    (root / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "a": 1, "b": 2}}))
    Image.fromarray(idx * 2).save(root / "masks" / "b.png")
    info = find_dataset(root)
    assert info.layout == "images_masks" and info.labels == {"background": 0, "a": 1, "b": 2}
    validate_dataset(info)
    np.testing.assert_array_equal(read_label(root / "masks" / "b.png", info).array, idx * 2)


# --------------------------------------------------------------------------- problems


def test_validate_lists_every_problem_in_one_error(tmp_path, rng):
    root = make_nnunet(tmp_path / "Dataset002_Broken", rng,
                       cases=("case_001", "case_002", "case_003", "case_004", "case_005"))
    # missing channel file
    (root / "imagesTr" / "case_001_0001.nii.gz").unlink()
    # image without label
    (root / "labelsTr" / "case_002.nii.gz").unlink()
    # label without image
    save_nii(root / "labelsTr" / "orphan_case.nii.gz", np.zeros(SHAPE, np.uint8))
    # shape mismatch between channels
    save_nii(root / "imagesTr" / "case_003_0001.nii.gz", np.zeros((12, 10, 5), np.float32))
    # geometry mismatch between image and label (origin shifted by 5 mm)
    shifted = AFFINE.copy()
    shifted[2, 3] += 5.0
    save_nii(root / "labelsTr" / "case_004.nii.gz", np.zeros(SHAPE, np.uint8), shifted)
    # label values not in dataset.json
    bad_values = np.zeros(SHAPE, np.uint8)
    bad_values[0, 0, 0] = 7
    save_nii(root / "labelsTr" / "case_005.nii.gz", bad_values)
    # malformed dataset.json: a missing key and a wrong type
    data = json.loads((root / "dataset.json").read_text())
    del data["numTraining"]
    data["labels"]["tumour"] = "two"
    (root / "dataset.json").write_text(json.dumps(data))

    info = find_dataset(root)
    with pytest.raises(InputError) as err:
        validate_dataset(info)
    msg = str(err.value)
    assert "case_001_0001.nii.gz" in msg and "missing" in msg
    assert "case_002" in msg and "image without label" in msg
    assert "orphan_case.nii.gz" in msg and "label without image" in msg
    assert "case_003_0001.nii.gz" in msg and "(5, 10, 12)" in msg
    assert "case_004.nii.gz" in msg and "does not match" in msg
    assert "case_005.nii.gz" in msg and "values [7]" in msg
    assert "'numTraining'" in msg and "dataset.json" in msg
    assert "'tumour'" in msg
    assert msg.count("\n  - ") >= 8


def test_msd_problems_name_files(tmp_path, rng):
    root = make_msd(tmp_path / "Task02", rng)
    (root / "imagesTr" / "BRATS_002.nii.gz").unlink()
    save_nii(root / "imagesTr" / "BRATS_001.nii.gz", rng.normal(size=SHAPE + (2,)).astype(np.float32))
    info = find_dataset(root)
    with pytest.raises(InputError) as err:
        validate_dataset(info)
    msg = str(err.value)
    assert "BRATS_002.nii.gz" in msg and "missing" in msg
    assert "BRATS_001.nii.gz" in msg and "2 channel(s)" in msg


def test_images_masks_problems(tmp_path, rng):
    root = make_images_masks(tmp_path / "kv", rng)
    (root / "masks" / "polyp1.jpg").unlink()
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(root / "masks" / "lonely.png")
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(root / "masks" / "polyp2.jpg")
    with pytest.raises(InputError) as err:
        validate_dataset(find_dataset(root))
    msg = str(err.value)
    assert "polyp1" in msg and "image without label" in msg
    assert "lonely.png" in msg and "label without image" in msg
    assert "polyp2.jpg" in msg and "(20, 20)" in msg


def test_wrong_dataset_json(tmp_path):
    root = tmp_path / "bad_json"
    root.mkdir()
    (root / "dataset.json").write_text('{"channel_names": {"0": "CT"}, "labels": ')
    with pytest.raises(InputError, match=r"dataset.json.*not valid JSON.*line 1"):
        find_dataset(root)
    (root / "dataset.json").write_text("[1, 2]")
    with pytest.raises(InputError, match="dataset.json.*JSON object"):
        find_dataset(root)
    (root / "dataset.json").write_text('{"name": "x"}')
    with pytest.raises(InputError, match=r"dataset.json.*channel_names.*modality"):
        find_dataset(root)
    (root / "dataset.json").write_text('{"channel_names": "CT", "file_ending": ".nii.gz"}')
    with pytest.raises(InputError) as err:
        validate_dataset(find_dataset(root))
    msg = str(err.value)
    assert "'channel_names'" in msg and "'labels'" in msg and "'numTraining'" in msg
    assert "imagesTr" in msg


def test_not_a_dataset(tmp_path):
    with pytest.raises(InputError, match="nowhere"):
        find_dataset(tmp_path / "nowhere")
    (tmp_path / "random").mkdir()
    with pytest.raises(InputError, match="random.*dataset.json.*images/"):
        find_dataset(tmp_path / "random")


def test_corrupt_label_is_reported_not_crashing(tmp_path, rng):
    root = make_nnunet(tmp_path / "Dataset003", rng)
    label = root / "labelsTr" / "case_002.nii.gz"
    label.write_bytes(label.read_bytes()[:200])
    with pytest.raises(InputError, match="case_002.nii.gz"):
        validate_dataset(find_dataset(root))


def test_nnunet_2d_rgb_png_one_file_holds_three_channels(tmp_path, rng):
    """nnU-Net's natural-image convention: CASE_0000.png (RGB) carries channels R, G, B."""
    root = tmp_path / "Dataset120_Roads"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for cid in ("road_1", "road_2"):
        Image.fromarray(rng.integers(0, 255, size=(16, 20, 3), dtype=np.uint8)).save(
            root / "imagesTr" / f"{cid}_0000.png")
        Image.fromarray(rng.integers(0, 2, size=(16, 20), dtype=np.uint8)).save(
            root / "labelsTr" / f"{cid}.png")
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "R", "1": "G", "2": "B"},
        "labels": {"background": 0, "road": 1},
        "numTraining": 2, "file_ending": ".png",
    }))
    info = find_dataset(root)
    assert info.training[0].images == [root / "imagesTr" / "road_1_0000.png"]
    validate_dataset(info)
    image, label = load_case(info.training[1], info)
    assert image.array.shape == (3, 16, 20) and label.array.shape == (16, 20)
