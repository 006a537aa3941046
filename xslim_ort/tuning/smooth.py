"""Activation smoothing: move per-channel outliers of a matmul's input into its weight.

Transformer activations have a few channels far larger than the rest (LayerNorm outputs
reach 25 where 99.99% of values lie under 7). With one int8 scale per tensor those
channels leave a handful of levels to everything else. Dividing channel ``k`` of the
input by ``s_k`` and multiplying row ``k`` of the weight by ``s_k`` computes the same
product (SmoothQuant), and is free when the input comes from an op whose per-channel
constants can absorb ``1/s`` exactly: LayerNormalization (scale and bias) or a Mul by a
constant (the last Mul of a decomposed GELU). When that op has other readers (the
residual path), it is duplicated, so they still see the original values.

``s_k = max|x_k|^a / max|w_k|^(1-a)``: the migration strength ``a`` is chosen per site
from a grid by the error of the weight ops' outputs with both sides fake-quantized as
the target will quantize them, measured on calibration activations. A site is changed
only if that error goes down, so models without such outliers are left alone.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from ..model_io import sort_nodes
from ..qparams import fake_quant_activation
from .graph import attr
from .schemes import WeightScheme

log = logging.getLogger("xslim_ort.tuning")

ALPHAS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
#: Calibration rows (tokens, pixels) kept per site for the search.
MAX_ROWS = 2048
#: Bytes of captured activations held at once; sites are captured in chunks that fit.
CAPTURE_BUDGET = 256 << 20
_RESHAPES = ("Reshape", "Flatten")


@dataclass
class Site:
    """A smoothable producer and one weight op that reads its channels."""

    producer: onnx.NodeProto
    chain: list[onnx.NodeProto]  # channel-preserving reshapes between producer and reader
    reader: onnx.NodeProto  # Gemm/MatMul reading the tensor as input A, constant weight B
    channels: int

    @property
    def tensor(self) -> str:
        return (self.chain[-1] if self.chain else self.producer).output[0]


def _last_dim(value_info: Mapping[str, onnx.ValueInfoProto], name: str) -> int | None:
    vi = value_info.get(name)
    if vi is None or not vi.type.tensor_type.HasField("shape"):
        return None
    dims = vi.type.tensor_type.shape.dim
    return dims[-1].dim_value if dims and dims[-1].HasField("dim_value") else None


def _absorbs(node: onnx.NodeProto, inits: Mapping[str, onnx.TensorProto], channels: int) -> bool:
    """Whether ``node``'s output channels can be divided by ``s`` through its constants."""
    if node.op_type == "LayerNormalization":
        return attr(node, "axis", -1) == -1 and len(node.input) >= 2 and all(i in inits for i in node.input[1:3] if i)
    if node.op_type == "Mul" and len(node.input) == 2:
        const = [i for i in node.input if i in inits]
        if len(const) != 1:
            return False
        dims = list(inits[const[0]].dims)
        return all(d == 1 for d in dims[:-1]) and (not dims or dims[-1] in (1, channels))
    return False


def reads_weight(node: onnx.NodeProto, tensor: str, inits: Mapping[str, onnx.TensorProto]) -> bool:
    """Whether ``node`` is a Gemm/MatMul computing ``tensor`` (as input A) times a constant 2-D weight."""
    if node.op_type not in ("Gemm", "MatMul") or len(node.input) < 2 or node.input[0] != tensor:
        return False
    if node.op_type == "Gemm" and attr(node, "transA", 0):
        return False
    return node.input[1] in inits and len(inits[node.input[1]].dims) == 2


