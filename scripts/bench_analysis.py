"""Time the quantization analysis on a zoo model quantized by ONNX Runtime's quantize_static.

    python scripts/bench_analysis.py [mobilenet_v2|efficientnet_lite0] [--samples 32] [--threads 1]

Calibrates on the first 16 images of the zoo's calib.txt, analyses on the next ``--samples``
ones, prints the time of each phase and the console summary. Needs the zoo (``XSLIM_ORT_ZOO``
or ``../shared/zoo``).
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

from xslim_ort.analysis import analyze
from xslim_ort.calibration.batches import source_from_batches

NORMALIZE = {
    "mobilenet_v2": lambda x: (x / 255 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225]),
    "efficientnet_lite0": lambda x: (x - 127) / 128,
}


def load_images(zoo: Path, model: str, lines: list[str]) -> list[dict[str, np.ndarray]]:
    """RGB, short side 256, centre crop 224, the model's normalisation, NCHW (the zoo README)."""
    out = []
    for rel in lines:
        img = cv2.imread(str(zoo / "images" / rel))[:, :, ::-1]
        h, w = img.shape[:2]
        s = 256 / min(h, w)
        img = cv2.resize(img, (round(w * s), round(h * s)), interpolation=cv2.INTER_LINEAR)
        h, w = img.shape[:2]
        top, left = (h - 224) // 2, (w - 224) // 2
        x = NORMALIZE[model](img[top : top + 224, left : left + 224].astype(np.float32))
        out.append({"input": x.transpose(2, 0, 1)[None].astype(np.float32)})
    return out


class _Reader(CalibrationDataReader):
    def __init__(self, batches: list[dict[str, np.ndarray]]) -> None:
        self._it = iter(batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default="mobilenet_v2", choices=sorted(NORMALIZE))
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    zoo = Path(os.environ.get("XSLIM_ORT_ZOO", Path(__file__).resolve().parents[2] / "shared" / "zoo"))
    lines = (zoo / "images" / "calib.txt").read_text().split()
    calib = load_images(zoo, args.model, lines[:16])
    data = load_images(zoo, args.model, lines[16 : 16 + args.samples])
    with tempfile.TemporaryDirectory() as tmp:
        fpath, qpath = Path(tmp) / "f.onnx", Path(tmp) / "q.onnx"
        quant_pre_process(str(zoo / "models" / f"{args.model}.onnx"), str(fpath), skip_symbolic_shape=True)
        quantize_static(
            str(fpath),
            str(qpath),
            _Reader(calib),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            per_channel=True,
        )
        logging.basicConfig(level=logging.INFO, format="%(relativeCreated)7.0f ms  %(message)s")
        start = time.perf_counter()
        report = analyze(fpath, qpath, source_from_batches(data), max_samples=args.samples, num_threads=args.threads)
        elapsed = time.perf_counter() - start
    print(report.console_summary())
    print(
        f"{args.model}: analysis of {report.samples} samples, {len(report.layers)} tensors, "
        f"{args.threads} thread(s): {elapsed:.1f} s"
    )


if __name__ == "__main__":
    main()
