"""A learned latency regressor per (backend, primitive): gradient-boosted trees on the law's own features.

What. For the profile rows that :func:`dse.cost.regression.fit_law` fits its law on, a gradient-boosted
tree ensemble (Friedman, "Greedy function approximation: a gradient boosting machine", Annals of
Statistics 2001; the XGBoost implementation, Chen & Guestrin, KDD 2016) predicts ``log(latency)`` from
the features the law uses — padded MACs, compulsory bytes, padded outputs and tile steps, taken from
:func:`dse.cost.regression.feature_matrix` so both see the same work — plus ``log m``, ``log k``,
``log n`` and ``b``, which let the trees price what the law's additive form cannot (a GEMM whose ``n``
falls just past a tile or a cache size). The target is the logarithm because latencies span orders of
magnitude and the error reported is relative.

Why. nn-Meter (Zhang et al., MobiSys 2021) predicts each kernel's latency with a random forest per
kernel type; the held-out validation (:mod:`dse.cost.validate`) reports this regressor next to the law
so that where it wins on shapes the profile never measured can be seen, not assumed. The cost model
keeps pricing with the law: trees cannot extrapolate — beyond the sampled range every prediction is the
value of the nearest leaf, flat in the work — and a profile holds only a few dozen shapes per primitive
(nn-Meter samples thousands), while the law's non-negative coefficients keep it monotone in the work.

Fit error is reported as the law reports its own: the leave-one-out RMS relative error over the
measured rows, each predicted by a fit without it (``loo_rmspe``), and the fraction of those predictions
within ±10% (``loo_within_10``).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any

import numpy as np

from dse.cost.regression import PadFn, feature_matrix

log = logging.getLogger(__name__)

# Fewer rows than this and the trees have nothing to split on; the leave-one-out fits need one more.
MIN_ROWS = 4

# Small, shallow and deterministic: one thread and no row or column subsampling, so two fits on the same
# rows give the same trees; a few dozen rows fit in milliseconds. Depth 3 lets a tree combine the work
# with one shape dimension or two; the learning rate keeps each of the 200 trees a small correction.
PARAMS: dict[str, Any] = {
    "n_estimators": 200,
    "max_depth": 3,
    "learning_rate": 0.1,
    "min_child_weight": 1.0,
    "subsample": 1.0,
    "colsample_bytree": 1.0,
    "tree_method": "exact",
    "n_jobs": 1,
    "random_state": 0,
}

FEATURES = ("log_macs", "log_bytes", "log_outputs", "log_steps", "log_m", "log_k", "log_n", "b")


def learned_features(primitive: str, shapes: np.ndarray, dtype: str | None = None, pad: PadFn | None = None
                     ) -> np.ndarray:
    """[rows, 8] features (:data:`FEATURES`) of ``shapes`` [rows, 4] = (b, m, k, n): the law's work terms
    (:func:`dse.cost.regression.feature_matrix`, without its constant) as ``log1p`` — ``steps`` is 0
    without ``pad`` — then ``log m``, ``log k``, ``log n`` and ``b``."""
    shapes = np.asarray(shapes, dtype=np.float64).reshape(-1, 4)
    work = feature_matrix(primitive, shapes, dtype, pad)[:, 1:]  # macs, bytes, outputs, steps
    # logarithms: the trees see float32, which keeps a ratio's resolution in log space at any magnitude
    return np.column_stack([np.log1p(work), np.log(shapes[:, 1:]), shapes[:, :1]])


def _fit_trees(x: np.ndarray, log_y: np.ndarray) -> Any:
    # imported here, not at the top: xgboost takes about a second to import, and the parser imports every
    # command module (this one through dse.cost.validate) on each `dse` invocation
    import xgboost

    model = xgboost.XGBRegressor(objective="reg:squarederror", **PARAMS)
    model.fit(x, log_y)
    return model


@dataclasses.dataclass(frozen=True)
class LearnedLaw:
    """Gradient-boosted trees for one (primitive, backend): ``latency = exp(trees(features))`` (module doc)."""

    primitive: str
    model: Any = dataclasses.field(compare=False, repr=False)  # the fitted xgboost.XGBRegressor
    rows: int  # measured rows behind the fit
    loo_rmspe: float | None  # leave-one-out RMS relative error, None with too few rows
    loo_within_10: float | None  # fraction of rows whose LOO prediction is within ±10%
    dtype: str | None = None
    pad: PadFn | None = dataclasses.field(default=None, compare=False, repr=False)

    def predict_many(self, shapes: np.ndarray) -> np.ndarray:
        return np.exp(self.model.predict(learned_features(self.primitive, shapes, self.dtype, self.pad)))

    def predict(self, b: int, m: int, k: int, n: int) -> float:
        return float(self.predict_many(np.array([[b, m, k, n]]))[0])


def fit_learned(primitive: str, shapes: np.ndarray, values: np.ndarray, dtype: str | None = None,
                pad: PadFn | None = None) -> LearnedLaw | None:
    """Fit :class:`LearnedLaw` on measured ``shapes`` [rows, 4] and positive latencies ``values`` [rows];
    ``dtype`` and ``pad`` as for :func:`dse.cost.regression.fit_law`.

    Rows with non-finite or non-positive values are dropped; returns None with fewer than :data:`MIN_ROWS`
    left. ``loo_rmspe`` needs :data:`MIN_ROWS` rows without the one left out.
    """
    shapes = np.asarray(shapes, dtype=np.float64).reshape(-1, 4)
    y = np.asarray(values, dtype=np.float64).reshape(-1)
    keep = np.isfinite(y) & (y > 0)
    shapes, y = shapes[keep], y[keep]
    if len(y) < MIN_ROWS:
        log.debug("%s: %d rows, too few for the learned regressor", primitive, len(y))
        return None
    x, log_y = learned_features(primitive, shapes, dtype, pad), np.log(y)
    model = _fit_trees(x, log_y)
    loo_err = within = None
    if len(y) - 1 >= MIN_ROWS:
        errs = np.empty(len(y))
        for i in range(len(y)):
            mask = np.arange(len(y)) != i
            errs[i] = (math.exp(float(_fit_trees(x[mask], log_y[mask]).predict(x[i:i + 1])[0])) - y[i]) / y[i]
        loo_err = float(np.sqrt(np.mean(errs**2)))
        within = float(np.mean(np.abs(errs) <= 0.10))
    log.debug("%s: learned regressor on %d rows, LOO RMSPE %s", primitive, len(y), loo_err)
    return LearnedLaw(primitive, model, len(y), loo_err, within, dtype, pad)
