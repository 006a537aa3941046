"""xslim-ort against ONNX Runtime's quantize_static, side by side, on identical calibration tensors.

For each model: the calibration and evaluation samples are preprocessed once, as the zoo
manifest's config says, and saved as .npy tensors; every quantizer then calibrates on
those same tensors (xslim-ort through a config with npy lists, ORT through a
CalibrationDataReader over the same files). Each quantization runs in a fresh
interpreter, which reports its wall time and peak RSS. The parent then scores every int8
model against the float model on the evaluation tensors (output SQNR, top-1 agreement)
and times them at batch 1 on one thread, interleaving the models run by run so that load
on a shared machine hits all of them alike.

ORT gets its documented flow: ``quant_pre_process`` (shape inference and graph
optimization, not timed), then QDQ with int8 activations and weights. An xslim 2.1.2
column is added when ``--xslim-python`` names an interpreter where ``import xslim`` works.

    python scripts/bench_vs_ort.py [--models mobilenet_v2 efficientnet_lite0] [--runs 100]
        [--xslim-python /path/to/xslim-env/bin/python] [--doc docs/benchmarks.md]

Only the standard library is imported at the top: the child for xslim 2.1.2 runs under
another interpreter that has no xslim-ort.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- bench_vs_ort:begin -->", "<!-- bench_vs_ort:end -->"
REFERENCE = "ORT MinMax per-channel"

#: (label, quantizer, options). xslim-ort's defaults are calibration_type default, finetune_level 1.
VARIANTS: list[tuple[str, str, dict[str, Any]]] = [
    ("xslim-ort defaults (default, finetune 1)", "xslim-ort", {}),
    ("xslim-ort minmax, finetune 1", "xslim-ort", {"calibration_type": "minmax"}),
    ("xslim-ort percentile, finetune 1", "xslim-ort", {"calibration_type": "percentile"}),
    ("xslim-ort default, finetune 0", "xslim-ort", {"finetune_level": 0}),
    ("xslim-ort default, finetune 2", "xslim-ort", {"finetune_level": 2}),
    ("ORT MinMax per-tensor", "ort", {"method": "MinMax", "per_channel": False}),
    (REFERENCE, "ort", {"method": "MinMax", "per_channel": True}),
    ("ORT Percentile per-channel", "ort", {"method": "Percentile", "per_channel": True}),
]
XSLIM_212 = ("xslim 2.1.2 defaults", "xslim", {})
#: --suite calibration: the five range methods alone (no tuning) against ORT's calibrators.
CALIBRATION_VARIANTS: list[tuple[str, str, dict[str, Any]]] = [
    *[
        (f"xslim-ort {m}", "xslim-ort", {"calibration_type": m, "finetune_level": 0})
        for m in ("minmax", "default", "kl", "percentile", "mse")
    ],
    (REFERENCE, "ort", {"method": "MinMax", "per_channel": True}),
    ("ORT Entropy per-channel", "ort", {"method": "Entropy", "per_channel": True}),
    ("ORT Percentile per-channel", "ort", {"method": "Percentile", "per_channel": True}),
]
#: ORT's histogram calibrators keep every activation: past this many samples they would need
#: more RAM than the benchmark machine has (4.2 GB at 64 on MobileNetV2), so they are not run.
ORT_MAX_RSS_SAMPLES = 64


# --------------------------------------------------------------------------- child side


def _xslim_config(spec: dict[str, Any]) -> dict[str, Any]:
    """An XSlim config calibrating on the saved tensors (valid for xslim-ort and xslim 2.1.2)."""
    options = dict(spec["options"])
    qp = {"analysis_enable": False}
    if "finetune_level" in options:
        qp["finetune_level"] = options.pop("finetune_level")
    return {
        "model_parameters": {"onnx_model": spec["model"], "working_dir": spec["workdir"]},
        "calibration_parameters": {
            "calibration_device": "cpu",
            "calibration_step": spec["count"],
            **options,
            "input_parametres": [
                {"input_name": name, "file_type": "npy", "data_list_path": lst} for name, lst in spec["lists"]
            ],
        },
        "quantization_parameters": qp,
    }


def _npy_reader(lists: list[list[str]]) -> Any:
    import numpy as np
    from onnxruntime.quantization import CalibrationDataReader

    class NpyReader(CalibrationDataReader):
        """The saved calibration tensors, one sample per batch, in list order."""

        def __init__(self) -> None:
            columns = {name: Path(lst).read_text().split() for name, lst in lists}
            count = len(next(iter(columns.values())))
            self.batches = iter(
                [{name: np.load(Path(lst).parent / columns[name][i]) for name, lst in lists} for i in range(count)]
            )

        def get_next(self) -> dict | None:
            return next(self.batches, None)

    return NpyReader()


def run_child(spec: dict[str, Any]) -> dict[str, float]:
    """One quantization in this (fresh) process: wall time of the call, and the process's peak RSS."""
    kind = spec["kind"]
    if kind == "ort":
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

        reader = _npy_reader(spec["lists"])  # loaded before the clock starts, like xslim-ort's lists
        start = time.perf_counter()
        quantize_static(
            spec["ort_model"],
            spec["output"],
            reader,
            quant_format=QuantFormat.QDQ,
            per_channel=spec["options"]["per_channel"],
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod[spec["options"]["method"]],
        )
    else:
        quantize = __import__("xslim_ort" if kind == "xslim-ort" else "xslim").quantize_onnx_model
        start = time.perf_counter()
        quantize(_xslim_config(spec), spec["model"], spec["output"])
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


