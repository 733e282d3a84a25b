"""RGB pictures end to end (issue 19): train on an images/ + masks/ folder of RGB PNGs, then predict
RGB PNGs, RGB JPEGs, a single RGB file and the same pictures over HTTP; grey-vs-RGB mismatches
fail clearly (exit code 2); ``--png-visible`` writes 0/255; ``evaluate --images`` draws RGB overlays.

The pictures are real photographs shipped with scikit-image (astronaut, coffee, chelsea), made
small; the masks come from a colour rule (reddish pixels), so there is something to learn.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import httpx2 as httpx
import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from skimage import data as skdata
from skimage.transform import resize

from resunet.cli import main as cli_main
from resunet.data.channels import read_case
from resunet.data.datasets import find_dataset, load_case, validate_dataset
from resunet.infer.predictor import Predictor
from resunet.nets import build_model, model_config
from resunet.serve.http import create_app
from resunet.model.checkpoint import save_checkpoint
from test_serve_http import running  # the real uvicorn server on a free loopback port

TIMEOUT = 30.0


def small(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """``image`` (H, W, 3) uint8 resized to ``shape`` (uint8)."""
    return (resize(image, shape, anti_aliasing=True) * 255).round().astype(np.uint8)


def reddish(rgb: np.ndarray) -> np.ndarray:
    """The colour rule of the masks: 1 where red clearly dominates green and blue."""
    r, g, b = (rgb[..., i].astype(int) for i in range(3))
    return ((r > g + 30) & (r > b + 30)).astype(np.uint8)


def cli(args: list[str], capsys) -> tuple[int, str]:
    """Run ``resunet ARGS`` in this process; return its exit code and its output."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as done:
        cli_main(args)
    out = capsys.readouterr()
    return int(done.value.code or 0), out.err + out.out


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> dict[str, Path]:
    """The training folder (RGB PNGs, 0/1 PNG masks) and the pictures to predict."""
    root = tmp_path_factory.mktemp("rgb")
    ds = root / "dataset"
    (ds / "images").mkdir(parents=True)
    (ds / "masks").mkdir()
    astronaut = small(skdata.astronaut(), (128, 128))
    coffee = small(skdata.coffee(), (96, 144))
    crops = [astronaut[:64, :64], astronaut[:64, 64:], astronaut[64:, :64], astronaut[64:, 64:],
             coffee[16:80, 40:104], coffee[16:80, 80:144]]
    for i, crop in enumerate(crops):
        Image.fromarray(crop).save(ds / "images" / f"c{i}.png")
        Image.fromarray(reddish(crop)).save(ds / "masks" / f"c{i}.png")  # label indices 0/1
    # pictures to predict: other sizes (not multiples of the network's divisor), other photos
    pictures = {
        "cat": small(skdata.chelsea(), (45, 67)),
        "cup": coffee[10:60, 30:101],
        "face": astronaut[20:77, 30:83],
    }
    for sub in ("png", "jpg", "gray"):
        (root / sub).mkdir()
    for name, rgb in pictures.items():
        Image.fromarray(rgb).save(root / "png" / f"{name}.png")
        Image.fromarray(rgb).save(root / "jpg" / f"{name}.jpg", quality=95)
        Image.fromarray(rgb).convert("L").save(root / "gray" / f"{name}.png")
    return {"root": root, "dataset": ds, "png": root / "png", "jpg": root / "jpg", "gray": root / "gray"}