def find_sites(model: onnx.ModelProto, excluded: Collection[str] = ()) -> list[Site]:
    """Producers whose output (maybe through reshapes keeping the last axis) feeds only weight matmuls."""
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    value_info = {vi.name: vi for vi in [*g.value_info, *g.input, *g.output]}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in g.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    outputs = {o.name for o in g.output}
    sites = []
    for node in g.node:
        if node.name in excluded or not node.output:
            continue
        channels = _last_dim(value_info, node.output[0])
        if not channels or channels < 2 or not _absorbs(node, inits, channels):
            continue
        chain: list[onnx.NodeProto] = []
        tensor = node.output[0]
        while True:
            nxt = [r for r in readers.get(tensor, []) if r.op_type in _RESHAPES]
            if len(nxt) != 1 or _last_dim(value_info, nxt[0].output[0]) != channels:
                break
            if chain and len(readers.get(tensor, [])) != 1:  # a reshape read elsewhere too: stop before it
                break
            chain.append(nxt[0])
            tensor = nxt[0].output[0]
        ops = [r for r in readers.get(tensor, []) if reads_weight(r, tensor, inits)]
        if not ops or tensor in outputs or len(ops) != len(readers.get(tensor, [])):
            continue
        if any(r.name in excluded for r in [*chain, *ops]):
            continue
        sites.extend(Site(node, chain, op, channels) for op in ops)  # each matmul gets its own scales
    return sites


def weight_matrix(node: onnx.NodeProto, w: np.ndarray) -> np.ndarray:
    """The weight as (input channels, outputs)."""
    return w.T if node.op_type == "Gemm" and attr(node, "transB", 0) else w


def capture(
    model: onnx.ModelProto, tensors: list[str], batches: Sequence[Mapping[str, np.ndarray]]
) -> dict[str, np.ndarray]:
    """Up to ``MAX_ROWS`` evenly spread rows of each tensor, as (rows, channels) float32."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.output[:]
    probe.graph.output.extend(helper.make_empty_tensor_value_info(t) for t in tensors)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    session = ort.InferenceSession(probe.SerializeToString(), so, providers=["CPUExecutionProvider"])
    per_batch = max(1, MAX_ROWS // max(1, len(batches)))
    rows: dict[str, list[np.ndarray]] = {t: [] for t in tensors}
    for batch in batches:
        for name, value in zip(tensors, session.run(tensors, dict(batch)), strict=True):
            flat = value.reshape(-1, value.shape[-1])
            step = max(1, len(flat) // per_batch)
            rows[name].append(np.asarray(flat[::step][:per_batch], dtype=np.float32))
    return {t: np.concatenate(r) for t, r in rows.items() if r}


def _output_error(x: np.ndarray, w: np.ndarray, ref: np.ndarray, s: np.ndarray, scheme: WeightScheme) -> float:
    """Relative error of the weight op's output with input ``x / s`` and weight ``s * w``."""
    xs = x / s
    xq = fake_quant_activation(xs, float(xs.min()), float(xs.max()))
    wq = scheme.fake_quant(w * s[:, None])
    return float(np.sum((xq @ wq - ref) ** 2)) / max(float(np.sum(ref**2)), 1e-30)


def best_scales(x: np.ndarray, w: np.ndarray, scheme: WeightScheme) -> tuple[np.ndarray | None, float, float]:
    """Per-channel ``s`` of least output error (None: smoothing does not help), with errors before and after."""
    ref = x @ w
    base = _output_error(x, w, ref, np.ones(x.shape[1], dtype=np.float32), scheme)
    xmax = np.maximum(np.abs(x).max(axis=0), 1e-5)
    wmax = np.maximum(np.abs(w).max(axis=1), 1e-5)
    best, best_err = None, base
    for a in ALPHAS:
        s = xmax**a / wmax ** (1.0 - a)
        s = (s / np.exp(np.mean(np.log(s)))).astype(np.float32)  # geometric mean 1: weights keep their scale
        err = _output_error(x, w, ref, s, scheme)
        if err < best_err:
            best, best_err = s, err
    return best, base, best_err


