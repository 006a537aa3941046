"""xslim-ort: post-training int8 quantization of ONNX models for SpacemiT chips."""

from ._version import __version__

__all__ = ["__version__"]
