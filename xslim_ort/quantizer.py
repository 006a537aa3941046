"""The QDQ quantizer, driven by a target descriptor.

``TargetQuantizer`` is ONNX Runtime's ``QDQQuantizer`` with three changes: ops are
dispatched through our registry (the descriptor names each op's handler), every weight's
scale is computed here from the descriptor's weight rule (per-channel axis, power-of-two)
and handed to ORT as an override, and activation ranges come from our calibrators.
"""

from __future__ import annotations

import functools
from collections.abc import Collection, Mapping

import numpy as np
import onnx
from onnx import numpy_helper
from onnxruntime.quantization import QuantType
from onnxruntime.quantization.calibrate import CalibrationMethod, TensorData, TensorsData
from onnxruntime.quantization.qdq_quantizer import QDQQuantizer, QDQQuantTensorType

from .qparams import activation_qparams, pow2_scale, symmetric_weight_scale
from .registry import create_handler
from .targets import Fusion, Target, WeightRule

_QTYPES = {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}
_BIASED_OPS = ("Conv", "ConvTranspose", "Gemm")
_INT32_MAX = float(np.iinfo(np.int32).max)
_BIAS_MARGIN = 1.01  # ORT's symmetric activation scale (range / 254) is a little coarser than range / 255


def weight_inputs(node: onnx.NodeProto, rule: WeightRule, initializers: Mapping[str, onnx.TensorProto]) -> list[str]:
    """Names of the constant weight inputs of ``node`` that ``rule`` applies to."""
    if rule.input is None:
        return [name for name in node.input[:2] if name in initializers]
    if len(node.input) > rule.input and node.input[rule.input] in initializers:
        return [node.input[rule.input]]
    return []


def weight_overrides(
    model: onnx.ModelProto,
    target: Target,
    excluded_nodes: Collection[str] = (),
    input_scales: Mapping[str, float] | None = None,
) -> dict[str, list[dict]]:
    """ORT TensorQuantOverrides fixing each weight's scale by the target's rule.

    With ``input_scales`` (int32 biases), a weight scale is raised where input scale x
    weight scale would be too fine a step for the bias to fit in int32: ORT would clip
    the bias (seen on near-dead channels of EfficientNet-Lite0).
    """
    inits = {i.name: i for i in model.graph.initializer}
    floors = bias_scale_floors(model, inits, input_scales) if input_scales else {}
    overrides: dict[str, list[dict]] = {}
    for name, (axis, power_of_two) in weight_rules(model, target, excluded_nodes).items():
        w = numpy_helper.to_array(inits[name])
        scale = symmetric_weight_scale(w, axis)
        if name in floors:
            floor = floors[name] if floors[name].shape == scale.shape else floors[name].max()
            scale = np.maximum(scale, floor).astype(np.float32)
        if power_of_two:
            scale = pow2_scale(scale)
        if axis is None:
            overrides[name] = [{"scale": np.float32(scale), "zero_point": np.int8(0)}]
        else:
            overrides[name] = [
                {"scale": np.float32(s), "zero_point": np.int8(0), **({"axis": axis} if i == 0 else {})}
                for i, s in enumerate(scale)
            ]
    return overrides


def bias_scale_floors(
    model: onnx.ModelProto, inits: Mapping[str, onnx.TensorProto], input_scales: Mapping[str, float]
) -> dict[str, np.ndarray]:
    """Per weight, the smallest scale (per output channel) that keeps its op's int32 bias in range."""
    floors: dict[str, np.ndarray] = {}
    for node in model.graph.node:
        if node.op_type not in _BIASED_OPS or len(node.input) < 3:
            continue
        x, w, b = node.input[:3]
        if x not in input_scales or w not in inits or b not in inits:
            continue
        bias = np.abs(numpy_helper.to_array(inits[b]).astype(np.float64))
        need = (bias * _BIAS_MARGIN / (input_scales[x] * _INT32_MAX)).astype(np.float32)
        floors[w] = np.maximum(floors[w], need) if w in floors and floors[w].shape == need.shape else need
    return floors


def weight_rules(
    model: onnx.ModelProto, target: Target, excluded_nodes: Collection[str] = ()
) -> dict[str, tuple[int | None, bool]]:
    """Each weight the quantizer will quantize: (per-channel axis or None, power-of-two scale)."""
    inits = {i.name: i for i in model.graph.initializer}
    rules: dict[str, tuple[int | None, bool]] = {}
    for node in model.graph.node:
        rule = target.weight_rule(node.op_type)
        if rule is None or node.name in excluded_nodes or node.op_type not in target.ops:
            continue
        for name in weight_inputs(node, rule, inits):
            if inits[name].data_type == onnx.TensorProto.FLOAT:
                ndim = len(inits[name].dims)
                rules.setdefault(
                    name, (rule.axis if rule.axis is not None and ndim > rule.axis else None, rule.power_of_two)
                )
    return rules


