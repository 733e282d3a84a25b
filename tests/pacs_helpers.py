"""Test helpers for the DICOM node tests: a tiny model, a DICOM SCU / SCP on loopback, an Orthanc process.

Import from tests as ``from pacs_helpers import ...`` (``tests/`` is on ``sys.path``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage, SegmentationStorage, Verification

from resunet.nets import build_model, model_config
from resunet.model.checkpoint import save_checkpoint

LABELS = {"background": 0, "organ": 1, "lesion": 2}


def make_checkpoint(path: Path) -> Path:
    """A tiny untrained 2-D ResUNet (3 classes) whose predictions are not constant on the test CT."""
    torch.manual_seed(0)
    model = build_model("resunet", spatial_dims=2, in_channels=1, out_channels=3, base_channels=4, depth=3)
    with torch.no_grad():  # a strong random head: all three labels appear
        model.head.weight.normal_(0.0, 4.0)
        model.head.bias.zero_()
    save_checkpoint(path, {
        "state_dict": model.state_dict(), "model": model_config(model),
        "preprocess": {"modality": "ct", "ct_window": "abdomen", "crop_to_nonzero": False},
        "labels": LABELS, "inference": {"mode": "2d", "context": 0, "patch_size": [16, 16]},
    })
    return path


def ct_array(shape: tuple[int, int, int] = (6, 24, 20), seed: int = 0) -> np.ndarray:
    """A smooth blob phantom in HU (so the untrained model's labels vary across the image)."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    blob = 300.0 * np.exp(-((x - 0.2) ** 2 + y**2 + (z * 0.5) ** 2) * 3)
    return (blob - 100.0 + rng.normal(0, 30, shape)).round()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll ``predicate`` until it returns something truthy; AssertionError after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def scu(calling_aet: str = "ORTHANC", *contexts: str) -> AE:
    ae = AE(ae_title=calling_aet)
    ae.connection_timeout = ae.acse_timeout = ae.dimse_timeout = 10
    for uid in contexts or (CTImageStorage, Verification):
        ae.add_requested_context(uid)
    return ae


def echo(port: int, calling_aet: str = "ORTHANC", called_aet: str = "RESUNET") -> int | None:
    """C-ECHO status, or None when the association was not accepted."""
    assoc = scu(calling_aet).associate("127.0.0.1", port, ae_title=called_aet)
    if not assoc.is_established:
        return None
    try:
        status = assoc.send_c_echo()
        return int(status.Status) if status else None
    finally:
        assoc.release()


def send_files(port: int, files: list[Path], calling_aet: str = "ORTHANC", end: str = "release",
               called_aet: str = "RESUNET") -> list[int]:
    """C-STORE ``files`` in one association; the statuses.

    ``end`` says how the association ends: ``"release"`` (A-RELEASE), ``"abort"`` (A-ABORT) or
    ``"drop"`` (the TCP connection is closed without any DICOM message).
    """
    assoc = scu(calling_aet).associate("127.0.0.1", port, ae_title=called_aet)
    assert assoc.is_established, "association with the node was not accepted"
    statuses = []
    try:
        for path in files:
            status = assoc.send_c_store(path)
            statuses.append(int(status.Status) if status else -1)
    finally:
        if end == "drop":
            sock = assoc.dul.socket.socket  # pynetdicom internals: the raw socket
            sock.shutdown(socket.SHUT_RDWR)
            sock.close()
            assoc.abort()  # only stops the local threads now; nothing reaches the node
        elif end == "abort":
            assoc.abort()
        else:
            assoc.release()
    return statuses


@dataclass
class StoreSCP:
    """A destination Storage SCP (pynetdicom) on loopback that keeps every SEG it receives."""

    ae_title: str = "DEST"
    received: list[bytes] = field(default_factory=list)  # encoded files (preamble + meta)
    server: Any = None

    def start(self) -> "StoreSCP":
        ae = AE(ae_title=self.ae_title)
        ae.add_supported_context(SegmentationStorage)
        self.server = ae.start_server(("127.0.0.1", 0), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, self._on_store)])
        return self

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def _on_store(self, event: Any) -> int:
        self.received.append(event.encoded_dataset(include_meta=True))
        return 0x0000

    def stop(self) -> None:
        self.server.shutdown()


