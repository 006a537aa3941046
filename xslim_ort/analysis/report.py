"""The analysis result and its Markdown, JSON and console forms (HTML is in ``html.py``).

The Markdown table keeps xslim 2.1.2's columns (Op, Var, SNR, MSE, Cosine, Q.MinMax,
F.MinMax, F.Hist: cumulative error, as xslim measures it) and adds ours; rows are ranked
by *isolated* error (the model outputs' SQNR with only that layer quantized), which points
at the layer at fault instead of at everything after it.
Every file is a pure function of the report, so the same inputs give byte-identical files.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .stats import ErrorStats

SCHEMA_VERSION = 1
DEFAULT_PERCENTILE = 0.9999
CONSOLE_ROWS = 10
F_HIST_BINS = 32
_SPARK = "▁▂▃▄▅▆▇█"


@dataclass(frozen=True)
class Histogram:
    """Counts of the float values in equal bins over [lo, hi]."""

    lo: float
    hi: float
    counts: tuple[int, ...]

    def regrouped(self, bins: int) -> list[int]:
        """Sums of ``bins`` consecutive groups (``len(counts)`` must be a multiple of ``bins``)."""
        step = len(self.counts) // bins
        return [sum(self.counts[i * step : (i + 1) * step]) for i in range(bins)]


@dataclass(frozen=True)
class LayerReport:
    """One quantized activation tensor and the layer that computes it."""

    index: int  # graph order
    tensor: str
    op_type: str
    op_name: str
    inputs: tuple[str, ...]  # float-model names of the quantized activations the layer reads
    dtype: str
    scale: float | None  # None for per-axis parameters
    zero_point: int | None
    clip_range: tuple[float, float] | None  # what the int grid can represent
    float_range: tuple[float, float] | None
    quant_range: tuple[float, float] | None
    histogram: Histogram | None
    cumulative: ErrorStats | None  # the quantized model end to end
    isolated: ErrorStats | None  # only this layer quantized, float inputs
    isolated_output_sqnr_db: float | None  # model outputs with only this layer quantized (mean, dB)
    note: str = ""


@dataclass(frozen=True)
class OutputReport:
    name: str
    stats: ErrorStats | None


@dataclass(frozen=True)
class Fix:
    """One measured remedy for one layer, and the config entry that applies it."""

    kind: str  # "keep_float" or "percentile"
    output_sqnr_db: float  # mean over the model outputs, with this fix alone
    gain_db: float  # over the quantized model as it is
    output_cosine: float
    custom_setting: dict[str, Any] = field(hash=False)


@dataclass(frozen=True)
class Suggestion:
    """The measured fixes for one of the worst layers."""

    tensor: str
    isolated_output_sqnr_db: float | None  # the model outputs with only this layer quantized
    fixes: tuple[Fix, ...]

    @property
    def best(self) -> Fix | None:
        return max(self.fixes, key=lambda f: f.gain_db, default=None)


@dataclass(frozen=True)
class AnalysisReport:
    """Per-layer quantization error of a QDQ model against its float model."""

    float_model: str
    quant_model: str
    samples: int
    isolated_samples: int  # the first samples, on which the isolated errors were measured
    outputs: tuple[OutputReport, ...]
    layers: tuple[LayerReport, ...]  # graph order
    suggestions: tuple[Suggestion, ...]
    float_kept: dict[str, str] = field(hash=False)
    max_percentile: float = DEFAULT_PERCENTILE

    @property
    def output_sqnr_db(self) -> dict[str, float]:
        return {o.name: o.stats.sqnr_db if o.stats else math.nan for o in self.outputs}

    @property
    def output_cosine(self) -> dict[str, float]:
        return {o.name: o.stats.cosine if o.stats else math.nan for o in self.outputs}

    @staticmethod
    def rank(layers: Iterable[LayerReport]) -> list[LayerReport]:
        """Worst first by isolated error at the outputs (unmeasured layers last, in graph order)."""

        def key(layer: LayerReport) -> tuple[int, float, float, int]:
            if layer.isolated_output_sqnr_db is None or layer.isolated is None:
                return 1, 0.0, 0.0, layer.index
            return 0, layer.isolated_output_sqnr_db, -layer.isolated.snr, layer.index

        return sorted(layers, key=key)

    @property
    def ranked(self) -> list[LayerReport]:
        return self.rank(self.layers)

    # -- JSON ------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Machine-readable form. Non-finite numbers (an error-free SQNR) are null."""
        ranks = {layer.index: r for r, layer in enumerate(self.ranked, 1)}
        return _finite(
            {
                "schema_version": SCHEMA_VERSION,
                "float_model": self.float_model,
                "quant_model": self.quant_model,
                "samples": self.samples,
                "isolated_samples": self.isolated_samples,
                "max_percentile": self.max_percentile,
                "outputs": [{"name": o.name, **_stats(o.stats)} for o in self.outputs],
                "layers": [_layer_dict(layer, ranks[layer.index]) for layer in self.layers],
                "suggestions": [
                    {
                        "tensor": s.tensor,
                        "isolated_output_sqnr_db": s.isolated_output_sqnr_db,
                        "fixes": [
                            {
                                "kind": f.kind,
                                "output_sqnr_db": f.output_sqnr_db,
                                "gain_db": f.gain_db,
                                "output_cosine": f.output_cosine,
                                "custom_setting": f.custom_setting,
                            }
                            for f in s.fixes
                        ],
                    }
                    for s in self.suggestions
                ],
                "float_kept": dict(sorted(self.float_kept.items())),
            }
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False, allow_nan=False) + "\n"

    # -- Markdown --------------------------------------------------------------------------

    def to_markdown(self) -> str:
        lines = [
            "# Quantization analysis",
            "",
            f"- Float model: `{_md(self.float_model)}`",
            f"- Quantized model: `{_md(self.quant_model)}`",
            f"- Samples: {self.samples} (isolated errors: the first {self.isolated_samples}); "
            f"quantized activation tensors: {len(self.layers)}",
            "",
            "## Model outputs",
            "",
            "| Output | SQNR (dB) | Cosine | SNR | MSE |",
            "| --- | --- | --- | --- | --- |",
        ]
        for o in self.outputs:
            s = o.stats
            lines.append(
                f"| {_md(o.name)} | {fmt_db(s and s.sqnr_db)} | {fmt_cos(s and s.cosine)} "
                f"| {fmt_num(s and s.snr)} | {fmt_num(s and s.mse)} |"
            )
        lines += ["", "## Suggestions", ""]
        lines += self._markdown_suggestions()
        if self.float_kept:
            lines += ["", "## Kept in float by the quantizer", "", "| Name | Why |", "| --- | --- |"]
            lines += [f"| {_md(k)} | {_md(v)} |" for k, v in sorted(self.float_kept.items())]
        lines += [
            "",
            "## Layers, worst first by isolated error",
            "",
            "SNR is noise power over signal power (xslim's definition: 0 is perfect). SNR, MSE, "
            "Cosine and SQNR are cumulative: the quantized model end to end, so errors of earlier "
            "layers add up. Iso.* columns are isolated: the layer alone quantized, fed with float "
            "inputs, so the layer at fault stands out; Iso.Out.SQNR is the model outputs' SQNR "
            "(mean over outputs) with only this layer quantized, and sets the order. Q.MinMax: "
            "range of the dequantized values; Clip: range the int grid can represent; F.Hist: "
            "float values in 32 bins over F.MinMax (log scale).",
            "",
            "| Op | Var | SNR | MSE | Cosine | Q.MinMax | F.MinMax | F.Hist | SQNR (dB) | Iso.Out.SQNR (dB) "
            "| Iso.SNR | Iso.SQNR (dB) | Iso.MSE | Iso.Cosine | Clip | Scale | ZP | Order | Note |",
            "| " + " | ".join(["---"] * 19) + " |",
        ]
        for layer in self.ranked:
            c, i = layer.cumulative, layer.isolated
            hist = _spark(layer.histogram.regrouped(F_HIST_BINS)) if layer.histogram else "n/a"
            cells = [
                layer.op_type,
                _md(layer.tensor),
                fmt_num(c and c.snr),
                fmt_num(c and c.mse),
                fmt_cos(c and c.cosine),
                fmt_range(layer.quant_range),
                fmt_range(layer.float_range),
                hist,
                fmt_db(c and c.sqnr_db),
                fmt_db(layer.isolated_output_sqnr_db),
                fmt_num(i and i.snr),
                fmt_db(i and i.sqnr_db),
                fmt_num(i and i.mse),
                fmt_cos(i and i.cosine),
                fmt_range(layer.clip_range),
                fmt_num(layer.scale),
                "n/a" if layer.zero_point is None else str(layer.zero_point),
                str(layer.index),
                _md(layer.note),
            ]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"

    def _markdown_suggestions(self) -> list[str]:
        if not self.suggestions:
            return ["No layer could be measured in isolation, so there is nothing to suggest."]
        lines = [
            "For the worst layers by isolated error, the model's output SQNR (mean over outputs) "
            "measured with one fix applied. Paste the entry of the fix you choose into "
            "`quantization_parameters.custom_setting`.",
            "",
        ]
        for n, s in enumerate(self.suggestions, 1):
            head = (
                f"{n}. `{_md(s.tensor)}` (output SQNR with only this layer quantized: "
                f"{fmt_db(s.isolated_output_sqnr_db)} dB)"
            )
            if not s.fixes:
                lines += [head + ": no fix could be measured.", ""]
                continue
            effects = "; ".join(
                f"{FIX_NAMES[f.kind]}: output SQNR {fmt_db(f.output_sqnr_db)} dB ({f.gain_db:+.2f} dB)" for f in s.fixes
            )
            lines += [f"{head}: {effects}.", ""]
            for f in s.fixes:
                lines += [f"   {FIX_NAMES[f.kind]}:", "", "   ```json", f"   {setting_json(f)}", "   ```", ""]
        return lines

    # -- console ---------------------------------------------------------------------------

    def console_summary(self, rows: int = CONSOLE_ROWS) -> str:
        """The model's output error, the worst layers as a table, and the best fixes."""
        lines = [
            f"Quantization analysis on {self.samples} samples (isolated errors on {self.isolated_samples}), "
            f"{len(self.layers)} quantized tensors"
        ]
        for o in self.outputs:
            s = o.stats
            lines.append(f"  output {o.name}: SQNR {fmt_db(s and s.sqnr_db)} dB, cosine {fmt_cos(s and s.cosine)}")
        worst = self.ranked[:rows]
        if worst:
            width = min(max(len(layer.tensor) for layer in worst), 60)
            lines += [
                f"Worst {len(worst)} layers by isolated error, SQNR in dB (alone: only this layer quantized, "
                "measured at the outputs and at the tensor; cumulative: the quantized model at the tensor):",
                f"  {'#':>2}  {'tensor':<{width}}  {'op':<14}  {'alone@out':>9}  {'alone':>7}  {'cumul.':>7}",
            ]
            for r, layer in enumerate(worst, 1):
                i, c = layer.isolated, layer.cumulative
                lines.append(
                    f"  {r:>2}  {_clip_text(layer.tensor, width):<{width}}  {_clip_text(layer.op_type, 14):<14}  "
                    f"{fmt_db(layer.isolated_output_sqnr_db):>9}  {fmt_db(i and i.sqnr_db):>7}  "
                    f"{fmt_db(c and c.sqnr_db):>7}"
                )
        helpful = [(s.tensor, s.best) for s in self.suggestions if s.best is not None and s.best.gain_db > 0]
        if helpful:
            lines.append("Measured fixes (custom_setting entries; each measured alone):")
            lines += [
                f"  fix {tensor}: {FIX_NAMES[best.kind]} -> output SQNR {best.gain_db:+.2f} dB: {setting_json(best)}"
                for tensor, best in helpful
            ]
        if self.float_kept:
            lines.append(f"Kept in float by the quantizer: {', '.join(sorted(self.float_kept))}")
        return "\n".join(lines)

    # -- files -----------------------------------------------------------------------------

    def write(self, working_dir: str | os.PathLike, prefix: str) -> list[Path]:
        """Write ``<prefix>_report.{md,json,html}``; each file appears whole or not at all."""
        from .html import render_html

        folder = Path(working_dir)
        folder.mkdir(parents=True, exist_ok=True)
        contents = {
            "md": self.to_markdown(),
            "json": self.to_json(),
            "html": render_html(self),
        }
        paths = []
        for ext, text in contents.items():
            path = folder / f"{prefix}_report.{ext}"
            _write_atomic(path, text)
            paths.append(path)
        return paths


