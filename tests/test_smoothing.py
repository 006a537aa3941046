"""Activation smoothing (finetune_level >= 1): exact in float, lower int8 error, format kept."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import xslim_ort
from xslim_ort.calibration.readers import XSlimDataReader
from xslim_ort.check import check_model
from xslim_ort.config import load_config
from xslim_ort.qparams import cosine, fake_quant_weight, sqnr_db
from xslim_ort.quantizer import weight_rules
from xslim_ort.targets import load_target
from xslim_ort.tuning.clip import clip_weights
from xslim_ort.tuning.schemes import WeightScheme
from xslim_ort.tuning.smooth import find_sites, smooth_model

from helpers import run_model

SPACEMIT = load_target("spacemit")
TOKENS, WIDTH, HIDDEN = 32, 16, 12


def _encoder_layer() -> onnx.ModelProto:
    """x -> LayerNorm (one channel's gamma 40x the rest) -> Reshape -> Gemm -> Relu*0.5 -> MatMul, plus LN + x.

    The LayerNorm output is also read by a residual Add, so smoothing must duplicate it;
    the Mul by 0.5 feeding the MatMul absorbs its scales in place.
    """
    rng = np.random.default_rng(0)
    gamma = np.ones(WIDTH, np.float32)
    gamma[3] = 40.0
    inits = [
        numpy_helper.from_array(gamma, "gamma"),
        numpy_helper.from_array(rng.normal(0, 0.1, WIDTH).astype(np.float32), "beta"),
        numpy_helper.from_array(np.array([TOKENS, WIDTH], np.int64), "flat"),
        numpy_helper.from_array(_outlier_row(rng), "w1"),
        numpy_helper.from_array(rng.normal(0, 0.1, HIDDEN).astype(np.float32), "b1"),
        numpy_helper.from_array(np.array(0.5, np.float32), "half"),
        numpy_helper.from_array(rng.normal(0, 0.3, (HIDDEN, WIDTH)).astype(np.float32), "w2"),
    ]
    nodes = [
        helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["ln"], name="ln", axis=-1),
        helper.make_node("Add", ["ln", "x"], ["residual"], name="residual_add"),
        helper.make_node("Reshape", ["ln", "flat"], ["ln2d"], name="flatten_tokens"),
        helper.make_node("Gemm", ["ln2d", "w1", "b1"], ["h"], name="fc1", transB=1),
        helper.make_node("Relu", ["h"], ["hr"], name="act"),
        helper.make_node("Mul", ["hr", "half"], ["hm"], name="scale"),
        helper.make_node("MatMul", ["hm", "w2"], ["y"], name="fc2"),
    ]
    graph = helper.make_graph(
        nodes,
        "encoder_layer",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, TOKENS, WIDTH])],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [TOKENS, WIDTH]),
            helper.make_tensor_value_info("residual", TensorProto.FLOAT, [1, TOKENS, WIDTH]),
        ],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return onnx.shape_inference.infer_shapes(model)


def _outlier_row(rng: np.random.Generator) -> np.ndarray:
    """fc1's weight (transB layout): small where gamma is huge, so the outlier can move into it."""
    w = rng.normal(0, 0.3, (HIDDEN, WIDTH)).astype(np.float32)
    w[:, 3] *= 0.02
    return w


def _batches(n: int = 8) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    return [{"x": rng.normal(0, 1, (1, TOKENS, WIDTH)).astype(np.float32)} for _ in range(n)]


def _schemes(model: onnx.ModelProto) -> dict[str, WeightScheme]:
    return {n: WeightScheme(axis=a, power_of_two=p) for n, (a, p) in weight_rules(model, SPACEMIT).items()}


def test_sites_follow_reshapes_and_need_weight_readers():
    model = _encoder_layer()
    sites = {s.producer.name: ([n.name for n in s.chain], s.reader.name) for s in find_sites(model)}
    assert sites == {"ln": (["flatten_tokens"], "fc1"), "scale": ([], "fc2")}
    assert [s.producer.name for s in find_sites(model, excluded={"fc1"})] == ["scale"]


def test_smoothing_is_exact_in_float_and_duplicates_a_shared_producer():
    model = _encoder_layer()
    smoothed, changed = smooth_model(model, _batches(), _schemes(model))
    assert changed == 2
    onnx.checker.check_model(smoothed)
    ops = [n.op_type for n in smoothed.graph.node]
    assert ops.count("LayerNormalization") == 2 and ops.count("Reshape") == 1
    by_name = {n.name: n for n in smoothed.graph.node}
    assert by_name["residual_add"].input[0] == "ln"  # the residual path keeps the original values
    assert by_name["fc1"].input[0] == "ln2d_smoothed_for_fc1"
    twin = by_name["ln_smoothed_for_fc1"]
    assert list(twin.input[1:]) == ["ln_smoothed_for_fc1_smoothed_1", "ln_smoothed_for_fc1_smoothed_2"]
    assert {vi.name for vi in smoothed.graph.value_info} >= {"ln_smoothed_for_fc1", "ln2d_smoothed_for_fc1"}
    gamma = numpy_helper.to_array(next(i for i in smoothed.graph.initializer if i.name == twin.input[1]))
    assert gamma[3] / np.median(gamma) < 40.0 / 2  # the outlier channel shrank
    for batch in _batches(3):
        for a, b in zip(run_model(model, batch), run_model(smoothed, batch), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def _int8_sqnr(cfg_path, model_path, finetune_level: int, tmp_path) -> tuple[onnx.ModelProto, float]:
    cfg = json.loads(cfg_path.read_text())
    cfg["quantization_parameters"]["finetune_level"] = finetune_level
    q = xslim_ort.quantize_onnx_model(cfg, output=tmp_path / f"ft{finetune_level}.onnx")
    refs, outs = [], []
    for batch in _batches(4):
        refs.append(run_model(model_path, batch)[0])
        outs.append(run_model(q, batch)[0])
    return q, sqnr_db(np.concatenate(refs), np.concatenate(outs))


@pytest.fixture
def encoder_setup(tmp_path):
    model_path = tmp_path / "encoder.onnx"
    onnx.save(_encoder_layer(), model_path)
    lst = tmp_path / "calib.txt"
    lines = []
    for i, batch in enumerate(_batches(16)):
        np.save(tmp_path / f"x{i}.npy", batch["x"])
        lines.append(str(tmp_path / f"x{i}.npy"))
    lst.write_text("\n".join(lines) + "\n")
    cfg = {
        "model_parameters": {"onnx_model": str(model_path), "working_dir": str(tmp_path)},
        "calibration_parameters": {"input_parametres": [{"file_type": "npy", "data_list_path": str(lst)}]},
        "quantization_parameters": {"analysis_enable": False},
    }
    cfg_path = tmp_path / "cfg.json"
    cfg_path.write_text(json.dumps(cfg))
    return model_path, cfg_path


def test_finetune_level_1_smooths_and_stays_in_the_target_format(encoder_setup, tmp_path):
    model_path, cfg_path = encoder_setup
    q0, sqnr0 = _int8_sqnr(cfg_path, model_path, 0, tmp_path)
    q1, sqnr1 = _int8_sqnr(cfg_path, model_path, 1, tmp_path)
    assert [n.op_type for n in q0.graph.node].count("LayerNormalization") == 1
    assert [n.op_type for n in q1.graph.node].count("LayerNormalization") == 2
    assert sqnr1 > sqnr0 + 15.0, (sqnr0, sqnr1)  # measured 11.2 -> 34.4 dB
    rep = check_model(q1, SPACEMIT)
    assert rep.errors == []
    assert rep.stats["quantized_weights"] == 2


@pytest.mark.slow
@pytest.mark.parametrize(("level", "floor", "min_int8"), [(1, 0.99, 27), (2, 0.995, 20)])
def test_zoo_minilm_precision_levels(zoo, tmp_path, level, floor, min_int8):
    """Issue 5's acceptance on MiniLM: level 1 >= 0.99 mean cosine with >= 24 of 36 weight
    matmuls int8 (its budget, a fifth of 48 compute ops, allows 9 float; measured 0.9933),
    level 2 >= 0.995 (a third: 16; measured 0.9972)."""
    inputs = [
        {"input_shape": [1, 64], "file_type": "npy", "data_list_path": f"{zoo}/text/calib_{name}.txt"}
        for name in ("input_ids", "attention_mask", "token_type_ids")
    ]
    cfg = {
        "model_parameters": {"onnx_model": str(zoo / "models" / "all_minilm_l6_v2.onnx"), "working_dir": str(tmp_path)},
        "calibration_parameters": {"calibration_step": 32, "input_parametres": inputs},
        "quantization_parameters": {"analysis_enable": False, "precision_level": level},
    }
    q = xslim_ort.quantize_onnx_model(cfg, output=tmp_path / "minilm.q.onnx")
    assert check_model(q, SPACEMIT).errors == []
    producers = {o: n for n in q.graph.node for o in n.output}
    inits = {i.name for i in q.graph.initializer}

    def int8_weight(node: onnx.NodeProto) -> bool:
        dq = producers.get(node.input[1])
        return dq is not None and dq.op_type == "DequantizeLinear" and dq.input[0] in inits

    matmuls = [n for n in q.graph.node if n.op_type in ("Gemm", "MatMul")]
    weight_ops = [n for n in matmuls if n.input[1] in inits or int8_weight(n)]  # not activation x activation
    int8 = [n for n in weight_ops if int8_weight(n) and producers[n.input[0]].op_type == "DequantizeLinear"]
    assert len(weight_ops) == 36 and len(int8) >= min_int8
    eval_cfg = json.loads(json.dumps(cfg))
    eval_cfg["calibration_parameters"]["calibration_step"] = 128
    for entry in eval_cfg["calibration_parameters"]["input_parametres"]:
        entry["data_list_path"] = entry["data_list_path"].replace("calib_", "eval_")
    float_model = onnx.load(zoo / "models" / "all_minilm_l6_v2.onnx")
    reader = XSlimDataReader(load_config(eval_cfg), float_model)
    sessions = [
        ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]) for m in (float_model, q)
    ]
    cos = [
        cosine(*(s.run(["sentence_embedding"], batch)[0] for s in sessions)) for batch in iter(reader.get_next, None)
    ]
    assert len(cos) == 128
    assert np.mean(cos) >= floor, np.mean(cos)


