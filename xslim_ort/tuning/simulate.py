"""Fake quantization in ONNX Runtime: what the int8 model computes, in float.

Two builders. ``fake_quant_model`` turns a whole float model into the float model the
quantizer's output is equivalent to (weights replaced by their int8-grid values, a
QuantizeLinear/DequantizeLinear pair after every quantized activation); the benchmark
and the tests score tuning with it. ``BlockSessions`` does the same for one block, but
takes the weights, biases and activation scales as run-time inputs, so that tuning can
try many of them on a single ONNX Runtime session.

A quantized tensor ``t`` keeps its name: its producer writes ``t__float`` and the
DequantizeLinear writes ``t``, so consumers and graph outputs are untouched.
"""

from __future__ import annotations

import threading
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from ..qparams import activation_qparams
from .graph import Block, GraphIndex
from .schemes import WeightScheme

#: One intra-op thread: the machine is shared, and results must not depend on threads.
SESSION_THREADS = 1
FLOAT_SUFFIX = "__float"
REDUCTIONS = ("__cmin", "__cmax", "__cmsq", "__cmean")


def make_session(model: onnx.ModelProto, optimize: bool = False) -> ort.InferenceSession:
    """A CPU session that computes exactly the fake quantization written in ``model``.

    ORT's ``WeightBiasQuantization`` rewrite (basic level) quantizes the float weights and
    biases of any op fed by a DequantizeLinear, which is not what the target does (float
    bias, our weight grid): it is always disabled. ``optimize`` enables all other rewrites
    (layout, fusions) and is only used where every Q/DQ scale is a run-time input, so no
    DQ -> op -> Q group can become an integer kernel.
    """
    so = ort.SessionOptions()
    so.intra_op_num_threads = SESSION_THREADS
    so.inter_op_num_threads = 1
    so.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    )
    so.log_severity_level = 3
    return ort.InferenceSession(
        model.SerializeToString(),
        so,
        providers=["CPUExecutionProvider"],
        disabled_optimizers=["WeightBiasQuantization"],
    )


def qdq_nodes(tensor: str, scale: str, zero_point: str) -> list[onnx.NodeProto]:
    """Q/DQ pair reading ``tensor__float`` and writing ``tensor``."""
    return [
        helper.make_node("QuantizeLinear", [tensor + FLOAT_SUFFIX, scale, zero_point], [tensor + "__q"]),
        helper.make_node("DequantizeLinear", [tensor + "__q", scale, zero_point], [tensor]),
    ]


def _renamed(node: onnx.NodeProto, quantized: Collection[str]) -> onnx.NodeProto:
    out = onnx.NodeProto()
    out.CopyFrom(node)
    for k, t in enumerate(out.output):
        if t in quantized:
            out.output[k] = t + FLOAT_SUFFIX
    return out