# --------------------------------------------------------------------------- parent side


def save_tensors(entry: Any, folder: Path, lists: tuple[Path, ...], count: int, stem: str) -> list[list[str]]:
    """Preprocess ``count`` samples of ``lists`` as the entry's config says; one .npy per sample and input."""
    import numpy as np
    import onnx

    from xslim_ort.calibration.readers import XSlimDataReader
    from xslim_ort.config import load_config

    cfg = load_config(entry.config)
    for inp, lst in zip(cfg.inputs, lists, strict=True):
        inp.data_list_path = str(lst)
    reader = XSlimDataReader(cfg, onnx.load(entry.model, load_external_data=False), max_batches=count)
    folder.mkdir(parents=True, exist_ok=True)
    names: dict[str, list[str]] = {}
    for i, batch in enumerate(iter(reader.get_next, None)):
        for name, arr in batch.items():
            file = f"{stem}_{name}_{i:04d}.npy"
            np.save(folder / file, arr)
            names.setdefault(name, []).append(file)
    out = []
    for name, files in names.items():
        lst = folder / f"{stem}_{name}.txt"
        lst.write_text("\n".join(files) + "\n")
        out.append([name, str(lst)])
    return out


def repeat_lists(lists: tuple[Path, ...], count: int, folder: Path) -> tuple[Path, ...]:
    """The lists' samples repeated up to ``count`` lines (the zoo has 64 calibration images)."""
    from xslim_ort.calibration.readers import read_list

    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for k, lst in enumerate(lists):
        paths = [str(sample.path) for sample in read_list(lst)]
        lines = [paths[i % len(paths)] for i in range(count)]
        target = folder / f"list{k}.txt"
        target.write_text("\n".join(lines) + "\n")
        out.append(target)
    return tuple(out)


