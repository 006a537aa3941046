"""The HTML report: one self-contained file, inline SVG and CSS, no script, no network.

Tensor and op names come from the model, which may come from anyone: every such string
goes through ``html.escape``. Coordinates are printed with fixed precision so the file is
byte-identical for the same report.
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable, Sequence

from .report import (
    FIX_NAMES,
    AnalysisReport,
    Histogram,
    LayerReport,
    fmt_cos,
    fmt_db,
    fmt_num,
    fmt_range,
    setting_json,
)

HIST_SHOWN = 6
CHART_TOP_DB = 100.0
HIST_BARS = 64

_CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 24px; color: #222; max-width: 1200px; }
h1 { font-size: 22px; } h2 { font-size: 18px; margin-top: 28px; }
table { border-collapse: collapse; margin: 8px 0; }
th, td { border: 1px solid #ccc; padding: 3px 7px; text-align: left; vertical-align: top; }
th { background: #f3f3f3; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
code, pre { font: 12px ui-monospace, monospace; } pre { margin: 0; white-space: pre-wrap; word-break: break-all; }
.tensor { word-break: break-all; }
svg text { font: 11px system-ui, sans-serif; fill: #333; }
.grid { stroke: #e4e4e4; } .axis { stroke: #888; }
.series-cumulative { fill: none; stroke: #7f7f7f; stroke-width: 1.5; }
.series-isolated { fill: none; stroke: #ff7f0e; stroke-width: 1.5; }
.series-isolated-output { fill: none; stroke: #d62728; stroke-width: 1.5; }
.pt-cumulative { fill: #7f7f7f; } .pt-isolated { fill: #ff7f0e; } .pt-isolated-output { fill: #d62728; }
.pt-worst { stroke: #000; stroke-width: 1.5; }
.bar { fill: #1f77b4; } .clip-line { stroke: #d62728; stroke-width: 1.5; stroke-dasharray: 4 3; }
.hist-grid { display: flex; flex-wrap: wrap; gap: 16px; }
figure { margin: 0; } figcaption { font-size: 12px; max-width: 320px; word-break: break-all; }
.legend span { margin-right: 16px; } .sw { display: inline-block; width: 12px; height: 3px; vertical-align: middle; }
"""


def render_html(report: AnalysisReport) -> str:
    e = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>Quantization analysis: {e(report.quant_model)}</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>Quantization analysis</h1>",
        '<section id="summary">',
        f"<p>Float model <code>{e(report.float_model)}</code>, quantized model "
        f"<code>{e(report.quant_model)}</code>; {report.samples} samples (isolated errors: the first "
        f"{report.isolated_samples}), "
        f"{len(report.layers)} quantized activation tensors.</p>",
        "<table><tr><th>Output</th><th>SQNR (dB)</th><th>Cosine</th><th>SNR (noise/signal)</th><th>MSE</th></tr>",
    ]
    for o in report.outputs:
        s = o.stats
        parts.append(
            f"<tr><td class=tensor>{e(o.name)}</td><td class=num>{fmt_db(s and s.sqnr_db)}</td>"
            f"<td class=num>{fmt_cos(s and s.cosine)}</td><td class=num>{fmt_num(s and s.snr)}</td>"
            f"<td class=num>{fmt_num(s and s.mse)}</td></tr>"
        )
    parts += ["</table></section>", '<section id="chart"><h2>Error per layer, in graph order</h2>']
    parts.append(_chart(report))
    parts += [
        '<p class="legend"><span><i class="sw" style="background:#d62728"></i> model outputs with only this '
        'layer quantized</span><span><i class="sw" style="background:#ff7f0e"></i> this tensor with only its '
        'layer quantized (float inputs)</span><span><i class="sw" style="background:#7f7f7f"></i> this tensor '
        "in the quantized model (cumulative)</span> Ringed points: the worst layers, which the suggestions "
        "and histograms cover.</p>",
        "</section>",
        '<section id="suggestions"><h2>Suggestions</h2>',
    ]
    parts.append(_suggestions(report))
    parts += ["</section>", '<section id="histograms"><h2>Float values of the worst layers</h2>']
    parts += [
        "<p>Histogram of the float model's values (log scale); the dashed lines are the range the "
        "quantized tensor can represent (its clip range).</p>",
        '<div class="hist-grid">',
    ]
    shown = [layer for layer in report.ranked if layer.histogram is not None][:HIST_SHOWN]
    parts += [_histogram(layer, layer.histogram, n) for n, layer in enumerate(shown, 1) if layer.histogram]
    parts += ["</div></section>"]
    if report.float_kept:
        parts += ['<section id="float-kept"><h2>Kept in float by the quantizer</h2>', "<table>"]
        parts.append("<tr><th>Name</th><th>Why</th></tr>")
        parts += [f"<tr><td class=tensor>{e(k)}</td><td>{e(v)}</td></tr>" for k, v in sorted(report.float_kept.items())]
        parts += ["</table></section>"]
    parts += ['<section id="layers"><h2>All layers, worst first by isolated error</h2>', _layer_table(report)]
    parts += ["</section></body></html>", ""]
    return "\n".join(parts)


