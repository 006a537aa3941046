"""The Python API: XSlim's entry point and drop-in ONNX Runtime signatures."""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import onnx
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType

from .config import Config, load_config
from .errors import ConfigError
from .pipeline import Mode, ProgressFactory, plan_job, prepare_model, run

log = logging.getLogger("xslim_ort")

_ORT_METHODS = {
    CalibrationMethod.MinMax: "minmax",
    CalibrationMethod.Entropy: "kl",
    CalibrationMethod.Percentile: "percentile",
    CalibrationMethod.Distribution: "default",
}


def quantize_onnx_model(
    config: str | os.PathLike | dict | Config,
    model: str | os.PathLike | onnx.ModelProto | None = None,
    output: str | os.PathLike | None = None,
    *,
    progress: ProgressFactory | None = None,
) -> onnx.ModelProto:
    """Quantize as the config says; ``model`` and ``output`` override the config's paths.

    Writes ``<working_dir>/<output_prefix>.onnx`` (or ``output``) and returns the model.
    """
    return run(plan_job(config, model, output, progress=progress))


def quantize_static(
    model_input: str | Path | onnx.ModelProto,
    model_output: str | Path,
    calibration_data_reader: CalibrationDataReader | None = None,
    quant_format: QuantFormat = QuantFormat.QDQ,
    op_types_to_quantize: list[str] | None = None,
    per_channel: bool = False,
    reduce_range: bool = False,
    activation_type: QuantType = QuantType.QInt8,
    weight_type: QuantType = QuantType.QInt8,
    nodes_to_quantize: list[str] | None = None,
    nodes_to_exclude: list[str] | None = None,
    use_external_data_format: bool = False,
    calibrate_method: CalibrationMethod = CalibrationMethod.MinMax,
    calibration_providers: list[str] | None = None,
    extra_options: dict[str, Any] | None = None,
    calibration_cache_path: str | Path | None = None,
    *,
    target: str = "spacemit",
    finetune_level: int = 0,
) -> None:
    """``onnxruntime.quantization.quantize_static`` with the target's int8 format.

    Same arguments and defaults. The target fixes what ORT leaves to flags: QDQ format,
    int8 per-channel Conv weights, int8 asymmetric activations; arguments that contradict
    it are logged and overruled. ``calibrate_method`` maps to our streaming calibrators
    (MinMax -> minmax, Entropy -> kl, Percentile -> percentile, Distribution -> default).
    """
    if calibration_data_reader is None:
        raise ConfigError("quantize_static needs a calibration_data_reader")
    if quant_format != QuantFormat.QDQ:
        log.warning("quant_format=%s: the target runs QDQ models; writing QDQ", quant_format)
    if activation_type != QuantType.QInt8 or weight_type != QuantType.QInt8 or reduce_range:
        log.warning("activation/weight types and reduce_range are set by the '%s' target", target)
    if calibrate_method not in _ORT_METHODS:
        raise ConfigError(f"calibrate_method {calibrate_method} is not supported; use MinMax, Entropy or Percentile")
    extra = dict(extra_options or {})
    qp: dict[str, Any] = {"analysis_enable": False, "finetune_level": finetune_level, "target": target}
    if "CalibPercentile" in extra:
        qp["max_percentile"] = float(extra.pop("CalibPercentile"))
    if extra:
        log.info("extra_options not used by xslim-ort: %s", ", ".join(sorted(extra)))
    cfg = load_config(
        {
            "calibration_parameters": {"calibration_type": _ORT_METHODS[calibrate_method]},
            "quantization_parameters": qp,
        }
    )
    if calibration_providers and "CUDAExecutionProvider" in calibration_providers:
        cfg.calibration_parameters.calibration_device = "cuda"
    job = plan_job(cfg, model_input, model_output, mode=Mode.STATIC)
    excluded = set(nodes_to_exclude or [])
    model = prepare_model(job)
    if nodes_to_quantize:
        excluded |= {n.name for n in model.graph.node if n.name not in set(nodes_to_quantize)}
    if op_types_to_quantize:
        keep = set(op_types_to_quantize)
        excluded |= {n.name for n in model.graph.node if n.op_type not in keep}

    from .calibration.cache import BatchCache
    from .model_io import save_model
    from .static import quantize_with_source

    cache_dir = Path(calibration_cache_path).parent if calibration_cache_path else None
    with tempfile.TemporaryDirectory(prefix="xslim_ort_") as tmp, BatchCache(calibration_data_reader, tmp) as source:
        qmodel = quantize_with_source(
            job,
            model,
            source,
            data_key="",
            extra_excluded=excluded,
            range_cache_dir=cache_dir,
            cache_ranges=bool(cache_dir),
        )
    save_model(qmodel, job.output_path)


def quantize_dynamic(
    model_input: str | Path | onnx.ModelProto,
    model_output: str | Path,
    op_types_to_quantize: list[str] | None = None,
    per_channel: bool = False,
    reduce_range: bool = False,
    weight_type: QuantType = QuantType.QInt8,
    nodes_to_quantize: list[str] | None = None,
    nodes_to_exclude: list[str] | None = None,
    use_external_data_format: bool = False,
    extra_options: dict[str, Any] | None = None,
) -> None:
    """``onnxruntime.quantization.quantize_dynamic`` with xslim's precision-level-3 scheme.

    MatMul (and Gemm, rewritten to MatMul) get dynamic int8; Conv weights become int8
    weight-only. ``nodes_to_exclude`` stays float.
    """
    qp: dict[str, Any] = {"precision_level": 3, "ignore_op_names": list(nodes_to_exclude or [])}
    job = plan_job(load_config({"quantization_parameters": qp}), model_input, model_output, mode=Mode.DYNAMIC)
    if nodes_to_quantize or op_types_to_quantize:
        keep_names, keep_types = set(nodes_to_quantize or []), set(op_types_to_quantize or [])
        others = [
            n.name
            for n in job.model.graph.node
            if (keep_names and n.name not in keep_names) or (keep_types and n.op_type not in keep_types)
        ]
        job.config.quantization_parameters.ignore_op_names = sorted(set(qp["ignore_op_names"]) | set(others))
    run(job)
