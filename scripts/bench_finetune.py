"""Benchmark of the finetune levels on the zoo classifiers (issue 6 acceptance).

For each model: simplify, calibrate on ``images/calib.txt``, then for every finetune level
tune, quantize with the SpacemiT target and score the int8 model against the float one
on ``images/eval.txt`` (output SQNR, top-1 agreement) and ``images/labelled.txt``
(top-1 accuracy). ONNX Runtime's ``quantize_static`` (QDQ, per-channel, MinMax) is the
baseline. Wall time is simplify + calibrate + tune + quantize, on one thread.

    python scripts/bench_finetune.py [--models mobilenet_v2 efficientnet_lite0] [--levels 0 1 2 3]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from xslim_ort.calibration.batches import source_from_batches
from xslim_ort.calibration.collectors import collect_statistics
from xslim_ort.model_io import infer_shapes, simplify
from xslim_ort.qparams import cosine, sqnr_db
from xslim_ort.quantizer import TargetQuantizer, activations_to_calibrate, weight_inputs
from xslim_ort.targets import Target, load_target
from xslim_ort.tuning import WeightScheme, finetune

PREPROCESS = {  # zoo/README.md, 0-255 pixel scale, RGB
    "mobilenet_v2": ((123.675, 116.28, 103.53), (58.395, 57.12, 57.375)),
    "efficientnet_lite0": ((127.0, 127.0, 127.0), (128.0, 128.0, 128.0)),
}


def zoo_dir() -> Path:
    env = os.environ.get("XSLIM_ORT_ZOO")
    path = Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "zoo"
    if not (path / "models").is_dir():
        sys.exit(f"model zoo not found at {path} (set XSLIM_ORT_ZOO)")
    return path


def load_image(path: Path, mean, std) -> np.ndarray:
    """RGB, short side 256 (bilinear), centre crop 224, (x - mean) / std, NCHW."""
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)[:, :, ::-1]
    h, w = img.shape[:2]
    s = 256 / min(h, w)
    img = cv2.resize(img, (max(224, round(w * s)), max(224, round(h * s))), interpolation=cv2.INTER_LINEAR)
    h, w = img.shape[:2]
    top, left = (h - 224) // 2, (w - 224) // 2
    x = (img[top : top + 224, left : left + 224].astype(np.float32) - np.float32(mean)) / np.float32(std)
    return x.transpose(2, 0, 1)[None]


def load_list(zoo: Path, name: str, model: str) -> tuple[list[np.ndarray], list[int]]:
    images, labels = [], []
    for line in (zoo / "images" / name).read_text().splitlines():
        if line.strip():
            parts = line.split()
            images.append(load_image(zoo / "images" / parts[0], *PREPROCESS[model]))
            labels.append(int(parts[1]) if len(parts) > 1 else -1)
    return images, labels


def session(model: onnx.ModelProto | str) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    data = model if isinstance(model, str) else model.SerializeToString()
    return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])


def predict(model: onnx.ModelProto | str, images: list[np.ndarray]) -> np.ndarray:
    sess = session(model)
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x})[0] for x in images])


def weight_schemes(model: onnx.ModelProto, target: Target) -> dict[str, WeightScheme]:
    """What the target quantizer will do with each weight (its ``weight_overrides`` rules)."""
    inits = {i.name: i for i in model.graph.initializer}
    schemes: dict[str, WeightScheme] = {}
    for node in model.graph.node:
        rule = target.weight_rule(node.op_type)
        if rule is None or node.op_type not in target.ops:
            continue
        for name in weight_inputs(node, rule, inits):
            ndim = len(inits[name].dims)
            axis = rule.axis if rule.axis is not None and ndim > rule.axis else None
            schemes.setdefault(name, WeightScheme(axis, rule.power_of_two))
    return schemes


def calibrate(model: onnx.ModelProto, tensors: list[str], batches: list[dict]) -> dict[str, tuple[float, float]]:
    """The pipeline's default range method where it exists, else min/max."""
    try:
        from xslim_ort.calibration.methods import compute_ranges, needs_histogram
    except ImportError:
        stats = collect_statistics(model, tensors, source_from_batches(batches), histograms=False)
        return {t: (s.min, s.max) for t, s in stats.items()}
    hist = needs_histogram("default")
    stats = collect_statistics(model, tensors, source_from_batches(batches), histograms=hist)
    return compute_ranges(stats, dict.fromkeys(stats, "default"))


class Reader:
    """ORT CalibrationDataReader over in-memory batches."""

    def __init__(self, name: str, images: list[np.ndarray]) -> None:
        self._it: Iterator[dict] = iter([{name: x} for x in images])

    def get_next(self) -> dict | None:
        return next(self._it, None)


def ort_baseline(model: onnx.ModelProto, images: list[np.ndarray]) -> tuple[onnx.ModelProto, float]:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "f.onnx", Path(tmp) / "q.onnx"
        onnx.save(model, src)
        t0 = time.perf_counter()
        quantize_static(str(src), str(dst), Reader(model.graph.input[0].name, images),
                        quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QInt8,
                        weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax)
        return onnx.load(dst), time.perf_counter() - t0


