"""Finetune levels: how much the quantization parameters are tuned before quantizing.

* level 0: nothing (calibrated ranges, round-to-nearest weights);
* level 1, static tuning of the quantization parameters: cross-layer equalization of
  Conv -> Relu -> Conv chains (``equalize``), then, block by block, empirical per-channel
  bias correction of every Conv/Gemm and a search of each activation range by the
  block's output error;
* level 2: level 1, plus block reconstruction of the 5 blocks adding the most noise:
  weights re-rounded by GPTQ against the float block on quantized inputs
  (``rounding``), then their ranges searched again;
* level 3: reconstruction of every block, two rounds each.

Each change is fitted on three quarters of the calibration batches and kept only if the
block's output error on the other quarter goes down. Everything runs in NumPy and ONNX
Runtime (no PyTorch). The result stays in the target's format: weights come back either
as floats the quantizer rounds as usual, or already on its int8 grid
(``frozen_weights``); activation ranges come back as ``range_overrides`` and never
widen a Relu/Clip output past its clip bounds.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping

import numpy as np
import onnx
from onnx import numpy_helper

from ..calibration.batches import BatchSource
from .blocks import MEMORY_BUDGET, PLANS, Tuner
from .graph import attr
from .schemes import TuneResult, WeightScheme
from .threads import single_blas_thread

__all__ = ["TuneResult", "WeightScheme", "finetune"]

ADDED_BIAS_SUFFIX = "_xslim_bias"


def finetune(
    model: onnx.ModelProto,
    batches: BatchSource,
    level: int,
    *,
    ranges: Mapping[str, tuple[float, float]],
    quantized_tensors: Collection[str],
    weight_schemes: Mapping[str, WeightScheme],
    progress: Callable[[dict], None] | None = None,
    memory_budget: int = MEMORY_BUDGET,
) -> TuneResult:
    """Tune ``model`` (simplified float, opset >= 13) for quantization at ``level`` (0-3).

    ``ranges`` are the calibrated activation ranges of ``quantized_tensors``;
    ``weight_schemes`` says how each quantized weight will be quantized. ``progress``
    receives each block record as it is logged (also logged at INFO on
    ``xslim_ort.tuning``). Tuning uses as many calibration batches as ``memory_budget``
    bytes of held activations allow (between 8 and 128), and logs when that is fewer
    than the source has.
    """
    if level not in (0, *PLANS):
        raise ValueError(f"finetune level must be 0-{max(PLANS)}, got {level}")
    if level == 0:
        return TuneResult(model=model)
    work, added = _with_biases(model, weight_schemes)
    with (
        single_blas_thread(),
        Tuner(work, batches, ranges, quantized_tensors, weight_schemes, progress, memory_budget) as tuner,
    ):
        tuner.tune(PLANS[level])
    return TuneResult(
        model=_drop_zero_biases(tuner.tuned_model(), added),
        range_overrides=tuner.range_overrides(),
        frozen_weights=set(tuner.frozen),
        log=tuner.log,
    )


def _with_biases(model: onnx.ModelProto, schemes: Mapping[str, WeightScheme]) -> tuple[onnx.ModelProto, set[str]]:
    """Give every quantized Conv/Gemm a bias, so bias correction has somewhere to go."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    inits = {t.name: t for t in out.graph.initializer}
    added: set[str] = set()
    for node in out.graph.node:
        if node.op_type not in ("Conv", "Gemm") or len(node.input) < 2 or node.input[1] not in schemes:
            continue
        if (len(node.input) > 2 and node.input[2]) or node.input[1] not in inits:
            continue
        w = numpy_helper.to_array(inits[node.input[1]])
        if node.op_type == "Gemm":
            if float(attr(node, "beta", 1.0)) == 0.0:
                continue
            n_out = w.shape[0] if attr(node, "transB", 0) else w.shape[1]
        else:
            n_out = w.shape[0]
        name = node.input[1] + ADDED_BIAS_SUFFIX
        out.graph.initializer.append(numpy_helper.from_array(np.zeros(n_out, w.dtype), name))
        if len(node.input) == 2:
            node.input.append(name)
        else:
            node.input[2] = name
        added.add(name)
    return out, added


def _drop_zero_biases(model: onnx.ModelProto, added: set[str]) -> onnx.ModelProto:
    """Remove the biases ``_with_biases`` added where tuning left them at zero."""
    zero = {t.name for t in model.graph.initializer if t.name in added and not numpy_helper.to_array(t).any()}
    if not zero:
        return model
    keep = [t for t in model.graph.initializer if t.name not in zero]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    for node in model.graph.node:
        if len(node.input) == 3 and node.input[2] in zero:
            del node.input[2]
    return model
