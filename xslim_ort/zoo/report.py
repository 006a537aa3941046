"""Result files of a zoo run: JSON (also what --baseline reads), JUnit XML for CI, a Markdown table.

The files are deterministic: two runs that measure the same numbers write the same bytes,
except the JSON's top-level ``timing`` field, kept apart for that reason.
"""

from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import onnxruntime as ort

from .._version import __version__
from ..errors import ConfigError
from .manifest import read_json
from .runner import ModelResult, fmt

FORMAT = "xslim-ort-zoo-results/1"


def _number(value: float) -> float | str:
    """JSON has no inf/nan: write them as strings (an SQNR is inf when int8 equals float)."""
    return value if math.isfinite(value) else str(value)


def _numbers(values: dict[str, float] | None) -> dict[str, float | str] | None:
    return None if values is None else {k: _number(v) for k, v in values.items()}


def summary(results: Sequence[ModelResult]) -> dict[str, int]:
    statuses = [r.status for r in results]
    return {
        "models": len(results),
        "passed": statuses.count("pass"),
        "failed": statuses.count("fail"),
        "errors": statuses.count("error"),
    }


def results_document(results: Sequence[ModelResult], manifest: str) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "manifest": manifest,
        "versions": {"xslim_ort": __version__, "onnxruntime": ort.__version__},
        "summary": summary(results),
        "models": [
            {
                "name": r.name,
                "status": r.status,
                "metrics": _numbers(r.metrics),
                "samples": r.samples,
                "checks": [
                    {
                        "metric": c.metric,
                        "rule": c.rule,
                        "limit": c.limit,
                        "value": _number(c.value),
                        "passed": c.passed,
                        "message": c.message,
                    }
                    for c in r.checks
                ],
                "error": r.error,
                "baseline": _numbers(r.baseline),
            }
            for r in results
        ],
        "timing": {r.name: r.timing for r in results},
    }


def write_json(path: Path, results: Sequence[ModelResult], manifest: str) -> None:
    text = json.dumps(results_document(results, manifest), indent=2, allow_nan=False)
    path.write_text(text + "\n", "utf-8")


def load_baseline(path: Path) -> dict[str, dict[str, float]]:
    """Each model's metrics from an earlier run's --json file."""
    data = read_json(path, "baseline file")
    models = data.get("models") if isinstance(data, dict) else None
    if not isinstance(models, list) or data.get("format") != FORMAT:
        raise ConfigError(f"{path}: not a zoo results file (write one with xslim-ort zoo run --json)")
    out: dict[str, dict[str, float]] = {}
    for m in models:
        if not isinstance(m, dict) or not isinstance(m.get("name"), str) or not isinstance(m.get("metrics"), dict):
            raise ConfigError(f"{path}: every entry of 'models' needs a name and metrics")
        out[m["name"]] = {k: float(v) for k, v in m["metrics"].items()}
    return out


def write_junit(path: Path, results: Sequence[ModelResult], manifest: str) -> None:
    """One testcase per model: a failure per broken threshold, an error when it could not be measured."""
    counts = summary(results)
    attrs = {
        "name": "xslim-ort zoo",
        "tests": str(counts["models"]),
        "failures": str(counts["failed"]),
        "errors": str(counts["errors"]),
        "skipped": "0",
    }
    root = ET.Element("testsuites", attrs)
    suite = ET.SubElement(root, "testsuite", attrs)
    props = ET.SubElement(suite, "properties")
    ET.SubElement(props, "property", {"name": "manifest", "value": manifest})
    for r in results:
        case = ET.SubElement(suite, "testcase", {"classname": "xslim_ort.zoo", "name": r.name})
        if r.error is not None:
            ET.SubElement(case, "error", {"type": "error", "message": r.error}).text = r.error
        elif r.failures:
            messages = [c.message for c in r.failures]
            ET.SubElement(case, "failure", {"type": "threshold", "message": "; ".join(messages)}).text = "\n".join(
                messages
            )
        lines = [f"{k} {fmt(k, v)}" for k, v in r.metrics.items()] + [c.message for c in r.checks]
        if lines:
            ET.SubElement(case, "system-out").text = "\n".join(lines)
    ET.indent(root)
    ET.ElementTree(root).write(path, encoding="utf-8", xml_declaration=True)


def _metric(metrics: dict[str, float], key: str) -> str:
    return fmt(key, metrics[key]) if key in metrics else "—"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_table(results: Sequence[ModelResult], manifest: str) -> str:
    """A heading, a summary line and one table row per model."""
    counts = summary(results)
    lines = [
        f"# xslim-ort zoo: {manifest}",
        "",
        f"{counts['passed']} passed, {counts['failed']} failed, {counts['errors']} errors "
        f"(xslim-ort {__version__}, onnxruntime {ort.__version__})",
        "",
        "| model | status | top-1 agreement | labelled top-1 float → int8 | SQNR (dB) | cosine | failed checks |",
        "| --- | --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in results:
        m = r.metrics
        labelled = "—"
        if "labelled_top1" in m:
            labelled = f"{_metric(m, 'float_labelled_top1')} → {_metric(m, 'labelled_top1')}"
        problems = r.error if r.error is not None else "; ".join(c.message for c in r.failures)
        row = [r.name, r.status, _metric(m, "top1_agreement"), labelled, _metric(m, "sqnr_db"), _metric(m, "cosine")]
        row.append(problems)
        lines.append("| " + " | ".join(_cell(c) for c in row) + " |")
    return "\n".join(lines) + "\n"


def write_markdown(path: Path, results: Sequence[ModelResult], manifest: str) -> None:
    path.write_text(markdown_table(results, manifest), "utf-8")
