"""`build_model(name, **config)`: one place that maps model names to classes."""

from __future__ import annotations

from typing import Any

from resunet.errors import ModelError
from resunet.nets.attention_unet import AttentionUNet
from resunet.nets.encoder_decoder import EncoderDecoder
from resunet.nets.hybrid import ResUNetTransformer
from resunet.nets.resunet import ResUNet
from resunet.nets.unet import UNet

MODELS: dict[str, type[EncoderDecoder]] = {
    "resunet": ResUNet,
    "unet": UNet,
    "attention_unet": AttentionUNet,
    "resunet_transformer": ResUNetTransformer,
}


def model_options(name: str) -> tuple[str, ...]:
    """The keyword arguments model ``name`` takes beyond the shared five (``()`` for most;
    ``resunet_transformer``: ``transformer_layers``, ``transformer_heads``, ``transformer_dim``)."""
    cls = MODELS.get(str(name).lower())
    if cls is None:
        raise ModelError(f"unknown model {name!r}; valid names: {', '.join(MODELS)}")
    return tuple(getattr(cls, "options", ()))


def build_model(
    name: str,
    *,
    spatial_dims: int = 2,
    in_channels: int = 1,
    out_channels: int = 1,
    base_channels: int = 64,
    depth: int = 5,
    **extra: Any,
) -> EncoderDecoder:
    """Build a network by name (a key of `MODELS`); returns logits.

    ``extra``: the model's own settings (`model_options`), e.g. ``transformer_layers=2`` for
    ``resunet_transformer``; a setting the model does not take is a `ModelError`.
    """
    options = model_options(name)
    unknown = sorted(set(extra) - set(options))
    if unknown:
        takes = f"it takes {', '.join(options)}" if options else "it takes none beyond the shared ones"
        raise ModelError(f"model {name!r} has no setting {', '.join(unknown)}; {takes}")
    return MODELS[str(name).lower()](
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        out_channels=out_channels,
        base_channels=base_channels,
        depth=depth,
        **extra,
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
        **{key: getattr(model, key) for key in model_options(name)},
    }
