"""MONAI Label's REST interface on `resunet serve http --studies DIR`, for 3D Slicer, OHIF and
``monailabel.client.MONAILabelClient``.

The model appears as ONE MONAI Label model of type ``segmentation`` (`model_name`: the model
file's name, ``runs/liver/best.pt`` -> ``liver``). Endpoints (same token, upload limit, memory
budget, queue and batch worker as ``/v1/segment``: an image is segmented by the app's
``segment_file``; errors are JSON ``{"detail": reason}``):

``GET /info/``
    ``name``, ``description``, ``version``, ``labels`` (names, background left out), ``models``
    ``{name: {"type": "segmentation", "labels": {name: value}, "dimension": 2|3, ...}}``, and the
    datastore's counts. Trainers, strategies and scoring are empty: this server only infers.
``GET /datastore/?output=all|stats``
    ``all``: MONAI Label's datastore JSON (``objects: {id: {"image": {"ext", "info"}, "labels"}}``);
    ``stats`` (default): ``{"total", "completed", "label_tags"}``.
``PUT /datastore/?image=ID`` (also ``PUT /datastore/image``)
    Multipart form: ``file`` (the image: ``.nii.gz``, ``.nii``, ``.nrrd``, ``.mha`` or ``.png``),
    optional ``params`` (JSON string, ignored). The image's header is checked (readable, within
    ``--max-voxels`` and the memory budget), then the file is stored as ``DIR/ID<ext>``
    (atomically; an image of the same ID is replaced). Answers
    ``{"image": ID}``. ID defaults to the file name without its extension.
``GET /datastore/image?image=ID``  the stored image file.
``POST /infer/{model}?image=ID&output=image|json|all``
    Multipart form: ``params`` (JSON string) and optionally ``file`` (then ``image`` only names
    the result). ``params["result_extension"]`` (``.nii.gz``, ``.nii``, ``.nrrd``, ``.mha``,
    ``.png``; default: the image's own) and ``params["result_dtype"]`` (``uint8``, ``uint16``,
    ... see `resunet.infer.run.MASK_DTYPES`; default uint8) shape the label image, written by
    `resunet.infer.run.write_mask` in the image's geometry. ``output=image``: the label file;
    ``json``: the result parameters (``label_names``, ``latencies`` in seconds, ``batch_size``);
    ``all`` (also without ``output``, as MONAI Label does): ``multipart/form-data`` with the part
    ``params`` (that JSON) and the part ``image`` (the label file, with its file name).

A ``label`` form field (scribbles), sessions, training and active learning are not offered.
"""

from __future__ import annotations

import json
import re
import secrets
import shutil
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from resunet.data.io import atomic_write
from resunet.errors import ConfigError, InputError
from resunet.serve.http import FIELD_LIMIT, _receive_upload, _Reject, log

__all__ = ["FolderDatastore", "UnknownImage", "model_name", "monai_label_routes"]

#: image files the datastore holds and inference reads; also the label formats it writes
IMAGE_FORMATS = {".nii.gz": "application/gzip", ".nii": "application/octet-stream",
                 ".nrrd": "application/octet-stream", ".mha": "application/octet-stream", ".png": "image/png"}
_LABEL_TAG_DIR = "labels"  # MONAI Label's layout: DIR/labels/<tag>/<id><ext>
_BAD_ID = re.compile(r"[\x00-\x1f\x7f/\\]")


class UnknownImage(InputError):
    """An image ID that is not in the datastore."""


def _split(name: str) -> tuple[str, str] | None:
    """(stem, image format) of the file name ``name``; None when it is not an image of `IMAGE_FORMATS`."""
    lower = name.lower()
    suffix = next((s for s in IMAGE_FORMATS if lower.endswith(s)), None)
    return None if suffix is None else (name[: -len(suffix)], suffix)


def image_suffix(filename: str) -> str:
    """The image format of ``filename`` (a key of `IMAGE_FORMATS`); `_Reject` 400 otherwise."""
    parts = _split(filename.strip())
    if parts is None:
        raise _Reject(400, f"unsupported image {filename!r}: send a {', '.join(IMAGE_FORMATS)} file "
                           "(the file name's extension gives the format)")
    return parts[1]


