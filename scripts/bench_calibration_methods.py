"""Time and score the activation range methods on a zoo model.

For each method: the wall time of collecting statistics (minmax: pass 1 only; the others:
pass 1 + histograms) plus computing the ranges, and optionally the output SQNR and cosine
of the model quantized by ONNX Runtime's QDQ quantizer with those ranges (int8
activations asymmetric per tensor, int8 weights symmetric per channel) against the float
model on the zoo's evaluation images. The quantizer here is ORT's stock one, so the SQNR
ranks the range methods rather than predicting xslim-ort's final numbers.

    python scripts/bench_calibration_methods.py --zoo ../shared/zoo --model mobilenet_v2 --sqnr
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.calibrate import CalibrationMethod, TensorData, TensorsData, save_tensors_data

from xslim_ort.calibration.batches import Batch, source_from_batches
from xslim_ort.calibration.collectors import collect_statistics
from xslim_ort.calibration.methods import METHODS, compute_ranges
from xslim_ort.qparams import cosine, sqnr_db

# zoo/README.md: input name, colour order, resizing, and mean/std on the 0-255 pixel scale.
PREPROCESS = {
    "mobilenet_v2": ("input", "rgb", 224, (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)),
    "efficientnet_lite0": ("input", "rgb", 224, (127.0, 127.0, 127.0), (128.0, 128.0, 128.0)),
    "ppocr_v6_tiny_det": ("x", "bgr", 640, (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)),
}


def image_batches(zoo: Path, model: str, list_name: str, count: int) -> list[Batch]:
    """One image per batch, NCHW, preprocessed as the zoo README says for ``model``.

    Classifiers: short side to 256, centre crop 224. The detector: straight to 640x640.
    """
    name, colour, size, mean, std = PREPROCESS[model]
    listing = zoo / "images" / list_name
    lines = [line.strip() for line in listing.read_text().splitlines() if line.strip()][:count]
    out = []
    for line in lines:
        img = cv2.imread(str(listing.parent / line), cv2.IMREAD_COLOR)
        if colour == "rgb":
            img = img[:, :, ::-1]
        if size == 224:
            h, w = img.shape[:2]
            s = 256 / min(h, w)
            img = cv2.resize(img, (max(224, round(w * s)), max(224, round(h * s))), interpolation=cv2.INTER_LINEAR)
            h, w = img.shape[:2]
            y, x = (h - 224) // 2, (w - 224) // 2
            img = img[y : y + 224, x : x + 224]
        else:
            img = cv2.resize(img, (size, size), interpolation=cv2.INTER_LINEAR)
        img = (img.astype(np.float32) - np.array(mean, np.float32)) / np.array(std, np.float32)
        out.append({name: np.ascontiguousarray(img.transpose(2, 0, 1)[None])})
    return out


def session_options(threads: int) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    return so


def float_tensors(model: onnx.ModelProto) -> list[str]:
    inferred = onnx.shape_inference.infer_shapes(model)
    g = inferred.graph
    return [v.name for v in (*g.input, *g.value_info, *g.output) if v.type.tensor_type.elem_type == 1]


def target_tensors(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """The simplified model and the activations the spacemit target quantizes (what the pipeline calibrates)."""
    from xslim_ort.model_io import infer_shapes, simplify
    from xslim_ort.quantizer import activations_to_calibrate
    from xslim_ort.targets import load_target

    model = infer_shapes(simplify(model))
    return model, activations_to_calibrate(model, load_target("spacemit"))


def quantized_scores(model_path: Path, ranges: dict, evals: list[Batch], threads: int) -> tuple[float, float]:
    """Output SQNR (dB) and cosine of ORT's QDQ model with ``ranges`` vs the float model."""
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "ranges.json"
        data = {n: TensorData(lowest=np.float32(lo), highest=np.float32(hi)) for n, (lo, hi) in ranges.items()}
        save_tensors_data(TensorsData(CalibrationMethod.MinMax, data), cache)
        qpath = Path(tmp) / "q.onnx"
        quantize_static(
            str(model_path), str(qpath), None, quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
            extra_options={"ActivationSymmetric": False, "WeightSymmetric": True},
            calibration_cache_path=cache,
        )
        so = session_options(threads)
        fsess = ort.InferenceSession(str(model_path), so, providers=["CPUExecutionProvider"])
        qsess = ort.InferenceSession(str(qpath), so, providers=["CPUExecutionProvider"])
        ref = np.concatenate([fsess.run(None, b)[0].ravel() for b in evals])
        got = np.concatenate([qsess.run(None, b)[0].ravel() for b in evals])
    return sqnr_db(ref, got), cosine(ref, got)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zoo", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "zoo")
    ap.add_argument("--model", default="mobilenet_v2", choices=sorted(PREPROCESS))
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--eval", type=int, default=69)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tensors", choices=("all", "target"), default="all",
                    help="all float tensors, or those the spacemit target quantizes (simplified model)")
    ap.add_argument("--sqnr", action="store_true", help="also quantize and score each method")
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args()

    model_path = args.zoo / "models" / f"{args.model}.onnx"
    model = onnx.load(str(model_path))
    if args.tensors == "target":
        model, names = target_tensors(model)
        model_path = Path(tempfile.mkdtemp(prefix="bench_calib.")) / "simplified.onnx"
        onnx.save(model, str(model_path))
    else:
        names = float_tensors(model)
    source = source_from_batches(image_batches(args.zoo, args.model, "calib.txt", args.samples))
    so = session_options(args.threads)

    results = {}
    t0 = time.perf_counter()
    plain = collect_statistics(model, names, source, histograms=False, session_options=so)
    minmax_collect = time.perf_counter() - t0
    t0 = time.perf_counter()
    stats = collect_statistics(model, names, source, histograms=True, session_options=so)
    hist_collect = time.perf_counter() - t0
    evals = image_batches(args.zoo, args.model, "eval.txt", args.eval) if args.sqnr else []
    for method in METHODS:
        t0 = time.perf_counter()
        ranges = compute_ranges(plain if method == "minmax" else stats, method)
        seconds = (minmax_collect if method == "minmax" else hist_collect) + time.perf_counter() - t0
        row = {"seconds": round(seconds, 3)}
        if args.sqnr:
            sq, cos = quantized_scores(model_path, ranges, evals, args.threads)
            row.update(sqnr_db=round(sq, 2), cosine=round(cos, 5))
        results[method] = row
        print(method, row, flush=True)
    print(f"collection: minmax {minmax_collect:.2f}s, histograms {hist_collect:.2f}s "
          f"({len(names)} tensors, {args.samples} samples, {args.threads} thread(s))")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
