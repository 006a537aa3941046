"""Tiny models built with onnx.helper, and the data files to calibrate them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper


def _init(rng: np.random.Generator, name: str, shape: tuple[int, ...], scale: float = 0.3) -> onnx.TensorProto:
    return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)


def tiny_cnn(seed: int = 0, opset: int = 17, batch: int | str = 1) -> onnx.ModelProto:
    """input[N,3,16,16] -> Conv -> Relu -> Conv(dw) -> Clip -> Conv -> Add(skip) -> GAP -> Flatten -> Gemm."""
    rng = np.random.default_rng(seed)
    inits = [
        _init(rng, "w1", (8, 3, 3, 3)),
        _init(rng, "b1", (8,), 0.1),
        _init(rng, "w2", (8, 1, 3, 3)),
        _init(rng, "b2", (8,), 0.1),
        _init(rng, "w3", (8, 8, 1, 1)),
        _init(rng, "b3", (8,), 0.1),
        _init(rng, "wfc", (10, 8)),
        _init(rng, "bfc", (10,), 0.1),
        numpy_helper.from_array(np.array(0.0, np.float32), "clip_lo"),
        numpy_helper.from_array(np.array(6.0, np.float32), "clip_hi"),
    ]
    nodes = [
        helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2_dw", pads=[1, 1, 1, 1], group=8),
        helper.make_node("Clip", ["c2", "clip_lo", "clip_hi"], ["r2"], name="clip2"),
        helper.make_node("Conv", ["r2", "w3", "b3"], ["c3"], name="conv3"),
        helper.make_node("Add", ["c3", "r1"], ["a3"], name="add3"),
        helper.make_node("GlobalAveragePool", ["a3"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "wfc", "bfc"], ["logits"], name="fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_cnn",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, 3, 16, 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 10])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def write_npy_samples(folder: Path, n: int, shape=(1, 3, 16, 16), seed: int = 1, name: str = "calib") -> Path:
    """n .npy samples and a list file naming them (relative paths, as xslim lists do)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(n):
        p = folder / f"{name}_{i:03d}.npy"
        np.save(p, rng.standard_normal(shape).astype(np.float32))
        lines.append(p.name)
    lst = folder / f"{name}.txt"
    lst.write_text("\n".join(lines) + "\n")
    return lst


def tiny_setup(tmp: Path, n: int = 8, **qp) -> tuple[Path, Path]:
    """A tiny model file and a config calibrating it on n npy samples. Returns (model, config)."""
    model_path = tmp / "tiny.onnx"
    onnx.save(tiny_cnn(), model_path)
    lst = write_npy_samples(tmp / "data", n)
    cfg = {
        "model_parameters": {"onnx_model": str(model_path)},
        "calibration_parameters": {
            "calibration_type": "minmax",
            "input_parametres": [{"file_type": "npy", "data_list_path": str(lst)}],
        },
        "quantization_parameters": {"analysis_enable": False, "finetune_level": 0, **qp},
    }
    cfg_path = tmp / "cfg.json"
    cfg_path.write_text(json.dumps(cfg))
    return model_path, cfg_path


def run_model(model: onnx.ModelProto | str | Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"]).run(None, feeds)
