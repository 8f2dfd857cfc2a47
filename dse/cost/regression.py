"""Latency/energy of a shape that was not measured: a physically motivated linear law per primitive.

Model. For one primitive on one backend, the cost of a call of size ``(b, m, k, n)`` is predicted as ::

    cost = c0 + c1 · (b·m'·k·n') + c2 · bytes + c3 · (b·m'·n') [+ c4 · steps],   c >= 0

— a fixed per-call overhead (launch, thread wake-up), time per multiply-accumulate (FLOPs / 2), time per
byte of compulsory traffic (inputs read once + output written once, from :func:`kernels.op_counts` for
the kernel primitives) and time per output element (the epilogue: casts, stores, reductions' tails).
``m'`` and ``n'`` are the rows and columns the kernel really computes: the CPU kernels reduce over whole
register tiles (``kernels.cpu_schedules.tiled_shape``), so a 24-column ``bmm`` does the work of 32; for
other kernels (PyTorch's, tuned or GPU ones) they are ``m`` and ``n``. ``steps`` (those CPU kernels only)
counts iterations of the kernel's innermost tile step (``kernels.cpu_schedules.tile_steps``: a broadcast
or mask test per row, ``k`` and column tile), the part of the work that does not scale with the tile's
width. The law is the additive form of the roofline model (Williams et al., "Roofline", CACM 2009): each term
is the time one resource needs. The coefficients are fitted by non-negative least squares (Lawson & Hanson
1974, ``scipy.optimize.nnls``) on *relative* residuals ``(y - ŷ)/y`` — every row weighted by ``1/y`` —
because latencies span orders of magnitude and the error we report is relative (nn-Meter's ±10%
accuracy and RMSPE).

Why not something richer: nn-Meter (Zhang et al., MobiSys 2021) fits a random forest per kernel type on
thousands of sampled configurations. A profile here holds a few dozen shapes per primitive (the model's
own layers); with so few points a forest cannot extrapolate at all (it predicts a training leaf's mean
beyond the data), and a log-log fit ``log y = a + b·log flops`` has no fixed overhead and bends the wrong
way for small kernels. Non-negative coefficients keep the law monotone: more work never predicts less
time, which is what makes extrapolation safe-ish. Its own fit error is reported as the leave-one-out
relative error (RMSPE over the measured rows, each predicted by a fit without it), and a prediction
whose work lies far outside the measured range (MACs above 2× the largest or below 0.5× the smallest
measured) is flagged ``extrapolated``.

With fewer rows than coefficients the law shrinks: 1 row -> cost proportional to MACs (or bytes for
work-free ops); 2-4 rows -> ``c0 + c1·work``; 5 or more -> the four terms; 6 or more with tile steps -> all five.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import numpy as np

import kernels

FEATURES = ("const", "macs", "bytes", "outputs", "steps")

# Bytes of one call for primitives that are not TVM kernels (non-primitive work measured by the profiler).
# Their (b, m, k, n) describe a Linear-like op reading [b, m, k] and writing [b, m, n] in fp32.
BytesFn = Callable[[int, int, int, int], float]
_BYTES: dict[str, BytesFn] = {}


def register_bytes(primitive: str) -> Callable[[BytesFn], BytesFn]:
    """Register how many bytes one call of ``primitive`` at (b, m, k, n) moves (default: Linear-like fp32)."""

    def deco(fn: BytesFn) -> BytesFn:
        _BYTES[primitive] = fn
        return fn

    return deco


def _linear_like_bytes(b: int, m: int, k: int, n: int) -> float:
    return 4.0 * (b * m * k + b * m * n)


def bytes_moved(primitive: str, b: int, m: int, k: int, n: int, dtype: str | None = None) -> float:
    """Compulsory bytes of one call: the kernel's own count for TVM primitives, else Linear-like fp32."""
    fn = _BYTES.get(primitive)
    if fn is not None:
        return float(fn(b, m, k, n))

    if primitive in kernels.names():
        dt = dtype if dtype and dtype in kernels.get(primitive).dtypes else None
        c = kernels.op_counts(primitive, int(b), int(m), int(k), int(n), dt)
        return float(c.bytes_read + c.bytes_written)
    return _linear_like_bytes(b, m, k, n)


# (primitive, b, m, k, n) -> (b, m', k, n', steps): the padded shape its kernel computes and its tile steps
# (kernels.cpu_schedules.tile_padding)
PadFn = Callable[[str, int, int, int, int], tuple[int, int, int, int, int]]


def feature_matrix(primitive: str, shapes: np.ndarray, dtype: str | None = None, pad: PadFn | None = None
                   ) -> np.ndarray:
    """[rows, 5] features (const, macs, bytes, outputs, steps) of ``shapes`` [rows, 4] = (b, m, k, n); with
    ``pad``, MACs and outputs count the padded shape the kernel computes (bytes stay the compulsory
    traffic) and ``steps`` its tile steps; without, ``steps`` is 0."""
    shapes = np.asarray(shapes, dtype=np.float64).reshape(-1, 4)
    byt = np.array([bytes_moved(primitive, *map(int, s), dtype) for s in shapes], dtype=np.float64)
    if pad is None:
        work = np.concatenate([shapes, np.zeros((len(shapes), 1))], axis=1)
    else:
        work = np.array([pad(primitive, *map(int, s)) for s in shapes], dtype=np.float64).reshape(-1, 5)
    b, m, k, n, steps = work.T
    return np.stack([np.ones_like(b), b * m * k * n, byt, b * m * n, steps], axis=1)


