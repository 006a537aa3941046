"""Static int8 quantization (precision levels 0-2): calibrate, tune, place Q/DQ, analyse."""

from __future__ import annotations

import logging
import math
from collections.abc import Collection
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING

import onnx

from .calibration.batches import BatchSource
from .calibration.cache import build_batch_source
from .calibration.collectors import collect_statistics
from .calibration.methods import compute_ranges, needs_histogram
from .calibration.range_cache import fingerprint, load_ranges, save_ranges
from .calibration.readers import data_fingerprint, list_file_path, providers_for, read_list, resolve_inputs
from .config import Config
from .errors import ConfigError, DataError
from .model_io import needs_external_data
from .pipeline import Job, prepare_model
from .quantizer import TargetQuantizer, activations_to_calibrate, weight_rules
from .regions import excluded_nodes, tensor_methods
from .sensitivity import dequantize_tensors, level2_float_nodes, select_float_tensors

if TYPE_CHECKING:
    from .tuning.schemes import WeightScheme

log = logging.getLogger("xslim_ort")

SMOOTHING_BATCHES = 8  # calibration batches whose activations choose smoothing and weight clipping


def check_static_inputs(config: Config) -> None:
    """Static quantization needs calibration data for every input."""
    if not config.inputs:
        raise ConfigError(
            "calibration_parameters.input_parametres: static quantization needs calibration data "
            "(one entry per model input, each with a data_list_path)"
        )
    for i, entry in enumerate(config.inputs):
        if not entry.data_list_path:
            raise ConfigError(f"calibration_parameters.input_parametres[{i}].data_list_path is required")
        for sample in read_list(list_file_path(config, entry, i)):  # fail before any slow stage
            if not sample.path.is_file():
                raise DataError(f"{sample.where}: file not found: {sample.path}")


def quantize_static_job(job: Job) -> onnx.ModelProto:
    """Static quantization from a config: data from its input lists."""
    cfg = job.config
    check_static_inputs(cfg)
    specs = resolve_inputs(cfg, job.model)
    model = prepare_model(job, {spec.name: list(spec.shape) for _, spec in specs})
    max_batches = cfg.calibration_parameters.calibration_step
    with build_batch_source(cfg, model, cache_dir=job.working_dir, max_batches=max_batches) as source:
        return quantize_with_source(job, model, source, data_fingerprint(cfg, model))


def quantize_with_source(
    job: Job,
    model: onnx.ModelProto,
    source: BatchSource,
    data_key: str,
    *,
    extra_excluded: Collection[str] = (),
    range_cache_dir: Path | None = None,
    cache_ranges: bool = True,
) -> onnx.ModelProto:
    """Calibrate on ``source``, tune, place Q/DQ by the target and (optionally) analyse."""
    cfg = job.config
    cp, qp = cfg.calibration_parameters, cfg.quantization_parameters
    excluded = excluded_nodes(model, cfg, job.target) | set(extra_excluded)
    float_model = model  # what the analysis compares against: the user's function, unsmoothed
    if qp.finetune_level >= 1:
        model = condition_matmuls(job, model, source, excluded)
        excluded = excluded_nodes(model, cfg, job.target) | set(extra_excluded)
    fixed: dict[str, str] = {}
    if qp.precision_level == 2:  # known before calibrating: tensors their float ops expose need ranges too
        fixed = {k: v for k, v in level2_float_nodes(model, job.target).items() if k not in excluded}
        excluded |= set(fixed)
    tensors = activations_to_calibrate(model, job.target, excluded)
    if not tensors:
        log.warning("the model has no op the '%s' target quantizes; it is written unquantized", job.target.name)
        return model
    methods = tensor_methods(model, cfg, tensors)
    method_names = {t: m[0] for t, m in methods.items()}
    percentiles = {t: m[1] for t, m in methods.items()}

    cache_dir = range_cache_dir or job.working_dir
    settings = {"methods": sorted(method_names.items()), "percentiles": sorted(percentiles.items())}
    key = fingerprint(model, data_key, settings)
    ranges = load_ranges(cache_dir, key) if cache_ranges else None
    if ranges is None:
        hist = {t for t, m in method_names.items() if needs_histogram(m)}
        with job.progress("calibrating", None) as advance:
            stats = collect_statistics(
                model,
                tensors,
                source,
                histograms=hist,
                providers=providers_for(cp.calibration_device),
                progress=advance,
            )
        ranges = compute_ranges(stats, method_names, max_percentile=percentiles)
        if cache_ranges:
            save_ranges(cache_dir, key, ranges)
    else:
        log.info("reusing calibrated ranges from the range cache in %s", cache_dir)
    missing = [t for t in tensors if t not in ranges]
    if missing:
        log.warning("%d tensor(s) produced no float values during calibration and stay float", len(missing))

    float_kept: dict[str, str] = {}
    float_tensors: dict[str, str] = {}
    if qp.precision_level in (1, 2):
        float_tensors = choose_float(job, model, ranges, source, excluded, fixed)
        float_kept = {**fixed, **float_tensors}

    def build(m: onnx.ModelProto, r: dict[str, tuple[float, float]]) -> onnx.ModelProto:
        q = TargetQuantizer(m, job.target, r, nodes_to_exclude=excluded, bias=qp.bias_mode).quantize_model()
        if float_tensors:
            dequantize_tensors(q, m, float_tensors)
        return q

    qmodel = build(model, ranges)
    if qp.finetune_level >= 1:
        tuned_model, tuned_ranges = tune(job, model, source, ranges, tensors, excluded, float_kept)
        tuned = build(tuned_model, tuned_ranges)
        if needs_external_data(model):  # too big to compare in memory: trust the block-wise checks
            before = after = math.nan
        else:
            before, after = output_sqnr(model, [qmodel, tuned], source)
        if not after < before:
            log.info("finetune_level %d: output SQNR %.2f -> %.2f dB", qp.finetune_level, before, after)
            qmodel = tuned
        else:
            log.warning(
                "finetune_level %d lowered the output SQNR on the calibration data (%.2f -> %.2f dB); "
                "keeping the untuned model",
                qp.finetune_level,
                before,
                after,
            )
    if qp.analysis_enable:  # against the user's float model, not the tuned one
        write_analysis(job, float_model, qmodel, source, float_kept)
    return qmodel


