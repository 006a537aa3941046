"""Precision levels 1-2: measured sensitivity keeps exactly the harmful ops float."""

from __future__ import annotations

import json

import numpy as np
import onnx
from onnx import numpy_helper

import xslim_ort
from xslim_ort.check import check_model
from xslim_ort.qparams import sqnr_db
from xslim_ort.sensitivity import SwitchableModel, level2_float_nodes
from xslim_ort.targets import load_target

from helpers import run_model, tiny_cnn, tiny_setup


def _outlier_gemm_model(path):
    """tiny_cnn whose Gemm weight has one huge entry: per-tensor pow2 int8 crushes the rest."""
    model = tiny_cnn()
    for init in model.graph.initializer:
        if init.name == "wfc":
            w = numpy_helper.to_array(init).copy()
            w[0, 0] = 200.0
            init.CopyFrom(numpy_helper.from_array(w, "wfc"))
    onnx.save(model, path)


def _quantize(tmp_path, level):
    tmp_path.mkdir()
    model_path, cfg_path = tiny_setup(tmp_path, n=8, precision_level=level)
    _outlier_gemm_model(model_path)
    q = xslim_ort.quantize_onnx_model(cfg_path, output=tmp_path / f"l{level}.onnx")
    x = np.load(tmp_path / "data" / "calib_003.npy")
    return q, sqnr_db(run_model(model_path, {"input": x})[0], run_model(q, {"input": x})[0])


def _float_weights(q):
    producers = {o: n for n in q.graph.node for o in n.output}
    return sorted(n.name for n in q.graph.node if n.op_type in ("Conv", "Gemm") and producers.get(n.input[1]) is None)


def test_level1_keeps_the_harmful_gemm_float(tmp_path):
    q0, sqnr0 = _quantize(tmp_path / "l0", 0)
    q1, sqnr1 = _quantize(tmp_path / "l1", 1)
    assert _float_weights(q0) == []
    assert _float_weights(q1) == ["fc"]  # budget: a fifth of 4 compute ops, at least one
    assert sqnr1 > sqnr0 + 10
    assert check_model(q1, load_target("spacemit")).errors == []


def test_level2_fixed_float_set():
    fixed = level2_float_nodes(tiny_cnn(), load_target("spacemit"))
    # add3 joins two activations; nothing else in tiny_cnn is element-wise, Softmax or a norm
    assert fixed == {"add3": "level 2: element-wise op without a constant input"}


def test_switchable_model_matches_float_and_int8(tmp_path):
    from xslim_ort.pipeline import plan_job, prepare_model
    from xslim_ort.quantizer import TargetQuantizer

    _, cfg_path = tiny_setup(tmp_path)
    job = plan_job(json.loads(cfg_path.read_text()))
    model = prepare_model(job)
    rng = np.random.default_rng(3)
    ranges = {t: (-4.0, 4.0) for t in ("input", "r1", "r2", "c3", "a3", "gap", "logits")}
    q = TargetQuantizer(model, job.target, ranges, keep_activations=True).quantize_model()
    sw = SwitchableModel(q, model)
    batch = {"input": rng.standard_normal((1, 3, 16, 16)).astype(np.float32)}
    f = run_model(model, batch)[0]
    np.testing.assert_allclose(sw.run([batch], ())[0], f, rtol=0, atol=1e-5)
    np.testing.assert_allclose(sw.run([batch], set(sw.flags))[0], run_model(q, batch)[0], atol=1e-5)


