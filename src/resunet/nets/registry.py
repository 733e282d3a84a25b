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
) -> EncoderDecoder:
    """Build a network by name (``"resunet"``, ``"unet"``, ``"attention_unet"``); returns logits."""
    cls = MODELS.get(str(name).lower())
    if cls is None:
        raise ModelError(f"unknown model {name!r}; valid names: {', '.join(MODELS)}")
    return cls(
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        out_channels=out_channels,
        base_channels=base_channels,
        depth=depth,
    )


def model_config(model: EncoderDecoder) -> dict[str, Any]:
    """The keyword arguments that rebuild ``model`` with `build_model` (stored in checkpoints)."""
    name = next(k for k, v in MODELS.items() if type(model) is v)
    return {
        "name": name,
        "spatial_dims": model.spatial_dims,
        "in_channels": model.in_channels,
        "out_channels": model.out_channels,
        "base_channels": model.base_channels,
        "depth": model.depth,
    }
