"""Data types shared by the tuning stages and the quantizer that calls them."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx

from ..qparams import fake_quant_weight, pow2_scale, symmetric_weight_scale


@dataclass(frozen=True)
class WeightScheme:
    """How the quantizer will quantize one weight: symmetric int8, per channel on ``axis``
    (None: per tensor), with the scale rounded up to a power of two if ``power_of_two``."""

    axis: int | None = None
    power_of_two: bool = False

    def scale(self, w: np.ndarray) -> np.ndarray:
        """The scale the quantizer derives from ``w`` (max|w| / 127, maybe rounded to 2^k)."""
        s = symmetric_weight_scale(w, self.axis)
        return pow2_scale(s) if self.power_of_two else s

    def fake_quant(self, w: np.ndarray) -> np.ndarray:
        """``w`` as the quantized model will see it (quantize then dequantize)."""
        return fake_quant_weight(w, self.axis, self.power_of_two)


@dataclass
class TuneResult:
    """What tuning hands back to the quantizer.

    ``model`` has the tuned float weights and biases (same topology and tensor names,
    except that a Conv/Gemm without bias may gain a float bias input named
    ``<weight>_xslim_bias``). ``range_overrides`` replaces calibrated activation ranges
    (never wider than a Relu/Clip producer's bounds). ``frozen_weights`` are already on
    the int8 grid: the quantizer re-derives exactly their scale. ``log`` holds one record
    per block step: name, index, total, step ('bias_correction', 'range_search' or
    'reconstruction'), loss_before, loss_after (block-output noise-to-signal power ratio
    on the held-out calibration batches), kept, seconds.
    """

    model: onnx.ModelProto
    range_overrides: dict[str, tuple[float, float]] = field(default_factory=dict)
    frozen_weights: set[str] = field(default_factory=set)
    log: list[dict] = field(default_factory=list)
