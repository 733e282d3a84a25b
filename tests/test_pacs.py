"""End to end with a real Orthanc (OS package): PACS -> `resunet serve dicom` -> DICOM SEG back in
the PACS by C-STORE or STOW-RS, and `resunet predict --dicomweb --stow` (QIDO-RS / WADO-RS in,
STOW-RS out) against Orthanc's DICOMweb plugin (Debian package orthanc-dicomweb).

Orthanc 1.10 binds 0.0.0.0 and cannot be told otherwise, so it only ever runs inside a private
network namespace that holds nothing but loopback. A normal pytest run collects only the outer
tests, each of which re-runs one inner test of this file inside ``unshare -n`` (``unshare -rn``
when not root) with ``RESUNET_IN_NETNS=1``; there the inner test does the real work (and refuses
to start Orthanc if the namespace has any interface besides ``lo``). An outer test skips only when
Orthanc (or, for the DICOMweb ones, its DICOMweb plugin) is not installed or no network namespace
can be made.
"""

from __future__ import annotations

import inspect
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import urllib.error
from pathlib import Path

import numpy as np
import pytest
from pacs_helpers import (
    LABELS, Orthanc, ct_array, dicomweb_plugin, free_port, make_checkpoint, orthanc_binary, read_seg_file,
    referenced_instances, referenced_series, scu, wait_for,
)

pytestmark = pytest.mark.pacs

IN_NETNS = os.environ.get("RESUNET_IN_NETNS") == "1"
REPO = Path(__file__).resolve().parents[1]


def _namespace_prefix() -> tuple[list[str] | None, str]:
    """The unshare command that gives a loopback-only network namespace here, or (None, why not)."""
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return None, "unshare (util-linux) or ip (iproute2) is not installed"
    candidates = ([["unshare", "-n"]] if os.geteuid() == 0 else []) + [["unshare", "-rn"]]
    errors = []
    for prefix in candidates:
        probe = subprocess.run([*prefix, "sh", "-c", "ip link set lo up"], capture_output=True, text=True, timeout=30)
        if probe.returncode == 0:
            return prefix, ""
        errors.append(f"{' '.join(prefix)}: {probe.stderr.strip() or probe.returncode}")
    return None, "no private network namespace can be created (" + "; ".join(errors) + ")"


#: the inner tests, each run by one outer test; True: it needs Orthanc's DICOMweb plugin
INNER = {
    "test_orthanc_forwards_a_series_and_gets_the_seg_back[c-store]": False,
    "test_orthanc_forwards_a_series_and_gets_the_seg_back[stow-rs]": True,
    "test_predict_fetches_a_study_by_dicomweb_and_stows_the_segs_back": True,
}

if not IN_NETNS:

    @pytest.mark.parametrize("test", list(INNER))
    def test_in_a_private_network_namespace(test, tmp_path):
        if orthanc_binary() is None:
            pytest.skip("Orthanc is not installed: apt-get install orthanc dcmtk (.ci/run does it when root)")
        if INNER[test] and dicomweb_plugin() is None:
            pytest.skip("Orthanc's DICOMweb plugin is not installed: apt-get install orthanc-dicomweb "
                        "(.ci/run does it when root)")
        prefix, why = _namespace_prefix()
        if prefix is None:
            pytest.skip(why)
        inner = (f"ip link set lo up && exec {shlex.quote(sys.executable)} -m pytest -q -p no:cacheprovider "
                 f"--basetemp={shlex.quote(str(tmp_path / 'inner'))} {shlex.quote(f'{__file__}::{test}')} -m pacs")
        env = {**os.environ, "RESUNET_IN_NETNS": "1"}
        run = subprocess.run([*prefix, "sh", "-c", inner], cwd=REPO, env=env, capture_output=True, text=True,
                             timeout=170)
        output = f"$ {' '.join(prefix)} sh -c {inner!r}\n{run.stdout}\n{run.stderr}"
        assert run.returncode == 0 and "1 passed" in run.stdout, output

