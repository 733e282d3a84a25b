"""`resunet serve dicom`: a DICOM node that segments the series a PACS sends it and sends a SEG back.

The node is a Storage SCP (CT, Enhanced CT, MR and Enhanced MR Image Storage) plus Verification
(C-ECHO). Only the calling AE titles of ``allowed_aets`` may associate; any other association
request is rejected. Each instance is filed in the spool (`resunet.serve.dicom_spool`, which also
documents when a series counts as complete and what an aborted association does) before the
C-STORE is answered with success.

One worker thread moves every complete series to ``processing/``, reads it
(`read_dicom_series`), predicts it (`Predictor.predict`), writes a DICOM SEG into ``outbox/``
(`write_dicom_seg`) and sends that SEG to each destination: C-STORE to ``destination``
(``--dest``) and / or STOW-RS to the DICOMweb server ``dicomweb`` (``--dest-dicomweb``), trying
each ``send_attempts`` times with a doubling delay. Sent everywhere: the SEG and the series are
deleted. Not sent: the SEG stays in ``outbox/`` (resend it with ``storescu -R`` or a STOW-RS
client) and the error is logged. A series that cannot be
segmented goes to ``failed/`` with ``error.txt``; the node keeps serving in every case.

Memory: the instances of a series may declare at most ``max_voxels`` voxels together (Rows x
Columns x frames; beyond, C-STORE answers 0xA700 and the series fails); before a complete series is
assembled, its headers are read again (``stop_before_pixels``) and its estimated memory must fit
``max_memory_gb`` (`resunet.infer.memory.Admission`), or it goes to ``failed/`` unread. Deflated
transfer syntax is not accepted (a small deflated dataset can inflate to gigabytes).
"""

from __future__ import annotations

import ipaddress
import logging
import re
import signal
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from resunet.data.limits import DEFAULT_MAX_VOXELS, dicom_instance_voxels
from resunet.errors import ConfigError, ResunetError
from resunet.infer.memory import GIB, Admission
from resunet.infer.predictor import Predictor
from resunet.serve.dicom_spool import CompleteSeries, InvalidInstance, SeriesTooLarge, Spool, check_uid

__all__ = ["Destination", "DicomNodeConfig", "DicomNode", "run_dicom_node", "send_file", "stow_file"]

log = logging.getLogger("resunet.serve.dicom")

STORAGE_CLASSES = (
    "1.2.840.10008.5.1.4.1.1.2",  # CT Image Storage
    "1.2.840.10008.5.1.4.1.1.2.1",  # Enhanced CT Image Storage
    "1.2.840.10008.5.1.4.1.1.4",  # MR Image Storage
    "1.2.840.10008.5.1.4.1.1.4.1",  # Enhanced MR Image Storage
)
_VERIFICATION = "1.2.840.10008.1.1"
_SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # printable ASCII without backslash

#: uncompressed transfer syntaxes only: Implicit / Explicit VR Little Endian, Explicit VR Big Endian
_TRANSFER_SYNTAXES = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2")

# C-STORE statuses (PS3.4 B.2.3)
_SUCCESS, _OUT_OF_RESOURCES, _CANNOT_UNDERSTAND = 0x0000, 0xA700, 0xC000


def check_ae_title(value: str, option: str) -> str:
    """``value`` stripped; `ConfigError` unless it is a valid AE title."""
    text = str(value).strip()
    if not _AE_TITLE.match(text):
        raise ConfigError(f"{option} {value!r} is not an AE title: use 1-16 printable ASCII characters, no backslash")
    return text


@dataclass(frozen=True)
class Destination:
    """Where the SEGs go: ``AE@HOST:PORT``."""

    ae_title: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> "Destination":
        match = re.fullmatch(r"([^@]+)@(.+):(\d+)", text.strip())
        if not match:
            raise ConfigError(f"--dest {text!r} must look like AE@HOST:PORT, e.g. ORTHANC@127.0.0.1:4242")
        port = int(match[3])
        if not 0 < port < 65536:
            raise ConfigError(f"--dest port {port} must be 1-65535")
        return cls(check_ae_title(match[1], "--dest AE title"), match[2].strip("[]"), port)

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


