"""Op handlers, keyed by the handler kind a target descriptor names for each op type.

The descriptor says *what* an op is (``"Conv": "conv"``, ``"Reshape": "passthrough"``);
this registry says *how* a kind is quantized. ONNX Runtime's QDQ operator classes do the
marking for most kinds; ``FusableActivation`` adds the descriptor's fusion rules.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import onnx
from onnxruntime.quantization.operators.activation import QDQRemovableActivation
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


class FusableActivation(QDQRemovableActivation):
    """Relu/Clip: dropped into its producer's quantization point where the target fuses the pair."""

    def quantize(self) -> None:
        quantizer: TargetQuantizer = self.quantizer
        producer = quantizer.model.output_name_to_node().get(self.node.input[0])
        if (
            producer is not None
            and not quantizer.keep_activations
            and quantizer.target_fuses(producer.op_type, self.node.op_type)
        ):
            super().quantize()
            return
        if quantizer.is_tensor_quantized(self.node.input[0]):
            quantizer.quantize_activation_tensor(self.node.input[0])
            quantizer.quantize_activation_tensor(self.node.output[0])


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
