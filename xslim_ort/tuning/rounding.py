"""Weight rounding that minimizes a layer's output error (GPTQ with input Hessians).

Round-to-nearest treats each weight alone; GPTQ quantizes one input column at a time and
moves the rounding error onto the columns not yet quantized, weighted by the inverse of
the input Hessian ``H = Xq^T Xq``, so the layer's output error, not the weight error, is
minimized. Two additions fit the target and the block-wise setting:

* the target the layer is fitted to is the float model's output ``W Xf`` computed from
  *float* inputs, while it runs on *quantized* ones: the least-squares weights
  ``W* = W C H^-1`` with ``C = Xf^T Xq`` absorb the upstream error before rounding;
* the float bias is an extra, never-rounded column fed by a constant 1, so GPTQ's error
  feedback ends in the bias (an exact bias correction for the rounded weights).

The scale stays the one the quantizer re-derives: every channel keeps its largest weight
at exactly +-127 * scale (per-tensor power-of-two scales keep their largest code).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from ..qparams import WEIGHT_QMAX, WEIGHT_QMIN
from .graph import GraphIndex, attr
from .schemes import WeightScheme

#: GPTQ's damping, a fraction of the mean Hessian diagonal (the GPTQ paper's default).
DAMP = 0.01
#: Ridge strengths (fractions of the mean Hessian diagonal) tried for the least-squares
#: target. Plain GPTQ on the float weights (no target shift) was measured to add little
#: over round-to-nearest here: the gain comes from absorbing the input error.
RIDGES = (0.01, 0.1, 1.0, 10.0)
#: Columns GPTQ rounds before pushing their errors onto the rest in one matrix product.
LAZY_BLOCK = 64


@dataclass(frozen=True)
class Layer:
    """Geometry of a Conv/Gemm/MatMul, and its weight in GPTQ's ``[groups, rows, cols]`` form."""

    node_id: int
    op: str
    weight: str
    bias: str | None
    output: str
    scheme: WeightScheme
    groups: int = 1
    kernel: tuple[int, ...] = ()
    pads: tuple[int, ...] = ()
    strides: tuple[int, ...] = ()
    dilations: tuple[int, ...] = ()
    auto_pad: str = "NOTSET"
    alpha: float = 1.0
    beta: float = 1.0
    trans_b: bool = False

    @classmethod
    def from_node(cls, graph: GraphIndex, node_id: int, scheme: WeightScheme) -> Layer:
        node = graph.nodes[node_id]
        w = graph.inits[node.input[1]]
        bias = node.input[2] if len(node.input) > 2 and node.input[2] in graph.inits else None
        common = {
            "node_id": node_id,
            "op": node.op_type,
            "weight": node.input[1],
            "output": node.output[0],
            "scheme": scheme,
        }
        if node.op_type == "Conv":
            nd = w.ndim - 2
            return cls(
                bias=bias,
                groups=int(attr(node, "group", 1)),
                kernel=tuple(w.shape[2:]),
                pads=tuple(attr(node, "pads", [0] * 2 * nd)),
                strides=tuple(attr(node, "strides", [1] * nd)),
                dilations=tuple(attr(node, "dilations", [1] * nd)),
                auto_pad=_str(attr(node, "auto_pad", "NOTSET")),
                **common,
            )
        if node.op_type == "Gemm":
            beta = float(attr(node, "beta", 1.0))
            n_out = w.shape[0] if attr(node, "transB", 0) else w.shape[1]
            if bias is not None and (beta == 0.0 or graph.inits[bias].size != n_out):
                bias = None
            return cls(
                bias=bias,
                alpha=float(attr(node, "alpha", 1.0)),
                beta=beta,
                trans_b=bool(attr(node, "transB", 0)),
                **common,
            )
        return cls(bias=None, **common)

    # --- weight layout -------------------------------------------------------------
    def rows(self, w: np.ndarray) -> np.ndarray:
        """``[groups, out_per_group, in_per_group * kernel]``: one row per output channel."""
        if self.op == "Conv":
            return w.reshape(self.groups, w.shape[0] // self.groups, -1)
        return (w if self.trans_b else w.T)[None]

    def unrows(self, rows: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        if self.op == "Conv":
            return rows.reshape(shape)
        return rows[0] if self.trans_b else rows[0].T

    def bias_rows(self, b: np.ndarray) -> np.ndarray:
        """Bias in row layout, as it adds to the output (Gemm's beta applied)."""
        return (b.reshape(-1) * (self.beta if self.op == "Gemm" else 1.0)).reshape(self.groups, -1)

    def unbias(self, rows: np.ndarray, like: np.ndarray) -> np.ndarray:
        b = rows.reshape(-1) / (self.beta if self.op == "Gemm" else 1.0)
        return b.reshape(like.shape).astype(like.dtype)

    def row_quantization(self) -> str | None:
        """'row' if the scheme has one scale per output channel, 'tensor' if one in all, else None
        (per-channel on an input axis, which column-wise rounding cannot keep)."""
        axis = self.scheme.axis
        if axis is None:
            return "tensor"
        out_axis = {"Conv": 0, "Gemm": 0 if self.trans_b else 1, "MatMul": 1}[self.op]
        return "row" if axis == out_axis and not self.scheme.power_of_two else None

    # --- inputs --------------------------------------------------------------------
    def patches(self, x: np.ndarray, max_positions: int | None = None) -> np.ndarray:
        """``[groups, positions, in_per_group * kernel]``: what each row of ``rows`` multiplies.

        With ``max_positions``, output positions are subsampled on a regular grid (the same
        for any input, so float and quantized patches stay aligned) to about that many.
        """
        if self.op != "Conv":
            x2 = x.reshape(-1, x.shape[-1]).astype(np.float32)
            if max_positions is not None and x2.shape[0] > max_positions:
                x2 = x2[:: -(-x2.shape[0] // max_positions)]
            return (x2 * np.float32(self.alpha))[None] if self.alpha != 1.0 else x2[None]
        nd = x.ndim - 2
        kernel = self.kernel
        eff = [(k - 1) * d + 1 for k, d in zip(kernel, self.dilations, strict=True)]
        pads = self._pads(x.shape[2:], eff)
        xp = np.pad(x, [(0, 0), (0, 0), *((pads[i], pads[i + nd]) for i in range(nd))]) if any(pads) else x
        win = sliding_window_view(xp, eff, axis=tuple(range(2, 2 + nd)))
        win = win[
            (
                slice(None),
                slice(None),
                *(slice(None, None, s) for s in self.strides),
                *(slice(None, None, d) for d in self.dilations),
            )
        ]
        n, c = x.shape[:2]
        if max_positions is not None:
            total = n * int(np.prod(win.shape[2 : 2 + nd]))
            step = max(1, int(np.ceil((total / max_positions) ** (1.0 / nd))))
            if step > 1:
                win = win[(slice(None), slice(None), *(slice(step // 2, None, step) for _ in range(nd)))]
        out_sp = win.shape[2 : 2 + nd]
        win = win.reshape(n, self.groups, c // self.groups, *out_sp, *kernel)
        order = [1, 0, *range(3, 3 + nd), 2, *range(3 + nd, 3 + 2 * nd)]
        return win.transpose(order).reshape(self.groups, -1, (c // self.groups) * int(np.prod(kernel)))

    def _pads(self, spatial: tuple[int, ...], eff: list[int]) -> list[int]:
        nd = len(spatial)
        if self.auto_pad in ("NOTSET", ""):
            return list(self.pads) if self.pads else [0] * 2 * nd
        if self.auto_pad == "VALID":
            return [0] * 2 * nd
        begins, ends = [], []
        for size, e, s in zip(spatial, eff, self.strides, strict=True):
            total = max((-(-size // s) - 1) * s + e - size, 0)
            small, big = total // 2, total - total // 2
            begins.append(small if self.auto_pad == "SAME_UPPER" else big)
            ends.append(big if self.auto_pad == "SAME_UPPER" else small)
        return begins + ends


def _str(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


@dataclass(frozen=True)
class InputProducts:
    """One batch's share of ``InputStats``: ``Xq^T Xq``, ``Xf^T Xq``, the column sums of
    ``Xq`` and ``Xf``, and the number of positions."""

    qq: np.ndarray
    fq: np.ndarray
    sq: np.ndarray
    sf: np.ndarray
    count: int


class InputStats:
    """Sums over calibration positions of the augmented inputs ``[x, 1]`` of one layer:
    ``h = Xq^T Xq`` (quantized inputs) and ``c = Xf^T Xq`` (float against quantized)."""

    def __init__(self, groups: int, cols: int) -> None:
        self.h = np.zeros((groups, cols + 1, cols + 1))
        self.c = np.zeros((groups, cols + 1, cols + 1))
        self.count = 0

    def add(self, xf: np.ndarray, xq: np.ndarray) -> None:
        """``xf``, ``xq``: ``[groups, positions, cols]`` patches of the same samples."""
        self.accumulate(self.products(xf, xq))

    @staticmethod
    def products(xf: np.ndarray, xq: np.ndarray) -> InputProducts:
        """What ``add`` sums, for one batch: pure, so batches can compute theirs on threads."""
        return InputProducts(
            xq.transpose(0, 2, 1) @ xq, xf.transpose(0, 2, 1) @ xq, xq.sum(axis=1), xf.sum(axis=1), xq.shape[1]
        )

    def accumulate(self, p: InputProducts) -> None:
        d = p.sq.shape[1]
        self.h[:, :d, :d] += p.qq
        self.c[:, :d, :d] += p.fq
        self.h[:, :d, d] += p.sq
        self.h[:, d, :d] += p.sq
        self.c[:, :d, d] += p.sf
        self.c[:, d, :d] += p.sq
        self.h[:, d, d] += p.count
        self.c[:, d, d] += p.count
        self.count += p.count

    def merged(self, other: InputStats) -> InputStats:
        out = InputStats(self.h.shape[0], self.h.shape[1] - 1)
        out.h, out.c, out.count = self.h + other.h, self.c + other.c, self.count + other.count
        return out


@dataclass
class Rounded:
    """Int codes, their scale (per row ``[g, r, 1]`` or one ``[1, 1, 1]``), the new bias rows,
    and how they were chosen ('rtn': the quantizer's own rounding, or 'gptq')."""

    codes: np.ndarray
    scale: np.ndarray
    bias: np.ndarray | None
    method: str


def _augment(w: np.ndarray, b: np.ndarray | None) -> np.ndarray:
    g, r, _ = w.shape
    return np.concatenate([w, (b if b is not None else np.zeros((g, r)))[..., None]], axis=2).astype(np.float64)


def _grid(target: np.ndarray, mode: str, power_of_two: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scale for ``target`` (``[g, r, cols]``) and the pinned code of each row: every row's
    (or the tensor's) largest weight keeps its code, so the quantizer re-derives the scale."""
    g, r, _ = target.shape
    absmax = np.abs(target)
    if mode == "row":
        scale = absmax.max(axis=2, keepdims=True) / WEIGHT_QMAX
    else:
        scale = np.full((1, 1, 1), absmax.max() / WEIGHT_QMAX)
        if power_of_two:
            scale = np.exp2(np.ceil(np.log2(np.maximum(scale, 1e-30))))
    scale = np.where(scale <= 0, 1.0, scale)
    pin_col = np.full((g, r), -1)
    pin_val = np.zeros((g, r))
    if mode == "row":
        pin_col[:] = absmax.argmax(axis=2)
        pin_val[:] = np.clip(
            np.rint(np.take_along_axis(target, pin_col[..., None], 2)[..., 0] / scale[..., 0]), WEIGHT_QMIN, WEIGHT_QMAX
        )
    else:
        gi, ri, ci = np.unravel_index(absmax.argmax(), absmax.shape)
        pin_col[gi, ri] = ci
        pin_val[gi, ri] = np.clip(np.rint(target[gi, ri, ci] / scale.item()), WEIGHT_QMIN, WEIGHT_QMAX)
    return scale, pin_col, pin_val


def _fit_bias(waug: np.ndarray, codes: np.ndarray, scale: np.ndarray, stats: InputStats) -> np.ndarray:
    """Least-squares bias for fixed weights: ``E[W xf + b] = E[Q xq + b']``."""
    d = codes.shape[2]
    mf, mq = stats.c[:, :d, d] / stats.count, stats.h[:, d, :d] / stats.count
    return waug[:, :, d] + np.einsum("grd,gd->gr", waug[:, :, :d], mf) - np.einsum("grd,gd->gr", codes * scale, mq)


def rtn(w: np.ndarray, b: np.ndarray | None, stats: InputStats, mode: str, power_of_two: bool) -> Rounded:
    """Round to nearest, as the quantizer would, with the least-squares bias."""
    scale, _, _ = _grid(w, mode, power_of_two)
    codes = np.clip(np.rint(w / scale), WEIGHT_QMIN, WEIGHT_QMAX)
    bias = _fit_bias(_augment(w, b), codes, scale, stats) if b is not None else None
    return Rounded(codes.astype(np.int32), scale, bias, "rtn")


def gptq(
    w: np.ndarray,
    b: np.ndarray | None,
    stats: InputStats,
    mode: str,
    power_of_two: bool,
    ridges: Sequence[float | None],
    damp: float = DAMP,
) -> list[Rounded]:
    """Round ``w`` (``[groups, rows, cols]``) to the int8 grid minimizing
    ``|| [W b] [Xf 1]^T - [Q b'] [Xq 1]^T ||^2`` over the calibration positions, once per
    entry of ``ridges``.

    A ridge (relative to the mean Hessian diagonal) regularizes the least-squares target
    towards ``w``; None rounds ``w`` itself (plain GPTQ, blind to the input error).
    ``mode`` is 'row' (a scale per row, max|w| / 127) or 'tensor' (one scale; rounded up
    to a power of two if ``power_of_two``). Columns go in decreasing Hessian diagonal
    order (GPTQ's act-order), the bias last. The targets of all ridges go through one
    factorization of the Hessian and one column loop, as extra rows: the loop and the
    inverse, not the arithmetic, are what a layer costs.
    """
    g, r, d = w.shape
    has_bias = b is not None
    n = d + 1 if has_bias else d  # without a bias there is no constant column to absorb the mean
    waug = _augment(w, b)[:, :, :n]
    h, c = stats.h[:, :n, :n], stats.c[:, :n, :n]
    diag = np.einsum("gii->gi", h[:, :d, :d])
    scale_h = np.maximum(diag.mean(axis=1), 1e-12)[:, None, None] * np.eye(n)
    dead = np.abs(w).max(axis=2) == 0
    targets, grids = [], []
    for ridge in ridges:
        if ridge is None:
            target = waug.copy()
        else:  # ridge on both sides: pulls the least-squares weights towards w, not towards 0
            target = np.linalg.solve(h + ridge * scale_h, (waug @ (c + ridge * scale_h)).transpose(0, 2, 1))
            target = target.transpose(0, 2, 1)
        target[dead] = 0.0
        targets.append(target)
        grids.append(_grid(target[:, :, :d], mode, power_of_two))
    target = np.concatenate(targets, axis=1)  # [g, len(ridges) * r, n]
    s = np.concatenate([np.broadcast_to(scale[..., 0], (g, r)) for scale, _, _ in grids], axis=1)
    pin_col = np.concatenate([pc for _, pc, _ in grids], axis=1)
    pin_val = np.concatenate([pv for _, _, pv in grids], axis=1)

    # Act-order permutation of the weight columns; the bias column stays last.
    perm = np.argsort(-diag, axis=1, kind="stable")
    if has_bias:
        perm = np.concatenate([perm, np.full((g, 1), d)], axis=1)
    hd = h + damp * scale_h
    hp = np.take_along_axis(np.take_along_axis(hd, perm[:, :, None], 1), perm[:, None, :], 2)
    wk = np.take_along_axis(target, perm[:, None, :], 2)
    inv_perm = np.argsort(perm, axis=1)
    pin_pos = np.where(pin_col >= 0, np.take_along_axis(inv_perm, np.maximum(pin_col, 0), 1), -1)

    u = np.linalg.cholesky(np.linalg.inv(hp)).transpose(0, 2, 1)  # H^-1 = U^T U, U upper
    codes_p = np.zeros((*wk.shape[:2], d))
    for start in range(0, d, LAZY_BLOCK):  # GPTQ's lazy batches: the far columns get one matmul
        end = min(start + LAZY_BLOCK, d)
        errs = np.zeros((*wk.shape[:2], end - start))
        for i in range(start, end):
            col = wk[:, :, i]
            q = np.where(pin_pos == i, pin_val, np.clip(np.rint(col / s), WEIGHT_QMIN, WEIGHT_QMAX))
            err = (col - q * s) / u[:, i, i][:, None]
            wk[:, :, i + 1 : end] -= err[:, :, None] * u[:, None, i, i + 1 : end]
            errs[:, :, i - start] = err
            codes_p[:, :, i] = q
        wk[:, :, end:] -= errs @ u[:, start:end, end:]
    codes = np.take_along_axis(codes_p, inv_perm[:, None, :d], 2).astype(np.int32)
    return [
        Rounded(codes[:, k * r : (k + 1) * r], scale, wk[:, k * r : (k + 1) * r, d] if has_bias else None, "gptq")
        for k, (scale, _, _) in enumerate(grids)
    ]


def objective(w: np.ndarray, b: np.ndarray | None, rounded: Rounded, stats: InputStats) -> float:
    """``|| [W b] [Xf 1]^T - [Q b'] [Xq 1]^T ||^2`` on ``stats``, less its constant part."""
    n = w.shape[2] + (b is not None)
    waug = _augment(w, b)[:, :, :n]
    qaug = _augment(rounded.codes * rounded.scale, rounded.bias)[:, :, :n]
    h, c = stats.h[:, :n, :n], stats.c[:, :n, :n]
    return float(np.sum((qaug @ h) * qaug) - 2.0 * np.sum((waug @ c) * qaug))


def choose_rounding(
    w: np.ndarray, b: np.ndarray | None, fit: InputStats, held_out: InputStats, mode: str, power_of_two: bool
) -> Rounded:
    """Round-to-nearest, or GPTQ with the ridge, that does best on held-out calibration data,
    refitted on all of it.

    With a few dozen images and a wide layer, the least-squares target can fit the
    calibration set rather than the data; scoring on batches the fit never saw picks the
    ridge that generalizes. The refit then uses every sample (measured: worth about 1 dB
    on MobileNetV2's last blocks, where samples per column are fewest).
    """
    ridges = RIDGES if fit.count >= w.shape[2] + 1 else ()  # fewer samples than columns: H is singular

    def fitted(ridge: float | None, stats: InputStats) -> Rounded:
        """GPTQ with ``ridge``, or round to nearest for None."""
        return (
            rtn(w, b, stats, mode, power_of_two) if ridge is None else gptq(w, b, stats, mode, power_of_two, [ridge])[0]
        )

    if not held_out.count:
        return fitted(ridges[-1] if ridges else None, fit)
    scored = [rtn(w, b, fit, mode, power_of_two), *(gptq(w, b, fit, mode, power_of_two, ridges) if ridges else [])]
    best = int(np.argmin([objective(w, b, rounded, held_out) for rounded in scored]))
    return fitted([None, *ridges][best], fit.merged(held_out))


def grid_weight(rounded: Rounded, layer: Layer, shape: tuple[int, ...]) -> np.ndarray:
    """Float weights ``codes * scale`` from which the quantizer re-derives exactly ``scale``.

    ``max|w| / 127`` in float32 can land one ulp away from the scale; iterating to the
    fixed point of the quantizer's own scale rule makes the round trip exact.
    """
    codes = rounded.codes.astype(np.float32)
    s = rounded.scale.astype(np.float32)
    w = layer.unrows(codes * s, shape)
    for _ in range(4):
        derived = np.asarray(layer.scheme.scale(w), np.float32).reshape(s.shape)
        if np.array_equal(derived, s):
            break
        s = derived
        w = layer.unrows(codes * s, shape)
    return w
