"""Reading a (float, QDQ) model pair, and the models the analysis derives from it.

Everything here works on the pair alone, so it analyses any QDQ model, ours or another
tool's. A *quantization point* is an activation QuantizeLinear; tensors are matched to the
float model by name (the QuantizeLinear input, else the DequantizeLinear output, which is
how ONNX Runtime names a quantized graph output). A point's *region* is the part of the
QDQ graph that computes its tensor from the nearest quantized activations upstream (its
op, with the op's quantized weights, plus any float ops between); the region is the layer
that is "at fault" for the point's own error. Derived models:

- *quantize only* puts one layer, quantized, into the float model: the layer's error
  alone (isolated), at its own tensor and at the model outputs;
- *keep float* swaps a region and its Q/DQ pair for the float model's ops, as a
  ``precision_level: 2`` custom setting would;
- *percentile* rewrites a point's scale and zero point.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..qparams import activation_qparams

KEEP_FLOAT_PREFIX = "xslim_keep_float/"
QUANT_ONLY_PREFIX = "xslim_quant_only/"

_INT8_SHIFT = {onnx.TensorProto.INT8: 0, onnx.TensorProto.UINT8: 128}


@dataclass(frozen=True)
class QuantPoint:
    """One quantized activation tensor of the QDQ model."""

    index: int  # position in graph order among the points
    tensor: str  # QuantizeLinear input in the QDQ model
    float_name: str | None  # the same tensor in the float model; None when it has none
    q_node: onnx.NodeProto  # the first QuantizeLinear of the tensor: its parameters are reported
    q_indices: tuple[int, ...]  # every QuantizeLinear of the tensor, as QDQ node indices
    dq_outputs: tuple[str, ...]  # outputs of the DequantizeLinear nodes fed by those
    scale: np.ndarray
    zero_point: np.ndarray
    axis: int | None  # None for a per-tensor scale
    op_type: str  # the op that computes ``tensor`` ("Input" for a graph input)
    op_name: str

    @property
    def name(self) -> str:
        """How the report names the tensor: its float-model name where there is one."""
        return self.float_name or self.tensor

    @property
    def q_output(self) -> str:
        return self.q_node.output[0]

    @property
    def qrange(self) -> tuple[int, int]:
        info = np.iinfo(self.zero_point.dtype)
        return int(info.min), int(info.max)

    @property
    def clip_range(self) -> tuple[float, float]:
        """The float range the quantized grid can represent (per-tensor points)."""
        qmin, qmax = self.qrange
        scale = float(self.scale.ravel()[0])
        zp = int(self.zero_point.ravel()[0])
        return (qmin - zp) * scale, (qmax - zp) * scale


@dataclass(frozen=True)
class Region:
    """The QDQ nodes between a point and the quantized activations feeding it."""

    nodes: tuple[int, ...]  # indices into the QDQ graph's node list, in graph order
    boundaries: tuple[tuple[str, str], ...]  # (QDQ tensor used by the region, float-model name)


class QDQGraph:
    """Index of a QDQ model: producers, constants, quantization points and their regions."""

    def __init__(
        self,
        quant: onnx.ModelProto,
        float_model: onnx.ModelProto,
        value: Callable[[onnx.TensorProto], np.ndarray] = numpy_helper.to_array,
    ) -> None:
        self.model = quant
        self._value = value
        graph = quant.graph
        self.nodes = list(graph.node)
        self.initializers = {t.name: t for t in graph.initializer}
        self.inputs = [i.name for i in graph.input if i.name not in self.initializers]
        self.outputs = [o.name for o in graph.output]
        self.producer = {out: i for i, node in enumerate(self.nodes) for out in node.output if out}
        self.float_graph = FloatGraph(float_model)
        self.points = self._find_points()
        self._dq_to_point = {dq: p for p in self.points for dq in p.dq_outputs}

    def _is_constant(self, name: str) -> bool:
        idx = self.producer.get(name)
        return name in self.initializers or (idx is not None and self.nodes[idx].op_type == "Constant")

    def _constant(self, name: str) -> np.ndarray | None:
        if name in self.initializers:
            return self._value(self.initializers[name])
        idx = self.producer.get(name)
        if idx is not None and self.nodes[idx].op_type == "Constant":
            for attr in self.nodes[idx].attribute:
                if attr.name == "value":
                    return numpy_helper.to_array(attr.t)
        return None

    def _find_points(self) -> list[QuantPoint]:
        consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in self.nodes:
            for name in node.input:
                consumers.setdefault(name, []).append(node)
        by_tensor: dict[str, list[int]] = {}
        for i in topological_order(self.nodes):
            node = self.nodes[i]
            if node.op_type != "QuantizeLinear" or node.domain not in ("", "ai.onnx"):
                continue
            if self._is_constant(node.input[0]) or not self._is_constant(node.input[1]):
                continue  # a weight, or a scale computed at run time: not a static activation point
            by_tensor.setdefault(node.input[0], []).append(i)
        points: list[QuantPoint] = []
        for tensor, q_indices in by_tensor.items():
            node = self.nodes[q_indices[0]]
            scale = self._constant(node.input[1])
            zp = self._constant(node.input[2]) if len(node.input) > 2 and node.input[2] else None
            zp = np.zeros(scale.shape, dtype=np.uint8) if zp is None else zp
            dq_outputs = tuple(
                c.output[0]
                for i in q_indices
                for c in consumers.get(self.nodes[i].output[0], [])
                if c.op_type == "DequantizeLinear"
            )
            axis = None
            if scale.size > 1:
                axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
            producer = self.producer.get(tensor)
            if producer is None:
                op_type, op_name = "Input", tensor
            else:
                op_type, op_name = self.nodes[producer].op_type, self.nodes[producer].name
            points.append(
                QuantPoint(
                    index=len(points),
                    tensor=tensor,
                    float_name=self.float_graph.match(tensor, dq_outputs),
                    q_node=node,
                    q_indices=tuple(q_indices),
                    dq_outputs=dq_outputs,
                    scale=scale,
                    zero_point=zp,
                    axis=axis,
                    op_type=op_type,
                    op_name=op_name,
                )
            )
        return points

    def region(self, point: QuantPoint) -> Region:
        """Walk up from the point, stopping at quantized activations and graph inputs.

        Raises ``KeyError`` naming a tensor that has no producer (an outer-scope name).
        """
        nodes: set[int] = set()
        boundaries: dict[str, str] = {}
        stack = list(point.q_node.input)  # the scale may come from a Constant node
        visited: set[str] = set()
        while stack:
            name = stack.pop()
            if not name or name in visited:
                continue
            visited.add(name)
            upstream = self._dq_to_point.get(name)
            if upstream is not None:
                if upstream.float_name is None:
                    raise KeyError(upstream.tensor)
                boundaries[name] = upstream.float_name
                continue
            if name in self.inputs:
                boundaries[name] = name
                continue
            if name in self.initializers:
                continue
            idx = self.producer.get(name)
            if idx is None:
                raise KeyError(name)
            nodes.add(idx)
            stack.extend(self.nodes[idx].input)
        return Region(nodes=tuple(sorted(nodes)), boundaries=tuple(sorted(boundaries.items())))

    def keep_float(self, point: QuantPoint, region: Region) -> onnx.ModelProto | None:
        """The QDQ model with ``point``'s layer computed by the float model's ops.

        The layer's output Q/DQ pair goes, and the float model's nodes from the region's
        boundaries to the point's tensor replace the quantized ones (so weights are float
        and ops the quantizer folded away, such as a Relu6, come back). None when the float
        model has no such subgraph.
        """
        if point.float_name is None:
            return None
        boundary_to_qdq = {f: q for q, f in region.boundaries}
        float_nodes = self.float_graph.subgraph(point.float_name, set(boundary_to_qdq))
        if float_nodes is None:
            return None
        graph_outputs = set(self.outputs)
        out_name = next((d for d in point.dq_outputs if d in graph_outputs), KEEP_FLOAT_PREFIX + point.name)
        fg = self.float_graph

        def rename(name: str) -> str:
            if not name:
                return name
            if name == point.float_name:
                return out_name
            if name in boundary_to_qdq:
                return boundary_to_qdq[name]
            if name in fg.inputs:
                return name
            return KEEP_FLOAT_PREFIX + name

        new_nodes = []
        if not float_nodes:  # the point is a graph input: only its Q/DQ pair goes
            new_nodes.append(helper.make_node("Identity", [point.tensor], [out_name], KEEP_FLOAT_PREFIX + "input"))
        for node in float_nodes:
            copy = onnx.NodeProto()
            copy.CopyFrom(node)
            copy.name = KEEP_FLOAT_PREFIX + node.name
            copy.input[:] = [rename(n) for n in node.input]
            copy.output[:] = [rename(n) for n in node.output]
            new_nodes.append(copy)
        new_inits = []
        for name in sorted({n for node in float_nodes for n in node.input if n in fg.initializers}):
            init = onnx.TensorProto()
            init.CopyFrom(fg.initializers[name])
            init.name = rename(name)
            new_inits.append(init)

        dropped = set(point.dq_outputs)
        nodes: list[onnx.NodeProto] = []
        for i, node in enumerate(self.nodes):
            if i == point.q_indices[0]:
                nodes.extend(new_nodes)
                continue
            if node.op_type == "DequantizeLinear" and node.output[0] in dropped:
                continue
            copy = onnx.NodeProto()
            copy.CopyFrom(node)
            copy.input[:] = [out_name if n in dropped else n for n in node.input]
            nodes.append(copy)
        model = onnx.ModelProto()
        model.CopyFrom(self.model)
        del model.graph.node[:]
        model.graph.node.extend(nodes)
        model.graph.initializer.extend(new_inits)
        _prune(model)
        _add_opsets(model, fg.model)
        return model

    def quantize_only(self, point: QuantPoint, region: Region) -> tuple[onnx.ModelProto, str] | None:
        """The float model with only ``point``'s layer quantized, as the QDQ model has it.

        The layer (its quantized region, fed with the float values of its inputs, and its
        QuantizeLinear/DequantizeLinear pair) replaces the float nodes that computed the
        tensor. Extra graph outputs: the point's QuantizeLinear output and the tensor's
        float value, whose name is returned with the model (a graph input keeps its name).
        None when the point has no float counterpart.
        """
        if point.float_name is None:
            return None
        fg = self.float_graph
        prefix = QUANT_ONLY_PREFIX

        def rename(name: str) -> str:
            if not name or name in self.inputs:
                return name
            return prefix + name

        boundary = dict(region.boundaries)
        nodes = []
        for i in region.nodes:
            copy = onnx.NodeProto()
            copy.CopyFrom(self.nodes[i])
            copy.name = prefix + copy.name
            copy.input[:] = [boundary.get(n) or rename(n) for n in copy.input]
            copy.output[:] = [rename(n) for n in copy.output]
            nodes.append(copy)
        is_input = point.float_name in fg.inputs
        dq_out = prefix + point.float_name if is_input else point.float_name
        float_out = point.float_name if is_input else prefix + "float/" + point.float_name
        q = onnx.NodeProto()
        q.CopyFrom(point.q_node)
        q.name = prefix + "q/" + point.name
        q.input[:] = [rename(n) for n in q.input]
        dq = helper.make_node("DequantizeLinear", [point.q_output, *q.input[1:]], [dq_out], prefix + "dq/" + point.name)
        dq.attribute.extend(a for a in q.attribute if a.name == "axis")
        nodes += [q, dq]
        inits = []
        for name in sorted({n for node in nodes for n in node.input}):
            original = name[len(prefix) :]
            if name.startswith(prefix) and original in self.initializers:
                init = onnx.TensorProto()
                init.CopyFrom(self.initializers[original])
                init.name = name
                inits.append(init)

        model = onnx.ModelProto()
        model.CopyFrom(fg.model)
        graph = model.graph
        old = list(graph.node)
        producer = fg.producer.get(point.float_name)
        at = 0 if producer is None else producer + 1
        for node in old:
            if is_input:  # the float model's consumers now read the quantized input
                node.input[:] = [dq_out if n == point.float_name else n for n in node.input]
            elif point.float_name in node.output:  # the float producer stays, for reference
                node.output[:] = [float_out if n == point.float_name else n for n in node.output]
        del graph.node[:]
        graph.node.extend([*old[:at], *nodes, *old[at:]])
        graph.initializer.extend(inits)
        graph.output.append(onnx.ValueInfoProto(name=point.q_output))
        if not is_input:
            graph.output.append(onnx.ValueInfoProto(name=float_out))
        _prune(model)
        _add_opsets(model, self.model)
        return model, float_out

    def with_percentile(self, point: QuantPoint, lo: float, hi: float) -> onnx.ModelProto | None:
        """The QDQ model with ``point``'s scale and zero point covering [lo, hi].

        Initializers shared with other points (as for a Flatten that reuses its input's
        scale) change with it, as they would if the quantizer calibrated it that way.
        None for points whose parameters are not per-tensor int8/uint8 initializers.
        """
        zp_name = point.q_node.input[2] if len(point.q_node.input) > 2 else ""
        scale_name = point.q_node.input[1]
        if point.axis is not None or scale_name not in self.initializers or zp_name not in self.initializers:
            return None
        zp_type = self.initializers[zp_name].data_type
        if zp_type not in _INT8_SHIFT:
            return None
        scale, zp = activation_qparams(lo, hi)
        model = onnx.ModelProto()
        model.CopyFrom(self.model)
        for init in model.graph.initializer:
            if init.name == scale_name:
                dtype = helper.tensor_dtype_to_np_dtype(init.data_type)
                init.CopyFrom(numpy_helper.from_array(np.full(point.scale.shape, scale, dtype), scale_name))
            elif init.name == zp_name:
                dtype = helper.tensor_dtype_to_np_dtype(zp_type)
                value = np.full(point.zero_point.shape, int(zp) + _INT8_SHIFT[zp_type], dtype)
                init.CopyFrom(numpy_helper.from_array(value, zp_name))
        return model


class FloatGraph:
    """Producer index of the float model, for name matching and subgraph extraction."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        graph = model.graph
        self.nodes = list(graph.node)
        self.initializers = {t.name: t for t in graph.initializer}
        self.inputs = {i.name for i in graph.input if i.name not in self.initializers}
        self.producer = {out: i for i, node in enumerate(self.nodes) for out in node.output if out}

    def has(self, name: str) -> bool:
        return name in self.producer or name in self.inputs

    def match(self, tensor: str, dq_outputs: Iterable[str]) -> str | None:
        if self.has(tensor):
            return tensor
        return next((d for d in dq_outputs if self.has(d)), None)

    def subgraph(self, output: str, boundaries: set[str]) -> list[onnx.NodeProto] | None:
        """Float nodes computing ``output`` from ``boundaries``, graph inputs and constants."""
        keep: set[int] = set()
        stack = [output]
        visited: set[str] = set()
        while stack:
            name = stack.pop()
            if not name or name in visited:
                continue
            visited.add(name)
            if name in boundaries or name in self.inputs or name in self.initializers:
                continue
            idx = self.producer.get(name)
            if idx is None:
                return None
            keep.add(idx)
            stack.extend(self.nodes[idx].input)
        return [self.nodes[i] for i in sorted(keep)]


