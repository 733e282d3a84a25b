"""HTTP API for a trained model, with dynamic batching (FastAPI app + uvicorn runner).

Endpoints
---------
``POST /v1/segment``
    Upload ONE image, get its label mask back in the same format: NIfTI (``.nii``/``.nii.gz``,
    same affine and header, content type ``application/gzip`` / ``application/octet-stream``) or
    PNG (same size, 8-bit label indices, ``image/png``). The response header
    ``X-Resunet-Batch-Size`` tells how many requests shared the model call.

    Primary way: ``multipart/form-data`` with the image in the file field ``file``; its file name
    gives the format::

        curl -F file=@ct.nii.gz http://127.0.0.1:8000/v1/segment -o ct_mask.nii.gz

    Also accepted: the raw bytes as ``application/octet-stream`` with a ``filename`` query
    parameter (``curl --data-binary @ct.nii.gz -H 'Content-Type: application/octet-stream'
    'http://127.0.0.1:8000/v1/segment?filename=ct.nii.gz'``).

    A model with C input channels takes one file with C channels (4-D NIfTI, RGB PNG for C = 3).
``GET /health``  ``{"status": "ok"}`` while the batch worker runs (503 once it stops).
``GET /v1/model``  labels, input spec (channels, spatial dims, mode), preprocessing, batching.
``GET /metrics``  JSON: ``/v1/segment`` request counts by status, batch-size histogram, latency
    p50/p90/p99 in ms of the last 10 000 successful requests, queue depth.

Errors are JSON ``{"detail": reason}``: 400 bad payload (unknown/garbled format, empty file,
wrong content type, wrong channel count), 401 missing/wrong bearer token (when a token is set;
``/health`` stays open), 413 upload over ``max_upload_mb`` (declared Content-Length checked up
front, streamed bytes counted, so a chunked or lying client is cut off too), 413 image whose
header declares more than ``max_voxels`` voxels x channels or whose estimated memory is over the
whole budget, 503 + ``Retry-After`` when the queue is full, when the memory budget stays busy for
``memory_wait_s`` or the server shuts down, 500 (generic message, traceback in the log) when
the model fails unexpectedly -- the server keeps serving.

Memory (`resunet.infer.memory`): before an upload is decoded its header is read and the request
reserves the bytes decoding and predicting it will allocate from one budget for the whole server
(``max_memory_gb``, default half of the physical RAM); the reservation is released when the
request is answered. A ``.nii.gz`` is never inflated beyond what its header declares
(`resunet.data.limits`).

Uploads are streamed into a private temporary folder (mode 0700) that is removed after the request
whatever happens. Reading the upload and encoding the mask run in worker threads; the model runs
in the single thread of `resunet.serve.batching.DynamicBatcher`, which calls
``predictor.predict_many`` once per batch.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import shutil
import socket
import tempfile
import threading
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from resunet.data.limits import DEFAULT_MAX_VOXELS, TooLarge
from resunet.data.volume import Volume
from resunet.errors import ConfigError, ResunetError
from resunet.serve.batching import BatchResult, DynamicBatcher, QueueFull, Stopped
from resunet.infer.memory import GIB, Admission, BudgetTimeout, OverBudget

__all__ = ["ServerMetrics", "create_app", "run_http_server"]

log = logging.getLogger("resunet.serve.http")

#: upload suffix -> content type of the returned mask
FORMATS = {".nii.gz": "application/gzip", ".nii": "application/octet-stream", ".png": "image/png"}
SEGMENT_PATH = "/v1/segment"
LATENCY_WINDOW = 10_000  # latencies kept for the percentiles
FIELD_LIMIT = 2**20  # bytes of one text field of a multipart form (extensions' parameters)


class _Reject(Exception):
    """A request the client got wrong: answered with ``status`` and ``{"detail": detail}``."""

    def __init__(self, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status, self.detail, self.headers = status, detail, headers or {}


# --------------------------------------------------------------------------- metrics


class ServerMetrics:
    """Thread-safe counters behind ``GET /metrics`` (latencies in seconds, reported in ms)."""

    def __init__(self, window: int = LATENCY_WINDOW) -> None:
        self._lock = threading.Lock()
        self.started = time.time()
        self.status: Counter[str] = Counter()
        self.batch_sizes: Counter[int] = Counter()
        self.batch_seconds = 0.0
        self.latencies: deque[float] = deque(maxlen=window)

    def record_request(self, status: int | None, seconds: float) -> None:
        with self._lock:
            self.status["no_response" if status is None else str(status)] += 1
            if status == 200:
                self.latencies.append(seconds)

    def record_batch(self, size: int, seconds: float) -> None:
        with self._lock:
            self.batch_sizes[size] += 1
            self.batch_seconds += seconds

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            lat = np.asarray(self.latencies, dtype=np.float64) * 1000.0
            batches = sum(self.batch_sizes.values())
            items = sum(k * v for k, v in self.batch_sizes.items())
            return {
                "uptime_s": round(time.time() - self.started, 3),
                "requests": {"total": sum(self.status.values()), "by_status": dict(sorted(self.status.items()))},
                "batches": {
                    "total": batches,
                    "items": items,
                    "mean_size": items / batches if batches else 0.0,
                    "size_histogram": {str(k): v for k, v in sorted(self.batch_sizes.items())},
                    "model_seconds": round(self.batch_seconds, 6),
                },
                "latency_ms": {
                    "window": int(lat.size),
                    **{f"p{q}": (float(np.percentile(lat, q)) if lat.size else None) for q in (50, 90, 99)},
                },
            }


class _SegmentMetrics:
    """Pure ASGI middleware timing ``/v1/segment`` from request start to response start."""

    def __init__(self, app: Callable[..., Awaitable[None]], metrics: ServerMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: MutableMapping[str, Any], receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or scope.get("path") != SEGMENT_PATH:
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status: list[int] = []

        async def send_and_note(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start" and not status:
                status.append(int(message["status"]))
                self.metrics.record_request(status[0], time.perf_counter() - start)
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            if not status:
                self.metrics.record_request(None, time.perf_counter() - start)


# --------------------------------------------------------------------------- uploads


def _suffix(filename: str) -> str:
    name = filename.strip().lower()
    for suffix in FORMATS:
        if name.endswith(suffix):
            return suffix
    raise _Reject(400, f"unsupported file name {filename!r}: send a .nii, .nii.gz or .png image "
                       "(the file name's extension gives the format)")


def _check_length(request: Any, limit: int) -> None:
    """`_Reject` a declared ``Content-Length`` that is garbled or over ``limit`` bytes, before any reading."""
    declared = request.headers.get("content-length")
    if declared is None:
        return
    if not declared.strip().isdigit():
        raise _Reject(400, f"invalid Content-Length {declared!r}")
    if int(declared) > limit:
        raise _Reject(413, f"upload of {int(declared)} bytes is over the limit of {limit / 2**20:g} MiB; "
                           "send a smaller image or raise --max-upload-mb", {"Connection": "close"})


async def _body_chunks(request: Any, limit: int) -> AsyncIterator[bytes]:
    """The request body in chunks, stopping with 413 as soon as more than ``limit`` bytes came."""
    total = 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise _Reject(413, f"upload larger than the limit of {limit / 2**20:g} MiB; "
                               "send a smaller image or raise --max-upload-mb", {"Connection": "close"})
        if chunk:
            yield chunk


async def _receive_raw(request: Any, folder: Path, limit: int,
                       suffix_of: Callable[[str], str] = _suffix) -> tuple[str, Path]:
    filename = request.query_params.get("filename")
    if not filename:
        raise _Reject(400, "a raw application/octet-stream upload needs the query parameter "
                           "?filename=NAME.nii.gz (or .nii / .png) to know its format")
    target = folder / f"upload{suffix_of(filename)}"
    with open(target, "wb") as fh:
        async for chunk in _body_chunks(request, limit):
            fh.write(chunk)
    return filename, target


async def _receive_multipart(request: Any, boundary: bytes, folder: Path, limit: int,
                             fields: dict[str, str] | None = None,
                             suffix_of: Callable[[str], str] = _suffix) -> tuple[str, Path | None]:
    """The multipart body's file field ``file`` streamed into ``folder`` (its name's suffix by
    ``suffix_of``). ``fields``: when given, the other (text) fields are collected into it, at most
    `FIELD_LIMIT` bytes each, and the file is optional (``("", None)`` without one)."""
    from python_multipart.multipart import MultipartParser, parse_options_header

    state: dict[str, Any] = {"field": b"", "value": b"", "headers": {}, "fh": None, "name": None,
                             "path": None, "ended": False, "text": None}

    def on_part_begin() -> None:
        state["headers"] = {}

    def on_header_field(data: bytes, start: int, end: int) -> None:
        state["field"] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        state["value"] += data[start:end]

    def on_header_end() -> None:
        state["headers"][state["field"].decode("latin-1").lower()] = state["value"].decode("latin-1")
        state["field"] = state["value"] = b""

    def on_headers_finished() -> None:
        _, options = parse_options_header(state["headers"].get("content-disposition", ""))
        if options.get(b"name") != b"file":
            if fields is not None and not options.get(b"filename"):  # a text field to keep
                state["text"] = (options.get(b"name", b"").decode("utf-8", "replace"), bytearray())
            return  # other form fields are ignored
        if state["path"] is not None:
            raise _Reject(400, "send one image per request (several 'file' fields found)")
        filename = options.get(b"filename", b"").decode("utf-8", "replace")
        if not filename:
            raise _Reject(400, "the multipart field 'file' has no filename; its extension gives the format")
        state["name"], state["path"] = filename, folder / f"upload{suffix_of(filename)}"
        state["fh"] = open(state["path"], "wb")

    def on_part_data(data: bytes, start: int, end: int) -> None:
        if state["fh"] is not None:
            state["fh"].write(data[start:end])
        elif state["text"] is not None:
            state["text"][1].extend(data[start:end])
            if len(state["text"][1]) > FIELD_LIMIT:
                raise _Reject(400, f"the form field {state['text'][0]!r} is over {FIELD_LIMIT // 1024} KiB")

    def on_part_end() -> None:
        if state["fh"] is not None:
            state["fh"].close()
            state["fh"] = None
        if state["text"] is not None:
            fields[state["text"][0]] = state["text"][1].decode("utf-8", "replace")  # type: ignore[index]
            state["text"] = None

    def on_end() -> None:
        state["ended"] = True

    parser = MultipartParser(boundary, {
        "on_part_begin": on_part_begin, "on_header_field": on_header_field,
        "on_header_value": on_header_value, "on_header_end": on_header_end,
        "on_headers_finished": on_headers_finished, "on_part_data": on_part_data,
        "on_part_end": on_part_end, "on_end": on_end,
    })
    try:
        async for chunk in _body_chunks(request, limit):
            try:
                parser.write(chunk)
            except _Reject:
                raise
            except Exception as err:  # python_multipart's parse errors
                raise _Reject(400, f"malformed multipart body ({err}); send the image as the file field 'file'") from None
    finally:
        if state["fh"] is not None:
            state["fh"].close()
    if state["path"] is None and fields is None:
        raise _Reject(400, "no file field 'file' in the multipart body; send the image as -F file=@image.nii.gz")
    if not state["ended"]:
        raise _Reject(400, "the multipart body ended before its closing boundary; re-send the complete upload")
    return state["name"] or "", state["path"]


async def _receive_upload(request: Any, folder: Path, limit: int, fields: dict[str, str] | None = None,
                          suffix_of: Callable[[str], str] = _suffix) -> tuple[str, Path | None]:
    """Stream the body into ``folder``; return the client's file name and the local path
    (``fields`` and ``suffix_of``: see `_receive_multipart`)."""
    from python_multipart.multipart import parse_options_header

    _check_length(request, limit)

    ctype, options = parse_options_header(request.headers.get("content-type", ""))
    if ctype == b"multipart/form-data":
        boundary = options.get(b"boundary")
        if not boundary:
            raise _Reject(400, "multipart/form-data without a boundary; let the HTTP client build the body")
        return await _receive_multipart(request, boundary, folder, limit, fields, suffix_of)
    if ctype == b"application/octet-stream":
        return await _receive_raw(request, folder, limit, suffix_of)
    shown = ctype.decode("latin-1") or "(none)"
    raise _Reject(400, f"unsupported content type {shown}: send multipart/form-data with the image in the "
                       "field 'file', or application/octet-stream with ?filename=NAME")


# --------------------------------------------------------------------------- cases


def _read_case(path: Path, filename: str, channels: int, mode: str) -> list[Volume]:
    """Read the upload and split it into the ``channels`` single-channel images ``(*S)`` a case needs.

    One file holds the whole case (`resunet.data.channels`): an RGB (or RGBA, alpha dropped) PNG
    is 3 channels, a grey PNG 1, a 4-D NIfTI its last axis.
    """
    from resunet.data.channels import check_channels, split_channels
    from resunet.data.io import read_volume

    if path.stat().st_size == 0:
        raise _Reject(400, f"{filename} is empty (0 bytes); send the image file itself")

    def client_message(err: Exception) -> str:
        return str(err).replace(str(path), filename)

    try:
        volume = read_volume(path)  # its header was checked by _reservation first
    except ResunetError as err:
        raise _Reject(400, client_message(err)) from None
    except _Reject:
        raise
    except Exception as err:  # a reader failing in a way it does not classify: still the file's fault
        raise _Reject(400, f"cannot read {filename}: {type(err).__name__}: {client_message(err)}") from None
    if volume.array.size == 0:
        raise _Reject(400, f"{filename} holds no voxels (shape {volume.array.shape})")
    if mode == "3d" and volume.spatial_ndim != 3:
        raise _Reject(400, f"this is a 3-D model; {filename} is a 2-D image -- send a 3-D volume (.nii/.nii.gz)")
    try:  # the rule of resunet.data.channels: RGB = 3 channels, grey = 1
        check_channels([Path(filename.replace("\\", "/")).name or filename], [volume.num_channels], channels)
    except ResunetError as err:
        raise _Reject(400, str(err)) from None
    if volume.meta.pop("alpha_dropped", False):  # noted in the log, not as a warning per request
        log.info("%s: its alpha (transparency) channel is dropped; the model sees the other channels", filename)
    return split_channels(volume)


def _reservation(admission: Admission, path: Path, filename: str) -> int:
    """Bytes the upload must reserve (from its header only); 413 over a limit, 400 unreadable."""
    if path.stat().st_size == 0:
        raise _Reject(400, f"{filename} is empty (0 bytes); send the image file itself")
    try:
        return admission.need([path], filename)
    except (TooLarge, OverBudget) as err:
        raise _Reject(413, str(err).replace(str(path), filename)) from None
    except ResunetError as err:
        raise _Reject(400, str(err).replace(str(path), filename)) from None
    except Exception as err:  # a header reader failing in a way it does not classify
        raise _Reject(400, f"cannot read the header of {filename}: {type(err).__name__}: "
                           f"{str(err).replace(str(path), filename)}") from None


def _admission(predictor: Any, max_voxels: int, max_memory_gb: float | None, memory_wait_s: float) -> Admission:
    if max_memory_gb is not None and not max_memory_gb > 0:
        raise ConfigError(f"--max-memory-gb must be positive, got {max_memory_gb}")
    return Admission(predictor, max_voxels, None if max_memory_gb is None else int(max_memory_gb * GIB), memory_wait_s)


async def _predict(batcher: DynamicBatcher, case: list[Volume], filename: str,
                   queued: Callable[[Any], None]) -> BatchResult[Volume]:
    """Queue ``case`` (its channel images) for the batch worker, call ``queued(future)`` and wait
    for its mask; `_Reject` 503 when the queue is full or the server stops, 400 for the case's own
    problem."""
    try:
        future = batcher.submit(case)
    except QueueFull:
        raise _Reject(503, "the server is busy (request queue full); retry shortly", {"Retry-After": "1"}) from None
    except Stopped:
        raise _Reject(503, "the server is shutting down; retry on another instance", {"Retry-After": "5"}) from None
    queued(future)
    try:
        return await asyncio.wrap_future(future)
    except Stopped:
        raise _Reject(503, "the server is shutting down; retry on another instance", {"Retry-After": "5"}) from None
    except ResunetError as err:  # the case's own problem, reported by the predictor
        raise _Reject(400, f"{filename}: {err}") from None


def _encode_mask(mask: Volume, folder: Path, suffix: str) -> bytes:
    from resunet.infer.run import write_mask

    return write_mask(mask, folder / f"mask{suffix}").read_bytes()


def _mask_name(filename: str, suffix: str) -> str:
    base = Path(filename.replace("\\", "/")).name
    stem = base[: -len(suffix)] if base.lower().endswith(suffix) else base
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in stem) or "image"
    return f"{safe}_mask{suffix}"


# --------------------------------------------------------------------------- app


def _model_description(predictor: Any) -> dict[str, Any]:
    if hasattr(predictor, "describe"):
        return dict(predictor.describe())
    return {"labels": dict(predictor.labels),
            "input": {"channels": predictor.num_input_channels, "mode": getattr(predictor, "mode", None)}}


def create_app(
    predictor: Any,
    *,
    max_batch: int = 8,
    max_wait_ms: float = 10.0,
    queue_size: int = 64,
    max_upload_mb: float = 512.0,
    token: str | None = None,
    upload_dir: str | os.PathLike[str] | None = None,
    max_voxels: int = DEFAULT_MAX_VOXELS,
    max_memory_gb: float | None = None,
    memory_wait_s: float = 5.0,
    routes: Sequence[Callable[[Any], None]] = (),
) -> Any:
    """The FastAPI app serving ``predictor`` (a `Predictor`, or anything with its ``predict_many``,
    ``labels``, ``num_input_channels``, ``mode``, ``model``, ``preprocess`` and batching attributes).

    The batch worker starts and stops with the app's lifespan. ``upload_dir`` is where the private
    per-request folders are made (default: the system temporary folder). ``max_voxels`` (voxels x
    channels an upload may declare), ``max_memory_gb`` (GiB for the whole process, default half
    of the physical RAM) and ``memory_wait_s`` (seconds a request waits for memory before 503):
    see `resunet.infer.memory`. ``app.state.batcher``, ``app.state.metrics`` and
    ``app.state.admission`` are exposed for tests and embedding. Each of ``routes`` is called with
    the finished app to add endpoints (`resunet.serve.monai_label.monai_label_routes`); they find
    ``authorised(request)``, ``segment_file`` (the upload path: memory, decoding, batch worker),
    ``check_upload``, ``upload_limit`` (bytes) and ``upload_dir`` in ``app.state``.
    """
    if max_batch < 1:
        raise ConfigError(f"--max-batch must be >= 1, got {max_batch}")
    if max_wait_ms < 0:
        raise ConfigError(f"--max-wait-ms must be >= 0, got {max_wait_ms}")
    if queue_size < 1:
        raise ConfigError(f"--queue-size must be >= 1, got {queue_size}")
    if max_upload_mb <= 0:
        raise ConfigError(f"--max-upload-mb must be positive, got {max_upload_mb}")
    if token is not None and not token.strip():
        raise ConfigError("the token is empty; pass a non-empty --token / RESUNET_TOKEN or none at all")
    if upload_dir is not None and not Path(upload_dir).is_dir():
        raise ConfigError(f"upload folder {upload_dir} does not exist; create it first")
    admission = _admission(predictor, max_voxels, max_memory_gb, memory_wait_s)
    retry_after = str(max(1, round(memory_wait_s)))
    limit = int(max_upload_mb * 2**20)
    channels, mode = int(predictor.num_input_channels), str(getattr(predictor, "mode", "2d"))
    metrics = ServerMetrics()
    expected = f"Bearer {token}".encode() if token else None

    def process(cases: list[list[Volume]]) -> Sequence[Volume | BaseException]:
        return predictor.predict_many(cases)

    batcher: DynamicBatcher[list[Volume], Volume] = DynamicBatcher(
        process, max_batch=max_batch, max_wait_ms=max_wait_ms, queue_size=queue_size,
        on_batch=metrics.record_batch,
    )

    @asynccontextmanager
    async def lifespan(_: Any) -> AsyncIterator[None]:
        batcher.start()
        try:
            yield
        finally:
            await run_in_threadpool(batcher.stop, True, 60.0)

    app = FastAPI(title="resunet", summary="Segment NIfTI / PNG images with a trained resunet model",
                  lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.batcher, app.state.metrics, app.state.predictor = batcher, metrics, predictor
    app.state.admission = admission
    app.state.upload_limit, app.state.upload_dir = limit, upload_dir
    app.add_middleware(_SegmentMetrics, metrics=metrics)

    def error(status: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse({"detail": detail}, status_code=status, headers=headers)

    def authorised(request: Request) -> bool:
        if expected is None:
            return True
        given = request.headers.get("authorization", "").encode("latin-1", "replace")
        return secrets.compare_digest(given, expected)

    def unauthorised() -> JSONResponse:
        return error(401, "missing or wrong bearer token; send the header 'Authorization: Bearer TOKEN'",
                     {"WWW-Authenticate": "Bearer"})

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error(400, f"invalid request: {exc.errors()}")

    @app.get("/health")
    async def health() -> JSONResponse:
        if not batcher.running:
            return error(503, "the batch worker is not running (starting or shutting down)", {"Retry-After": "1"})
        return JSONResponse({"status": "ok"})

    @app.get("/v1/model")
    async def model_info(request: Request) -> JSONResponse:
        if not authorised(request):
            return unauthorised()
        info = _model_description(predictor)
        info.setdefault("labels", dict(predictor.labels))
        info["upload"] = {
            "formats": list(FORMATS), "channels": channels, "max_upload_mb": max_upload_mb,
            "how": "multipart/form-data field 'file', or application/octet-stream with ?filename=NAME",
        }
        info["batching"] = {"max_batch": max_batch, "max_wait_ms": max_wait_ms, "queue_size": queue_size}
        info["memory"] = admission.describe()
        return JSONResponse(info)

    @app.get("/metrics")
    async def metrics_endpoint(request: Request) -> JSONResponse:
        if not authorised(request):
            return unauthorised()
        snap = metrics.snapshot()
        snap["queue"] = {"depth": batcher.depth, "size": queue_size, "worker_busy": batcher.busy}
        snap["memory"] = admission.budget.snapshot()
        return JSONResponse(snap)

    async def segment_file(path: Path, filename: str, encode: Callable[[Volume], bytes],
                           keep: bool = False) -> tuple[bytes, int]:
        """Reserve the memory of the image file ``path`` (from its header), decode it, run it through
        the batch worker and ``encode`` its mask, all within the reservation; (encoded mask, batch
        size). ``path`` is deleted once decoded unless ``keep``. `_Reject` for every failure a
        client causes (503 when the memory budget stays busy)."""
        need = await run_in_threadpool(_reservation, admission, path, filename)
        try:
            async with admission.budget.reserve_async(need, admission.wait_s) as held:
                case = await run_in_threadpool(_read_case, path, filename, channels, mode)
                if not keep:
                    path.unlink()  # the decoded case is in memory; free the disk early
                # the batch may outlive the handler (client gone): the reservation lasts until it ends
                result = await _predict(batcher, case, filename, held.keep_until)
                return await run_in_threadpool(encode, result.value), result.batch_size
        except BudgetTimeout as err:
            raise _Reject(503, f"the server's memory budget is busy: {filename} {err}; retry shortly",
                          {"Retry-After": retry_after}) from None

    @app.post(SEGMENT_PATH)
    async def segment(request: Request) -> Response:
        if not authorised(request):
            return unauthorised()
        folder = Path(tempfile.mkdtemp(prefix="resunet-upload-", dir=upload_dir))
        try:
            os.chmod(folder, 0o700)
            filename, path = await _receive_upload(request, folder, limit)
            suffix = _suffix(filename)
            body, batch_size = await segment_file(path, filename, lambda mask: _encode_mask(mask, folder, suffix))
            return Response(body, media_type=FORMATS[suffix], headers={
                "Content-Disposition": f'attachment; filename="{_mask_name(filename, suffix)}"',
                "X-Resunet-Batch-Size": str(batch_size),
            })
        except _Reject as r:
            return error(r.status, r.detail, r.headers)
        except ClientDisconnect:
            log.info("client disconnected during the upload; request dropped")
            return Response(status_code=499)  # nginx's "client closed request"; never reaches the client
        except Exception:
            log.exception("unexpected failure while segmenting an upload")
            return error(500, "internal error while segmenting the image; the server log has the details")
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    app.state.authorised, app.state.segment_file = authorised, segment_file
    app.state.check_upload = lambda path, filename: _reservation(admission, path, filename)
    for add_routes in routes:
        add_routes(app)
    return app


# --------------------------------------------------------------------------- running


def _bind(host: str, port: int) -> socket.socket:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        raise ConfigError(f"--host {host!r} cannot be resolved ({err}); use an IP such as 127.0.0.1") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as err:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port} ({err.strerror}); pick another --port") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def run_http_server(
    predictor: Any,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    log_level: str = "info",
    access_log: bool = True,
    ready: Callable[[str], None] | None = None,
    **app_options: Any,
) -> None:
    """Serve ``predictor`` until SIGINT/SIGTERM (see `create_app` for ``app_options``).

    ``port`` 0 picks a free port. Once listening, ``ready(url)`` is called (default: print
    ``resunet serve http: listening on URL`` to stderr). On the first signal the batch worker
    stops taking work -- requests still queued get 503 -- the batch being computed finishes and
    its callers get their answers, then the server exits.
    """
    import sys

    import uvicorn

    if log_level not in ("critical", "error", "warning", "info", "debug", "trace"):
        raise ConfigError(f"--log-level {log_level!r} is unknown; use critical, error, warning, info or debug")
    app = create_app(predictor, **app_options)
    if host not in ("127.0.0.1", "localhost", "::1") and not app_options.get("token"):
        log.warning("listening on %s without a token: anyone who can reach it can use the model; "
                    "set RESUNET_TOKEN", host)
    sock = _bind(host, port)
    bound_host, bound_port = sock.getsockname()[:2]
    shown_host = f"[{bound_host}]" if ":" in bound_host else bound_host
    url = f"http://{shown_host}:{bound_port}"
    batcher: DynamicBatcher = app.state.batcher

    class _Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            # in a signal handler: hand the (locking) stop to a thread, never block here
            threading.Thread(target=batcher.stop, kwargs={"wait": False}, daemon=True).start()
            super().handle_exit(sig, frame)
            # uvicorn re-raises the signal after its shutdown (death by SIGTERM); a completed
            # graceful shutdown is a normal exit for this command, status 0
            getattr(self, "_captured_signals", []).clear()

        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets)
            if not self.should_exit:
                (ready or (lambda u: print(f"resunet serve http: listening on {u}", file=sys.stderr, flush=True)))(url)

    config = uvicorn.Config(app, log_level=log_level, access_log=access_log, timeout_graceful_shutdown=60,
                            lifespan="on", server_header=False)
    try:
        _Server(config).run(sockets=[sock])
    finally:
        sock.close()
    print("resunet serve http: stopped", file=sys.stderr, flush=True)
