"""Compare a quantized model with its float model on evaluation data.

The data are read the way the config reads its calibration data (same input entries and
preprocessing, through ``xslim_ort.calibration.readers.XSlimDataReader``), but from the
evaluation lists given with ``--list`` (one per model input, in the order of the config's
entries), so the figures are measured on samples the calibration never saw.

    python scripts/eval_model.py FLOAT.onnx QUANT.onnx -c cfg.json --list eval.txt [--top1]

Printed, for one model output (``--output``, default the first):

* ``sqnr_db``: output SQNR over the whole set, 10·log10(Σ float² / Σ (float − int8)²), i.e.
  ``xslim_ort.qparams.sqnr_db`` of all outputs stacked (the figure ``xslim-ort zoo run``
  reports);
* ``cosine``: mean over samples of ``xslim_ort.qparams.cosine`` (float vs int8 output);
* ``worst_sqnr_db``: ``qparams.sqnr_db`` of the worst single sample;
* with ``--top1``: ``top1_agreement``, the share of samples whose argmax is the same;
* with ``--labels FILE`` (``path class_index`` lines): top-1 accuracy of both models;
* with ``--mask-threshold T``: IoU of the masks ``output > T`` of both models (detectors)
  and the number of distinct values in the int8 output.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from xslim_ort.calibration.readers import XSlimDataReader
from xslim_ort.config import load_config
from xslim_ort.errors import XSlimError
from xslim_ort.qparams import cosine, sqnr_db


def _session(path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _batches(config_path: str, lists: list[str], model: onnx.ModelProto, samples: int | None):
    cfg = load_config(config_path)
    if len(lists) != len(cfg.inputs):
        raise XSlimError(f"give one --list per input entry of the config ({len(cfg.inputs)}), got {len(lists)}")
    for entry, lst in zip(cfg.inputs, lists, strict=True):
        entry.data_list_path = str(Path(lst).resolve())
    reader = XSlimDataReader(cfg, model, max_batches=sys.maxsize, max_samples=samples)
    return iter(reader.get_next, None)


def _labelled_list(labels: Path, folder: Path) -> tuple[Path, np.ndarray]:
    lines = [line.rsplit(maxsplit=1) for line in labels.read_text("utf-8").splitlines() if line.strip()]
    lst = folder / "labelled_eval.txt"
    lst.write_text("".join(str((labels.parent / p).resolve()) + "\n" for p, _ in lines), "utf-8")
    return lst, np.asarray([int(c) for _, c in lines])


def evaluate(args: argparse.Namespace) -> dict[str, float]:
    for path in (args.float_model, args.quant_model):
        if not Path(path).is_file():
            raise XSlimError(f"model file not found: {path}")
    float_model = onnx.load(args.float_model, load_external_data=False)
    fsess, qsess = _session(args.float_model, args.threads), _session(args.quant_model, args.threads)
    output = args.output or fsess.get_outputs()[0].name
    signal = noise = 0.0
    cosines, worst = [], math.inf
    agree = count = 0
    inter = union = 0
    distinct: set[float] = set()
    for batch in _batches(args.config, args.list, float_model, args.samples):
        ref = fsess.run([output], batch)[0].astype(np.float64)
        test = qsess.run([output], batch)[0].astype(np.float64)
        signal += float(np.sum(ref * ref))
        noise += float(np.sum((ref - test) ** 2))
        for r, t in zip(ref, test, strict=True):
            cosines.append(cosine(r, t))
            worst = min(worst, sqnr_db(r, t))
        if args.top1:
            agree += int(np.sum(ref.reshape(len(ref), -1).argmax(1) == test.reshape(len(test), -1).argmax(1)))
        if args.mask_threshold is not None:
            fm, qm = ref > args.mask_threshold, test > args.mask_threshold
            inter += int(np.sum(fm & qm))
            union += int(np.sum(fm | qm))
            if len(distinct) < 100_000:
                distinct.update(np.unique(test.astype(np.float32)).tolist())
        count += len(ref)
    result = {
        "samples": count,
        "sqnr_db": 10.0 * math.log10(signal / noise) if noise else math.inf,
        "cosine": float(np.mean(cosines)),
        "worst_sqnr_db": worst,
    }
    if args.top1:
        result["top1_agreement"] = agree / count
    if args.mask_threshold is not None:
        result["mask_iou"] = inter / union if union else 1.0
        result["distinct_values"] = len(distinct)
    if args.labels is not None:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            lst, classes = _labelled_list(Path(args.labels), Path(tmp))
            hits, seen = [0, 0], 0
            for batch in _batches(args.config, [str(lst)], float_model, None):
                n = len(next(iter(batch.values())))
                for k, sess in enumerate((fsess, qsess)):
                    pred = sess.run([output], batch)[0].reshape(n, -1).argmax(1)
                    hits[k] += int(np.sum(pred == classes[seen : seen + n]))
                seen += n
        result["labelled_top1_float"] = hits[0] / seen
        result["labelled_top1_int8"] = hits[1] / seen
    return result


def _fmt(key: str, value: float) -> str:
    if key in ("samples", "distinct_values"):
        return str(value)
    if key.endswith("_db"):
        return f"{value:.2f}"
    return f"{value:.4f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("float_model", type=Path)
    parser.add_argument("quant_model", type=Path)
    parser.add_argument("-c", "--config", required=True, help="the xslim-ort config the model was quantized with")
    parser.add_argument(
        "--list", action="append", required=True, help="evaluation list, one per input entry, in entry order"
    )
    parser.add_argument("--output", help="model output to compare (default: the first)")
    parser.add_argument("--samples", type=int, help="use at most this many samples")
    parser.add_argument("--top1", action="store_true", help="also report top-1 agreement (classifiers)")
    parser.add_argument("--labels", help="'path class_index' file: top-1 accuracy of both models")
    parser.add_argument("--mask-threshold", type=float, help="mask IoU at this threshold (detectors)")
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime threads (default 2)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    try:
        result = evaluate(args)
    except XSlimError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return exc.exit_code
    if args.json:
        print(json.dumps(result))
    else:
        print(" ".join(f"{k} {_fmt(k, v)}" for k, v in result.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
