"""``xslim-ort check``: does a QDQ model conform to a target descriptor?

Errors are violations of the target's format (a weight the chip cannot load, a scale it
cannot use); warnings are spots that run but slowly (requantization pairs, float islands).
Every finding names the node, so a user can find it in Netron.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import click
import numpy as np
import onnx
from onnx import numpy_helper

from .model_io import load_model
from .targets import Target, load_target

_DTYPES = {"int8": onnx.TensorProto.INT8, "uint8": onnx.TensorProto.UINT8}
_QDQ_OR_CONST = {"QuantizeLinear", "DequantizeLinear", "Constant"}


@dataclass
class CheckReport:
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    stats: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.errors


class _Graph:
    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.inits = {i.name: i for i in model.graph.initializer}
        for node in model.graph.node:  # Constant nodes count as initializers here
            if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
                t = onnx.TensorProto()
                t.CopyFrom(node.attribute[0].t)
                t.name = node.output[0]
                self.inits[node.output[0]] = t
        self.producer = {o: n for n in model.graph.node for o in n.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for n in model.graph.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)

    def array(self, name: str) -> np.ndarray | None:
        init = self.inits.get(name)
        return None if init is None else numpy_helper.to_array(init)

    def dq_params(self, node: onnx.NodeProto) -> tuple[np.ndarray | None, np.ndarray | None]:
        scale = self.array(node.input[1])
        zp = self.array(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        return scale, zp


def _axis(node: onnx.NodeProto) -> int:
    for a in node.attribute:
        if a.name == "axis":
            return a.i
    return 1


def _is_pow2(values: np.ndarray) -> bool:
    return all(v > 0 and math.log2(float(v)).is_integer() for v in np.ravel(values))


def check_model(model: onnx.ModelProto, target: Target, float_model: onnx.ModelProto | None = None) -> CheckReport:
    """Check every quantized weight, activation, bias and shared scale against ``target``."""
    g = _Graph(model)
    rep = CheckReport()
    act_dtype = _DTYPES[target.activation_dtype]
    n_weights = n_acts = 0

    for node in model.graph.node:
        rule = target.weight_rule(node.op_type)
        if rule is not None:
            for idx in [rule.input] if rule.input is not None else [0, 1]:
                if idx >= len(node.input):
                    continue
                dq = g.producer.get(node.input[idx])
                if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in g.inits:
                    continue
                n_weights += 1
                rep.errors.extend(_check_weight(g, node, dq, rule))
        if node.op_type == "QuantizeLinear":
            n_acts += 1
            rep.errors.extend(_check_activation(g, node, act_dtype, target))
        if node.op_type in ("Conv", "Gemm", "ConvTranspose") and len(node.input) > 2 and node.input[2]:
            rep.errors.extend(_check_bias(g, node, target))
        if target.shares_scale(node.op_type):
            rep.errors.extend(_check_shared(g, node))
    rep.warnings.extend(_requant_pairs(g))
    rep.warnings.extend(_float_islands(g, target))
    if float_model is not None:
        rep.errors.extend(_check_io(model, float_model))
    rep.stats = {"quantized_weights": n_weights, "activation_quantizers": n_acts}
    return rep


def _check_weight(g: _Graph, node: onnx.NodeProto, dq: onnx.NodeProto, rule) -> Iterator[str]:
    where = f"{node.op_type} '{node.name}' weight '{dq.input[0]}'"
    w = g.inits[dq.input[0]]
    if w.data_type != onnx.TensorProto.INT8:
        yield f"{where}: stored as {onnx.TensorProto.DataType.Name(w.data_type)}, expected INT8"
    scale, zp = g.dq_params(dq)
    if scale is None:
        yield f"{where}: scale is not a constant"
        return
    if zp is not None and np.any(zp != 0):
        yield f"{where}: symmetric weights need zero points of 0"
    if rule.axis is None:
        if scale.size != 1:
            yield f"{where}: expected a per-tensor scale, got {scale.size} scales"
    else:
        dims = list(w.dims)
        if scale.ndim != 1 or _axis(dq) != rule.axis or scale.size != dims[rule.axis]:
            yield (
                f"{where}: expected per-channel scales on axis {rule.axis} ({dims[rule.axis]} channels), "
                f"got {scale.size} on axis {_axis(dq)}"
            )
    if rule.power_of_two and not _is_pow2(scale):
        yield f"{where}: scale {float(np.ravel(scale)[0]):.6g} is not a power of two"
    if w.data_type == onnx.TensorProto.INT8 and np.any(numpy_helper.to_array(w) == -128):
        yield f"{where}: holds -128; symmetric int8 weights use [-127, 127]"


def _check_activation(g: _Graph, q: onnx.NodeProto, act_dtype: int, target: Target) -> Iterator[str]:
    where = f"QuantizeLinear '{q.name}' of '{q.input[0]}'"
    scale, zp = g.dq_params(q)
    if scale is None:
        yield f"{where}: scale is not a constant"
        return
    if scale.size != 1:
        yield f"{where}: activations are per tensor, got {scale.size} scales"
    if zp is None:
        yield f"{where}: no zero point; the target wants {target.activation_dtype} activations"
    elif g.inits[q.input[2]].data_type != act_dtype:
        got = onnx.TensorProto.DataType.Name(g.inits[q.input[2]].data_type).lower()
        yield f"{where}: {got} activations; the target wants {target.activation_dtype}"
    elif target.activation_symmetric and np.any(zp != 0):
        yield f"{where}: symmetric activations need a zero point of 0"
    if not np.all(np.isfinite(scale)) or np.any(scale <= 0):
        yield f"{where}: scale {scale} is not a positive finite number"


def _check_bias(g: _Graph, node: onnx.NodeProto, target: Target) -> Iterator[str]:
    where = f"{node.op_type} '{node.name}' bias"
    src = g.producer.get(node.input[2])
    weight_dq = g.producer.get(node.input[1])
    if weight_dq is None or weight_dq.op_type != "DequantizeLinear":
        return  # the op is float: its bias may be anything
    if target.bias == "float32":
        if src is not None and src.op_type == "DequantizeLinear":
            yield f"{where}: the target keeps biases float32, found a quantized bias"
        return
    if src is None or src.op_type != "DequantizeLinear" or src.input[0] not in g.inits:
        yield f"{where}: the target wants an int32 bias behind a DequantizeLinear"
        return
    if g.inits[src.input[0]].data_type != onnx.TensorProto.INT32:
        yield f"{where}: stored as {onnx.TensorProto.DataType.Name(g.inits[src.input[0]].data_type)}, expected INT32"
        return
    in_dq = g.producer.get(node.input[0])
    b_scale, _ = g.dq_params(src)
    w_scale, _ = g.dq_params(weight_dq)
    if in_dq is not None and in_dq.op_type == "DequantizeLinear" and b_scale is not None and w_scale is not None:
        x_scale, _ = g.dq_params(in_dq)
        if x_scale is not None and not np.allclose(b_scale, x_scale * w_scale, rtol=1e-5):
            yield f"{where}: scale is not input scale x weight scale"


def _check_shared(g: _Graph, node: onnx.NodeProto) -> Iterator[str]:
    """A scale-sharing op's output quantizers must reuse its input's scale and zero point."""
    src = g.producer.get(node.input[0]) if node.input else None
    if src is None or src.op_type != "DequantizeLinear":
        return
    s_in, z_in = g.dq_params(src)
    for out in node.output:
        for q in (c for c in g.consumers.get(out, []) if c.op_type == "QuantizeLinear"):
            s_out, z_out = g.dq_params(q)
            if s_in is None or s_out is None:
                continue
            if not (np.array_equal(s_in, s_out) and np.array_equal(z_in, z_out)):
                yield (
                    f"{node.op_type} '{node.name}': output '{out}' is quantized with scale "
                    f"{float(np.ravel(s_out)[0]):.6g}, its input with {float(np.ravel(s_in)[0]):.6g}; "
                    "the target shares one scale"
                )


def _requant_pairs(g: _Graph) -> Iterator[str]:
    """DQ -> Q with equal parameters: a round trip the runtime executes for nothing."""
    for dq in g.model.graph.node:
        if dq.op_type != "DequantizeLinear" or dq.input[0] in g.inits:
            continue
        s1, z1 = g.dq_params(dq)
        for q in g.consumers.get(dq.output[0], []):
            if q.op_type != "QuantizeLinear":
                continue
            s2, z2 = g.dq_params(q)
            if s1 is not None and s2 is not None and np.array_equal(s1, s2) and np.array_equal(z1, z2):
                yield f"DequantizeLinear '{dq.name}' -> QuantizeLinear '{q.name}': requantizes with equal parameters"


def _float_islands(g: _Graph, target: Target) -> Iterator[str]:
    """Ops the target runs in int8, chained in float between int8 tensors.

    A quantized op sits alone between its DequantizeLinear inputs and QuantizeLinear
    outputs. Two or more ops joined by float tensors, fed only by DequantizeLinear (or
    constants) and read only by QuantizeLinear, could have been int8 end to end; a fused
    producer and activation count as one op.
    """
    compute = [n for n in g.model.graph.node if n.op_type not in _QDQ_OR_CONST and n.output]
    key = {n.output[0]: n for n in compute}  # outputs are unique; names need not be
    group = {k: k for k in key}

    def root(k: str) -> str:
        while group[k] != k:
            k = group[k]
        return k

    fused_edges: dict[str, int] = {}
    for node in compute:
        for out in node.output:
            for reader in g.consumers.get(out, []):
                if reader.op_type in _QDQ_OR_CONST or not reader.output:
                    continue
                group[root(reader.output[0])] = root(node.output[0])
                if _fused(g, target, node, reader):
                    fused_edges[node.output[0]] = fused_edges.get(node.output[0], 0) + 1
    members: dict[str, list[onnx.NodeProto]] = {}
    for k, node in key.items():
        members.setdefault(root(k), []).append(node)
    outputs = {o.name for o in g.model.graph.output}
    for nodes in members.values():
        units = len(nodes) - sum(fused_edges.get(n.output[0], 0) for n in nodes)
        if units < 2 or any(n.op_type not in target.ops for n in nodes):
            continue
        inside = {n.output[0] for n in nodes}
        sources = [g.producer.get(i) for n in nodes for i in n.input if i and i not in g.inits]
        outside = [p for p in sources if p is None or p.output[0] not in inside]
        if not outside or any(p is None or p.op_type != "DequantizeLinear" for p in outside):
            continue
        ends = [o for n in nodes for o in n.output if o]
        if any(o in outputs for o in ends):
            continue
        readers = [r for o in ends for r in g.consumers.get(o, []) if not r.output or r.output[0] not in inside]
        if readers and all(r.op_type == "QuantizeLinear" for r in readers):
            chain = ", ".join(f"{n.op_type} '{n.name}'" for n in nodes)
            yield f"float island between int8 tensors: {chain}"


def _fused(g: _Graph, target: Target, producer: onnx.NodeProto, reader: onnx.NodeProto) -> bool:
    """A producer and the activation it fuses with: one quantization point, one op."""
    patterns = {f.pattern for f in target.fusions}
    return (producer.op_type, reader.op_type) in patterns and len(g.consumers.get(producer.output[0], [])) == 1


def _check_io(model: onnx.ModelProto, float_model: onnx.ModelProto) -> Iterator[str]:
    def sig(vis):
        return [(v.name, v.type.tensor_type.elem_type) for v in vis]

    f_in = [v for v in float_model.graph.input if v.name not in {i.name for i in float_model.graph.initializer}]
    q_in = [v for v in model.graph.input if v.name not in {i.name for i in model.graph.initializer}]
    if sig(f_in) != sig(q_in):
        yield f"graph inputs changed: {sig(f_in)} -> {sig(q_in)}"
    if sig(float_model.graph.output) != sig(model.graph.output):
        yield f"graph outputs changed: {sig(float_model.graph.output)} -> {sig(model.graph.output)}"


@click.command("check", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--target", default="spacemit", show_default=True, help="Descriptor name or .json path.")
@click.option(
    "--float-model",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Also check that graph inputs and outputs match this float model.",
)
@click.option("--strict", is_flag=True, help="Treat warnings as errors.")
def check_command(model: Path, target: str, float_model: Path | None, strict: bool) -> int:
    """Verify that a quantized MODEL conforms to a target descriptor.

    Exit code 0 when it conforms, 1 when it does not (or with --strict, has warnings).
    """
    rep = check_model(load_model(model), load_target(target), load_model(float_model) if float_model else None)
    for e in rep.errors:
        click.echo(f"error: {e}")
    for w in rep.warnings:
        click.echo(f"warning: {w}")
    click.echo(
        f"{model}: {len(rep.errors)} error(s), {len(rep.warnings)} warning(s); "
        f"{rep.stats['quantized_weights']} quantized weights, "
        f"{rep.stats['activation_quantizers']} activation quantizers"
    )
    return 0 if rep.ok and not (strict and rep.warnings) else 1
