"""`Predictor`: one checkpoint in, label maps in the ORIGINAL geometry out.

The checkpoint carries everything: weights, model config, preprocessing config, label names and
how the model sees a case (``inference.mode`` 2-D slices / 3-D windows, 2.5-D ``context``, patch
size). Prediction = `preprocess_case` -> slice-wise or sliding-window logits -> (optional flip TTA)
-> back to the original grid (un-resample, un-crop) -> labels -> optional post-processing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from resunet.data.preprocess import PreprocessConfig, preprocess_case, restore_original_geometry
from resunet.data.volume import Volume
from resunet.errors import ModelError
from resunet.infer.postprocess import fill_holes, keep_largest_component, logits_to_labels, remove_small_components
from resunet.infer.sliding_window import flip_tta, predict_slices, sliding_window_predict
from resunet.nets import build_model


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
) -> torch.Tensor:
    """Logits ``(K, *S)`` for one preprocessed case ``(C, *S)``.

    ``mode="2d"``: the 2-D model runs slice by slice along ``D`` (a 2-D case is one slice);
    ``mode="3d"``: sliding window of ``patch_size`` with ``overlap`` and Gaussian weighting.
    ``tta`` averages the predictions of every in-plane (2-D) or spatial (3-D) flip combination.
    """
    amp_dtype = (torch.float16 if image.device.type == "cuda" else torch.bfloat16) if amp else None
    if mode == "2d":
        volume = image[:, None] if image.ndim == 3 else image
        net = model if not tta else (lambda x: flip_tta(model, x, (-2, -1)))
        logits = predict_slices(volume, net, batch_size, context, divisor, amp_dtype=amp_dtype)
        return logits[:, 0] if image.ndim == 3 else logits
    net = model if not tta else (lambda x: flip_tta(model, x, (-3, -2, -1)))
    return sliding_window_predict(
        image[None], net, list(patch_size), overlap=overlap, batch_size=batch_size,
        divisor=divisor, amp_dtype=amp_dtype,
    )[0]


@dataclass
class PostprocessConfig:
    largest_component: bool = False
    fill_holes: bool = False
    min_size: int = 0


class Predictor:
    """Predict label maps with a trained checkpoint (see the module docstring)."""

    def __init__(
        self,
        checkpoint: dict[str, Any],
        device: str | torch.device = "cpu",
        batch_size: int = 8,
        tta: bool = False,
        amp: bool = False,
        postprocess: PostprocessConfig | None = None,
        source: str = "checkpoint",
    ) -> None:
        try:
            cfg = dict(checkpoint["model"])
            self.model = build_model(cfg.pop("name"), **cfg)
            self.model.load_state_dict(checkpoint["state_dict"])
            self.preprocess = PreprocessConfig.model_validate(checkpoint["preprocess"])
            self.labels: dict[str, int] = dict(checkpoint["labels"])
            inference = checkpoint["inference"]
            self.mode, self.context = inference["mode"], int(inference["context"])
            self.patch_size = list(inference["patch_size"])
        except (KeyError, TypeError, ValueError, RuntimeError) as err:
            raise ModelError(f"{source} does not hold a complete resunet model ({type(err).__name__}: {err})") from None
        self.device = torch.device(device)
        self.model.to(self.device).eval()
        self.batch_size, self.tta, self.amp = batch_size, tta, amp
        self.postprocess = postprocess or PostprocessConfig()

    @classmethod
    def from_file(cls, path: str | Path, **kwargs: Any) -> "Predictor":
        from resunet.train.checkpoint import load_checkpoint

        return cls(load_checkpoint(Path(path)), source=str(path), **kwargs)

    @property
    def num_input_channels(self) -> int:
        """Image channels (modalities) a case must have: model inputs / (2 * context + 1)."""
        return self.model.in_channels // (2 * self.context + 1)

    def predict_probabilities(self, images: Sequence[Volume]) -> np.ndarray:
        """Class probabilities ``(K, *S)`` on the original grid (K = 1 for binary: P(foreground))."""
        logits, props = self._logits(images)
        probs = torch.sigmoid(logits) if logits.shape[0] == 1 else torch.softmax(logits, dim=0)
        return restore_original_geometry(probs.float().cpu().numpy(), props, kind="probabilities")

    def predict(self, images: Sequence[Volume]) -> Volume:
        """Label map (uint8) with the geometry and metadata of ``images[0]``."""
        logits, props = self._logits(images)
        resampled = props["shape_after_resampling"] != props["shape_after_crop"]
        if resampled:  # resample probabilities, not labels (smoother boundaries, as nnU-Net)
            probs = torch.sigmoid(logits) if logits.shape[0] == 1 else torch.softmax(logits, dim=0)
            probs = restore_original_geometry(probs.float().cpu().numpy(), props, kind="probabilities")
            labels = probs[0] > 0.5 if probs.shape[0] == 1 else probs.argmax(axis=0)
        else:
            labels = restore_original_geometry(logits_to_labels(logits).cpu().numpy(), props, kind="label")
        labels = self._postprocess(labels.astype(np.uint8))
        return images[0].with_array(labels)

    def _logits(self, images: Sequence[Volume]) -> tuple[torch.Tensor, dict[str, Any]]:
        if len(images) != self.num_input_channels:
            raise ModelError(
                f"the model expects {self.num_input_channels} image channel(s) per case, got {len(images)}"
            )
        case = preprocess_case(list(images), None, self.preprocess)
        image = torch.from_numpy(case.image).to(self.device)
        logits = predict_case_logits(
            self.model, image, mode=self.mode, context=self.context, divisor=self.model.divisor,
            patch_size=self.patch_size, batch_size=self.batch_size, amp=self.amp, tta=self.tta,
        )
        return logits, case.properties

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
