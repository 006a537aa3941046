"""The quantization analysis: numbers checked against NumPy, ranking, fixes, report files.

Tiny Conv chains are built with onnx.helper and quantized with ONNX Runtime's
``quantize_static`` (QDQ, int8, per channel). Their float weights and biases are then set
to the dequantized ones, so weight quantization is lossless and each layer's isolated
error is exactly the fake quantization of its float output, which NumPy can compute.
"""

from __future__ import annotations

import json
import math
import random
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

from xslim_ort.analysis import (
    AnalysisReport,
    Fix,
    Histogram,
    LayerReport,
    OutputReport,
    Suggestion,
    analyze,
    measure_fixes,
)
from xslim_ort.analysis.graph import QDQGraph
from xslim_ort.analysis.stats import ErrorAccumulator, ErrorStats, StreamingHistogram
from xslim_ort.calibration.batches import source_from_batches
from xslim_ort.calibration.methods import compute_range
from xslim_ort.errors import DataError
from xslim_ort.qparams import ACT_QMAX, ACT_QMIN, cosine, dequantize, quantize, sqnr_db

CHAIN = ["r1", "r2", "r3"]


# -- tiny models ----------------------------------------------------------------------------


def _float_chain(seed: int = 0) -> onnx.ModelProto:
    """x -> 3 x (Conv 3x3 + Relu) -> GlobalAveragePool -> Flatten -> Gemm -> y."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    prev, ch = "x", 3
    for i, name in enumerate(CHAIN, 1):
        w = rng.standard_normal((8, ch, 3, 3)).astype(np.float32) * 0.3
        b = rng.standard_normal(8).astype(np.float32) * 0.1
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
        nodes.append(helper.make_node("Conv", [prev, f"w{i}", f"b{i}"], [f"c{i}"], f"conv{i}", pads=[1, 1, 1, 1]))
        nodes.append(helper.make_node("Relu", [f"c{i}"], [name], f"relu{i}"))
        prev, ch = name, 8
    inits += [
        numpy_helper.from_array(rng.standard_normal((4, 8)).astype(np.float32), "wg"),
        numpy_helper.from_array(np.zeros(4, np.float32), "bg"),
    ]
    nodes += [
        helper.make_node("GlobalAveragePool", [prev], ["gap"], "gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], "flatten"),
        helper.make_node("Gemm", ["flat", "wg", "bg"], ["y"], "gemm", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        initializer=inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _samples(n: int, seed: int = 1) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((1, 3, 8, 8)).astype(np.float32)} for _ in range(n)]


class _Reader(CalibrationDataReader):
    def __init__(self, batches: list[dict[str, np.ndarray]]) -> None:
        self._it = iter(batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)


def _quantize(float_path: Path, qdq_path: Path, batches: list[dict[str, np.ndarray]]) -> onnx.ModelProto:
    quantize_static(
        str(float_path),
        str(qdq_path),
        _Reader(batches),
        quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8,
        per_channel=True,
    )
    return onnx.load(str(qdq_path))


def _lossless_weights(float_model: onnx.ModelProto, qdq: onnx.ModelProto) -> onnx.ModelProto:
    """The float model with the QDQ model's dequantized weights and biases."""
    inits = {t.name: numpy_helper.to_array(t) for t in qdq.graph.initializer}
    deq = {}
    for node in qdq.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in inits:
            axis = next((a.i for a in node.attribute if a.name == "axis"), None)
            scale = inits[node.input[1]]
            deq[node.output[0]] = dequantize(
                inits[node.input[0]], scale, inits[node.input[2]], axis if scale.size > 1 else None
            )
    by_consumer = {}
    for node in qdq.graph.node:
        if node.op_type in ("Conv", "Gemm"):
            by_consumer[node.name] = [deq.get(n) for n in node.input]
    out = onnx.ModelProto()
    out.CopyFrom(float_model)
    values = {}
    for node in out.graph.node:
        for k, name in enumerate(node.input):
            q = by_consumer.get(node.name, [])
            if k < len(q) and q[k] is not None:
                values[name] = q[k]
    for init in out.graph.initializer:
        if init.name in values:
            init.CopyFrom(numpy_helper.from_array(values[init.name].astype(np.float32), init.name))
    return out


