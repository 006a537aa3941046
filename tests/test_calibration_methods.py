"""Calibration statistics (collectors), range methods, range cache and the ORT calibrater."""

from __future__ import annotations

import json
import tracemalloc

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper
from onnxruntime.quantization.calibrate import CalibrationDataReader, TensorsData

from xslim_ort.calibration import collectors
from xslim_ort.calibration.batches import source_from_batches
from xslim_ort.calibration.calibrators import StreamingCalibrater
from xslim_ort.calibration.collectors import SAMPLE_CAP, SENTINEL_MIN_ABS, TensorStats, collect_statistics
from xslim_ort.calibration.methods import (
    METHODS,
    compute_range,
    compute_ranges,
    needs_histogram,
    normalize_percentile,
)
from xslim_ort.calibration.range_cache import fingerprint, load_ranges, save_ranges
from xslim_ort.errors import ConfigError
from xslim_ort.qparams import fake_quant_activation


def _options() -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    return so


def _model(nodes, inputs, outputs, initializers=()) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _conv_relu_model() -> onnx.ModelProto:
    """x[N,2,H,W] -> Conv(1x1) -> c -> Relu -> r; spatial dims dynamic."""
    w = np.array([[[[1.0]], [[-2.0]]], [[[0.5]], [[0.5]]]], dtype=np.float32)
    return _model(
        [helper.make_node("Conv", ["x", "w"], ["c"]), helper.make_node("Relu", ["c"], ["r"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, "H", "W"])],
        [helper.make_tensor_value_info("r", TensorProto.FLOAT, ["N", 2, "H", "W"])],
        [onnx.numpy_helper.from_array(w, "w")],
    )


def _conv_relu_numpy(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    c = np.stack([x[:, 0] - 2 * x[:, 1], 0.5 * x[:, 0] + 0.5 * x[:, 1]], axis=1)
    return c, np.maximum(c, 0)


def _stats_of(x: np.ndarray, bins: int = 2048) -> TensorStats:
    x = np.asarray(x, dtype=np.float32).ravel()
    lo, hi = float(x.min()), float(x.max())
    hist = np.histogram(x, bins, (lo, hi))[0].astype(np.int64)
    return TensorStats("t", lo, hi, x.size, 0, hist, lo, hi)


def _qmse(x: np.ndarray, r: tuple[float, float]) -> float:
    return float(np.mean((fake_quant_activation(x, *r) - x) ** 2))


# -- collectors ---------------------------------------------------------------------------


def test_minmax_is_the_exact_global_range_with_varying_spatial_sizes():
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal((1, 2, h, w)).astype(np.float32) * (1 + i) for i, (h, w) in
          enumerate([(3, 5), (7, 2), (16, 16), (1, 1), (9, 4)])]
    stats = collect_statistics(_conv_relu_model(), ["x", "c", "r"], source_from_batches([{"x": x} for x in xs]),
                               session_options=_options())
    cs, rs = zip(*(_conv_relu_numpy(x) for x in xs), strict=True)
    for name, arrays in (("x", xs), ("c", cs), ("r", rs)):
        flat = np.concatenate([a.ravel() for a in arrays])
        s = stats[name]
        assert (s.min, s.max) == pytest.approx((flat.min(), flat.max()), rel=1e-6)
        assert s.count == flat.size and s.nonfinite == 0
        assert s.hist is not None and s.hist.sum() == flat.size and s.hist.dtype == np.int64
        assert compute_range(s, "minmax") == (s.min, s.max)
    # The histogram is the one NumPy computes over [min, max].
    flat = np.concatenate([x.ravel() for x in xs])
    expected = np.histogram(flat, 2048, (stats["x"].hist_lo, stats["x"].hist_hi))[0]
    assert np.abs(expected - stats["x"].hist).sum() <= 2  # bin-edge rounding only


def test_histograms_only_where_asked_and_non_float_and_initializers_skipped():
    model = _model(
        [helper.make_node("Cast", ["i"], ["f"], to=TensorProto.FLOAT),
         helper.make_node("Add", ["f", "b"], ["y"]),
         helper.make_node("Cast", ["y"], ["yi"], to=TensorProto.INT64)],
        [helper.make_tensor_value_info("i", TensorProto.INT64, [2])],
        [helper.make_tensor_value_info("yi", TensorProto.INT64, [2])],
        [onnx.numpy_helper.from_array(np.array([0.5, -0.5], np.float32), "b")],
    )
    batches = source_from_batches([{"i": np.array([1, 2], np.int64)}, {"i": np.array([-3, 4], np.int64)}])
    stats = collect_statistics(model, ["i", "f", "b", "y", "yi"], batches, histograms={"y"},
                               session_options=_options())
    assert sorted(stats) == ["f", "y"]
    assert stats["f"].hist is None and stats["y"].hist is not None
    assert (stats["y"].min, stats["y"].max) == (-2.5, 3.5)
    with pytest.raises(KeyError, match="nope"):
        collect_statistics(model, ["nope"], batches)