def _matmul(outlier_channel: int) -> onnx.ModelProto:
    """x[64, 8] @ w[8, 4], w ~ N(0, 0.1) but for one entry of 3.0 on ``outlier_channel``'s row."""
    w = np.random.default_rng(2).normal(0, 0.1, (8, 4)).astype(np.float32)
    w[outlier_channel, 0] = 3.0
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
        "mm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [64, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [64, 4])],
        [numpy_helper.from_array(w, "w")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize(("channel", "clipped"), [(0, True), (7, False)])
def test_weight_clipping_follows_the_input_energy(channel, clipped):
    """Channel 0 carries almost nothing (x * 1e-3): clipping its outlier buys a 4x finer grid.
    Channel 7 carries most of the signal: its outlier must keep its value."""
    rng = np.random.default_rng(3)
    gains = np.ones(8, np.float32)
    gains[0], gains[7] = 1e-3, 10.0
    batches = [{"x": (rng.normal(0, 1, (64, 8)) * gains).astype(np.float32)} for _ in range(4)]
    model = _matmul(channel)
    out, n = clip_weights(model, batches, {"w": WeightScheme(axis=None, power_of_two=True)})
    w0 = numpy_helper.to_array(model.graph.initializer[0])
    w1 = numpy_helper.to_array(out.graph.initializer[0])
    assert n == int(clipped)
    if clipped:
        # max|w| 3.0 -> pow2 scale 2^-5 (+-3.97); a quarter of it, 2^-7, keeps +-0.99
        assert np.abs(w1).max() == pytest.approx(127 * 2.0**-7)
        np.testing.assert_array_equal(w1[np.abs(w0) < 0.99], w0[np.abs(w0) < 0.99])
        rep = fake_quant_weight(w1, None, True)
        assert float(np.abs(rep - w1).max()) <= 2.0**-8 + 1e-7
    else:
        np.testing.assert_array_equal(w1, w0)


def test_precision_level_1_on_outputs_with_many_rows_per_batch(encoder_setup, tmp_path):
    """Sensitivity ranks on a subset of batches; outputs of 32 token rows per batch once broke its slicing."""
    model_path, cfg_path = encoder_setup
    cfg = json.loads(cfg_path.read_text())
    cfg["quantization_parameters"].update(precision_level=1, finetune_level=0)
    cfg_path.write_text(json.dumps(cfg))
    q1, sqnr1 = _int8_sqnr(cfg_path, model_path, 0, tmp_path)
    assert check_model(q1, SPACEMIT).errors == []
    assert sqnr1 > 11.2 + 3.0  # level 0 at finetune 0 measured 11.2 dB: level 1 keeps the worst tensors float


def test_blocks_split_along_a_float_residual_stream():
    """Level 2 keeps residual sums float: tuning must still cut between layers, not run one huge block."""
    from xslim_ort.tuning.graph import GraphIndex, partition

    rng = np.random.default_rng(4)
    nodes, inits, x = [], [], "x"
    for i in range(6):
        inits.append(numpy_helper.from_array(rng.normal(0, 0.3, (WIDTH, WIDTH)).astype(np.float32), f"w{i}"))
        nodes += [
            helper.make_node("MatMul", [x, f"w{i}"], [f"h{i}"], name=f"fc{i}"),
            helper.make_node("Add", [x, f"h{i}"], [f"r{i}"], name=f"add{i}"),
        ]
        x = f"r{i}"
    graph = helper.make_graph(
        nodes,
        "residual_stack",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [TOKENS, WIDTH])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, [TOKENS, WIDTH])],
        inits,
    )
    model = onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    schemes = {f"w{i}": WeightScheme(axis=None, power_of_two=True) for i in range(6)}
    # only the first residual sum is int8: before, the five layers after it made one block
    float_stream = partition(GraphIndex(model), {"r0", *(f"h{i}" for i in range(6))}, schemes)
    assert [b.layers for b in float_stream] == [(0, 2, 4), (6, 8, 10)]
    int8_stream = partition(GraphIndex(model), {"x", *(f"r{i}" for i in range(6))}, schemes)
    assert [b.layers for b in int8_stream] == [(0, 2, 4), (6, 8, 10)]


