"""resunet: residual U-Net with spatial attention for medical image segmentation."""

__version__ = "0.1.0"

from resunet.errors import ResunetError  # noqa: E402

__all__ = ["ResunetError", "__version__"]