def test_progress_counts_batches_of_every_pass():
    seen: list[int] = []
    xs = [{"x": np.ones((1, 2, 2, 2), np.float32) * i} for i in range(5)]
    collect_statistics(_conv_relu_model(), ["r"], source_from_batches(xs), progress=seen.append,
                       session_options=_options())
    assert seen == [1] * 10  # pass 1 + histogram pass
    seen.clear()
    collect_statistics(_conv_relu_model(), ["r"], source_from_batches(xs), histograms=False,
                       progress=seen.append, session_options=_options())
    assert seen == [1] * 5


def test_collection_does_not_keep_activations():
    """200 batches of 256 KiB activations; the traced peak stays around a couple of batches."""
    rng = np.random.default_rng(1)
    one = rng.standard_normal((1, 2, 128, 128)).astype(np.float32)

    def batches():
        for i in range(200):
            yield {"x": one * (1 + i % 7)}

    tracemalloc.start()
    try:
        stats = collect_statistics(_conv_relu_model(), ["x", "c", "r"], batches, session_options=_options())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    per_batch = 3 * one.nbytes
    assert stats["r"].count == 200 * one.size
    assert peak < 12 * per_batch, (peak, per_batch)  # all activations would be 200 * per_batch


def test_models_over_the_protobuf_limit_go_through_external_data(monkeypatch):
    rng = np.random.default_rng(13)
    xs = [{"x": rng.standard_normal((1, 2, 5, 5)).astype(np.float32)} for _ in range(3)]
    big = onnx.ModelProto()
    big.CopyFrom(_conv_relu_model())
    big.graph.initializer.append(onnx.numpy_helper.from_array(np.zeros(4096, np.float32), "unused"))
    expected = collect_statistics(big, ["c", "r"], source_from_batches(xs), session_options=_options())
    monkeypatch.setattr(collectors, "_PROTO_LIMIT", 1000)
    got = collect_statistics(big, ["c", "r"], source_from_batches(xs), session_options=_options())
    assert big.graph.initializer[-1].data_location == TensorProto.DEFAULT  # caller's model untouched
    for name in ("c", "r"):
        assert (got[name].min, got[name].max) == (expected[name].min, expected[name].max)
        assert np.array_equal(got[name].hist, expected[name].hist)


def test_large_tensors_are_histogrammed_on_a_strided_sample():
    rng = np.random.default_rng(12)
    size = 4 * SAMPLE_CAP + 3
    xs = [rng.standard_normal(size).astype(np.float32) for _ in range(3)]
    model = _model([helper.make_node("Identity", ["x"], ["y"])],
                   [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None])])
    s = collect_statistics(model, ["y"], source_from_batches([{"x": x} for x in xs]), session_options=_options())["y"]
    flat = np.concatenate(xs)
    assert s.count == flat.size and (s.min, s.max) == (flat.min(), flat.max())  # exact
    assert s.hist.sum() == sum(x[i % 5 :: 5].size for i, x in enumerate(xs))  # every 5th, offset turning
    lo, hi = compute_range(s, "percentile", max_percentile=0.999)
    assert lo == pytest.approx(np.quantile(flat, 0.001), abs=0.03)
    assert hi == pytest.approx(np.quantile(flat, 0.999), abs=0.03)


def test_collection_is_deterministic():
    rng = np.random.default_rng(2)
    xs = [{"x": rng.standard_normal((1, 2, 8, 8)).astype(np.float32)} for _ in range(6)]
    runs = [collect_statistics(_conv_relu_model(), ["c", "r"], source_from_batches(xs), session_options=_options())
            for _ in range(2)]
    for name in ("c", "r"):
        assert np.array_equal(runs[0][name].hist, runs[1][name].hist)
        for method in METHODS:
            assert compute_range(runs[0][name], method) == compute_range(runs[1][name], method)


