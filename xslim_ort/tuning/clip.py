"""Weight clipping for per-tensor matmul weights: trade a few clipped outliers for a finer grid.

A per-tensor scale is set by the weight's largest entry, and a power-of-two rule rounds
it up further, so most entries can use only a fraction of the int8 codes. Clipping the
weight to a smaller grid (half or a quarter of the scale for power-of-two rules) rounds
everything else finer. Whether that pays depends on which inputs meet the clipped
entries, so each choice is scored by the matmul's output error on calibration inputs:
``sum_k E[x_k^2] * sum_n (w_kn - q(w_kn))^2`` (the diagonal of the input Hessian). The
clip is written into the float weight itself, so the quantizer, the tuning simulation
and ``check`` all see the same grid without any side channel.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping

import numpy as np
import onnx
from onnx import numpy_helper

from ..qparams import WEIGHT_QMAX
from .schemes import WeightScheme
from .smooth import CAPTURE_BUDGET, MAX_ROWS, capture, reads_weight, weight_matrix

log = logging.getLogger("xslim_ort.tuning")

POW2_STEPS = (1.0, 0.5, 0.25)
LINEAR_STEPS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5)


def _weight_ops(model: onnx.ModelProto, schemes: Mapping[str, WeightScheme], excluded: Collection[str]):
    """Gemm/MatMul nodes with a per-tensor weight rule, reading a dynamic input A."""
    inits = {i.name: i for i in model.graph.initializer}
    for node in model.graph.node:
        if node.name in excluded or not node.input or node.input[0] in inits:
            continue
        if reads_weight(node, node.input[0], inits):
            scheme = schemes.get(node.input[1])
            if scheme is not None and scheme.axis is None:
                yield node, scheme


def clipped_error(w: np.ndarray, h: np.ndarray, scale: float) -> float:
    """Output error proxy of quantizing ``w`` (in, out) on a grid of step ``scale``, inputs' E[x^2] ``h``."""
    q = np.clip(np.rint(w / scale), -WEIGHT_QMAX, WEIGHT_QMAX) * scale
    return float(h @ np.sum((w - q) ** 2, axis=1))


def clip_weights(
    model: onnx.ModelProto,
    batches: list[Mapping[str, np.ndarray]],
    schemes: Mapping[str, WeightScheme],
    excluded: Collection[str] = (),
) -> tuple[onnx.ModelProto, int]:
    """A copy of ``model`` whose per-tensor matmul weights are clipped where that lowers the error."""
    ops = list(_weight_ops(model, schemes, excluded))
    readers: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    ops = [(n, s) for n, s in ops if readers[n.input[1]] == 1]  # a shared weight serves other inputs too
    if not ops or not batches:
        return model, 0
    inits = {i.name: i for i in model.graph.initializer}
    tensors = sorted({n.input[0] for n, _ in ops})
    channels = max(weight_matrix(n, np.broadcast_to(0.0, inits[n.input[1]].dims)).shape[0] for n, _ in ops)
    chunk = max(1, CAPTURE_BUDGET // (MAX_ROWS * 4 * channels))
    energy: dict[str, np.ndarray] = {}
    for start in range(0, len(tensors), chunk):
        captured = capture(model, tensors[start : start + chunk], batches)
        energy.update({t: np.mean(x.astype(np.float64) ** 2, axis=0) for t, x in captured.items()})
    out = onnx.ModelProto()
    out.CopyFrom(model)
    replaced: dict[str, onnx.TensorProto] = {}
    for node, scheme in ops:
        w = weight_matrix(node, numpy_helper.to_array(inits[node.input[1]]))
        h = energy.get(node.input[0])
        if h is None or h.shape[0] != w.shape[0]:
            continue
        base = float(scheme.scale(w))
        steps = POW2_STEPS if scheme.power_of_two else LINEAR_STEPS
        errors = [clipped_error(w, h, base * f) for f in steps]
        best = int(np.argmin(errors))
        if best == 0:
            continue
        limit = base * steps[best] * WEIGHT_QMAX
        clipped = np.clip(numpy_helper.to_array(inits[node.input[1]]), -limit, limit).astype(np.float32)
        replaced[node.input[1]] = numpy_helper.from_array(clipped, node.input[1])
        signal = max(float(h @ np.sum(w.astype(np.float64) ** 2, axis=1)), 1e-30)
        log.info(
            "clipping %s's weight to +-%.4g (was +-%.4g): output error %.1f -> %.1f dB below the signal",
            node.name,
            limit,
            float(np.abs(w).max()),
            10 * np.log10(signal / max(errors[0], 1e-30)),
            10 * np.log10(signal / max(errors[best], 1e-30)),
        )
    for init in out.graph.initializer:
        if init.name in replaced:
            init.CopyFrom(replaced[init.name])
    return out, len(replaced)