def quantize_in_child(spec: dict[str, Any], python: str) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(spec, f)
    try:
        proc = subprocess.run([python, __file__, "--child", f.name], capture_output=True, text=True)
    finally:
        os.unlink(f.name)
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
        return {"error": lines[-1] if lines else f"exit code {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def xslim_212_available(python: str | None) -> bool:
    if not python:
        return False
    try:
        check = subprocess.run([python, "-c", "import xslim"], capture_output=True, timeout=120)
    except OSError:
        return False
    return check.returncode == 0


def _session(path: Path) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _load_batches(lists: list[list[str]]) -> list[dict[str, Any]]:
    import numpy as np

    columns = {name: Path(lst).read_text().split() for name, lst in lists}
    count = len(next(iter(columns.values())))
    return [{name: np.load(Path(lst).parent / columns[name][i]) for name, lst in lists} for i in range(count)]


def score(float_path: Path, models: dict[str, Path], eval_lists: list[list[str]], output: str | None, runs: int):
    """SQNR and top-1 agreement on the evaluation tensors; latency at batch 1, one thread, interleaved."""
    import numpy as np

    from xslim_ort.qparams import sqnr_db

    batches = _load_batches(eval_lists)
    sessions = {"float": _session(float_path), **{label: _session(p) for label, p in models.items()}}
    name = output or sessions["float"].get_outputs()[0].name
    outs = {label: np.concatenate([s.run([name], b)[0] for b in batches]) for label, s in sessions.items()}
    ref = outs["float"]
    results: dict[str, dict[str, float]] = {}
    for label in models:
        res = {"sqnr_db": sqnr_db(ref, outs[label])}
        if ref.ndim == 2:
            res["top1_agreement"] = float(np.mean(ref.argmax(1) == outs[label].argmax(1)))
        results[label] = res
    feed = batches[0]
    times: dict[str, list[float]] = {label: [] for label in sessions}
    for _ in range(3):
        for s in sessions.values():
            s.run([name], feed)
    for _ in range(runs):
        for label, s in sessions.items():
            start = time.perf_counter()
            s.run([name], feed)
            times[label].append(time.perf_counter() - start)
    float_ms = statistics.median(times["float"]) * 1000
    for label in models:
        results[label]["latency_ratio"] = statistics.median(times[label]) * 1000 / float_ms
    return results, float_ms, len(batches)


def bench_model(args: argparse.Namespace, entry: Any, variants: list, work: Path) -> dict[str, Any]:
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from xslim_ort.config import load_config

    print(f"{entry.name}: saving calibration and evaluation tensors", file=sys.stderr)
    calib_lists = tuple(Path(inp.data_list_path) for inp in load_config(entry.config).inputs)
    calib = save_tensors(entry, work / "calib", calib_lists, args.calib, "calib")
    evals = save_tensors(entry, work / "eval", entry.eval_lists, args.eval, "eval")
    ort_model = work / "ort_pre.onnx"
    quant_pre_process(str(entry.model), str(ort_model))
    count = len(Path(calib[0][1]).read_text().split())
    rows: dict[str, dict[str, Any]] = {}
    models: dict[str, Path] = {}
    rss_lists: dict[int, Any] = {}
    for k, (label, kind, options) in enumerate(variants):
        print(f"{entry.name}: {label}", file=sys.stderr)
        out = work / f"q{k}.onnx"
        spec = {
            "kind": kind,
            "options": options,
            "model": str(entry.model),
            "ort_model": str(ort_model),
            "output": str(out),
            "lists": calib,
            "count": count,
            "workdir": str(work / f"w{k}"),
        }
        python = args.xslim_python if kind == "xslim" else sys.executable
        rows[label] = quantize_in_child(spec, python)
        if "error" not in rows[label]:
            models[label] = out
        for n in args.rss_samples:
            if kind == "ort" and options["method"] != "MinMax" and n > ORT_MAX_RSS_SAMPLES:
                continue
            if n not in rss_lists:
                repeated = repeat_lists(calib_lists, n, work / f"rss{n}")
                rss_lists[n] = save_tensors(entry, work / f"rss{n}", repeated, n, f"rss{n}")
            sub = {
                **spec,
                "lists": rss_lists[n],
                "count": n,
                "output": str(work / f"rss{k}_{n}.onnx"),
                "workdir": str(work / f"w{k}_{n}"),
            }
            rows[label][f"rss_{n}"] = quantize_in_child(sub, python).get("peak_rss_mib")
    scores, float_ms, n_eval = score(entry.model, models, evals, entry.output, args.runs)
    for label, res in scores.items():
        rows[label].update(res)
    return {
        "name": entry.name,
        "rows": rows,
        "float_ms": float_ms,
        "calib": count,
        "eval": n_eval,
        "rss_samples": list(args.rss_samples),
    }


def _f(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def table(result: dict[str, Any], runs: int) -> list[str]:
    ref = result["rows"].get(REFERENCE, {}).get("seconds")
    rss_n = result.get("rss_samples", [])
    rss_head = "".join(f" peak RSS @{n} (MiB) |" for n in rss_n)
    if len(rss_n) == 2:
        rss_head += f" RSS @{rss_n[1]} ÷ @{rss_n[0]} |"
    lines = [
        f"### {result['name']}",
        "",
        f"{result['calib']} calibration / {result['eval']} evaluation samples; float latency "
        f"{result['float_ms']:.2f} ms (median of {runs}, batch 1, 1 thread).",
        "",
        f"| method | time ÷ {REFERENCE} | time (s) | peak RSS (MiB) | SQNR (dB) | top-1 agreement "
        f"| int8/float latency |{rss_head}",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |" + " ---: |" * (rss_head.count("|")),
    ]
    for label, row in result["rows"].items():
        if "error" in row:
            lines.append(f"| {label} | failed: {row['error'].replace('|', '/')} | | | | | |")
            continue
        ratio = row["seconds"] / ref if ref else None
        cells = [
            label,
            _f(ratio, ".2f"),
            _f(row["seconds"], ".1f"),
            _f(row["peak_rss_mib"], ".0f"),
            _f(row.get("sqnr_db"), ".2f"),
            _f(row.get("top1_agreement"), ".4f"),
            _f(row.get("latency_ratio"), ".2f"),
            *[_f(row.get(f"rss_{n}"), ".0f") for n in rss_n],
        ]
        if len(rss_n) == 2:
            small, large = row.get(f"rss_{rss_n[0]}"), row.get(f"rss_{rss_n[1]}")
            cells.append(_f(large / small if small and large else None, ".2f"))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def environment() -> str:
    import onnxruntime as ort

    import xslim_ort

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain"], capture_output=True, text=True)
    commit = rev.stdout.strip() + (" with uncommitted changes" if dirty.stdout.strip() else "")
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (
        f"xslim-ort {xslim_ort.__version__} (commit {commit}), onnxruntime {ort.__version__}, "
        f"Python {platform.python_version()}, {cpu}, {os.cpu_count()} cores, load average {load} at the start "
        "(times and latencies are only as steady as the machine)"
    )


def write_doc(path: Path, block: str, suite: str = "main") -> None:
    """Replace the suite's generated block of the doc (or create the doc), keeping the hand-written rest."""
    begin, end = (BEGIN, END) if suite == "main" else (BEGIN.replace(":", f"-{suite}:"), END.replace(":", f"-{suite}:"))
    text = path.read_text("utf-8") if path.exists() else "# Benchmarks\n"
    if begin not in text:
        text = text.rstrip() + f"\n\n{begin}\n{end}\n"
    head, sep, rest = text.partition(begin)
    _, sep2, tail = rest.partition(end)
    if not (sep and sep2):
        raise SystemExit(f"{path}: the markers {begin} and {end} are missing")
    path.write_text(f"{head}{begin}\n{block}\n{end}{tail}", "utf-8")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", type=Path, default=REPO / "zoo" / "manifest.json")
    parser.add_argument("--models", nargs="+", default=["mobilenet_v2"])
    parser.add_argument("--calib", type=int, default=64, help="calibration samples")
    parser.add_argument("--eval", type=int, default=69, help="evaluation samples")
    parser.add_argument("--runs", type=int, default=100, help="timed runs per model for the latency median")
    parser.add_argument("--xslim-python", help="interpreter of an env with xslim 2.1.2, for its column")
    parser.add_argument("--doc", type=Path, help="write the tables into this Markdown file, between the markers")
    parser.add_argument(
        "--suite",
        choices=("main", "calibration"),
        default="main",
        help="main: defaults and options; calibration: the five range methods vs ORT's",
    )
    parser.add_argument(
        "--rss-samples",
        nargs="*",
        type=int,
        default=[],
        help="also measure peak RSS at these calibration sample counts (e.g. 32 256)",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_child(json.loads(Path(args.child).read_text()))))
        return 0

    from xslim_ort.errors import XSlimError
    from xslim_ort.zoo.manifest import load_manifest

    try:
        manifest = load_manifest(args.manifest)
        entries = manifest.select(args.models)
    except XSlimError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    variants = list(VARIANTS if args.suite == "main" else CALIBRATION_VARIANTS)
    note = "xslim 2.1.2: not installed (give --xslim-python PATH of an env where `import xslim` works)."
    if xslim_212_available(args.xslim_python):
        variants.append(XSLIM_212)
        note = f"xslim 2.1.2 from {args.xslim_python}."
    lines = [f"Produced by `{shlex.join(['python', 'scripts/bench_vs_ort.py', *sys.argv[1:]])}`", ""]
    lines += [f"Environment: {environment()}.", "", note, ""]
    for entry in entries:
        with tempfile.TemporaryDirectory(prefix="bench-vs-ort-") as tmp:
            result = bench_model(args, entry, variants, Path(tmp))
        lines += [*table(result, args.runs), ""]
    block = "\n".join(lines).rstrip() + "\n"
    print(block)
    if args.doc:
        write_doc(args.doc, block, args.suite)
    return 0


if __name__ == "__main__":
    sys.exit(main())
