"""`resunet predict --dicomweb` without a server: the options and URLs it refuses, and the clear
error for a server that is not there. The round trips against a real Orthanc with its DICOMweb
plugin are in tests/test_pacs.py."""

from __future__ import annotations

import pytest
from pacs_helpers import free_port, make_checkpoint

from resunet import cli
from resunet.errors import ConfigError, InputError
from resunet.infer.dicomweb import check_uid, check_url, connect, find_series, predict_dicomweb
from resunet.infer.predictor import Predictor


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("dicomweb") / "m.pt")


def test_urls_and_uids_are_checked_before_any_request():
    assert check_url(" http://pacs:8042/dicom-web/ ") == "http://pacs:8042/dicom-web"
    for bad in ("pacs:8042/dicom-web", "ftp://pacs/dicom-web", "http://"):
        with pytest.raises(ConfigError, match="is not an http\\(s\\) URL"):
            check_url(bad)
    assert check_uid("1.2.840.10008", "--study") == "1.2.840.10008"
    for bad in ("1.2.x", "1..2", "1" * 65, ""):
        with pytest.raises(ConfigError, match="--study .* is not a DICOM UID"):
            check_uid(bad, "--study")
    with pytest.raises(ConfigError, match="--study UID .* or --series UID"):
        find_series(connect("http://127.0.0.1:9/dicom-web"))


def test_a_server_that_is_not_there_is_named_with_the_fix(model, tmp_path):
    url = f"http://127.0.0.1:{free_port()}/dicom-web"  # nothing listens there
    with pytest.raises(InputError, match=f"cannot reach the DICOMweb server {url} .*check the URL"):
        predict_dicomweb(Predictor.from_file(model), url, tmp_path / "out", study="1.2.3")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args, message", [
    (["-i", "x.nii.gz", "--dicomweb", "http://h/dw"], "either --input PATH or --dicomweb URL"),
    ([], "either --input PATH or --dicomweb URL"),
    (["-i", "x.nii.gz", "--study", "1.2"], "--study, --series and --stow go with --dicomweb"),
    (["--dicomweb", "http://h/dw", "--study", "1.2", "--continue"], "work with --input only"),
])
def test_predict_refuses_mixed_options_with_one_line(model, tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["predict", "-m", str(model), "-o", str(tmp_path / "out"), *args])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err and "Traceback" not in err