def clamp_ranges(
    model: onnx.ModelProto, target: Target, ranges: Mapping[str, tuple[float, float]]
) -> dict[str, tuple[float, float]]:
    """Apply the descriptor's range clamps (e.g. Sigmoid inputs to [-10, 10]).

    Only where every reader of the tensor is clamped (to the union of their bounds) and it is
    no graph output: in ``x * HardSigmoid(x)`` the Mul needs all of ``x``.
    """
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    outputs = {o.name for o in model.graph.output}
    out = dict(ranges)
    for name, nodes in readers.items():
        if name not in out or name in outputs:
            continue
        bounds = [_clamp_bounds(node, target) if node.input[0] == name else None for node in nodes]
        if all(b is not None for b in bounds):
            lo, hi = out[name]
            out[name] = (max(lo, min(b[0] for b in bounds)), min(hi, max(b[1] for b in bounds)))
    return out


def _clamp_bounds(node: onnx.NodeProto, target: Target) -> tuple[float, float] | None:
    rule = target.clamps.get(node.op_type)
    if rule is None:
        return None
    if rule["input"] != "linear_region":
        return rule["input"][0], rule["input"][1]
    # HardSigmoid: alpha*x + beta is linear on [-beta/alpha, (1-beta)/alpha] and flat outside
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    alpha, beta = attrs.get("alpha", 0.2), attrs.get("beta", 0.5)
    return -beta / alpha, (1.0 - beta) / alpha