def _mask_model() -> onnx.ModelProto:
    """scores + (1 - mask) * -3.4e38, then Softmax; plus Div and Log producing Inf and NaN."""
    f = TensorProto.FLOAT
    return _model(
        [helper.make_node("Sub", ["one", "m"], ["inv"]),
         helper.make_node("Mul", ["inv", "big"], ["mask"]),
         helper.make_node("Add", ["s", "mask"], ["masked"]),
         helper.make_node("Softmax", ["masked"], ["p"], axis=-1),
         helper.make_node("Div", ["s", "m"], ["ratio"]),
         helper.make_node("Log", ["s"], ["logs"])],
        [helper.make_tensor_value_info("s", f, [1, 8]), helper.make_tensor_value_info("m", f, [1, 8])],
        [helper.make_tensor_value_info(n, f, [1, 8]) for n in ("p", "ratio", "logs")],
        [onnx.numpy_helper.from_array(np.array(1.0, np.float32), "one"),
         onnx.numpy_helper.from_array(np.array(-3.4e38, np.float32), "big")],
    )


def test_attention_mask_infinities_and_nans_are_bounded():
    rng = np.random.default_rng(3)
    batches = []
    for i in range(6):
        s = rng.uniform(-4, 5, (1, 8)).astype(np.float32)
        m = np.ones((1, 8), np.float32)
        m[0, 5 + i % 3:] = 0.0
        batches.append({"s": s, "m": m})
    names = ["mask", "masked", "p", "ratio", "logs"]
    stats = collect_statistics(_mask_model(), names, source_from_batches(batches), session_options=_options())
    all_s = np.concatenate([b["s"].ravel() for b in batches])
    n_masked = sum(int((b["m"] == 0).sum()) for b in batches)

    masked = stats["masked"]
    assert masked.min == pytest.approx(-3.4e38, rel=1e-6)  # the true finite extreme is kept
    assert masked.below == n_masked and masked.above == 0 and masked.nonfinite == 0
    assert masked.hist is not None and masked.hist.sum() == all_s.size - n_masked
    bulk = all_s[np.concatenate([b["m"].ravel() for b in batches]) == 1]
    assert masked.hist_lo <= bulk.min() and masked.hist_lo >= bulk.min() * 1.01
    assert masked.hist_hi >= bulk.max() and masked.hist_hi <= bulk.max() * 1.01

    mask = stats["mask"]
    assert mask.below == n_masked and mask.hist_lo == mask.hist_hi == 0.0
    for method in METHODS:
        lo, hi = compute_range(masked, method)
        assert lo == masked.hist_lo and bulk.max() * 0.5 < hi <= masked.hist_hi  # mask side never clipped
        assert compute_range(mask, method) == (-SENTINEL_MIN_ABS, 0.0)  # masking survives int8

    ratio = stats["ratio"]  # s / 0 = +-inf where masked
    assert ratio.nonfinite == n_masked and ratio.count == all_s.size - n_masked
    assert np.isfinite([ratio.min, ratio.max]).all() and ratio.hist is not None
    assert ratio.hist.sum() == ratio.count
    logs = stats["logs"]  # log of negatives is NaN
    assert logs.nonfinite == int((all_s <= 0).sum())
    for s in (ratio, logs):
        for method in METHODS:
            assert np.isfinite(compute_range(s, method)).all()


def test_moderate_masks_are_sentinels_too():
    """-10000 masks (older BERT exports) are set aside the same way."""
    rng = np.random.default_rng(4)
    x = rng.uniform(-6, 6, 4000).astype(np.float32)
    x[::5] = -10000.0
    model = _model([helper.make_node("Identity", ["x"], ["y"])],
                   [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None])])
    s = collect_statistics(model, ["y"], source_from_batches([{"x": x}]), session_options=_options())["y"]
    assert s.below == 800 and s.min == -10000.0
    assert -6.1 < s.hist_lo < -5.9 and 5.9 < s.hist_hi < 6.1


# -- methods ------------------------------------------------------------------------------


def test_percentile_of_a_known_distribution():
    x = np.linspace(0.0, 1.0, 1_000_001, dtype=np.float32)
    lo, hi = compute_range(_stats_of(x), "percentile", max_percentile=0.99)
    assert lo == pytest.approx(0.01, abs=1e-3) and hi == pytest.approx(0.99, abs=1e-3)
    lo, hi = compute_range(_stats_of(x), "percentile", max_percentile=99.9)  # a percentage
    assert lo == pytest.approx(0.001, abs=1e-3) and hi == pytest.approx(0.999, abs=1e-3)
    assert compute_range(_stats_of(x), "percentile", max_percentile=1) == (0.0, 1.0)
    rng = np.random.default_rng(5)
    g = rng.standard_normal(2_000_000).astype(np.float32)
    lo, hi = compute_range(_stats_of(g), "percentile", max_percentile=0.9999)
    assert lo == pytest.approx(-3.719, abs=0.05) and hi == pytest.approx(3.719, abs=0.05)