def fake_quant_model(
    model: onnx.ModelProto,
    ranges: Mapping[str, tuple[float, float]],
    quantized_tensors: Collection[str],
    weight_schemes: Mapping[str, WeightScheme],
) -> onnx.ModelProto:
    """The float equivalent of the int8 model the quantizer would write for these settings."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    for init in g.initializer:
        if init.name in weight_schemes:
            w = numpy_helper.to_array(init)
            init.CopyFrom(numpy_helper.from_array(weight_schemes[init.name].fake_quant(w), init.name))
    graph_inputs = {i.name for i in g.input}
    nodes: list[onnx.NodeProto] = []
    for t in sorted(graph_inputs & set(quantized_tensors)):
        nodes.extend(_input_qdq(g, t, ranges[t]))
    for node in g.node:
        nodes.append(_renamed(node, quantized_tensors))
        for t in node.output:
            if t in quantized_tensors:
                s, z = _qparam_initializers(g, t, ranges[t])
                nodes.extend(qdq_nodes(t, s, z))
    del g.node[:]
    g.node.extend(nodes)
    return out


def _qparam_initializers(g: onnx.GraphProto, t: str, rng: tuple[float, float]) -> tuple[str, str]:
    scale, zp = activation_qparams(*rng)
    g.initializer.extend(
        [
            numpy_helper.from_array(np.array(scale, np.float32), t + "__scale"),
            numpy_helper.from_array(np.array(zp, np.int8), t + "__zp"),
        ]
    )
    return t + "__scale", t + "__zp"


def _input_qdq(g: onnx.GraphProto, t: str, rng: tuple[float, float]) -> list[onnx.NodeProto]:
    """A graph input cannot be renamed: rewire its consumers to the dequantized copy."""
    s, z = _qparam_initializers(g, t, rng)
    for node in g.node:
        for k, name in enumerate(node.input):
            if name == t:
                node.input[k] = t + "__dq"
    return [
        helper.make_node("QuantizeLinear", [t, s, z], [t + "__q"]),
        helper.make_node("DequantizeLinear", [t + "__q", s, z], [t + "__dq"]),
    ]


def scale_zp_feeds(tensor: str, rng: tuple[float, float]) -> dict[str, np.ndarray]:
    """Run-time inputs that set the Q/DQ range of ``tensor`` in a block session."""
    scale, zp = activation_qparams(*rng)
    return {tensor + "__scale": np.array(scale, np.float32), tensor + "__zp": np.array(zp, np.int8)}


class BlockSessions:
    """The float and fake-quant ONNX Runtime sessions of one block.

    Inputs: the block's input tensors and, in a quantized session, ``<t>__scale`` and
    ``<t>__zp`` for every quantized tensor ``t`` the block produces (``self.quantized``),
    so ranges can be searched without rebuilding. The ``params`` initializers (weights and
    biases that tuning changes) are baked in as constants, which lets ONNX Runtime
    pre-pack them (about 2x faster than feeding them); a session is rebuilt whenever the
    caller's ``key`` for the parameter values changes.

    Outputs: any tensor of the block; a quantized ``t`` is its dequantized value,
    ``t__float`` the value before Q/DQ. For a tensor of rank >= 2 (channels on axis 1) a
    session can also output, computed in ORT so that large activations never reach Python:
    ``t__cmin``/``t__cmax``/``t__cmsq`` (per-channel min, max and mean square, shape
    ``[C]``) and ``t__cmean`` (per sample and channel, ``[N, C]``), of the value before Q/DQ.

    Each list of requested outputs gets its own session holding only the nodes those
    outputs depend on, and only the reductions asked for: ONNX Runtime runs every node of
    a graph whatever outputs are fetched, and on MobileNetV2 the reductions alone cost 40%
    of a block run, the tail of a block after the tensor a step needs as much again.
    """

    def __init__(
        self,
        graph: GraphIndex,
        block: Block,
        quantized_tensors: Collection[str],
        params: Collection[str],
    ) -> None:
        produced = [t for n in block.nodes for t in graph.nodes[n].output]
        self.block = block
        self.quantized = [t for t in produced if t in quantized_tensors and graph.is_float(t)]
        self.params = sorted(params)
        self.outputs = list(block.outputs)
        self._graph = graph
        self._opset = next((o.version for o in graph.model.opset_import if o.domain in ("", "ai.onnx")), 13)
        self.tails = {
            t: self._tail(t) for t in self.quantized if t in {i for n in block.nodes for i in graph.nodes[n].input}
        }
        self._templates: dict[object, onnx.ModelProto] = {}
        self._sessions: dict[object, tuple[object, ort.InferenceSession, list[str]]] = {}
        self._lock = threading.Lock()  # runs come from several threads: build each session once

    def reduced(self, tensor: str) -> bool:
        """Whether sessions can output ``tensor``'s per-channel statistics."""
        return _rank(self._graph, tensor) >= 2

    def _tail(self, tensor: str) -> Tail:
        """The nodes of the block downstream of ``tensor``, and what they read from upstream."""
        graph = self._graph
        produced: set[str] = set()
        nodes = []
        for n in self.block.nodes:
            if any(i == tensor or i in produced for i in graph.nodes[n].input):
                nodes.append(n)
                produced.update(graph.nodes[n].output)
        reads = {i for n in nodes for i in graph.nodes[n].input if i in graph.dynamic}
        block_produced = {o for n in self.block.nodes for o in graph.nodes[n].output}
        upstream = sorted(t for t in reads - produced - {tensor} if t in block_produced)
        outputs = [o for o in self.block.outputs if o in produced or o == tensor]
        return Tail(tuple(nodes), frozenset(produced), frozenset(reads), tuple(upstream), outputs)

    def _template(self, which: tuple) -> onnx.ModelProto:
        """The model of a session: ``(quant, outputs)`` for a block run, ``("tail", t)`` for a tail."""
        if which not in self._templates:
            if which[0] == "tail":
                t = which[1]
                tail = self.tails[t]
                self._templates[which] = self._build(
                    [q for q in self.quantized if q in tail.produced],
                    tail.outputs,
                    tail.nodes,
                    [*tail.upstream, *(i for i in self.block.inputs if i in tail.reads)],
                    head=t,
                )
            else:
                quant, outputs = which
                self._templates[which] = self._build(self.quantized if quant else [], list(outputs))
        return self._templates[which]

    def _build(
        self,
        quantized: list[str],
        outputs: list[str],
        node_subset: Sequence[int] | None = None,
        input_names: Sequence[str] | None = None,
        head: str | None = None,
    ) -> onnx.ModelProto:
        """The nodes of the block (or of the ``node_subset`` of it) that ``outputs`` need, as a
        model; ``head`` is a quantized tensor fed before its Q/DQ pair (``head__float``), for a tail."""
        graph = self._graph
        body = list(self.block.nodes if node_subset is None else node_subset)
        node_ids = [*graph.constant_closure(body), *body]
        qset = set(quantized)
        nodes: list[onnx.NodeProto] = qdq_nodes(head, head + "__scale", head + "__zp") if head else []
        for n in node_ids:
            nodes.append(_renamed(graph.nodes[n], qset))
            for t in graph.nodes[n].output:
                if t in qset:
                    nodes.extend(qdq_nodes(t, t + "__scale", t + "__zp"))
        inits: list[onnx.TensorProto] = []
        for name in outputs:
            if name.endswith(REDUCTIONS):
                nodes.extend(self._reduction(name, qset, inits))
        needed = set(outputs)
        kept: list[onnx.NodeProto] = []
        for node in reversed(nodes):  # only what the outputs depend on
            if any(t in needed for t in node.output):
                kept.append(node)
                needed.update(t for t in node.input if t)
        kept.reverse()
        inits = [i for i in inits if i.name in needed]
        inits += [
            numpy_helper.from_array(graph.inits[t], t)
            for t in sorted(needed)
            if t in graph.inits and t not in self.params
        ]
        names = [t for t in (self.block.inputs if input_names is None else input_names) if t in needed]
        inputs = [
            graph.value_info[t] if t in graph.value_info else helper.make_tensor_value_info(t, graph.elem_type(t), None)
            for t in names
        ]
        if head:
            inputs.append(helper.make_tensor_value_info(head + FLOAT_SUFFIX, onnx.TensorProto.FLOAT, None))
        for t in [*quantized, *([head] if head else [])]:
            if t + "__scale" in needed:
                inputs.append(helper.make_tensor_value_info(t + "__scale", onnx.TensorProto.FLOAT, []))
                inputs.append(helper.make_tensor_value_info(t + "__zp", onnx.TensorProto.INT8, []))
        outs = [helper.make_tensor_value_info(t, graph.elem_type(_base(t)), None) for t in outputs]
        g = helper.make_graph(kept, f"block{self.block.index}", inputs, outs, inits)
        model = helper.make_model(g, opset_imports=graph.model.opset_import)
        model.ir_version = graph.model.ir_version
        return model

    def _reduction(
        self, output: str, quantized: Collection[str], inits: list[onnx.TensorProto]
    ) -> list[onnx.NodeProto]:
        """The nodes computing one ``REDUCTIONS`` output, from the value before Q/DQ."""
        suffix = next(s for s in REDUCTIONS if output.endswith(s))
        name = output[: -len(suffix)]
        source = name + FLOAT_SUFFIX if name in quantized else name
        rank = _rank(self._graph, name)
        not_channel = [a for a in range(rank) if a != 1]
        if suffix == "__cmin":
            return [_reduce("ReduceMin", source, output, not_channel, self._opset, inits)]
        if suffix == "__cmax":
            return [_reduce("ReduceMax", source, output, not_channel, self._opset, inits)]
        if suffix == "__cmsq":
            return [
                helper.make_node("Mul", [source, source], [name + "__sq"]),
                _reduce("ReduceMean", name + "__sq", output, not_channel, self._opset, inits),
            ]
        if rank > 2:  # __cmean
            return [_reduce("ReduceMean", source, output, list(range(2, rank)), self._opset, inits)]
        return [helper.make_node("Identity", [source], [output])]

    def run(
        self,
        quant: bool,
        params: Mapping[str, np.ndarray],
        key: object,
        feeds: Mapping[str, np.ndarray],
        outputs: list[str],
    ) -> list[np.ndarray]:
        """Run the block's nodes that ``outputs`` need; ``key`` identifies the values of ``params``
        (rebuild when it changes)."""
        return self._session((quant, tuple(outputs)), params, key, feeds, outputs)

    def run_tail(
        self, tensor: str, params: Mapping[str, np.ndarray], key: object, feeds: Mapping[str, np.ndarray]
    ) -> list[np.ndarray]:
        """The quantized nodes downstream of ``tensor`` (see ``Tail``); returns its outputs."""
        return self._session(("tail", tensor), params, key, feeds, self.tails[tensor].outputs)

    def _session(
        self,
        which: tuple,
        params: Mapping[str, np.ndarray],
        key: object,
        feeds: Mapping[str, np.ndarray],
        outputs: list[str],
    ) -> list[np.ndarray]:
        with self._lock:
            cached = self._sessions.get(which)
            if cached is None or cached[0] != key:
                model = onnx.ModelProto()
                model.CopyFrom(self._template(which))
                used = {i for node in model.graph.node for i in node.input}
                model.graph.initializer.extend(numpy_helper.from_array(params[p], p) for p in self.params if p in used)
                sess = make_session(model, optimize=True)
                cached = (key, sess, [i.name for i in sess.get_inputs()])
                self._sessions[which] = cached
        _, sess, names = cached
        return sess.run(outputs, {n: feeds[n] for n in names})