class FolderDatastore:
    """A folder of images (``--studies DIR``): image ID = file name without extension.

    Only files directly in the folder count (hidden ones, such as half-written uploads, do not).
    Labels, where present, are MONAI Label's ``DIR/labels/<tag>/<ID><ext>`` (read-only here).
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise ConfigError(f"--studies {self.folder} is not a folder; create it (it holds the images "
                              "MONAI Label clients upload) or pass an existing one")
        self._lock = threading.Lock()

    def images(self) -> dict[str, Path]:
        """``{ID: path}`` of every image in the folder, sorted by ID."""
        found = {}
        for path in sorted(self.folder.iterdir()):
            parts = _split(path.name)
            if parts and parts[0] and not path.name.startswith(".") and path.is_file():
                found.setdefault(parts[0], path)
        return found

    def path(self, image_id: str) -> Path:
        """The file of ``image_id``; `UnknownImage` when there is none."""
        path = self.images().get(image_id)
        if path is None:
            raise UnknownImage(f"image {image_id!r} is not in the datastore; upload it first "
                               "(PUT /datastore/?image=ID) or send it as the form field 'file'")
        return path

    @staticmethod
    def check_id(image_id: str) -> str:
        """``image_id`` when it can name a file in the folder; `InputError` otherwise."""
        if not image_id or image_id.startswith(".") or len(image_id) > 200 or _BAD_ID.search(image_id):
            raise InputError(f"image ID {image_id!r} cannot name a file: use 1-200 characters without "
                             "'/', '\\' or control characters, not starting with '.'")
        return image_id

    def add(self, image_id: str, source: Path, suffix: str) -> str:
        """Copy ``source`` (format ``suffix``) in as ``image_id`` atomically, replacing an older image of that ID."""
        self.check_id(image_id)
        target = self.folder / f"{image_id}{suffix}"
        with self._lock:
            with atomic_write(target) as tmp:
                shutil.copyfile(source, tmp)
            for other in IMAGE_FORMATS:
                if other != suffix:
                    (self.folder / f"{image_id}{other}").unlink(missing_ok=True)
        return image_id

    def _labels(self, image_id: str) -> dict[str, dict[str, Any]]:
        labels = {}
        root = self.folder / _LABEL_TAG_DIR
        for tag in sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []:
            for suffix in IMAGE_FORMATS:
                if (tag / f"{image_id}{suffix}").is_file():
                    labels[tag.name] = {"ext": suffix, "info": {"name": f"{image_id}{suffix}"}}
                    break
        return labels

    def to_json(self) -> dict[str, Any]:
        """MONAI Label's ``GET /datastore/?output=all`` answer for this folder."""
        objects = {}
        for image_id, path in self.images().items():
            info = {"ts": int(path.stat().st_mtime), "name": path.name, "size": path.stat().st_size}
            objects[image_id] = {"image": {"ext": path.name[len(image_id):], "info": info},
                                 "labels": self._labels(image_id)}
        return {"name": self.folder.name, "description": "resunet --studies folder", "images_dir": ".",
                "labels_dir": _LABEL_TAG_DIR, "objects": objects}

    def status(self) -> dict[str, Any]:
        """``{"total": images, "completed": images with a label, "label_tags": {tag: count}}``."""
        objects = self.to_json()["objects"]
        tags: dict[str, int] = {}
        for obj in objects.values():
            for tag in obj["labels"]:
                tags[tag] = tags.get(tag, 0) + 1
        return {"total": len(objects), "completed": sum(1 for o in objects.values() if o["labels"]),
                "label_tags": tags}


def model_name(predictor: Any) -> str:
    """The MONAI Label model name: the model file's stem, or its run folder's name for
    ``best.pt`` / ``last.pt`` (``runs/liver/best.pt`` -> ``liver``); ``resunet`` without a file."""
    source = getattr(predictor, "source", None)
    if not source:
        return "resunet"
    path = Path(str(source))
    stem = path.name.split(".")[0]
    if stem in ("best", "last", "model") and path.parent.name:
        stem = path.parent.name
    return re.sub(r"[^A-Za-z0-9_.-]", "_", stem) or "resunet"


def _label_names(predictor: Any) -> dict[str, int]:
    return {name: int(value) for name, value in sorted(predictor.labels.items(), key=lambda kv: kv[1]) if value}


def _dimension(predictor: Any) -> int:
    """3 for a model of volumes (3-D windows, or CT / MR preprocessing), 2 for one of pictures."""
    modality = getattr(getattr(predictor, "preprocess", None), "modality", "none")
    return 3 if getattr(predictor, "mode", "2d") == "3d" or modality in ("ct", "mr") else 2


def _params(text: str | None) -> dict[str, Any]:
    try:
        params = json.loads(text) if text else {}
    except json.JSONDecodeError as err:
        raise _Reject(400, f"the form field 'params' is not JSON ({err}); send a JSON object such as "
                           '{"result_extension": ".nrrd"}') from None
    if not isinstance(params, dict):
        raise _Reject(400, "the form field 'params' must be a JSON object, e.g. {}")
    return params


