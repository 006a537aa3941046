"""Streaming statistics: error sums and value histograms, one sample at a time.

The analysis sees each tensor once per sample and must not keep the tensors, so every
number in the report is built from running sums. ``ErrorAccumulator`` is the streaming
form of :func:`xslim_ort.qparams.sqnr_db` and :func:`xslim_ort.qparams.cosine` (a test
checks they agree on the concatenated data); ``StreamingHistogram`` gives exact bin counts
in one pass although the value range is only known at the end.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..calibration.collectors import TensorStats

HIST_BINS = 4096


@dataclass(frozen=True)
class ErrorStats:
    """Quantization error of one tensor over all samples.

    ``snr`` is xslim's SNR: noise power over signal power (0 is perfect, 1 means the noise
    is as large as the signal); ``sqnr_db`` is the same ratio inverted, in dB.
    """

    snr: float
    sqnr_db: float
    mse: float
    cosine: float


class ErrorAccumulator:
    """Running sums of (reference, test) pairs, enough for SNR, SQNR, MSE and cosine."""

    def __init__(self) -> None:
        self.count = 0
        self.noise = 0.0
        self.signal = 0.0
        self.test_power = 0.0
        self.dot = 0.0

    def add(self, reference: np.ndarray, test: np.ndarray) -> None:
        ref = np.asarray(reference).ravel()
        tst = np.asarray(test).ravel()
        if ref.shape != tst.shape:
            raise ValueError(f"shape mismatch: {np.shape(reference)} vs {np.shape(test)}")
        # float32 dots (BLAS, ~4e-6 relative error on a million elements) are 10x faster than
        # float64; float64 is the fallback when they overflow (e.g. -3.4e38 attention masks)
        sums = _dots(ref, tst, np.result_type(ref, tst, np.float32))
        if not np.isfinite(sums).all():
            sums = _dots(ref, tst, np.float64)
        self.count += ref.size
        self.noise += sums[0]
        self.signal += sums[1]
        self.test_power += sums[2]
        self.dot += sums[3]

    def result(self) -> ErrorStats | None:
        """None when nothing was added (the tensor could not be measured)."""
        if self.count == 0:
            return None
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            if self.noise == 0.0:
                snr, sqnr = 0.0, math.inf
            else:
                snr = float(np.float64(self.noise) / self.signal)
                sqnr = float(10.0 * np.log10(np.float64(self.signal) / self.noise))
            norms = float(np.sqrt(np.float64(self.signal)) * np.sqrt(self.test_power))
            # as qparams.cosine: two all-zero tensors agree, one all-zero tensor does not
            cos = self.dot / norms if norms else float(self.signal == self.test_power)
        return ErrorStats(snr=snr, sqnr_db=sqnr, mse=self.noise / self.count, cosine=cos)


def _dots(ref: np.ndarray, tst: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """noise, signal and test power, and the cross term, in ``dtype`` (as float64 numbers)."""
    with np.errstate(over="ignore", invalid="ignore"):
        r = ref.astype(dtype, copy=False)
        t = tst.astype(dtype, copy=False)
        d = r - t
        return np.array([np.dot(d, d), np.dot(r, r), np.dot(t, t), np.dot(r, t)], dtype=np.float64)


class StreamingHistogram:
    """A fixed number of equal bins whose range grows to cover every value seen.

    When a sample falls outside, the bin width is multiplied by a power of two and the
    origin moved by whole new bins, so old bins merge exactly into new ones (the same idea
    as ONNX Runtime's histogram collector, without its re-binning error).
    """

    def __init__(self, bins: int = HIST_BINS) -> None:
        self.bins = bins
        self.counts = np.zeros(bins, dtype=np.int64)
        self.lo = 0.0
        self.width = 0.0
        self.min = math.inf
        self.max = -math.inf
        self.nonfinite = 0

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    def add(self, values: np.ndarray) -> None:
        x = np.asarray(values).ravel()
        finite = np.isfinite(x)
        if not finite.all():
            self.nonfinite += int(x.size - np.count_nonzero(finite))
            x = x[finite]
        if x.size == 0:
            return
        x = x.astype(np.float64, copy=False)
        bmin, bmax = float(x.min()), float(x.max())
        if self.width == 0.0:
            self.lo = bmin
            span = bmax - bmin
            self.width = span / self.bins if span > 0 else max(abs(bmin), 1.0) * 2.0**-20
        else:
            self._grow(min(bmin, self.min), max(bmax, self.max))
        self.min, self.max = min(self.min, bmin), max(self.max, bmax)
        idx = np.floor((x - self.lo) / self.width).astype(np.int64)
        np.clip(idx, 0, self.bins - 1, out=idx)
        self.counts += np.bincount(idx, minlength=self.bins)

    def _grow(self, umin: float, umax: float) -> None:
        if umin >= self.lo and umax < self.lo + self.bins * self.width:
            return
        factor = 1
        while True:
            factor *= 2
            width = self.width * factor
            shift = max(math.ceil((self.lo - umin) / width), 0)
            if self.lo - shift * width + self.bins * width > umax:
                break
        new_index = (np.arange(self.bins) + shift * factor) // factor
        self.counts = np.bincount(new_index, weights=self.counts, minlength=self.bins)[: self.bins].astype(np.int64)
        self.lo -= shift * width
        self.width = width

    def occupied(self) -> tuple[float, float, np.ndarray]:
        """(lo, hi, counts) of the bins between the first and the last non-empty one."""
        nz = np.flatnonzero(self.counts)
        if nz.size == 0:
            return 0.0, 0.0, np.zeros(0, dtype=np.int64)
        first, last = int(nz[0]), int(nz[-1])
        lo = self.lo + first * self.width
        return lo, lo + (last + 1 - first) * self.width, self.counts[first : last + 1]

    def coarse(self, bins: int) -> tuple[float, float, list[int]]:
        """The occupied range re-binned into ``bins`` groups (for display and F.Hist)."""
        lo, hi, counts = self.occupied()
        if counts.size == 0:
            return lo, hi, [0] * bins
        edges = np.linspace(0, counts.size, bins + 1).round().astype(np.int64)
        padded = np.concatenate([counts, [0]])
        sums = np.add.reduceat(padded, edges[:-1])
        sums[edges[:-1] == edges[1:]] = 0  # reduceat returns the element itself for empty groups
        return lo, hi, [int(v) for v in sums]

    def tensor_stats(self, name: str) -> TensorStats:
        """The histogram in calibration's terms, so its range methods apply unchanged."""
        lo, hi, counts = self.occupied()
        return TensorStats(
            name=name,
            min=self.min if counts.size else math.nan,
            max=self.max if counts.size else math.nan,
            count=self.total,
            nonfinite=self.nonfinite,
            hist=counts.copy(),
            hist_lo=lo,
            hist_hi=hi,
        )