def smooth_model(
    model: onnx.ModelProto,
    batches: list[Mapping[str, np.ndarray]],
    weight_schemes: Mapping[str, WeightScheme],
    excluded: Collection[str] = (),
) -> tuple[onnx.ModelProto, int]:
    """A copy of ``model`` with the smoothing that lowers each site's error, and how many sites changed."""
    sites = [s for s in find_sites(model, excluded) if s.reader.input[1] in weight_schemes]
    if not sites or not batches:
        return model, 0
    out = onnx.ModelProto()
    out.CopyFrom(model)
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    per_site = MAX_ROWS * 4
    chunk = max(1, CAPTURE_BUDGET // max(per_site * max(s.channels for s in sites), 1))
    edits: list[tuple[Site, np.ndarray]] = []
    for start in range(0, len(sites), chunk):
        group = sites[start : start + chunk]
        captured = capture(model, sorted({s.tensor for s in group}), batches)
        for site in group:
            weight = site.reader.input[1]
            s, before, after = best_scales(
                captured[site.tensor], weight_matrix(site.reader, inits[weight]), weight_schemes[weight]
            )
            if s is None:
                continue
            log.info(
                "smoothing %s -> %s: matmul output error %.1f -> %.1f dB",
                site.producer.name,
                site.reader.name,
                -10 * np.log10(max(before, 1e-30)),
                -10 * np.log10(max(after, 1e-30)),
            )
            edits.append((site, s))
    _apply(out, edits, inits)
    return out, len(edits)


def _apply(model: onnx.ModelProto, edits: list[tuple[Site, np.ndarray]], inits: Mapping[str, np.ndarray]) -> None:
    """Rewrite ``model`` in place: producers absorb ``1/s`` (duplicated if read elsewhere), weights ``s``."""
    g = model.graph
    nodes = {n.name: n for n in g.node}
    readers: dict[str, int] = {}
    for node in g.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    outputs = {o.name for o in g.output}
    added = {vi.name: vi for vi in g.value_info}
    for site, s in edits:
        producer = nodes[site.producer.name]
        chain = [nodes[n.name] for n in site.chain]
        path = [producer, *chain]
        reader = nodes[site.reader.name]
        # Smoothed in place only if this matmul is the one reader down the whole path.
        shared = any(readers[n.output[0]] > 1 or n.output[0] in outputs for n in path)
        if shared:  # others read the original values: this matmul gets a smoothed twin of the path
            tag = reader.name
            g.node.extend(_twin(n, added, tag) for n in path)
            twins = list(g.node[-len(path) :])  # protobuf appends copies: edit the ones in the graph
            for a, b in itertools.pairwise(twins):
                b.input[0] = a.output[0]
            readers[path[-1].output[0]] -= 1
            reader.input[0] = twins[-1].output[0]
            for node in reversed(chain):  # an original reshape nobody reads any more goes
                if readers[node.output[0]] == 0:
                    g.node.remove(node)
                    readers[node.input[0]] -= 1
            producer = twins[0]
        for i in _absorbing_inputs(producer, inits):
            value = np.asarray(inits[producer.input[i]], dtype=np.float32).reshape(-1)
            name = f"{producer.name}_smoothed_{i}"
            absorbed = (np.broadcast_to(value, s.shape) / s).astype(np.float32)
            g.initializer.append(numpy_helper.from_array(absorbed, name))
            producer.input[i] = name
        scaled = weight_matrix(reader, weight_matrix(reader, inits[reader.input[1]]) * s[:, None])  # back to B's layout
        name = f"{reader.name}_smoothed_weight"
        g.initializer.append(numpy_helper.from_array(scaled.astype(np.float32), name))
        reader.input[1] = name
    known = {vi.name for vi in g.value_info}
    g.value_info.extend(vi for name, vi in added.items() if name not in known)
    used = {i for n in g.node for i in n.input}
    live = [i for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(live)
    sort_nodes(g)


def _twin(node: onnx.NodeProto, value_info: dict[str, onnx.ValueInfoProto], tag: str) -> onnx.NodeProto:
    """A copy of ``node`` for the matmul ``tag``, first output renamed; that output's type is recorded too."""
    twin = onnx.NodeProto()
    twin.CopyFrom(node)
    twin.name = f"{node.name}_smoothed_for_{tag}"
    del twin.output[1:]  # LayerNormalization's optional mean/inv-std outputs stay with the original
    twin.output[0] = f"{node.output[0]}_smoothed_for_{tag}"
    if node.output[0] in value_info:
        vi = onnx.ValueInfoProto()
        vi.CopyFrom(value_info[node.output[0]])
        vi.name = twin.output[0]
        value_info[twin.output[0]] = vi
    return twin


def _absorbing_inputs(node: onnx.NodeProto, inits: Mapping[str, np.ndarray]) -> list[int]:
    if node.op_type == "LayerNormalization":
        return [i for i in (1, 2) if len(node.input) > i and node.input[i]]
    return [i for i, name in enumerate(node.input) if name in inits]