def _set_scale(qdq: onnx.ModelProto, tensor: str, factor: float) -> None:
    """Multiply the activation scale of ``tensor`` (a terrible scale for a test)."""
    for init in qdq.graph.initializer:
        if init.name == f"{tensor}_scale":
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * np.float32(factor), init.name))
            return
    raise AssertionError(f"no scale for {tensor}")


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """Float model, QDQ model, the same with r1's scale 16x too coarse, and data."""
    tmp = tmp_path_factory.mktemp("chain")
    calib = _samples(16, seed=1)
    onnx.save(_float_chain(), str(tmp / "f0.onnx"))
    qdq = _quantize(tmp / "f0.onnx", tmp / "q.onnx", calib)
    float_model = _lossless_weights(onnx.load(str(tmp / "f0.onnx")), qdq)
    bad = onnx.ModelProto()
    bad.CopyFrom(qdq)
    _set_scale(bad, "r1", 16.0)
    return {"float": float_model, "qdq": qdq, "bad": bad, "data": _samples(12, seed=2)}


def _float_values(model: onnx.ModelProto, names: list[str], batches: list[dict[str, np.ndarray]]):
    m = onnx.ModelProto()
    m.CopyFrom(model)
    m.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names if n not in {o.name for o in m.graph.output})
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    outs = [o.name for o in sess.get_outputs()]
    runs = [dict(zip(outs, sess.run(outs, b), strict=True)) for b in batches]
    return {n: np.concatenate([r[n] for r in runs]) for n in names}


def _qparams(qdq: onnx.ModelProto, tensor: str) -> tuple[np.ndarray, np.ndarray]:
    inits = {t.name: numpy_helper.to_array(t) for t in qdq.graph.initializer}
    return inits[f"{tensor}_scale"], inits[f"{tensor}_zero_point"]


def _fake_quant(x: np.ndarray, scale: np.ndarray, zp: np.ndarray) -> np.ndarray:
    return dequantize(quantize(x, scale, zp, ACT_QMIN, ACT_QMAX), scale, zp)


def _run(chain: dict[str, object], model: str = "qdq", **kw) -> AnalysisReport:
    kw.setdefault("num_threads", 1)
    return analyze(chain["float"], chain[model], source_from_batches(chain["data"]), **kw)


# -- statistics -----------------------------------------------------------------------------


def test_error_accumulator_matches_qparams_on_concatenated_data() -> None:
    rng = np.random.default_rng(0)
    refs = [rng.standard_normal(1000 * (i + 1)).astype(np.float32) for i in range(4)]
    tests = [r + rng.standard_normal(r.size).astype(np.float32) * 0.1 for r in refs]
    acc = ErrorAccumulator()
    for r, t in zip(refs, tests, strict=True):
        acc.add(r, t)
    res = acc.result()
    ref, tst = np.concatenate(refs), np.concatenate(tests)
    assert res.sqnr_db == pytest.approx(sqnr_db(ref, tst), abs=1e-4)
    assert res.cosine == pytest.approx(cosine(ref, tst), abs=1e-6)
    assert res.snr == pytest.approx(10 ** (-sqnr_db(ref, tst) / 10), rel=1e-4)
    assert res.mse == pytest.approx(float(np.mean((ref.astype(np.float64) - tst) ** 2)), rel=1e-4)
    assert ErrorAccumulator().result() is None
    exact = ErrorAccumulator()
    exact.add(ref, ref)
    assert exact.result().sqnr_db == math.inf and exact.result().snr == 0.0
    # a -3.4e38 attention mask overflows float32 sums: float64 takes over
    mask = np.where(np.arange(ref.size) % 7 == 0, np.float32(-3.4e38), ref).astype(np.float32)
    huge = ErrorAccumulator()
    huge.add(mask, mask + tst - ref)
    assert math.isfinite(huge.result().sqnr_db)
    assert huge.result().sqnr_db == pytest.approx(sqnr_db(mask, mask + tst - ref), abs=1e-6)