def test_each_matmul_on_a_shared_input_gets_its_own_twin():
    """Q, K and V read one LayerNorm: each gets a twin with its own scales, the unused reshape goes."""
    model = _encoder_layer()
    w = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "w1"))
    model.graph.initializer.append(numpy_helper.from_array(w[::-1].copy(), "w1b"))
    model.graph.node.append(helper.make_node("Gemm", ["ln2d", "w1b"], ["hb"], name="fc1b", transB=1))
    model.graph.output.append(helper.make_tensor_value_info("hb", TensorProto.FLOAT, [TOKENS, HIDDEN]))
    model = onnx.shape_inference.infer_shapes(model)
    assert [(s.producer.name, s.reader.name) for s in find_sites(model)] == [
        ("ln", "fc1"),
        ("ln", "fc1b"),
        ("scale", "fc2"),
    ]
    smoothed, changed = smooth_model(model, _batches(), _schemes(model))
    assert changed == 3
    onnx.checker.check_model(smoothed)
    by_name = {n.name: n for n in smoothed.graph.node}
    assert sorted(n.name for n in smoothed.graph.node if n.op_type in ("LayerNormalization", "Reshape")) == [
        "flatten_tokens_smoothed_for_fc1",
        "flatten_tokens_smoothed_for_fc1b",
        "ln",
        "ln_smoothed_for_fc1",
        "ln_smoothed_for_fc1b",
    ]
    assert by_name["fc1b"].input[0] == "ln2d_smoothed_for_fc1b"
    for batch in _batches(3):
        for a, b in zip(run_model(model, batch), run_model(smoothed, batch), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