class TargetQuantizer(QDQQuantizer):
    """QDQ quantizer whose every rule comes from a ``Target`` descriptor."""

    def __init__(
        self,
        model: onnx.ModelProto,
        target: Target,
        ranges: Mapping[str, tuple[float, float]] | None,
        *,
        nodes_to_exclude: Collection[str] = (),
        bias: str | None = None,
        keep_activations: bool = False,
    ) -> None:
        """``keep_activations`` keeps fused Relu/Clip nodes (numerically the same, since their
        input shares their output's range) so that every quantized tensor has a float twin."""
        self.keep_activations = keep_activations
        work = onnx.ModelProto()
        work.CopyFrom(model)  # ORT's quantizer edits the model it is given
        if not any(p.key == "onnx.infer" for p in work.metadata_props):
            # Shapes were inferred in preparation; this tag stops ORT re-inferring them via a temp file.
            work.metadata_props.add(key="onnx.infer", value="onnxruntime.quant")
        model = work
        self.target = target
        self._fusions = {f.pattern: f for f in target.fusions}
        bias = bias or target.bias
        tensors_range = None
        clamped: dict[str, tuple[float, float]] = {}
        if ranges is not None:
            clamped = clamp_ranges(model, target, ranges)
            for node in model.graph.node:
                kind = target.ops.get(node.op_type)
                if kind == "removable_activation" and node.output[0] in clamped:
                    # a Relu/Clip kept by keep_activations: its input shares its output's point
                    clamped.setdefault(node.input[0], clamped[node.output[0]])
                elif kind in ("passthrough", "maxpool") and node.input and node.input[0] in clamped:
                    # values pass through unchanged (or a subset of them): the input's range holds. Needed
                    # when the producer is kept float and this output must get a Q/DQ pair of its own.
                    clamped.setdefault(node.output[0], clamped[node.input[0]])
            tensors_range = TensorsData(
                CalibrationMethod.MinMax,
                {k: TensorData(lowest=np.float32(lo), highest=np.float32(hi)) for k, (lo, hi) in clamped.items()},
            )
        extra_options = {
            "ActivationSymmetric": target.activation_symmetric,
            "WeightSymmetric": True,
            "QuantizeBias": bias == "int32",
            "QDQDisableWeightAdjustForInt32Bias": True,
            "TensorQuantOverrides": weight_overrides(
                model, target, nodes_to_exclude, _input_scales(clamped, target) if bias == "int32" else None
            ),
        }
        act_type = _QTYPES[target.activation_dtype]
        super().__init__(
            model,
            False,  # per-channel comes from the weight overrides, per weight rule
            False,
            QuantType.QInt8,
            act_type,
            tensors_range,
            None,
            list(nodes_to_exclude),
            target.op_types,
            extra_options,
        )
        # Nodes computed in float: the excluded ones, and fused pairs whose output only they read.
        self.float_nodes: set[str] = set(nodes_to_exclude)

    def fusion_for(self, activation: onnx.NodeProto) -> Fusion | None:
        """The target's fusion of ``activation`` with its producer, when this graph allows it.

        The producer must be quantized and its output read by the activation alone, so that
        one quantization point can serve the pair.
        """
        producer = self.model.output_name_to_node().get(activation.input[0])
        if producer is None or not self.should_quantize_node(producer):
            return None
        fusion = self._fusions.get((producer.op_type, activation.op_type))
        src = activation.input[0]
        if fusion is None or self.model.is_graph_output(src) or len(self.model.input_name_to_nodes()[src]) != 1:
            return None
        return fusion

    def read_only_by_float(self, tensor: str, readers: Mapping[str, list[onnx.NodeProto]] | None = None) -> bool:
        """Whether only float nodes read ``tensor`` (and it is no graph output): it then stays float."""
        readers = self.model.input_name_to_nodes() if readers is None else readers
        nodes = readers.get(tensor, [])
        return bool(nodes) and not self.model.is_graph_output(tensor) and all(n.name in self.float_nodes for n in nodes)

    def read_by_float(self, tensor: str) -> bool:
        """Whether some float node (or a subgraph, which stays float) reads ``tensor``."""
        if tensor in self._subgraph_reads:
            return True
        return any(n.name in self.float_nodes for n in self.model.input_name_to_nodes().get(tensor, []))

    @functools.cached_property
    def _subgraph_reads(self) -> set[str]:
        """Outer-scope tensors that If/Loop/Scan bodies read."""
        reads: set[str] = set()

        def visit(graph: onnx.GraphProto) -> None:
            for node in graph.node:
                for attr in node.attribute:
                    for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
                        reads.update(i for n in sub.node for i in n.input)
                        visit(sub)

        visit(self.model.model.graph)
        return reads

    def mark_tensors(self) -> None:
        """Let each op's handler mark the tensors it wants quantized.

        A tensor that only float nodes read is then unmarked, even where its producer is
        quantized: an op is kept float for accuracy, and a quantized input would cost it
        that (and runtimes fuse DQ -> op -> Q into an int8 kernel anyway).
        """
        for node in self.model.nodes():
            if self.should_quantize_node(node):
                create_handler(self, node).quantize()
                for tensor_name in node.input:
                    self.tensor_to_its_receiving_nodes.setdefault(tensor_name, []).append(node)
            if node.op_type == "DequantizeLinear":
                for tensor_name in node.output:
                    self.tensor_to_producing_dq[tensor_name] = node
        readers = self.model.input_name_to_nodes()
        for name in [t for t in self.tensors_to_quantize if self.read_only_by_float(t, readers)]:
            del self.tensors_to_quantize[name]

    def quantize_model(self) -> onnx.ModelProto:
        self.mark_tensors()
        self.initializer_quant_params = self._calc_initializer_quant_params()
        self._adjust_weight_quant_params_for_bias_tensors()
        self._quantize_normal_tensors()
        self._quantize_sharing_param_tensors()
        if self.quantize_bias:
            self._quantize_bias_tensors()
        self.remove_nodes()
        self._feed_float_nodes_float()
        self._remove_dead_constants()
        if not self.add_qdq_pair_to_weight:
            self.model.clean_initializers()
        self.model.model.producer_name = "xslim-ort"
        from ._version import __version__

        self.model.model.producer_version = __version__
        return self.model.model

    def _feed_float_nodes_float(self) -> None:
        """Float nodes read the float tensor, not its dequantized copy made for an int8 reader.

        Otherwise an op kept float between int8 neighbours would read DQ and feed Q, which
        runtimes fuse into an int8 kernel: it would not be float at all.
        """
        producer = self.model.output_name_to_node()
        for node in self.model.nodes():
            if node.name not in self.float_nodes:
                continue
            for i, name in enumerate(node.input):
                dq = producer.get(name)
                q = producer.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
                if q is not None and q.op_type == "QuantizeLinear":
                    node.input[i] = q.input[0]

    def _remove_dead_constants(self) -> None:
        """Constant nodes left without a reader (the bounds of a dropped Clip)."""
        used = {i for n in self.model.nodes() for i in n.input} | {o.name for o in self.model.graph().output}
        dead = [n for n in self.model.nodes() if n.op_type == "Constant" and n.output[0] not in used]
        self.model.remove_nodes(dead)


def _input_scales(ranges: Mapping[str, tuple[float, float]], target: Target) -> dict[str, float]:
    """Activation scale per tensor, as the quantizer will compute it from the range."""
    if target.activation_symmetric:
        ranges = {t: (-max(abs(lo), abs(hi)), max(abs(lo), abs(hi))) for t, (lo, hi) in ranges.items()}
    return {t: float(activation_qparams(lo, hi)[0]) for t, (lo, hi) in ranges.items()}


def activations_to_calibrate(
    model: onnx.ModelProto, target: Target, nodes_to_exclude: Collection[str] = ()
) -> list[str]:
    """The activation tensors that will get their own Q/DQ pair, in graph order.

    Found by a dry run of the handlers on a copy, so calibration collects exactly what the
    quantizer will ask for (shared-scale outputs are not calibrated).
    """
    planner = TargetQuantizer(model, target, None, nodes_to_exclude=nodes_to_exclude)
    planner.mark_tensors()
    inits = {i.name for i in model.graph.initializer}
    return [
        name
        for name, info in planner.tensors_to_quantize.items()
        if info.tensor_type is QDQQuantTensorType.ACTIVATION and not info.is_shared and name not in inits
    ]
