"""Activation range methods: statistics (``TensorStats``) in, a float range out.

Every search is vectorized over its candidates with cumulative sums, so a range costs a
few milliseconds whatever the number of bins.

- ``minmax``: the global range of the (bulk of the) data.
- ``percentile``: clip both tails at ``max_percentile`` of the values (``lo`` at ``1 - p``,
  ``hi`` at ``p``), interpolating inside a bin. ``p`` is a fraction in [0.99, 1]
  (xslim's 0.9999 = 99.99%); a number in (1, 100] is read as a percentage (99.99 ->
  0.9999; xslim 2.1.2 ignores integers, we do not). Anything else is rejected.
- ``mse``: the range minimizing the expected squared error of int8 asymmetric
  quantization (255 steps, zero exact, as ``xslim_ort.qparams.activation_qparams``):
  clipping error of the tails plus uniform rounding noise ``step**2 / 12`` for the values
  inside, except exact zeros (estimated as the zero bin's excess over its neighbours),
  which quantize without error. One-sided data searches the far end; two-sided data
  alternates between the ends (coordinate descent from the full range).
- ``kl``: TensorRT-style entropy calibration: the threshold whose clipped distribution P
  loses least information (KL divergence) when its bins are merged into the levels of
  the int8 grid (Q, spread back over P's non-empty bins). One-sided data uses the 255
  steps of [0, T]; two-sided data is folded to |x| with 128 levels (as TensorRT's
  symmetric int8) and clipped to [-T, T].
- ``default``: the ``mse`` search with the rounding noise weighted 4x
  (``DEFAULT_NOISE_WEIGHT``): a bias towards resolution over rare large values, which
  the zoo rewards. Measured with ``scripts/bench_calibration_methods.py`` (64 calibration
  images; ORT's QDQ quantizer, int8 per-channel weights; output SQNR in dB against the
  float model on the 69 evaluation images), mobilenet_v2 / efficientnet_lite0 /
  ppocr_v6_tiny_det:

  ============  ======  ======  =====
  minmax        11.9    13.9     9.1
  percentile    15.7    14.4    10.1
  kl            14.9    13.6     6.9
  mse           14.8    14.5    11.1
  default       15.5    14.5    10.4
  ============  ======  ======  =====

  Noise weights 2 and 3 scored 15.2 / 14.5 and 15.0 / 15.0 on the classifiers, an
  xslim-style MSE+KL score 14.8 / 14.8 (vs 15.6 / 14.8 for this default, same run). The
  detector's SQNR moves by +-1.5 dB when ranges change by under 1% (its probability map
  is coarse after int8), so it only rules out what collapses (kl, or noise weight 6: 6.7).
  Percentile ties on the classifiers but cannot adapt to a distribution's shape.

Sentinels (values set aside by the collector, e.g. ``-3.4e38`` attention masks, see
``collectors``): every method works on the bulk, and a side holding sentinels is never
clipped inside the bulk, so they saturate at the bulk's extreme. If the bulk does not
reach that side of zero (a mask tensor of 0 and -3.4e38), that end is set to
``-/+ min(smallest sentinel magnitude, SENTINEL_MIN_ABS)``: masking survives int8 (0 and
the end are both exact) without an unbounded scale.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from xslim_ort.errors import ConfigError

from .collectors import SENTINEL_MIN_ABS, TensorStats

METHODS = ("default", "kl", "minmax", "percentile", "mse")
_STEPS = 255  # int8 asymmetric: qmax - qmin
_KL_LEVELS_ONE_SIDED = 255
_KL_LEVELS_FOLDED = 128
_MAX_SWEEP = 512  # candidates per coarse sweep; the best is then refined bin by bin
_MAX_ROUNDS = 8  # coordinate-descent rounds for two-sided mse
DEFAULT_NOISE_WEIGHT = 4.0  # measured on the zoo: see the module docstring


def needs_histogram(method: str) -> bool:
    """Whether ``method`` reads a histogram (every method but ``minmax``)."""
    _check_method(method)
    return method != "minmax"


def normalize_percentile(max_percentile: float) -> float:
    """``max_percentile`` as a fraction in [0.99, 1]; a value in (1, 100] is a percentage."""
    p = float(max_percentile)
    if 1.0 < p <= 100.0:
        p /= 100.0
    if not 0.99 <= p <= 1.0:
        raise ConfigError(
            f"max_percentile must be in [0.99, 1] (or a percentage in [99, 100]), got {max_percentile!r}"
        )
    return p


def compute_range(stats: TensorStats, method: str, *, max_percentile: float = 0.9999) -> tuple[float, float]:
    """The activation range of one tensor by ``method`` (see the module docstring)."""
    _check_method(method)
    p = normalize_percentile(max_percentile)
    if stats.count == 0:
        return 0.0, 0.0
    lo, hi = stats.hist_lo, stats.hist_hi
    if method != "minmax" and hi > lo:
        if stats.hist is None:
            raise ValueError(f"{stats.name}: method {method!r} needs a histogram; collect it with histograms")
        h = _Hist(stats.hist, lo, hi)
        if method == "percentile":
            lo, hi = h.percentile(p)
        elif method == "kl":
            lo, hi = h.kl()
        else:
            lo, hi = h.mse(DEFAULT_NOISE_WEIGHT if method == "default" else 1.0)
    return _bound_sentinels(stats, float(lo), float(hi))


def compute_ranges(
    stats: Mapping[str, TensorStats],
    method: str | Mapping[str, str],
    *,
    max_percentile: float | Mapping[str, float] = 0.9999,
) -> dict[str, tuple[float, float]]:
    """Ranges of all tensors; ``method`` and ``max_percentile`` may be given per tensor.

    A tensor missing from a per-tensor mapping uses ``default`` (resp. 0.9999). Tensors that
    had no finite value are left out: they cannot be calibrated and should stay float.
    """
    out = {}
    for name in sorted(stats):
        if stats[name].count == 0:
            continue
        m = method if isinstance(method, str) else method.get(name, "default")
        p = max_percentile if not isinstance(max_percentile, Mapping) else max_percentile.get(name, 0.9999)
        out[name] = compute_range(stats[name], m, max_percentile=p)
    return out


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ConfigError(f"unknown calibration_type {method!r}; expected one of {', '.join(METHODS)}")


def _bound_sentinels(stats: TensorStats, lo: float, hi: float) -> tuple[float, float]:
    """Keep a side holding sentinels at the bulk's extreme, or at a bounded end past zero."""
    if stats.below:
        lo = min(lo, stats.hist_lo)
        if lo >= 0.0:
            lo = -min(_sentinel_magnitude(stats.min), SENTINEL_MIN_ABS)
    if stats.above:
        hi = max(hi, stats.hist_hi)
        if hi <= 0.0:
            hi = min(_sentinel_magnitude(stats.max), SENTINEL_MIN_ABS)
    return lo, hi