@dataclass(frozen=True)
class DicomNodeConfig:
    """Settings of `DicomNode`; validated on creation (`ConfigError` names the option to fix)."""

    spool: Path
    destination: Destination | None  # C-STORE destination (--dest); None: DICOMweb only
    allowed_aets: tuple[str, ...]
    ae_title: str = "RESUNET"
    host: str = "127.0.0.1"
    port: int = 11112
    series_timeout: float = 5.0
    max_series_instances: int = 2000
    send_attempts: int = 3
    retry_delay: float = 1.0  # seconds before the 2nd try, doubled for each further one
    poll_interval: float = 0.0  # 0: a quarter of series_timeout, at most 0.25 s
    max_voxels: int = DEFAULT_MAX_VOXELS  # voxels x channels a series may declare
    max_memory_gb: float | None = None  # GiB for the whole process; None: half of the physical RAM
    dicomweb: str | None = None  # DICOMweb root URL the SEGs are STOW-RS'd to (--dest-dicomweb)

    def __post_init__(self) -> None:
        from resunet.infer.dicomweb import check_url

        object.__setattr__(self, "ae_title", check_ae_title(self.ae_title, "--ae-title"))
        if self.destination is None and not self.dicomweb:
            raise ConfigError("give --dest AE@HOST:PORT (C-STORE) and / or --dest-dicomweb URL (STOW-RS): "
                              "where the SEGs go")
        if self.dicomweb:
            object.__setattr__(self, "dicomweb", check_url(self.dicomweb, "--dest-dicomweb"))
        if not self.allowed_aets:
            raise ConfigError("give at least one --allow-aet (the AE title of the PACS that sends series); "
                              "every other calling AE title is refused")
        object.__setattr__(self, "allowed_aets", tuple(check_ae_title(a, "--allow-aet") for a in self.allowed_aets))
        if not 0 <= self.port < 65536:
            raise ConfigError(f"--port {self.port} must be 0-65535")
        if self.series_timeout <= 0:
            raise ConfigError(f"--series-timeout must be positive (seconds), got {self.series_timeout}")
        if self.max_series_instances < 1:
            raise ConfigError(f"--max-series-instances must be at least 1, got {self.max_series_instances}")
        if self.max_voxels < 1:
            raise ConfigError(f"--max-voxels must be at least 1, got {self.max_voxels}")
        if self.max_memory_gb is not None and not self.max_memory_gb > 0:
            raise ConfigError(f"--max-memory-gb must be positive, got {self.max_memory_gb}")
        if self.send_attempts < 1 or self.retry_delay < 0:
            raise ConfigError("send_attempts must be >= 1 and retry_delay >= 0")
        if not self.poll_interval:
            object.__setattr__(self, "poll_interval", min(0.25, self.series_timeout / 4))


def _retry(send: Callable[[], str | None], what: str, where: str, attempts: int, delay: float,
           stop: threading.Event | None) -> bool:
    """Call ``send`` (None: done, else why not) up to ``attempts`` times, waiting ``delay`` s
    before the 2nd try and twice as long before each further one; True once it succeeded."""
    stop = stop or threading.Event()
    for attempt in range(1, attempts + 1):
        try:
            why = send()
        except Exception as exc:  # network errors must not stop the node
            why = f"{type(exc).__name__}: {exc}"
        if why is None:
            return True
        log.warning("sending %s to %s failed (try %d of %d): %s", what, where, attempt, attempts, why)
        if attempt < attempts and stop.wait(delay * 2 ** (attempt - 1)):
            break
    return False


def _c_store(path: Path, destination: Destination, calling_aet: str) -> str | None:
    """One C-STORE of ``path``: None when stored (a warning status counts), else why not."""
    from pynetdicom import AE
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

    ae = AE(ae_title=calling_aet)
    ae.connection_timeout = ae.acse_timeout = 10
    ae.add_requested_context(_SEGMENTATION_STORAGE, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title)
    if not assoc.is_established:
        return "association rejected or no answer"
    try:
        status = assoc.send_c_store(path)
    finally:
        assoc.release()
    code = int(getattr(status, "Status", -1)) if status else -1
    if code == 0 or 0xB000 <= code <= 0xBFFF:  # success, or stored with a warning
        return None
    return f"C-STORE status 0x{code:04X}" if code >= 0 else "no C-STORE response"