@pytest.fixture(scope="module")
def rgb_model(work) -> Path:
    """A tiny 3-channel model trained by ``resunet train --dataset`` on the RGB folder."""
    root = work["root"]
    config = {
        "data": {"cache_dir": str(root / "cache"), "val_cases": ["c5"], "preprocess": {"modality": "none"},
                 "mode": "2d", "context": 0, "foreground_fraction": 0.5},
        "model": {"name": "resunet", "base_channels": 4, "depth": 3},
        "optimizer": {"lr": 0.01},
        "stages": [{"patch_size": [48, 48], "batch_size": 4, "epochs": 2, "iterations_per_epoch": 5}],
        "seed": 0,
        "device": "cpu",
    }
    (root / "train.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit) as done:
        cli_main(["train", "--config", str(root / "train.yaml"), "--dataset", str(work["dataset"]),
                  "--out", str(root / "run")])
    assert not done.value.code, "training failed"
    best = root / "run" / "best.pt"
    assert best.is_file()
    assert Predictor.from_file(best).num_input_channels == 3
    return best


@pytest.fixture(scope="module")
def gray_model(tmp_path_factory) -> Path:
    """An untrained 1-channel model (for the mismatch checks only)."""
    path = tmp_path_factory.mktemp("gray") / "gray.pt"
    torch.manual_seed(0)
    net = build_model("resunet", spatial_dims=2, in_channels=1, out_channels=1, base_channels=4, depth=3)
    save_checkpoint(path, {
        "state_dict": net.state_dict(), "model": model_config(net),
        "preprocess": {"modality": "none"}, "labels": {"background": 0, "foreground": 1},
        "inference": {"mode": "2d", "context": 0, "patch_size": [32, 32]},
    })
    return path


def predict(model: Path, source: Path, out: Path, capsys, *extra: str) -> tuple[int, str]:
    return cli(["predict", "-m", str(model), "-i", str(source), "-o", str(out), "--backend", "eager", *extra], capsys)


def masks(folder: Path) -> dict[str, np.ndarray]:
    return {p.stem: np.asarray(Image.open(p)) for p in sorted(folder.glob("*.png"))}


def upload(url: str, path: Path) -> httpx.Response:
    files = {"file": (path.name, path.read_bytes(), "application/octet-stream")}
    return httpx.post(f"{url}/v1/segment", files=files, timeout=TIMEOUT)


# --------------------------------------------------------------------------- tests


def test_an_rgb_images_masks_folder_is_a_three_channel_dataset(work):
    info = find_dataset(work["dataset"])
    assert info.channel_names == ["R", "G", "B"]
    validate_dataset(info)
    image, label = load_case(info.training[0], info)
    assert image.array.shape == (3, 64, 64) and label.array.shape == (64, 64)
    assert set(np.unique(label.array)) == {0, 1}


def test_png_jpeg_single_file_and_http_give_the_same_masks_of_the_input_size(work, rgb_model, tmp_path, capsys):
    out = tmp_path / "out"
    code, text = predict(rgb_model, work["png"], out / "png", capsys)
    assert code == 0, text
    code, text = predict(rgb_model, work["jpg"], out / "jpg", capsys)
    assert code == 0, text
    code, text = predict(rgb_model, work["png"] / "cat.png", out / "single", capsys)
    assert code == 0, text

    from_png, from_jpg = masks(out / "png"), masks(out / "jpg")
    single = np.asarray(Image.open(out / "single" / "cat.png"))
    assert sorted(from_png) == sorted(from_jpg) == ["cat", "cup", "face"]  # JPEG inputs give PNG masks
    assert not list((out / "jpg").glob("*.jpg"))
    for name, mask in from_png.items():
        size = Image.open(work["png"] / f"{name}.png").size[::-1]
        assert mask.shape == size and from_jpg[name].shape == size
        assert set(np.unique(mask)) <= {0, 1}
        assert np.mean(mask == from_jpg[name]) >= 0.9  # JPEG is lossy: mostly the same mask
    assert np.array_equal(single, from_png["cat"])
    assert len(np.unique(np.concatenate([m.ravel() for m in from_png.values()]))) == 2, \
        "masks of one label would make the equality checks weak"

    with running(create_app(Predictor.from_file(rgb_model))) as url:
        replies = {name: upload(url, work["png"] / f"{name}.png") for name in from_png}
    for name, reply in replies.items():
        assert reply.status_code == 200, reply.text
        assert reply.headers["content-type"] == "image/png"
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(reply.content))), from_png[name])


def test_channel_files_and_rgb_frames_named_like_channel_files(work, rgb_model, tmp_path, capsys):
    """nnU-Net channel files (grey R, G, B pictures) give the RGB picture's mask; RGB pictures named
    ``frame_0001.png`` are cases of their own."""
    rgb = np.asarray(Image.open(work["png"] / "cup.png"))
    folder = tmp_path / "in"
    folder.mkdir()
    for c in range(3):
        Image.fromarray(rgb[..., c]).save(folder / f"cup_{c:04d}.png")
    Image.fromarray(rgb).save(folder / "frame_0001.png")
    Image.fromarray(rgb).save(folder / "frame_0002.png")
    code, text = predict(rgb_model, folder, tmp_path / "out", capsys)
    assert code == 0, text
    got = masks(tmp_path / "out")
    assert sorted(got) == ["cup", "frame_0001", "frame_0002"]
    code, text = predict(rgb_model, work["png"] / "cup.png", tmp_path / "ref", capsys)
    assert code == 0, text
    reference = np.asarray(Image.open(tmp_path / "ref" / "cup.png"))
    for mask in got.values():
        assert np.array_equal(mask, reference)


