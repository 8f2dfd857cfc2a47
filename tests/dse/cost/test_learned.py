"""dse.cost.learned: the gradient-boosted-tree regressor recovers a known cost formula inside its sampled
range, reports a leave-one-out error, and is deterministic.

The rows are synthetic: latency = 0.01 ms + 2e-9 ms per padded MAC (16x32 register tiles), with 3%
noise, so every expectation is computed from that formula, not from the regressor.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from dse.cost.learned import MIN_ROWS, fit_learned, learned_features
from dse.cost.regression import error_summary, feature_matrix


def _pad16x32(prim: str, b: int, m: int, k: int, n: int) -> tuple[int, int, int, int, int]:
    return b, -(-m // 16) * 16, k, -(-n // 32) * 32, 0


def _truth(shape) -> float:
    """The synthetic ground truth: a fixed 0.01 ms plus 2e-9 ms per MAC of the padded shape."""
    return 0.01 + 2e-9 * math.prod(_pad16x32("bmm", *shape)[:4])


def _shapes(rng, count: int, lo: int = 16, hi: int = 512) -> np.ndarray:
    return np.array([(1, *(int(v) for v in rng.integers(lo, hi, 3))) for _ in range(count)])


def _rows(seed: int, count: int = 40, noise: float = 0.03) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    shapes = _shapes(rng, count)
    return shapes, np.array([_truth(s) for s in shapes]) * (1 + noise * rng.standard_normal(count))


def test_learned_regressor_recovers_a_known_formula_inside_its_range():
    shapes, values = _rows(0)
    learned = fit_learned("bmm", shapes, values, pad=_pad16x32)
    assert learned is not None and learned.rows == 40
    # held-out shapes whose work lies inside the sampled range: trees do not extrapolate beyond it
    work = shapes.prod(axis=1)
    held = _shapes(np.random.default_rng(1), 200)
    held = held[(held.prod(axis=1) >= work.min()) & (held.prod(axis=1) <= work.max())]
    assert len(held) > 150
    ref = [_truth(s) for s in held]
    got = error_summary(learned.predict_many(held), ref)
    assert got["rmspe"] < 0.15 and got["within_15"] > 0.8
    # the tolerance discriminates: one latency for every shape (the rows' geometric mean) is far outside it
    flat = error_summary(np.full(len(held), math.exp(np.log(values).mean())), ref)
    assert flat["rmspe"] > 0.5
    assert learned.predict(*held[0]) == pytest.approx(learned.predict_many(held[:1])[0])
    # its own leave-one-out error is finite and above the injected 3% noise (it cannot beat the noise)
    assert learned.loo_rmspe is not None and 0.03 < learned.loo_rmspe < 0.3
    assert 0.0 < learned.loo_within_10 <= 1.0


def test_learned_regressor_is_deterministic():
    shapes, values = _rows(2, count=24)
    held = _shapes(np.random.default_rng(3), 50)
    one = fit_learned("bmm", shapes, values, pad=_pad16x32)
    two = fit_learned("bmm", shapes, values, pad=_pad16x32)
    assert np.array_equal(one.predict_many(held), two.predict_many(held))
    assert one.loo_rmspe == two.loo_rmspe and one.loo_within_10 == two.loo_within_10


def test_learned_features_are_the_laws_work_terms_and_the_shape():
    shapes = np.array([[2, 17, 50, 33], [1, 64, 8, 96]])
    x = learned_features("bmm", shapes, pad=_pad16x32)
    law = feature_matrix("bmm", shapes, pad=_pad16x32)
    assert x.shape == (2, 8)
    # padded MACs: 2 * 32 * 50 * 64 for the first shape (m 17 -> 32, n 33 -> 64)
    assert x[0, 0] == pytest.approx(math.log1p(2 * 32 * 50 * 64))
    assert np.allclose(x[:, :4], np.log1p(law[:, 1:]))
    assert np.allclose(x[:, 4:7], np.log(shapes[:, 1:])) and np.array_equal(x[:, 7], shapes[:, 0])


def test_too_few_rows_give_no_regressor_and_bad_rows_are_dropped():
    shapes, values = _rows(4, count=MIN_ROWS + 2)
    assert fit_learned("bmm", shapes[: MIN_ROWS - 1], values[: MIN_ROWS - 1]) is None
    bad = values.copy()
    bad[:3] = (0.0, -1.0, math.nan)  # leaves MIN_ROWS - 1 usable rows
    assert fit_learned("bmm", shapes, bad) is None
    exact = fit_learned("bmm", shapes[:MIN_ROWS], values[:MIN_ROWS])
    assert exact is not None and exact.rows == MIN_ROWS and exact.loo_rmspe is None  # no row to leave out
    assert fit_learned("bmm", shapes, values).loo_rmspe is not None
