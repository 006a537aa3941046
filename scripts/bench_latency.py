"""Latency of int8 models against their float model in stock ONNX Runtime (CPU, batch 1, one thread).

The ``ort-cpu`` target exists so that ORT's graph optimizer can fuse the QDQ model into
QLinearConv/QLinearMatMul kernels; this script is how we know it does. For each model it
writes four files and times them, interleaved run by run so that load from others on a
shared machine hits all of them alike:

- float: the zoo model itself;
- ORT QDQ: ``onnxruntime.quantization.quantize_static``, per-channel, QInt8 activations
  and weights, MinMax, on the same calibration images;
- spacemit / ort-cpu: xslim-ort at precision_level 0 with that target.

It prints the median latency, the ratio to float, and what ORT made of each graph (fused
int8 kernels against compute ops left in float, read from the optimized graph ORT dumps).

    python scripts/bench_latency.py [--models mobilenet_v2 ppocr_v6_tiny_det] [--runs 100]
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

import xslim_ort
from xslim_ort.calibration.readers import XSlimDataReader
from xslim_ort.config import load_config

REPO = Path(__file__).resolve().parent.parent
IMAGENET = {"mean_value": [123.675, 116.28, 103.53], "std_value": [58.395, 57.12, 57.375]}
#: Calibration input entry per model, as the brief and the zoo README give them.
MODELS: dict[str, dict[str, Any]] = {
    "mobilenet_v2": {"color_format": "rgb", "preprocess_file": "PT_IMAGENET", **IMAGENET},
    "ppocr_v6_tiny_det": {"input_shape": [1, 3, 640, 640], "color_format": "bgr", **IMAGENET},
}
FLOAT_COMPUTE = ("Conv", "ConvTranspose", "Gemm", "MatMul", "Add", "Mul")


def zoo_dir() -> Path:
    env = os.environ.get("XSLIM_ORT_ZOO")
    return Path(env) if env else REPO.parent / "shared" / "zoo"


def config(zoo: Path, name: str, workdir: Path, steps: int, target: str | None = None) -> dict[str, Any]:
    entry = {**MODELS[name], "data_list_path": str(zoo / "images" / "calib.txt")}
    qp: dict[str, Any] = {"analysis_enable": False, "finetune_level": 0, "precision_level": 0}
    if target:
        qp["target"] = target
    return {
        "model_parameters": {"onnx_model": str(zoo / "models" / f"{name}.onnx"), "working_dir": str(workdir)},
        "calibration_parameters": {
            "calibration_step": steps,
            "calibration_device": "cpu",
            "input_parametres": [entry],
        },
        "quantization_parameters": qp,
    }


def build_models(zoo: Path, name: str, workdir: Path, steps: int) -> dict[str, Path]:
    """The four models to time, by label."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    float_path = zoo / "models" / f"{name}.onnx"
    paths = {"float": float_path}
    reader = XSlimDataReader(load_config(config(zoo, name, workdir, steps)), onnx.load(float_path))
    paths["ORT QDQ"] = workdir / f"{name}.ort.onnx"
    quantize_static(
        float_path,
        paths["ORT QDQ"],
        reader,
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
    )
    for target in ("spacemit", "ort-cpu"):
        paths[target] = workdir / f"{name}.{target}.onnx"
        xslim_ort.quantize_onnx_model(config(zoo, name, workdir, steps, target), output=paths[target])
    return paths


def session(path: Path, dump: Path | None = None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if dump is not None:
        options.optimized_model_filepath = str(dump)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def fused_summary(path: Path, workdir: Path) -> str:
    """What ORT's optimizer made of the graph: int8 kernels vs compute ops left in float."""
    dump = workdir / f"{path.stem}.optimized.onnx"
    session(path, dump)
    ops = collections.Counter(n.op_type for n in onnx.load(dump).graph.node)
    int8 = sum(c for op, c in ops.items() if op.startswith("QLinear") or op in ("QGemm", "MatMulIntegerToFloat"))
    left = {op: ops[op] for op in FLOAT_COMPUTE if ops[op]}
    return f"{int8} int8 kernels; float: {left or 'none'}; Q/DQ: {ops['QuantizeLinear']}/{ops['DequantizeLinear']}"


def time_models(paths: dict[str, Path], shape: list[int], runs: int) -> dict[str, float]:
    """Median seconds per run, the models interleaved run by run."""
    sessions = {label: session(p) for label, p in paths.items()}
    x = np.random.default_rng(0).random(shape, dtype=np.float32)
    feeds = {label: {s.get_inputs()[0].name: x} for label, s in sessions.items()}
    for label, s in sessions.items():  # warm-up
        for _ in range(3):
            s.run(None, feeds[label])
    times: dict[str, list[float]] = {label: [] for label in sessions}
    for _ in range(runs):
        for label, s in sessions.items():
            t0 = time.perf_counter()
            s.run(None, feeds[label])
            times[label].append(time.perf_counter() - t0)
    return {label: statistics.median(t) for label, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["mobilenet_v2"], choices=sorted(MODELS))
    parser.add_argument("--runs", type=int, default=100, help="timed runs per model (default 100)")
    parser.add_argument("--calibration-step", type=int, default=8, help="calibration images (default 8)")
    parser.add_argument("--zoo", type=Path, default=zoo_dir())
    args = parser.parse_args()
    ort.set_default_logger_severity(3)
    print(f"onnxruntime {ort.__version__}, batch 1, one thread, median of {args.runs} interleaved runs")
    with tempfile.TemporaryDirectory(prefix="xslim_ort_latency_") as tmp:
        for name in args.models:
            workdir = Path(tmp) / name
            workdir.mkdir()
            paths = build_models(args.zoo, name, workdir, args.calibration_step)
            shape = MODELS[name].get("input_shape", [1, 3, 224, 224])
            medians = time_models(paths, shape, args.runs)
            print(f"\n{name} (input {'x'.join(map(str, shape))})")
            print("| model | latency (ms) | vs float | what ORT runs |\n| --- | --- | --- | --- |")
            for label, path in paths.items():
                ratio = medians[label] / medians["float"]
                summary = fused_summary(path, workdir)
                print(f"| {label} | {medians[label] * 1e3:.2f} | {ratio:.2f}x | {summary} |")


if __name__ == "__main__":
    main()
