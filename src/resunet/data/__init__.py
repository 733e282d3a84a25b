"""Reading, preprocessing, sampling and augmenting medical images."""

from resunet.data.volume import Volume

__all__ = ["Volume"]
