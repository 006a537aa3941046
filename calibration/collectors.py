"""Activation statistics for calibration, collected without keeping activations.

Pass 1 adds ReduceMin/ReduceMax/ReduceSum/Size nodes to a copy of the model, so ONNX
Runtime hands back four scalars per tensor and nothing else. Pass 2 (only for tensors
that need a histogram) fetches the raw tensors one batch at a time and folds each into a
fixed-range histogram over pass 1's [min, max]: the bins never regrow, and a batch's
activations are dropped as soon as it is counted. A tensor holding more than
``SAMPLE_CAP`` values in a batch contributes a strided sample of them, so pass 2 costs
about as much NumPy time per batch whatever the resolution. Inference of the next batch runs on a
worker thread while NumPy counts the current one; counts are integers, so the result does
not depend on the order or the thread timing.

Irregular tensors. A tensor whose pass-1 scalars are not finite (NaN/Inf, or a sum that
overflowed) or whose magnitude reaches ``SENTINEL_MIN_ABS`` takes a careful path in
pass 2: non-finite values are counted separately and excluded, exact finite min/max are
taken, and a histogram of the float32 bit patterns (sign, exponent and 7 mantissa bits:
bins 0.8% wide) looks for *sentinels*: a cluster of values of magnitude at least
``SENTINEL_MIN_ABS`` separated from all smaller magnitudes by an empty gap of at least
``SENTINEL_GAP`` x. That is the shape of attention masks (``-3.4e38``, ``-1e9``,
``-10000`` added to scores). Sentinels are left out of the histogram and counted in
``below``/``above``; ``hist_lo``/``hist_hi`` then bound the remaining bulk (rounded
outward to the 0.8% bit-pattern bins, clamped to the finite min/max). Such tensors get a
third pass, restricted to them, to histogram the bulk. ``min``/``max`` always stay the
true finite extremes.

All passes must see the same batches (``BatchSource`` contract); the session runs the same
augmented graph in every pass so the values agree bit for bit.
"""

from __future__ import annotations

import logging
import os
import queue
import tempfile
import threading
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from ..model_io import needs_external_data
from .batches import Batch, BatchSource

log = logging.getLogger(__name__)

SAMPLE_CAP = 1 << 16  # values of one tensor histogrammed per batch (see TensorStats.hist)
SENTINEL_MIN_ABS = 1e4
SENTINEL_GAP = 256.0
FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE}  # NumPy has no bfloat16
_PROTO_LIMIT = 1_900_000_000  # stay clear of protobuf's 2 GiB message limit
_KEY_BINS = 1 << 16  # float32 bit pattern >> 16: sign, 8 exponent bits, 7 mantissa bits
_SIGN_KEY = 1 << 15
_INF_KEY = 0x7F80  # magnitude keys at or above this are Inf/NaN


@dataclass
class TensorStats:
    """What calibration knows about one activation; every range method reads only this."""

    name: str
    min: float  # finite min over all samples (nan if no finite value)
    max: float
    count: int  # number of finite values seen
    nonfinite: int  # number of NaN/Inf values seen
    # int64 counts over [hist_lo, hist_hi], or None. A batch holding more than SAMPLE_CAP
    # values of the tensor contributes every k-th one (the offset turning with the batch
    # number): a histogram only ever serves as a distribution, and this bounds pass 2's
    # cost; min, max and count are always exact.
    hist: np.ndarray | None
    hist_lo: float  # the bulk's range: [min, max] unless sentinels were set aside
    hist_hi: float
    below: int = 0  # finite sentinels below hist_lo (not in hist)
    above: int = 0  # finite sentinels above hist_hi (not in hist)


