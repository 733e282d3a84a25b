"""`build_model(name, **config)`: one place that maps model names to classes."""

from __future__ import annotations

from typing import Any

from resunet.errors import ModelError
from resunet.nets.attention_unet import AttentionUNet
from resunet.nets.encoder_decoder import EncoderDecoder
from resunet.nets.resunet import ResUNet
from resunet.nets.unet import UNet

MODELS: dict[str, type[EncoderDecoder]] = {
    "resunet": ResUNet,
    "unet": UNet,
    "attention_unet": AttentionUNet,
}


def build_model(
    name: str,
    *,
    spatial_dims: int = 2,
    in_channels: int = 1,
    out_channels: int = 1,
    base_channels: int = 64,
    depth: int = 5,
    modalities: int = 1,
    modality_fusion: str = "early",
) -> EncoderDecoder:
    """Build a network by name (``"resunet"``, ``"unet"``, ``"attention_unet"``); returns logits.

    ``modalities`` / ``modality_fusion``: how many modalities ``in_channels`` hold and how they
    meet (``"early"``: as channels; ``"late"``: one encoder branch each, `resunet.nets.fusion`).
    """
    cls = MODELS.get(str(name).lower())
    if cls is None:
        raise ModelError(f"unknown model {name!r}; valid names: {', '.join(MODELS)}")
    options = {}
    if issubclass(cls, EncoderDecoder):
        options = {"modalities": modalities, "modality_fusion": modality_fusion}
    elif modality_fusion != "early":
        late = ", ".join(k for k, v in MODELS.items() if issubclass(v, EncoderDecoder))
        raise ModelError(f"model {name!r} has no late modality fusion; use fusion early, or one of {late}")
    return cls(
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        out_channels=out_channels,
        base_channels=base_channels,
        depth=depth,
        **options,
    )


def model_config(model: EncoderDecoder) -> dict[str, Any]:
    """The keyword arguments that rebuild ``model`` with `build_model` (stored in checkpoints;
    one written before ``modalities`` / ``modality_fusion`` existed builds with their defaults)."""
    name = next(k for k, v in MODELS.items() if type(model) is v)
    config = {
        "name": name,
        "spatial_dims": model.spatial_dims,
        "in_channels": model.in_channels,
        "out_channels": model.out_channels,
        "base_channels": model.base_channels,
        "depth": model.depth,
    }
    if isinstance(model, EncoderDecoder):
        config.update(modalities=model.modalities, modality_fusion=model.modality_fusion)
    return config
