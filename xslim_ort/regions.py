"""Which nodes stay float and which method calibrates which tensor.

Ignore lists, ``truncate_var_names`` and ``custom_setting`` regions all come down to node
sets on the graph. A region is exactly the nodes on paths from its input tensors to its
output tensors (never a side branch that runs on to the end of the graph).
"""

from __future__ import annotations

import difflib
from collections import deque
from collections.abc import Iterable

import onnx

from .config import Config, CustomSetting
from .errors import ConfigError
from .targets import Target

_FLOATS = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16)
_GATHERS = ("Gather", "GatherElements", "GatherND")


class GraphIndex:
    """Producer/consumer maps of a graph, built once."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.nodes = list(model.graph.node)
        self.producer: dict[str, int] = {}
        self.consumers: dict[str, list[int]] = {}
        for i, node in enumerate(self.nodes):
            for out in node.output:
                if out:
                    self.producer[out] = i
            for inp in node.input:
                if inp:
                    self.consumers.setdefault(inp, []).append(i)
        self.inputs = [i.name for i in model.graph.input]
        self.outputs = [o.name for o in model.graph.output]
        self.tensors = set(self.producer) | set(self.consumers) | set(self.inputs)

    def check_tensors(self, names: Iterable[str], field: str) -> None:
        for name in names:
            if name not in self.tensors:
                close = difflib.get_close_matches(name, sorted(self.tensors), n=3, cutoff=0.4)
                hint = f"; closest: {', '.join(close)}" if close else ""
                raise ConfigError(f"{field}: no tensor named '{name}' in the model{hint}")

    def downstream(self, tensors: Iterable[str]) -> set[int]:
        """Nodes reachable forward from ``tensors``."""
        seen: set[int] = set()
        queue = deque(tensors)
        while queue:
            for i in self.consumers.get(queue.popleft(), []):
                if i not in seen:
                    seen.add(i)
                    queue.extend(o for o in self.nodes[i].output if o)
        return seen

    def upstream(self, tensors: Iterable[str]) -> set[int]:
        """Nodes that ``tensors`` depend on."""
        seen: set[int] = set()
        queue = deque(tensors)
        while queue:
            i = self.producer.get(queue.popleft())
            if i is not None and i not in seen:
                seen.add(i)
                queue.extend(t for t in self.nodes[i].input if t)
        return seen

    def between(self, starts: Iterable[str], ends: Iterable[str]) -> set[int]:
        """Nodes on some path from a start tensor to an end tensor (ends' producers included)."""
        return self.downstream(starts) & self.upstream(ends)

    def path_avoiding(self, blocked: set[str]) -> list[str] | None:
        """A tensor path from a graph input to a graph output that crosses none of ``blocked``."""
        parent: dict[str, str | None] = {t: None for t in self.inputs if t not in blocked}
        queue = deque(parent)
        outputs = set(self.outputs)
        while queue:
            t = queue.popleft()
            if t in outputs:
                path = [t]
                while parent[path[-1]] is not None:
                    path.append(parent[path[-1]])
                return path[::-1]
            for i in self.consumers.get(t, []):
                for out in self.nodes[i].output:
                    if out and out not in parent and out not in blocked:
                        parent[out] = t
                        queue.append(out)
        return None


def excluded_nodes(model: onnx.ModelProto, config: Config, target: Target) -> set[str]:
    """Names of the nodes the user's settings keep float."""
    qp = config.quantization_parameters
    index = GraphIndex(model)
    names = {n.name for n in index.nodes}
    unknown = [n for n in qp.ignore_op_names if n not in names]
    if unknown:
        close = difflib.get_close_matches(unknown[0], sorted(names), n=3, cutoff=0.4)
        hint = f"; closest: {', '.join(close)}" if close else ""
        raise ConfigError(f"quantization_parameters.ignore_op_names: no node named '{unknown[0]}'{hint}")
    excluded = set(qp.ignore_op_names) | mask_nodes(model)
    ignored_types = set(qp.ignore_op_types)
    excluded |= {n.name for n in index.nodes if n.op_type in ignored_types}
    if qp.truncate_var_names:
        excluded |= {index.nodes[i].name for i in truncated_nodes(index, qp.truncate_var_names)}
    for k, cs in enumerate(qp.custom_setting):
        nodes = region(index, cs, k)
        if cs.precision_level is not None and cs.precision_level >= 1:
            excluded |= {index.nodes[i].name for i in nodes}
    return excluded


def region(index: GraphIndex, cs: CustomSetting, k: int) -> set[int]:
    """The nodes of ``custom_setting[k]``; every input must reach an output and vice versa."""
    field = f"quantization_parameters.custom_setting[{k}]"
    index.check_tensors(cs.input_names, f"{field}.input_names")
    index.check_tensors(cs.output_names, f"{field}.output_names")
    nodes = index.between(cs.input_names, cs.output_names)
    for name in cs.output_names:
        if index.producer.get(name) not in nodes:
            raise ConfigError(f"{field}.output_names: '{name}' is not computed from any of its input_names")
    for name in cs.input_names:
        if not any(i in nodes for i in index.consumers.get(name, [])):
            raise ConfigError(f"{field}.input_names: no path from '{name}' to any of its output_names")
    return nodes


def mask_nodes(model: onnx.ModelProto) -> set[str]:
    """Nodes that never touch float data: attention masks, position ids, shape arithmetic.

    Float data starts at float graph inputs and at embedding lookups (a Gather from a float
    constant table). Whatever is computed from integer inputs and constants alone stays
    float: its values are often meant to be exact, and ``(1 - mask) * -3.4e38`` turns a
    rounding error of 1e-7 in ``1 - mask`` into 3e31.
    """
    consts = {i.name: i.data_type for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            consts[node.output[0]] = node.attribute[0].t.data_type
    data = {i.name for i in model.graph.input if i.name not in consts and i.type.tensor_type.elem_type in _FLOATS}
    out = set()
    for node in model.graph.node:  # graph order is topological
        embedding = node.op_type in _GATHERS and consts.get(node.input[0]) in _FLOATS
        if embedding or any(i in data for i in node.input):
            data.update(o for o in node.output if o)
        elif node.op_type != "Constant":
            out.add(node.name)
    return out


def truncated_nodes(index: GraphIndex, cut: list[str]) -> set[int]:
    """Nodes after the cut; the cut must separate every graph output from the inputs."""
    index.check_tensors(cut, "quantization_parameters.truncate_var_names")
    path = index.path_avoiding(set(cut))
    if path is not None:
        raise ConfigError(
            "quantization_parameters.truncate_var_names does not separate the graph: "
            f"the path {' -> '.join(path)} does not cross it"
        )
    return index.downstream(cut)


def tensor_methods(model: onnx.ModelProto, config: Config, tensors: list[str]) -> dict[str, tuple[str, float]]:
    """(calibration_type, max_percentile) for each tensor; custom_setting regions override."""
    cp, qp = config.calibration_parameters, config.quantization_parameters
    methods = {t: (cp.calibration_type, qp.max_percentile) for t in tensors}
    if not qp.custom_setting:
        return methods
    index = GraphIndex(model)
    wanted = set(tensors)
    for k, cs in enumerate(qp.custom_setting):
        if cs.calibration_type is None and cs.max_percentile is None:
            continue
        inside = {o for i in region(index, cs, k) for o in index.nodes[i].output} | set(cs.input_names)
        for t in inside & wanted:
            method, pct = methods[t]
            methods[t] = (cs.calibration_type or method, cs.max_percentile or pct)
    return methods
