"""The stages in order; the only module that knows the order.

config -> model -> calibration data -> ranges -> (tuning) -> quantized model -> report -> file.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from .config import Config, load_config
from .errors import ConfigError, ModelError
from .model_io import (
    constants_to_initializers,
    infer_shapes,
    load_model,
    main_opset,
    name_nodes,
    pin_input_shapes,
    refuse_quantized,
    refuse_unrunnable,
    save_model,
    simplify,
    upgrade_opset,
)
from .targets import Target, load_target

log = logging.getLogger("xslim_ort")

ProgressFactory = Callable[[str, int | None], contextlib.AbstractContextManager[Callable[[int], None]]]


class Mode(enum.Enum):
    STATIC = "static"
    DYNAMIC = "dynamic"
    FP16 = "fp16"
    SIMPLIFY = "simplify"


@contextlib.contextmanager
def _no_progress(label: str, total: int | None) -> Iterator[Callable[[int], None]]:
    yield lambda n: None


@dataclass
class Job:
    """Everything resolved before any work starts: what to read, what to write, how."""

    config: Config
    mode: Mode
    model: onnx.ModelProto
    model_path: Path | None
    output_path: Path
    working_dir: Path
    prefix: str
    target: Target
    progress: ProgressFactory = field(default=_no_progress)


def _strip_onnx(name: str) -> str:
    return name[: -len(".onnx")] if name.endswith(".onnx") else name


def mode_from_config(config: Config) -> Mode:
    level = config.quantization_parameters.precision_level
    if level == 3:
        return Mode.DYNAMIC
    if level == 4:
        return Mode.FP16
    return Mode.STATIC


def plan_job(
    config: Config | dict | str | os.PathLike | None,
    model: str | os.PathLike | onnx.ModelProto | None = None,
    output: str | os.PathLike | None = None,
    *,
    mode: Mode | None = None,
    progress: ProgressFactory | None = None,
) -> Job:
    """Resolve paths, mode and target, and load the model; nothing is written yet."""
    cfg = load_config(config) if config is not None else Config()
    mp = cfg.model_parameters
    if mode is None:
        mode = mode_from_config(cfg) if config is not None else Mode.SIMPLIFY

    model_path: Path | None = None
    if isinstance(model, onnx.ModelProto):
        proto = load_model(model)
    else:
        source = model if model is not None else mp.onnx_model
        if source is None:
            raise ConfigError("no model given: set model_parameters.onnx_model in the config or pass the model (-i)")
        if model is None:
            model_path = cfg.resolve_input_path(str(source), "model_parameters.onnx_model")
        else:
            model_path = Path(source).resolve()
            if not model_path.is_file():
                raise ModelError(f"model file not found: {source}")
        proto = load_model(model_path)
    refuse_quantized(proto, str(model_path or "model"))
    if mode is Mode.STATIC:
        refuse_unrunnable(proto, str(model_path or "model"))

    stem = _strip_onnx(model_path.name) if model_path is not None else "model"
    if output is not None:
        output_path = Path(output).expanduser().resolve()
        prefix = mp.output_prefix or _strip_onnx(output_path.name)
        working_dir = Path(mp.working_dir).expanduser().resolve() if mp.working_dir else output_path.parent
    else:
        if mp.working_dir:
            working_dir = Path(mp.working_dir).expanduser().resolve()
        else:
            working_dir = model_path.parent if model_path is not None else Path.cwd()
        prefix = mp.output_prefix or f"{stem}.q"
        output_path = working_dir / f"{prefix}.onnx"
    if model_path is not None and output_path == model_path:
        raise ConfigError(f"the output {output_path} is the input model; choose another output path (-o)")
    if output_path.is_dir():
        raise ConfigError(f"the output {output_path} is a directory; give a file path")

    target = load_target(cfg.quantization_parameters.target)
    return Job(
        config=cfg,
        mode=mode,
        model=proto,
        model_path=model_path,
        output_path=output_path,
        working_dir=working_dir,
        prefix=prefix,
        target=target,
        progress=progress or _no_progress,
    )


def run(job: Job) -> onnx.ModelProto:
    """Run the job's stages and write the output model; returns it."""
    if job.mode is Mode.STATIC:
        from .static import quantize_static_job

        result = quantize_static_job(job)
    elif job.mode is Mode.DYNAMIC:
        from .dynamic import quantize_dynamic_model

        result = quantize_dynamic_model(prepare_model(job), job.config.quantization_parameters)
    elif job.mode is Mode.FP16:
        from .dynamic import convert_fp16

        result = convert_fp16(prepare_model(job), job.config.quantization_parameters)
    else:
        result = prepare_model(job)
    save_model(result, job.output_path)
    log.info("wrote %s", job.output_path)
    return result


def prepare_model(job: Job, input_shapes: dict[str, list[int]] | None = None) -> onnx.ModelProto:
    """Pin shapes, raise the opset, simplify, move Constant-node weights to initializers, infer shapes."""
    model = job.model
    if input_shapes:
        pin_input_shapes(model, input_shapes)
    opset = job.config.model_parameters.opset or 0
    if job.mode is not Mode.SIMPLIFY:
        opset = max(opset, job.target.min_opset)
    if opset and main_opset(model) < opset:
        model = upgrade_opset(model, opset)
    if not job.config.model_parameters.skip_onnxsim:
        with job.progress("simplifying (onnxsim)", None):
            model = simplify(model)
    constants_to_initializers(model)
    name_nodes(model)
    if job.mode in (Mode.STATIC, Mode.DYNAMIC):
        _refuse_nonfinite_weights(model, job.target, str(job.model_path or "model"))
    return infer_shapes(model)


def _refuse_nonfinite_weights(model: onnx.ModelProto, target: Target, where: str) -> None:
    """A NaN or Inf in a weight to quantize would wreck its scale (and every other value with it)."""
    from .quantizer import weight_inputs

    inits = {i.name: i for i in model.graph.initializer}
    for node in model.graph.node:
        rule = target.weight_rule(node.op_type)
        for name in weight_inputs(node, rule, inits) if rule is not None else ():
            w = numpy_helper.to_array(inits[name])
            if w.dtype.kind == "f" and not np.isfinite(w).all():
                raise ModelError(
                    f"{where}: weight '{name}' of {node.op_type} '{node.name}' holds NaN or Inf; "
                    "int8 cannot represent it, fix the float model"
                )
