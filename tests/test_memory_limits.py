"""Issue 20: a few small hostile uploads must not exhaust the server's memory.

Decompression bombs (a ~1 MB ``.nii.gz`` whose header declares, and whose gzip stream really
holds, a gigabyte of zeros; a PNG of zeros the size of a wall) against a REAL ``resunet serve
http`` subprocess with a small ``--max-memory-gb``: its own peak RSS (``VmHWM``) stays under the
budget, every bomb is answered 413 / 503 in bounded time, honest requests are served meanwhile
and afterwards. The same bounds for the DICOM node (pynetdicom C-STORE on loopback) and for
``resunet predict`` on a folder. Unit tests pin `estimate_request_bytes` and `MemoryBudget`.

Every server subprocess runs under an address-space limit (``RLIMIT_AS``), so that a regression
fails the test instead of exhausting the machine.
"""

from __future__ import annotations

import asyncio
import gzip
import io
import os
import resource
import struct
import subprocess
import sys
import threading
import time
import zlib
from concurrent.futures import Future
from pathlib import Path

import httpx2 as httpx
import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image
from dicom_series import write_ct_series
from pacs_helpers import StoreSCP, ct_array, make_checkpoint, scu, send_files, wait_for
from pydicom.uid import DeflatedExplicitVRLittleEndian, generate_uid
from pynetdicom.sop_class import CTImageStorage
from test_dicom_node import check_seg, idle
from test_serve_http import TIMEOUT, Gated, files, offline, predictor, running, start_cli_server, upload  # noqa: F401

from resunet.data.headers import declared_size
from resunet.data.io import read_volume
from resunet.data.limits import DEFAULT_MAX_VOXELS, GZIP_TRAILING_SLACK, DeclaredSize, TooLarge, check_voxels
from resunet.errors import ConfigError, InputError
from resunet.infer.memory import (
    SLACK_BYTES, BudgetTimeout, MemoryBudget, ModelFootprint, OverBudget, estimate_request_bytes,
    process_memory_bytes,
)
from resunet.infer.predictor import Predictor
from resunet.serve.dicom_node import Destination, DicomNode, DicomNodeConfig
from resunet.serve.http import create_app

GIB = 2**30
BUDGET_GB = 1.5  # --max-memory-gb of the server under attack
SAFETY_AS = 8 * GIB  # RLIMIT_AS of server subprocesses: a broken limit fails, it does not swap the machine


def _limit_address_space() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (SAFETY_AS, SAFETY_AS))


# --------------------------------------------------------------------------- bombs


