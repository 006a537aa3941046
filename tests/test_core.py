"""The spine: config, format of the static int8 output, dynamic/FP16, API, CLI errors."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import xslim_ort
from xslim_ort.check import check_model
from xslim_ort.cli import main
from xslim_ort.config import (
    CalibrationParameters,
    CustomSetting,
    InputParameter,
    ModelParameters,
    QuantizationParameters,
    config_schema,
    load_config,
)
from xslim_ort.errors import ConfigError
from xslim_ort.qparams import cosine
from xslim_ort.targets import load_target

from helpers import run_model, tiny_cnn, tiny_setup, write_npy_samples

# --------------------------------------------------------------------------- config


def test_defaults_are_resolved():
    cfg = load_config({"calibration_parameters": {"input_parameters": [{"data_list_path": "x.txt"}]}})
    assert cfg.calibration_parameters.calibration_step == 100
    assert cfg.calibration_parameters.calibration_type == "default"
    assert cfg.quantization_parameters.finetune_level == 1
    assert cfg.quantization_parameters.max_percentile == 0.9999
    assert cfg.quantization_parameters.analysis_enable is True
    assert cfg.inputs[0].file_type == "img" and cfg.inputs[0].color_format == "bgr"
    assert cfg.model_parameters.skip_onnxsim is False


def test_config_round_trips_through_json():
    src = {
        "model_parameters": {"onnx_model": "m.onnx", "opset": 17},
        "calibration_parameters": {"input_parametres": [{"data_list_path": "l.txt", "mean_value": [1, 2, 3],
                                                         "std_value": [4, 5, 6]}]},
        "quantization_parameters": {"custom_setting": [{"input_names": ["a"], "output_names": ["b"],
                                                        "calibration_type": "percentile"}]},
    }
    cfg = load_config(src)
    again = load_config(json.loads(cfg.to_json()))
    assert again.to_dict() == cfg.to_dict()
    assert again.quantization_parameters.custom_setting[0].calibration_type == "percentile"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"model_parametrs": {}}, "unknown key 'model_parametrs'; did you mean 'model_parameters'?"),
        ({"calibration_parameters": {"calibration_stp": 3}},
         "unknown key 'calibration_parameters.calibration_stp'; did you mean 'calibration_step'?"),
        ({"calibration_parameters": {"calibration_step": "10"}},
         'calibration_parameters.calibration_step: expected integer, got a string "10"'),
        ({"calibration_parameters": {"calibration_type": "entropy"}},
         'calibration_parameters.calibration_type: "entropy" is not allowed; use one of "default", "kl", '
         '"minmax", "percentile", "mse"'),
        ({"quantization_parameters": {"max_percentile": 0.5}},
         "quantization_parameters.max_percentile: must be at least 0.99, got 0.5"),
        ({"quantization_parameters": {"precision_level": 7}},
         "quantization_parameters.precision_level: 7 is not allowed; use one of 0, 1, 2, 3, 4"),
        ({"calibration_parameters": {"input_parametres": [], "input_parameters": []}},
         "calibration_parameters: give input_parametres or input_parameters, not both"),
        ({"calibration_parameters": {"input_parametres": [{"colour_format": "rgb"}]}},
         "unknown key 'calibration_parameters.input_parametres[0].colour_format'; did you mean 'color_format'?"),
    ],
)
def test_bad_config_messages(data, message):
    with pytest.raises(ConfigError) as exc:
        load_config(data)
    assert str(exc.value) == message


def test_percent_spelling_of_max_percentile():
    cfg = load_config({"quantization_parameters": {"max_percentile": 99.99}})
    assert cfg.quantization_parameters.max_percentile == pytest.approx(0.9999)


def test_schema_and_dataclasses_agree():
    schema = config_schema()
    sections = {
        "model_parameters": ModelParameters,
        "calibration_parameters": CalibrationParameters,
        "quantization_parameters": QuantizationParameters,
    }
    for name, cls in sections.items():
        keys = set(schema["properties"][name]["properties"]) - {"input_parameters"}
        assert keys == {f.name for f in fields(cls)}, name
    assert set(schema["$defs"]["input"]["properties"]) == {f.name for f in fields(InputParameter)}
    assert set(schema["$defs"]["custom_setting"]["properties"]) == {f.name for f in fields(CustomSetting)}


def test_invalid_json_names_file_and_line(tmp_path):
    p = tmp_path / "cfg.json"
    p.write_text('{\n  "model_parameters": {},\n}\n')
    with pytest.raises(ConfigError, match=r"cfg.json:3:1: invalid JSON"):
        load_config(p)


# --------------------------------------------------------------------------- static int8 format


@pytest.fixture
def tiny_quantized(tmp_path):
    model_path, cfg_path = tiny_setup(tmp_path)
    qmodel = xslim_ort.quantize_onnx_model(cfg_path)
    return model_path, qmodel, tmp_path


def _inits(model):
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


def test_static_output_format(tiny_quantized):
    model_path, q, tmp = tiny_quantized
    assert (tmp / "tiny.q.onnx").is_file()
    inits = _inits(q)
    producers = {o: n for n in q.graph.node for o in n.output}
    convs = [n for n in q.graph.node if n.op_type == "Conv"]
    assert len(convs) == 3
    for conv in convs:
        dq = producers[conv.input[1]]
        assert dq.op_type == "DequantizeLinear"
        w, scale, zp = inits[dq.input[0]], inits[dq.input[1]], inits[dq.input[2]]
        assert w.dtype == np.int8 and scale.shape == (w.shape[0],) and scale.dtype == np.float32
        assert np.all(zp == 0) and {a.name: a.i for a in dq.attribute}.get("axis", 1) == 0
        assert np.abs(w).max() == 127 and w.min() >= -127
        assert conv.input[2] in inits and inits[conv.input[2]].dtype == np.float32  # float bias
    gemm = next(n for n in q.graph.node if n.op_type == "Gemm")
    gscale = inits[producers[gemm.input[1]].input[1]]
    assert gscale.size == 1 and np.log2(gscale) == np.round(np.log2(gscale))
    for qn in (n for n in q.graph.node if n.op_type == "QuantizeLinear"):
        assert inits[qn.input[1]].size == 1 and inits[qn.input[2]].dtype == np.int8
    # Relu and Clip are fused into the Conv's quantization point.
    assert not [n for n in q.graph.node if n.op_type in ("Relu", "Clip")]
    fm = onnx.load(model_path)
    assert [(i.name, i.type) for i in q.graph.input] == [(i.name, i.type) for i in fm.graph.input]
    assert [o.name for o in q.graph.output] == ["logits"]
    rep = check_model(q, load_target("spacemit"), fm)
    assert rep.errors == [] and rep.warnings == []
    # input, relu1, clip2, conv3, add3, gap, flatten (shared scale), logits
    assert rep.stats == {"quantized_weights": 4, "activation_quantizers": 8}


def test_static_output_is_close_to_float(tiny_quantized):
    model_path, q, tmp = tiny_quantized
    x = np.load(tmp / "data" / "calib_000.npy")
    f = run_model(model_path, {"input": x})[0]
    o = run_model(q, {"input": x})[0]
    assert cosine(f, o) > 0.995


def test_same_inputs_give_identical_bytes(tmp_path):
    _, cfg_path = tiny_setup(tmp_path)
    xslim_ort.quantize_onnx_model(cfg_path, output=tmp_path / "a.onnx")
    xslim_ort.quantize_onnx_model(cfg_path, output=tmp_path / "b.onnx")
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()


def test_ort_cpu_target_uses_int32_bias(tmp_path):
    _, cfg_path = tiny_setup(tmp_path, target="ort-cpu")
    q = xslim_ort.quantize_onnx_model(cfg_path)
    inits = _inits(q)
    producers = {o: n for n in q.graph.node for o in n.output}
    conv = next(n for n in q.graph.node if n.op_type == "Conv")
    bias_dq = producers[conv.input[2]]
    assert bias_dq.op_type == "DequantizeLinear" and inits[bias_dq.input[0]].dtype == np.int32
    assert check_model(q, load_target("ort-cpu")).errors == []


def test_model_proto_input_and_explicit_output(tmp_path):
    _, cfg_path = tiny_setup(tmp_path)
    q = xslim_ort.quantize_onnx_model(cfg_path, tiny_cnn(), tmp_path / "out" / "x.onnx")
    assert (tmp_path / "out" / "x.onnx").read_bytes() == q.SerializeToString(deterministic=True)


def test_already_quantized_model_is_refused(tiny_quantized, tmp_path):
    _, q, _ = tiny_quantized
    (tmp_path / "again").mkdir()
    _, cfg_path = tiny_setup(tmp_path / "again")
    with pytest.raises(xslim_ort.XSlimError, match="already quantized"):
        xslim_ort.quantize_onnx_model(cfg_path, q, tmp_path / "twice.onnx")


def test_symbolic_batch_is_pinned(tmp_path):
    model_path, cfg_path = tiny_setup(tmp_path)
    onnx.save(tiny_cnn(batch="N"), model_path)
    q = xslim_ort.quantize_onnx_model(cfg_path)
    dim = q.graph.input[0].type.tensor_type.shape.dim[0]
    assert dim.dim_value == 1


def test_skip_onnxsim_really_skips(tmp_path, monkeypatch):
    import xslim_ort.pipeline as pipeline

    calls = []
    monkeypatch.setattr(pipeline, "simplify", lambda m: calls.append(1) or m)
    _, cfg_path = tiny_setup(tmp_path)
    xslim_ort.quantize_onnx_model(cfg_path)
    assert calls == [1]
    cfg = json.loads(cfg_path.read_text())
    cfg["model_parameters"]["skip_onnxsim"] = True
    cfg_path.write_text(json.dumps(cfg))
    xslim_ort.quantize_onnx_model(cfg_path, output=tmp_path / "skip.onnx")
    assert calls == [1]


def test_opset_is_raised_for_per_channel(tmp_path):
    model_path, cfg_path = tiny_setup(tmp_path)
    onnx.save(tiny_cnn(opset=11), model_path)
    q = xslim_ort.quantize_onnx_model(cfg_path)
    assert next(i.version for i in q.opset_import if i.domain in ("", "ai.onnx")) >= 13


# --------------------------------------------------------------------------- dynamic and FP16


@pytest.mark.parametrize("flag", ["--dynq", "--fp16"])
def test_dynamic_and_fp16_match_float(tmp_path, flag):
    model_path, _ = tiny_setup(tmp_path)
    out = tmp_path / "out.onnx"
    assert main(["quantize", "-i", str(model_path), "-o", str(out), flag]) == 0
    m = onnx.load(out)
    ops = {n.op_type for n in m.graph.node}
    if flag == "--dynq":
        assert "DynamicQuantizeLinear" in ops or "MatMulInteger" in ops
        assert "DequantizeLinear" in ops  # Conv weights, weight-only
    else:
        assert m.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
        assert m.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
        assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in m.graph.initializer)
    assert [d.dim_value for d in m.graph.output[0].type.tensor_type.shape.dim] == [1, 10]
    x = np.load(tmp_path / "data" / "calib_000.npy")
    assert cosine(run_model(model_path, {"input": x})[0], run_model(out, {"input": x})[0]) > 0.99


def test_no_config_no_flag_simplifies_only(tmp_path):
    model_path, _ = tiny_setup(tmp_path)
    out = tmp_path / "simple.onnx"
    assert main(["quantize", "-i", str(model_path), "-o", str(out)]) == 0
    ops = {n.op_type for n in onnx.load(out).graph.node}
    assert "QuantizeLinear" not in ops and "Conv" in ops


# --------------------------------------------------------------------------- ORT drop-in


ORT_SCRIPT = """
import numpy as np
from xslim_ort import quantize_static, CalibrationDataReader, QuantFormat, QuantType, CalibrationMethod

