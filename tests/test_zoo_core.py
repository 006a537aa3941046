"""End to end on the zoo's ImageNet models, against ONNX Runtime's quantize_static."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType
from onnxruntime.quantization import quantize_static as ort_quantize_static

from xslim_ort.calibration.readers import XSlimDataReader
from xslim_ort.check import check_model
from xslim_ort.cli import main
from xslim_ort.config import load_config
from xslim_ort.qparams import sqnr_db
from xslim_ort.targets import load_target

PREPROCESS = {
    "mobilenet_v2": {"mean_value": [123.675, 116.28, 103.53], "std_value": [58.395, 57.12, 57.375]},
    "efficientnet_lite0": {"mean_value": [127.0, 127.0, 127.0], "std_value": [128.0, 128.0, 128.0]},
}


def zoo_config(zoo: Path, name: str, workdir: Path, data_list: str = "calib.txt", **qp) -> dict:
    return {
        "model_parameters": {"onnx_model": str(zoo / "models" / f"{name}.onnx"), "working_dir": str(workdir)},
        "calibration_parameters": {
            "calibration_device": "cpu",
            "input_parametres": [
                {
                    "color_format": "rgb",
                    "preprocess_file": "PT_IMAGENET",
                    "data_list_path": str(zoo / "images" / data_list),
                    **PREPROCESS[name],
                }
            ],
        },
        "quantization_parameters": {"analysis_enable": False, **qp},
    }


def outputs(model: str | Path | onnx.ModelProto, batches: list[dict]) -> np.ndarray:
    from helpers import run_model

    return np.concatenate([run_model(model, b)[0] for b in batches])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mobilenet_v2", "efficientnet_lite0"])
def test_zoo_model_beats_ort_baseline(zoo, tmp_path, name):
    cfg = zoo_config(zoo, name, tmp_path)
    cfg_path = tmp_path / "cfg.json"
    cfg_path.write_text(json.dumps(cfg))
    assert main(["-q", "quantize", str(cfg_path)]) == 0
    ours = tmp_path / f"{name}.q.onnx"
    assert ours.is_file()

    float_model = onnx.load(zoo / "models" / f"{name}.onnx")
    calib_reader = XSlimDataReader(load_config(cfg), float_model)
    baseline = tmp_path / "ort.onnx"
    ort_quantize_static(
        zoo / "models" / f"{name}.onnx",
        baseline,
        calib_reader,
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
    )
    eval_cfg = load_config(zoo_config(zoo, name, tmp_path, "eval.txt"))
    reader = XSlimDataReader(eval_cfg, float_model)
    batches = list(iter(reader.get_next, None))
    assert len(batches) == 69
    ref = outputs(zoo / "models" / f"{name}.onnx", batches)
    q_ours, q_ort = outputs(ours, batches), outputs(baseline, batches)
    sqnr_ours, sqnr_ort = sqnr_db(ref, q_ours), sqnr_db(ref, q_ort)
    agree_ours = float(np.mean(ref.argmax(1) == q_ours.argmax(1)))
    agree_ort = float(np.mean(ref.argmax(1) == q_ort.argmax(1)))
    print(f"{name}: ours {sqnr_ours:.2f} dB {agree_ours:.3f}; ORT {sqnr_ort:.2f} dB {agree_ort:.3f}")
    assert sqnr_ours >= sqnr_ort
    assert agree_ours >= agree_ort

    qmodel = onnx.load(ours)
    rep = check_model(qmodel, load_target("spacemit"), float_model)
    assert rep.errors == []
    weighted = [n for n in qmodel.graph.node if n.op_type in ("Conv", "Gemm")]
    assert rep.stats["quantized_weights"] == len(weighted) >= 50
    assert [i.name for i in qmodel.graph.input] == ["input"] and [o.name for o in qmodel.graph.output] == ["logits"]


@pytest.mark.slow
@pytest.mark.parametrize("flag", ["--dynq", "--fp16"])
def test_zoo_dynamic_and_fp16_match_float(zoo, tmp_path, flag):
    from xslim_ort.qparams import cosine

    src = zoo / "models" / "mobilenet_v2.onnx"
    out = tmp_path / "m.onnx"
    assert main(["-q", "quantize", "-i", str(src), "-o", str(out), flag]) == 0
    float_model = onnx.load(src)
    reader = XSlimDataReader(load_config(zoo_config(zoo, "mobilenet_v2", tmp_path, "eval.txt")), float_model)
    batches = list(iter(reader.get_next, None))
    ref, got = outputs(src, batches), outputs(out, batches)
    cosines = [cosine(a, b) for a, b in zip(ref, got, strict=True)]
    print(f"{flag}: mean cosine {np.mean(cosines):.5f}, min {np.min(cosines):.5f}")
    assert np.mean(cosines) >= 0.99
    assert min(cosines) >= 0.98
