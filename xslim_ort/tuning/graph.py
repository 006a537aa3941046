"""A read-only index of the float graph and its split into blocks.

Tuning works block by block so that each block sees the quantized model's activations
at its inputs (errors from upstream are compensated, not piled up) and can be scored,
tuned and rolled back on its own. A block boundary is a point of the topological order
where as few tensors as possible are alive (in a CNN, the single tensor between two
residual units); blocks hold at most ``MAX_LAYERS_PER_BLOCK`` weighted layers.
"""

from __future__ import annotations

import itertools
from collections.abc import Collection, Mapping
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from .schemes import WeightScheme

#: Node types whose weights tuning can re-round (input 1 is the weight).
LAYER_TYPES = frozenset({"Conv", "Gemm", "MatMul"})
MAX_LAYERS_PER_BLOCK = 3


@dataclass(frozen=True)
class Block:
    """A run of consecutive nodes (indices into ``graph.node``, topologically ordered)."""

    index: int
    name: str
    nodes: tuple[int, ...]
    inputs: tuple[str, ...]  # dynamic tensors read here and produced before the block
    outputs: tuple[str, ...]  # tensors produced here and read later (or graph outputs)
    layers: tuple[int, ...]  # weighted layers whose weight the quantizer quantizes


class GraphIndex:
    """Producers, consumers, constants and tensor types of a model's main graph."""

    def __init__(self, model: onnx.ModelProto) -> None:
        if not any(vi.name for vi in model.graph.value_info):
            model = onnx.shape_inference.infer_shapes(model)
        self.model = model
        g = model.graph
        self.nodes = list(g.node)
        self.inits: dict[str, np.ndarray] = {t.name: numpy_helper.to_array(t) for t in g.initializer}
        init_names = set(self.inits)
        self.graph_inputs = [i.name for i in g.input if i.name not in init_names]
        self.graph_outputs = [o.name for o in g.output]
        self.value_info: dict[str, onnx.ValueInfoProto] = {vi.name: vi for vi in [*g.value_info, *g.input, *g.output]}
        self.producer: dict[str, int] = {}
        self.consumers: dict[str, list[int]] = {}
        for i, node in enumerate(self.nodes):
            for t in node.output:
                self.producer[t] = i
            for t in node.input:
                if t:
                    self.consumers.setdefault(t, []).append(i)
        self.dynamic: set[str] = set(self.graph_inputs)
        self.dynamic_nodes: list[int] = []
        for i, node in enumerate(self.nodes):
            if any(t in self.dynamic for t in node.input if t):
                self.dynamic.update(t for t in node.output if t)
                self.dynamic_nodes.append(i)

    def elem_type(self, tensor: str) -> int:
        vi = self.value_info.get(tensor)
        return vi.type.tensor_type.elem_type if vi is not None else onnx.TensorProto.FLOAT

    def is_float(self, tensor: str) -> bool:
        return self.elem_type(tensor) == onnx.TensorProto.FLOAT

    def single_consumer(self, tensor: str) -> int | None:
        """The only node reading ``tensor``, or None if it has several or is a graph output."""
        cons = self.consumers.get(tensor, [])
        if len(cons) != 1 or tensor in self.graph_outputs:
            return None
        return cons[0]

    def constant_value(self, tensor: str) -> np.ndarray | None:
        """Value of an initializer or Constant-node output, else None."""
        if not tensor:
            return None
        if tensor in self.inits:
            return self.inits[tensor]
        p = self.producer.get(tensor)
        if p is not None and self.nodes[p].op_type == "Constant":
            attr = self.nodes[p].attribute[0]
            if attr.name == "value":
                return numpy_helper.to_array(attr.t)
        return None

    def constant_closure(self, node_ids: Collection[int]) -> list[int]:
        """Non-dynamic nodes (Constant, shape arithmetic on constants) the given nodes need."""
        needed: set[int] = set()
        stack = [t for i in node_ids for t in self.nodes[i].input if t and t not in self.dynamic]
        while stack:
            p = self.producer.get(stack.pop())
            if p is not None and p not in needed:
                needed.add(p)
                stack.extend(t for t in self.nodes[p].input if t)
        return sorted(needed)

    def weight_use_count(self, name: str) -> int:
        return len(self.consumers.get(name, []))

    def layer_weight(self, node_id: int, schemes: Mapping[str, WeightScheme]) -> str | None:
        """The quantized weight of a Conv/Gemm/MatMul node that tuning may change, else None.

        Shared weights are left alone: changing them for one node would change the other.
        """
        node = self.nodes[node_id]
        if node.op_type not in LAYER_TYPES or len(node.input) < 2:
            return None
        w = node.input[1]
        if w not in schemes or w not in self.inits or self.weight_use_count(w) != 1:
            return None
        if node.op_type == "MatMul" and self.inits[w].ndim != 2:
            return None
        if node.op_type == "Gemm" and attr(node, "transA", 0):
            return None
        return w