def collect_statistics(
    model: onnx.ModelProto | str,
    tensor_names: Sequence[str],
    batches: BatchSource,
    *,
    histograms: bool | Collection[str] = True,
    num_bins: int = 2048,
    providers: Sequence[str] | None = None,
    progress: Callable[[int], None] | None = None,
    session_options: ort.SessionOptions | None = None,
) -> dict[str, TensorStats]:
    """Min/max (and histograms where asked) of the float tensors ``tensor_names``.

    Tensors that are initializers or not of a float type are left out of the result.
    ``progress(1)`` is called after every batch of every pass.
    """
    if num_bins < 1:
        raise ValueError(f"num_bins must be positive, got {num_bins}")
    if isinstance(model, str | os.PathLike):
        model = onnx.load(os.fspath(model))
    with tempfile.TemporaryDirectory(prefix="xslim_calib.") as tmp:
        work = _working_copy(model, Path(tmp))
        names = _float_tensors(work, tensor_names)
        if not names:
            return {}
        want_hist = set(names) if histograms is True else set() if histograms is False else set(histograms)
        graph_inputs = {i.name for i in work.graph.input}
        session = _session(_with_reductions(work, names), Path(tmp), providers, session_options)
        accs = _pass_minmax(session, names, batches, progress)
        del session
        for a in accs.values():
            if a.name in want_hist and a.count > 0 and not a.suspect:
                a.start_histogram(num_bins, a.min, a.max)
        first = [a for a in accs.values() if a.irregular or a.hist is not None]
        if first:
            raw = [a.name for a in first if a.name not in graph_inputs]
            session = _session(_with_outputs(work, raw), Path(tmp), providers, session_options)
            del work
            _pass_histograms(session, graph_inputs, first, batches, progress, careful=True)
            redo = [a for a in first if a.irregular and a.name in want_hist and a.count > 0 and a.needs_rehist()]
            for a in redo:
                a.start_bulk_histogram(num_bins)
            if redo:
                _pass_histograms(session, graph_inputs, redo, batches, progress, careful=False)
        return {n: accs[n].stats(n in want_hist) for n in names}


class _Accumulator:
    """Running statistics of one tensor across batches (integer counts, order-free)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.min = np.inf
        self.max = -np.inf
        self.size = 0
        self.irregular = False  # needs the careful path (see module docstring)
        self.suspect = False  # pass-1 scalars were not finite: [min, max] unknown until pass 2
        # careful path only
        self.nonfinite = 0
        self.finite_min = np.inf
        self.finite_max = -np.inf
        self.keys: np.ndarray | None = None
        # histogram
        self.hist: np.ndarray | None = None
        self.lo = 0.0
        self.hi = 0.0
        self.scale = np.float32(0.0)
        self.filter = False  # drop sentinels before counting (bulk histogram)
        self.below = 0
        self.above = 0
        self.bulk: tuple[float, float, int, int] | None = None

    @property
    def count(self) -> int:
        return self.size - self.nonfinite

    def add_scalars(self, mn: float, mx: float, total: float, size: int) -> None:
        if size == 0:
            return
        self.size += size
        if not (np.isfinite(mn) and np.isfinite(mx) and np.isfinite(total)):
            self.irregular = self.suspect = True
            return
        self.min = min(self.min, mn)
        self.max = max(self.max, mx)
        if max(abs(mn), abs(mx)) >= SENTINEL_MIN_ABS:
            self.irregular = True

    def start_histogram(self, num_bins: int, lo: float, hi: float) -> None:
        # One extra bin for x == hi, folded into the last bin by stats().
        self.hist = np.zeros(num_bins + 1, dtype=np.int64)
        self.lo, self.hi = lo, hi
        span = hi - lo
        scale = num_bins / span if span > 0 else 0.0
        # A span too narrow for float32 arithmetic counts everything in bin 0.
        self.scale = np.float32(scale if scale < np.finfo(np.float32).max else 0.0)

    def add_to_histogram(self, x: np.ndarray, scratch: _Scratch) -> None:
        """Fold finite values into the histogram (the fast path: about 1.7 ns a value).

        In bulk mode, sentinels outside [lo, hi] are counted in below/above instead; otherwise
        every value is clipped into the range (pass 1 saw all of them, so only rounding could
        put one outside).
        """
        assert self.hist is not None
        n = self.hist.size - 1
        if self.filter:
            self._count_outside(x)
            x = x[(x >= self.lo) & (x <= self.hi)]
        if self.scale == 0.0:
            self.hist[0] += x.size
            return
        t = scratch.floats(x.size)
        np.subtract(x, np.float32(self.lo), out=t)
        t *= self.scale
        np.clip(t, 0, n, out=t)
        idx = scratch.indices(x.size)
        idx[...] = t
        try:
            np.add.at(self.hist, idx, 1)
        except IndexError:  # NaN: pass 1 saw none, so the batches changed between passes
            raise ValueError(
                f"{self.name}: the calibration batches differ between passes (NaN not seen in pass 1)"
            ) from None

    def _count_outside(self, x: np.ndarray) -> None:
        self.below += int(np.count_nonzero(x < self.lo))
        self.above += int(np.count_nonzero(x > self.hi))

    def add_careful(self, x: np.ndarray) -> np.ndarray:
        """Non-finite count, exact finite extremes and bit-pattern histogram; returns finite values."""
        finite = np.isfinite(x)
        nf = x.size - int(np.count_nonzero(finite))
        if nf:
            self.nonfinite += nf
            x = x[finite]
        if x.size:
            self.finite_min = min(self.finite_min, float(x.min()))
            self.finite_max = max(self.finite_max, float(x.max()))
            keys = np.bincount((x.view(np.uint32) >> 16).astype(np.intp), minlength=_KEY_BINS)
            self.keys = keys if self.keys is None else self.keys + keys
        return x

    def needs_rehist(self) -> bool:
        """True when pass 2's histogram range was not the bulk's range (sentinels or NaN/Inf)."""
        lo, hi, _, _ = self.finish_careful()
        return self.hist is None or (lo, hi) != (self.lo, self.hi)

    def start_bulk_histogram(self, num_bins: int) -> None:
        lo, hi, _, _ = self.finish_careful()
        self.below = self.above = 0
        self.filter = True
        self.start_histogram(num_bins, lo, hi)

    def finish_careful(self) -> tuple[float, float, int, int]:
        """The bulk's (lo, hi, below, above), with sentinels found from the bit-pattern histogram."""
        if self.bulk is None:
            self.bulk = _bulk_range(self.keys, self.finite_min, self.finite_max)
        return self.bulk

    def stats(self, with_hist: bool) -> TensorStats:
        if self.irregular:
            lo, hi, below, above = self.finish_careful()
            mn, mx = self.finite_min, self.finite_max
        else:
            mn, mx = self.min, self.max
            lo, hi, below, above = mn, mx, 0, 0
        if self.count == 0:
            mn = mx = lo = hi = float("nan")
        hist = None
        if with_hist and self.hist is not None:
            if (self.lo, self.hi) != (lo, hi):
                raise AssertionError(f"histogram of {self.name} does not cover its bulk range")
            hist = self.hist[:-1].copy()
            hist[-1] += self.hist[-1]
        return TensorStats(
            self.name, float(mn), float(mx), self.count, self.nonfinite, hist, float(lo), float(hi), below, above
        )