def frozen_mismatch(qmodel: onnx.ModelProto, tuned: onnx.ModelProto, frozen: set[str]) -> int:
    """How many frozen weights the quantizer did not reproduce exactly (should be 0)."""
    inits = {i.name: numpy_helper.to_array(i) for i in qmodel.graph.initializer}
    tuned_w = {i.name: numpy_helper.to_array(i) for i in tuned.graph.initializer if i.name in frozen}
    bad = 0
    for node in qmodel.graph.node:
        if node.op_type == "DequantizeLinear" and node.output[0].removesuffix("_DequantizeLinear_Output") in tuned_w:
            name = node.output[0].removesuffix("_DequantizeLinear_Output")
            q, s = inits[node.input[0]], inits[node.input[1]]
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
            shape = [1] * q.ndim
            if s.ndim == 1:
                shape[axis] = -1
            bad += not np.array_equal(q.astype(np.float32) * s.reshape(shape), tuned_w[name])
    return bad


def bench_model(zoo: Path, name: str, levels: list[int], with_ort: bool) -> list[dict]:
    calib, _ = load_list(zoo, "calib.txt", name)
    evals, _ = load_list(zoo, "eval.txt", name)
    labelled, labels = load_list(zoo, "labelled.txt", name)
    t0 = time.perf_counter()
    model = infer_shapes(simplify(onnx.load(zoo / "models" / f"{name}.onnx")))
    t_simplify = time.perf_counter() - t0
    ref_eval, ref_lab = predict(model, evals), predict(model, labelled)
    input_name = model.graph.input[0].name
    batches = [{input_name: x} for x in calib]
    target = load_target("spacemit")

    t0 = time.perf_counter()
    tensors = activations_to_calibrate(model, target)
    ranges = calibrate(model, tensors, batches)
    t_calib = time.perf_counter() - t0
    schemes = weight_schemes(model, target)

    def score(method: str, qmodel: onnx.ModelProto, seconds: float, extra: str = "") -> dict:
        out_eval, out_lab = predict(qmodel, evals), predict(qmodel, labelled)
        row = {
            "model": name, "method": method, "sqnr": sqnr_db(ref_eval, out_eval), "cosine": cosine(ref_eval, out_eval),
            "agree": float(np.mean(out_eval.argmax(1) == ref_eval.argmax(1))) * 100,
            "top1": int(np.sum(out_lab.argmax(1) == np.array(labels))), "n_lab": len(labels), "seconds": seconds,
            "extra": extra,
        }
        print(f"{name:20s} {method:14s} {row['sqnr']:6.2f} dB  cos {row['cosine']:.4f}  agree {row['agree']:5.1f}%  "
              f"top1 {row['top1']}/{row['n_lab']}  {seconds:6.1f} s  {extra}", flush=True)
        return row

    rows = []
    float_lab = int(np.sum(ref_lab.argmax(1) == np.array(labels)))
    print(f"{name:20s} {'float':14s} top1 {float_lab}/{len(labels)}  simplify {t_simplify:.1f} s  "
          f"calibrate {t_calib:.1f} s", flush=True)
    if with_ort:
        qmodel, seconds = ort_baseline(model, calib)
        rows.append(score("ort_minmax_pc", qmodel, seconds + t_simplify))
    for level in levels:
        t0 = time.perf_counter()
        res = finetune(model, source_from_batches(batches), level, ranges=ranges, quantized_tensors=tensors,
                       weight_schemes=schemes)
        t_tune = time.perf_counter() - t0
        t0 = time.perf_counter()
        qmodel = TargetQuantizer(res.model, target, {**ranges, **res.range_overrides}).quantize_model()
        t_quant = time.perf_counter() - t0
        kept = sum(r["kept"] for r in res.log)
        extra = (f"tune {t_tune:.1f} s, {kept}/{len(res.log)} steps kept, {len(res.frozen_weights)} frozen "
                 f"({frozen_mismatch(qmodel, res.model, res.frozen_weights)} not reproduced)")
        rows.append(score(f"level {level}", qmodel, t_simplify + t_calib + t_tune + t_quant, extra))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(PREPROCESS), choices=list(PREPROCESS))
    ap.add_argument("--levels", nargs="+", type=int, default=[0, 1, 2, 3])
    ap.add_argument("--no-ort", action="store_true", help="skip the ORT quantize_static baseline")
    ap.add_argument("-v", "--verbose", action="store_true", help="log every tuned block")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    ort.set_default_logger_severity(3)
    zoo = zoo_dir()
    rows = [r for m in args.models for r in bench_model(zoo, m, args.levels, not args.no_ort)]
    print("\n| model | method | SQNR dB | cosine | top-1 agreement % | labelled top-1 | wall s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['model']} | {r['method']} | {r['sqnr']:.2f} | {r['cosine']:.4f} | {r['agree']:.1f} | "
              f"{r['top1']}/{r['n_lab']} | {r['seconds']:.1f} |")


if __name__ == "__main__":
    main()
