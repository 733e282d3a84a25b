"""DICOMweb for `resunet predict --dicomweb` and `resunet serve dicom --dest-dicomweb`.

`find_series` asks a DICOMweb server (QIDO-RS) for the CT / MR series of a study or for one
series, `fetch_series` downloads a series (WADO-RS, one instance at a time) into a folder,
`store_file` sends a DICOM file (the SEG) back (STOW-RS). `predict_dicomweb` does all three for
``resunet predict``: each series is fetched into a private temporary folder (removed afterwards),
read (`read_dicom_series`), predicted and written as a DICOM SEG (`write_mask`), which ``stow``
then stores on the server. The client is ``dicomweb-client``; every network or server problem
becomes an `InputError` naming the URL and what to check.
"""

from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlparse

from resunet.data.limits import DEFAULT_MAX_VOXELS
from resunet.errors import ConfigError, InputError, ResunetError
from resunet.infer.predictor import Predictor

__all__ = ["SeriesRef", "check_url", "connect", "fetch_series", "find_series", "predict_dicomweb", "store_file"]

IMAGE_MODALITIES = ("CT", "MR")
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_MODALITY, _STUDY, _SERIES, _COUNT = "00080060", "0020000D", "0020000E", "00201209"
_FAILED_SOP_SEQUENCE = 0x00081198


@dataclass(frozen=True)
class SeriesRef:
    """One series on the server: its UIDs, modality and number of instances (None: not reported)."""

    study_uid: str
    series_uid: str
    modality: str
    instances: int | None = None


def check_url(url: str, option: str = "--dicomweb") -> str:
    """``url`` without a trailing ``/`` when it is an http(s) URL; `ConfigError` otherwise."""
    parsed = urlparse(str(url).strip())
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ConfigError(f"{option} {url!r} is not an http(s) URL; give the DICOMweb root, "
                          "e.g. http://127.0.0.1:8042/dicom-web")
    return str(url).strip().rstrip("/")


def check_uid(value: str, option: str) -> str:
    """``value`` when it is a DICOM UID (digits and dots, at most 64 characters); `ConfigError` otherwise."""
    text = str(value).strip()
    if len(text) > 64 or not _UID.match(text):
        raise ConfigError(f"{option} {value!r} is not a DICOM UID (digits and dots, e.g. 1.2.840.113619.2.55.3)")
    return text


def connect(url: str, timeout: float = 60.0) -> Any:
    """A ``dicomweb_client.DICOMwebClient`` for the DICOMweb root ``url`` (timeout in seconds per
    request), without the client's own retries: one failure is reported at once."""
    from dicomweb_client import DICOMwebClient

    url = check_url(url)
    try:
        client = DICOMwebClient(url, timeout=timeout)
    except ValueError as err:  # the client's own URL check
        raise ConfigError(f"DICOMweb URL {url!r} is malformed ({err}); e.g. http://127.0.0.1:8042/dicom-web") from None
    client.set_http_retry_params(retry=False)  # its back-off waits ~30 s on a wrong URL; callers retry themselves
    return client


def _call(client: Any, what: str, action: Callable[[], Any]) -> Any:
    """``action()``; network and HTTP failures become `InputError` naming ``what`` and the server."""
    import requests

    url = getattr(client, "base_url", "the DICOMweb server")
    try:
        return action()
    except requests.exceptions.HTTPError as err:
        status = err.response.status_code if err.response is not None else "?"
        hint = "it is not on the server" if status == 404 else "see the server's log"
        raise InputError(f"{what} at {url} failed with HTTP {status}: {hint}") from None
    except requests.exceptions.RequestException as err:
        raise InputError(f"cannot reach the DICOMweb server {url} while trying to {what} ({type(err).__name__}); "
                         "check the URL (the DICOMweb root, e.g. http://HOST:8042/dicom-web) and that the "
                         "server runs") from None


def _value(item: dict[str, Any], tag: str) -> Any:
    values = item.get(tag, {}).get("Value") or [None]
    return values[0]


def _ref(item: dict[str, Any]) -> SeriesRef:
    count = _value(item, _COUNT)
    return SeriesRef(str(_value(item, _STUDY)), str(_value(item, _SERIES)), str(_value(item, _MODALITY) or "?"),
                     int(count) if count is not None else None)


def find_series(client: Any, study: str | None = None, series: str | None = None) -> list[SeriesRef]:
    """The CT / MR series to predict (QIDO-RS): ``series`` alone, or every CT / MR series of
    ``study``; `InputError` when there is none, saying what the server holds instead."""
    if series is None and study is None:
        raise ConfigError("give --study UID (every CT / MR series of the study) or --series UID")
    filters = {"SeriesInstanceUID": check_uid(series, "--series")} if series else {}
    study = check_uid(study, "--study") if study else None
    where = f"series {series}" if series else f"study {study}"
    found = [_ref(item) for item in _call(client, f"search for {where}", lambda: client.search_for_series(
        study, search_filters=filters, fields=["Modality", "NumberOfSeriesRelatedInstances"], get_remaining=True))]
    images = [ref for ref in found if ref.modality in IMAGE_MODALITIES]
    if not images:
        held = ", ".join(sorted({f"{r.modality} {r.series_uid}" for r in found})) or "nothing"
        raise InputError(f"{where} has no CT or MR series on the DICOMweb server (it holds: {held}); "
                         "check the UID, or give --series of a CT / MR series")
    return images