FIX_NAMES = {"keep_float": "keep float", "percentile": "percentile calibration"}


def setting_json(fix: Fix) -> str:
    """The fix's custom_setting entry, on one line, ready to paste."""
    return json.dumps(fix.custom_setting, ensure_ascii=False)


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a report is meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _stats(s: ErrorStats | None) -> dict[str, float | None]:
    if s is None:
        return {"snr": None, "sqnr_db": None, "mse": None, "cosine": None}
    return {"snr": s.snr, "sqnr_db": s.sqnr_db, "mse": s.mse, "cosine": s.cosine}


def _layer_dict(layer: LayerReport, rank: int) -> dict[str, Any]:
    hist = layer.histogram
    return {
        "index": layer.index,
        "rank": rank,
        "tensor": layer.tensor,
        "op_type": layer.op_type,
        "op_name": layer.op_name,
        "inputs": list(layer.inputs),
        "dtype": layer.dtype,
        "scale": layer.scale,
        "zero_point": layer.zero_point,
        "clip_range": _pair(layer.clip_range),
        "float_range": _pair(layer.float_range),
        "quant_range": _pair(layer.quant_range),
        "histogram": None if hist is None else {"lo": hist.lo, "hi": hist.hi, "counts": list(hist.counts)},
        "cumulative": _stats(layer.cumulative),
        "isolated": _stats(layer.isolated),
        "isolated_output_sqnr_db": layer.isolated_output_sqnr_db,
        "note": layer.note,
    }