def _bulk_range(keys: np.ndarray | None, fmin: float, fmax: float) -> tuple[float, float, int, int]:
    """Split finite values into bulk and sentinels (see module docstring) from bit-pattern counts."""
    if keys is None:
        return fmin, fmax, 0, 0
    mag = keys[:_SIGN_KEY] + keys[_SIGN_KEY:]
    present = np.flatnonzero(mag[:_INF_KEY])
    lower = _key_value(present)
    upper = _key_value(present + 1)
    gaps = np.flatnonzero((upper[1:] > SENTINEL_MIN_ABS) & (lower[1:] >= SENTINEL_GAP * upper[:-1]))
    if gaps.size == 0:
        return fmin, fmax, 0, 0
    first_sentinel = present[gaps[0] + 1]
    pos, neg = keys[:_SIGN_KEY], keys[_SIGN_KEY:]
    above = int(pos[first_sentinel:].sum())
    below = int(neg[first_sentinel:].sum())
    bulk_pos = np.flatnonzero(pos[:first_sentinel])
    bulk_neg = np.flatnonzero(neg[:first_sentinel])
    # Magnitude bin 0 holds +-0 and denormals: it bounds the bulk at 0.
    lo = -_upper(bulk_neg[-1]) if bulk_neg.size else _key_value(bulk_pos[0])
    hi = _upper(bulk_pos[-1]) if bulk_pos.size else -_key_value(bulk_neg[0])
    return max(float(lo), fmin), min(float(hi), fmax), below, above


def _upper(key: np.integer) -> float:
    return 0.0 if key == 0 else float(_key_value(key + 1))


