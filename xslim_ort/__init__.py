"""xslim-ort: post-training int8 quantization of ONNX models for SpacemiT chips.

``quantize_onnx_model`` is XSlim's entry point; ``quantize_static`` and
``quantize_dynamic`` take ONNX Runtime's signatures, so an ORT quantization script only
changes its import line. ORT's reader and enum types are re-exported for that reason.
"""

from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType

from ._version import __version__
from .api import quantize_dynamic, quantize_onnx_model, quantize_static
from .config import Config, load_config
from .errors import XSlimError

__all__ = [
    "CalibrationDataReader",
    "CalibrationMethod",
    "Config",
    "QuantFormat",
    "QuantType",
    "XSlimError",
    "__version__",
    "load_config",
    "quantize_dynamic",
    "quantize_onnx_model",
    "quantize_static",
]
