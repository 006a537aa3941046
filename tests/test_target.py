"""Issue 5: the target descriptor honoured op by op, the format checker, regions, truncation,
ignore lists in every mode, graph patterns, the ort-cpu target, and the zoo at level 0."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import xslim_ort
from xslim_ort.check import CheckReport, check_model
from xslim_ort.cli import main
from xslim_ort.config import load_config
from xslim_ort.errors import ConfigError
from xslim_ort.qparams import cosine, sqnr_db
from xslim_ort.quantizer import TargetQuantizer, activations_to_calibrate, clamp_ranges
from xslim_ort.regions import excluded_nodes, tensor_methods
from xslim_ort.targets import load_target, parse_target
from xslim_ort.targets.target import HANDLER_KINDS

from helpers import run_model, tiny_cnn

SPACEMIT = load_target("spacemit")
ORT_CPU = load_target("ort-cpu")


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """The CLI sets the xslim_ort logger's level and stops it propagating; later tests read caplog."""
    logger = logging.getLogger("xslim_ort")
    state = (logger.level, logger.propagate, list(logger.handlers))
    yield
    logger.setLevel(state[0])
    logger.propagate = state[1]
    logger.handlers[:] = state[2]


# --------------------------------------------------------------------------- building and reading models


def make_model(
    nodes: list[onnx.NodeProto],
    inputs: dict[str, list[int]],
    outputs: dict[str, list[int] | None],
    weights: dict[str, np.ndarray],
    opset: int = 17,
) -> onnx.ModelProto:
    """A model from nodes; every weight becomes an initializer (float ones as float32)."""
    graph = helper.make_graph(
        nodes,
        "test",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs.items()],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in outputs.items()],
        [numpy_helper.from_array(_as_init(v), k) for k, v in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _as_init(value: np.ndarray | float) -> np.ndarray:
    arr = np.asarray(value)
    return arr.astype(np.float32) if arr.dtype.kind == "f" else arr


def rand(seed: int, *shape: int, scale: float = 0.3) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


def samples(model: onnx.ModelProto, n: int, seed: int) -> list[dict[str, np.ndarray]]:
    """n random standard-normal feeds for the model's inputs."""
    rng = np.random.default_rng(seed)
    shapes = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    return [{k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()} for _ in range(n)]


def write_config(tmp: Path, model: onnx.ModelProto, n: int = 6, **qp) -> Path:
    """The model, n random npy samples per input and a config calibrating on them (minmax)."""
    data = tmp / "data"
    data.mkdir(parents=True, exist_ok=True)
    onnx.save(model, tmp / "model.onnx")
    entries = []
    feeds = samples(model, n, seed=1)
    for inp in model.graph.input:
        lines = []
        for k, feed in enumerate(feeds):
            np.save(data / f"{inp.name}_{k}.npy", feed[inp.name])
            lines.append(f"{inp.name}_{k}.npy")
        (data / f"{inp.name}.txt").write_text("\n".join(lines) + "\n")
        entries.append({"file_type": "npy", "data_list_path": str(data / f"{inp.name}.txt")})
    cfg = {
        "model_parameters": {"onnx_model": str(tmp / "model.onnx")},
        "calibration_parameters": {"calibration_type": "minmax", "input_parametres": entries},
        "quantization_parameters": {"analysis_enable": False, "finetune_level": 0, **qp},
    }
    (tmp / "cfg.json").write_text(json.dumps(cfg))
    return tmp / "cfg.json"


def quantize(tmp: Path, model: onnx.ModelProto, n: int = 6, **qp) -> onnx.ModelProto:
    """Quantize through the public API (see ``write_config``)."""
    return xslim_ort.quantize_onnx_model(write_config(tmp, model, n, **qp), output=tmp / "out.onnx")


def check(q: onnx.ModelProto, target=SPACEMIT, warnings: list[str] | None = None) -> CheckReport:
    """The checker finds no error (and exactly ``warnings``, default none) in a model we quantized."""
    rep = check_model(q, target)
    assert rep.errors == []
    assert rep.warnings == (warnings or [])
    return rep


def graph_maps(q: onnx.ModelProto) -> tuple[dict, dict, dict]:
    producer = {o: n for n in q.graph.node for o in n.output}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for n in q.graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    inits = {i.name: numpy_helper.to_array(i) for i in q.graph.initializer}
    return producer, readers, inits


def int8_nodes(q: onnx.ModelProto) -> tuple[set[str], set[str]]:
    """(int8, float) node names. An int8 node is a QDQ unit a runtime fuses into an int8 kernel:
    every activation and weight input through a DequantizeLinear, every output read by
    QuantizeLinear nodes only. Anything else computes in float."""
    producer, readers, inits = graph_maps(q)
    int8: set[str] = set()
    flt: set[str] = set()
    for n in q.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear", "Constant"):
            continue
        weights = [n.input[1]] if n.op_type in ("Conv", "ConvTranspose", "Gemm") else []
        acts = [
            i for i in n.input if i and i not in inits and not (i in producer and producer[i].op_type == "Constant")
        ]
        ins = [*acts, *weights]
        dq_in = all(producer.get(i) is not None and producer[i].op_type == "DequantizeLinear" for i in ins)
        q_out = all(readers.get(o) and all(r.op_type == "QuantizeLinear" for r in readers[o]) for o in n.output)
        (int8 if dq_in and q_out else flt).add(n.name)
    return int8, flt


def direct(model: onnx.ModelProto, ranges: dict, target=SPACEMIT) -> onnx.ModelProto:
    """TargetQuantizer on given ranges, after the shape inference the pipeline does."""
    return TargetQuantizer(onnx.shape_inference.infer_shapes(model), target, ranges).quantize_model()


def float_ranges(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> dict[str, tuple[float, float]]:
    """Min and max of every float tensor on one input: exact ranges for direct quantization."""
    probe = onnx.shape_inference.infer_shapes(model)
    names = [vi.name for vi in probe.graph.value_info if vi.type.tensor_type.elem_type == TensorProto.FLOAT]
    probe.graph.output.extend(helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names)
    outs = [o.name for o in probe.graph.output]
    values = dict(zip(outs, run_model(probe, feed), strict=True)) | feed
    return {k: (float(v.min()), float(v.max())) for k, v in values.items()}


def planned(model: onnx.ModelProto, target=SPACEMIT) -> list[str]:
    return activations_to_calibrate(onnx.shape_inference.infer_shapes(model), target)


def qparams_of(q: onnx.ModelProto, tensor: str) -> tuple[float, int]:
    """Scale and zero point of the QuantizeLinear reading ``tensor``."""
    _, readers, inits = graph_maps(q)
    node = next(r for r in readers[tensor] if r.op_type == "QuantizeLinear")
    return float(inits[node.input[1]]), int(inits[node.input[2]])


def weight_dq(q: onnx.ModelProto, node_name: str, index: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(int weight, scale, zero point, axis) of the DequantizeLinear feeding a node's weight."""
    producer, _, inits = graph_maps(q)
    node = next(n for n in q.graph.node if n.name == node_name)
    dq = producer[node.input[index]]
    assert dq.op_type == "DequantizeLinear"
    axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
    return inits[dq.input[0]], inits[dq.input[1]], inits[dq.input[2]], axis


# --------------------------------------------------------------------------- the descriptor, op by op


def mixed_model() -> onnx.ModelProto:
    """Conv -> Clip -> MaxPool -> ConvTranspose -> Sigmoid -> Reshape -> MatMul -> Relu -> HardSigmoid
    -> Reshape -> Gemm: one of each weight scheme, fusion, shared scale and clamp."""
    nodes = [
        helper.make_node("Conv", ["x", "w_conv", "b_conv"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Clip", ["c", "zero", "six"], ["r"], name="clip"),
        helper.make_node("MaxPool", ["r"], ["p"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("ConvTranspose", ["p", "w_deconv", "b_deconv"], ["d"], name="deconv", strides=[2, 2]),
        helper.make_node("Sigmoid", ["d"], ["s"], name="sig"),
        helper.make_node("Reshape", ["s", "shape3"], ["rs"], name="reshape"),
        helper.make_node("MatMul", ["rs", "w_mm"], ["m"], name="mm"),
        helper.make_node("Relu", ["m"], ["mr"], name="relu"),
        helper.make_node("HardSigmoid", ["mr"], ["h"], name="hsig", alpha=0.2, beta=0.5),
        helper.make_node("Reshape", ["h", "shape2"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "w_fc", "b_fc"], ["y"], name="fc", transB=1),
    ]
    weights = {
        "w_conv": rand(1, 8, 4, 3, 3),
        "b_conv": rand(2, 8, scale=0.1),
        "zero": np.array(0.0),
        "six": np.array(6.0),
        "w_deconv": rand(3, 8, 4, 2, 2),
        "b_deconv": rand(4, 4, scale=0.1),
        "w_mm": rand(5, 64, 16),
        "w_fc": rand(6, 10, 64),
        "b_fc": rand(7, 10, scale=0.1),
        "shape3": np.array([1, 4, 64]),
        "shape2": np.array([1, 64]),
    }
    return make_model(nodes, {"x": [1, 4, 8, 8]}, {"y": [1, 10]}, weights)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    model = mixed_model()
    return model, quantize(tmp_path_factory.mktemp("mixed"), model)


def test_weight_schemes_follow_the_descriptor(mixed):
    _, q = mixed
    w, scale, zp, axis = weight_dq(q, "conv")
    assert w.dtype == np.int8 and scale.shape == (8,) and axis == 0 and np.all(zp == 0)
    assert np.array_equal(np.abs(w).reshape(8, -1).max(axis=1), np.full(8, 127))  # per-channel, symmetric
    for node, index in (("deconv", 1), ("mm", 1), ("fc", 1)):
        w, scale, zp, _ = weight_dq(q, node, index)
        assert w.dtype == np.int8 and scale.size == 1 and int(zp) == 0, node
        assert np.log2(float(scale)) == np.round(np.log2(float(scale))), node  # power of two
        assert w.min() >= -127 and 64 <= np.abs(w).max() <= 127, node  # rounded up, at most one bit lost
    check(q)


def test_activations_int8_asymmetric_biases_float(mixed):
    _, q = mixed
    _, _, inits = graph_maps(q)
    qnodes = [n for n in q.graph.node if n.op_type == "QuantizeLinear"]
    assert qnodes and all(inits[n.input[2]].dtype == np.int8 and inits[n.input[1]].size == 1 for n in qnodes)
    assert any(int(inits[n.input[2]]) != 0 for n in qnodes)  # asymmetric
    biases = {n.name: n.input[2] for n in q.graph.node if n.op_type in ("Conv", "ConvTranspose", "Gemm")}
    assert {k: inits[v].dtype for k, v in biases.items()} == {k: np.float32 for k in ("conv", "deconv", "fc")}


def test_fusions_drop_relu_and_clip_and_passthrough_shares_scale(mixed):
    _, q = mixed
    ops = [n.op_type for n in q.graph.node if n.op_type not in ("QuantizeLinear", "DequantizeLinear")]
    assert ops == ["Conv", "MaxPool", "ConvTranspose", "Sigmoid", "Reshape", "MatMul", "HardSigmoid", "Reshape", "Gemm"]
    assert not [n for n in q.graph.node if n.op_type == "Constant"]  # the Clip's bounds went with it
    # the Conv's single point is the Clip's output: [0, 6] at most, zero point at the bottom
    scale, zp = qparams_of(q, "r")
    assert zp == -128 and 0 < scale <= 6 / 255 + 1e-9
    for node_name, src in (("pool", "r"), ("reshape", "s"), ("flat", "h")):
        node = next(n for n in q.graph.node if n.name == node_name)
        assert qparams_of(q, node.output[0]) == qparams_of(q, src), node_name


def test_int32_bias_option(tmp_path):
    model = mixed_model()
    q = quantize(tmp_path, model, bias_mode="int32")
    producer, _, inits = graph_maps(q)
    for name in ("conv", "deconv", "fc"):
        node = next(n for n in q.graph.node if n.name == name)
        bias_dq, in_dq = producer[node.input[2]], producer[node.input[0]]
        _, w_scale, _, _ = weight_dq(q, name)
        assert inits[bias_dq.input[0]].dtype == np.int32, name
        assert np.allclose(inits[bias_dq.input[1]], inits[in_dq.input[1]] * w_scale, rtol=1e-6), name
    rep = check_model(q, SPACEMIT)
    assert rep.errors == [
        f"{op} '{name}' bias: the target keeps biases float32, found a quantized bias"
        for op, name in (("Conv", "conv"), ("ConvTranspose", "deconv"), ("Gemm", "fc"))
    ]
    assert check_model(q, parse_target({**_descriptor("spacemit"), "bias": "int32"})).errors == []


def test_int32_bias_never_overflows(tmp_path):
    """A near-dead channel (weights ~1e-9, bias 1) needs a coarser weight scale, not a clipped bias."""
    w = rand(1, 2, 3, 1, 1)
    w[1] = 1e-9
    model = make_model(
        [helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv")],
        {"x": [1, 3, 4, 4]},
        {"y": [1, 2, 4, 4]},
        {"w": w, "b": np.array([0.5, 1.0])},
    )
    q = quantize(tmp_path, model, target="ort-cpu")
    check(q, ORT_CPU)
    producer, _, inits = graph_maps(q)
    conv = next(n for n in q.graph.node if n.op_type == "Conv")
    bias_dq = producer[conv.input[2]]
    dequantized = inits[bias_dq.input[0]].astype(np.float64) * inits[bias_dq.input[1]]
    assert np.allclose(dequantized, [0.5, 1.0], atol=1e-4)  # clipped to int32, channel 1 read 0.000385
    feed = samples(model, 1, seed=9)[0]
    assert cosine(run_model(model, feed)[0], run_model(q, feed)[0]) > 0.999


def _descriptor(name: str) -> dict:
    from importlib import resources

    return json.loads(resources.files("xslim_ort.targets").joinpath(name, "descriptor.json").read_text())


def test_clamps_sigmoid_and_hardsigmoid_inputs():
    ranges = {"d": (-30.0, 25.0), "mr": (0.0, 9.0), "x": (-1.0, 1.0)}
    out = clamp_ranges(mixed_model(), SPACEMIT, ranges)
    assert out == {"d": (-10.0, 10.0), "mr": (0.0, pytest.approx(2.5)), "x": (-1.0, 1.0)}  # HardSigmoid(0.2, 0.5)


def test_clamp_skips_tensors_other_ops_read():
    """x * HardSigmoid(x) (hard swish): the Mul needs all of x, so x keeps its range."""
    nodes = [
        helper.make_node("HardSigmoid", ["x"], ["h"], name="hs", alpha=1 / 6, beta=0.5),
        helper.make_node("Mul", ["x", "h"], ["y"], name="mul"),
        helper.make_node("Sigmoid", ["y"], ["s"], name="sig"),
    ]
    model = make_model(nodes, {"x": [1, 4]}, {"s": [1, 4], "y": [1, 4]}, {})
    assert clamp_ranges(model, SPACEMIT, {"x": (-8.0, 8.0), "y": (-20.0, 40.0)}) == {
        "x": (-8.0, 8.0),
        "y": (-20.0, 40.0),  # a graph output too
    }


def test_clamped_range_reaches_the_quantizer():
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
        helper.make_node("HardSigmoid", ["c"], ["h"], name="hs", alpha=1 / 6, beta=0.5),
    ]
    model = make_model(nodes, {"x": [1, 2, 3, 3]}, {"h": [1, 2, 3, 3]}, {"w": rand(1, 2, 2, 1, 1)})
    q = direct(model, {"x": (-1, 1), "c": (-9, 12), "h": (0, 1)})
    assert qparams_of(q, "c") == (float(np.float32(6 / 255)), 0)  # HardSigmoid(1/6, 0.5): linear on [-3, 3]
    check(q)


@pytest.mark.parametrize(
    ("bounds", "kept"),
    [((0.0, 6.0), False), ((-1.0, 1.0), False), ((0.5, 6.0), True), ((-3.0, -1.0), True)],
)
def test_clip_is_dropped_only_where_the_range_clamps_like_it(bounds, kept):
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
        helper.make_node("Clip", ["c", "lo", "hi"], ["r"], name="clip"),
        helper.make_node("Sigmoid", ["r"], ["y"], name="sig"),
    ]
    weights = {"w": rand(1, 2, 2, 1, 1), "lo": np.array(bounds[0]), "hi": np.array(bounds[1])}
    model = make_model(nodes, {"x": [1, 2, 3, 3]}, {"y": [1, 2, 3, 3]}, weights)
    assert planned(model) == ["x", "r", "y"]  # one point for the pair
    x = samples(model, 1, seed=3)[0]
    q = direct(model, float_ranges(model, x))
    ops = [n.op_type for n in q.graph.node if n.op_type not in ("QuantizeLinear", "DequantizeLinear")]
    assert ops == (["Conv", "Clip", "Sigmoid"] if kept else ["Conv", "Sigmoid"])
    if kept:  # Conv -> Clip -> Q: no quantization between the two
        producer, _, _ = graph_maps(q)
        assert producer[next(n for n in q.graph.node if n.op_type == "Clip").input[0]].op_type == "Conv"
    check(q)
    assert cosine(run_model(model, x)[0], run_model(q, x)[0]) > 0.999


def test_fusion_without_dropping_keeps_the_activation_behind_one_point():
    data = _descriptor("spacemit")
    data["fusions"] = [{"pattern": ["Conv", "Relu"], "drop_activation": False}]
    target = parse_target(data)
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
        helper.make_node("Relu", ["c"], ["y"], name="relu"),
    ]
    model = make_model(nodes, {"x": [1, 2, 3, 3]}, {"y": [1, 2, 3, 3]}, {"w": rand(1, 2, 2, 1, 1)})
    assert planned(model, target) == ["x", "y"]
    q = direct(model, {"x": (-1, 1), "y": (0, 2)}, target)
    producer, readers, _ = graph_maps(q)
    assert producer["c"].op_type == "Conv" and [r.op_type for r in readers["c"]] == ["Relu"]
    relu = next(n for n in q.graph.node if n.op_type == "Relu")
    assert [r.op_type for r in readers[relu.output[0]]] == ["QuantizeLinear"]
    check(q, target)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"fusions": [{"pattern": ["Conv"]}]}, "fusions[0].pattern: give two op types, [producer, activation]"),
        (
            {"fusions": [{"pattern": ["Conv", "Sigmoid"]}]},
            "fusions[0].pattern: Sigmoid must be an op with handler 'removable_activation'",
        ),
        ({"fusions": [{"pattern": ["Conv", "Relu"], "share": "input"}]}, "fusions[0]: unknown key(s): share"),
        ({"clamps": {"Sigmoid": {"input": [10, -10]}}}, "clamps.Sigmoid.input: low 10 must be below high -10"),
        ({"clamps": {"Sigmoid": {"input": "linear_region"}}}, "clamps.Sigmoid.input must be [low, high]"),
        (
            {"ops": {"Conv": "convolution"}},
            f"ops.Conv: unknown handler 'convolution'; use one of {', '.join(HANDLER_KINDS)}",
        ),
    ],
)
def test_descriptor_mistakes_name_the_field(change, message):
    with pytest.raises(ConfigError) as exc:
        parse_target({**_descriptor("spacemit"), **change}, "my.json")
    assert exc.value.message == f"my.json: {message}"


def test_target_selected_by_config_and_cli(tmp_path):
    def activation_dtypes(q: onnx.ModelProto) -> set[str]:
        _, _, inits = graph_maps(q)
        return {str(inits[n.input[2]].dtype) for n in q.graph.node if n.op_type == "QuantizeLinear"}

    cfg = write_config(tmp_path, tiny_cnn())
    assert main(["-q", "quantize", "-c", str(cfg), "-o", str(tmp_path / "a.onnx")]) == 0
    assert main(["-q", "quantize", "-c", str(cfg), "-o", str(tmp_path / "b.onnx"), "--target", "ort-cpu"]) == 0
    q_default, q_cli = onnx.load(tmp_path / "a.onnx"), onnx.load(tmp_path / "b.onnx")
    q_config = quantize(tmp_path, tiny_cnn(), target="ort-cpu")
    assert activation_dtypes(q_default) == {"int8"}
    assert activation_dtypes(q_cli) == activation_dtypes(q_config) == {"uint8"}
    check(q_default)
    check(q_cli, ORT_CPU)
    assert q_cli.SerializeToString() == q_config.SerializeToString()


# --------------------------------------------------------------------------- the format checker

TINY_RANGES = {
    "input": (-3.0, 3.0),
    "r1": (0.0, 2.0),
    "r2": (0.0, 1.5),
    "c3": (-2.0, 2.0),
    "a3": (-2.5, 3.0),
    "gap": (-1.0, 1.0),
    "logits": (-4.0, 4.0),
}


@pytest.fixture(scope="module")
def tiny_q() -> onnx.ModelProto:
    q = direct(tiny_cnn(), TINY_RANGES)
    check(q)
    return q


def edited(q: onnx.ModelProto, name: str, change) -> onnx.ModelProto:
    """A copy of ``q`` with initializer ``name`` replaced by ``change(array)``."""
    out = onnx.ModelProto()
    out.CopyFrom(q)
    init = next(i for i in out.graph.initializer if i.name == name)
    init.CopyFrom(numpy_helper.from_array(change(numpy_helper.to_array(init).copy()), name))
    return out


def _set_axis(q: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(q)
    dq = next(n for n in out.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == "w1_quantized")
    next(a for a in dq.attribute if a.name == "axis").i = 1
    return out


def _unshare_flatten(q: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(q)
    scale = next(numpy_helper.to_array(i) for i in out.graph.initializer if i.name == "gap_scale")
    out.graph.initializer.append(numpy_helper.from_array(scale * np.float32(2), "flat_scale"))
    for node in out.graph.node:
        if node.name in ("flat_QuantizeLinear", "flat_DequantizeLinear"):
            node.input[1] = "flat_scale"
    return out


_WRONG_AXIS = "Conv 'conv1' weight 'w1_quantized': expected per-channel scales on axis 0 (8 channels), got 8 on axis 1"


def _minus_128(w: np.ndarray) -> np.ndarray:
    w.flat[5] = -128
    return w


@pytest.mark.parametrize(
    ("broken", "errors"),
    [
        (_set_axis, [_WRONG_AXIS]),
        (
            lambda q: edited(q, "wfc_scale", lambda s: s * np.float32(1.5)),
            ["Gemm 'fc' weight 'wfc_quantized': scale 0.0117188 is not a power of two"],
        ),
        (
            lambda q: edited(q, "w3_quantized", _minus_128),
            ["Conv 'conv3' weight 'w3_quantized': holds -128; symmetric int8 weights use [-127, 127]"],
        ),
        (
            lambda q: edited(q, "w2_zero_point", lambda z: z + np.int8(1)),
            ["Conv 'conv2_dw' weight 'w2_quantized': symmetric weights need zero points of 0"],
        ),
        (
            _unshare_flatten,
            [
                "Flatten 'flatten': output 'flat' is quantized with scale 0.0156863, its input with 0.00784314; "
                "the target shares one scale"
            ],
        ),
        (
            lambda q: edited(q, "a3_scale", lambda s: np.float32(0)),
            ["QuantizeLinear 'a3_QuantizeLinear' of 'a3': scale 0.0 is not a positive finite number"],
        ),
    ],
    ids=["wrong-axis", "non-pow2", "minus-128", "weight-zero-point", "unshared-passthrough", "zero-scale"],
)
def test_check_names_each_violation(tiny_q, broken, errors):
    assert check_model(broken(tiny_q), SPACEMIT).errors == errors


def test_check_uint8_activations_and_int32_bias_under_spacemit(tiny_q):
    q = direct(tiny_cnn(), TINY_RANGES, ORT_CPU)
    check(q, ORT_CPU)
    quantizers = {n.name: n.input[0] for n in q.graph.node if n.op_type == "QuantizeLinear"}
    assert len(quantizers) == 8
    errors = check_model(q, SPACEMIT).errors
    assert sorted(errors) == sorted(
        [f"QuantizeLinear '{n}' of '{t}': uint8 activations; the target wants int8" for n, t in quantizers.items()]
        + [
            f"{op} '{name}' bias: the target keeps biases float32, found a quantized bias"
            for op, name in (("Conv", "conv1"), ("Conv", "conv2_dw"), ("Conv", "conv3"), ("Gemm", "fc"))
        ]
        + ["Gemm 'fc' weight 'wfc_quantized': scale 0.0070091 is not a power of two"]  # ort-cpu: no pow2 rule
    )
    assert sorted(check_model(tiny_q, ORT_CPU).errors) == sorted(
        [f"QuantizeLinear '{n}' of '{t}': int8 activations; the target wants uint8" for n, t in quantizers.items()]
        + [
            f"{op} '{name}' bias: the target wants an int32 bias behind a DequantizeLinear"
            for op, name in (("Conv", "conv1"), ("Conv", "conv2_dw"), ("Conv", "conv3"), ("Gemm", "fc"))
        ]
    )


def test_check_warns_of_requantization_with_equal_parameters():
    """input -> Q -> DQ -> Q (same scale, equal zero point under another name) -> DQ -> Relu."""
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"], name="q1"),
        helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"], name="dq1"),
        helper.make_node("QuantizeLinear", ["xd", "s", "z"], ["xq2"], name="q2"),
        helper.make_node("DequantizeLinear", ["xq2", "s", "z2"], ["xd2"], name="dq2"),
        helper.make_node("Relu", ["xd2"], ["y"], name="relu"),
    ]
    model = make_model(
        nodes, {"x": [1, 4]}, {"y": [1, 4]}, {"s": np.array(0.1), "z": np.array(3, np.int8), "z2": np.array(3, np.int8)}
    )
    rep = check_model(model, SPACEMIT)
    assert rep.errors == []
    assert rep.warnings == ["DequantizeLinear 'dq1' -> QuantizeLinear 'q2': requantizes with equal parameters"]


def test_check_warns_of_float_islands(tiny_q):
    """GlobalAveragePool -> Flatten without the Q/DQ pair between them: both compute in float."""
    q = onnx.ModelProto()
    q.CopyFrom(tiny_q)
    flatten = next(n for n in q.graph.node if n.name == "flatten")
    flatten.input[0] = "gap"
    rep = check_model(q, SPACEMIT)
    assert rep.errors == []
    assert rep.warnings == ["float island between int8 tensors: GlobalAveragePool 'gap', Flatten 'flatten'"]


def test_check_command(tiny_q, tmp_path, capsys):
    good, bad = tmp_path / "good.onnx", tmp_path / "bad.onnx"
    onnx.save(tiny_q, good)
    onnx.save(_set_axis(tiny_q), bad)
    assert main(["check", str(good)]) == 0
    assert capsys.readouterr().out == (
        f"{good}: 0 error(s), 0 warning(s); 4 quantized weights, 8 activation quantizers\n"
    )
    assert main(["check", str(bad), "--target", "spacemit"]) == 1
    assert capsys.readouterr().out.splitlines() == [
        f"error: {_WRONG_AXIS}",
        f"{bad}: 1 error(s), 0 warning(s); 4 quantized weights, 8 activation quantizers",
    ]
    assert main(["check", str(good), "--target", "ort-cpu"]) == 1


# --------------------------------------------------------------------------- custom_setting regions and truncation


def branching_model() -> onnx.ModelProto:
    """x -> convA -> a -> reluB -> b -> convC -> c -> addE(c, d) -> e -> convF -> y
    with a side branch a -> convD -> d, and b -> convS -> s, a second output."""
    nodes = [
        helper.make_node("Conv", ["x", "wA"], ["a"], name="convA", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a"], ["b"], name="reluB"),
        helper.make_node("Conv", ["b", "wC"], ["c"], name="convC"),
        helper.make_node("Conv", ["a", "wD"], ["d"], name="convD"),
        helper.make_node("Add", ["c", "d"], ["e"], name="addE"),
        helper.make_node("Conv", ["b", "wS"], ["s"], name="convS"),
        helper.make_node("Conv", ["e", "wF"], ["y"], name="convF"),
    ]
    weights = {
        "wA": rand(1, 4, 3, 3, 3),
        "wC": rand(2, 4, 4, 1, 1),
        "wD": rand(3, 4, 4, 1, 1),
        "wS": rand(4, 2, 4, 1, 1),
        "wF": rand(5, 2, 4, 1, 1),
    }
    return make_model(nodes, {"x": [1, 3, 6, 6]}, {"y": [1, 2, 6, 6], "s": [1, 2, 6, 6]}, weights)


REGIONS = [
    {"input_names": ["a"], "output_names": ["c"], "precision_level": 2},
    {"input_names": ["e"], "output_names": ["y"], "calibration_type": "percentile", "max_percentile": 0.999},
]


def _cfg(**qp) -> object:
    return load_config({"calibration_parameters": {"calibration_type": "minmax"}, "quantization_parameters": qp})


def test_region_is_exactly_the_paths_between_its_tensors():
    model = branching_model()
    cfg = _cfg(custom_setting=REGIONS)
    excluded = excluded_nodes(model, cfg, SPACEMIT)
    assert excluded == {"reluB", "convC"}  # not convS: b's side branch runs on to the end of the graph
    tensors = activations_to_calibrate(onnx.shape_inference.infer_shapes(model), SPACEMIT, excluded)
    assert tensor_methods(model, cfg, tensors) == {
        "x": ("minmax", 0.9999),
        "a": ("minmax", 0.9999),
        "d": ("minmax", 0.9999),
        "b": ("minmax", 0.9999),
        "c": ("minmax", 0.9999),
        "e": ("percentile", 0.999),
        "y": ("percentile", 0.999),
        "s": ("minmax", 0.9999),
    }


def test_region_keeps_its_ops_float_in_the_output(tmp_path):
    q = quantize(tmp_path, branching_model(), custom_setting=REGIONS)
    assert int8_nodes(q) == ({"convD", "addE", "convS", "convF"}, {"convA", "reluB", "convC"})
    # float ops read the float tensors, not dequantized copies made for their int8 neighbours
    by_name = {n.name: n for n in q.graph.node}
    assert list(by_name["reluB"].input) == ["a"]
    assert list(by_name["convC"].input) == ["b", "wC"]
    check(q, warnings=["float island between int8 tensors: Conv 'convA', Relu 'reluB', Conv 'convC'"])
    x = samples(q, 1, seed=5)[0]
    for f, o in zip(run_model(branching_model(), x), run_model(q, x), strict=True):
        assert cosine(f, o) > 0.999


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        (
            {"input_names": ["aa"], "output_names": ["c"]},
            "quantization_parameters.custom_setting[0].input_names: no tensor named 'aa' in the model; closest: a",
        ),
        (
            {"input_names": ["a"], "output_names": ["yy"]},
            "quantization_parameters.custom_setting[0].output_names: no tensor named 'yy' in the model; closest: y",
        ),
        (
            {"input_names": ["d"], "output_names": ["c"]},
            "quantization_parameters.custom_setting[0].output_names: 'c' is not computed from any of its input_names",
        ),
        (
            {"input_names": ["a", "s"], "output_names": ["c"]},
            "quantization_parameters.custom_setting[0].input_names: no path from 's' to any of its output_names",
        ),
    ],
)
def test_region_mistakes(setting, message):
    with pytest.raises(ConfigError) as exc:
        excluded_nodes(branching_model(), _cfg(custom_setting=[setting]), SPACEMIT)
    assert exc.value.message == message


def test_truncation_quantizes_only_before_the_cut(tmp_path):
    """After the cut at b and e: convC, convS, addE, convF. The ops feeding the float part (reluB
    and convD) read int8 but write float: a tensor read only by float ops stays float."""
    q = quantize(tmp_path, branching_model(), truncate_var_names=["e", "b"])
    assert int8_nodes(q) == ({"convA"}, {"reluB", "convC", "convD", "addE", "convS", "convF"})
    producer, _, _ = graph_maps(q)
    assert {t: producer[t].op_type for t in ("b", "d", "e")} == {"b": "Relu", "d": "Conv", "e": "Add"}
    check(q)


def test_truncation_that_does_not_separate_the_graph():
    with pytest.raises(ConfigError) as exc:
        excluded_nodes(branching_model(), _cfg(truncate_var_names=["e"]), SPACEMIT)
    assert exc.value.message == (
        "quantization_parameters.truncate_var_names does not separate the graph: "
        "the path x -> a -> b -> s does not cross it"
    )


# --------------------------------------------------------------------------- ignore lists in every mode


def float32_compute(q: onnx.ModelProto, mode: str) -> set[str]:
    """Names of the compute nodes left in float32.

    dynamic: Conv/Gemm/MatMul whose weight is still a float32 initializer; fp16: nodes whose
    first input is float32; static: nodes that are no int8 QDQ unit (see ``int8_nodes``)."""
    if mode == "static":
        return int8_nodes(q)[1]
    inits = {i.name: i.data_type for i in q.graph.initializer}
    if mode == "dynamic":
        return {
            n.name
            for n in q.graph.node
            if n.op_type in ("Conv", "Gemm", "MatMul") and inits.get(n.input[1]) == TensorProto.FLOAT
        }
    typed = onnx.shape_inference.infer_shapes(q)
    types = {v.name: v.type.tensor_type.elem_type for v in (*typed.graph.value_info, *typed.graph.input)}
    types |= inits
    return {n.name for n in q.graph.node if n.op_type != "Cast" and types.get(n.input[0]) == TensorProto.FLOAT}


_ISLAND = "float island between int8 tensors: Conv 'conv1', Relu 'relu1', Conv 'conv2_dw', Clip 'clip2'"
#: (mode, precision_level, ignore key, value, nodes left float32, checker warnings)
IGNORE_CASES = [
    ("static", 0, "ignore_op_types", ["Gemm"], {"flatten", "fc"}, []),
    ("static", 0, "ignore_op_names", ["conv2_dw"], {"conv1", "relu1", "conv2_dw", "clip2"}, [_ISLAND]),
    ("dynamic", 3, "ignore_op_types", ["Gemm"], {"fc"}, []),
    ("dynamic", 3, "ignore_op_names", ["conv3"], {"conv3"}, []),  # depthwise conv2_dw is float anyway
    ("fp16", 4, "ignore_op_types", ["Conv"], {"conv1", "conv2_dw", "conv3"}, []),
    ("fp16", 4, "ignore_op_names", ["fc"], {"fc"}, []),
]


@pytest.mark.parametrize(
    ("mode", "level", "key", "value", "kept", "warnings"),
    IGNORE_CASES,
    ids=["static-types", "static-names", "dynamic-types", "dynamic-names", "fp16-types", "fp16-names"],
)
def test_ignore_lists_keep_ops_float_in_every_mode(tmp_path, mode, level, key, value, kept, warnings):
    model = tiny_cnn()
    baseline = float32_compute(quantize(tmp_path / "base", model, precision_level=level), mode)
    q = quantize(tmp_path / "ignore", model, precision_level=level, **{key: value})
    assert float32_compute(q, mode) - baseline == kept
    check(q, warnings=warnings)
    x = samples(model, 1, seed=4)[0]
    assert cosine(run_model(model, x)[0], run_model(q, x)[0]) > 0.99


def test_ignored_op_in_static_mode_reads_float(tmp_path):
    """relu1's output feeds the ignored conv2_dw and the int8 add3: conv2_dw reads the float
    tensor, so the Relu stays (its Q/DQ pair alone would not clamp that copy)."""
    q = quantize(tmp_path, tiny_cnn(), ignore_op_names=["conv2_dw"])
    producer, readers, _ = graph_maps(q)
    assert producer["r1"].name == "relu1"
    assert sorted(r.op_type for r in readers["r1"]) == ["Conv", "QuantizeLinear"]
    assert next(n for n in q.graph.node if n.name == "conv2_dw").input[:2] == ["r1", "w2"]


# --------------------------------------------------------------------------- graph patterns xslim gets wrong


@pytest.mark.parametrize(
    ("op", "left"),
    [
        ("Sub", ["Conv", "Sub", "Relu"]),
        ("Add", ["Conv", "Add", "Relu"]),
        ("Mul", ["Conv"]),  # folded into the Conv by the simplifier; the Relu then fuses with it
        ("Div", ["Conv", "Div", "Relu"]),  # Div is no int8 op: it and the Relu after it stay float
    ],
)
def test_conv_then_constant_op_matches_float(tmp_path, op, left):
    """xslim 2.1.2 folds a Conv followed by a constant Sub with the wrong sign."""
    k = np.array([0.6, -0.9, 1.4, 0.8], np.float32).reshape(1, 4, 1, 1)
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node(op, ["c", "k"], ["y"], name="const_op"),
        helper.make_node("Relu", ["y"], ["z"], name="relu"),
    ]
    model = make_model(
        nodes, {"x": [1, 3, 8, 8]}, {"z": [1, 4, 8, 8]}, {"w": rand(1, 4, 3, 3, 3), "b": rand(2, 4, scale=0.1), "k": k}
    )
    q = quantize(tmp_path, model, n=8)
    check(q)
    assert [n.op_type for n in q.graph.node if n.op_type not in ("QuantizeLinear", "DequantizeLinear")] == left
    _, scale, _, axis = weight_dq(q, "conv")
    assert scale.shape == (4,) and axis == 0
    feeds = samples(model, 4, seed=11)  # not the calibration samples
    ref = np.concatenate([run_model(model, f)[0] for f in feeds])
    out = np.concatenate([run_model(q, f)[0] for f in feeds])
    assert cosine(ref, out) > 0.999
    assert sqnr_db(ref, out) > 30.0  # 36.5-39.3 dB measured