def test_streaming_histogram_grows_without_losing_counts() -> None:
    rng = np.random.default_rng(3)
    parts = [rng.normal(0, 0.1, 5000), rng.normal(2, 1, 5000), rng.normal(-30, 5, 2000), rng.normal(0, 1, 3000)]
    hist = StreamingHistogram(bins=512)
    for p in parts:
        hist.add(p.astype(np.float32))
    data = np.concatenate(parts).astype(np.float32)
    assert hist.total == data.size
    assert (hist.min, hist.max) == (float(data.min()), float(data.max()))
    edges = hist.lo + hist.width * np.arange(hist.bins + 1)
    direct, _ = np.histogram(data.astype(np.float64), bins=edges)
    # merging is exact up to float rounding of values sitting on a bin edge
    assert np.abs(direct - hist.counts).sum() <= 4
    # calibration's percentile method reads it as it reads its own histograms
    lo, hi = compute_range(hist.tensor_stats("t"), "percentile", max_percentile=0.999)
    assert abs(lo - np.quantile(data, 0.001)) <= hist.width
    assert abs(hi - np.quantile(data, 0.999)) <= hist.width
    lo_c, hi_c, counts = hist.coarse(32)
    assert sum(counts) == data.size and lo_c <= hist.min and hi_c >= hist.max


# -- graph reading ------------------------------------------------------------------------


def test_points_regions_and_names(chain: dict[str, object]) -> None:
    g = QDQGraph(chain["qdq"], chain["float"])
    names = [p.name for p in g.points]
    assert names[0] == "x" and {"r1", "r2", "r3", "gap", "flat", "y"} <= set(names)
    by_name = {p.name: p for p in g.points}
    assert by_name["y"].tensor != "y"  # ORT renames a quantized graph output's producer output
    assert g.region(by_name["r2"]).boundaries == (("r1_DequantizeLinear_Output", "r1"),)
    assert g.region(by_name["x"]).nodes == ()
    conv_region = [g.nodes[i].op_type for i in g.region(by_name["r2"]).nodes]
    assert conv_region.count("Conv") == 1 and "DequantizeLinear" in conv_region


# -- numbers ----------------------------------------------------------------------------------


def test_isolated_error_is_the_fake_quantization_of_the_float_tensor(chain: dict[str, object]) -> None:
    report = _run(chain, suggestions=0, isolated_samples=5)
    assert report.samples == 12 and report.isolated_samples == 5
    layers = {layer.tensor: layer for layer in report.layers}
    floats = _float_values(chain["float"], ["x", *CHAIN], chain["data"])
    for name in ["x", *CHAIN]:
        scale, zp = _qparams(chain["qdq"], name)
        first = floats[name][:5]  # isolated errors: the first 5 samples
        expected = sqnr_db(first, _fake_quant(first, scale, zp))
        assert layers[name].isolated.sqnr_db == pytest.approx(expected, abs=1e-3), name
        assert layers[name].float_range == (float(floats[name].min()), float(floats[name].max()))
        qmin, qmax = (ACT_QMIN - int(zp)) * float(scale), (ACT_QMAX - int(zp)) * float(scale)
        assert layers[name].clip_range == pytest.approx((qmin, qmax))
    # the input is quantized first: cumulative and isolated are the same thing there
    x = floats["x"]
    assert layers["x"].cumulative.sqnr_db == pytest.approx(sqnr_db(x, _fake_quant(x, *_qparams(chain["qdq"], "x"))))
    # the last point is the model output: its cumulative error is the model's error
    assert layers["y"].cumulative.sqnr_db == pytest.approx(report.output_sqnr_db["y"], abs=1e-9)
    assert layers["y"].isolated.sqnr_db == pytest.approx(layers["y"].isolated_output_sqnr_db, abs=1e-4)
    assert sum(layers["r1"].histogram.counts) == 12 * 8 * 8 * 8


