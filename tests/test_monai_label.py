"""The MONAI Label API of `resunet serve http --studies DIR`, driven by MONAI Label's own client
(``monailabel.client.MONAILabelClient``, what 3D Slicer's module wraps) over real sockets: the
CLI as a subprocess, and the app under uvicorn in a thread for the batching and error cases.

``monailabel`` is installed without its dependencies (README test command); only when it
cannot be imported do the client tests skip, saying so."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx2 as httpx
import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from pacs_helpers import LABELS, ct_array, make_checkpoint
from test_serve_http import TIMEOUT, Gated, running, wait_until

from resunet.data.io import read_volume
from resunet.infer.predictor import Predictor
from resunet.serve.http import create_app
from resunet.serve.monai_label import FolderDatastore, model_name, monai_label_routes

try:
    from monailabel.client.client import MONAILabelClient, MONAILabelClientException
except ImportError as err:  # not installed, or its module cgi is gone (Python >= 3.13)
    MONAILabelClient = None
    WHY = f"monailabel.client cannot be imported ({type(err).__name__}: {err}); install it with " \
          "pip install -c constraints.txt --no-deps monailabel==0.8.5 (the README test command does)"

needs_client = pytest.mark.skipif(MONAILabelClient is None, reason=globals().get("WHY", ""))
FOREGROUND = {"organ": 1, "lesion": 2}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """A tiny 3-class CT model named ``liver`` and two CT volumes (NIfTI, oblique affine; NRRD)."""
    root = tmp_path_factory.mktemp("monai")
    model = make_checkpoint(root / "liver.pt")
    affine = np.array([[0.8, 0.1, 0, -40.5], [-0.1, 0.7, 0, 12.25], [0, 0, 2.5, -80.0], [0, 0, 0, 1]])
    data = np.transpose(ct_array((6, 24, 20), seed=1), (2, 1, 0)).astype(np.int16)
    nib.save(nib.Nifti1Image(data, affine), str(root / "ct.nii.gz"))
    other = sitk.GetImageFromArray(ct_array((5, 20, 22), seed=2).astype(np.int16))
    other.SetSpacing((0.9, 0.9, 3.0))
    other.SetOrigin((10.0, -5.0, 30.0))
    sitk.WriteImage(other, str(root / "mr.nrrd"))
    return {"model": model, "ct": root / "ct.nii.gz", "nrrd": root / "mr.nrrd"}


@pytest.fixture(scope="module")
def predictor(files) -> Predictor:
    return Predictor.from_file(files["model"])


@pytest.fixture(scope="module")
def offline(files, predictor) -> dict[str, np.ndarray]:
    out = {k: predictor.predict([read_volume(files[k])]).array for k in ("ct", "nrrd")}
    assert all(len(np.unique(a)) >= 2 for a in out.values()), "masks of one label would make equality weak"
    return out


def same_geometry(a, b) -> bool:
    return (a.shape == b.shape and np.allclose(a.spacing, b.spacing, atol=1e-5)
            and np.allclose(a.origin, b.origin, atol=1e-4) and np.allclose(a.direction, b.direction, atol=1e-6))


# --------------------------------------------------------------------------- the real client, the real CLI


@needs_client
def test_slicer_flow_with_the_monailabel_client_against_the_cli_server(files, offline, tmp_path):
    """info -> upload_image -> datastore -> infer (by ID, NRRD uint16; and with the file itself),
    against ``resunet serve http --studies`` as a subprocess; the labels equal offline prediction."""
    studies, received = tmp_path / "studies", tmp_path / "client"
    studies.mkdir(), received.mkdir()
    log = tmp_path / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "resunet", "serve", "http", "-m", str(files["model"]),
                                 "--port", "0", "--studies", str(studies), "--log-level", "warning"],
                                stdout=out, stderr=out, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 60
        while "listening on" not in (text := log.read_text()):
            assert proc.poll() is None and time.monotonic() < deadline, text
            time.sleep(0.05)
        client = MONAILabelClient(text.split("listening on ")[1].split()[0], tmpdir=str(received))

        info = client.info()
        assert info["name"] == "resunet" and info["labels"] == ["organ", "lesion"]
        assert info["models"] == {"liver": {**info["models"]["liver"], "type": "segmentation",
                                            "labels": FOREGROUND, "dimension": 3}}

        assert client.upload_image(str(files["ct"]), image_id="case 1") == {"image": "case 1"}
        assert (studies / "case 1.nii.gz").read_bytes() == files["ct"].read_bytes()
        listed = client.datastore()["objects"]
        assert list(listed) == ["case 1"] and listed["case 1"]["image"]["ext"] == ".nii.gz"

        label, params = client.infer("liver", "case 1", {"result_extension": ".nrrd", "result_dtype": "uint16"})
        assert label.endswith(".nrrd") and params["label_names"] == FOREGROUND
        assert sitk.ReadImage(label).GetPixelID() == sitk.sitkUInt16
        got = read_volume(label)
        assert same_geometry(got, read_volume(files["ct"]))
        np.testing.assert_array_equal(got.array, offline["ct"])

        label, params = client.infer("liver", "", {}, file=str(files["nrrd"]))  # the image itself, no datastore
        assert label.endswith(".nrrd") and params["batch_size"] == 1
        np.testing.assert_array_equal(read_volume(label).array, offline["nrrd"])
        assert read_volume(label).array.dtype == np.uint8  # the default result_dtype

        with pytest.raises(MONAILabelClientException, match="404"):
            client.infer("liver", "nowhere", {})
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, log.read_text()


@needs_client
def test_the_token_guards_the_monai_label_routes(files, predictor, tmp_path):
    app = create_app(predictor, token="s3cret", routes=[monai_label_routes(tmp_path)])
    with running(app) as url:
        client = MONAILabelClient(url, tmpdir=str(tmp_path))
        with pytest.raises(MONAILabelClientException, match="401"):
            client.info()
        client.update_auth({"token_type": "Bearer", "access_token": "s3cret"})
        assert "liver" in client.info()["models"]
        assert client.upload_image(str(files["ct"]), image_id="ct")["image"] == "ct"


# --------------------------------------------------------------------------- raw HTTP: outputs, batching, errors


def infer(url: str, model: str = "liver", *, image: str = "", output: str | None = None,
          params: dict | str | None = None, file: Path | None = None) -> httpx.Response:
    query = {"image": image, **({"output": output} if output else {})}
    form = {"params": params if isinstance(params, str) else json.dumps(params or {})}
    upload = {"file": (file.name, file.read_bytes(), "application/octet-stream")} if file else None
    return httpx.post(f"{url}/infer/{model}", params=query, data=form, files=upload, timeout=TIMEOUT)


def put_image(url: str, path: Path, image: str | None = None, name: str | None = None) -> httpx.Response:
    return httpx.put(f"{url}/datastore/", params={"image": image} if image else None,
                     files={"file": (name or path.name, path.read_bytes())}, data={"params": "{}"}, timeout=TIMEOUT)


def test_outputs_image_and_json_and_the_stored_image_comes_back(files, predictor, offline, tmp_path):
    with running(create_app(predictor, routes=[monai_label_routes(tmp_path)])) as url:
        assert put_image(url, files["nrrd"]).json() == {"image": "mr"}  # the ID from the file name
        image = infer(url, image="mr", output="image", params={"result_extension": ".nii.gz"})
        as_json = infer(url, image="mr", output="json")
        stored = httpx.get(f"{url}/datastore/image", params={"image": "mr"})
        stats = httpx.get(f"{url}/datastore/").json()
    assert image.status_code == 200 and image.headers["content-type"] == "application/gzip"
    assert image.headers["content-disposition"] == 'attachment; filename="mr_label.nii.gz"'
    (tmp_path / "got.nii.gz").write_bytes(image.content)
    got = read_volume(tmp_path / "got.nii.gz")
    assert same_geometry(got, read_volume(files["nrrd"]))
    np.testing.assert_array_equal(got.array, offline["nrrd"])
    assert as_json.json()["label_names"] == FOREGROUND and as_json.json()["latencies"]["total"] > 0
    assert stored.content == files["nrrd"].read_bytes()
    assert stats == {"total": 1, "completed": 0, "label_tags": {}}


def test_infer_requests_share_the_servers_batches(files, predictor, offline, tmp_path):
    """Three /infer calls while the worker is held: the first runs alone, the other two in one batch."""
    gated = Gated(predictor)
    app = create_app(gated, max_batch=2, max_wait_ms=0, routes=[monai_label_routes(tmp_path)])
    results: list[httpx.Response] = []

    def call(path: Path) -> threading.Thread:
        thread = threading.Thread(target=lambda: results.append(infer(url, output="json", file=path)), daemon=True)
        thread.start()
        return thread

    with running(app) as url:
        threads = [call(files["ct"])]
        assert gated.entered.wait(TIMEOUT)
        threads += [call(files["nrrd"]), call(files["ct"])]
        wait_until(lambda: app.state.batcher.depth == 2, "two /infer requests queued")
        gated.release.set()
        for t in threads:
            t.join(TIMEOUT)
    assert gated.batches == [1, 2]
    assert sorted(r.json()["batch_size"] for r in results) == [1, 2, 2]


def test_bad_requests_get_a_reason_and_nothing_is_stored(files, predictor, tmp_path):
    studies = tmp_path / "studies"
    studies.mkdir()
    (studies / "broken.nii.gz").write_bytes(b"not an image")
    (tmp_path / "big.nii.gz").write_bytes(os.urandom(20_000))
    with running(create_app(predictor, max_upload_mb=0.01, routes=[monai_label_routes(studies)])) as url:
        answers = {
            "unknown model": infer(url, "spleen", image="x"),
            "unknown image": infer(url, image="nowhere"),
            "no image at all": infer(url),
            "params not JSON": infer(url, image="x", params="{oops"),
            "bad extension": infer(url, file=files["ct"], params={"result_extension": ".jpg"}),
            "bad dtype": infer(url, file=files["ct"], params={"result_dtype": "float16"}),
            "dicom_seg": infer(url, image="x", output="dicom_seg"),
            "unreadable upload": put_image(url, studies / "broken.nii.gz", image="broken2"),
            "bad ID": put_image(url, files["nrrd"], image="../escape"),
            "wrong format": put_image(url, files["ct"], name="ct.jpg"),
            "too large": put_image(url, tmp_path / "big.nii.gz"),
        }
        store = httpx.get(f"{url}/datastore/", params={"output": "all"}).json()
    status = {k: r.status_code for k, r in answers.items()}
    assert status == {"unknown model": 404, "unknown image": 404, "no image at all": 400, "params not JSON": 400,
                      "bad extension": 400, "bad dtype": 400, "dicom_seg": 400, "unreadable upload": 400,
                      "bad ID": 400, "wrong format": 400, "too large": 413}
    detail = {k: r.json()["detail"] for k, r in answers.items()}
    assert "'liver'" in detail["unknown model"] and "upload it first" in detail["unknown image"]
    assert "float16" in detail["bad dtype"] and "uint16" in detail["bad dtype"]
    assert ".nrrd" in detail["bad extension"] and "--max-upload-mb" in detail["too large"]
    assert "'/'" in detail["bad ID"] and "broken" in detail["unreadable upload"]
    assert list(store["objects"]) == ["broken"]  # only the file that was there; no upload was kept
    assert not (tmp_path / "escape.nrrd").exists()


def test_uploads_and_inference_keep_the_servers_voxel_limit(files, predictor, tmp_path):
    """--max-voxels (the memory admission of /v1/segment) refuses the 2 880-voxel CT on both routes."""
    with running(create_app(predictor, max_voxels=1000, routes=[monai_label_routes(tmp_path)])) as url:
        refused = {"infer": infer(url, file=files["ct"]), "upload": put_image(url, files["ct"])}
        segment = httpx.post(f"{url}/v1/segment", files={"file": ("ct.nii.gz", files["ct"].read_bytes())})
    assert {k: r.status_code for k, r in refused.items()} == {"infer": 413, "upload": 413}
    assert all("--max-voxels" in r.json()["detail"] for r in refused.values())
    assert segment.status_code == 413 and list(tmp_path.iterdir()) == []


def test_folder_datastore_and_model_name(tmp_path):
    (tmp_path / "a.nii.gz").write_bytes(b"x")
    (tmp_path / ".a.nii.gz.123.tmp.nii.gz").write_bytes(b"half")  # an upload being written
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "labels" / "final").mkdir(parents=True)
    (tmp_path / "labels" / "final" / "a.nrrd").write_bytes(b"y")
    store = FolderDatastore(tmp_path)
    assert store.to_json()["objects"]["a"]["labels"] == {"final": {"ext": ".nrrd", "info": {"name": "a.nrrd"}}}
    assert store.status() == {"total": 1, "completed": 1, "label_tags": {"final": 1}}
    (tmp_path / "b.png").write_bytes(b"z")
    store.add("a", tmp_path / "b.png", ".png")  # same ID, other format: replaces
    assert store.images() == {"a": tmp_path / "a.png", "b": tmp_path / "b.png"}
    with pytest.raises(Exception, match="--studies .* is not a folder"):
        FolderDatastore(tmp_path / "missing")

    class Named:
        def __init__(self, source):
            self.source = source

    assert [model_name(Named(s)) for s in ("runs/liver/best.pt", "/m/spleen v2.onnx", None)] == [
        "liver", "spleen_v2", "resunet"]