def output_sqnr(
    float_model: onnx.ModelProto, models: list[onnx.ModelProto], source: BatchSource, max_batches: int = 16
) -> list[float]:
    """Output SQNR (dB, over all outputs) of each model against the float one on calibration batches."""
    import numpy as np
    import onnxruntime as ort

    from .qparams import sqnr_db

    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    outs = []
    for m in (float_model, *models):  # one at a time: sessions run in turns spin their thread pools against each other
        sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
        batches = (batch for _, batch in zip(range(max_batches), source(), strict=False))
        outs.append(np.concatenate([o.ravel() for batch in batches for o in sess.run(None, batch)]))
        del sess
    return [sqnr_db(outs[0], o) for o in outs[1:]]


def tune(
    job: Job,
    model: onnx.ModelProto,
    source: BatchSource,
    ranges: dict[str, tuple[float, float]],
    tensors: list[str],
    excluded: set[str],
    float_kept: Collection[str] = (),
) -> tuple[onnx.ModelProto, dict[str, tuple[float, float]]]:
    """finetune_level 1-3: tuned float weights (some already on the int8 grid) and ranges.

    Tensors and weights kept float by the precision level are left out of the simulation.
    """
    from .tuning import finetune

    level = job.config.quantization_parameters.finetune_level
    schemes = {n: s for n, s in weight_schemes(job, model, excluded).items() if n not in float_kept}
    with job.progress(f"finetune_level {level}", None) as advance:
        result = finetune(
            model,
            source,
            level,
            ranges=ranges,
            quantized_tensors=[t for t in tensors if t in ranges and t not in float_kept],
            weight_schemes=schemes,
            progress=lambda record: advance(1),
        )
    return result.model, {**ranges, **result.range_overrides}


def weight_schemes(job: Job, model: onnx.ModelProto, excluded: Collection[str]) -> dict[str, WeightScheme]:
    """How the target will quantize each weight of ``model`` (tuning and conditioning simulate it)."""
    from .tuning.schemes import WeightScheme

    return {n: WeightScheme(axis=a, power_of_two=p) for n, (a, p) in weight_rules(model, job.target, excluded).items()}


def condition_matmuls(job: Job, model: onnx.ModelProto, source: BatchSource, excluded: set[str]) -> onnx.ModelProto:
    """finetune_level >= 1: smooth matmul inputs into their weights, then clip per-tensor weights.

    Both are measured on a few calibration batches and kept only where the matmul's output
    error goes down; smoothing is exact in float, clipping changes only outlier weights.
    """
    from .tuning.clip import clip_weights
    from .tuning.smooth import smooth_model

    if needs_external_data(model):
        log.info("activation smoothing and weight clipping skipped: the model is too large to probe in memory")
        return model
    batches = list(islice(source(), SMOOTHING_BATCHES))
    model, smoothed = smooth_model(model, batches, weight_schemes(job, model, excluded), excluded)
    # smoothing renames the weights it scales: their schemes are read off the new model
    model, clipped = clip_weights(model, batches, weight_schemes(job, model, excluded), excluded)
    if smoothed or clipped:
        log.info("%d matmul input(s) smoothed into their weights, %d weight(s) clipped", smoothed, clipped)
    return model


def choose_float(
    job: Job, model: onnx.ModelProto, ranges: dict, source: BatchSource, excluded: set[str], fixed: dict[str, str]
) -> dict[str, str]:
    """Precision levels 1-2: the tensors to keep float, on top of ``excluded`` (with level 2's ``fixed`` set).

    Measured on the untuned model, so that tuning then only adjusts what stays int8. Each
    entry carries the measurement that put it there.
    """
    level = job.config.quantization_parameters.precision_level
    probe = TargetQuantizer(model, job.target, ranges, nodes_to_exclude=excluded, keep_activations=True)
    with job.progress(f"precision_level {level}: measuring sensitivity", None):
        result = select_float_tensors(model, probe.quantize_model(), job.target, source, level, fixed_float=fixed)
    for name, reason in sorted({**result.float_nodes, **result.float_tensors}.items()):
        log.debug("kept float: %s (%s)", name, reason)
    return result.float_tensors


def write_analysis(
    job: Job,
    float_model: onnx.ModelProto,
    qmodel: onnx.ModelProto,
    source: BatchSource,
    float_kept: dict[str, str] | None = None,
) -> list[Path]:
    from .analysis import analyze

    qp = job.config.quantization_parameters
    report = analyze(
        float_model,
        qmodel,
        source,
        max_samples=qp.analysis_samples,
        float_kept=float_kept,
        max_percentile=qp.max_percentile,
    )
    paths = report.write(job.working_dir, job.prefix)
    log.info("%s", report.console_summary())
    return paths