def with_outputs(model: onnx.ModelProto, names: Iterable[str]) -> onnx.ModelProto:
    """A copy of ``model`` whose graph outputs are its own plus ``names``."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    present = {o.name for o in out.graph.output}
    for name in names:
        if name not in present:
            out.graph.output.append(onnx.ValueInfoProto(name=name))
            present.add(name)
    return out


def _prune(model: onnx.ModelProto) -> None:
    """Drop what no graph output depends on, and put the nodes in topological order."""
    graph = model.graph
    nodes = list(graph.node)
    producer = {out: i for i, node in enumerate(nodes) for out in node.output if out}
    keep: set[int] = set()
    stack = [producer[o.name] for o in graph.output if o.name in producer]
    while stack:
        i = stack.pop()
        if i not in keep:
            keep.add(i)
            stack.extend(producer[n] for n in _inputs_with_subgraphs(nodes[i]) if n in producer)
    order = [i for i in topological_order(nodes) if i in keep]
    needed = {n for i in order for n in _inputs_with_subgraphs(nodes[i])}
    del graph.node[:]
    graph.node.extend(nodes[i] for i in order)
    inits = [t for t in graph.initializer if t.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(inits)


def topological_order(nodes: list[onnx.NodeProto]) -> list[int]:
    """Node indices, producers first; ready nodes are taken in list order (deterministic).

    Quantizers do not always write sorted graphs (ONNX Runtime sorts on load), and the
    derived models insert nodes, so nothing here trusts the order of the node list.
    """
    producer = {out: i for i, node in enumerate(nodes) for out in node.output if out}
    waiting = {i: {producer[n] for n in _inputs_with_subgraphs(node) if n in producer} for i, node in enumerate(nodes)}
    users: dict[int, list[int]] = {}
    for i, deps in waiting.items():
        for d in deps:
            users.setdefault(d, []).append(i)
    ready = [i for i, deps in waiting.items() if not deps]
    heapq.heapify(ready)
    order = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for u in users.get(i, []):
            waiting[u].discard(i)
            if not waiting[u]:
                heapq.heappush(ready, u)
    return order


def _inputs_with_subgraphs(node: onnx.NodeProto) -> set[str]:
    """A node's inputs, plus the outer-scope names its If/Loop/Scan bodies read."""
    names = set(node.input)
    for attr in node.attribute:
        graphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
        for g in graphs:
            for inner in g.node:
                names |= _inputs_with_subgraphs(inner)
    return names


def _add_opsets(model: onnx.ModelProto, source: onnx.ModelProto) -> None:
    """Float ops moved into the QDQ model may come from domains it does not import."""
    have = {imp.domain for imp in model.opset_import}
    for imp in source.opset_import:
        if imp.domain not in have:
            model.opset_import.append(imp)
