"""Per-layer quantization error of a QDQ model against its float model, with measured fixes.

``analyze`` runs the float and quantized models on a few samples and reports, for every
quantized activation tensor, the error of the model up to it (cumulative, as xslim 2.1.2
does) and the error of its layer alone (isolated), which is what points at the layer at
fault; for the worst layers it measures what keeping them float or calibrating them by
percentile would give.
"""

from .core import analyze, measure_fixes
from .report import AnalysisReport, Fix, Histogram, LayerReport, OutputReport, Suggestion
from .stats import ErrorStats

__all__ = [
    "AnalysisReport",
    "ErrorStats",
    "Fix",
    "Histogram",
    "LayerReport",
    "OutputReport",
    "Suggestion",
    "analyze",
    "measure_fixes",
]