def test_percentile_values():
    assert normalize_percentile(0.9999) == 0.9999
    assert normalize_percentile(99.99) == pytest.approx(0.9999)
    assert normalize_percentile(100) == 1.0
    assert normalize_percentile(1) == 1.0
    for bad in (0.9, 50, 100.5, -1):
        with pytest.raises(ConfigError, match="max_percentile"):
            normalize_percentile(bad)


def test_mse_is_tighter_and_better_than_minmax_on_gaussian_with_outlier():
    rng = np.random.default_rng(6)
    x = np.concatenate([rng.standard_normal(300_000), [60.0, -25.0]]).astype(np.float32)
    s = _stats_of(x)
    mm = compute_range(s, "minmax")
    mse = compute_range(s, "mse")
    assert mm == (-25.0, 60.0)
    assert mm[0] < mse[0] and mse[1] < mm[1]
    assert _qmse(x, mse) < 0.8 * _qmse(x, mm)
    # Within a few per cent of the best range found by brute force.
    best = min(_qmse(x, (a, b)) for a in np.linspace(-25, 0, 26) for b in np.linspace(0, 60, 61))
    assert _qmse(x, mse) <= best * 1.03


def test_mse_one_sided_relu():
    rng = np.random.default_rng(7)
    x = np.maximum(rng.standard_normal(400_000) * 2, 0).astype(np.float32)
    lo, hi = compute_range(_stats_of(x), "mse")
    assert lo == 0.0 and 6.0 < hi < float(x.max())
    assert _qmse(x, (lo, hi)) < _qmse(x, (0.0, float(x.max())))


def test_kl_threshold_is_sane():
    rng = np.random.default_rng(8)
    g = rng.standard_normal(500_000).astype(np.float32)
    lo, hi = compute_range(_stats_of(g), "kl")
    assert -5.0 < lo < -2.0 and 2.0 < hi < 5.0 and lo == pytest.approx(-hi, abs=0.01)
    r = np.maximum(g, 0) * 3  # half exact zeros
    lo, hi = compute_range(_stats_of(r), "kl")
    assert lo == 0.0 and 6.0 < hi <= float(r.max())


def test_default_and_all_methods_give_ranges_inside_the_data():
    rng = np.random.default_rng(9)
    x = rng.laplace(size=100_000).astype(np.float32)
    s = _stats_of(x)
    for method in METHODS:
        lo, hi = compute_range(s, method)
        assert s.min <= lo < 0 < hi <= s.max
        assert needs_histogram(method) == (method != "minmax")
    # default weighs rounding noise more than mse: never a wider range
    (dlo, dhi), (mlo, mhi) = compute_range(s, "default"), compute_range(s, "mse")
    assert mlo <= dlo and dhi <= mhi and (dlo, dhi) != (mlo, mhi)
    with pytest.raises(ConfigError, match="calibration_type"):
        compute_range(s, "entropy")
    no_hist = TensorStats("t", -1.0, 2.0, 10, 0, None, -1.0, 2.0)
    assert compute_range(no_hist, "minmax") == (-1.0, 2.0)
    with pytest.raises(ValueError, match="histogram"):
        compute_range(no_hist, "mse")


def test_degenerate_statistics():
    const = TensorStats("c", 3.0, 3.0, 5, 0, np.array([5, 0, 0, 0]), 3.0, 3.0)
    empty = TensorStats("e", float("nan"), float("nan"), 0, 7, None, float("nan"), float("nan"))
    for method in METHODS:
        assert compute_range(const, method) == (3.0, 3.0)
        assert compute_range(empty, method) == (0.0, 0.0)
    assert compute_ranges({"c": const, "e": empty}, "mse") == {"c": (3.0, 3.0)}


def test_per_tensor_methods_and_percentiles():
    rng = np.random.default_rng(10)
    a = _stats_of(np.concatenate([rng.standard_normal(100_000), [30.0]]))
    b = _stats_of(rng.uniform(-1, 1, 100_000))
    stats = {"a": a, "b": b}
    ranges = compute_ranges(stats, {"a": "minmax", "b": "percentile"}, max_percentile={"b": 0.99})
    assert ranges["a"] == compute_range(a, "minmax")
    assert ranges["b"] == compute_range(b, "percentile", max_percentile=0.99)
    assert ranges["b"][1] == pytest.approx(0.98, abs=0.01)
    assert compute_ranges(stats, {"a": "mse"})["b"] == compute_range(b, "default")
    assert list(compute_ranges({"b": b, "a": a}, "mse")) == ["a", "b"]