async def _receive_form(request: Request, folder: Path, limit: int) -> tuple[str, Path | None, dict[str, str]]:
    """The form of an upload / infer request: (client file name, local file or None, text fields).

    ``multipart/form-data`` (what MONAI Label clients send) streams its field ``file`` into
    ``folder``; ``application/x-www-form-urlencoded`` and an empty body carry fields only."""
    from urllib.parse import parse_qsl

    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    empty = not ctype and request.headers.get("content-length", "0") == "0"
    if ctype == "application/x-www-form-urlencoded" or empty:
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > FIELD_LIMIT:
                raise _Reject(413, f"form over {FIELD_LIMIT // 1024} KiB; send the image as multipart field 'file'")
        return "", None, dict(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True))
    fields: dict[str, str] = {}
    filename, path = await _receive_upload(request, folder, limit, fields, image_suffix)
    return filename, path, fields


def _result_suffix(params: dict[str, Any], image_name: str) -> str:
    wanted = params.get("result_extension") or image_suffix(image_name)
    if wanted not in IMAGE_FORMATS:
        raise _Reject(400, f"result_extension {wanted!r} is not supported; use one of {', '.join(IMAGE_FORMATS)}")
    return str(wanted)


def _multipart(fields: list[tuple[str, str | None, str, bytes]]) -> tuple[bytes, str]:
    """A ``multipart/form-data`` body of ``(name, filename, content type, data)`` parts; (body, content type)."""
    boundary = secrets.token_hex(16)
    chunks = []
    for name, filename, ctype, data in fields:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        chunks.append(f"--{boundary}\r\nContent-Disposition: {disposition}\r\nContent-Type: {ctype}\r\n\r\n"
                      .encode() + data + b"\r\n")
    return b"".join(chunks) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def _safe_name(image_id: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in image_id).strip(".") or "image"


class _MonaiLabel:
    """The routes' shared state: the app's upload path (memory budget, decoding, batch worker: the
    one ``/v1/segment`` uses), token check, limits, and the datastore."""

    def __init__(self, app: FastAPI, datastore: FolderDatastore) -> None:
        state = app.state
        self.datastore, self.predictor, self.authorised = datastore, state.predictor, state.authorised
        self.segment_file, self.check_upload = state.segment_file, state.check_upload
        self.limit, self.upload_dir = state.upload_limit, state.upload_dir
        self.name = model_name(self.predictor)
        self.channels = int(self.predictor.num_input_channels)
        self.mode = str(getattr(self.predictor, "mode", "2d"))

    def info(self) -> dict[str, Any]:
        from resunet.version import __version__

        labels = _label_names(self.predictor)
        model = {"type": "segmentation", "labels": labels, "dimension": _dimension(self.predictor),
                 "description": f"resunet model {self.name} ({self.mode}, {self.channels} channel(s))",
                 "config": {}}  # clients show config entries as options and send them back: none here
        return {"name": "resunet", "description": "resunet serve http: MONAI Label-compatible inference",
                "version": __version__, "labels": list(labels), "models": {self.name: model}, "trainers": {},
                "strategies": {}, "scoring": {}, "train_stats": {}, "datastore": self.datastore.status()}

    async def guarded(self, request: Request, work: Callable[[Path], Awaitable[Response]],
                      scratch: bool = True) -> Response:
        """``await work(folder)`` behind the token, with a private temporary folder (``scratch``;
        removed afterwards whatever happens) and every error answered as JSON ``{"detail"}``."""
        if not self.authorised(request):
            return JSONResponse({"detail": "missing or wrong bearer token; send the header 'Authorization: "
                                 "Bearer TOKEN'"}, status_code=401, headers={"WWW-Authenticate": "Bearer"})
        folder = Path(tempfile.mkdtemp(prefix="resunet-monai-", dir=self.upload_dir)) if scratch else Path()
        try:
            if scratch:
                folder.chmod(0o700)
            return await work(folder)
        except _Reject as r:
            return JSONResponse({"detail": r.detail}, status_code=r.status, headers=r.headers)
        except UnknownImage as err:
            return JSONResponse({"detail": str(err)}, status_code=404)
        except (InputError, ConfigError) as err:
            return JSONResponse({"detail": str(err)}, status_code=400)
        except ClientDisconnect:
            log.info("client disconnected during a MONAI Label request; dropped")
            return Response(status_code=499)
        except Exception:
            log.exception("unexpected failure in a MONAI Label request")
            return JSONResponse({"detail": "internal error; the server log has the details"}, status_code=500)
        finally:
            if scratch:
                shutil.rmtree(folder, ignore_errors=True)

    async def upload(self, request: Request, folder: Path) -> Response:
        filename, path, fields = await _receive_form(request, folder, self.limit)
        if path is None:
            raise _Reject(400, "no file field 'file' in the form; send the image as the multipart field 'file'")
        _params(fields.get("params"))
        base = Path(filename.replace("\\", "/")).name
        image_id = request.query_params.get("image") or (_split(base) or (base, ""))[0]
        FolderDatastore.check_id(image_id)
        await run_in_threadpool(self.check_upload, path, base)  # its header: readable, within the limits
        await run_in_threadpool(self.datastore.add, image_id, path, image_suffix(filename))
        log.info("datastore: image %s stored (%s)", image_id, base)
        return JSONResponse({"image": image_id})

    async def infer(self, request: Request, folder: Path, model: str) -> Response:
        if model != self.name:
            raise _Reject(404, f"unknown model {model!r}; this server has {self.name!r} (GET /info/)")
        output = request.query_params.get("output") or "all"
        if output not in ("image", "json", "all"):
            raise _Reject(400, f"output={output!r} is not offered; use image, json or all (a DICOM SEG comes "
                               "from `resunet serve dicom` or `resunet predict --dicomweb ... --stow`)")
        image_id = request.query_params.get("image", "")
        start = time.perf_counter()
        filename, path, fields = await _receive_form(request, folder, self.limit)
        params = _params(fields.get("params"))
        if path is None:
            if not image_id:
                raise _Reject(400, "send ?image=ID of an image in the datastore, or the image as the form field 'file'")
            path = await run_in_threadpool(self.datastore.path, image_id)
            filename = path.name
        suffix = _result_suffix(params, filename)
        base = Path(filename.replace("\\", "/")).name
        name = f"{_safe_name(image_id or (_split(base) or (base, ''))[0])}_label{suffix}"
        dtype = params.get("result_dtype")
        body, batch_size = await self.segment_file(path, filename, lambda mask: self._encode(mask, folder / name, dtype),
                                                   keep=True)  # a datastore image stays
        answer = {"label_names": _label_names(self.predictor), "batch_size": batch_size,
                  "latencies": {"total": round(time.perf_counter() - start, 4)}}
        if output == "json":
            return JSONResponse(answer)
        if output == "image":
            return Response(body, media_type=IMAGE_FORMATS[suffix],
                            headers={"Content-Disposition": f'attachment; filename="{name}"'})
        content, ctype = _multipart([("params", None, "application/json", json.dumps(answer).encode()),
                                     ("image", name, IMAGE_FORMATS[suffix], body)])
        return Response(content, media_type=ctype)

    def _encode(self, mask: Any, target: Path, dtype: Any) -> bytes:
        from resunet.infer.run import write_mask

        written = write_mask(mask, target, labels=self.predictor.labels, dtype=None if dtype is None else str(dtype))
        return written.read_bytes()