def _key_value(keys: np.ndarray | np.integer) -> np.ndarray:
    """The float32 magnitude whose bit pattern starts bin ``keys`` (as float64)."""
    return (np.asarray(keys, dtype=np.uint32) << 16).view(np.float32).astype(np.float64)


class _Scratch:
    """Reused work buffers: page-faulting fresh temporaries for every tensor costs more than the math."""

    def __init__(self) -> None:
        self._f = np.empty(0, np.float32)
        self._i = np.empty(0, np.intp)

    def floats(self, n: int) -> np.ndarray:
        if self._f.size < n:
            self._f = np.empty(n, np.float32)
        return self._f[:n]

    def indices(self, n: int) -> np.ndarray:
        if self._i.size < n:
            self._i = np.empty(n, np.intp)
        return self._i[:n]


def _working_copy(model: onnx.ModelProto, tmp: Path) -> onnx.ModelProto:
    """A shape-inferred copy to augment; weights of a model near 2 GB move to external data in ``tmp``."""
    if any(_is_external(t) for t in model.graph.initializer):
        raise ValueError("the model's external data is not loaded: pass its path, or load it with the data")
    if not needs_external_data(model, _PROTO_LIMIT):
        return onnx.shape_inference.infer_shapes(model)
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    onnx.save_model(copy, tmp / "model.onnx", save_as_external_data=True, location="model.data")
    del copy
    onnx.shape_inference.infer_shapes_path(str(tmp / "model.onnx"), str(tmp / "inferred.onnx"))
    return onnx.load(str(tmp / "inferred.onnx"), load_external_data=False)


def _float_tensors(model: onnx.ModelProto, tensor_names: Sequence[str]) -> list[str]:
    """The requested names that are float activations (not initializers), in request order."""
    g = model.graph
    types = {v.name: v.type.tensor_type.elem_type for v in (*g.input, *g.value_info, *g.output)}
    initializers = {i.name for i in g.initializer}
    produced = {o for n in g.node for o in n.output} | {i.name for i in g.input}
    out: list[str] = []
    for name in dict.fromkeys(tensor_names):
        if name in initializers:
            continue
        if name not in produced:
            raise KeyError(f"tensor {name!r} is not produced by any node nor a graph input")
        elem = types.get(name)
        if elem in FLOAT_TYPES:
            out.append(name)
        else:
            log.debug("not calibrating %s: element type %s", name, elem)
    return out


def _stat_names(name: str) -> tuple[str, str, str, str]:
    return tuple(f"{name}__xslim_{s}" for s in ("min", "max", "sum", "size"))  # type: ignore[return-value]