def test_single_conv_graph_is_quantized(tmp_path):
    """xslim 2.1.2 leaves a graph that is a single Conv unquantized."""
    model = make_model(
        [helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv")],
        {"x": [1, 3, 8, 8]},
        {"y": [1, 4, 8, 8]},
        {"w": rand(1, 4, 3, 1, 1), "b": rand(2, 4, scale=0.1)},
    )
    q = quantize(tmp_path, model)
    rep = check(q)
    assert rep.stats == {"quantized_weights": 1, "activation_quantizers": 2}
    assert int8_nodes(q) == ({"conv"}, set())
    x = samples(model, 1, seed=12)[0]
    assert cosine(run_model(model, x)[0], run_model(q, x)[0]) > 0.999


# --------------------------------------------------------------------------- the zoo at level 0

_IMAGENET = {"mean_value": [123.675, 116.28, 103.53], "std_value": [58.395, 57.12, 57.375]}
ZOO_INPUTS = {
    "mobilenet_v2": lambda z: [
        {
            "color_format": "rgb",
            "preprocess_file": "PT_IMAGENET",
            "data_list_path": f"{z}/images/calib.txt",
            **_IMAGENET,
        }
    ],
    "efficientnet_lite0": lambda z: [
        {
            "color_format": "rgb",
            "preprocess_file": "PT_IMAGENET",
            "mean_value": [127, 127, 127],
            "std_value": [128, 128, 128],
            "data_list_path": f"{z}/images/calib.txt",
        }
    ],
    "ppocr_v6_tiny_det": lambda z: [
        {"input_shape": [1, 3, 640, 640], "color_format": "bgr", "data_list_path": f"{z}/images/calib.txt", **_IMAGENET}
    ],
    "all_minilm_l6_v2": lambda z: [
        {"input_shape": [1, 64], "file_type": "npy", "data_list_path": f"{z}/text/calib_{name}.txt"}
        for name in ("input_ids", "attention_mask", "token_type_ids")
    ],
}


def quantize_zoo(zoo: Path, name: str, out: Path, **qp) -> onnx.ModelProto:
    cfg = {
        "model_parameters": {"onnx_model": str(zoo / "models" / f"{name}.onnx")},
        "calibration_parameters": {
            "calibration_step": 8,
            "calibration_device": "cpu",
            "input_parametres": ZOO_INPUTS[name](zoo),
        },
        "quantization_parameters": {"analysis_enable": False, "finetune_level": 0, "precision_level": 0, **qp},
    }
    return xslim_ort.quantize_onnx_model(cfg, output=out)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "weights"),
    [("mobilenet_v2", 53), ("efficientnet_lite0", 50), ("ppocr_v6_tiny_det", 85), ("all_minilm_l6_v2", 36)],
)
def test_zoo_model_quantizes_at_level_0_and_checks(zoo, tmp_path, name, weights):
    q = quantize_zoo(zoo, name, tmp_path / f"{name}.q.onnx")
    rep = check_model(q, SPACEMIT, onnx.load(zoo / "models" / f"{name}.onnx", load_external_data=False))
    assert rep.errors == [] and rep.warnings == []
    assert rep.stats["quantized_weights"] == weights