def test_terrible_scale_ranks_first_by_isolated_but_not_by_cumulative(chain: dict[str, object]) -> None:
    report = _run(chain, model="bad", suggestions=1)
    ranked = report.ranked
    assert ranked[0].tensor == "r1"
    by_cumulative = sorted(report.layers, key=lambda layer: -layer.cumulative.snr)
    assert by_cumulative[0].tensor != "r1"  # everything after r1 inherits its error
    layers = {layer.tensor: layer for layer in report.layers}
    assert layers["r1"].isolated.sqnr_db < layers["r2"].isolated.sqnr_db - 10
    assert layers["r3"].cumulative.snr > layers["r1"].cumulative.snr
    # the fixes are measured and both repair most of the damage
    (s,) = report.suggestions
    fixes = {f.kind: f for f in s.fixes}
    assert s.tensor == "r1" and set(fixes) == {"keep_float", "percentile"}
    assert fixes["keep_float"].gain_db > 6 and fixes["percentile"].gain_db > 6
    assert fixes["keep_float"].custom_setting == {"input_names": ["x"], "output_names": ["r1"], "precision_level": 2}
    assert fixes["percentile"].custom_setting == {
        "input_names": ["x"],
        "output_names": ["r1"],
        "calibration_type": "percentile",
    }
    good = _run(chain, suggestions=0)
    # keeping r1 float in the bad model leaves the good model's other errors: close to it
    assert fixes["keep_float"].output_sqnr_db > good.output_sqnr_db["y"] - 1.0
    assert fixes["keep_float"].gain_db == pytest.approx(fixes["keep_float"].output_sqnr_db - report.output_sqnr_db["y"])


def test_keep_float_restores_the_folded_relu(chain: dict[str, object]) -> None:
    g = QDQGraph(chain["qdq"], chain["float"])
    point = next(p for p in g.points if p.name == "r2")
    model = g.keep_float(point, g.region(point))
    onnx.checker.check_model(model)
    types = [n.op_type for n in model.graph.node if n.name.startswith("xslim_keep_float/")]
    assert types == ["Conv", "Relu"]
    assert not any(n.input and n.input[0] == "r2" and n.op_type == "QuantizeLinear" for n in model.graph.node)


def test_unsorted_qdq_graph_gives_the_same_numbers(chain: dict[str, object]) -> None:
    """Quantizers may append Q/DQ nodes after their consumers; ONNX Runtime sorts on load."""
    shuffled = onnx.ModelProto()
    shuffled.CopyFrom(chain["bad"])
    nodes = list(shuffled.graph.node)
    del shuffled.graph.node[:]
    shuffled.graph.node.extend(reversed(nodes))
    a = _run(chain, model="bad", suggestions=1)
    b = analyze(chain["float"], shuffled, source_from_batches(chain["data"]), suggestions=1, num_threads=1)
    assert [layer.tensor for layer in a.ranked] == [layer.tensor for layer in b.ranked]
    for la, lb in zip(a.layers, b.layers, strict=True):
        assert la.isolated_output_sqnr_db == pytest.approx(lb.isolated_output_sqnr_db, abs=1e-6)
    assert a.suggestions[0].fixes[0].gain_db == pytest.approx(b.suggestions[0].fixes[0].gain_db, abs=1e-6)


def test_uint8_activations(chain: dict[str, object], tmp_path: Path) -> None:
    """ONNX Runtime's default activation type: zero points in [0, 255]."""
    onnx.save(_float_chain(), str(tmp_path / "f.onnx"))
    quantize_static(
        str(tmp_path / "f.onnx"),
        str(tmp_path / "q.onnx"),
        _Reader(_samples(16, seed=1)),
        quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        per_channel=True,
    )
    qdq = onnx.load(str(tmp_path / "q.onnx"))
    float_model = _lossless_weights(onnx.load(str(tmp_path / "f.onnx")), qdq)
    _set_scale(qdq, "r2", 16.0)
    source = source_from_batches(chain["data"])
    report = analyze(float_model, qdq, source, suggestions=1, num_threads=1, isolated_samples=12)
    r2 = next(layer for layer in report.layers if layer.tensor == "r2")
    assert r2.dtype == "uint8" and report.ranked[0].tensor == "r2"
    scale, zp = _qparams(qdq, "r2")
    f = _float_values(float_model, ["r2"], chain["data"])["r2"]
    expected = sqnr_db(f, dequantize(quantize(f, scale, zp, 0, 255), scale, zp))
    assert r2.isolated.sqnr_db == pytest.approx(expected, abs=1e-3)
    assert r2.clip_range == pytest.approx((-int(zp) * float(scale), (255 - int(zp)) * float(scale)))
    fixes = {f.kind: f for f in report.suggestions[0].fixes}
    assert fixes["percentile"].gain_db > 6 and fixes["keep_float"].gain_db > 6


