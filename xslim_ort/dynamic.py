"""Dynamic quantization (precision level 3) and FP16 conversion (precision level 4).

Both lean on ONNX Runtime: ``quantize_dynamic`` for MatMul (Gemm is rewritten to MatMul
first, so it benefits too) and ``onnxruntime.transformers.float16`` for FP16. Convolutions
only get weight-only int8 (DequantizeLinear in front of the float op): dynamic activation
quantization loses too much there.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .config import QuantizationParameters
from .qparams import WEIGHT_QMAX, WEIGHT_QMIN, quantize, symmetric_weight_scale

log = logging.getLogger("xslim_ort")

# Op types xslim keeps in float32 under FP16, on top of ORT's own block list.
FP16_KEEP_FLOAT = ("Resize", "Range", "TopK", "NonMaxSuppression", "RoiAlign", "CumSum")
FP16_MAX = 65504.0
_HIDDEN_GEMM = "XslimHiddenGemm"


def ignored_node_names(model: onnx.ModelProto, qp: QuantizationParameters) -> set[str]:
    types = set(qp.ignore_op_types)
    return set(qp.ignore_op_names) | {n.name for n in model.graph.node if n.op_type in types}


def gemm_to_matmul(model: onnx.ModelProto, skip: set[str]) -> None:
    """Rewrite Gemm(A, B, C) with a constant B as MatMul(A, B') (+ Add(C)), in place."""
    inits = {i.name: i for i in model.graph.initializer}
    new_nodes = []
    for node in model.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if (
            node.op_type != "Gemm"
            or node.name in skip
            or node.input[1] not in inits
            or attrs.get("transA", 0)
            or (len(node.input) > 2 and node.input[2] and node.input[2] not in inits)
        ):
            new_nodes.append(node)
            continue
        b = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
        if attrs.get("transB", 0):
            b = b.T
        b = b * np.float32(attrs.get("alpha", 1.0))
        b_name = f"{node.input[1]}_matmul"
        model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(b), b_name))
        has_bias = len(node.input) > 2 and node.input[2]
        mm_out = f"{node.output[0]}_matmul" if has_bias else node.output[0]
        new_nodes.append(helper.make_node("MatMul", [node.input[0], b_name], [mm_out], name=f"{node.name}_MatMul"))
        if has_bias:
            c = numpy_helper.to_array(inits[node.input[2]]).astype(np.float32) * np.float32(attrs.get("beta", 1.0))
            c_name = f"{node.input[2]}_add"
            model.graph.initializer.append(numpy_helper.from_array(c, c_name))
            new_nodes.append(helper.make_node("Add", [mm_out, c_name], [node.output[0]], name=f"{node.name}_Add"))
    del model.graph.node[:]
    model.graph.node.extend(new_nodes)


def _is_depthwise(node: onnx.NodeProto, weight: onnx.TensorProto) -> bool:
    group = next((a.i for a in node.attribute if a.name == "group"), 1)
    return group > 1 and len(weight.dims) > 1 and weight.dims[1] == 1