def test_grey_picture_for_an_rgb_model_fails_clearly(work, rgb_model, tmp_path, capsys):
    code, text = predict(rgb_model, work["gray"] / "cat.png", tmp_path / "a", capsys)
    assert code == 2 and "Traceback" not in text
    assert "cat.png has 1 channel (grey) but the model needs 3 channels (RGB)" in text
    assert "RGB" in text and "CASE_0000.png" in text  # the fix
    code, text = predict(rgb_model, work["gray"], tmp_path / "b", capsys)
    assert code == 2
    for name in ("cat.png", "cup.png", "face.png"):
        assert f"{name} has 1 channel (grey) but the model needs 3 channels (RGB)" in text
    assert not (tmp_path / "b").exists() or not list((tmp_path / "b").iterdir())

    with running(create_app(Predictor.from_file(rgb_model))) as url:
        reply = upload(url, work["gray"] / "cat.png")
    assert reply.status_code == 400
    assert "cat.png has 1 channel (grey) but the model needs 3 channels (RGB)" in reply.json()["detail"]


def test_rgb_picture_for_a_grey_model_fails_clearly(work, gray_model, tmp_path, capsys):
    code, text = predict(gray_model, work["png"] / "cat.png", tmp_path / "a", capsys)
    assert code == 2 and "Traceback" not in text
    assert "cat.png has 3 channels (RGB) but the model needs 1 channel (grey)" in text
    assert "convert" in text  # the fix
    code, text = predict(gray_model, work["jpg"], tmp_path / "b", capsys)
    assert code == 2
    for name in ("cat.jpg", "cup.jpg", "face.jpg"):
        assert f"{name} has 3 channels (RGB) but the model needs 1 channel (grey)" in text
    # and the grey pictures themselves are fine for it
    code, text = predict(gray_model, work["gray"], tmp_path / "c", capsys)
    assert code == 0, text
    assert sorted(masks(tmp_path / "c")) == ["cat", "cup", "face"]


def test_png_visible_writes_0_and_255(work, rgb_model, tmp_path, capsys):
    code, text = predict(rgb_model, work["png"], tmp_path / "plain", capsys)
    assert code == 0, text
    code, text = predict(rgb_model, work["png"], tmp_path / "visible", capsys, "--png-visible")
    assert code == 0, text
    plain, visible = masks(tmp_path / "plain"), masks(tmp_path / "visible")
    assert sorted(plain) == sorted(visible)
    assert set(np.unique(np.concatenate([v.ravel() for v in visible.values()]))) == {0, 255}
    for name in plain:
        assert np.array_equal(visible[name], plain[name].astype(np.uint8) * 255)


def test_rgba_picture_is_three_channels_with_a_warning(work, rgb_model, tmp_path):
    rgb = np.asarray(Image.open(work["png"] / "face.png"))
    rgba = np.concatenate([rgb, np.full(rgb.shape[:2] + (1,), 200, np.uint8)], axis=-1)
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "face.png")
    with pytest.warns(UserWarning, match=r"face.png: its alpha .* dropped"):
        channels = read_case([tmp_path / "face.png"], 3)
    assert [c.array.shape for c in channels] == [rgb.shape[:2]] * 3
    predictor = Predictor.from_file(rgb_model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = predictor.predict(read_case([work["png"] / "face.png"], 3))
    assert np.array_equal(predictor.predict(channels).array, reference.array)
    # in a training folder: 3 channels too, and validation says once that alpha is dropped
    ds = tmp_path / "ds"
    (ds / "images").mkdir(parents=True)
    (ds / "masks").mkdir()
    Image.fromarray(rgba, mode="RGBA").save(ds / "images" / "face.png")
    Image.fromarray(reddish(rgb)).save(ds / "masks" / "face.png")
    info = find_dataset(ds)
    assert info.channel_names == ["R", "G", "B"]
    with pytest.warns(UserWarning, match=r"1 image\(s\) .* alpha .* images/face.png"):
        validate_dataset(info)


def test_evaluate_draws_rgb_overlays_for_png_and_jpeg_images(work, rgb_model, tmp_path, capsys):
    gt = tmp_path / "gt"
    gt.mkdir()
    for name in ("cat", "cup", "face"):
        Image.fromarray(reddish(np.asarray(Image.open(work["png"] / f"{name}.png")))).save(gt / f"{name}.png")
    code, text = predict(rgb_model, work["png"], tmp_path / "pred", capsys)
    assert code == 0, text
    for images in ("png", "jpg"):
        report = tmp_path / f"eval_{images}"
        code, text = cli(["evaluate", "--pred", str(tmp_path / "pred"), "--gt", str(gt), "--out", str(report),
                          "--images", str(work[images])], capsys)
        assert code == 0, text
        overlays = sorted((report / "overlays").glob("*.png"))
        assert overlays, f"no overlays for the {images} images"
        assert "overlays/" in (report / "report.md").read_text()
        for path in overlays:
            shown = np.asarray(Image.open(path).convert("RGB")).astype(int)
            spread = shown.max(axis=-1) - shown.min(axis=-1)
            # a photo in colour, not a grey rendering with only the contour lines coloured
            assert np.mean(spread > 25) > 0.1, path.name
