"""`resunet serve http` against a REAL server on loopback (uvicorn in a thread, and the CLI as a
subprocess), driven by a real HTTP client (httpx2) and raw sockets -- never only an in-process
test client. The model is a tiny randomly initialised 2-D ResUNet saved to ``tmp_path``."""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx2 as httpx
import nibabel as nib
import numpy as np
import pytest
import torch
import uvicorn
from PIL import Image

from resunet.data.io import read_volume
from resunet.infer.predictor import Predictor
from resunet.nets import build_model, model_config
from resunet.serve.http import create_app
from resunet.model.checkpoint import save_checkpoint

LABELS = {"background": 0, "organ": 1, "lesion": 2}
TIMEOUT = 30.0  # seconds: any single wait in these tests; reached only when something is broken


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """A tiny 2-D model (head bias balanced so that masks hold several labels) and test images."""
    root = tmp_path_factory.mktemp("serve")
    torch.manual_seed(0)
    model = build_model("resunet", spatial_dims=2, in_channels=1, out_channels=3, base_channels=4, depth=3).eval()
    with torch.no_grad():
        model.head.bias -= model(torch.rand(4, 1, 32, 32)).transpose(0, 1).flatten(1).median(dim=1).values
    save_checkpoint(root / "m.pt", {
        "state_dict": model.state_dict(), "model": model_config(model),
        "preprocess": {"modality": "ct", "ct_window": "abdomen", "crop_to_nonzero": False},
        "labels": LABELS, "inference": {"mode": "2d", "context": 0, "patch_size": [16, 16]},
    })
    rng = np.random.default_rng(0)
    affine = np.array([[0.8, 0.1, 0, -40.5], [-0.1, 0.7, 0, 12.25], [0, 0, 2.5, -80.0], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(rng.normal(50, 150, (37, 29, 5)).astype(np.int16), affine), str(root / "ct.nii.gz"))
    for k in range(4):  # different pictures, so that a mix-up inside a batch shows
        Image.fromarray(rng.integers(0, 256, (40 + 8 * k, 48), dtype=np.uint8)).save(root / f"img{k}.png")
    Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(root / "rgb.png")
    return {"model": root / "m.pt", "ct": root / "ct.nii.gz", "rgb": root / "rgb.png",
            **{f"img{k}": root / f"img{k}.png" for k in range(4)}}


@pytest.fixture(scope="module")
def predictor(files) -> Predictor:
    return Predictor.from_file(files["model"])


@pytest.fixture(scope="module")
def offline(files, predictor) -> dict[str, np.ndarray]:
    """`Predictor.predict` of every test image, the reference for the server's masks."""
    out = {k: predictor.predict([read_volume(files[k])]).array for k in ("ct", "img0", "img1", "img2", "img3")}
    assert all(len(np.unique(a)) >= 2 for a in out.values()), "masks of one label would make equality weak"
    return out


class Gated:
    """Wraps a predictor; ``predict_many`` blocks until ``release`` is set (a test-controlled gate)."""

    def __init__(self, inner: Predictor, fail_once: bool = False) -> None:
        self.inner, self.fail_once = inner, fail_once
        self.entered, self.release = threading.Event(), threading.Event()
        self.batches: list[int] = []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def predict_many(self, cases):
        self.batches.append(len(cases))
        self.entered.set()
        assert self.release.wait(TIMEOUT), "test never released the gate"
        if self.fail_once:
            self.fail_once = False
            raise RuntimeError("simulated CUDA out of memory")
        return self.inner.predict_many(cases)


@contextmanager
def running(app):
    """Serve ``app`` with uvicorn on a free loopback port in a thread; yield its base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + TIMEOUT
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(TIMEOUT)
        sock.close()


def wait_until(condition, what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def upload(url: str, path: Path, *, name: str | None = None, headers: dict | None = None,
           client: httpx.Client | None = None) -> httpx.Response:
    files = {"file": (name or path.name, path.read_bytes(), "application/octet-stream")}
    if client is not None:
        return client.post(f"{url}/v1/segment", files=files, headers=headers)
    return httpx.post(f"{url}/v1/segment", files=files, headers=headers, timeout=TIMEOUT)


def post_in_thread(url: str, path: Path, results: list) -> threading.Thread:
    thread = threading.Thread(target=lambda: results.append(upload(url, path)), daemon=True)
    thread.start()
    return thread


def png_mask(response: httpx.Response) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(response.content)))


def raw_request(port: int, head: bytes, body: bytes = b"", close_early: bool = False) -> bytes:
    """Send ``head`` + ``body`` on a raw socket; return the response (b"" when closed early)."""
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as s:
        s.sendall(head + body)
        if close_early:
            return b""
        data = b""
        while chunk := s.recv(65536):
            data += chunk
            if b"\r\n\r\n" in data and b'"}' in data:
                break
        return data


# --------------------------------------------------------------------------- results


def test_nifti_upload_returns_a_mask_with_the_input_affine_equal_to_offline_prediction(files, predictor, offline, tmp_path):
    uploads = tmp_path / "uploads"
    uploads.mkdir()
    with running(create_app(predictor, upload_dir=uploads)) as url:
        r = upload(url, files["ct"])
        raw = httpx.post(f"{url}/v1/segment", params={"filename": "ct.nii.gz"}, content=files["ct"].read_bytes(),
                         headers={"Content-Type": "application/octet-stream"}, timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/gzip"
    assert 'filename="ct_mask.nii.gz"' in r.headers["content-disposition"]
    (tmp_path / "mask.nii.gz").write_bytes(r.content)
    src, out = nib.load(str(files["ct"])), nib.load(str(tmp_path / "mask.nii.gz"))
    assert out.shape == src.shape and np.array_equal(out.affine, src.affine)
    assert np.array_equal(read_volume(tmp_path / "mask.nii.gz").array, offline["ct"])
    assert raw.status_code == 200 and raw.content == r.content  # the raw-body way gives the same mask
    assert list(uploads.iterdir()) == []  # private upload folders are removed


def test_png_round_trip_keeps_the_size_and_equals_offline_prediction(files, predictor, offline):
    with running(create_app(predictor)) as url:
        r = upload(url, files["img1"])
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    mask = png_mask(r)
    assert mask.shape == Image.open(files["img1"]).size[::-1]
    assert np.array_equal(mask, offline["img1"])


def test_health_model_and_metrics_report_what_happened(files, predictor):
    with running(create_app(predictor, max_batch=4, max_wait_ms=5, queue_size=7)) as url:
        assert httpx.get(f"{url}/health").json() == {"status": "ok"}
        model = httpx.get(f"{url}/v1/model").json()
        for _ in range(3):
            assert upload(url, files["img0"]).status_code == 200
        assert upload(url, files["ct"], name="notes.txt").status_code == 400
        metrics = httpx.get(f"{url}/metrics").json()
    assert model["labels"] == LABELS
    assert model["input"]["channels"] == 1 and model["input"]["mode"] == "2d"
    assert model["upload"]["formats"] == [".nii.gz", ".nii", ".png"]
    assert model["batching"] == {"max_batch": 4, "max_wait_ms": 5, "queue_size": 7}
    assert metrics["requests"] == {"total": 4, "by_status": {"200": 3, "400": 1}}
    assert metrics["batches"]["size_histogram"] == {"1": 3} and metrics["batches"]["items"] == 3
    lat = metrics["latency_ms"]
    assert lat["window"] == 3 and 0 < lat["p50"] <= lat["p90"] <= lat["p99"]
    assert metrics["queue"]["depth"] == 0 and metrics["queue"]["size"] == 7


# --------------------------------------------------------------------------- batching


@pytest.mark.parametrize("max_batch", [8, 1])
def test_concurrent_clients_share_batches_only_when_batching_is_on(files, predictor, offline, max_batch):
    """16 clients released together, max-wait 50 ms; every mask must still be the client's own."""
    app = create_app(predictor, max_batch=max_batch, max_wait_ms=50)
    barrier = threading.Barrier(16)
    results: list[tuple[int, httpx.Response]] = []

    def client(k: int) -> None:
        with httpx.Client(timeout=TIMEOUT) as c:
            c.get(f"{url}/health")  # connect first, so that the barrier releases real uploads
            barrier.wait()
            results.append((k % 4, upload(url, files[f"img{k % 4}"], client=c)))

    with running(app) as url:
        threads = [threading.Thread(target=client, args=(k,)) for k in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(TIMEOUT)
        hist = httpx.get(f"{url}/metrics").json()["batches"]["size_histogram"]
    assert len(results) == 16 and all(r.status_code == 200 for _, r in results)
    for k, r in results:
        assert np.array_equal(png_mask(r), offline[f"img{k}"])
    sizes = {int(s) for s in hist}
    assert sum(int(s) * n for s, n in hist.items()) == 16
    if max_batch == 1:
        assert sizes == {1}
    else:
        assert max(sizes) > 1, hist
        assert max(int(r.headers["x-resunet-batch-size"]) for _, r in results) > 1


@pytest.mark.parametrize("max_batch, expected", [(8, [1, 8]), (4, [1, 4, 4]), (1, [1] * 9)])
def test_waiting_requests_are_grouped_up_to_max_batch(files, predictor, max_batch, expected):
    """Deterministic: the worker is held on the first request until 8 more wait in the queue."""
    gated = Gated(predictor)
    app = create_app(gated, max_batch=max_batch, max_wait_ms=0, queue_size=16)
    results: list = []
    with running(app) as url:
        first = post_in_thread(url, files["img0"], results)
        assert gated.entered.wait(TIMEOUT)
        rest = [post_in_thread(url, files[f"img{k % 4}"], results) for k in range(8)]
        wait_until(lambda: app.state.batcher.depth == 8, "8 queued requests")
        gated.release.set()
        for t in (first, *rest):
            t.join(TIMEOUT)
    assert gated.batches == expected
    assert sorted(int(r.headers["x-resunet-batch-size"]) for r in results) == sorted(
        s for s in expected for _ in range(s))


def test_batcher_isolates_item_errors_and_survives_a_failing_batch():
    """The batcher alone (no HTTP): one item's error stays its own; a raising batch fails only
    its callers; `stop` fails what still waits and refuses new items."""
    from resunet.errors import InputError
    from resunet.serve.batching import DynamicBatcher, Stopped

    gate = threading.Event()
    seen: list[list[int]] = []

    def process(items: list[int]) -> list:
        gate.wait(TIMEOUT)
        seen.append(items)
        if -1 in items:
            raise RuntimeError("whole batch failed")
        return [InputError(f"bad {x}") if x % 2 else x * 10 for x in items]

    batcher = DynamicBatcher(process, max_batch=3, max_wait_ms=0, queue_size=10).start()
    futures = [batcher.submit(0)]
    wait_until(lambda: batcher.busy, "the worker holding item 0")
    futures += [batcher.submit(x) for x in (1, 2, 4)]  # wait together -> one batch
    assert batcher.depth == 3
    gate.set()
    assert futures[0].result(TIMEOUT).value == 0
    with pytest.raises(InputError, match="bad 1"):
        futures[1].result(TIMEOUT)
    assert [(f.result(TIMEOUT).value, f.result().batch_size) for f in futures[2:]] == [(20, 3), (40, 3)]
    with pytest.raises(RuntimeError, match="whole batch"):
        batcher.submit(-1).result(TIMEOUT)
    assert batcher.submit(6).result(TIMEOUT).value == 60  # the worker goes on
    assert seen == [[0], [1, 2, 4], [-1], [6]]
    batcher.stop()
    with pytest.raises(Stopped):
        batcher.submit(8)


# --------------------------------------------------------------------------- client errors


def test_uploads_over_the_limit_get_413_declared_or_streamed(files, predictor, tmp_path):
    uploads = tmp_path / "uploads"
    uploads.mkdir()
    limit_mb = 0.05  # 52 428 bytes
    big = os.urandom(200_000)
    with running(create_app(predictor, max_upload_mb=limit_mb, upload_dir=uploads)) as url:
        port = int(url.rsplit(":", 1)[1])
        # declared: refused from the headers alone, before any body byte is sent
        head = (b"POST /v1/segment?filename=a.nii.gz HTTP/1.1\r\nHost: x\r\n"
                b"Content-Type: application/octet-stream\r\nContent-Length: 10000000\r\n\r\n")
        answer = raw_request(port, head)
        assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
        assert b"--max-upload-mb" in answer
        declared = httpx.post(f"{url}/v1/segment", params={"filename": "a.png"}, content=big,
                              headers={"Content-Type": "application/octet-stream"}, timeout=TIMEOUT)
        assert declared.status_code == 413
        # undeclared (chunked, no Content-Length): counted while streaming, multipart and raw

        def chunks(prefix: bytes = b""):
            yield prefix
            for k in range(0, len(big), 16_384):
                yield big[k:k + 16_384]

        part = b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n\r\n'
        for headers, params, prefix in (
            ({"Content-Type": "application/octet-stream"}, {"filename": "a.png"}, b""),
            ({"Content-Type": "multipart/form-data; boundary=xyz"}, {}, part),
        ):
            streamed = httpx.post(f"{url}/v1/segment", params=params, content=chunks(prefix), headers=headers,
                                  timeout=TIMEOUT)
            assert streamed.status_code == 413 and "limit" in streamed.json()["detail"]
        # an upload under the limit still works on the same server
        assert upload(url, files["img0"]).status_code == 200
        wait_until(lambda: list(uploads.iterdir()) == [], "upload folders removed")


def test_bad_payloads_get_400_with_a_reason_and_the_server_goes_on(files, predictor, tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("this is a text file, not a picture\n")
    garbage = tmp_path / "scan.nii.gz"
    garbage.write_bytes(os.urandom(3000))
    empty = tmp_path / "empty.nii"
    empty.write_bytes(b"")
    truncated = tmp_path / "cut.nii.gz"
    truncated.write_bytes(files["ct"].read_bytes()[:400])
    with running(create_app(predictor)) as url:
        seg = f"{url}/v1/segment"
        cases = {
            "garbage bytes": upload(url, garbage),
            "text file": upload(url, text),
            "empty file": upload(url, empty),
            "truncated gzip": upload(url, truncated),
            "unknown extension": upload(url, files["ct"], name="ct.mha"),
            "rgb for a 1-channel model": upload(url, files["rgb"]),
            "wrong content type": httpx.post(seg, content=b"hello", headers={"Content-Type": "text/plain"}),
            "json body": httpx.post(seg, json={"image": "ct.nii.gz"}),
            "raw without filename": httpx.post(seg, content=files["ct"].read_bytes(),
                                               headers={"Content-Type": "application/octet-stream"}),
            "multipart without file field": httpx.post(seg, data={"image": "x"}, files={"other": ("a.png", b"x")}),
            "multipart cut short": httpx.post(seg, content=b"--xyz\r\nContent-Disposition: form-data; "
                                              b"name=\"file\"; filename=\"a.png\"\r\n\r\n\x89PNG",
                                              headers={"Content-Type": "multipart/form-data; boundary=xyz"}),
        }
        after = upload(url, files["img0"])
        metrics = httpx.get(f"{url}/metrics").json()
    for what, r in cases.items():
        assert r.status_code == 400, (what, r.status_code, r.text)
        detail = r.json()["detail"]
        assert isinstance(detail, str) and len(detail) > 10, what
        assert "/tmp" not in detail and "resunet-upload" not in detail, (what, detail)  # no server paths
    assert "3 image channel" in cases["rgb for a 1-channel model"].json()["detail"] or \
        "has 3" in cases["rgb for a 1-channel model"].json()["detail"]
    assert after.status_code == 200
    assert set(metrics["requests"]["by_status"]) == {"200", "400"}


def test_a_token_is_required_when_configured(files, predictor):
    with running(create_app(predictor, token="s3cret")) as url:
        assert httpx.get(f"{url}/health").status_code == 200  # health checks stay open
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            r = upload(url, files["img0"], headers=headers)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
            assert httpx.get(f"{url}/metrics", headers=headers).status_code == 401
            assert httpx.get(f"{url}/v1/model", headers=headers).status_code == 401
        ok = {"Authorization": "Bearer s3cret"}
        assert upload(url, files["img0"], headers=ok).status_code == 200
        assert httpx.get(f"{url}/v1/model", headers=ok).status_code == 200


# --------------------------------------------------------------------------- overload, failures


def test_a_full_queue_answers_503_with_retry_after(files, predictor):
    gated = Gated(predictor)
    app = create_app(gated, max_batch=1, max_wait_ms=0, queue_size=1)
    results: list = []
    with running(app) as url:
        in_flight = post_in_thread(url, files["img0"], results)
        assert gated.entered.wait(TIMEOUT)  # the worker holds request 1
        queued = post_in_thread(url, files["img1"], results)
        wait_until(lambda: app.state.batcher.depth == 1, "request 2 in the queue")
        refused = upload(url, files["img2"])  # queue (size 1) is full
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        assert "busy" in refused.json()["detail"]
        gated.release.set()
        in_flight.join(TIMEOUT), queued.join(TIMEOUT)
        assert [r.status_code for r in results] == [200, 200]
        assert upload(url, files["img2"]).status_code == 200  # room again


def test_an_unexpected_model_failure_is_a_generic_500_and_the_server_keeps_serving(files, predictor, offline, caplog):
    gated = Gated(predictor, fail_once=True)
    gated.release.set()
    with running(create_app(gated)) as url:
        failed = upload(url, files["img0"])
        after = upload(url, files["img0"])
    assert failed.status_code == 500
    assert "simulated" not in failed.text and "server log" in failed.json()["detail"]
    assert any("simulated CUDA out of memory" in (rec.exc_text or "") for rec in caplog.records)
    assert after.status_code == 200 and np.array_equal(png_mask(after), offline["img0"])


def test_shutdown_fails_queued_requests_with_503_and_finishes_the_running_batch(files, predictor):
    gated = Gated(predictor)
    app = create_app(gated, max_batch=1, max_wait_ms=0, queue_size=4)
    running_result: list = []
    queued_result: list = []
    with running(app) as url:
        in_flight = post_in_thread(url, files["img0"], running_result)
        assert gated.entered.wait(TIMEOUT)
        queued = post_in_thread(url, files["img1"], queued_result)
        wait_until(lambda: app.state.batcher.depth == 1, "request 2 in the queue")
        app.state.batcher.stop(wait=False)  # what SIGTERM does first in run_http_server
        queued.join(TIMEOUT)
        assert queued_result[0].status_code == 503 and "shutting down" in queued_result[0].json()["detail"]
        assert httpx.get(f"{url}/health").status_code == 503
        assert upload(url, files["img2"]).status_code == 503
        gated.release.set()
        in_flight.join(TIMEOUT)
        assert running_result[0].status_code == 200
    assert gated.batches == [1]


def test_clients_that_disconnect_do_not_break_the_batch_of_the_others(files, predictor, offline, tmp_path):
    uploads = tmp_path / "uploads"
    uploads.mkdir()
    gated = Gated(predictor)
    app = create_app(gated, max_batch=8, max_wait_ms=0, upload_dir=uploads)
    body = files["img1"].read_bytes()
    head = (b"POST /v1/segment?filename=img1.png HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body))
    results: list = []
    with running(app) as url:
        port = int(url.rsplit(":", 1)[1])
        first = post_in_thread(url, files["img0"], results)
        assert gated.entered.wait(TIMEOUT)
        # 1) half a body, then the socket closes: the upload never reaches the queue
        raw_request(port, head, body[: len(body) // 2], close_early=True)
        wait_until(lambda: app.state.metrics.snapshot()["requests"]["by_status"].get("499") == 1,
                   "the half upload noticed")
        # 2) a complete upload whose client leaves while it waits: it stays in the next batch
        leaver = socket.create_connection(("127.0.0.1", port))
        leaver.sendall(head + body)
        wait_until(lambda: app.state.batcher.depth == 1, "the leaver's request queued")
        stays = post_in_thread(url, files["img2"], results)
        wait_until(lambda: app.state.batcher.depth == 2, "the staying request queued")
        leaver.close()
        gated.release.set()
        first.join(TIMEOUT), stays.join(TIMEOUT)
        after = upload(url, files["img3"])
        wait_until(lambda: list(uploads.iterdir()) == [], "upload folders removed")
        metrics = httpx.get(f"{url}/metrics").json()
    assert gated.batches[:2] == [1, 2]  # the leaver and the staying client shared a batch
    assert [r.status_code for r in results] == [200, 200]
    masks = sorted((png_mask(r) for r in results), key=lambda m: m.shape)
    assert np.array_equal(masks[0], offline["img0"]) and np.array_equal(masks[1], offline["img2"])
    assert after.status_code == 200 and np.array_equal(png_mask(after), offline["img3"])
    assert "500" not in metrics["requests"]["by_status"]


# --------------------------------------------------------------------------- the real CLI


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))


def start_cli_server(model: Path, log_path: Path, *flags: str, env: dict | None = None,
                     preexec_fn=None) -> tuple[subprocess.Popen, str]:
    """``resunet serve http -m model --port 0 --log-level warning *flags`` as a subprocess logging to
    ``log_path``; waits (at most 60 s) until it listens and returns the process and its URL."""
    log = open(log_path, "w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "resunet", "serve", "http", "-m", str(model), "--port", "0", "--log-level",
         "warning", *flags], stdout=log, stderr=log, env=env, preexec_fn=preexec_fn)
    log.close()
    deadline = time.monotonic() + 60
    while "listening on" not in (text := log_path.read_text()):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"server did not start:\n{text}")
        time.sleep(0.05)
    return proc, text.split("listening on ")[1].split()[0]


def test_cli_server_under_load_then_sigterm(files, offline, tmp_path):
    """``resunet serve http`` as a subprocess: token from RESUNET_TOKEN, 8 clients for ~5 s, no 5xx
    but 503, RSS growth after warm-up < 10 %, then SIGTERM exits cleanly."""
    env = {**os.environ, "RESUNET_TOKEN": "t0ken", "OMP_NUM_THREADS": "1"}
    proc, url = start_cli_server(files["model"], tmp_path / "server.log", "--max-batch", "8", "--max-wait-ms", "10",
                                 "--queue-size", "64", env=env)
    try:
        assert url.startswith("http://127.0.0.1:")
        assert upload(url, files["img0"]).status_code == 401
        auth = {"Authorization": "Bearer t0ken"}
        first = upload(url, files["ct"], headers=auth)
        assert first.status_code == 200
        (tmp_path / "mask.nii.gz").write_bytes(first.content)
        assert np.array_equal(read_volume(tmp_path / "mask.nii.gz").array, offline["ct"])

        statuses: list[int] = []
        latencies: list[float] = []
        lock = threading.Lock()
        stop_at = time.monotonic() + 5.0
        payload = files["img2"].read_bytes()

        def client() -> None:
            with httpx.Client(timeout=TIMEOUT, headers=auth) as c:
                while time.monotonic() < stop_at:
                    t0 = time.perf_counter()
                    r = c.post(f"{url}/v1/segment", files={"file": ("img2.png", payload)})
                    with lock:
                        statuses.append(r.status_code)
                        latencies.append(time.perf_counter() - t0)

        threads = [threading.Thread(target=client) for _ in range(8)]
        for t in threads:
            t.start()
        time.sleep(1.5)  # warm-up: allocator pools, thread pools
        rss_warm = rss_mib(proc.pid)
        for t in threads:
            t.join(TIMEOUT)
        rss_end = rss_mib(proc.pid)
        metrics = httpx.get(f"{url}/metrics", headers=auth).json()
        lat = np.asarray(latencies) * 1000
        print(f"\nload: {len(statuses)} requests, p50 {np.percentile(lat, 50):.1f} ms, "
              f"p99 {np.percentile(lat, 99):.1f} ms, RSS {rss_warm:.0f} -> {rss_end:.0f} MiB, "
              f"batches {metrics['batches']['size_histogram']}")
        assert len(statuses) > 20
        assert not [s for s in statuses if s >= 500 and s != 503]
        assert statuses.count(200) >= 0.9 * len(statuses)
        assert rss_end < 1.10 * rss_warm
        assert metrics["requests"]["by_status"]["200"] == statuses.count(200) + 1

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(TIMEOUT) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = (tmp_path / "server.log").read_text()
    assert "Traceback" not in text and text.rstrip().endswith("resunet serve http: stopped")