# -- range cache --------------------------------------------------------------------------


def test_range_cache_round_trip_and_invalidation(tmp_path):
    model = _conv_relu_model()
    settings = {"methods": [["c", "mse"], ["r", "kl"]], "num_bins": 2048}
    key = fingerprint(model, "data-1", settings)
    assert key == fingerprint(model, "data-1", dict(reversed(list(settings.items()))))
    assert load_ranges(tmp_path, key) is None
    ranges = {"r": (0.0, 6.25), "c": (-1.5, 0.1 + 0.2)}
    save_ranges(tmp_path, key, ranges)
    assert load_ranges(tmp_path, key) == ranges  # floats round-trip exactly
    text = (tmp_path / f"{key}.json").read_text()
    assert text.index('"c"') < text.index('"r"')  # sorted keys
    save_ranges(tmp_path, key, dict(reversed(list(ranges.items()))))
    assert (tmp_path / f"{key}.json").read_text() == text  # deterministic
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{key}.json"]  # no temp files left

    other = onnx.ModelProto()
    other.CopyFrom(model)
    other.graph.initializer[0].raw_data = np.full((2, 2, 1, 1), 0.25, np.float32).tobytes()
    keys = {
        fingerprint(other, "data-1", settings),
        fingerprint(model, "data-2", settings),
        fingerprint(model, "data-1", {**settings, "num_bins": 1024}),
    }
    assert key not in keys and len(keys) == 3

    (tmp_path / f"{key}.json").write_text("{not json")
    assert load_ranges(tmp_path, key) is None
    (tmp_path / f"{key}.json").write_text(json.dumps({"format": 1, "key": "0" * 64, "ranges": {}}))
    assert load_ranges(tmp_path, key) is None
    with pytest.raises(ValueError, match="finite"):
        save_ranges(tmp_path, key, {"x": (0.0, float("inf"))})
    with pytest.raises(ValueError, match="key"):
        load_ranges(tmp_path, "../etc")


# -- ORT integration ----------------------------------------------------------------------


class _Reader(CalibrationDataReader):
    def __init__(self, batches):
        self._it = iter(batches)

    def get_next(self):
        return next(self._it, None)


def test_streaming_calibrater_gives_ort_tensors_data(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(_conv_relu_model(), str(path))
    rng = np.random.default_rng(11)
    xs = [{"x": rng.standard_normal((1, 2, 4, 6)).astype(np.float32)} for _ in range(8)]
    cal = StreamingCalibrater(str(path), method={"c": "minmax", "r": "mse"}, session_options=_options())
    cal.collect_data(_Reader(xs[:5]))
    cal.collect_data(_Reader(xs[5:]))  # several calls add up
    data = cal.compute_data()
    assert isinstance(data, TensorsData) and sorted(data.keys()) == ["c", "r", "x"]
    flat_c = np.concatenate([_conv_relu_numpy(b["x"])[0].ravel() for b in xs])
    lo, hi = data["c"].range_value
    assert (float(lo), float(hi)) == pytest.approx((flat_c.min(), flat_c.max()), rel=1e-6)
    assert data["r"].range_value[0] == 0.0
    assert cal.statistics["r"].count == flat_c.size
    assert cal.statistics["c"].hist is None  # minmax needs none


# -- zoo ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_minilm_attention_mask_gets_bounded_ranges(zoo):
    text = zoo / "text"
    samples = []
    for i in range(8):
        sample = {}
        for name in ("input_ids", "attention_mask", "token_type_ids"):
            listing = text / f"calib_{name}.txt"
            rel = listing.read_text().split()[i]
            sample[name] = np.load(listing.parent / rel)
        samples.append(sample)
    model = onnx.load(str(zoo / "models" / "all_minilm_l6_v2.onnx"))
    inferred = onnx.shape_inference.infer_shapes(model)
    names = [v.name for v in inferred.graph.value_info if "attention/self" in v.name or v.name == "/m/Mul_output_0"]
    stats = collect_statistics(model, names, source_from_batches(samples), session_options=_options())
    ranges = compute_ranges(stats, "default")
    assert ranges["/m/Mul_output_0"] == (-SENTINEL_MIN_ABS, 0.0)
    masked = [n for n, s in stats.items() if s.below > 0 and n != "/m/Mul_output_0"]
    assert masked  # the score + mask Adds
    for name, (lo, hi) in ranges.items():
        assert -1e4 <= lo <= hi <= 1e4, name