def _sentinel_magnitude(extreme: float) -> float:
    return abs(extreme) if np.isfinite(extreme) else SENTINEL_MIN_ABS


class _Hist:
    """A histogram in bin units: bin i spans [i, i + 1), its values sit at the centre i + 0.5."""

    def __init__(self, hist: np.ndarray, lo: float, hi: float) -> None:
        self.p = np.asarray(hist, dtype=np.float64)
        self.n = self.p.size
        self.lo = lo
        self.width = (hi - lo) / self.n
        self.zero = -lo / self.width  # position of 0.0

    def value(self, pos: np.ndarray | float) -> float:
        return float(self.lo + float(pos) * self.width)

    # -- percentile -------------------------------------------------------------------
    def percentile(self, p: float) -> tuple[float, float]:
        if p >= 1.0:
            return self.value(0), self.value(self.n)
        tail = (1.0 - p) * self.p.sum()
        return self.value(_tail_position(self.p, tail)), self.value(self.n - _tail_position(self.p[::-1], tail))

    # -- mse ----------------------------------------------------------------------------
    def mse(self, noise_weight: float) -> tuple[float, float]:
        """The range of least clipping error + ``noise_weight`` x rounding noise."""
        p, n = self.p, self.n
        centers = np.arange(n) + 0.5
        c0 = np.concatenate(([0.0], np.cumsum(p)))
        c1 = np.concatenate(([0.0], np.cumsum(p * centers)))
        c2 = np.concatenate(([0.0], np.cumsum(p * centers**2)))
        s0 = np.concatenate((np.cumsum(p[::-1])[::-1], [0.0]))
        s1 = np.concatenate((np.cumsum((p * centers)[::-1])[::-1], [0.0]))
        s2 = np.concatenate((np.cumsum((p * centers**2)[::-1])[::-1], [0.0]))
        zero_bin, zero_mass = self._zero_excess()

        def error(a: np.ndarray, b: np.ndarray) -> np.ndarray:
            ma = np.clip(np.ceil(a - 0.5), 0, n).astype(np.intp)  # bins with centre below a
            mb = np.clip(np.floor(b - 0.5) + 1, 0, n).astype(np.intp)  # bins with centre above b start here
            below = a * a * c0[ma] - 2 * a * c1[ma] + c2[ma]
            above = b * b * s0[mb] - 2 * b * s1[mb] + s2[mb]
            inside = c0[mb] - c0[ma]
            if zero_bin is not None:
                inside = inside - np.where((ma <= zero_bin) & (zero_bin < mb), zero_mass, 0.0)
            step = (b - a) / _STEPS
            return np.maximum(below, 0.0) + np.maximum(above, 0.0) + noise_weight * inside * step * step / 12.0

        lows, highs = self._ends()
        a = np.array([lows[0]])
        b = np.array([highs[-1]])
        for _ in range(_MAX_ROUNDS):
            new_b = highs[[int(np.argmin(error(a, highs)))]]
            new_a = lows[[int(np.argmin(error(lows, new_b)))]]
            if new_a[0] == a[0] and new_b[0] == b[0]:
                break
            a, b = new_a, new_b
        return self.value(a[0]), self.value(b[0])

    def _ends(self) -> tuple[np.ndarray, np.ndarray]:
        """Candidate positions for the low end (<= 0) and the high end (>= 0), ascending."""
        edges = np.arange(self.n + 1, dtype=np.float64)
        lows = edges[edges <= self.zero] if self.zero > 0 else np.array([self.zero])
        highs = edges[edges >= self.zero] if self.zero < self.n else np.array([self.zero])
        if lows.size == 0:
            lows = np.array([0.0])
        if highs.size == 0:
            highs = np.array([float(self.n)])
        return lows, highs

    def _zero_excess(self) -> tuple[int | None, float]:
        """The bin holding 0.0 and its mass above its neighbours' (exact zeros, e.g. after ReLU)."""
        if not 0.0 <= self.zero <= self.n:
            return None, 0.0
        j = min(int(self.zero), self.n - 1)
        neighbours = [self.p[k] for k in (j - 1, j + 1) if 0 <= k < self.n]
        base = sum(neighbours) / len(neighbours) if neighbours else 0.0
        return j, max(0.0, float(self.p[j] - base))

    # -- kl -----------------------------------------------------------------------------
    def kl(self) -> tuple[float, float]:
        one_sided = self.zero <= 0.0 or self.zero >= self.n
        levels = _KL_LEVELS_ONE_SIDED if one_sided else _KL_LEVELS_FOLDED
        folded, width = self._folded()
        # Exact zeros quantize without loss; left in, their spike decides the grouping.
        zero_bin, zero_mass = self._zero_excess()
        if zero_bin is not None:
            folded[0] = max(0.0, folded[0] - zero_mass)
        if folded.size <= levels:
            return self.value(0), self.value(self.n)
        counts = np.arange(levels, folded.size + 1)
        best = _argmin_sweep(lambda cand: _kl_divergence(folded, cand.astype(np.intp), levels), counts)
        t = float(best[0]) * width
        hi_end = self.lo + self.n * self.width
        return max(self.lo, -t), min(hi_end, t)

    def _folded(self) -> tuple[np.ndarray, float]:
        """The histogram of |x| on bins anchored at 0 (no finer than the source bins)."""
        centres = np.abs(self.lo + (np.arange(self.n) + 0.5) * self.width)
        top = max(abs(self.lo), abs(self.lo + self.n * self.width))
        width = max(self.width, top / self.n)
        idx = np.minimum((centres / width).astype(np.intp), int(np.ceil(top / width)) - 1)
        return np.bincount(idx, weights=self.p, minlength=int(np.ceil(top / width))), width


