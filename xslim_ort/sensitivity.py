"""Precision levels 1 and 2: keep in float the ops whose quantization hurts the output most.

Sensitivity is measured, not guessed. The fully quantized model is rewritten once into a
*switchable* model: after every DequantizeLinear sits ``Where(flag, dequantized, float)``
with ``flag`` a boolean graph input, so any subset of tensors can be quantized in one ORT
session without re-quantizing or rebuilding. Each candidate op is quantized alone to rank
them; then the most sensitive are kept float, one more at a time, until the output stops
improving meaningfully or the budget (a fifth of the compute ops at level 1, a third at
level 2) is spent.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from .calibration.batches import BatchSource
from .targets import Target

log = logging.getLogger("xslim_ort")

COMPUTE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
# Keeping k more ops float must buy at least this much output SQNR to be worth it.
MIN_GAIN_DB = 0.25
BUDGET_FRACTION = {1: 0.2, 2: 1.0 / 3.0}


@dataclass
class SensitivityResult:
    """What level 1/2 kept float, and why (for the log and the analysis report)."""

    level: int
    float_nodes: dict[str, str] = field(default_factory=dict)  # node name -> reason
    isolated_sqnr_db: dict[str, float] = field(default_factory=dict)  # node -> output SQNR, quantized alone
    curve: list[tuple[int, float]] = field(default_factory=list)  # (ops kept float, output SQNR)


def level2_float_nodes(model: onnx.ModelProto, target: Target) -> dict[str, str]:
    """Level 2's fixed float set: element-wise ops between two activations, Softmax, Sigmoid, norms."""
    consts = {i.name for i in model.graph.initializer}
    consts |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    out = {}
    for node in model.graph.node:
        if node.op_type in target.float_elementwise_level2:
            if not any(i in consts for i in node.input):
                out[node.name] = "level 2: element-wise op without a constant input"
        elif node.op_type in target.float_ops_level2:
            out[node.name] = f"level 2: {node.op_type} stays float"
    return out


class SwitchableModel:
    """A QDQ model whose every quantized tensor can be switched back to float per run.

    Activations switch with ``Where(flag, dequantized, float)``. Weights switch on the
    consumer's side instead: the op is duplicated with its float weights and a ``Where``
    picks one output, which costs one more small matmul rather than a copy of the weight.
    ``qmodel`` must keep its fused Relu/Clip nodes (``TargetQuantizer(keep_activations=True)``):
    otherwise the float twin of a fused output would miss its activation.
    """

    def __init__(self, qmodel: onnx.ModelProto, float_model: onnx.ModelProto, threads: int = 2) -> None:
        model = onnx.ModelProto()
        model.CopyFrom(qmodel)
        float_inits = {i.name: i for i in float_model.graph.initializer}
        inits = {i.name for i in model.graph.initializer}
        producers = {o: n for n in model.graph.node for o in n.output}
        self.flags: dict[str, str] = {}  # float tensor name -> flag input name
        new_nodes: list[onnx.NodeProto] = []
        rename: dict[str, str] = {}
        weight_dq: dict[str, str] = {}  # DQ output -> float weight name
        for node in model.graph.node:
            if node.op_type != "DequantizeLinear":
                continue
            src = node.input[0]
            if src in inits:  # int8 initializer -> DQ; the float original is in the float model
                name = src[: -len("_quantized")] if src.endswith("_quantized") else ""
                if name in float_inits:
                    weight_dq[node.output[0]] = name
                continue
            q = producers.get(src)
            if q is None or q.op_type != "QuantizeLinear":
                continue
            flag = self.flags.setdefault(q.input[0], f"__xslim_flag_{len(self.flags)}")
            switched = f"{node.output[0]}__switch"
            new_nodes.append(helper.make_node("Where", [flag, node.output[0], q.input[0]], [switched]))
            rename[node.output[0]] = switched
        for node in model.graph.node:
            for i, name in enumerate(node.input):
                if name in rename:
                    node.input[i] = rename[name]
        added = set()
        for node in list(model.graph.node):
            weights = [weight_dq[i] for i in node.input if i in weight_dq]
            if not weights or node.op_type == "DequantizeLinear":
                continue
            flag = self.flags.setdefault(weights[0], f"__xslim_flag_{len(self.flags)}")
            for w in weights:
                if w not in added:
                    model.graph.initializer.append(float_inits[w])
                    added.add(w)
            twin = onnx.NodeProto()
            twin.CopyFrom(node)
            twin.name = f"{node.name}__float"
            twin.input[:] = [weight_dq.get(i, i) for i in node.input]
            out = node.output[0]
            twin.output[:] = [f"{out}__f"]
            node.output[0] = f"{out}__q"
            new_nodes.extend([twin, helper.make_node("Where", [flag, f"{out}__q", f"{out}__f"], [out])])
        for out in model.graph.output:
            if out.name in rename:  # graph outputs keep their names: route through an Identity
                new_nodes.append(helper.make_node("Identity", [rename[out.name]], [f"{out.name}__final"]))
        model.graph.node.extend(new_nodes)
        for flag in self.flags.values():
            model.graph.input.append(helper.make_tensor_value_info(flag, onnx.TensorProto.BOOL, []))
        self.output_names = [f"{o.name}__final" if o.name in rename else o.name for o in model.graph.output]
        for o, name in zip(list(model.graph.output), self.output_names, strict=True):
            if name != o.name:
                model.graph.output.append(helper.make_empty_tensor_value_info(name))
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        self.session = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])

    def run(self, batches: list[dict[str, np.ndarray]], quantized: Collection[str]) -> list[np.ndarray]:
        """Outputs over ``batches`` with only the tensors in ``quantized`` quantized."""
        flags = {f: np.array(t in quantized) for t, f in self.flags.items()}
        outs = [self.session.run(self.output_names, {**b, **flags}) for b in batches]
        return [np.concatenate([o[i] for o in outs]) for i in range(len(self.output_names))]


