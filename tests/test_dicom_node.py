"""`resunet serve dicom` without a PACS: the node runs in a thread, pynetdicom SCUs/SCPs talk to it on loopback."""

from __future__ import annotations

import stat
import time
from pathlib import Path

import numpy as np
import pytest
from dicom_series import write_ct_series
from pacs_helpers import (
    LABELS, CountingRefuser, StoreSCP, ct_array, echo, make_checkpoint, read_seg_file, referenced_instances,
    referenced_series, scu, send_files, wait_for,
)

from resunet.data.dicom import read_dicom_series
from resunet.data.dicom_seg import read_dicom_seg
from resunet.errors import ConfigError
from resunet.infer.predictor import Predictor
from resunet.serve.dicom_node import Destination, DicomNode, DicomNodeConfig
from resunet.serve.dicom_spool import Spool

TIMEOUT = 0.5  # --series-timeout of the nodes under test


@pytest.fixture(scope="module")
def predictor(tmp_path_factory) -> Predictor:
    return Predictor.from_file(make_checkpoint(tmp_path_factory.mktemp("model") / "m.pt"))


@pytest.fixture
def series(tmp_path):
    return write_ct_series(tmp_path / "ct", ct_array())


@pytest.fixture
def dest():
    scp = StoreSCP().start()
    yield scp
    scp.stop()


@pytest.fixture
def start_node(tmp_path, predictor):
    nodes = []

    def start(dest_port: int, **overrides) -> DicomNode:
        config = DicomNodeConfig(
            spool=tmp_path / "spool", destination=Destination("DEST", "127.0.0.1", dest_port),
            allowed_aets=("ORTHANC",), port=0, series_timeout=TIMEOUT, **overrides,
        )
        nodes.append(DicomNode(predictor, config).start())
        return nodes[-1]

    yield start
    for node in nodes:
        node.stop()


def idle(node: DicomNode) -> bool:
    """Nothing waiting in incoming/ and nothing being processed."""
    return node.spool.pending() == 0 and not any(node.spool.folder("processing").iterdir())


def check_seg(data: bytes, series, predictor: Predictor, tmp_path: Path) -> None:
    """The SEG references exactly ``series`` and decodes to an offline prediction of it."""
    seg = read_seg_file(data)
    assert seg.Modality == "SEG" and seg.StudyInstanceUID == series.study_uid
    assert referenced_series(seg) == {series.series_uid}
    assert referenced_instances(seg) == set(series.sop_instance_uids)
    path = tmp_path / "received-seg.dcm"
    path.write_bytes(data)
    source = read_dicom_series(series.folder)
    expected = predictor.predict([source]).array
    assert len(np.unique(expected)) > 1  # a constant mask would prove little
    np.testing.assert_array_equal(read_dicom_seg(path, source, LABELS), expected)


def test_config_errors_name_the_fix(tmp_path):
    dest = Destination.parse("ORTHANC@127.0.0.1:4242")
    assert (dest.ae_title, dest.host, dest.port) == ("ORTHANC", "127.0.0.1", 4242)
    with pytest.raises(ConfigError, match="AE@HOST:PORT"):
        Destination.parse("127.0.0.1:4242")
    with pytest.raises(ConfigError, match="--allow-aet"):
        DicomNodeConfig(spool=tmp_path, destination=dest, allowed_aets=())
    with pytest.raises(ConfigError, match="--ae-title"):
        DicomNodeConfig(spool=tmp_path, destination=dest, allowed_aets=("X",), ae_title="A" * 17)
    with pytest.raises(ConfigError, match="--series-timeout"):
        DicomNodeConfig(spool=tmp_path, destination=dest, allowed_aets=("X",), series_timeout=0)
    with pytest.raises(ConfigError, match="--dest AE@HOST:PORT .* --dest-dicomweb URL"):
        DicomNodeConfig(spool=tmp_path, destination=None, allowed_aets=("X",))
    with pytest.raises(ConfigError, match="--dest-dicomweb 'pacs:8042' is not an http"):
        DicomNodeConfig(spool=tmp_path, destination=None, allowed_aets=("X",), dicomweb="pacs:8042")
    web_only = DicomNodeConfig(spool=tmp_path, destination=None, allowed_aets=("X",), dicomweb="http://h:1/dw/")
    assert web_only.dicomweb == "http://h:1/dw"