def _pair(value: tuple[float, float] | None) -> list[float] | None:
    return None if value is None else [value[0], value[1]]


def _finite(value: Any) -> Any:
    """Replace inf and nan by None, recursively (JSON has neither)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def fmt_num(x: float | None) -> str:
    if x is None or math.isnan(x):
        return "n/a"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return f"{x:.4g}"


def fmt_db(x: float | None) -> str:
    if x is None or math.isnan(x):
        return "n/a"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return f"{x:.2f}"


def fmt_cos(x: float | None, digits: int = 6) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{x:.{digits}f}"


def fmt_range(r: tuple[float, float] | None) -> str:
    return "n/a" if r is None else f"[{fmt_num(r[0])}, {fmt_num(r[1])}]"


def _spark(counts: Sequence[int]) -> str:
    """A histogram as one line of block characters, log-scaled so small tails stay visible."""
    top = math.log1p(max(counts, default=0))
    if top == 0:
        return "·" * len(counts)
    return "".join(
        "·" if c == 0 else _SPARK[min(int(math.log1p(c) / top * (len(_SPARK) - 1) + 0.5), len(_SPARK) - 1)]
        for c in counts
    )


def _md(text: str) -> str:
    """Text safe inside a Markdown table cell or inline code."""
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("`", "'").replace("\n", " ")


def _clip_text(text: str, width: int) -> str:
    return text if len(text) <= width else "…" + text[-(width - 1) :]