def _with_reductions(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """Pass 1's graph: the model plus four scalar outputs per tensor (its outputs replaced)."""
    aug = _graph_copy(model)
    g = aug.graph
    types = {v.name: v.type.tensor_type.elem_type for v in (*g.input, *g.value_info, *g.output)}
    del g.output[:]
    for name in names:
        src = name
        if types[name] != TensorProto.FLOAT:
            src = f"{name}__xslim_f32"
            g.node.append(helper.make_node("Cast", [name], [src], name=src, to=TensorProto.FLOAT))
        mn, mx, sm, sz = _stat_names(name)
        g.node.extend(
            [
                helper.make_node("ReduceMin", [src], [mn], name=mn, keepdims=0),
                helper.make_node("ReduceMax", [src], [mx], name=mx, keepdims=0),
                helper.make_node("ReduceSum", [src], [sm], name=sm, keepdims=0),
                helper.make_node("Size", [src], [sz], name=sz),
            ]
        )
        g.output.extend(
            [
                helper.make_tensor_value_info(mn, TensorProto.FLOAT, []),
                helper.make_tensor_value_info(mx, TensorProto.FLOAT, []),
                helper.make_tensor_value_info(sm, TensorProto.FLOAT, []),
                helper.make_tensor_value_info(sz, TensorProto.INT64, []),
            ]
        )
    return aug


def _with_outputs(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """The histogram passes' graph: exactly ``names`` as outputs, so nothing else is computed.

    A separate session from pass 1's because ONNX Runtime runs every node whatever is
    fetched; with basic graph optimizations both graphs run the same kernels on the same
    values, and a value outside pass 1's range would only be clipped into an edge bin.
    """
    aug = _graph_copy(model)
    del aug.graph.output[:]
    aug.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names)
    return aug


def _graph_copy(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` sharing nothing with it (the working copy is reused by both passes)."""
    aug = onnx.ModelProto()
    aug.CopyFrom(model)
    return aug


def _session(
    model: onnx.ModelProto,
    tmp: Path,
    providers: Sequence[str] | None,
    session_options: ort.SessionOptions | None,
) -> ort.InferenceSession:
    if session_options is None:
        session_options = ort.SessionOptions()
        session_options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        # Spinning ORT workers would fight the NumPy thread of pass 2 (and other processes).
        session_options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    providers = list(providers) if providers else ["CPUExecutionProvider"]
    if not needs_external_data(model, _PROTO_LIMIT) and not any(_is_external(t) for t in model.graph.initializer):
        return ort.InferenceSession(model.SerializeToString(), session_options, providers=providers)
    path = tmp / "augmented.onnx"
    onnx.save_model(model, str(path))
    return ort.InferenceSession(str(path), session_options, providers=providers)


def _is_external(t: TensorProto) -> bool:
    return t.data_location == TensorProto.EXTERNAL


def _pass_minmax(
    session: ort.InferenceSession,
    names: Sequence[str],
    batches: BatchSource,
    progress: Callable[[int], None] | None,
) -> dict[str, _Accumulator]:
    """Pass 1: four scalars per tensor per batch."""
    accs = {n: _Accumulator(n) for n in names}
    fetch = [s for n in names for s in _stat_names(n)]
    seen = 0
    for batch in batches():
        values = session.run(fetch, batch)
        for i, name in enumerate(names):
            mn, mx, sm, sz = values[4 * i : 4 * i + 4]
            accs[name].add_scalars(float(mn), float(mx), float(sm), int(sz))
        seen += 1
        if progress is not None:
            progress(1)
    if seen == 0:
        raise ValueError("the calibration data source yielded no batches")
    return accs


def _pass_histograms(
    session: ort.InferenceSession,
    graph_inputs: Collection[str],
    accs: Sequence[_Accumulator],
    batches: BatchSource,
    progress: Callable[[int], None] | None,
    *,
    careful: bool,
) -> None:
    """Pass 2 or 3: raw tensors batch by batch, counted on this thread while the next batch infers.

    With ``careful``, irregular tensors also get their careful-path statistics.
    """
    fetch = [a.name for a in accs if a.name not in graph_inputs]
    scratch = _Scratch()
    for i, (batch, outputs) in enumerate(_prefetch(session, fetch, batches)):
        for a in accs:
            value = outputs[a.name] if a.name in outputs else batch[a.name]
            x = np.ascontiguousarray(value, dtype=np.float32).reshape(-1)
            if careful and a.irregular:
                x = a.add_careful(x)
            elif not a.irregular and x.size > SAMPLE_CAP:  # every k-th value, offset by batch number
                k = -(-x.size // SAMPLE_CAP)
                x = x[i % k :: k]
            if a.hist is not None:
                a.add_to_histogram(x, scratch)
        del batch, outputs
        if progress is not None:
            progress(1)


def _prefetch(
    session: ort.InferenceSession, fetch: Sequence[str], batches: BatchSource
) -> Iterator[tuple[Batch, dict[str, np.ndarray]]]:
    """Yield (batch, outputs) in order while a worker thread already infers the next batch.

    At most two batches of activations are alive at a time: the one being counted and the
    one waiting in the queue.
    """
    q: queue.Queue = queue.Queue(maxsize=1)
    stop = threading.Event()
    done = object()

    def work() -> None:
        try:
            for batch in batches():
                out = dict(zip(fetch, session.run(list(fetch), batch), strict=True)) if fetch else {}
                while not stop.is_set():
                    try:
                        q.put((batch, out), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(done)
        except BaseException as e:  # re-raised on the consuming thread
            q.put(e)

    worker = threading.Thread(target=work, name="xslim-calib-infer", daemon=True)
    worker.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
            del item
    finally:
        stop.set()
        while worker.is_alive():
            try:
                q.get_nowait()
            except queue.Empty:
                worker.join(0.05)