def test_echo_works_and_unknown_calling_aet_is_rejected(start_node, dest, tmp_path):
    node = start_node(dest.port)
    assert echo(node.port) == 0x0000
    assert echo(node.port, calling_aet="INTRUDER") is None
    spool = tmp_path / "spool"
    assert stat.S_IMODE(spool.stat().st_mode) == 0o700
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o700 for p in spool.iterdir())


def test_full_series_gives_exactly_one_seg_equal_to_offline_prediction(start_node, dest, series, predictor, tmp_path):
    node = start_node(dest.port)
    assert send_files(node.port, series.files) == [0] * len(series.files)
    wait_for(lambda: dest.received, 30, "the SEG at the destination")
    wait_for(lambda: idle(node), 30, "the node to finish")
    assert len(dest.received) == 1
    check_seg(dest.received[0], series, predictor, tmp_path)
    spool = node.spool
    assert not any(spool.folder("outbox").iterdir()) and not any(spool.folder("incoming").iterdir())
    assert not any(spool.folder("failed").iterdir())


@pytest.mark.parametrize("end", ["abort", "drop"])
def test_aborted_association_never_yields_a_seg(start_node, dest, series, predictor, tmp_path, end):
    node = start_node(dest.port)
    half = series.files[: len(series.files) // 2]
    assert send_files(node.port, half, end=end) == [0] * len(half)
    aborted = node.spool.folder("aborted") / series.study_uid / series.series_uid
    wait_for(lambda: (aborted / "reason.txt").is_file(), 10, "the partial series in aborted/")
    assert len(list(aborted.glob("*.dcm"))) == len(half)
    assert "aborted" in (aborted / "reason.txt").read_text()
    # the node still serves: the complete resend gives one SEG of the whole series
    assert send_files(node.port, series.files) == [0] * len(series.files)
    wait_for(lambda: dest.received, 30, "the SEG of the resent series")
    wait_for(lambda: idle(node), 30, "the node to finish")
    assert len(dest.received) == 1
    check_seg(dest.received[0], series, predictor, tmp_path)


def test_duplicate_instance_is_filed_once(start_node, dest, series, predictor, tmp_path):
    node = start_node(dest.port)
    assoc = scu().associate("127.0.0.1", node.port, ae_title="RESUNET")
    assert assoc.is_established
    try:
        for path in [*series.files, series.files[0], series.files[-1]]:
            assert assoc.send_c_store(path).Status == 0
        # while the association is open the series cannot complete: inspect incoming/
        folder = node.spool.folder("incoming") / series.study_uid / series.series_uid
        names = sorted(p.name for p in folder.iterdir())
        assert names == sorted(f"{uid}.dcm" for uid in series.sop_instance_uids)
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    finally:
        assoc.release()
    wait_for(lambda: dest.received, 30, "the SEG at the destination")
    wait_for(lambda: idle(node), 30, "the node to finish")
    assert len(dest.received) == 1
    check_seg(dest.received[0], series, predictor, tmp_path)


def test_destination_down_keeps_seg_in_outbox_and_node_keeps_serving(start_node, series):
    down = CountingRefuser()
    try:
        node = start_node(down.port, retry_delay=0.05)
        assert send_files(node.port, series.files) == [0] * len(series.files)
        wait_for(lambda: down.connections >= 3 and idle(node), 30, "three send attempts")
        assert down.connections == 3
        kept = list(node.spool.folder("outbox").iterdir())
        assert [p.name for p in kept] == [f"{series.series_uid}.seg.dcm"]
        assert referenced_series(read_seg_file(kept[0])) == {series.series_uid}
        assert echo(node.port) == 0x0000
    finally:
        down.close()


def test_a_dicomweb_destination_down_keeps_the_seg_while_c_store_delivers(start_node, dest, series, predictor,
                                                                         tmp_path):
    """--dest works, --dest-dicomweb does not answer: the SEG arrives by C-STORE, STOW-RS is tried
    three times, and the SEG stays in outbox/ for the destination that missed it."""
    down = CountingRefuser()
    try:
        node = start_node(dest.port, retry_delay=0.05, dicomweb=f"http://127.0.0.1:{down.port}/dicom-web")
        assert send_files(node.port, series.files) == [0] * len(series.files)
        wait_for(lambda: down.connections >= 3 and idle(node), 30, "three STOW-RS attempts")
        assert down.connections == 3 and len(dest.received) == 1
        check_seg(dest.received[0], series, predictor, tmp_path)
        assert [p.name for p in node.spool.folder("outbox").iterdir()] == [f"{series.series_uid}.seg.dcm"]
    finally:
        down.close()


def test_series_that_cannot_be_segmented_goes_to_failed(start_node, dest, series, tmp_path):
    # a second copy of every slice under new SOP UIDs: two slices per position, read_dicom_series refuses it
    twin = write_ct_series(tmp_path / "twin", ct_array(), study_uid=series.study_uid, series_uid=series.series_uid,
                           frame_of_reference_uid=series.frame_of_reference_uid)
    node = start_node(dest.port)
    assert send_files(node.port, [*series.files, *twin.files]) == [0] * 2 * len(series.files)
    failed = node.spool.folder("failed") / series.study_uid / series.series_uid
    wait_for(lambda: (failed / "error.txt").is_file(), 30, "the series in failed/")
    assert "share a position" in (failed / "error.txt").read_text()
    assert not dest.received
    assert echo(node.port) == 0x0000


def test_too_large_series_is_refused_and_failed(start_node, dest, series):
    node = start_node(dest.port, max_series_instances=3)
    statuses = send_files(node.port, series.files)
    assert statuses[:3] == [0, 0, 0] and set(statuses[3:]) == {0xA700}
    failed = node.spool.folder("failed") / series.study_uid / series.series_uid
    wait_for(lambda: (failed / "error.txt").is_file(), 30, "the series in failed/")
    assert "--max-series-instances" in (failed / "error.txt").read_text()
    assert not dest.received


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_spool_completion_and_abort_rules(tmp_path):
    clock = _Clock()
    spool = Spool(tmp_path / "spool", series_timeout=5, max_series_instances=10, clock=clock)
    assert spool.prepare() == []
    a, b = object(), object()
    spool.store(a, "1.2", "1.2.3", "1.2.3.1", b"x")
    spool.store(a, "1.2", "1.2.3", "1.2.3.1", b"y")  # duplicate: overwrites
    clock.now = 100
    assert spool.take_complete() == []  # quiet long enough, but `a` is still open
    spool.released(a)
    done = spool.take_complete()
    assert [(s.series_uid, s.instances) for s in done] == [("1.2.3", 1)]
    assert (done[0].folder / "1.2.3.1.dcm").read_bytes() == b"y"
    # abort: the whole series (also what the released association `a` sent) is quarantined
    spool.store(a, "1.2", "1.2.4", "1.2.4.1", b"x")
    spool.released(a)
    spool.store(b, "1.2", "1.2.4", "1.2.4.2", b"x")
    moved = spool.aborted(b, "test abort")
    assert [p.name for p in moved] == ["1.2.4"] and len(list(moved[0].glob("*.dcm"))) == 2
    clock.now = 200
    assert spool.take_complete() == [] and spool.pending() == 0
    # a series left in incoming/ by a stopped node is quarantined at the next start
    spool.store(a, "1.2", "1.2.5", "1.2.5.1", b"x")
    again = Spool(tmp_path / "spool", series_timeout=5, max_series_instances=10, clock=clock)
    leftovers = again.prepare()
    assert [s.series_uid for s in leftovers] == ["1.2.3"]  # still in processing/: segmented again
    assert (tmp_path / "spool" / "aborted" / "1.2" / "1.2.5" / "reason.txt").is_file()


def test_a_series_that_never_completes_is_never_segmented_and_blocks_nothing(start_node, dest, series, predictor,
                                                                            tmp_path):
    """An association that delivers part of a series and then stays open (a stalled sender): that
    series waits; other series are served meanwhile; closing without A-RELEASE quarantines it."""
    node = start_node(dest.port)
    stalled = scu().associate("127.0.0.1", node.port, ae_title="RESUNET")
    assert stalled.is_established
    try:
        for path in series.files[:3]:
            assert stalled.send_c_store(path).Status == 0
        other = write_ct_series(tmp_path / "other", ct_array(seed=7))
        assert send_files(node.port, other.files) == [0] * len(other.files)
        wait_for(lambda: dest.received, 30, "the SEG of the other series")
        check_seg(dest.received[0], other, predictor, tmp_path)
        # the other series needed TIMEOUT of quiet, so the stalled one has been quiet longer; give it more
        time.sleep(2 * TIMEOUT)
        assert node.spool.pending() == 1 and len(dest.received) == 1
        incoming = node.spool.folder("incoming") / series.study_uid / series.series_uid
        assert len(list(incoming.glob("*.dcm"))) == 3
    finally:
        stalled.abort()
    aborted = node.spool.folder("aborted") / series.study_uid / series.series_uid
    wait_for(lambda: (aborted / "reason.txt").is_file(), 10, "the stalled series in aborted/")
    assert len(dest.received) == 1