def _chart(report: AnalysisReport) -> str:
    """SQNR (dB) of every layer along graph order: isolated at the outputs and at the tensor, cumulative."""
    width, height, left, right, top, bottom = 960, 320, 56, 16, 16, 44
    layers = sorted(report.layers, key=lambda layer: layer.index)
    series = {
        "cumulative": [layer.cumulative.sqnr_db if layer.cumulative else None for layer in layers],
        "isolated": [layer.isolated.sqnr_db if layer.isolated else None for layer in layers],
        "isolated-output": [layer.isolated_output_sqnr_db for layer in layers],
    }
    finite = [v for values in series.values() for v in values if v is not None and math.isfinite(v)]
    lo, hi = (min(finite), max(finite)) if finite else (0.0, 40.0)
    hi = min(hi, CHART_TOP_DB)  # near-lossless tensors would flatten the rest; they sit at the top
    step = _tick_step(hi - lo)
    lo, hi = math.floor(lo / step) * step, math.ceil(hi / step) * step
    if hi <= lo:
        hi = lo + step
    plot_w, plot_h = width - left - right, height - top - bottom

    def x(i: int) -> float:
        return left + plot_w * (i + 0.5) / max(len(layers), 1)

    def y(v: float) -> float:
        v = min(max(v, lo), hi)
        return top + plot_h * (hi - v) / (hi - lo)

    out = [
        f'<svg id="layer-error-chart" class="chart" xmlns="http://www.w3.org/2000/svg" width="{width}" '
        f'height="{height}" viewBox="0 0 {width} {height}" role="img" '
        'aria-label="SQNR per layer in graph order">'
    ]
    tick = lo
    while tick <= hi + step / 2:
        ty = y(tick)
        out.append(f'<line class="grid" x1="{left}" x2="{width - right}" y1="{ty:.1f}" y2="{ty:.1f}"/>')
        out.append(f'<text x="{left - 6}" y="{ty + 4:.1f}" text-anchor="end">{tick:g}</text>')
        tick += step
    out.append(f'<line class="axis" x1="{left}" x2="{left}" y1="{top}" y2="{top + plot_h}"/>')
    out.append(f'<line class="axis" x1="{left}" x2="{width - right}" y1="{top + plot_h}" y2="{top + plot_h}"/>')
    out.append(
        f'<text x="14" y="{top + plot_h / 2:.1f}" transform="rotate(-90 14 {top + plot_h / 2:.1f})" '
        'text-anchor="middle">SQNR (dB), higher is better</text>'
    )
    out.append(
        f'<text x="{left + plot_w / 2:.1f}" y="{height - 8}" text-anchor="middle">'
        f"quantized tensors in graph order (0 to {max(len(layers) - 1, 0)})</text>"
    )
    for name, values in series.items():
        out.append(f'<path class="series-{name}" d="{_path(values, x, y)}"/>')
    worst = {layer.index for layer in report.ranked[:HIST_SHOWN] if layer.isolated_output_sqnr_db is not None}
    ranks = {layer.index: r for r, layer in enumerate(report.ranked, 1)}
    for n, layer in enumerate(layers):
        tip = html.escape(
            f"#{ranks[layer.index]} {layer.tensor} ({layer.op_type}): outputs with only this layer quantized "
            f"{fmt_db(series['isolated-output'][n])} dB; this tensor: isolated {fmt_db(series['isolated'][n])} dB, "
            f"cumulative {fmt_db(series['cumulative'][n])} dB"
        )
        for name, values in series.items():
            if values[n] is None:
                continue
            ring = " pt-worst" if name == "isolated-output" and layer.index in worst else ""
            out.append(
                f'<circle class="pt-{name}{ring}" cx="{x(n):.1f}" cy="{y(values[n]):.1f}" '
                f'r="{3.5 if ring else 2.5}"><title>{tip}</title></circle>'
            )
    out.append("</svg>")
    return "\n".join(out)