def attr(node: onnx.NodeProto, name: str, default):
    """A node attribute's value, or ``default`` when absent."""
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def partition(
    graph: GraphIndex,
    quantized_tensors: Collection[str],
    schemes: Mapping[str, WeightScheme],
    max_layers: int = MAX_LAYERS_PER_BLOCK,
) -> list[Block]:
    """Split the dynamic nodes into blocks at the narrowest points of the graph.

    Cuts are placed where the number of live float tensors is minimal, preferring cuts
    whose live tensors all carry a Q/DQ pair (so a block starts from quantized
    activations, and a Conv is never separated from the Relu sharing its quant point).
    Consecutive pieces are merged until a block holds ``max_layers`` weighted layers.
    """
    order = graph.dynamic_nodes
    pos = {n: k for k, n in enumerate(order)}
    last_use: dict[str, int] = {}
    for k, n in enumerate(order):
        for t in graph.nodes[n].input:
            if t in graph.dynamic:
                last_use[t] = k
    for t in graph.graph_outputs:
        last_use[t] = len(order)
    first_def = {t: -1 for t in graph.graph_inputs}
    for k, n in enumerate(order):
        for t in graph.nodes[n].output:
            if t in graph.dynamic:
                first_def[t] = k

    # Side inputs alive across most of the graph are carried along but do not count, nor do
    # integer tensors: a Shape -> Gather feeding the final Reshape, or a transformer's
    # attention mask read by every layer, must not hide the narrow points between layers.
    side = {t for t, d in first_def.items() if last_use.get(t, -2) - d > len(order) // 2 or not graph.is_float(t)}
    live_at: list[list[str]] = []
    for k in range(len(order) - 1):
        live_at.append([t for t, d in first_def.items() if d <= k < last_use.get(t, -2) and t not in side])
    layer_ids = {n for n in order if graph.layer_weight(n, schemes) is not None}
    cuts: list[int] = []
    if live_at:
        narrowest = min(len(live) for live in live_at)
        candidates = [k for k, live in enumerate(live_at) if len(live) == narrowest]
        preferred = [k for k in candidates if all(t in quantized_tensors for t in live_at[k])]
        cuts = list(preferred or candidates)
        # Where a stretch between preferred cuts holds too many layers (a transformer whose
        # residual stream stays float), cut it at its narrow float points too: one block
        # for the whole model makes tuning slow and useless.
        bounds = [-1, *preferred, len(order) - 1]
        for a, b in itertools.pairwise(bounds):
            if sum(order[j] in layer_ids for j in range(a + 1, b + 1)) > max_layers:
                cuts.extend(k for k in candidates if a < k < b)
        cuts = sorted(set(cuts))
    # Pieces longer than max_layers (a U-Net's long skips keep the graph wide) are split
    # further wherever every live tensor carries a Q/DQ pair: a block may then have
    # several inputs, but tuning stays linear in the model size.
    quantized_points = {k for k, live in enumerate(live_at) if all(t in quantized_tensors for t in live)}
    split: list[int] = []
    start = 0
    for k in [*cuts, len(order) - 1]:
        count = 0
        for j in range(start, k + 1):
            count += order[j] in layer_ids
            if count >= max_layers and j < k and j in quantized_points:
                split.append(j)
                count = 0
        split.append(k)
        start = k + 1
    pieces: list[list[int]] = []
    start = 0
    for k in split:
        if k >= start:
            pieces.append(order[start : k + 1])
            start = k + 1
    groups: list[list[int]] = []
    for piece in pieces:
        n_piece = sum(n in layer_ids for n in piece)
        if groups:
            n_cur = sum(n in layer_ids for n in groups[-1])
            if n_cur == 0 or (n_piece == 0) or n_cur + n_piece <= max_layers:
                groups[-1].extend(piece)
                continue
        groups.append(list(piece))
    if len(groups) > 1 and not any(n in layer_ids for n in groups[-1]):
        groups[-2].extend(groups.pop())

    blocks = []
    for i, nodes in enumerate(groups):
        k1 = pos[nodes[-1]]
        produced = {t for n in nodes for t in graph.nodes[n].output}
        inputs = sorted({t for n in nodes for t in graph.nodes[n].input if t in graph.dynamic and t not in produced})
        outputs = sorted(t for t in produced if t in graph.dynamic and last_use.get(t, -1) > k1)
        layers = tuple(n for n in nodes if n in layer_ids)
        names = [graph.nodes[n].name or graph.nodes[n].output[0] for n in (layers or nodes)]
        name = names[0] if len(names) == 1 else f"{names[0]} .. {names[-1]}"
        blocks.append(Block(i, name, tuple(nodes), tuple(inputs), tuple(outputs), layers))
    return blocks
