"""Quantize each model of a manifest, compare it with its float model, check the thresholds.

By default every model runs in a fresh process: a native crash in ONNX Runtime or in user
preprocessing then ends that process rather than the run, and each model's memory is given
back before the next one starts. The measurement (quantize, evaluate) happens in the
worker; the checks against thresholds and the baseline happen in the parent, so they are
the same whichever way the numbers were obtained.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import signal
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from ..calibration.readers import XSlimDataReader
from ..config import load_config
from ..errors import DataError, XSlimError
from ..qparams import cosine
from .manifest import ModelEntry, merge

log = logging.getLogger("xslim_ort")

#: Metrics are rounded to this many decimals, so result files are stable and a rerun that
#: measures the same model compares equal to its baseline.
DECIMALS = 6


@dataclass
class Measurement:
    """What one model measured, or why it could not be measured."""

    metrics: dict[str, float] = field(default_factory=dict)
    samples: dict[str, int] = field(default_factory=dict)
    timing: dict[str, float] = field(default_factory=dict)
    error: str | None = None


@dataclass(frozen=True)
class Check:
    """One threshold applied to one metric."""

    metric: str
    rule: str
    limit: float
    value: float
    passed: bool
    message: str


@dataclass
class ModelResult:
    name: str
    status: str  # "pass", "fail" or "error"
    metrics: dict[str, float]
    samples: dict[str, int]
    checks: list[Check]
    error: str | None
    baseline: dict[str, float] | None
    timing: dict[str, float]

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]


# --------------------------------------------------------------------------- measuring


def _session(path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # not ORT's notes on unused initializers of the float model
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _sqnr_db(signal_energy: float, noise_energy: float) -> float:
    """``qparams.sqnr_db`` over the whole set, from sums accumulated batch by batch."""
    if noise_energy == 0.0:
        return math.inf
    if signal_energy == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal_energy / noise_energy)


def _top1(output: np.ndarray) -> np.ndarray:
    """Argmax over the last axis: one prediction per row ([N, C] -> N, [N, S, C] -> N*S)."""
    return output.reshape(-1, output.shape[-1]).argmax(axis=1)


class _Comparison:
    """Float vs int8 outputs, accumulated so that large outputs (a detector's maps) are never all held."""

    def __init__(self) -> None:
        self.signal = 0.0
        self.noise = 0.0
        self.cosines: list[float] = []
        self.agree = 0
        self.rows = 0

    def add(self, ref: np.ndarray, test: np.ndarray) -> None:
        r, t = ref.astype(np.float64), test.astype(np.float64)
        self.signal += float(np.sum(r * r))
        self.noise += float(np.sum((r - t) ** 2))
        self.cosines.extend(cosine(a, b) for a, b in zip(r, t, strict=True))
        if ref.ndim >= 2:
            self.agree += int(np.sum(_top1(ref) == _top1(test)))
            self.rows += ref.size // ref.shape[-1]

    def metrics(self, wanted: tuple[str, ...]) -> dict[str, float]:
        out = {"sqnr_db": _sqnr_db(self.signal, self.noise), "cosine": float(np.mean(self.cosines))}
        if "top1_agreement" in wanted:
            if not self.rows:
                raise DataError("top1_agreement needs an output with a class axis ([batch, classes])")
            out["top1_agreement"] = self.agree / self.rows
        return {k: v for k, v in out.items() if k in wanted}


def _batches(config: dict, lists: list[Path], model: onnx.ModelProto, samples: int | None) -> Iterator[dict]:
    """Evaluation batches: the config's input entries and preprocessing, with the evaluation lists."""
    cfg = load_config(config)
    for entry, lst in zip(cfg.inputs, lists, strict=True):
        entry.data_list_path = str(lst)
    reader = XSlimDataReader(cfg, model, max_batches=sys.maxsize, max_samples=samples)
    return iter(reader.get_next, None)


def read_labels(labels: Path, folder: Path, samples: int | None) -> tuple[Path, np.ndarray]:
    """Turn a ``path class_index`` file into an image list (written to ``folder``) and the classes."""
    try:
        text = labels.read_text("utf-8-sig")
    except OSError as exc:
        raise DataError(f"{labels}: cannot read the labels file: {exc.strerror or exc}") from None
    paths, classes = [], []
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2 or not parts[1].isdigit():
            raise DataError(f"{labels}:{number}: expected 'path class_index', got {line.strip()!r}")
        paths.append(str((labels.parent / parts[0]).resolve()))
        classes.append(int(parts[1]))
    if not paths:
        raise DataError(f"{labels}: no labelled samples")
    paths, classes = paths[:samples], classes[:samples]
    lst = folder / "labelled.txt"
    lst.write_text("".join(p + "\n" for p in paths), "utf-8")
    return lst, np.asarray(classes)


def _output_name(entry: ModelEntry, *sessions: ort.InferenceSession) -> str:
    names = [o.name for o in sessions[0].get_outputs()]
    name = entry.output or names[0]
    for sess in sessions:
        have = [o.name for o in sess.get_outputs()]
        if name not in have:
            raise DataError(f"eval.output: the model has no output '{name}'; its outputs are: {', '.join(have)}")
    return name


def _labelled_accuracy(
    entry: ModelEntry,
    labels: Path,
    folder: Path,
    float_model: onnx.ModelProto,
    sessions: tuple[ort.InferenceSession, ort.InferenceSession],
    output: str,
) -> tuple[float, float, int]:
    """Top-1 accuracy of the float and the int8 model on the labelled images, and their count."""
    lst, classes = read_labels(labels, folder, entry.samples)
    hits = [0, 0]
    seen = 0
    for batch in _batches(entry.config, [lst], float_model, entry.samples):
        size = len(next(iter(batch.values())))
        for k, sess in enumerate(sessions):
            pred = _top1(sess.run([output], batch)[0])
            if len(pred) != size:
                raise DataError(f"labelled_top1 needs an output of shape [batch, classes]; '{output}' is not")
            hits[k] += int(np.sum(pred == classes[seen : seen + size]))
        seen += size
    return hits[0] / seen, hits[1] / seen, seen


def measure(entry: ModelEntry, work_dir: Path, threads: int) -> Measurement:
    """Quantize the model into ``work_dir/<name>/`` and measure what the manifest asks for."""
    from ..api import quantize_onnx_model

    folder = work_dir / entry.name
    folder.mkdir(parents=True, exist_ok=True)
    qpath = folder / f"{entry.name}.q.onnx"
    start = time.perf_counter()
    quantize_onnx_model(merge(entry.config, {"model_parameters": {"working_dir": str(folder)}}), output=qpath)
    quantized = time.perf_counter()

    float_model = onnx.load(entry.model, load_external_data=False)
    fsess, qsess = _session(entry.model, threads), _session(qpath, threads)
    output = _output_name(entry, fsess, qsess)
    comparison = _Comparison()
    for batch in _batches(entry.config, list(entry.eval_lists), float_model, entry.samples):
        comparison.add(fsess.run([output], batch)[0], qsess.run([output], batch)[0])
    result = Measurement(metrics=comparison.metrics(entry.metrics), samples={"eval": len(comparison.cosines)})
    if entry.labels is not None:
        float_acc, int8_acc, seen = _labelled_accuracy(entry, entry.labels, folder, float_model, (fsess, qsess), output)
        result.metrics.update(labelled_top1=int8_acc, float_labelled_top1=float_acc, top1_drop=float_acc - int8_acc)
        result.samples["labelled"] = seen
    result.metrics = {k: round(float(v), DECIMALS) for k, v in sorted(result.metrics.items())}
    result.timing = {"quantize_s": round(quantized - start, 1), "evaluate_s": round(time.perf_counter() - quantized, 1)}
    return result


def _describe_error(exc: BaseException) -> str:
    if isinstance(exc, XSlimError):
        return exc.message
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {first}"


def measure_safely(entry: ModelEntry, work_dir: Path, threads: int) -> Measurement:
    """``measure``, with any failure turned into the measurement's error (the run goes on)."""
    try:
        return measure(entry, work_dir, threads)
    except Exception as exc:  # one model's failure, whatever it is, must not stop the others
        log.debug("%s failed", entry.name, exc_info=True)
        return Measurement(error=_describe_error(exc))


def _worker(conn: Connection, entry: ModelEntry, work_dir: Path, threads: int, log_level: int) -> None:
    """The worker process: same log level as the parent, one measurement sent back."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(log_level)
    log.propagate = False
    conn.send(measure_safely(entry, work_dir, threads))
    conn.close()


def _death(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = str(-exitcode)
        return f"the worker process was killed by signal {name} (a crash in native code, or out of memory)"
    return f"the worker process exited with code {exitcode} without a result"


def measure_isolated(entry: ModelEntry, work_dir: Path, threads: int) -> Measurement:
    """``measure_safely`` in a fresh (spawned) process; a crash of that process becomes the error."""
    ctx = multiprocessing.get_context("spawn")
    receiver, sender = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_worker, args=(sender, entry, work_dir, threads, log.getEffectiveLevel()))
    proc.start()
    sender.close()
    try:
        try:
            outcome: Measurement | None = receiver.recv()
        except EOFError:
            outcome = None
        proc.join()
    finally:
        if proc.is_alive():
            proc.terminate()
            proc.join()
    return outcome if outcome is not None else Measurement(error=_death(proc.exitcode))


# --------------------------------------------------------------------------- checking


def fmt(metric: str, value: float) -> str:
    """dB with 2 decimals, fractions and cosines with 4."""
    if not math.isfinite(value):
        return str(value)
    return f"{value:.2f}" if metric == "sqnr_db" else f"{value:.4f}"


def _frac(value: float) -> str:
    return fmt("top1_agreement", value)


def _at_least(metric: str, rule: str, limit: float, value: float) -> Check:
    passed = value >= limit
    message = f"{metric} {fmt(metric, value)} {'>=' if passed else '<'} {fmt(metric, limit)} ({rule})"
    return Check(metric, rule, limit, value, passed, message)


def check_thresholds(
    entry: ModelEntry, metrics: Mapping[str, float], baseline: Mapping[str, float] | None
) -> list[Check]:
    """The entry's thresholds on ``metrics``; regressions only where the baseline has the metric."""
    t = entry.thresholds
    checks = []
    if t.min_top1_agreement is not None:
        checks.append(
            _at_least("top1_agreement", "min_top1_agreement", t.min_top1_agreement, metrics["top1_agreement"])
        )
    if t.max_top1_drop is not None:
        drop = metrics["top1_drop"]
        passed = drop <= t.max_top1_drop
        message = (
            f"labelled_top1 drop {_frac(drop)} {'<=' if passed else '>'} {_frac(t.max_top1_drop)} (max_top1_drop; "
            f"float {_frac(metrics['float_labelled_top1'])}, int8 {_frac(metrics['labelled_top1'])})"
        )
        checks.append(Check("labelled_top1", "max_top1_drop", t.max_top1_drop, drop, passed, message))
    if t.min_sqnr_db is not None:
        checks.append(_at_least("sqnr_db", "min_sqnr_db", t.min_sqnr_db, metrics["sqnr_db"]))
    if t.min_cosine is not None:
        checks.append(_at_least("cosine", "min_cosine", t.min_cosine, metrics["cosine"]))
    for metric, limit in sorted(t.max_regression.items()):
        if baseline is None or metric not in baseline:
            continue
        value, base = metrics[metric], baseline[metric]
        change = value - base
        passed = change >= -limit
        message = (
            f"{metric} {fmt(metric, value)} vs baseline {fmt(metric, base)} "
            f"({'+' if change >= 0 else ''}{fmt(metric, change)}; max_regression {fmt(metric, limit)})"
        )
        checks.append(Check(metric, "max_regression", limit, value, passed, message))
    return checks


def run_models(
    entries: list[ModelEntry],
    work_dir: Path,
    *,
    threads: int = 2,
    isolate: bool = True,
    baseline: Mapping[str, Mapping[str, float]] | None = None,
    echo: Callable[[str], None] = print,
) -> list[ModelResult]:
    """Measure and check every entry in turn, with a progress line per model; never stops early."""
    results = []
    run = measure_isolated if isolate else measure_safely
    for k, entry in enumerate(entries, start=1):
        tag = f"[{k}/{len(entries)}] {entry.name}"
        echo(f"{tag}: quantizing and evaluating")
        start = time.perf_counter()
        m = run(entry, work_dir, threads)
        base = dict(baseline[entry.name]) if baseline is not None and entry.name in baseline else None
        checks = [] if m.error else check_thresholds(entry, m.metrics, base)
        status = "error" if m.error else "fail" if any(not c.passed for c in checks) else "pass"
        results.append(ModelResult(entry.name, status, m.metrics, m.samples, checks, m.error, base, m.timing))
        took = f"[{time.perf_counter() - start:.1f} s]"
        if m.error:
            echo(f"{tag}: ERROR {m.error} {took}")
            continue
        shown = ", ".join(f"{name} {fmt(name, m.metrics[name])}" for name in entry.metrics)
        echo(f"{tag}: {status.upper()} {shown} {took}")
        for c in results[-1].failures:
            echo(f"    {c.message}")
    return results
