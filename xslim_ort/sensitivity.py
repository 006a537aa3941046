"""Precision levels 1 and 2: keep in float the tensors whose quantization hurts the output most.

Sensitivity is measured, not guessed. The fully quantized model is rewritten once into a
*switchable* model: after every DequantizeLinear sits ``Where(flag, dequantized, float)``
with ``flag`` a boolean graph input, so any subset of tensors can be quantized in one ORT
session without re-quantizing or rebuilding. Each candidate (a tensor, with the tensors
that share its scale, or a weight) is quantized alone to rank them; then the worst are
kept float greedily, best gain per compute op turned float first, while each buys at
least ``MIN_GAIN_DB`` of output SQNR and within a budget of compute ops (a fifth of them
at level 1, a third at level 2, on top of level 2's fixed float set).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from itertools import islice

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from .calibration.batches import BatchSource
from .targets import Target

log = logging.getLogger("xslim_ort")

COMPUTE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
# Keeping k more ops float must buy at least this much output SQNR to be worth it.
MIN_GAIN_DB = 0.05
# Candidates measured per greedy step, the worst (quantized alone) first.
SHORTLIST = 8
BUDGET_FRACTION = {1: 0.2, 2: 1.0 / 3.0}


@dataclass
class SensitivityResult:
    """What level 1/2 kept float, and why (for the log and the analysis report)."""

    level: int
    float_nodes: dict[str, str] = field(default_factory=dict)  # node name -> reason (level 2's fixed set)
    float_tensors: dict[str, str] = field(default_factory=dict)  # tensor or weight -> reason
    isolated_sqnr_db: dict[str, float] = field(default_factory=dict)  # tensor group -> output SQNR, alone
    curve: list[tuple[int, float]] = field(default_factory=list)  # (groups kept float, output SQNR)


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


def tensor_groups(model: onnx.ModelProto, target: Target, flagged: Collection[str]) -> dict[str, list[str]]:
    """Flagged tensors that must switch together, keyed by the group's first tensor.

    A pass-through op's output reuses its input's scale and a fused Relu/Clip's output is
    its producer's quantization point: keeping one float without the other is no choice a
    QDQ model can express, so they form one candidate.
    """
    parent: dict[str, str] = {t: t for t in flagged}

    def root(t: str) -> str:
        while parent[t] != t:
            parent[t] = parent[parent[t]]
            t = parent[t]
        return t

    for node in model.graph.node:
        kind = target.ops.get(node.op_type)
        if kind in ("passthrough", "maxpool", "removable_activation") and node.input and node.output:
            a, b = node.input[0], node.output[0]
            if a in parent and b in parent:
                parent[root(b)] = root(a)
    groups: dict[str, list[str]] = {}
    for t in sorted(flagged):
        groups.setdefault(root(t), []).append(t)
    return groups


def _compute_readers(model: onnx.ModelProto) -> dict[str, set[str]]:
    """Tensor -> the compute ops (Conv, Gemm, MatMul...) reading it as input or weight."""
    readers: dict[str, set[str]] = {}
    for node in model.graph.node:
        if node.op_type in COMPUTE_OPS:
            for name in node.input:
                readers.setdefault(name, set()).add(node.name)
    return readers


def select_float_tensors(
    float_model: onnx.ModelProto,
    qmodel: onnx.ModelProto,
    target: Target,
    source: BatchSource,
    level: int,
    *,
    max_samples: int = 8,
    rank_samples: int = 4,
    fixed_float: Mapping[str, str] | None = None,
) -> SensitivityResult:
    """Rank tensors by output error when quantized alone; keep the worst float while it pays.

    Greedy: each step measures the ``SHORTLIST`` worst affordable candidates on top of
    what is already float and keeps the one with the best gain per compute op it turns
    float (a residual sum or a matmul's output costs none), as long as it buys at least
    ``MIN_GAIN_DB`` of output SQNR. Measuring on top of the current choice matters:
    errors of neighbouring tensors overlap, and going down the isolated ranking spent
    the budget on tensors whose gain had gone.
    """
    result = SensitivityResult(level=level, float_nodes=dict(fixed_float or {}))
    batches = list(islice(source(), max_samples))
    sw = SwitchableModel(qmodel, float_model)
    all_flags = set(sw.flags)
    groups = tensor_groups(float_model, target, all_flags)
    reference = sw.run(batches, ())
    rank_batches = batches[:rank_samples]
    rank_ref = sw.run(rank_batches, ())  # outputs need not have one row per batch
    isolated = {g: _noise_ratio(rank_ref, sw.run(rank_batches, ts)) for g, ts in groups.items()}
    result.isolated_sqnr_db = {g: _db(r) for g, r in isolated.items()}
    ranked = sorted(isolated, key=lambda g: (-isolated[g], g))
    compute_readers = _compute_readers(float_model)
    costs = {g: set().union(*(compute_readers.get(t, set()) for t in ts)) for g, ts in groups.items()}
    n_compute = sum(n.op_type in COMPUTE_OPS for n in float_model.graph.node)
    budget = max(1, int(n_compute * BUDGET_FRACTION[level]))

    floated: list[str] = []
    spent: set[str] = set()

    def sqnr_with(extra: str) -> float:
        return _db(
            _noise_ratio(reference, sw.run(batches, all_flags.difference(*(groups[f] for f in (*floated, extra)))))
        )

    def keep(g: str, sqnr: float) -> None:
        floated.append(g)
        spent.update(costs[g])
        result.curve.append((len(floated), sqnr))

    result.curve = [(0, _db(_noise_ratio(reference, sw.run(batches, all_flags))))]
    while True:
        shortlist = [g for g in ranked if g not in floated and len(costs[g] | spent) <= budget][:SHORTLIST]
        best: tuple[float, str, float] | None = None
        for g in shortlist:
            sqnr = sqnr_with(g)
            gain = sqnr - result.curve[-1][1]
            per_op = gain / (len(costs[g] - spent) + 0.5)
            if gain >= MIN_GAIN_DB and (best is None or per_op > best[0]):
                best = (per_op, g, sqnr)
        if best is None:
            break
        keep(best[1], best[2])
    for rank, g in enumerate(ranked, start=1):
        if g in floated:
            for t in groups[g]:
                result.float_tensors[t] = (
                    f"level {level}: output SQNR {result.isolated_sqnr_db[g]:.1f} dB when quantized alone "
                    f"(rank {rank} of {len(ranked)})"
                )
    log.info(
        "precision_level %d: %d tensor group(s) kept float by sensitivity, %d of %d compute ops touched "
        "(output SQNR %.2f -> %.2f dB)",
        level,
        len(floated),
        len(spent),
        n_compute,
        result.curve[0][1],
        result.curve[-1][1],
    )
    return result


def _restore_fused_activations(
    nodes: list[onnx.NodeProto], float_model: onnx.ModelProto, wanted: set[str], qmodel: onnx.ModelProto
) -> list[onnx.NodeProto]:
    """A Relu/Clip fused into its producer's Q/DQ must come back once that tensor is float."""
    float_producers = {o: n for n in float_model.graph.node for o in n.output}
    float_inits = {i.name: i for i in float_model.graph.initializer}
    have = {i.name for i in qmodel.graph.initializer}
    out = []
    for node in nodes:
        out.append(node)
        if not node.output or node.output[0] not in wanted:
            continue
        fp = float_producers.get(node.output[0])
        if fp is None or fp.op_type not in ("Relu", "Clip") or node.op_type == fp.op_type:
            continue
        act = onnx.NodeProto()
        act.CopyFrom(fp)
        pre = f"{node.output[0]}__preact"
        act.input[0] = pre
        node.output[0] = pre
        for extra in act.input[1:]:
            if extra in float_inits and extra not in have:
                qmodel.graph.initializer.append(float_inits[extra])
                have.add(extra)
        out.append(act)
    return out


def dequantize_tensors(qmodel: onnx.ModelProto, float_model: onnx.ModelProto, tensors: Collection[str]) -> None:
    """Remove the Q/DQ of activation ``tensors`` and restore float weights, in place."""
    wanted = set(tensors)
    float_inits = {i.name: i for i in float_model.graph.initializer}
    producers = {o: n for n in qmodel.graph.node for o in n.output}
    inits = {i.name for i in qmodel.graph.initializer}
    rewire: dict[str, str] = {}
    drop: set[int] = set()
    added: set[str] = set()
    for node in qmodel.graph.node:
        if node.op_type != "DequantizeLinear":
            continue
        src = node.input[0]
        if src in inits:
            name = src[: -len("_quantized")] if src.endswith("_quantized") else ""
            if name in wanted and name in float_inits:
                if name not in added:
                    qmodel.graph.initializer.append(float_inits[name])
                    added.add(name)
                rewire[node.output[0]] = name
                drop.add(id(node))
            continue
        q = producers.get(src)
        if q is not None and q.op_type == "QuantizeLinear" and q.input[0] in wanted:
            rewire[node.output[0]] = q.input[0]
            drop.update((id(node), id(q)))
    outputs = {o.name for o in qmodel.graph.output}
    keep = []
    for node in qmodel.graph.node:
        if id(node) in drop:
            if node.op_type == "DequantizeLinear" and node.output[0] in outputs:
                keep.append(helper.make_node("Identity", [rewire[node.output[0]]], [node.output[0]], name=node.name))
            continue
        for i, name in enumerate(node.input):
            if name in rewire:
                node.input[i] = rewire[name]
        keep.append(node)
    del qmodel.graph.node[:]
    qmodel.graph.node.extend(_restore_fused_activations(keep, float_model, wanted, qmodel))
    used = {i for n in qmodel.graph.node for i in n.input}
    live = [i for i in qmodel.graph.initializer if i.name in used]
    del qmodel.graph.initializer[:]
    qmodel.graph.initializer.extend(live)