def send_file(
    path: Path, destination: Destination, calling_aet: str, attempts: int = 3, delay: float = 1.0,
    stop: threading.Event | None = None,
) -> bool:
    """C-STORE the DICOM SEG file ``path`` to ``destination``; retry with a doubling delay; True when stored."""
    return _retry(lambda: _c_store(path, destination, calling_aet), path.name, str(destination), attempts, delay,
                  stop)


def stow_file(path: Path, url: str, attempts: int = 3, delay: float = 1.0, stop: threading.Event | None = None) -> bool:
    """STOW-RS the DICOM SEG file ``path`` to the DICOMweb server ``url``; retry like `send_file`; True when stored."""
    from resunet.infer.dicomweb import connect, store_file

    def once() -> str | None:
        try:
            store_file(connect(url), path)
        except ResunetError as err:
            return str(err)
        return None

    return _retry(once, path.name, url, attempts, delay, stop)


class DicomNode:
    """Storage SCP + worker; `start` returns at once, `stop` ends both (also as a context manager)."""

    def __init__(self, predictor: Predictor, config: DicomNodeConfig) -> None:
        if predictor.num_input_channels != 1:
            raise ConfigError(
                f"the model expects {predictor.num_input_channels} image channels per case; the DICOM node "
                "segments one series at a time and needs a single-channel model"
            )
        self.predictor, self.config = predictor, config
        memory = None if config.max_memory_gb is None else int(config.max_memory_gb * GIB)
        self.admission = Admission(predictor, config.max_voxels, memory, wait_s=0.0)
        self.spool = Spool(config.spool, config.series_timeout, config.max_series_instances,
                           max_series_voxels=config.max_voxels)
        self._stop = threading.Event()
        self._server: Any = None
        self._worker: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The port the node listens on (useful with ``port=0``)."""
        return int(self._server.server_address[1])

    def start(self) -> "DicomNode":
        from pynetdicom import AE, evt

        try:
            leftovers = self.spool.prepare()
        except OSError as exc:
            raise ConfigError(f"cannot use --spool {self.config.spool}: {exc}; pass a folder you can write") from None
        ae = AE(ae_title=self.config.ae_title)
        ae.require_calling_aet = list(self.config.allowed_aets)
        for uid in STORAGE_CLASSES:
            ae.add_supported_context(uid, list(_TRANSFER_SYNTAXES))
        ae.add_supported_context(_VERIFICATION)
        handlers = [(evt.EVT_C_STORE, self._on_store), (evt.EVT_RELEASED, self._on_released),
                    (evt.EVT_ABORTED, self._on_aborted)]
        try:
            self._server = ae.start_server((self.config.host, self.config.port), block=False, evt_handlers=handlers)
        except OSError as exc:
            raise ConfigError(
                f"cannot listen on {self.config.host}:{self.config.port} ({exc}); pick a free --port or another --host"
            ) from None
        self._worker = threading.Thread(target=self._run, args=(leftovers,), name="resunet-dicom-worker", daemon=True)
        self._worker.start()
        log.info("DICOM node %s listening on %s:%d (calling AE titles allowed: %s); SEGs go to %s; spool %s",
                 self.config.ae_title, self.config.host, self.port, ", ".join(self.config.allowed_aets),
                 " and ".join(str(d) for d in (self.config.destination, self.config.dicomweb) if d), self.config.spool)
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._server is not None:
            self._server.shutdown()
        if self._worker is not None:
            self._worker.join(timeout=60)

    def __enter__(self) -> "DicomNode":
        return self.start() if self._server is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ----------------------------------------------------------------------- network events

    def _on_store(self, event: Any) -> int:
        try:
            ds = event.dataset
        except Exception as exc:
            log.warning("refused an undecodable instance from %s: %s: %s", _peer(event), type(exc).__name__, exc)
            return _CANNOT_UNDERSTAND
        try:
            study = check_uid(ds.get("StudyInstanceUID"), "StudyInstanceUID")
            series = check_uid(ds.get("SeriesInstanceUID"), "SeriesInstanceUID")
            sop = check_uid(ds.get("SOPInstanceUID") or event.request.AffectedSOPInstanceUID, "SOPInstanceUID")
            self.spool.store(event.assoc, study, series, sop, event.encoded_dataset(include_meta=True),
                             voxels=dicom_instance_voxels(ds))
        except InvalidInstance as exc:
            log.warning("refused an instance from %s: %s", _peer(event), exc)
            return _CANNOT_UNDERSTAND
        except SeriesTooLarge as exc:
            log.warning("refused an instance from %s: %s", _peer(event), exc)
            return _OUT_OF_RESOURCES
        except Exception as exc:  # disk full, unreadable dataset ...: answer with a failure, keep serving
            log.error("cannot file an instance from %s: %s: %s", _peer(event), type(exc).__name__, exc)
            return _OUT_OF_RESOURCES
        return _SUCCESS

    def _on_released(self, event: Any) -> None:
        self.spool.released(event.assoc)

    def _on_aborted(self, event: Any) -> None:
        self._quarantine(event.assoc, f"association from {_peer(event)} was aborted")

    def _quarantine(self, assoc: Any, reason: str) -> None:
        for folder in self.spool.aborted(assoc, reason):
            log.warning("%s mid-series: partial series moved to %s, no SEG is made", reason, folder)

    # ----------------------------------------------------------------------- worker

    def _run(self, leftovers: list[CompleteSeries]) -> None:
        for series in leftovers:
            self._process(series)
        while not self._stop.wait(self.config.poll_interval):
            for assoc in self.spool.open_associations():
                if not assoc.is_alive():  # ended without A-RELEASE and without an abort event
                    self._quarantine(assoc, "connection ended without A-RELEASE")
            for series in self.spool.take_complete():
                if self._stop.is_set():
                    break
                self._process(series)

    def _process(self, series: CompleteSeries) -> None:
        from resunet.data.dicom import read_dicom_series
        from resunet.infer.run import write_mask

        log.info("series %s complete (%d instance(s)): segmenting", series.series_uid, series.instances)
        try:
            if series.error:
                raise ResunetError(series.error)
            self.admission.need([series.folder], f"series {series.series_uid}")  # headers only
            image = read_dicom_series(series.folder)
            mask = self.predictor.predict([image])
            seg = write_mask(mask, self.spool.outbox_path(series), labels=self.predictor.labels, source=image,
                             dicom_format="seg")
        except Exception as exc:
            detail = str(exc) if isinstance(exc, ResunetError) else traceback.format_exc()
            folder = self.spool.fail(series, f"{type(exc).__name__}: {detail}")
            log.error("series %s failed and was moved to %s: %s", series.series_uid, folder, exc)
            return
        sent, missed = self._send(seg)
        for where in sent:
            log.info("SEG of series %s sent to %s", series.series_uid, where)
        if missed:
            log.error("SEG of series %s could not be sent to %s; it is kept in %s (resend it with storescu -R "
                      "or a STOW-RS client)", series.series_uid, " and ".join(missed), seg)
        else:
            seg.unlink(missing_ok=True)
        self.spool.finish(series)

    def _send(self, seg: Path) -> tuple[list[str], list[str]]:
        """Send ``seg`` to every destination (C-STORE, STOW-RS); (where it arrived, where it did not)."""
        cfg = self.config
        sent: list[str] = []
        missed: list[str] = []
        if cfg.destination is not None:
            ok = send_file(seg, cfg.destination, cfg.ae_title, cfg.send_attempts, cfg.retry_delay, self._stop)
            (sent if ok else missed).append(str(cfg.destination))
        if cfg.dicomweb:
            ok = stow_file(seg, cfg.dicomweb, cfg.send_attempts, cfg.retry_delay, self._stop)
            (sent if ok else missed).append(cfg.dicomweb)
        return sent, missed


def _peer(event: Any) -> str:
    try:
        req = event.assoc.requestor
        return f"{req.ae_title}@{req.address}:{req.port}"
    except AttributeError:
        return "?"


def run_dicom_node(predictor: Predictor, config: DicomNodeConfig) -> None:
    """Run the node until Ctrl-C or SIGTERM (what `resunet serve dicom` does)."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("pynetdicom", "highdicom"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        loopback = ipaddress.ip_address(config.host).is_loopback
    except ValueError:
        loopback = config.host == "localhost"
    if not loopback:
        log.warning("listening on %s, not on loopback: patient data may cross the network unencrypted", config.host)
    stop = threading.Event()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with DicomNode(predictor, config):
        try:
            while not stop.wait(0.5):
                pass
        except KeyboardInterrupt:
            pass
        log.info("stopping the DICOM node")