class Reader(CalibrationDataReader):
    def __init__(self):
        rng = np.random.default_rng(0)
        self.data = iter([{"input": rng.standard_normal((1, 3, 16, 16)).astype(np.float32)} for _ in range(6)])
    def get_next(self):
        return next(self.data, None)

quantize_static("MODEL", "OUT", Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax)
"""


def test_ort_script_runs_with_changed_import(tmp_path):
    model_path, _ = tiny_setup(tmp_path)
    out = tmp_path / "ort_style.onnx"
    script = tmp_path / "script.py"
    script.write_text(ORT_SCRIPT.replace("MODEL", str(model_path)).replace("OUT", str(out)))
    subprocess.run([sys.executable, str(script)], check=True, cwd=tmp_path)
    q = onnx.load(out)
    assert check_model(q, load_target("spacemit"), onnx.load(model_path)).errors == []
    assert sum(n.op_type == "QuantizeLinear" for n in q.graph.node) == 8


# --------------------------------------------------------------------------- CLI errors


def _cli(args, capsys):
    code = main(args)
    lines = capsys.readouterr().err.strip().splitlines()
    return code, lines[-1] if lines else ""


def test_cli_error_unknown_key(tmp_path, capsys):
    _, cfg_path = tiny_setup(tmp_path)
    cfg = json.loads(cfg_path.read_text())
    cfg["quantization_parameters"]["finetune_levle"] = 1
    cfg_path.write_text(json.dumps(cfg))
    code, err = _cli(["quantize", str(cfg_path)], capsys)
    assert code == 2
    assert err == (
        f"error: {cfg_path}: unknown key 'quantization_parameters.finetune_levle'; did you mean 'finetune_level'?"
    )
    assert not (tmp_path / "tiny.q.onnx").exists()


def test_cli_error_wrong_type(tmp_path, capsys):
    _, cfg_path = tiny_setup(tmp_path)
    cfg = json.loads(cfg_path.read_text())
    cfg["calibration_parameters"]["calibration_step"] = [1]
    cfg_path.write_text(json.dumps(cfg))
    code, err = _cli(["quantize", "-c", str(cfg_path)], capsys)
    assert code == 2
    assert err == f"error: {cfg_path}: calibration_parameters.calibration_step: expected integer, got an array [1]"
    assert not (tmp_path / "tiny.q.onnx").exists()


def test_cli_error_missing_model(tmp_path, capsys):
    _, cfg_path = tiny_setup(tmp_path)
    (tmp_path / "tiny.onnx").unlink()
    code, err = _cli(["quantize", str(cfg_path)], capsys)
    assert code == 2
    assert err == f"error: model_parameters.onnx_model: file not found: {tmp_path / 'tiny.onnx'}"


def test_cli_error_missing_list(tmp_path, capsys):
    _, cfg_path = tiny_setup(tmp_path)
    lst = tmp_path / "data" / "calib.txt"
    lst.unlink()
    code, err = _cli(["quantize", str(cfg_path)], capsys)
    assert code == 2
    assert err == f"error: calibration_parameters.input_parametres[0].data_list_path: file not found: {lst}"
    assert not (tmp_path / "tiny.q.onnx").exists()


def test_cli_error_list_names_missing_file(tmp_path, capsys):
    _, cfg_path = tiny_setup(tmp_path)
    lst = tmp_path / "data" / "calib.txt"
    lines = lst.read_text().splitlines()
    lines[2] = "gone.npy"
    lst.write_text("\n".join(lines) + "\n")
    code, err = _cli(["quantize", str(cfg_path)], capsys)
    assert code == 2
    assert err == f"error: {lst}:3: file not found: {lst.parent / 'gone.npy'}"
    assert not (tmp_path / "tiny.q.onnx").exists()


def test_cli_refuses_output_equal_to_input(tmp_path, capsys):
    model_path, cfg_path = tiny_setup(tmp_path)
    before = model_path.read_bytes()
    code, err = _cli(["quantize", "-c", str(cfg_path), "-o", str(model_path)], capsys)
    assert code == 2
    assert err == f"error: the output {model_path} is the input model; choose another output path (-o)"
    assert model_path.read_bytes() == before


def test_cli_python_m_takes_xslim_flags(tmp_path):
    _, cfg_path = tiny_setup(tmp_path)
    out = tmp_path / "m.onnx"
    proc = subprocess.run(
        [sys.executable, "-m", "xslim_ort", "-c", str(cfg_path), "-o", str(out)], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert out.is_file() and proc.stdout.strip() == str(out)


def test_cli_help_everywhere():
    for args in (["--help"], ["quantize", "--help"], ["check", "--help"], ["schema", "--help"]):
        proc = subprocess.run([sys.executable, "-m", "xslim_ort", *args], capture_output=True, text=True)
        assert proc.returncode == 0 and "Usage:" in proc.stdout


def test_version_flag(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"xslim-ort, version {xslim_ort.__version__}"


def test_more_samples_than_steps_uses_calibration_step(tmp_path):
    _, cfg_path = tiny_setup(tmp_path, n=12)
    write_npy_samples(tmp_path / "data", 12)
    cfg = json.loads(cfg_path.read_text())
    cfg["calibration_parameters"]["calibration_step"] = 3
    cfg_path.write_text(json.dumps(cfg))
    q = xslim_ort.quantize_onnx_model(cfg_path)
    assert check_model(q, load_target("spacemit")).errors == []


def test_examples_config_is_valid():
    root = Path(__file__).resolve().parent.parent / "examples"
    for cfg in root.glob("*/config.json"):
        load_config(cfg)


def test_verbosity_flags_may_follow_the_command(tmp_path, capsys):
    model_path, _ = tiny_setup(tmp_path)
    out = tmp_path / "quiet.onnx"
    assert main(["quantize", "-i", str(model_path), "-o", str(out), "--fp16", "-q"]) == 0
    assert capsys.readouterr().err == ""
    assert out.is_file()