def _nnls_relative(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Non-negative ``c`` minimising Σ((y - x·c)/y)² (columns rescaled for conditioning)."""
    from scipy.optimize import nnls

    w = 1.0 / y  # [rows]
    xw = x * w[:, None]  # [rows, p]
    scale = np.linalg.norm(xw, axis=0)
    scale[scale == 0] = 1.0
    coef, _ = nnls(xw / scale, np.ones_like(y), maxiter=50 * x.shape[1])
    return coef / scale


@dataclasses.dataclass(frozen=True)
class CostLaw:
    """A fitted law for one (primitive, backend, metric): ``cost = features · coef`` (see module doc)."""

    primitive: str
    metric: str  # "latency_ms" | "energy_mj"
    columns: tuple[str, ...]  # which of FEATURES are used
    coef: np.ndarray  # [len(columns)], >= 0
    rows: int  # measured rows behind the fit
    loo_rmspe: float | None  # leave-one-out RMS relative error, None with < 2 rows
    loo_within_10: float | None  # fraction of rows whose LOO prediction is within ±10%
    macs_range: tuple[float, float]  # smallest and largest measured work
    dtype: str | None = None
    pad: PadFn | None = dataclasses.field(default=None, compare=False, repr=False)

    def predict(self, b: int, m: int, k: int, n: int) -> float:
        feats = feature_matrix(self.primitive, np.array([[b, m, k, n]]), self.dtype, self.pad)[0]
        idx = [FEATURES.index(c) for c in self.columns]
        return float(feats[idx] @ self.coef)

    def predict_many(self, shapes: np.ndarray) -> np.ndarray:
        feats = feature_matrix(self.primitive, shapes, self.dtype, self.pad)
        idx = [FEATURES.index(c) for c in self.columns]
        return feats[:, idx] @ self.coef

    def extrapolated(self, b: int, m: int, k: int, n: int) -> bool:
        """Work beyond 2× the largest or below 0.5× the smallest measured (MACs; outputs for work-free ops)."""
        work = _work(b, m, k, n)
        lo, hi = self.macs_range
        return bool(work > 2.0 * hi or work < 0.5 * lo)

    def describe(self) -> dict:
        return {
            "primitive": self.primitive,
            "metric": self.metric,
            "law": " + ".join(f"{c:.4g}·{name}" for c, name in zip(self.coef, self.columns)),
            "rows": self.rows,
            "loo_rmspe": self.loo_rmspe,
            "loo_within_10": self.loo_within_10,
        }


def _work(b: float, m: float, k: float, n: float) -> float:
    return float(b) * m * k * n


def _columns_for(rows: int, steps: bool = False) -> tuple[str, ...]:
    if rows >= 6 and steps:
        return FEATURES
    if rows >= 5:
        return FEATURES[:4]
    if rows >= 2:
        return ("const", "macs")
    return ("macs",)


def _fit_columns(x: np.ndarray, y: np.ndarray, columns: Sequence[str]) -> np.ndarray:
    idx = [FEATURES.index(c) for c in columns]
    return _nnls_relative(x[:, idx], y)


def fit_law(primitive: str, shapes: np.ndarray, values: np.ndarray, metric: str = "latency_ms",
            dtype: str | None = None, pad: PadFn | None = None) -> CostLaw | None:
    """Fit :class:`CostLaw` on measured ``shapes`` [rows, 4] and positive ``values`` [rows]; ``pad`` maps a
    shape to the padded one its kernel computes (see :func:`feature_matrix`).

    Rows with non-finite or non-positive values are dropped; returns None when no row is left.
    """
    shapes = np.asarray(shapes, dtype=np.float64).reshape(-1, 4)
    y = np.asarray(values, dtype=np.float64).reshape(-1)
    keep = np.isfinite(y) & (y > 0)
    shapes, y = shapes[keep], y[keep]
    if len(y) == 0:
        return None
    x = feature_matrix(primitive, shapes, dtype, pad)
    steps = bool(np.any(x[:, FEATURES.index("steps")] > 0))
    columns = _columns_for(len(y), steps)
    coef = _fit_columns(x, y, columns)
    loo_err = None
    within = None
    if len(y) >= 2:
        loo_cols = _columns_for(len(y) - 1, steps)
        idx = [FEATURES.index(c) for c in loo_cols]
        errs = np.empty(len(y))
        for i in range(len(y)):
            mask = np.arange(len(y)) != i
            c = _fit_columns(x[mask], y[mask], loo_cols)
            errs[i] = (x[i, idx] @ c - y[i]) / y[i]
        loo_err = float(np.sqrt(np.mean(errs**2)))
        within = float(np.mean(np.abs(errs) <= 0.10))
    work = shapes[:, 0] * shapes[:, 1] * shapes[:, 2] * shapes[:, 3]
    return CostLaw(primitive, metric, tuple(columns), coef, len(y), loo_err, within,
                   (float(work.min()), float(work.max())), dtype, pad)


def error_summary(predicted: Sequence[float], measured: Sequence[float]) -> dict[str, float]:
    """nn-Meter's accuracy figures: fraction within ±10% and ±15%, RMSPE, and the mean |error|."""
    p = np.asarray(predicted, dtype=np.float64)
    y = np.asarray(measured, dtype=np.float64)
    if len(y) == 0:
        return {"count": 0, "within_10": math.nan, "within_15": math.nan, "rmspe": math.nan, "mape": math.nan}
    rel = (p - y) / y
    return {
        "count": int(len(y)),
        "within_10": float(np.mean(np.abs(rel) <= 0.10)),
        "within_15": float(np.mean(np.abs(rel) <= 0.15)),
        "rmspe": float(np.sqrt(np.mean(rel**2))),
        "mape": float(np.mean(np.abs(rel))),
    }