def weight_only_int8(model: onnx.ModelProto, skip: set[str]) -> None:
    """Conv/ConvTranspose weights to int8 per output channel, behind a DequantizeLinear.

    Depthwise convolutions keep float weights: with 9 or 25 weights per channel they are a
    percent of a model's size, yet rounding them costs the most (MobileNetV2 on the zoo's
    evaluation images: cosine 0.990 with them in int8, 0.998 without).
    """
    inits = {i.name: i for i in model.graph.initializer}
    done: dict[str, str] = {}
    dq_nodes = []
    for node in model.graph.node:
        if node.op_type not in ("Conv", "ConvTranspose") or node.name in skip or node.input[1] not in inits:
            continue
        if _is_depthwise(node, inits[node.input[1]]):
            continue
        name = node.input[1]
        if name not in done:
            w = numpy_helper.to_array(inits[name]).astype(np.float32)
            axis = 0 if node.op_type == "Conv" else 1
            scale = symmetric_weight_scale(w, axis)
            q = quantize(w, scale, 0, WEIGHT_QMIN, WEIGHT_QMAX, axis).astype(np.int8)
            model.graph.initializer.extend(
                [
                    numpy_helper.from_array(q, f"{name}_quantized"),
                    numpy_helper.from_array(scale, f"{name}_scale"),
                    numpy_helper.from_array(np.zeros_like(scale, dtype=np.int8), f"{name}_zero_point"),
                ]
            )
            dq_nodes.append(
                helper.make_node(
                    "DequantizeLinear",
                    [f"{name}_quantized", f"{name}_scale", f"{name}_zero_point"],
                    [f"{name}_dequantized"],
                    name=f"{name}_DequantizeLinear",
                    axis=axis,
                )
            )
            done[name] = f"{name}_dequantized"
        node.input[1] = done[name]
    if dq_nodes:
        still_used = {i for n in model.graph.node for i in n.input}
        keep = [i for i in model.graph.initializer if i.name not in done or i.name in still_used]
        del model.graph.initializer[:]
        model.graph.initializer.extend(keep)
        nodes = dq_nodes + list(model.graph.node)
        del model.graph.node[:]
        model.graph.node.extend(nodes)


@contextlib.contextmanager
def quiet_root_logger() -> Iterator[None]:
    """ORT's quantizer logs advice on the root logger; our weight-only DQ nodes trigger it needlessly."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def quantize_dynamic_model(model: onnx.ModelProto, qp: QuantizationParameters) -> onnx.ModelProto:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    skip = ignored_node_names(model, qp)
    gemm_to_matmul(model, skip)
    weight_only_int8(model, skip)
    # ORT rewrites every Gemm into MatMul + Add itself; an ignored Gemm must stay a Gemm.
    hidden = [n for n in model.graph.node if n.op_type == "Gemm"]
    for node in hidden:
        node.op_type = _HIDDEN_GEMM
    with tempfile.TemporaryDirectory(prefix="xslim_ort_dynq_") as tmp, quiet_root_logger():
        out = Path(tmp) / "dynq.onnx"
        quantize_dynamic(
            model,
            out,
            op_types_to_quantize=["MatMul", "Attention", "LSTM"],
            per_channel=True,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=sorted(skip),
            extra_options={"MatMulConstBOnly": True},
        )
        result = onnx.load(str(out))
    for node in result.graph.node:
        if node.op_type == _HIDDEN_GEMM:
            node.op_type = "Gemm"
    _restore_output_types(model, result)
    return result


def _restore_output_types(reference: onnx.ModelProto, model: onnx.ModelProto) -> None:
    """Keep the graph outputs' declared shapes (ORT's rewrite can drop them)."""
    ref = {o.name: o for o in reference.graph.output}
    for out in model.graph.output:
        if out.name in ref:
            out.CopyFrom(ref[out.name])


def convert_fp16(model: onnx.ModelProto, qp: QuantizationParameters) -> onnx.ModelProto:
    """Weights and compute in float16, graph inputs and outputs float32."""
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    block_nodes = ignored_node_names(model, qp) | _nodes_with_large_constants(model)
    op_block = sorted(set(DEFAULT_OP_BLOCK_LIST) | set(FP16_KEEP_FLOAT) | set(qp.ignore_op_types))
    return convert_float_to_float16(
        model,
        keep_io_types=True,
        op_block_list=op_block,
        node_block_list=sorted(block_nodes),
        disable_shape_infer=False,
    )


def _nodes_with_large_constants(model: onnx.ModelProto) -> set[str]:
    """Nodes whose constant inputs hold values FP16 cannot represent: they stay float32."""
    large = set()
    for init in model.graph.initializer:
        if init.data_type == onnx.TensorProto.FLOAT:
            arr = numpy_helper.to_array(init)
            if arr.size and np.abs(arr[np.isfinite(arr)]).max(initial=0.0) > FP16_MAX:
                large.add(init.name)
    nodes = {n.name for n in model.graph.node if large.intersection(n.input)}
    if nodes:
        log.info("%d node(s) keep float32: their constants exceed the FP16 range", len(nodes))
    return nodes
