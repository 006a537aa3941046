"""``xslim-ort analyze float.onnx quant.onnx -c cfg.json`` (registered by ``xslim_ort.cli``).

Runs the analysis on any pair of models, ours or another tool's: the config only says
where the data are and how to read them (``calibration_parameters.input_parametres``),
plus ``analysis_samples`` and ``max_percentile``. The config and data readers are imported
when the command runs, so that ``xslim_ort.analysis`` itself needs neither.
"""

from __future__ import annotations

from pathlib import Path

import click

from .core import DEFAULT_ISOLATED_SAMPLES, analyze

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


@click.command("analyze", context_settings=CONTEXT_SETTINGS)
@click.argument("float_model", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("quant_model", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "-c",
    "--config",
    "config_path",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="XSlim JSON config; its calibration data are the samples.",
)
@click.option(
    "-o",
    "--working-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder for the reports [default: the config's working_dir, else the quantized model's folder].",
)
@click.option("--prefix", help="Report name prefix [default: the quantized model's file name without .onnx].")
@click.option(
    "-n",
    "--samples",
    type=click.IntRange(min=1),
    help="Samples to compare [default: the config's analysis_samples].",
)
@click.option(
    "--isolated-samples",
    type=click.IntRange(min=1),
    default=DEFAULT_ISOLATED_SAMPLES,
    show_default=True,
    help="Samples for the isolated errors (one model run per layer and sample).",
)
@click.option(
    "--suggestions",
    type=click.IntRange(min=0),
    default=5,
    show_default=True,
    help="How many of the worst layers get measured fixes.",
)
@click.option("--threads", type=click.IntRange(min=1), help="ONNX Runtime threads [default: its own choice].")
def analyze_command(
    float_model: Path,
    quant_model: Path,
    config_path: Path,
    working_dir: Path | None,
    prefix: str | None,
    samples: int | None,
    isolated_samples: int,
    suggestions: int,
    threads: int | None,
) -> None:
    """Compare QUANT_MODEL with FLOAT_MODEL layer by layer and write <prefix>_report.{md,json,html}."""
    from ..calibration.cache import build_batch_source
    from ..config import load_config
    from ..model_io import load_model

    config = load_config(str(config_path))
    qp = config.quantization_parameters
    samples = samples or qp.analysis_samples
    folder = working_dir or Path(config.model_parameters.working_dir or quant_model.parent)
    prefix = prefix or quant_model.name.removesuffix(".onnx")
    with build_batch_source(config, load_model(float_model), max_samples=samples) as source:
        report = analyze(
            float_model,
            quant_model,
            source,
            max_samples=samples,
            isolated_samples=isolated_samples,
            suggestions=suggestions,
            max_percentile=qp.max_percentile,
            num_threads=threads,
        )
    paths = report.write(folder, prefix)
    click.echo(report.console_summary())
    for path in paths:
        click.echo(f"wrote {path}")