def test_weights_held_outside_the_models_give_the_same_report(
    chain: dict[str, object], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Derived models carry placeholders; ORT gets the weights through the session options."""
    from xslim_ort.analysis import weights

    inline = _run(chain, model="bad", suggestions=1).to_json()
    monkeypatch.setattr(weights, "MIN_BYTES", 0)  # every initializer becomes a placeholder
    assert _run(chain, model="bad", suggestions=1).to_json() == inline


def test_chunking_does_not_change_the_numbers(chain: dict[str, object]) -> None:
    whole = _run(chain, suggestions=0).to_dict()
    pieces = _run(chain, suggestions=0, chunk_bytes=1).to_dict()
    for a, b in zip(whole["layers"], pieces["layers"], strict=True):
        assert a["tensor"] == b["tensor"]
        for kind in ("cumulative", "isolated"):
            assert a[kind]["sqnr_db"] == pytest.approx(b[kind]["sqnr_db"], rel=1e-6)
        assert a["histogram"] == b["histogram"]


def test_max_samples_cuts_batches(chain: dict[str, object]) -> None:
    batches = [{"x": np.concatenate([b["x"] for b in chain["data"][i : i + 4]])} for i in range(0, 12, 4)]
    whole = analyze(chain["float"], chain["qdq"], source_from_batches(batches), max_samples=6, suggestions=0)
    assert whole.samples == 6
    assert sum(next(iter(whole.layers)).histogram.counts) == 6 * 3 * 8 * 8


def test_measure_fixes_rejects_unknown_tensors(chain: dict[str, object]) -> None:
    with pytest.raises(DataError, match="nope"):
        measure_fixes(chain["float"], chain["qdq"], source_from_batches(chain["data"]), ["nope"])


def test_missing_input_is_a_data_error(chain: dict[str, object]) -> None:
    with pytest.raises(DataError, match="no input 'x'"):
        analyze(chain["float"], chain["qdq"], source_from_batches([{"z": np.zeros((1, 3, 8, 8), np.float32)}]))


# -- report files -------------------------------------------------------------------------


def test_files_are_deterministic_and_complete(chain: dict[str, object], tmp_path: Path) -> None:
    kept = {"gemm": "sensitivity: output SQNR -3.1 dB when quantized"}
    a = _run(chain, model="bad", suggestions=2, float_kept=kept).write(tmp_path / "a", "chain.q")
    b = _run(chain, model="bad", suggestions=2, float_kept=kept).write(tmp_path / "b", "chain.q")
    assert [p.name for p in a] == ["chain.q_report.md", "chain.q_report.json", "chain.q_report.html"]
    for pa, pb in zip(a, b, strict=True):
        assert pa.read_bytes() == pb.read_bytes(), pa.name
    data = json.loads(a[1].read_text())
    assert data["schema_version"] == 1
    assert [layer["rank"] for layer in data["layers"] if layer["tensor"] == "r1"] == [1]
    assert {layer["tensor"] for layer in data["layers"]} == {
        p.name for p in QDQGraph(chain["bad"], chain["float"]).points
    }
    assert data["float_kept"] == kept
    md = a[0].read_text()
    header = next(line for line in md.splitlines() if line.startswith("| Op | Var |"))
    assert header.startswith("| Op | Var | SNR | MSE | Cosine | Q.MinMax | F.MinMax | F.Hist |")
    rows = [line for line in md.splitlines() if line.startswith("| Conv | ") or line.startswith("| Gemm | ")]
    assert rows[0].startswith("| Conv | r1 |")
    assert '"precision_level": 2' in md and "sensitivity: output SQNR -3.1 dB" in md
    page = a[2].read_text()
    assert "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "<script" not in page and page.count('class="histogram"') == 6


def test_a_model_without_quantized_activations(chain: dict[str, object], tmp_path: Path) -> None:
    """FP16 or weight-only models have no activation Q/DQ: the report still gives the outputs."""
    report = analyze(chain["float"], chain["float"], source_from_batches(chain["data"]), num_threads=1)
    assert report.layers == () and report.suggestions == ()
    # float rounding only: the float model runs with ONNX Runtime's full optimizations
    assert report.output_sqnr_db["y"] > 100 and report.output_cosine["y"] == pytest.approx(1.0)
    paths = report.write(tmp_path, "same")
    assert "nothing to suggest" in paths[0].read_text()


def test_console_summary(chain: dict[str, object]) -> None:
    text = _run(chain, model="bad", suggestions=1).console_summary()
    assert re.search(r"output y: SQNR -?\d+\.\d\d dB, cosine 0\.\d{6}", text)
    table = [line for line in text.splitlines() if re.match(r"\s+\d+\s", line)]
    assert len(table) == 7 and table[0].split()[1] == "r1"  # 7 quantized tensors, r1 first
    assert "fix r1: keep float" in text or "fix r1: percentile" in text


def _fake_report(name: str) -> AnalysisReport:
    stats = ErrorStats(snr=0.01, sqnr_db=20.0, mse=0.1, cosine=0.99)
    layer = LayerReport(
        index=0,
        tensor=name,
        op_type="Conv",
        op_name=name,
        inputs=(name + "_in",),
        dtype="int8",
        scale=0.1,
        zero_point=0,
        clip_range=(-12.8, 12.7),
        float_range=(-1.0, 1.0),
        quant_range=(-1.0, 1.0),
        histogram=Histogram(lo=-1.0, hi=1.0, counts=tuple(range(128))),
        cumulative=stats,
        isolated=ErrorStats(snr=0.0, sqnr_db=math.inf, mse=0.0, cosine=1.0),  # error-free
        isolated_output_sqnr_db=30.0,
        note=name,
    )
    fix = Fix("keep_float", 31.0, 1.0, 0.999, {"input_names": [name + "_in"], "output_names": [name]})
    return AnalysisReport(
        float_model=name,
        quant_model=name,
        samples=1,
        isolated_samples=1,
        outputs=(OutputReport(name, stats),),
        layers=(layer,),
        suggestions=(Suggestion(name, 30.0, (fix,)),),
        float_kept={name: name},
    )


def test_model_strings_are_escaped() -> None:
    from xslim_ort.analysis.html import render_html

    nasty = '<script>alert("x")</script>|&amp;`'
    page = render_html(_fake_report(nasty))
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert "&amp;amp;" in page  # the literal "&amp;" in the name is escaped, not trusted
    layer = json.loads(_fake_report(nasty).to_json())["layers"][0]
    assert layer["isolated"] == {"snr": 0.0, "sqnr_db": None, "mse": 0.0, "cosine": 1.0}  # JSON has no inf
    md = _fake_report(nasty).to_markdown()
    assert "</script>\\|&amp;'" in md  # a pipe cannot break the table, a backtick the code span


# -- a real browser -------------------------------------------------------------------------

_CHROMIUM = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)


@pytest.mark.skipif(_CHROMIUM is None, reason="no headless Chromium installed")
def test_html_renders_in_headless_chromium(chain: dict[str, object], tmp_path: Path) -> None:
    report = _run(chain, model="bad", suggestions=1)
    html_path = report.write(tmp_path, "chain.q")[2]
    dom = subprocess.run(
        [_CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", html_path.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    assert 'id="layer-error-chart"' in dom
    assert dom.count("<circle") == 3 * len(report.layers) - sum(
        v is None for layer in report.layers for v in (layer.isolated_output_sqnr_db,)
    )
    assert dom.count('class="histogram"') == 6 and dom.count('class="clip-line"') == 12
    assert "keep float" in dom


# -- the zoo ----------------------------------------------------------------------------------


def _zoo_batches(zoo: Path, model: str, lines: list[str]) -> list[dict[str, np.ndarray]]:
    """The README's preprocessing: RGB, short side 256, centre crop 224, per-model normalisation."""
    import cv2

    out = []
    for rel in lines:
        img = cv2.imread(str(zoo / "images" / rel))[:, :, ::-1]
        h, w = img.shape[:2]
        s = 256 / min(h, w)
        img = cv2.resize(img, (round(w * s), round(h * s)), interpolation=cv2.INTER_LINEAR)
        h, w = img.shape[:2]
        top, left = (h - 224) // 2, (w - 224) // 2
        x = img[top : top + 224, left : left + 224].astype(np.float32)
        if model == "mobilenet_v2":
            x = (x / 255 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
        else:
            x = (x - 127) / 128
        out.append({"input": x.transpose(2, 0, 1)[None].astype(np.float32)})
    return out


@pytest.mark.zoo
@pytest.mark.slow
@pytest.mark.parametrize("model", ["mobilenet_v2", "efficientnet_lite0"])
def test_zoo_worst_layers_matter_more_than_random_ones(zoo: Path, model: str, tmp_path: Path) -> None:
    from onnxruntime.quantization.shape_inference import quant_pre_process

    lines = (zoo / "images" / "calib.txt").read_text().split()
    calib, data = _zoo_batches(zoo, model, lines[:8]), _zoo_batches(zoo, model, lines[8:16])
    quant_pre_process(str(zoo / "models" / f"{model}.onnx"), str(tmp_path / "f.onnx"), skip_symbolic_shape=True)
    qdq = _quantize(tmp_path / "f.onnx", tmp_path / "q.onnx", calib)
    source = source_from_batches(data)
    report = analyze(tmp_path / "f.onnx", tmp_path / "q.onnx", source, suggestions=0, num_threads=1)

    activations = {
        n.input[0]
        for n in qdq.graph.node
        if n.op_type == "QuantizeLinear" and n.input[0] not in {t.name for t in qdq.graph.initializer}
    }
    g = QDQGraph(qdq, onnx.load(str(tmp_path / "f.onnx")))
    assert {p.tensor for p in g.points} == activations
    assert len(report.layers) == len(activations)
    assert all(layer.isolated is not None and layer.cumulative is not None for layer in report.layers)

    ranked = [layer.tensor for layer in report.ranked]
    worst, rest = ranked[:3], ranked[3:]
    chosen = random.Random(0).sample(rest, 3)
    fixes = measure_fixes(tmp_path / "f.onnx", tmp_path / "q.onnx", source, worst + chosen, num_threads=1)
    gains = [next(f.gain_db for f in s.fixes if f.kind == "keep_float") for s in fixes]
    assert np.mean(gains[:3]) > np.mean(gains[3:]) + 0.3, gains
    assert len(report.write(tmp_path, model)) == 3


# -- the command --------------------------------------------------------------------------


def test_analyze_command_on_a_config(chain: dict[str, object], tmp_path: Path) -> None:
    from click.testing import CliRunner

    from xslim_ort.analysis.command import analyze_command

    onnx.save(chain["float"], str(tmp_path / "chain.onnx"))
    onnx.save(chain["bad"], str(tmp_path / "chain.q.onnx"))
    for i, batch in enumerate(chain["data"]):
        np.save(tmp_path / f"s{i}.npy", batch["x"])
    (tmp_path / "list.txt").write_text("".join(f"s{i}.npy\n" for i in range(len(chain["data"]))))
    config = {
        "calibration_parameters": {"input_parametres": [{"file_type": "npy", "data_list_path": "list.txt"}]},
        "quantization_parameters": {"analysis_samples": 5},
    }
    (tmp_path / "cfg.json").write_text(json.dumps(config))
    result = CliRunner().invoke(
        analyze_command,
        [str(tmp_path / "chain.onnx"), str(tmp_path / "chain.q.onnx"), "-c", str(tmp_path / "cfg.json")],
    )
    assert result.exit_code == 0, result.output
    assert "Quantization analysis on 5 samples (isolated errors on 5), 7 quantized tensors" in result.output
    report = json.loads((tmp_path / "chain.q_report.json").read_text())
    assert report["samples"] == 5 and report["layers"][1]["tensor"] == "r1"
    assert (tmp_path / "chain.q_report.html").is_file() and (tmp_path / "chain.q_report.md").is_file()
