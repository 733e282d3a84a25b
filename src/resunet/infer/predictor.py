"""`Predictor`: one checkpoint in, label maps in the ORIGINAL geometry out.

The checkpoint carries everything: weights, model config, preprocessing config, label names and
how the model sees a case (``inference.mode`` 2-D slices / 3-D windows, 2.5-D ``context``, patch
size). Prediction = `preprocess_case` -> slice-wise or sliding-window logits -> (optional flip TTA)
-> back to the original grid (un-resample, un-crop) -> labels -> optional post-processing.

Backends (`resunet.infer.backends`): ``auto`` (default: the fastest backend on this machine whose
masks match fp32 eager, chosen on the first case and cached), ``eager``, ``channels_last``,
``bf16``/``fp16``, ``onnx`` (ONNX Runtime; `Predictor.from_file` also opens an exported ``.onnx``
file directly). Pre- and post-processing are the same code for every backend.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from resunet.data.missing import preprocess_missing
from resunet.data.preprocess import PreprocessedCase, preprocess_case, restore_original_geometry
from resunet.data.sampling import stack_context
from resunet.data.volume import Volume
from resunet.errors import ConfigError, ModelError, ResunetError
from resunet.hardware import amp_dtype as amp_dtype_for
from resunet.hardware import resolve_device
from resunet.infer.postprocess import fill_holes, keep_largest_component, logits_to_labels, remove_small_components
from resunet.infer.sliding_window import flip_tta, predict_slices, sliding_window_predict
from resunet.model import LoadedModel, ModelSpec, load_model
from resunet.model.onnx_file import OnnxNetwork


@torch.no_grad()
def predict_case_logits(
    model: torch.nn.Module,
    image: torch.Tensor,
    *,
    mode: str,
    context: int,
    divisor: int,
    patch_size: Sequence[int],
    batch_size: int,
    amp: bool = False,
    tta: bool = False,
    overlap: float = 0.5,
    max_batch_pixels: int | None = None,
) -> torch.Tensor:
    """Logits ``(K, *S)`` for one preprocessed case ``(C, *S)``.

    ``mode="2d"``: the 2-D model runs slice by slice along ``D`` (a 2-D case is one slice);
    ``mode="3d"``: sliding window of ``patch_size`` with ``overlap`` and Gaussian weighting.
    ``tta`` averages the predictions of every in-plane (2-D) or spatial (3-D) flip combination.
    ``max_batch_pixels`` caps the slices per forward pass at ``max_batch_pixels // (H * W)`` (at
    least 1), so a batch of 512x512 CT slices holds as many pixels as ``batch_size`` small ones.
    """
    amp_dtype = amp_dtype_for(image.device, amp)
    if mode == "2d":
        volume = image[:, None] if image.ndim == 3 else image
        net = model if not tta else (lambda x: flip_tta(model, x, (-2, -1)))
        batch = slice_batch_size(batch_size, volume.shape[-2:], divisor, max_batch_pixels)
        logits = predict_slices(volume, net, batch, context, divisor, amp_dtype=amp_dtype)
        return logits[:, 0] if image.ndim == 3 else logits
    net = model if not tta else (lambda x: flip_tta(model, x, (-3, -2, -1)))
    return sliding_window_predict(
        image[None], net, list(patch_size), overlap=overlap, batch_size=batch_size,
        divisor=divisor, amp_dtype=amp_dtype,
    )[0]


def slice_batch_size(batch_size: int, size: Sequence[int], divisor: int, max_batch_pixels: int | None) -> int:
    """Slices per forward pass: ``batch_size``, capped so a batch holds <= ``max_batch_pixels``."""
    if not max_batch_pixels:
        return batch_size
    pixels = int(np.prod([-(-int(s) // divisor) * divisor for s in size]))
    return max(1, min(batch_size, max_batch_pixels // pixels))


def probabilities_to_labels(probs: np.ndarray) -> np.ndarray:
    """``(K, *S)`` probabilities -> ``(*S)`` labels: ``p > 0.5`` for one channel, else the argmax."""
    return probs[0] > 0.5 if probs.shape[0] == 1 else probs.argmax(axis=0)


@dataclass
class PostprocessConfig:
    largest_component: bool = False
    fill_holes: bool = False
    min_size: int = 0


class Predictor:
    """Predict label maps with a trained model (see the module docstring).

    ``model``: a `resunet.model.LoadedModel` (`load_model`: a checkpoint or an exported ONNX
    file). ``backend``: see the module docstring (``torch`` is an alias of ``eager``; None: ``eager``
    for a checkpoint, ``onnx`` for an ONNX file, which runs with ``onnx`` or ``auto`` only); ``onnx`` with
    a checkpoint exports it first (cached by digest under `resunet.model.cache_root`). ``amp``:
    autocast (bf16 on the CPU, fp16 on CUDA) around the eager network; the ``bf16`` / ``fp16``
    backends already are that. ``max_batch_pixels``: see `predict_case_logits` (default: on CUDA
    ``batch_size`` slices of 256 x 256; on the CPU two, where larger batches measured slower per
    slice, see benchmarks/RESULTS.md).
    """

    def __init__(
        self,
        model: LoadedModel,
        device: str | torch.device = "cpu",
        batch_size: int = 8,
        tta: bool = False,
        amp: bool = False,
        postprocess: PostprocessConfig | None = None,
        backend: str | None = None,
        max_batch_pixels: int | None = None,
    ) -> None:
        from resunet.infer.backends import BACKENDS

        if backend is None:  # the natural backend: the file's own
            backend = "onnx" if model.is_onnx else "eager"
        backend = "eager" if backend == "torch" else backend
        if backend not in BACKENDS:
            raise ConfigError(f"backend {backend!r} is not available; choose one of {', '.join(BACKENDS)}")
        if batch_size < 1:
            raise ConfigError(f"batch size must be >= 1, got {batch_size}")
        self.device = resolve_device(device)
        self.spec: ModelSpec = model.spec
        self.model: Any = model.network
        self.source = model.source
        self.preprocess = self.spec.preprocess
        self.labels: dict[str, int] = dict(self.spec.labels)
        self.mode, self.context = self.spec.inference.mode, self.spec.inference.context
        self.patch_size = list(self.spec.inference.patch_size)
        if model.is_onnx and backend not in ("onnx", "auto"):
            raise ConfigError(f"{model.source} is an ONNX file: it runs with the onnx backend only")
        if model.is_onnx or backend == "onnx":
            if self.device.type != "cpu" or amp:
                raise ConfigError("the onnx backend runs fp32 on the CPU; drop --amp / use --device cpu "
                                  "(on a GPU use --backend tensorrt)")
            backend = "onnx"
        self.model.to(self.device).eval()
        self.backend = backend
        self.backend_choice: Any = None  # a BackendChoice once ``auto`` has calibrated
        self.net: Any = None if backend == "auto" else self._network(backend)
        self.batch_size, self.tta = batch_size, tta
        self.amp = amp and backend not in ("bf16", "fp16")  # those backends autocast already
        if max_batch_pixels is None:  # CPU convolutions are memory-bound: per-slice time grows with the batch
            max_batch_pixels = (batch_size if self.device.type == "cuda" else 2) * 256 * 256
        self.max_batch_pixels = max_batch_pixels
        self.postprocess = postprocess or PostprocessConfig()

    def _network(self, name: str) -> Any:
        from resunet.infer.backends import make_network

        if isinstance(self.model, OnnxNetwork):
            return self.model
        return make_network(name, self.model, self.spec, self.device)

    @classmethod
    def from_file(cls, path: str | Path, **kwargs: Any) -> "Predictor":
        """`Predictor` of `load_model(path)`: a checkpoint (``.pt``) or an exported ONNX file (``.onnx``)."""
        return cls(load_model(path), **kwargs)

    @property
    def num_input_channels(self) -> int:
        """Image channels (modalities) a case must have: model inputs / (2 * context + 1)."""
        return self.spec.num_input_channels

    def describe(self) -> dict[str, Any]:
        """JSON-able summary: model, labels, the input a case must be, backend."""
        return {
            "model": self.spec.model, "labels": self.labels, "backend": self.backend,
            "input": {"channels": self.num_input_channels, "spatial_dims": self.model.spatial_dims,
                      "mode": self.mode, "context": self.context, "divisor": self.model.divisor,
                      "channel_names": [self.spec.channel_name(c) for c in range(self.num_input_channels)],
                      "missing_modality_ok": self.spec.accepts_missing_modality},
            "preprocess": self.preprocess.model_dump(mode="json"),
        }

    def predict_probabilities(self, images: Sequence[Volume], missing: Sequence[int] = ()) -> np.ndarray:
        """Class probabilities ``(K, *S)`` on the original grid (K = 1 for binary: P(foreground));
        ``missing``: see `prepare`."""
        case = self.prepare(images, missing)
        return self.original_probabilities(self.case_logits(torch.from_numpy(case.image)), case)

    def predict_prepared_with_probabilities(self, case: PreprocessedCase, template: Volume) -> tuple[Volume, np.ndarray]:
        """`predict_prepared` plus the probabilities of every class ``(C, *S)`` on ``template``'s grid
        (C = the number of labels, background included: a binary model's P(fg) becomes (1 - p, p))."""
        logits = self.case_logits(torch.from_numpy(case.image))
        probs = self.original_probabilities(logits, case)
        if probs.shape[0] == 1:
            probs = np.concatenate([1.0 - probs, probs])
        return self.finish(logits, case, template), probs

    def predict(self, images: Sequence[Volume], missing: Sequence[int] = ()) -> Volume:
        """Label map (uint8) with the geometry and metadata of ``images[0]``; ``missing``: see `prepare`."""
        return self.predict_prepared(self.prepare(images, missing), images[0])

    def predict_prepared(self, case: PreprocessedCase, template: Volume) -> Volume:
        """`predict` after `prepare` (so reading + preprocessing can run ahead in another thread)."""
        return self.finish(self.case_logits(torch.from_numpy(case.image)), case, template)

    def predict_many(self, cases: Sequence[Sequence[Volume]]) -> list[Volume | ResunetError]:
        """Label maps for several cases at once; 2-D models share forward batches across cases.

        One entry per case: the mask (geometry of the case's first image), or the `ResunetError`
        that case raised (the other cases are unaffected).
        """
        results: list[Volume | ResunetError | None] = [None] * len(cases)
        prepared: dict[int, PreprocessedCase] = {}
        for i, images in enumerate(cases):
            try:
                prepared[i] = self.prepare(images)
            except ResunetError as err:
                results[i] = err
        logits: dict[int, torch.Tensor] = {}
        if self.mode == "2d" and len(prepared) > 1:
            groups: dict[tuple[int, ...], list[int]] = {}
            for i, case in prepared.items():
                groups.setdefault(case.image.shape[-2:], []).append(i)
            for members in groups.values():
                logits.update(zip(members, self._shared_slice_logits([prepared[i].image for i in members])))
        else:
            logits = {i: self.case_logits(torch.from_numpy(case.image)) for i, case in prepared.items()}
        for i, case in prepared.items():
            try:
                results[i] = self.finish(logits[i], case, cases[i][0])
            except ResunetError as err:
                results[i] = err
        return results  # type: ignore[return-value]

    def prepare(self, images: Sequence[Volume], missing: Sequence[int] = ()) -> PreprocessedCase:
        """Check the channel count and apply the training preprocessing.

        ``images``: the case's volumes, ``(*S)`` or ``(C, *S)`` each; their channels add up (an RGB
        picture read as ``(3, H, W)`` is 3 channels, the rule of `resunet.data.channels`).
        ``missing``: channel indices the case lacks (``images`` hold the others, in order); only for
        a model trained with modality dropout (`ModelSpec.accepts_missing_modality`), which sees
        them zero-filled after normalisation (`resunet.data.missing`).
        """
        count, needed = sum(v.num_channels for v in images), self.num_input_channels
        missing = sorted({int(c) for c in missing})
        if missing and not self.spec.accepts_missing_modality:
            names = ", ".join(self.spec.channel_name(c) for c in missing if 0 <= c < needed)
            raise ModelError(
                f"{self.source} needs all {needed} image channel(s) per case; it cannot predict without "
                f"{names or missing} (only a model trained with augment.modality_dropout > 0 can)"
            )
        if count + len(missing) != needed:
            raise ModelError(
                f"the model expects {needed} image channel(s) per case, got {count}"
                + (f" plus {len(missing)} missing" if missing else "")
            )
        if missing:
            return preprocess_missing(list(images), missing, needed, self.preprocess)
        return preprocess_case(list(images), None, self.preprocess)

    def case_logits(self, image: torch.Tensor) -> torch.Tensor:
        """Logits ``(K, *S)`` of one preprocessed image ``(C, *S)``."""
        image = image.to(self.device)
        self.resolve_backend(image)
        return predict_case_logits(
            self.net, image, mode=self.mode, context=self.context, divisor=self.model.divisor,
            patch_size=self.patch_size, batch_size=self.batch_size, amp=self.amp, tta=self.tta,
            max_batch_pixels=self.max_batch_pixels,
        )

    def finish(self, logits: torch.Tensor, case: PreprocessedCase, template: Volume) -> Volume:
        """Logits ``(K, *S)`` of a prepared case -> post-processed label map on ``template``'s grid."""
        props = case.properties
        if props["shape_after_resampling"] != props["shape_after_crop"]:
            # resample probabilities, not labels (smoother boundaries, as nnU-Net)
            labels = probabilities_to_labels(self.original_probabilities(logits, case))
        else:
            labels = restore_original_geometry(logits_to_labels(logits).cpu().numpy(), props, kind="label")
        return template.with_array(self._postprocess(labels.astype(np.uint8)))

    def original_probabilities(self, logits: torch.Tensor, case: PreprocessedCase) -> np.ndarray:
        """Class probabilities ``(K, *S)`` float32 of a prepared case on its original grid (K = 1
        for a binary model: P(foreground); 0 outside the crop box)."""
        probs = torch.sigmoid(logits) if logits.shape[0] == 1 else torch.softmax(logits, dim=0)
        return restore_original_geometry(probs.float().cpu().numpy(), case.properties, kind="probabilities")

    def _shared_slice_logits(self, images: list[np.ndarray]) -> list[torch.Tensor]:
        """2-D mode: the slices of several same-size cases through shared batches.

        Each case's 2.5-D inputs are stacked first (context never crosses cases), then all slices run
        as one context-0 volume; returns logits ``(K, *S)`` per case.
        """
        volumes = [torch.from_numpy(im[:, None] if im.ndim == 3 else im) for im in images]
        stacked = torch.cat([stack_context(v, range(v.shape[1]), self.context) for v in volumes])
        joint = stacked.transpose(0, 1).to(self.device)
        self.resolve_backend(joint, context=0)
        joint = predict_case_logits(
            self.net, joint, mode="2d", context=0,
            divisor=self.model.divisor, patch_size=self.patch_size, batch_size=self.batch_size,
            amp=self.amp, tta=self.tta, max_batch_pixels=self.max_batch_pixels,
        )
        out, z = [], 0
        for image, v in zip(images, volumes):
            part = joint[:, z:z + v.shape[1]]
            out.append(part[:, 0] if image.ndim == 3 else part)
            z += v.shape[1]
        return out

    def calibration_batch(self, image: torch.Tensor, context: int | None = None) -> torch.Tensor:
        """What one forward pass sees for ``image`` ``(C, *S)``: 2-D: the middle slices (one batch,
        with context, padded to the divisor); 3-D: the centre window of ``patch_size``."""
        from resunet.infer.sliding_window import pad_to_multiple

        div = self.model.divisor
        if self.mode == "2d":
            volume = image[:, None] if image.ndim == 3 else image
            depth = volume.shape[1]
            n = slice_batch_size(self.batch_size, volume.shape[-2:], div, self.max_batch_pixels)
            z0 = max(0, depth // 2 - n // 2)
            x = stack_context(volume, range(z0, min(depth, z0 + n)), self.context if context is None else context)
            return pad_to_multiple(x, div, spatial_ndim=2)[0]
        crop = tuple(slice(max(0, (s - p) // 2), max(0, (s - p) // 2) + p) for s, p in zip(image.shape[1:], self.patch_size))
        return pad_to_multiple(image[(slice(None), *crop)][None], div, spatial_ndim=3)[0]

    def resolve_backend(self, image: torch.Tensor, context: int | None = None) -> None:
        """With ``backend="auto"``: choose (or load the cached choice) on the calibration batch of
        the preprocessed ``image`` ``(C, *S)``; the first case does this implicitly. No-op otherwise."""
        if self.net is not None:
            return
        from resunet.infer.backends import choose_backend

        self.backend_choice, self.net = choose_backend(
            self.model, self.spec, self.calibration_batch(image, context).float(), self.device)
        self.backend = self.backend_choice.name

    def _postprocess(self, labels: np.ndarray) -> np.ndarray:
        classes = [v for v in self.labels.values() if v != 0]
        p = self.postprocess
        if p.min_size:
            labels = remove_small_components(labels, p.min_size)
        if p.largest_component:
            labels = keep_largest_component(labels, classes)
        if p.fill_holes:
            labels = fill_holes(labels, classes)
        return labels
