"""Segmentation networks (2-D and 3-D, logits out) and the registry that builds them by name."""

from resunet.nets.attention_unet import AttentionUNet
from resunet.nets.blocks import AdditiveAttentionGate, DoubleConv, ResidualBlock, SpatialAttention
from resunet.nets.complexity import count_macs, count_parameters
from resunet.nets.encoder_decoder import EncoderDecoder
from resunet.nets.hybrid import ResUNetTransformer
from resunet.nets.registry import MODELS, build_model, model_config, model_options
from resunet.nets.resunet import ResUNet
from resunet.nets.unet import UNet

__all__ = [
    "AdditiveAttentionGate",
    "AttentionUNet",
    "DoubleConv",
    "EncoderDecoder",
    "MODELS",
    "ResUNet",
    "ResUNetTransformer",
    "ResidualBlock",
    "SpatialAttention",
    "UNet",
    "build_model",
    "count_macs",
    "count_parameters",
    "model_config",
    "model_options",
]