def write_nifti_bomb(path: Path, shape: tuple[int, ...], stream_bytes: int | None = None) -> Path:
    """A ``.nii.gz`` whose header declares ``shape`` uint8 and whose gzip stream holds
    ``stream_bytes`` (default: exactly the declared size) of zeros after the header.

    Written in ~1 s: one 1 MiB block of zeros is deflated once with a full flush (so it does not
    depend on what precedes it) and repeated; the CRC-32 is computed over the real stream.
    """
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(np.uint8)
    header.set_qform(np.eye(4), 1)
    header.set_sform(np.eye(4), 1)
    header["vox_offset"] = 352
    head = header.binaryblock + b"\0" * 4  # 348-byte header + empty extension flag = offset 352
    total = int(np.prod(shape)) if stream_bytes is None else stream_bytes
    chunk = 1 << 20
    assert total % chunk == 0 or total < chunk
    zero = bytes(min(chunk, total))
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = deflate.compress(zero) + deflate.flush(zlib.Z_FULL_FLUSH)
    first = zlib.compressobj(9, zlib.DEFLATED, -15)
    crc = zlib.crc32(head)
    with open(path, "wb") as fh:
        fh.write(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff")  # gzip member header
        fh.write(first.compress(head) + first.flush(zlib.Z_FULL_FLUSH))
        for _ in range(max(1, total // len(zero))):
            fh.write(block)
            crc = zlib.crc32(zero, crc)
        fh.write(zlib.compressobj(9, zlib.DEFLATED, -15).flush(zlib.Z_FINISH))  # final empty block
        fh.write(struct.pack("<II", crc & 0xFFFFFFFF, (len(head) + total) & 0xFFFFFFFF))
    return path


@pytest.fixture(scope="module")
def bombs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bombs")
    Image.new("L", (9000, 9000)).save(root / "wall.png")  # 81 M pixels of zeros, ~80 KB
    return {
        "voxels": write_nifti_bomb(root / "giga.nii.gz", (1024, 1024, 1024)),  # 1 GiB declared: over --max-voxels
        "memory": write_nifti_bomb(root / "mega.nii.gz", (512, 512, 512)),  # fits --max-voxels, not the budget
        "png": root / "wall.png",  # one slice far larger than a forward batch: not the budget
        "heavy": write_nifti_bomb(root / "heavy.nii.gz", (512, 512, 100)),  # fits alone, two do not
        "long": write_nifti_bomb(root / "long.nii.gz", (64, 64, 64), stream_bytes=GIB),  # stream >> header
    }


def test_bombs_are_small_files_that_really_decode_to_what_they_declare(bombs):
    assert bombs["voxels"].stat().st_size < 1.2e6 and bombs["long"].stat().st_size < 1.2e6
    assert nib.load(str(bombs["voxels"])).shape == (1024, 1024, 1024)
    with gzip.open(bombs["memory"]) as fh:  # a real, valid gzip stream of the declared size
        inflated = sum(len(b) for b in iter(lambda: fh.read(1 << 24), b""))
    assert inflated == 352 + 512**3


# --------------------------------------------------------------------------- HTTP: the budget holds


def _post(url: str, path: Path, out: dict, key: str) -> None:
    start = time.monotonic()
    try:
        r = httpx.post(f"{url}/v1/segment", files={"file": (path.name, path.read_bytes())}, timeout=120)
        out[key] = (r.status_code, r.headers, r.content, time.monotonic() - start)
    except httpx.HTTPError as err:  # recorded, so the assertion shows it
        out[key] = (-1, {}, repr(err).encode(), time.monotonic() - start)


def test_concurrent_bombs_leave_the_server_under_its_budget_and_honest_requests_are_served(
        files, offline, bombs, tmp_path):
    proc, url = start_cli_server(files["model"], tmp_path / "server.log", "--max-memory-gb", str(BUDGET_GB),
                                 "--memory-wait-s", "2", env={**os.environ, "OMP_NUM_THREADS": "1"},
                                 preexec_fn=_limit_address_space)
    try:
        results: dict[str, tuple] = {}
        names = [f"{kind}{i}" for kind in ("voxels", "memory", "png") for i in range(3)] + ["heavy0", "heavy1"]
        threads = [threading.Thread(target=_post, args=(url, bombs[n.rstrip("0123456789")], results, n))
                   for n in names]
        for t in threads:
            t.start()
        time.sleep(0.3)  # the bombs are in flight: an honest request now
        _post(url, files["ct"], results, "honest")
        for t in threads:
            t.join(120)
        peak = process_memory_bytes("VmHWM", proc.pid)
        figures = {n: (results[n][0], round(results[n][3], 2)) for n in [*names, "honest"]}
        print(f"\nserver VmHWM {peak / GIB:.3f} GiB (budget {BUDGET_GB} GiB); status, seconds: {figures}")

        assert peak < BUDGET_GB * GIB, f"peak RSS {peak / GIB:.2f} GiB over the {BUDGET_GB} GiB budget"
        for n in names[:9]:  # the bombs: refused up front, in bounded time
            status, headers, content, seconds = results[n]
            assert status in (413, 503), (n, status, content[:300])
            assert seconds < 30, (n, seconds)
            if status == 503:
                assert "retry-after" in headers
        for n in ("voxels0", "memory0", "png0"):
            assert results[n][0] == 413  # none of them can ever fit: no point retrying
        assert "--max-voxels" in results["voxels0"][2].decode() and "giga.nii.gz" in results["voxels0"][2].decode()
        assert "--max-memory-gb" in results["memory0"][2].decode() and "wall.png" in results["png0"][2].decode()
        heavy = [results[n][0] for n in ("heavy0", "heavy1")]  # admitted one at a time, or told to retry
        assert set(heavy) <= {200, 503} and 200 in heavy, heavy
        status, _, content, seconds = results["honest"]
        assert status == 200, content[:300]
        (tmp_path / "mask.nii.gz").write_bytes(content)
        assert np.array_equal(read_volume(tmp_path / "mask.nii.gz").array, offline["ct"])

        # healthy afterwards: a stream longer than its header is refused, honest requests go on
        r = upload(url, bombs["long"])
        assert r.status_code == 400 and "beyond" in r.json()["detail"] and "long.nii.gz" in r.json()["detail"]
        again = upload(url, files["ct"])
        assert again.status_code == 200
        assert httpx.get(f"{url}/health", timeout=TIMEOUT).json() == {"status": "ok"}
        memory = httpx.get(f"{url}/metrics", timeout=TIMEOUT).json()["memory"]
        assert memory["reserved_bytes"] == 0 and 0 < memory["peak_reserved_bytes"] <= memory["budget_bytes"]
        assert process_memory_bytes("VmHWM", proc.pid) < BUDGET_GB * GIB
    finally:
        proc.kill()
        proc.wait()


def test_a_stream_longer_than_its_header_is_refused_without_inflating_it(bombs, monkeypatch):
    inflated = [0]
    real_open = gzip.open

    class Counting(io.RawIOBase):
        def __init__(self, inner):
            self.inner = inner

        def readinto(self, b):
            n = self.inner.readinto(b)
            inflated[0] += n
            return n

        def read(self, n=-1):
            data = self.inner.read(n)
            inflated[0] += len(data)
            return data

        def close(self):
            self.inner.close()

    monkeypatch.setattr(gzip, "open", lambda *a, **k: Counting(real_open(*a, **k)))
    with pytest.raises(InputError, match=r"long\.nii\.gz.*beyond the 262144 bytes of data its header declares"):
        read_volume(bombs["long"])
    # the declared 64^3 bytes + the slack looked at, not the gigabyte behind them
    assert inflated[0] <= 352 + 64**3 + GZIP_TRAILING_SLACK + 1


def test_a_request_that_does_not_fit_now_waits_then_503_and_fits_later(files, predictor, offline):
    gated = Gated(predictor)
    app = create_app(gated, max_batch=1, max_wait_ms=0, memory_wait_s=0.5)
    admission = app.state.admission
    need = admission.need([files["ct"]])
    admission.budget = MemoryBudget(need + need // 2)  # room for one ct request, not two
    with running(app) as url:
        first: list = []
        thread = threading.Thread(target=lambda: first.append(upload(url, files["ct"])), daemon=True)
        thread.start()
        assert gated.entered.wait(TIMEOUT)  # the first holds its reservation inside the model
        assert admission.budget.in_use == need
        start = time.monotonic()
        busy = upload(url, files["ct"])
        assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
        assert "memory" in busy.json()["detail"] and 0.5 <= time.monotonic() - start < TIMEOUT
        gated.release.set()
        thread.join(TIMEOUT)
        assert first[0].status_code == 200
        later = upload(url, files["ct"])  # the retry fits once the first is answered
        assert later.status_code == 200
        assert admission.budget.in_use == 0 and admission.budget.peak == need


def test_a_server_whose_budget_is_below_its_own_needs_refuses_to_start(predictor):
    with pytest.raises(ConfigError, match="--max-memory-gb"):
        create_app(predictor, max_memory_gb=0.01)


# --------------------------------------------------------------------------- the estimate


def test_estimate_request_bytes_known_values():
    v = 10 * 20 * 30  # V voxels, 1 channel of int16 (b = 2), K = 3 classes, no resampling
    # held: decoded 2V + mask V; largest phase = finish: prepared 4V + logits 12V + argmax 8V + 2V
    assert estimate_request_bytes((10, 20, 30), 1, 2, 3) == 3 * v + 26 * v
    # resampled to R = 2V (M = 2V): finish = 4R + 12R + probabilities 12R + 2*3*M*4 + 12V + 8V + 2V
    r = 2 * v
    assert estimate_request_bytes((10, 20, 30), 1, 2, 3, resampled_shape=(20, 20, 30)) == \
        3 * v + 4 * r + 12 * r + 12 * r + 24 * r + 12 * v + 8 * v + 2 * v
    # 2.5-D context 2: the stacked slices (2*2+1)*R*4 make the model phase the largest
    assert estimate_request_bytes((10, 20, 30), 1, 2, 3, context=2) == 3 * v + (4 + 20 + 12 + 4) * v
    # activations of an outsized slice add to the model phase; a costly decoder to the decode phase
    assert estimate_request_bytes((10, 20, 30), 1, 2, 3, forward_bytes=10**6) == 3 * v + 24 * v + 10**6
    assert estimate_request_bytes((10, 20, 30), 1, 2, 3, decode_bytes=10**7) == 3 * v + 10**7
    # three channels (RGB): each channel is copied once more when split
    assert estimate_request_bytes((100, 100), 3, 1, 1) == 4 * 10**4 + (16 * 3 + 2 * 3) * 10**4


def test_footprint_resamples_to_the_model_spacing_and_counts_outsized_slices():
    footprint = ModelFootprint(num_classes=3, mode="2d", context=0, divisor=8, target_spacing=(1.0, 1.0, 1.0),
                               reorient=False, forward_pixels=64 * 64, per_pixel=100.0)
    thick = DeclaredSize(Path("x.nii.gz"), (10, 64, 64), 1, (2.0, 1.0, 1.0), np.eye(3), 2, 0)
    assert footprint.request_bytes(thick) == estimate_request_bytes((10, 64, 64), 1, 2, 3,
                                                                    resampled_shape=(20, 64, 64))
    wide = DeclaredSize(Path("x.png"), (200, 200), 1, (1.0, 1.0), np.eye(2), 1, 0)  # no 2-D target spacing
    extra = int((200 * 200 - 64 * 64) * 100.0)
    assert footprint.request_bytes(wide) == estimate_request_bytes((200, 200), 1, 1, 3, forward_bytes=extra)
    assert footprint.fixed_bytes == 64 * 64 * 100


def test_a_real_request_needs_less_than_its_estimate(files, tmp_path):
    """The estimate against the peak RSS of a real prediction (fresh process: VmHWM is its own)."""
    probe = (
        "import sys, numpy as np\n"
        "from resunet.infer.predictor import Predictor\n"
        "from resunet.data.channels import split_channels\n"
        "from resunet.data.io import read_volume\n"
        "from resunet.data.headers import declared_size\n"
        "from resunet.infer.memory import Admission, process_memory_bytes as mem\n"
        "p = Predictor.from_file(sys.argv[1]); a = Admission(p)\n"
        "need = a.footprint.request_bytes(declared_size(sys.argv[2])) + a.footprint.fixed_bytes\n"
        "base = mem('VmRSS'); p.predict_many([split_channels(read_volume(sys.argv[2]))])\n"
        "print(need, mem('VmHWM') - base, mem('VmHWM') > base)\n"
    )
    image = tmp_path / "big_ct.nii.gz"
    rng = np.random.default_rng(1)
    nib.save(nib.Nifti1Image(rng.normal(50, 150, (256, 256, 24)).astype(np.int16), np.eye(4)), str(image))
    out = subprocess.run([sys.executable, "-c", probe, str(files["model"]), str(image)], capture_output=True,
                         text=True, timeout=300, preexec_fn=_limit_address_space)
    need, used, rose = out.stdout.split()
    print(f"\nestimate {int(need) / 2**20:.0f} MiB (fixed forward included), measured peak {int(used) / 2**20:.0f} MiB")
    assert rose == "True", out.stderr  # the prediction set a new peak: `used` measures it
    assert int(used) < int(need) < 3 * int(used), (used, need)


# --------------------------------------------------------------------------- the budget


def test_memory_budget_reserves_releases_and_refuses():
    budget = MemoryBudget(1000)
    with budget.reserve(600, timeout=1) as held:
        assert budget.in_use == 600 and held.nbytes == 600
        start = time.monotonic()
        with pytest.raises(BudgetTimeout, match="did not fit within 0.2 s"):  # the 503 path
            budget.acquire(500, timeout=0.2)
        assert time.monotonic() - start >= 0.2
        assert budget.try_acquire(400) and budget.in_use == 1000
        budget.release(400)
    assert budget.in_use == 0 and budget.peak == 1000
    with pytest.raises(OverBudget, match="more than the whole budget"):  # the 413 path: never waits
        budget.acquire(1001, timeout=None)
    with pytest.raises(RuntimeError):
        budget.release(1)
    with pytest.raises(ConfigError):
        MemoryBudget(0)
    with pytest.raises(ValueError):  # the body raises: released anyway
        with budget.reserve(700, timeout=1):
            raise ValueError("boom")
    assert budget.in_use == 0


def test_memory_budget_waiters_get_in_when_memory_is_released():
    budget = MemoryBudget(100)
    budget.acquire(100, timeout=None)
    got: list[float] = []
    waiter = threading.Thread(target=lambda: (budget.acquire(60, timeout=TIMEOUT), got.append(time.monotonic())))
    waiter.start()
    time.sleep(0.1)
    assert not got
    released = time.monotonic()
    budget.release(100)
    waiter.join(TIMEOUT)
    assert got and got[0] >= released and budget.in_use == 60


def test_concurrent_threads_never_hold_more_than_the_budget():
    budget = MemoryBudget(1000)
    seen: list[int] = []
    errors: list[BaseException] = []
    rng = np.random.default_rng(0)
    sizes = [int(s) for s in rng.integers(1, 700, 400)]

    def worker(chunk: list[int]) -> None:
        try:
            for size in chunk:
                with budget.reserve(size, timeout=TIMEOUT):
                    seen.append(budget.in_use)  # read under contention, while holding
                    time.sleep(0.0005)
        except BaseException as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(sizes[i::16],)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
    assert not errors and len(seen) == len(sizes)
    assert max(seen) <= 1000 and budget.peak <= 1000 and budget.in_use == 0
    assert budget.peak > 700  # they did run concurrently


def test_async_reservations_wait_without_blocking_the_event_loop():
    budget = MemoryBudget(100)

    async def scenario() -> list[str]:
        log: list[str] = []

        async def hold(name: str, nbytes: int, seconds: float, timeout: float) -> None:
            try:
                async with budget.reserve_async(nbytes, timeout):
                    log.append(f"{name} in")
                    await asyncio.sleep(seconds)
            except BudgetTimeout:
                log.append(f"{name} 503")

        async def ticker() -> None:  # runs while the others wait: the loop is not blocked
            for _ in range(5):
                await asyncio.sleep(0.01)
            log.append("tick")

        await asyncio.gather(hold("a", 80, 0.3, 1), hold("b", 50, 0, 0.1), hold("c", 50, 0, TIMEOUT), ticker())
        return log

    log = asyncio.run(scenario())
    assert log[0] == "a in" and "b 503" in log and "c in" in log
    assert log.index("tick") < log.index("c in") and budget.in_use == 0


def test_a_reservation_is_held_until_the_work_handed_over_is_done():
    budget = MemoryBudget(100)
    future: Future = Future()
    with budget.reserve(70, timeout=1) as held:
        held.keep_until(future)
    assert budget.in_use == 70  # the block ended, the batch still computes
    future.set_result(None)
    assert budget.in_use == 0


# --------------------------------------------------------------------------- header-first limits


def test_header_limits_name_the_file_and_the_flag(bombs, tmp_path):
    giga = declared_size(bombs["voxels"])
    assert giga.shape == (1024, 1024, 1024) and giga.voxels == 2**30 and giga.itemsize == 1
    wall = declared_size(bombs["png"])
    assert wall.shape == (9000, 9000) and wall.channels == 1
    series = write_ct_series(tmp_path / "ct", ct_array())
    dicom = declared_size(series.folder)
    assert dicom.shape == (6, 24, 20) and dicom.voxels == 6 * 24 * 20
    with pytest.raises(TooLarge, match=r"giga\.nii\.gz declares 1073741824 .* raise --max-voxels"):
        check_voxels(giga, DEFAULT_MAX_VOXELS)
    check_voxels(dicom, 6 * 24 * 20)  # at the limit: fine


# --------------------------------------------------------------------------- predict on a folder


def test_predict_folder_with_a_bomb_writes_the_honest_case_and_names_the_bomb(files, offline, bombs, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "ct.nii.gz").write_bytes(files["ct"].read_bytes())
    (folder / "bomb.nii.gz").write_bytes(bombs["voxels"].read_bytes())  # sorts first: read ahead first
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-m", "resunet", "predict", "-m", str(files["model"]), "-i", str(folder), "-o", str(out),
         "--backend", "eager"], capture_output=True, text=True, timeout=300, preexec_fn=_limit_address_space)
    assert done.returncode == 2, done.stderr
    assert "1 case(s) failed" in done.stderr and "bomb" in done.stderr and "--max-voxels" in done.stderr
    assert "Traceback" not in done.stderr
    assert sorted(p.name for p in out.iterdir()) == ["ct.nii.gz"]
    assert np.array_equal(read_volume(out / "ct.nii.gz").array, offline["ct"])


# --------------------------------------------------------------------------- the DICOM node


@pytest.fixture(scope="module")
def dicom_predictor(tmp_path_factory) -> Predictor:
    return Predictor.from_file(make_checkpoint(tmp_path_factory.mktemp("model") / "m.pt"))


def _lying_series(folder: Path, rows: int, columns: int) -> list[Path]:
    """Six small CT slices whose headers declare ``rows`` x ``columns`` pixels (a new series)."""
    honest = write_ct_series(folder / "src", ct_array(seed=3))
    series_uid, paths = generate_uid(), []
    for k, path in enumerate(honest.files):
        ds = pydicom.dcmread(path)
        ds.SeriesInstanceUID, ds.SOPInstanceUID = series_uid, generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.Rows, ds.Columns = rows, columns
        paths.append(folder / f"lie{k}.dcm")
        ds.save_as(paths[-1])
    return paths


@pytest.mark.parametrize("limit", ["voxels", "memory"])
def test_a_dicom_series_that_would_not_fit_is_refused_unassembled_and_the_node_serves_on(
        limit, dicom_predictor, tmp_path, monkeypatch, caplog):
    import resunet.data.dicom as dicom

    assembled: list[Path] = []
    real_read = dicom.read_dicom_series
    monkeypatch.setattr(dicom, "read_dicom_series", lambda folder, *a, **k: (assembled.append(Path(folder)),
                                                                             real_read(folder, *a, **k))[1])
    if limit == "voxels":  # headers declare 512 x 512 per slice: the third goes over 600 000 voxels
        lying, extra = _lying_series(tmp_path, 512, 512), {"max_voxels": 600_000}
    else:  # 6 x 2000 x 2000 voxels are under --max-voxels, but their estimate is over the budget
        lying = _lying_series(tmp_path, 2000, 2000)
        rest = (process_memory_bytes() or 0) + ModelFootprint.of(dicom_predictor).fixed_bytes + SLACK_BYTES
        extra = {"max_memory_gb": (rest + 300 * 2**20) / GIB}
    dest = StoreSCP().start()
    config = DicomNodeConfig(spool=tmp_path / "spool", destination=Destination("DEST", "127.0.0.1", dest.port),
                             allowed_aets=("ORTHANC",), port=0, series_timeout=0.5, **extra)
    node = DicomNode(dicom_predictor, config).start()
    try:
        statuses = send_files(node.port, lying)
        if limit == "voxels":
            assert statuses[:2] == [0, 0] and set(statuses[2:]) == {0xA700}
        else:
            assert statuses == [0] * 6  # filed; refused when complete, before it is assembled
        failed = node.spool.folder("failed")
        error = wait_for(lambda: next(failed.rglob("error.txt"), None), 30, "the series in failed/")
        text = error.read_text()
        assert ("--max-voxels" if limit == "voxels" else "--max-memory-gb") in text, text
        assert not assembled and not dest.received
        assert "failed" in caplog.text and ("over the limit" in caplog.text or "needs about" in caplog.text)
        honest = write_ct_series(tmp_path / "honest", ct_array())
        assert send_files(node.port, honest.files) == [0] * len(honest.files)
        wait_for(lambda: dest.received, 30, "the SEG of the honest series")
        wait_for(lambda: idle(node), 30, "the node to finish")
        assert len(dest.received) == 1 and len(assembled) == 1
        check_seg(dest.received[0], honest, dicom_predictor, tmp_path)
    finally:
        node.stop()
        dest.stop()


def test_the_dicom_node_does_not_accept_deflated_datasets(dicom_predictor, tmp_path):
    dest = StoreSCP().start()
    config = DicomNodeConfig(spool=tmp_path / "spool", destination=Destination("DEST", "127.0.0.1", dest.port),
                             allowed_aets=("ORTHANC",), port=0)
    with DicomNode(dicom_predictor, config) as node:
        ae = scu("ORTHANC", "1.2.840.10008.1.1")
        ae.add_requested_context(CTImageStorage, [DeflatedExplicitVRLittleEndian])
        assoc = ae.associate("127.0.0.1", node.port, ae_title="RESUNET")
        try:
            assert assoc.is_established
            assert not [c for c in assoc.accepted_contexts if c.abstract_syntax == CTImageStorage]
        finally:
            assoc.release()
    dest.stop()