def _noise_ratio(ref: list[np.ndarray], test: list[np.ndarray]) -> float:
    """Mean over outputs of noise power / signal power (xslim's SNR); lower is better."""
    ratios = []
    for r, t in zip(ref, test, strict=True):
        r64, t64 = r.astype(np.float64), t.astype(np.float64)
        signal = float(np.sum(r64**2)) or 1e-30
        ratios.append(float(np.sum((r64 - t64) ** 2)) / signal)
    return float(np.mean(ratios))


def _db(ratio: float) -> float:
    return math.inf if ratio <= 0 else -10.0 * math.log10(ratio)


def _node_tensors(model: onnx.ModelProto, target: Target, flagged: Collection[str]) -> dict[str, set[str]]:
    """For each candidate node, the flagged tensors that quantizing it would quantize."""
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    out = {}
    for node in model.graph.node:
        kind = target.ops.get(node.op_type)
        if kind is None or kind in ("passthrough", "maxpool", "removable_activation"):
            continue
        tensors = {t for t in (*node.input, *node.output) if t in flagged}
        for o in node.output:  # a fused Relu/Clip's output is this op's output point
            for c in consumers.get(o, []):
                if target.ops.get(c.op_type) == "removable_activation" and c.output[0] in flagged:
                    tensors.add(c.output[0])
        if tensors:
            out[node.name] = tensors
    return out


def _quantized_tensors(node_tensors: Mapping[str, set[str]], floated: Collection[str], all_flags: set[str]) -> set[str]:
    """Tensors still quantized once ``floated`` nodes are float: those some int8 node still touches."""
    owners: dict[str, set[str]] = {}
    for node, tensors in node_tensors.items():
        for t in tensors:
            owners.setdefault(t, set()).add(node)
    floated = set(floated)
    return {t for t in all_flags if t not in owners or not owners[t] <= floated}


def _take(source: BatchSource, n: int) -> Iterator[dict[str, np.ndarray]]:
    for i, batch in enumerate(source()):
        if i >= n:
            return
        yield batch


def select_float_nodes(
    float_model: onnx.ModelProto,
    qmodel: onnx.ModelProto,
    target: Target,
    source: BatchSource,
    level: int,
    *,
    max_samples: int = 16,
    fixed_float: Mapping[str, str] | None = None,
) -> SensitivityResult:
    """Rank candidate ops by output error when quantized alone; keep the worst float."""
    result = SensitivityResult(level=level, float_nodes=dict(fixed_float or {}))
    batches = list(_take(source, max_samples))
    sw = SwitchableModel(qmodel, float_model)
    all_flags = set(sw.flags)
    node_tensors = _node_tensors(float_model, target, all_flags)
    for name in result.float_nodes:
        node_tensors.pop(name, None)
    reference = sw.run(batches, ())
    isolated = {n: _noise_ratio(reference, sw.run(batches, t)) for n, t in sorted(node_tensors.items())}
    result.isolated_sqnr_db = {n: _db(r) for n, r in isolated.items()}
    ranked = sorted(isolated, key=lambda n: (-isolated[n], n))

    n_compute = sum(n.op_type in COMPUTE_OPS for n in float_model.graph.node)
    budget = max(1, int(n_compute * BUDGET_FRACTION[level]))
    fixed = set(result.float_nodes)
    curve = []
    for k in range(min(budget, len(ranked)) + 1):
        quantized = _quantized_tensors(node_tensors, fixed | set(ranked[:k]), all_flags)
        curve.append((k, _db(_noise_ratio(reference, sw.run(batches, quantized)))))
        if k >= 3 and curve[-1][1] - curve[-4][1] < MIN_GAIN_DB:
            break  # three more float ops bought almost nothing: the output stopped improving
    result.curve = curve
    best = max(s for _, s in curve)
    chosen = next(k for k, s in curve if s >= best - MIN_GAIN_DB)
    for name in ranked[:chosen]:
        result.float_nodes[name] = (
            f"level {level}: output SQNR {result.isolated_sqnr_db[name]:.1f} dB when quantized alone "
            f"(rank {ranked.index(name) + 1} of {len(ranked)})"
        )
    log.info(
        "precision_level %d: %d op(s) kept float by sensitivity (output SQNR %.2f -> %.2f dB)",
        level,
        chosen,
        curve[0][1],
        curve[chosen][1],
    )
    return result
