"""Quantization arithmetic shared by the quantizer, the tuning and the analysis.

Everything that simulates int8 in NumPy must agree bit for bit with the Q/DQ nodes the
quantizer writes, so the formulas live here once. They follow ONNX Runtime's
``compute_scale_zp``: the range is widened to include 0, activations use int8 [-128, 127]
asymmetric, symmetric weights use [-127, 127] with a zero point of 0.
"""

from __future__ import annotations

import math

import numpy as np

ACT_QMIN, ACT_QMAX = -128, 127
WEIGHT_QMIN, WEIGHT_QMAX = -127, 127


def activation_qparams(lo: float, hi: float) -> tuple[np.float32, np.int8]:
    """Scale and zero point of an asymmetric int8 activation covering [lo, hi]."""
    # As ORT does: float32 range, float64 scale for the zero point, float32 scale stored.
    lo = min(float(np.float32(lo)), 0.0)
    hi = max(float(np.float32(hi)), 0.0)
    scale64 = (hi - lo) / (ACT_QMAX - ACT_QMIN)
    scale = np.float32(scale64)
    if not np.isfinite(scale) or scale < np.finfo(np.float32).tiny:
        return np.float32(1.0), np.int8(0)
    zp = int(np.round(ACT_QMIN - lo / scale64))
    return scale, np.int8(min(max(zp, ACT_QMIN), ACT_QMAX))


def symmetric_weight_scale(w: np.ndarray, axis: int | None = None) -> np.ndarray:
    """Per-tensor (axis None) or per-channel symmetric int8 scale: max|w| / 127."""
    w = np.asarray(w, dtype=np.float32)
    if axis is None:
        absmax = np.abs(w).max(initial=0.0)
    else:
        red = tuple(i for i in range(w.ndim) if i != axis % w.ndim)
        absmax = np.abs(w).max(axis=red, initial=0.0)
    scale = np.asarray(absmax / WEIGHT_QMAX, dtype=np.float32)
    return np.where(scale < np.finfo(np.float32).tiny, np.float32(1.0), scale).astype(np.float32)


def pow2_scale(scale: np.ndarray) -> np.ndarray:
    """Round a scale up to the next power of two, so no weight is clipped."""
    scale = np.asarray(scale, dtype=np.float64)
    return np.exp2(np.ceil(np.log2(scale))).astype(np.float32)


def quantize(x: np.ndarray, scale, zero_point, qmin: int, qmax: int, axis: int | None = None) -> np.ndarray:
    """Round-half-to-even quantization, as ONNX QuantizeLinear does."""
    scale = np.asarray(scale, dtype=np.float32)
    zero_point = np.asarray(zero_point, dtype=np.int32)
    if axis is not None and scale.ndim == 1:
        shape = [1] * x.ndim
        shape[axis % x.ndim] = -1
        scale = scale.reshape(shape)
        zero_point = zero_point.reshape(shape)
    q = np.rint(np.asarray(x, dtype=np.float32) / scale) + zero_point
    return np.clip(q, qmin, qmax).astype(np.int32)


def dequantize(q: np.ndarray, scale, zero_point, axis: int | None = None) -> np.ndarray:
    scale = np.asarray(scale, dtype=np.float32)
    zero_point = np.asarray(zero_point, dtype=np.int32)
    if axis is not None and scale.ndim == 1:
        shape = [1] * q.ndim
        shape[axis % q.ndim] = -1
        scale = scale.reshape(shape)
        zero_point = zero_point.reshape(shape)
    return ((q.astype(np.int32) - zero_point) * scale).astype(np.float32)


def fake_quant_activation(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """What a QuantizeLinear/DequantizeLinear pair with range [lo, hi] does to ``x``."""
    scale, zp = activation_qparams(lo, hi)
    return dequantize(quantize(x, scale, zp, ACT_QMIN, ACT_QMAX), scale, zp)


def fake_quant_weight(w: np.ndarray, axis: int | None = None, power_of_two: bool = False) -> np.ndarray:
    """Symmetric int8 weight quantization (per channel on ``axis``, else per tensor)."""
    scale = symmetric_weight_scale(w, axis)
    if power_of_two:
        scale = pow2_scale(scale)
    return dequantize(quantize(w, scale, 0, WEIGHT_QMIN, WEIGHT_QMAX, axis), scale, 0, axis)


def sqnr_db(reference: np.ndarray, test: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio in dB (higher is better)."""
    ref = np.asarray(reference, dtype=np.float64)
    noise = float(np.sum((ref - np.asarray(test, dtype=np.float64)) ** 2))
    signal = float(np.sum(ref**2))
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0.0 or nb == 0.0:
        return 1.0 if na == nb else 0.0
    return float(np.dot(a, b) / (na * nb))