def _save(dataset: Any, path: Path) -> None:
    import pydicom

    try:
        pydicom.dcmwrite(path, dataset, enforce_file_format=True)
    except TypeError:  # pydicom 2.x
        pydicom.dcmwrite(path, dataset, write_like_original=False)


def fetch_series(client: Any, ref: SeriesRef, folder: Path) -> int:
    """Download the series ``ref`` (WADO-RS) into ``folder`` as ``00000.dcm``, ``00001.dcm``, ...;
    returns the number of instances (`InputError` when the server sends none)."""

    def download() -> int:
        count = 0
        for count, dataset in enumerate(client.iter_series(ref.study_uid, ref.series_uid), start=1):
            _save(dataset, folder / f"{count - 1:05d}.dcm")
        return count

    count = _call(client, f"retrieve series {ref.series_uid}", download)
    if not count:
        raise InputError(f"the DICOMweb server sent no instance of series {ref.series_uid}")
    return count


def store_file(client: Any, path: Path) -> None:
    """STOW-RS the DICOM file ``path`` (a SEG) to the server of ``client``; `InputError` when the
    server refuses it (its FailedSOPSequence or an HTTP error)."""
    import pydicom

    dataset = pydicom.dcmread(str(path))
    answer = _call(client, f"store {path.name}", lambda: client.store_instances([dataset]))
    failed = answer.get(_FAILED_SOP_SEQUENCE) if answer is not None else None
    if failed is not None and failed.value:
        reason = getattr(failed.value[0], "FailureReason", "?")
        raise InputError(f"the DICOMweb server refused {path.name} (failure reason {reason}); see its log")


def predict_dicomweb(
    predictor: Predictor, url: str, output: Path, *, study: str | None = None, series: str | None = None,
    stow: bool = False, dicom_format: str = "seg", max_voxels: int = DEFAULT_MAX_VOXELS,
    max_memory_gb: float | None = None,
) -> tuple[list[Path], dict[str, str]]:
    """Predict the CT / MR series of ``study`` (or the one ``series``) of the DICOMweb server
    ``url``; write ``output/<SeriesInstanceUID>.dcm`` (``output`` itself when it names a ``.dcm``
    file and there is one series), a DICOM SEG or with ``dicom_format="rtstruct"`` an RT Structure
    Set, and with ``stow`` store each on the server. ``max_voxels`` / ``max_memory_gb``: a series
    whose headers declare more, or that would not fit in memory, fails before it is decoded
    (`resunet.infer.memory.Admission`, as for ``predict -i``).

    Returns the written paths and ``{series UID: error}`` of the series that failed (the others go
    on). Finding the series fails at once (`InputError` / `ConfigError`)."""
    from resunet.data.dicom import read_dicom_series
    from resunet.data.io import make_folder
    from resunet.infer.memory import GIB, Admission
    from resunet.infer.run import DICOM_FORMATS, output_path, write_mask

    if dicom_format not in DICOM_FORMATS:
        raise ConfigError(f"--dicom-format must be one of {', '.join(DICOM_FORMATS)}, got {dicom_format!r}")
    if predictor.num_input_channels != 1:
        raise ConfigError(f"the model expects {predictor.num_input_channels} channels per case; a DICOM series "
                          "is one channel: use a single-channel model with --dicomweb")
    admission = Admission(predictor, max_voxels, None if max_memory_gb is None else int(max_memory_gb * GIB),
                          strict=False)
    client = connect(url)
    refs = find_series(client, study, series)
    output = Path(output)
    single = len(refs) == 1
    make_folder(output_path(output, refs[0].series_uid, ".dcm", single).parent)
    written: list[Path] = []
    failed: dict[str, str] = {}
    for ref in refs:
        target = output_path(output, ref.series_uid, ".dcm", single)
        try:
            with tempfile.TemporaryDirectory(prefix="resunet-dicomweb-") as tmp:
                fetch_series(client, ref, Path(tmp))
                admission.need([tmp], f"series {ref.series_uid}")  # headers only: refuse before decoding
                image = read_dicom_series(tmp)
                mask = predictor.predict([image])
                written.append(write_mask(mask, target, labels=predictor.labels, source=image, dicom_format=dicom_format))
        except ResunetError as err:
            failed[ref.series_uid] = str(err)
            continue
        try:
            if stow:
                store_file(client, target)
        except ResunetError as err:
            failed[ref.series_uid] = f"{err} ({target} is written, but not stored on the server)"
    return written, failed