def _path(values: Sequence[float | None], x: Callable[[int], float], y: Callable[[float], float]) -> str:
    """An SVG path through the values, broken where a value is missing."""
    cmds = []
    pen_down = False
    for i, v in enumerate(values):
        if v is None:
            pen_down = False
            continue
        cmds.append(f"{'L' if pen_down else 'M'}{x(i):.1f},{y(v):.1f}")
        pen_down = True
    return " ".join(cmds)


def _tick_step(span: float) -> float:
    for step in (1.0, 2.0, 5.0, 10.0, 20.0, 50.0):
        if span / step <= 8:
            return step
    return 100.0


def _histogram(layer: LayerReport, hist: Histogram, rank: int) -> str:
    """The float histogram of one layer, with its clip range drawn as two dashed lines."""
    width, height, pad, base = 320, 170, 10, 140
    counts = hist.regrouped(HIST_BARS)
    lo, hi = hist.lo, hist.hi
    if layer.clip_range is not None:
        lo, hi = min(lo, layer.clip_range[0]), max(hi, layer.clip_range[1])
    if hi <= lo:
        hi = lo + 1.0
    plot_w = width - 2 * pad

    def x(v: float) -> float:
        return pad + plot_w * (v - lo) / (hi - lo)

    top = math.log1p(max(counts))
    bar_w = (hist.hi - hist.lo) / HIST_BARS
    out = [
        f'<figure><svg class="histogram" id="hist-{rank}" xmlns="http://www.w3.org/2000/svg" width="{width}" '
        f'height="{height}" viewBox="0 0 {width} {height}" role="img">'
    ]
    for i, c in enumerate(counts):
        if c == 0:
            continue
        h = (base - 10) * math.log1p(c) / top
        x0, x1 = x(hist.lo + i * bar_w), x(hist.lo + (i + 1) * bar_w)
        out.append(
            f'<rect class="bar" x="{x0:.2f}" y="{base - h:.2f}" width="{max(x1 - x0, 0.5):.2f}" height="{h:.2f}">'
            f"<title>{html.escape(f'{fmt_num(hist.lo + i * bar_w)} .. {fmt_num(hist.lo + (i + 1) * bar_w)}: {c}')}"
            "</title></rect>"
        )
    out.append(f'<line class="axis" x1="{pad}" x2="{width - pad}" y1="{base}" y2="{base}"/>')
    if layer.clip_range is not None:
        for v in layer.clip_range:
            out.append(f'<line class="clip-line" x1="{x(v):.2f}" x2="{x(v):.2f}" y1="4" y2="{base}"/>')
    out.append(f'<text x="{pad}" y="{base + 16}">{html.escape(fmt_num(lo))}</text>')
    out.append(f'<text x="{width - pad}" y="{base + 16}" text-anchor="end">{html.escape(fmt_num(hi))}</text>')
    out.append("</svg>")
    out.append(
        f"<figcaption>#{rank} <code>{html.escape(layer.tensor)}</code> ({html.escape(layer.op_type)}): "
        f"outputs with only this layer quantized {fmt_db(layer.isolated_output_sqnr_db)} dB; "
        f"float {html.escape(fmt_range(layer.float_range))}, "
        f"clip {html.escape(fmt_range(layer.clip_range))}</figcaption></figure>"
    )
    return "\n".join(out)