def test_dequantizing_everything_gives_back_the_float_model(tmp_path):
    """Fused Relu/Clip come back, float weights return: the result computes the float model."""
    from xslim_ort.pipeline import plan_job, prepare_model
    from xslim_ort.quantizer import TargetQuantizer
    from xslim_ort.sensitivity import dequantize_tensors

    _, cfg_path = tiny_setup(tmp_path)
    job = plan_job(json.loads(cfg_path.read_text()))
    model = prepare_model(job)
    ranges = {t: (-4.0, 4.0) for t in ("input", "c3", "a3", "gap", "logits")}
    ranges |= {"r1": (0.0, 4.0), "r2": (0.0, 4.0)}  # Relu and Clip(0, 6) outputs: both fusable
    q = TargetQuantizer(model, job.target, ranges).quantize_model()
    assert not [n for n in q.graph.node if n.op_type in ("Relu", "Clip")]
    tensors = {n.input[0] for n in q.graph.node if n.op_type == "QuantizeLinear"}
    tensors |= {i.name[: -len("_quantized")] for i in q.graph.initializer if i.name.endswith("_quantized")}
    dequantize_tensors(q, model, tensors)
    assert sorted(n.op_type for n in q.graph.node if n.op_type in ("Relu", "Clip")) == ["Clip", "Relu"]
    assert not [n for n in q.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    batch = {"input": np.random.default_rng(5).standard_normal((1, 3, 16, 16)).astype(np.float32)}
    np.testing.assert_allclose(run_model(q, batch)[0], run_model(model, batch)[0], rtol=0, atol=1e-5)


def test_level2_calibrates_what_its_float_ops_leave_exposed(tmp_path):
    """Add (float at level 2) -> MaxPool -> Resize -> Concat, as in PP-OCR's neck: the Resize
    output shared the Add's scale at level 0 and needs a range of its own at level 2.

    Calibrating before choosing level 2's float set left that range out (PP-OCR failed at
    level 2 with "Quantization parameters are not specified").
    """
    from onnx import TensorProto, helper

    from helpers import write_npy_samples

    rng = np.random.default_rng(5)
    inits = [
        numpy_helper.from_array(rng.normal(0, 0.3, (4, 3, 3, 3)).astype(np.float32), "wa"),
        numpy_helper.from_array(rng.normal(0, 0.3, (4, 3, 3, 3)).astype(np.float32), "wb"),
        numpy_helper.from_array(rng.normal(0, 0.3, (4, 8, 1, 1)).astype(np.float32), "wc"),
    ]
    inits.append(numpy_helper.from_array(np.array([], np.float32), "no_roi"))
    inits.append(numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "up2"))
    nodes = [
        helper.make_node("Conv", ["input", "wa"], ["a"], name="conv_a", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["input", "wb"], ["b"], name="conv_b", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["a", "b"], ["s"], name="add"),
        helper.make_node("MaxPool", ["s"], ["p"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Resize", ["p", "no_roi", "up2"], ["u"], name="up", mode="nearest"),
        helper.make_node("Concat", ["u", "a"], ["cat"], name="cat", axis=1),
        helper.make_node("Conv", ["cat", "wc"], ["out"], name="conv_c"),
    ]
    graph = helper.make_graph(
        nodes,
        "add_pool",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 16, 16])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 4, 16, 16])],
        inits,
    )
    model_path = tmp_path / "add_pool.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), model_path)
    lst = write_npy_samples(tmp_path / "data", 8)
    cfg = {
        "model_parameters": {"onnx_model": str(model_path), "working_dir": str(tmp_path)},
        "calibration_parameters": {"input_parametres": [{"file_type": "npy", "data_list_path": str(lst)}]},
        "quantization_parameters": {"analysis_enable": False, "finetune_level": 0, "precision_level": 2},
    }
    q = xslim_ort.quantize_onnx_model(cfg, output=tmp_path / "q.onnx")
    assert check_model(q, load_target("spacemit")).errors == []
    by_name = {n.name: n for n in q.graph.node}
    assert by_name["add"].input[0] == "a" and by_name["add"].input[1] == "b"  # float Add reads float inputs
    x = np.load(tmp_path / "data" / "calib_000.npy")
    assert sqnr_db(run_model(model_path, {"input": x})[0], run_model(q, {"input": x})[0]) > 30
