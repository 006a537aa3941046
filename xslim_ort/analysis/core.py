"""Running the analysis: two passes over the samples, then measured suggestions.

1. Chunks of tensors: the float model (exposing the chunk's tensors) and the QDQ model
   (exposing their QuantizeLinear outputs) give histograms, ranges and the cumulative
   error. Only one chunk's tensors are alive at a time, so memory is bounded by
   ``chunk_bytes`` rather than by the model.
2. Layer by layer: the float model with only that layer quantized gives the layer's
   isolated error, at its own tensor and at the model outputs. The second is what ranks
   the layers: an error early in the graph can matter more than a larger one late in it.

QDQ models run with basic graph optimizations only: ONNX Runtime's int8 kernel fusions
depend on which tensors are exposed, so with them the numbers would change with the
chunking. Basic optimizations give the QDQ model's exact meaning (DequantizeLinear, float
op, QuantizeLinear) on every platform.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnxruntime as ort

from ..calibration.batches import Batch, BatchSource
from ..calibration.methods import compute_range, normalize_percentile
from ..errors import DataError, ModelError
from ..model_io import infer_shapes, load_model
from ..qparams import dequantize
from .graph import QDQGraph, QuantPoint, Region, with_outputs
from .report import (
    DEFAULT_PERCENTILE,
    AnalysisReport,
    Fix,
    Histogram,
    LayerReport,
    OutputReport,
    Suggestion,
)
from .stats import ErrorAccumulator, ErrorStats, StreamingHistogram
from .weights import WeightStore

log = logging.getLogger(__name__)

DEFAULT_CHUNK_BYTES = 128 << 20
DEFAULT_ISOLATED_SAMPLES = 8
HISTOGRAM_BINS = 128


def analyze(
    float_model: onnx.ModelProto | str | os.PathLike,
    quant_model: onnx.ModelProto | str | os.PathLike,
    batches: BatchSource,
    *,
    max_samples: int = 32,
    suggestions: int = 5,
    providers: Sequence[str] | None = None,
    float_kept: Mapping[str, str] | None = None,
    max_percentile: float = DEFAULT_PERCENTILE,
    num_threads: int | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    isolated_samples: int = DEFAULT_ISOLATED_SAMPLES,
) -> AnalysisReport:
    """Compare a QDQ model with its float model, tensor by tensor, on up to ``max_samples``.

    ``isolated_samples``: the isolated errors use the first of the samples only (whole
    batches covering at least this many): they cost one model run per layer and sample,
    and ranking the layers needs fewer samples than the statistics do.
    ``suggestions``: how many of the worst layers (by isolated error) get measured fixes.
    ``float_kept``: tensor or op name -> why the quantizer left it in float (shown as is).
    ``num_threads``: ONNX Runtime intra-op threads (None: its default).
    """
    max_percentile = normalize_percentile(max_percentile)
    run = _open_run(float_model, quant_model, batches, max_samples, providers, num_threads)
    layers, outputs = run.measure(chunk_bytes, isolated_samples=isolated_samples)
    fixes = run.suggest(layers, suggestions, max_percentile)
    return AnalysisReport(
        float_model=_label(float_model),
        quant_model=_label(quant_model),
        samples=run.samples,
        isolated_samples=run.isolated_samples,
        outputs=tuple(outputs),
        layers=tuple(layers),
        suggestions=tuple(fixes),
        float_kept=dict(float_kept or {}),
        max_percentile=max_percentile,
    )


def _open_run(
    float_model: onnx.ModelProto | str | os.PathLike,
    quant_model: onnx.ModelProto | str | os.PathLike,
    batches: BatchSource,
    max_samples: int,
    providers: Sequence[str] | None,
    num_threads: int | None,
) -> _Run:
    """Both models loaded and a run over the first ``max_samples`` samples set up."""
    return _Run(
        load_model(float_model),
        load_model(quant_model),
        batches,
        max_samples=max_samples,
        providers=list(providers or ["CPUExecutionProvider"]),
        num_threads=num_threads,
    )


def measure_fixes(
    float_model: onnx.ModelProto | str | os.PathLike,
    quant_model: onnx.ModelProto | str | os.PathLike,
    batches: BatchSource,
    tensors: Sequence[str],
    *,
    max_samples: int = 32,
    max_percentile: float = DEFAULT_PERCENTILE,
    providers: Sequence[str] | None = None,
    num_threads: int | None = None,
) -> list[Suggestion]:
    """Measured fixes (keep float, percentile) for the named tensors, without the full analysis."""
    max_percentile = normalize_percentile(max_percentile)
    run = _open_run(float_model, quant_model, batches, max_samples, providers, num_threads)
    by_name = {p.name: p for p in run.graph.points}
    missing = [t for t in tensors if t not in by_name]
    if missing:
        raise DataError(f"not quantized activation tensors of the model: {', '.join(missing)}")
    chosen = [by_name[t] for t in tensors]
    layers, _ = run.measure(DEFAULT_CHUNK_BYTES, points=chosen)
    return run.suggest(layers, len(layers), max_percentile, ranked=False)


@dataclass
class _PointStats:
    """Everything accumulated for one point over the samples."""

    hist: StreamingHistogram = field(default_factory=StreamingHistogram)
    cumulative: ErrorAccumulator = field(default_factory=ErrorAccumulator)
    isolated: ErrorAccumulator = field(default_factory=ErrorAccumulator)
    isolated_outputs: dict[str, ErrorStats | None] = field(default_factory=dict)
    qmin: float = math.inf
    qmax: float = -math.inf


class _Run:
    """One analysis: the model pair, the sample stream and the sessions built from them."""

    def __init__(
        self,
        float_model: onnx.ModelProto,
        quant_model: onnx.ModelProto,
        batches: BatchSource,
        *,
        max_samples: int,
        providers: list[str],
        num_threads: int | None,
    ) -> None:
        if max_samples < 1:
            raise DataError(f"the analysis needs at least one sample (max_samples={max_samples})")
        self.store = WeightStore()
        self.float_model = self.store.detach(float_model, "float")
        self.graph = QDQGraph(self.store.detach(quant_model, "quant"), self.float_model, self.store.value)
        self.batches = batches
        self.max_samples = max_samples
        self.providers = providers
        self.num_threads = num_threads
        self.samples = 0
        self.isolated_samples = 0
        self.isolated_batches = 0
        self.batch_sizes: list[int] = []  # samples in each batch of a pass
        self.float_outputs: list[dict[str, np.ndarray]] = []
        self.baseline: dict[str, ErrorStats | None] = {}
        self.hists: dict[str, StreamingHistogram] = {}
        self.regions: dict[str, Region] = {}
        self.region_errors: dict[str, str] = {}
        for p in self.graph.points:
            try:
                self.regions[p.tensor] = self.graph.region(p)
            except KeyError as exc:
                self.region_errors[p.tensor] = f"cannot isolate the layer: tensor {exc} has no float counterpart"
        float_outs = {o.name for o in float_model.graph.output}
        self.outputs = [o for o in self.graph.outputs if o in float_outs]

    # -- data ------------------------------------------------------------------------------

    def _samples(self) -> Iterator[Batch]:
        """One pass over the data, cut at ``max_samples`` samples."""
        left = self.max_samples
        for batch in self.batches():
            if left <= 0:
                return
            n = _batch_len(batch)
            if n > left:
                batch = {k: v[:left] for k, v in batch.items()}
                n = left
            left -= n
            yield batch

    def _session(self, model: onnx.ModelProto, optimize: bool) -> ort.InferenceSession:
        opts = ort.SessionOptions()
        if self.num_threads:
            opts.intra_op_num_threads = self.num_threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        opts.graph_optimization_level = (
            ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        )
        self.store.attach(model, opts)
        return ort.InferenceSession(model.SerializeToString(), opts, providers=self.providers)

    @staticmethod
    def _run(session: ort.InferenceSession, values: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run with the inputs the session needs, taken from ``values``; outputs by name."""
        feed = {}
        for inp in session.get_inputs():
            if inp.name not in values:
                raise DataError(f"the data has no input '{inp.name}' (it has: {', '.join(sorted(values))})")
            feed[inp.name] = values[inp.name]
        names = [o.name for o in session.get_outputs()]
        return dict(zip(names, session.run(names, feed), strict=True))

    # -- pass over the samples -------------------------------------------------------------

    def measure(
        self, chunk_bytes: int, points: Sequence[QuantPoint] | None = None, isolated_samples: int = 0
    ) -> tuple[list[LayerReport], list[OutputReport]]:
        """Per-point statistics over all samples (isolated errors over the first ones)."""
        points = list(self.graph.points if points is None else points)
        measurable = [p for p in points if p.float_name is not None]
        chunks = self._chunks(measurable, chunk_bytes) or [[]]
        stats = {p.tensor: _PointStats() for p in points}
        out_acc = {o: ErrorAccumulator() for o in self.outputs}
        for n, chunk in enumerate(chunks):
            log.info("analysis: tensors, chunk %d/%d (%d tensors)", n + 1, len(chunks), len(chunk))
            self._measure_chunk(chunk, stats, out_acc if n == 0 else None)
        self.baseline = {o: acc.result() for o, acc in out_acc.items()}
        self.samples = sum(self.batch_sizes)
        self.hists = {t: s.hist for t, s in stats.items()}
        if isolated_samples > 0:
            covered = list(itertools.accumulate(self.batch_sizes))
            self.isolated_batches = next((k + 1 for k, n in enumerate(covered) if n >= isolated_samples), len(covered))
            self.isolated_samples = covered[self.isolated_batches - 1]
            for n, p in enumerate(measurable):
                log.info("analysis: isolated error, layer %d/%d", n + 1, len(measurable))
                self._isolate(p, stats[p.tensor])
        layers = [self._layer(p, stats[p.tensor]) for p in points]
        outputs = [OutputReport(name=o, stats=self.baseline[o]) for o in self.outputs]
        return layers, outputs

    def _chunks(self, points: list[QuantPoint], budget: int) -> list[list[QuantPoint]]:
        """Consecutive points whose float tensors fit in ``budget`` bytes per sample."""
        sizes = self._tensor_bytes()
        default = max(sizes.values(), default=1 << 20)
        chunks: list[list[QuantPoint]] = []
        current: list[QuantPoint] = []
        used = 0
        for p in points:
            size = sizes.get(p.name, default)
            if current and used + size > budget:
                chunks.append(current)
                current, used = [], 0
            current.append(p)
            used += size
        if current:
            chunks.append(current)
        return chunks

    def _tensor_bytes(self) -> dict[str, int]:
        """Bytes of each float tensor for one sample, from shape inference on sample shapes."""
        first = next(self._samples(), None)
        if first is None:
            raise DataError("the analysis got no samples from the calibration data")
        model = onnx.ModelProto()
        model.CopyFrom(self.float_model)
        for inp in model.graph.input:
            if inp.name in first and inp.type.HasField("tensor_type"):
                shape = inp.type.tensor_type.shape
                shape.ClearField("dim")
                for d in np.shape(first[inp.name]):
                    shape.dim.add().dim_value = int(d)
        del model.graph.value_info[:]
        inferred = infer_shapes(model).graph
        sizes = {}
        for vi in [*inferred.value_info, *inferred.output, *inferred.input]:
            t = vi.type.tensor_type
            dims = [d.dim_value if d.HasField("dim_value") else 0 for d in t.shape.dim]
            if t.elem_type and t.HasField("shape") and all(dims):
                itemsize = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).itemsize
                sizes[vi.name] = int(np.prod(dims)) * itemsize
        return sizes

    def _measure_chunk(
        self,
        chunk: list[QuantPoint],
        stats: dict[str, _PointStats],
        out_acc: dict[str, ErrorAccumulator] | None,
    ) -> None:
        exposed = sorted({p.name for p in chunk} - self.graph.float_graph.inputs)
        fsess = self._session(with_outputs(self.float_model, exposed), optimize=True)
        qsess = self._session(with_outputs(self.graph.model, [p.q_output for p in chunk]), optimize=False)
        for batch in self._samples():
            fvals = {**batch, **self._run(fsess, batch)}
            qvals = self._run(qsess, batch)
            for p in chunk:
                st = stats[p.tensor]
                fval = fvals[p.name]
                qval = dequantize(qvals[p.q_output], p.scale, p.zero_point, p.axis)
                if np.shape(fval) != np.shape(qval):
                    raise ModelError(
                        f"tensor '{p.name}' has shape {list(np.shape(fval))} in the float model but "
                        f"{list(np.shape(qval))} in the quantized one: the two models do not match"
                    )
                st.hist.add(fval)
                st.qmin, st.qmax = min(st.qmin, float(qval.min())), max(st.qmax, float(qval.max()))
                st.cumulative.add(fval, qval)
            if out_acc is not None:
                self.batch_sizes.append(_batch_len(batch))
                self.float_outputs.append({o: fvals[o] for o in self.outputs})
                for o, acc in out_acc.items():
                    acc.add(fvals[o], qvals[o])

    def _isolate(self, p: QuantPoint, st: _PointStats) -> None:
        """The layer alone quantized: its error at its tensor and at the model outputs."""
        region = self.regions.get(p.tensor)
        built = None if region is None else self.graph.quantize_only(p, region)
        if built is None:
            return
        model, float_out = built
        sess = self._session(model, optimize=True)
        accs = {o: ErrorAccumulator() for o in self.outputs}
        batches = itertools.islice(self._samples(), self.isolated_batches)
        for batch, ref in zip(batches, self.float_outputs[: self.isolated_batches], strict=True):
            vals = {**batch, **self._run(sess, batch)}
            st.isolated.add(vals[float_out], dequantize(vals[p.q_output], p.scale, p.zero_point, p.axis))
            for o, acc in accs.items():
                acc.add(ref[o], vals[o])
        st.isolated_outputs = {o: acc.result() for o, acc in accs.items()}

    def _layer(self, p: QuantPoint, st: _PointStats) -> LayerReport:
        notes = []
        if p.float_name is None:
            notes.append("no tensor of this name in the float model")
        elif p.tensor in self.region_errors:
            notes.append(self.region_errors[p.tensor])
        if len(p.q_indices) > 1:
            notes.append(f"{len(p.q_indices)} QuantizeLinear nodes; the first one's parameters are shown")
        hist = None
        if st.hist.total:
            lo, hi, counts = st.hist.coarse(HISTOGRAM_BINS)
            hist = Histogram(lo=lo, hi=hi, counts=tuple(counts))
        region = self.regions.get(p.tensor)
        per_tensor = p.axis is None
        return LayerReport(
            index=p.index,
            tensor=p.name,
            op_type=p.op_type,
            op_name=p.op_name,
            inputs=tuple(sorted({f for _, f in region.boundaries})) if region else (),
            dtype=str(p.zero_point.dtype),
            scale=float(p.scale.ravel()[0]) if per_tensor else None,
            zero_point=int(p.zero_point.ravel()[0]) if per_tensor else None,
            clip_range=p.clip_range if per_tensor else None,
            float_range=(st.hist.min, st.hist.max) if st.hist.total else None,
            quant_range=(st.qmin, st.qmax) if st.cumulative.count else None,
            histogram=hist,
            cumulative=st.cumulative.result(),
            isolated=st.isolated.result(),
            isolated_output_sqnr_db=_mean_sqnr(st.isolated_outputs) if st.isolated_outputs else None,
            note="; ".join(notes),
        )

    # -- suggestions -----------------------------------------------------------------------

    def suggest(
        self, layers: list[LayerReport], count: int, max_percentile: float, ranked: bool = True
    ) -> list[Suggestion]:
        """Measure keep-float and percentile for the ``count`` worst layers (or the given ones)."""
        if ranked:
            layers = [lay for lay in AnalysisReport.rank(layers) if lay.isolated_output_sqnr_db is not None]
        by_index = {p.index: p for p in self.graph.points}
        base = _mean_sqnr(self.baseline)
        out = []
        for layer in layers[:count]:
            p = by_index[layer.index]
            fixes = []
            region = self.regions.get(p.tensor)
            if region is not None:
                model = self.graph.keep_float(p, region)
                if model is not None:
                    fixes.append(self._fix("keep_float", model, base, layer, {"precision_level": 2}))
            hist = self.hists.get(p.tensor)
            if hist is not None and hist.total:
                lo, hi = compute_range(hist.tensor_stats(layer.tensor), "percentile", max_percentile=max_percentile)
                model = self.graph.with_percentile(p, lo, hi)
                if model is not None:
                    setting: dict[str, object] = {"calibration_type": "percentile"}
                    if max_percentile != DEFAULT_PERCENTILE:
                        setting["max_percentile"] = max_percentile
                    fixes.append(self._fix("percentile", model, base, layer, setting))
            out.append(
                Suggestion(
                    tensor=layer.tensor, isolated_output_sqnr_db=layer.isolated_output_sqnr_db, fixes=tuple(fixes)
                )
            )
        return out

    def _fix(
        self, kind: str, model: onnx.ModelProto, base: float, layer: LayerReport, setting: dict[str, object]
    ) -> Fix:
        log.debug("analysis: measuring %s for %s", kind, layer.tensor)
        sess = self._session(model, optimize=False)
        accs = {o: ErrorAccumulator() for o in self.outputs}
        for batch, ref in zip(self._samples(), self.float_outputs, strict=True):
            vals = self._run(sess, batch)
            for o, acc in accs.items():
                acc.add(ref[o], vals[o])
        results = {o: acc.result() for o, acc in accs.items()}
        sqnr = _mean_sqnr(results)
        entry: dict[str, object] = {
            "input_names": list(layer.inputs or (layer.tensor,)),
            "output_names": [layer.tensor],
            **setting,
        }
        return Fix(
            kind=kind,
            output_sqnr_db=sqnr,
            gain_db=sqnr - base,
            output_cosine=_mean([r.cosine for r in results.values() if r is not None]),
            custom_setting=entry,
        )


def _mean_sqnr(results: Mapping[str, ErrorStats | None]) -> float:
    """Mean SQNR (dB) over the model outputs; an output without any error counts as 200 dB."""
    return _mean([min(r.sqnr_db, 200.0) for r in results.values() if r is not None])


def _mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if values else math.nan


def _batch_len(batch: Batch) -> int:
    """Samples in a batch: the shared leading dimension of its arrays, else 1."""
    lead = {np.shape(v)[0] if np.ndim(v) else None for v in batch.values()}
    if len(lead) == 1 and None not in lead:
        return int(lead.pop())
    return 1


def _label(model: onnx.ModelProto | str | os.PathLike) -> str:
    if isinstance(model, onnx.ModelProto):
        return model.graph.name or "<in-memory model>"
    return str(model)