@dataclass(frozen=True)
class Tail:
    """The part of a block downstream of one of its quantized tensors: re-running only it
    is enough to score a new range for that tensor. ``upstream`` are the block's own
    tensors it reads besides the head (fed from a full run of the block)."""

    nodes: tuple[int, ...]
    produced: frozenset[str]
    reads: frozenset[str]
    upstream: tuple[str, ...]
    outputs: list[str]


def _base(name: str) -> str:
    """The graph tensor behind a session output name."""
    for suffix in (FLOAT_SUFFIX, *REDUCTIONS):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _rank(graph: GraphIndex, tensor: str) -> int:
    vi = graph.value_info.get(tensor)
    if vi is None or not vi.type.tensor_type.HasField("shape"):
        return -1
    return len(vi.type.tensor_type.shape.dim)


def _reduce(op: str, x: str, y: str, axes: list[int], opset: int, inits: list[onnx.TensorProto]) -> onnx.NodeProto:
    """A keepdims=0 reduction, with ``axes`` as an input from opset 18 on (an attribute before)."""
    if opset >= 18:
        inits.append(numpy_helper.from_array(np.array(axes, np.int64), y + "__axes"))
        return helper.make_node(op, [x, y + "__axes"], [y], keepdims=0)
    return helper.make_node(op, [x], [y], axes=axes, keepdims=0)