def _add_routes(app: FastAPI, api: _MonaiLabel) -> None:
    def answer(work: Callable[[], Any]) -> Callable[[Path], Awaitable[Response]]:
        async def run(_: Path) -> Response:
            return JSONResponse(await run_in_threadpool(work))

        return run

    @app.get("/info/")
    async def info(request: Request) -> Response:
        return await api.guarded(request, answer(api.info), scratch=False)

    @app.get("/datastore/")
    async def datastore(request: Request, output: str = "stats") -> Response:
        if output not in ("all", "stats"):
            return JSONResponse({"detail": f"output={output!r} is not offered; use all or stats"}, status_code=400)
        work = api.datastore.to_json if output == "all" else api.datastore.status
        return await api.guarded(request, answer(work), scratch=False)

    @app.get("/datastore/image")
    async def download(request: Request, image: str) -> Response:
        async def send(_: Path) -> Response:
            path = await run_in_threadpool(api.datastore.path, image)
            return FileResponse(path, media_type=IMAGE_FORMATS[image_suffix(path.name)], filename=path.name)

        return await api.guarded(request, send, scratch=False)

    async def upload(request: Request) -> Response:
        return await api.guarded(request, lambda folder: api.upload(request, folder))

    app.put("/datastore/")(upload)
    app.put("/datastore/image")(upload)

    @app.post("/infer/{model}")
    async def infer(request: Request, model: str) -> Response:
        return await api.guarded(request, lambda folder: api.infer(request, folder, model))


def monai_label_routes(studies: str | Path) -> Callable[[FastAPI], None]:
    """What `resunet.serve.http.create_app` ``routes`` takes to serve MONAI Label's API with the
    image folder ``studies`` as the datastore (`ConfigError` now if it is not a folder)."""
    datastore = FolderDatastore(studies)

    def add(app: FastAPI) -> None:
        _add_routes(app, _MonaiLabel(app, datastore))

    return add
