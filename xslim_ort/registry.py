"""Op handlers, keyed by the handler kind a target descriptor names for each op type.

The descriptor says *what* an op is (``"Conv": "conv"``, ``"Reshape": "passthrough"``);
this registry says *how* a kind is quantized. ONNX Runtime's QDQ operator classes do the
marking for most kinds; ``FusableActivation`` applies the descriptor's fusion patterns.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import onnx
from onnxruntime.quantization.operators.conv import QDQConv
from onnxruntime.quantization.operators.direct_q8 import QDQDirect8BitOp
from onnxruntime.quantization.operators.gather import QDQGather
from onnxruntime.quantization.operators.gemm import QDQGemm
from onnxruntime.quantization.operators.matmul import QDQMatMul
from onnxruntime.quantization.operators.maxpool import QDQMaxPool
from onnxruntime.quantization.operators.norm import QDQNormalization
from onnxruntime.quantization.operators.pad import QDQPad
from onnxruntime.quantization.operators.qdq_base_operator import QDQOperatorBase
from onnxruntime.quantization.operators.resize import QDQResize
from onnxruntime.quantization.operators.split import QDQSplit

if TYPE_CHECKING:
    from .quantizer import TargetQuantizer


class FusableActivation(QDQOperatorBase):
    """Relu/Clip: one quantization point with its producer where the target fuses the pair.

    The point is the activation's output. The activation is dropped where the asymmetric
    range clamps as it does (Relu; a Clip whose bounds enclose 0) and no float op reads
    its output, else it stays between its producer and the point. A pair that only float
    ops read stays float as a whole.
    """

    def quantize(self) -> None:
        quantizer: TargetQuantizer = self.quantizer
        node = self.node
        if not quantizer.is_tensor_quantized(node.input[0]):
            return  # its producer stays float, and so does it
        fusion = quantizer.fusion_for(node)
        if fusion is not None and quantizer.read_only_by_float(node.output[0]):
            quantizer.float_nodes.add(node.name)
            return
        if fusion is not None and not quantizer.keep_activations:
            del quantizer.tensors_to_quantize[node.input[0]]
            droppable = fusion.drop_activation and range_clamps_like(quantizer, node)
            if droppable and not quantizer.read_by_float(node.output[0]):  # a float reader needs its true output
                quantizer.model.replace_output_of_all_nodes(node.input[0], node.output[0])
                quantizer.remove_node(node)
        quantizer.quantize_activation_tensor(node.output[0])


def range_clamps_like(quantizer: TargetQuantizer, node: onnx.NodeProto) -> bool:
    """Whether an asymmetric range (which always holds 0) clamps as this Relu or Clip does."""
    if quantizer.is_activation_symmetric:
        return False
    if node.op_type == "Relu":
        return True
    bounds = [-math.inf, math.inf]
    for i, name in enumerate(node.input[1:3]):
        if name:
            value = quantizer.model.get_constant_value(name)
            if value is None:
                return False
            bounds[i] = float(value)
    if not bounds[0] <= 0.0 <= bounds[1]:
        return False
    # The int8 range clamps at its own ends: only where those lie inside the Clip's bounds
    # does it clamp as the Clip would.
    ranges = quantizer.tensors_range
    if ranges is None or node.output[0] not in ranges:
        return True
    td = ranges[node.output[0]]
    lo, hi = (float(v) for v in td.range_value)
    return bounds[0] <= min(lo, 0.0) and max(hi, 0.0) <= bounds[1]


HANDLERS: dict[str, type[QDQOperatorBase]] = {
    "conv": QDQConv,
    "gemm": QDQGemm,
    "matmul": QDQMatMul,
    "removable_activation": FusableActivation,
    "passthrough": QDQDirect8BitOp,
    "maxpool": QDQMaxPool,
    "pad": QDQPad,
    "resize": QDQResize,
    "split": QDQSplit,
    "gather": QDQGather,
    "normalization": QDQNormalization,
    "generic": QDQOperatorBase,
}


def create_handler(quantizer: TargetQuantizer, node: onnx.NodeProto) -> QDQOperatorBase:
    """The handler the target names for this node's op type."""
    kind = quantizer.target.ops[node.op_type]
    return HANDLERS[kind](quantizer, node)