class CountingRefuser:
    """A TCP port that accepts connections and closes them at once (a 'down' DICOM peer); counts them."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


def read_seg_file(data: bytes | Path) -> Dataset:
    from io import BytesIO

    return dcmread(BytesIO(data) if isinstance(data, bytes) else data)


def referenced_series(seg: Dataset) -> set[str]:
    return {str(item.SeriesInstanceUID) for item in seg.get("ReferencedSeriesSequence", [])}


def referenced_instances(seg: Dataset) -> set[str]:
    return {str(ref.ReferencedSOPInstanceUID) for item in seg.get("ReferencedSeriesSequence", [])
            for ref in item.ReferencedInstanceSequence}


# --------------------------------------------------------------------------- Orthanc


def orthanc_binary() -> str | None:
    """The Orthanc executable (Debian puts it in /usr/sbin, often not on a user's PATH)."""
    found = shutil.which("Orthanc")
    if found:
        return found
    return "/usr/sbin/Orthanc" if os.access("/usr/sbin/Orthanc", os.X_OK) else None


def dicomweb_plugin() -> str | None:
    """Orthanc's DICOMweb plugin (Debian package orthanc-dicomweb), or None when not installed."""
    for folder in ("/usr/share/orthanc/plugins", "/usr/lib/orthanc"):
        found = sorted(Path(folder).glob("libOrthancDicomWeb.so*")) if Path(folder).is_dir() else []
        if found:
            return str(found[0])
    return None


class Orthanc:
    """An Orthanc server from the OS package, configured in ``folder``; stopped by its PID.

    ``dicomweb``: load the DICOMweb plugin; QIDO-RS / WADO-RS / STOW-RS then live under `dicomweb_url`.
    """

    def __init__(self, folder: Path, modalities: dict[str, tuple[str, str, int]], dicomweb: bool = False) -> None:
        self.folder = folder
        self.http_port, self.dicom_port = free_port(), free_port()
        plugin = dicomweb_plugin() if dicomweb else None
        assert plugin or not dicomweb, "Orthanc's DICOMweb plugin is not installed (apt-get install orthanc-dicomweb)"
        config = {
            "Name": "resunet-test", "HttpPort": self.http_port, "DicomPort": self.dicom_port,
            "DicomAet": "ORTHANC", "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
            "StorageDirectory": str(folder / "storage"), "IndexDirectory": str(folder / "index"),
            "Plugins": [plugin] if plugin else [], "DicomModalities": {k: list(v) for k, v in modalities.items()},
            "DicomAssociationCloseDelay": 0, "ConcurrentJobs": 1,
            "DicomWeb": {"Enable": bool(plugin), "Root": "/dicom-web/", "EnableWado": False, "Host": "127.0.0.1"},
        }
        (folder / "orthanc.json").write_text(json.dumps(config, indent=2))
        self.log = folder / "orthanc.log"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.url}/dicom-web"

    def start(self, timeout: float = 20) -> "Orthanc":
        binary = orthanc_binary()
        assert binary, "Orthanc is not installed"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen([binary, str(self.folder / "orthanc.json")], stdout=log,
                                         stderr=subprocess.STDOUT, cwd=self.folder)

        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"Orthanc exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                return bool(self.get("/system"))
            except OSError:
                return False

        wait_for(ready, timeout, "Orthanc's REST API", interval=0.1)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def request(self, method: str, path: str, body: bytes | str | None = None) -> bytes:
        data = body.encode() if isinstance(body, str) else body
        req = urllib.request.Request(self.url + path, data=data, method=method)
        with urllib.request.urlopen(req, timeout=30) as rsp:
            return rsp.read()

    def get(self, path: str) -> Any:
        return json.loads(self.request("GET", path))

    def post(self, path: str, body: bytes | str | Any) -> Any:
        payload = body if isinstance(body, (bytes, str)) else json.dumps(body)
        return json.loads(self.request("POST", path, payload) or b"null")