def _tail_position(p: np.ndarray, tail: float) -> float:
    """Position (bins from the start of ``p``) below which ``tail`` of the mass lies."""
    cum = np.cumsum(p)
    i = int(np.searchsorted(cum, tail, side="left"))
    if i >= p.size:
        return float(p.size)
    before = cum[i - 1] if i else 0.0
    return i + (tail - before) / p[i] if p[i] > 0 else float(i)


def _argmin_sweep(cost, candidates: np.ndarray) -> np.ndarray:
    """The candidate of least cost (first on ties): a strided sweep, then the skipped neighbours.

    ``cost`` maps an array of candidates to an array of costs in one vectorized call.
    """
    stride = max(1, -(-candidates.size // _MAX_SWEEP))
    coarse = np.arange(0, candidates.size, stride)
    if coarse[-1] != candidates.size - 1:
        coarse = np.append(coarse, candidates.size - 1)
    i = int(coarse[int(np.argmin(cost(candidates[coarse])))])
    if stride > 1:
        fine = np.arange(max(0, i - stride + 1), min(candidates.size, i + stride))
        i = int(fine[int(np.argmin(cost(candidates[fine])))])
    return candidates[i : i + 1]


def _kl_divergence(hist: np.ndarray, counts: np.ndarray, levels: int) -> np.ndarray:
    """KL(P || Q) for keeping the first ``counts[c]`` bins of ``hist``, for every candidate c.

    P: the kept bins with the clipped tail added to the last one. Q: the kept bins (without
    the tail) merged into ``levels`` groups, each group's mass spread evenly over P's
    non-empty bins in it. Both are normalized; a P bin whose group has no Q mass gives inf.
    """
    p = hist
    nonzero = p > 0
    c_mass = np.concatenate(([0.0], np.cumsum(p)))
    c_nz = np.concatenate(([0], np.cumsum(nonzero)))
    plogp = np.where(nonzero, p * np.log(np.where(nonzero, p, 1.0)), 0.0)
    c_plogp = np.concatenate(([0.0], np.cumsum(plogp)))
    total = c_mass[-1]

    k = counts[:, None]
    bounds = (np.arange(levels + 1)[None, :] * k) // levels  # group j spans [bounds[j], bounds[j+1])
    g_mass = c_mass[bounds[:, 1:]] - c_mass[bounds[:, :-1]]
    g_nz = (c_nz[bounds[:, 1:]] - c_nz[bounds[:, :-1]]).astype(np.float64)
    last = counts - 1
    tail = total - c_mass[counts]
    # P's last bin gains the tail; it becomes non-empty if it was empty.
    g_nz[:, -1] += (tail > 0) & ~nonzero[last]
    pg_mass = g_mass.copy()
    pg_mass[:, -1] += tail
    with np.errstate(divide="ignore", invalid="ignore"):
        log_q = np.log(g_mass / g_nz)
        p_log_q = np.where(pg_mass > 0, pg_mass * log_q, 0.0).sum(axis=1)
        p_last = p[last] + tail
        p_log_p = c_plogp[last] + np.where(p_last > 0, p_last * np.log(np.where(p_last > 0, p_last, 1.0)), 0.0)
        q_total = np.where(g_nz > 0, g_mass, 0.0).sum(axis=1)
        kl = (p_log_p - p_log_q) / total - np.log(total) + np.log(q_total)
    return np.where(np.isfinite(kl), kl, np.inf)