else:

    def _store_into(port: int, files: list[Path]) -> None:
        """Send the CT series to Orthanc: dcmtk storescu when installed, else pynetdicom."""
        if shutil.which("storescu"):
            run = subprocess.run(["storescu", "-aet", "TESTSCU", "-aec", "ORTHANC", "127.0.0.1", str(port),
                                  *map(str, files)], capture_output=True, text=True, timeout=60)
            assert run.returncode == 0, run.stdout + run.stderr
            return
        assoc = scu("TESTSCU").associate("127.0.0.1", port, ae_title="ORTHANC")
        assert assoc.is_established
        try:
            assert all(assoc.send_c_store(p).Status == 0 for p in files)
        finally:
            assoc.release()

    def _echo_node(orthanc: Orthanc) -> bool:
        try:
            orthanc.post("/modalities/RESUNET/echo", {})
            return True
        except urllib.error.HTTPError:
            return False

    def _start(args: list[str], log: Path, tmp_path: Path) -> subprocess.Popen:
        """``python -m resunet ARGS`` in the background, output to ``log``."""
        env = {**os.environ, "RESUNET_CACHE": str(tmp_path / "cache")}
        with open(log, "wb") as out:
            return subprocess.Popen([sys.executable, "-m", "resunet", *args], stdout=out, stderr=subprocess.STDOUT,
                                    cwd=REPO, env=env)

    def _only_loopback() -> None:
        interfaces = [name for _, name in socket.if_nameindex()]
        assert interfaces == ["lo"], f"refusing to start Orthanc (binds 0.0.0.0) with interfaces {interfaces}"

    @pytest.mark.parametrize("way_back", ["c-store", "stow-rs"])
    def test_orthanc_forwards_a_series_and_gets_the_seg_back(tmp_path, way_back):
        """Orthanc C-STOREs a CT series to the node; the SEG comes back by C-STORE (``--dest``) or by
        STOW-RS to Orthanc's DICOMweb plugin (``--dest-dicomweb``)."""
        from dicom_series import write_ct_series

        from resunet import cli
        from resunet.data.dicom import read_dicom_series
        from resunet.data.dicom_seg import read_dicom_seg

        _only_loopback()
        model = make_checkpoint(tmp_path / "m.pt")
        series = write_ct_series(tmp_path / "ct", ct_array())
        (tmp_path / "orthanc").mkdir()
        node_port = free_port()
        orthanc = Orthanc(tmp_path / "orthanc", {"RESUNET": ("RESUNET", "127.0.0.1", node_port)},
                          dicomweb=way_back == "stow-rs")
        dest = (["--dest", f"ORTHANC@127.0.0.1:{orthanc.dicom_port}"] if way_back == "c-store"
                else ["--dest-dicomweb", orthanc.dicomweb_url])
        # the offline reference, with the plain fp32 network like the node (where `predict` can choose)
        offline = tmp_path / "offline" / "seg.dcm"
        backend = ["--backend", "eager"] if "backend" in inspect.signature(cli.predict).parameters else []
        logs = {"predict": tmp_path / "predict.log", "node": tmp_path / "node.log", "Orthanc": orthanc.log}
        predict = _start(["predict", "-m", str(model), "-i", str(series.folder), "-o", str(offline), *backend],
                         logs["predict"], tmp_path)
        node = _start(["serve", "dicom", "-m", str(model), "--ae-title", "RESUNET", "--port", str(node_port),
                       "--allow-aet", "ORTHANC", *dest, "--series-timeout", "1", "--spool", str(tmp_path / "spool")],
                      logs["node"], tmp_path)
        try:
            orthanc.start()
            _store_into(orthanc.dicom_port, series.files)
            found = orthanc.post("/tools/lookup", series.series_uid)
            ct_id = next(item["ID"] for item in found if item["Type"] == "Series")
            study_id = orthanc.get(f"/series/{ct_id}")["ParentStudy"]

            def node_ready() -> bool:
                assert node.poll() is None, "the node exited"
                return _echo_node(orthanc)

            wait_for(node_ready, 60, "the node to answer Orthanc's C-ECHO", interval=0.2)
            job = orthanc.post("/modalities/RESUNET/store", {"Resources": [ct_id], "Synchronous": True})
            assert job.get("FailedInstancesCount", 0) == 0, job

            def seg_series() -> list[dict]:
                return [s for s in orthanc.get(f"/studies/{study_id}/series")
                        if s["MainDicomTags"].get("Modality") == "SEG"]

            segs = wait_for(seg_series, 60, "a SEG series in the Orthanc study", interval=0.2)
            assert len(segs) == 1 and len(segs[0]["Instances"]) == 1, json.dumps(segs, indent=1)
            data = orthanc.request("GET", f"/instances/{segs[0]['Instances'][0]}/file")
            assert predict.wait(timeout=120) == 0, "resunet predict failed"
        except BaseException:
            for name, log in logs.items():
                if log.exists():
                    print(f"---- {name} log\n" + log.read_text(errors="replace")[-4000:])
            raise
        finally:
            for proc in (node, predict):
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
                    proc.wait(timeout=30)
            orthanc.stop()

        seg = read_seg_file(data)
        assert seg.StudyInstanceUID == series.study_uid
        assert referenced_series(seg) == {series.series_uid}
        assert referenced_instances(seg) == set(series.sop_instance_uids)
        (tmp_path / "from-orthanc.dcm").write_bytes(data)
        source = read_dicom_series(series.folder)
        expected = read_dicom_seg(offline, source, LABELS)
        assert len(np.unique(expected)) > 1
        np.testing.assert_array_equal(read_dicom_seg(tmp_path / "from-orthanc.dcm", source, LABELS), expected)

    def test_predict_fetches_a_study_by_dicomweb_and_stows_the_segs_back(tmp_path, capsys):
        """``resunet predict --dicomweb URL --study UID --stow`` on a study of two CT series: each
        gets a SEG, written locally and found again in Orthanc by QIDO-RS, referencing its series
        and decoding to the offline prediction; a study without images is a clear error."""
        from dicom_series import write_ct_series
        from dicomweb_client import DICOMwebClient

        from resunet import cli
        from resunet.data.dicom import read_dicom_series
        from resunet.data.dicom_seg import read_dicom_seg
        from resunet.infer.predictor import Predictor

        _only_loopback()
        model = make_checkpoint(tmp_path / "m.pt")
        first = write_ct_series(tmp_path / "ct1", ct_array())
        second = write_ct_series(tmp_path / "ct2", ct_array((5, 20, 24), seed=3), study_uid=first.study_uid,
                                 series_number=2, seed=1)
        (tmp_path / "orthanc").mkdir()
        orthanc = Orthanc(tmp_path / "orthanc", {}, dicomweb=True)
        log = tmp_path / "predict.log"
        try:
            orthanc.start()
            for path in (*first.files, *second.files):
                orthanc.request("POST", "/instances", path.read_bytes())
            run = _start(["predict", "-m", str(model), "--dicomweb", orthanc.dicomweb_url, "--study",
                          first.study_uid, "--stow", "-o", str(tmp_path / "out"), "--backend", "eager"], log, tmp_path)
            assert run.wait(timeout=120) == 0, log.read_text()
            web = DICOMwebClient(orthanc.dicomweb_url)  # QIDO-RS: the SEG instances of the study
            found = web.search_for_instances(first.study_uid, search_filters={"Modality": "SEG"})
            uids = [item["00080018"]["Value"][0] for item in found]
            files = [orthanc.request("GET", f"/instances/{orthanc.post('/tools/lookup', uid)[0]['ID']}/file")
                     for uid in uids]
            with pytest.raises(SystemExit) as exit_info:  # the CT-less study of nothing: exit 2, one clear line
                cli.main(["predict", "-m", str(model), "--dicomweb", orthanc.dicomweb_url, "--study", "1.2.3.4",
                          "-o", str(tmp_path / "none")])
        finally:
            orthanc.stop()
            print(log.read_text(errors="replace")[-4000:] if log.exists() else "", orthanc.log.read_text()[-3000:])
        assert exit_info.value.code == 2 and "no CT or MR series" in capsys.readouterr().err
        assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
            f"{s.series_uid}.dcm" for s in (first, second))
        predictor = Predictor.from_file(model)
        segs = [read_seg_file(data) for data in files]
        assert sorted(referenced_series(seg).pop() for seg in segs) == sorted([first.series_uid, second.series_uid])
        for seg, data in zip(segs, files):
            series = first if referenced_series(seg) == {first.series_uid} else second
            assert seg.Modality == "SEG" and referenced_instances(seg) == set(series.sop_instance_uids)
            (tmp_path / "from-orthanc.dcm").write_bytes(data)
            source = read_dicom_series(series.folder)
            expected = predictor.predict([source]).array
            assert len(np.unique(expected)) > 1
            np.testing.assert_array_equal(read_dicom_seg(tmp_path / "from-orthanc.dcm", source, LABELS), expected)