@pytest.mark.slow
def test_zoo_ort_cpu_mobilenet_v2_runs_int8_kernels_only(zoo, tmp_path):
    """What the latency acceptance rests on: ORT fuses every Conv, Add and the Gemm (0.5x float
    latency measured with scripts/bench_latency.py; int8 activations leave 15 Convs and 10 Adds float)."""
    q = quantize_zoo(zoo, "mobilenet_v2", tmp_path / "mnv2.onnx", target="ort-cpu")
    check(q, ORT_CPU)
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(tmp_path / "mnv2.onnx"), options, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(tmp_path / "optimized.onnx").graph.node]
    assert {op: ops.count(op) for op in ("QLinearConv", "QLinearAdd", "QGemm", "Conv", "Add", "Gemm")} == {
        "QLinearConv": 52,
        "QLinearAdd": 10,
        "QGemm": 1,
        "Conv": 0,
        "Add": 0,
        "Gemm": 0,
    }


def test_clip_is_kept_where_the_range_runs_past_its_bounds():
    """Clip(0, 6) may only be dropped where the int8 range itself stops inside [0, 6]."""
    from xslim_ort.quantizer import TargetQuantizer

    model = onnx.shape_inference.infer_shapes(tiny_cnn())
    base = {t: (-4.0, 4.0) for t in ("input", "c3", "a3", "gap", "logits")} | {"r1": (0.0, 4.0)}
    inside = TargetQuantizer(model, load_target("spacemit"), base | {"r2": (0.0, 5.5)}).quantize_model()
    past = TargetQuantizer(model, load_target("spacemit"), base | {"r2": (0.0, 7.5)}).quantize_model()
    assert [n.op_type for n in inside.graph.node if n.op_type == "Clip"] == []
    assert [n.name for n in past.graph.node if n.op_type == "Clip"] == ["clip2"]