def _suggestions(report: AnalysisReport) -> str:
    if not report.suggestions:
        return "<p>No layer could be measured in isolation, so there is nothing to suggest.</p>"
    rows = [
        "<p>For the worst layers by isolated error: the model's output SQNR (mean over outputs) measured with "
        "one fix applied. Paste the entry into <code>quantization_parameters.custom_setting</code>.</p>",
        "<table><tr><th>Tensor</th><th>Output SQNR, only this layer quantized (dB)</th><th>Fix</th>"
        "<th>Output SQNR with the fix (dB)</th><th>Gain (dB)</th><th>custom_setting entry</th></tr>",
    ]
    for s in report.suggestions:
        iso = fmt_db(s.isolated_output_sqnr_db)
        if not s.fixes:
            rows.append(
                f"<tr><td class=tensor>{html.escape(s.tensor)}</td><td class=num>{iso}</td>"
                "<td colspan=4>no fix could be measured</td></tr>"
            )
        for f in s.fixes:
            rows.append(
                f"<tr><td class=tensor>{html.escape(s.tensor)}</td><td class=num>{iso}</td>"
                f"<td>{FIX_NAMES[f.kind]}</td><td class=num>{fmt_db(f.output_sqnr_db)}</td>"
                f"<td class=num>{f.gain_db:+.2f}</td><td><pre>{html.escape(setting_json(f))}</pre></td></tr>"
            )
    rows.append("</table>")
    return "\n".join(rows)


def _layer_table(report: AnalysisReport) -> str:
    rows = [
        "<table><tr><th>#</th><th>Op</th><th>Tensor</th><th>Iso. output SQNR (dB)</th><th>Iso. SQNR (dB)</th>"
        "<th>Iso. cosine</th>"
        "<th>Cum. SQNR (dB)</th><th>Cum. cosine</th><th>Cum. SNR</th><th>Float range</th><th>Quant range</th>"
        "<th>Clip range</th><th>Order</th><th>Note</th></tr>"
    ]
    for r, layer in enumerate(report.ranked, 1):
        i, c = layer.isolated, layer.cumulative
        rows.append(
            f"<tr><td class=num>{r}</td><td>{html.escape(layer.op_type)}</td>"
            f"<td class=tensor>{html.escape(layer.tensor)}</td>"
            f"<td class=num>{fmt_db(layer.isolated_output_sqnr_db)}</td><td class=num>{fmt_db(i and i.sqnr_db)}</td>"
            f"<td class=num>{fmt_cos(i and i.cosine)}</td><td class=num>{fmt_db(c and c.sqnr_db)}</td>"
            f"<td class=num>{fmt_cos(c and c.cosine)}</td><td class=num>{fmt_num(c and c.snr)}</td>"
            f"<td>{html.escape(fmt_range(layer.float_range))}</td><td>{html.escape(fmt_range(layer.quant_range))}</td>"
            f"<td>{html.escape(fmt_range(layer.clip_range))}</td><td class=num>{layer.index}</td>"
            f"<td>{html.escape(layer.note)}</td></tr>"
        )
    rows.append("</table>")
    return "\n".join(rows)
