"""``xslim-ort zoo run``: the model-zoo regression command (registered by ``xslim_ort.cli``).

Exit codes: 0 every model met its thresholds, 1 a threshold failed or a model could not be
quantized or evaluated, 2 a bad manifest, baseline or option.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path

import click

from ..errors import EXIT_FAILURE, EXIT_OK
from .manifest import load_manifest
from .report import load_baseline, summary, write_json, write_junit, write_markdown
from .runner import ModelResult, run_models

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def _parse_shard(_ctx: click.Context, _param: click.Parameter, value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    index, sep, count = value.partition("/")
    if not (sep and index.isdigit() and count.isdigit() and 1 <= int(index) <= int(count)):
        raise click.BadParameter(f"use I/N with 1 <= I <= N (e.g. 1/4), got {value!r}")
    return int(index), int(count)


def _split_names(_ctx: click.Context, _param: click.Parameter, value: tuple[str, ...]) -> list[str]:
    return [name.strip() for v in value for name in v.split(",") if name.strip()]


@contextlib.contextmanager
def _work_dir(path: str | None) -> Iterator[Path]:
    """The given folder (kept: the quantized models stay there), else a temporary one."""
    if path is not None:
        folder = Path(path).resolve()
        folder.mkdir(parents=True, exist_ok=True)
        yield folder
        return
    with tempfile.TemporaryDirectory(prefix="xslim-ort-zoo-") as tmp:
        yield Path(tmp)


def _summary_lines(results: list[ModelResult]) -> list[str]:
    counts = summary(results)
    lines = [f"zoo: {counts['passed']} passed, {counts['failed']} failed, {counts['errors']} errors"]
    for r in results:
        if r.error is not None:
            lines.append(f"ERROR {r.name}: {r.error}")
        lines.extend(f"FAIL {r.name}: {c.message}" for c in r.failures)
    return lines


@click.group("zoo", context_settings=CONTEXT_SETTINGS)
def zoo_group() -> None:
    """Regression runs over a model zoo: quantize, evaluate, check thresholds."""


@zoo_group.command("run", context_settings=CONTEXT_SETTINGS)
@click.argument("manifest", type=click.Path(dir_okay=False))
@click.option(
    "--only", multiple=True, callback=_split_names, metavar="NAME", help="Run only these models (repeat, or a,b)."
)
@click.option(
    "--shard", callback=_parse_shard, metavar="I/N", help="Run the I-th of N shards (sorted names, dealt out)."
)
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="Write the results as JSON (a baseline).")
@click.option("--junit", type=click.Path(dir_okay=False), help="Write a JUnit XML report.")
@click.option("--markdown", type=click.Path(dir_okay=False), help="Write a Markdown summary table.")
@click.option(
    "--baseline", type=click.Path(dir_okay=False), help="Earlier --json results to check regressions against."
)
@click.option(
    "--work-dir", type=click.Path(file_okay=False), help="Keep the quantized models here (default: a temp dir)."
)
@click.option("--threads", type=click.IntRange(min=1), default=2, show_default=True, help="ORT threads for evaluation.")
@click.option(
    "--in-process", is_flag=True, help="Run the models in this process (debugging; a native crash ends the run)."
)
def run_command(
    manifest: str,
    only: list[str],
    shard: tuple[int, int] | None,
    json_out: str | None,
    junit: str | None,
    markdown: str | None,
    baseline: str | None,
    work_dir: str | None,
    threads: int,
    in_process: bool,
) -> int:
    """Quantize and evaluate the models of MANIFEST and check their thresholds.

    Exit code 0 when every model meets its thresholds, 1 when one does not or could not be
    quantized or evaluated, 2 for a bad manifest or baseline.

    \b
    xslim-ort zoo run zoo/manifest.json
    xslim-ort zoo run zoo/manifest.json --only mobilenet_v2 --json out.json
    xslim-ort zoo run zoo/manifest.json --shard 1/2 --junit zoo.xml --baseline previous.json
    """
    spec = load_manifest(manifest)
    entries = spec.select(only, shard)
    previous = load_baseline(Path(baseline)) if baseline else None
    if not entries:
        click.echo(f"zoo: no models in shard {shard[0]}/{shard[1]}" if shard else "zoo: no models selected")
        return EXIT_OK
    with _work_dir(work_dir) as folder:
        results = run_models(
            entries, folder, threads=threads, isolate=not in_process, baseline=previous, echo=click.echo
        )
    for line in _summary_lines(results):
        click.echo(line)
    for path, write in ((json_out, write_json), (junit, write_junit), (markdown, write_markdown)):
        if path:
            write(Path(path), results, manifest)
    return EXIT_OK if all(r.status == "pass" for r in results) else EXIT_FAILURE
