"""dse.cost.fidelity: Kendall's τ, the per-assignment error figures and the per-kernel comparison, each against
a hand calculation."""

from __future__ import annotations

import math

import pytest

from dse.cost.fidelity import assignment_summary, compare_kernels, error_figures, kendall_tau


def test_kendall_tau_hand_examples():
    # one swapped pair of six: C = 5, D = 1 -> (5 - 1) / 6
    assert kendall_tau([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(4 / 6)
    assert kendall_tau([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    # ties: pairs (a, b) signs: (+,+) (+,+) (+,+) (0,+) (+,+) (+,0): C = 4, D = 0, one tie each side
    # tau_b = 4 / sqrt((6 - 1)(6 - 1)) = 0.8
    assert kendall_tau([1, 2, 2, 3], [1, 2, 3, 3]) == pytest.approx(0.8)
    assert kendall_tau([1.0], [2.0]) is None
    assert kendall_tau([1, 1, 1], [1, 2, 3]) is None  # one side all ties: undefined
    with pytest.raises(ValueError):
        kendall_tau([1, 2], [1])


def test_error_figures_hand_example():
    pred, meas = [1.0, 1.08, 0.8, 2.09], [1.0, 1.0, 1.0, 2.0]  # errors 0, +8%, -20%, +4.5%
    f = error_figures(pred, meas)
    assert f["count"] == 4
    assert f["within_5"] == pytest.approx(2 / 4) and f["within_10"] == pytest.approx(3 / 4)
    assert f["mean_abs_error"] == pytest.approx((0 + 0.08 + 0.2 + 0.045) / 4)
    assert f["worst_error"] == pytest.approx(-0.2)
    # three concordant pairs, none discordant, three tied in the measurement: 3 / sqrt(6 * 3)
    assert f["kendall_tau"] == pytest.approx(3 / math.sqrt(18))


def test_summary_corrects_by_the_host_speed_ratio():
    rows = [{"predicted_ms": 1.0, "measured_ms": 1.1, "spread": 0.02},
            {"predicted_ms": 2.0, "measured_ms": 2.3, "spread": 0.05}]
    s = assignment_summary(rows, 1.1)
    assert s["within_10"] == pytest.approx(0.5)  # -9.1% and -13.0%
    assert s["corrected_within_5"] == pytest.approx(1.0)  # 1.1 vs 1.1 and 2.2 vs 2.3 (-4.3%)
    assert s["corrected_worst_error"] == pytest.approx(2.2 / 2.3 - 1)
    assert s["max_spread"] == pytest.approx(0.05) and s["speed_ratio"] == 1.1
    unknown = assignment_summary(rows, None)
    assert "corrected_within_5" not in unknown and unknown["speed_ratio"] is None


class _Table:
    """A profile with measured rows at some shapes and a flat regression elsewhere."""

    rows = {("matmul", 1, 8, 8, 8): 0.10, ("matmul", 1, 8, 8, 16): 0.20, ("matmul", 1, 8, 16, 16): 0.40,
            ("matmul", 1, 16, 16, 16): 0.50, ("bmm", 2, 4, 4, 4): 0.05}

    def lookup(self, backend, primitive, b, m, k, n):
        hit = self.rows.get((primitive, b, m, k, n))
        return None if hit is None else (hit, 0.0)

    def estimate(self, backend, call):
        return type("E", (), {"latency_ms": 1.0})()


def _kernel(prim, shape, in_model, calls=1):
    return {"primitive": prim, **dict(zip("bmkn", shape)), "calls": calls, "in_model_ms": in_model}


def test_compare_kernels_flags_the_row_that_disagrees():
    kernels = [_kernel("matmul", (1, 8, 8, 8), 0.12, calls=2), _kernel("matmul", (1, 8, 8, 16), 0.24),
               _kernel("matmul", (1, 8, 16, 16), 0.48), _kernel("matmul", (1, 16, 16, 16), 1.20),  # 2.4x: poisoned
               _kernel("bmm", (2, 4, 4, 4), 0.06), _kernel("bmm", (2, 9, 9, 9), 1.3)]  # the last: regression
    rows, factors = compare_kernels(kernels, _Table(), factor=1.5)
    by = {(r["primitive"], r["m"], r["k"], r["n"]): r for r in rows}
    assert by[("matmul", 8, 8, 8)]["ratio"] == pytest.approx(1.2)
    assert by[("matmul", 16, 16, 16)]["usual_ratio"] == pytest.approx(1.2)  # the median of the other three
    assert [k for k, r in by.items() if r["poisoned"]] == [("matmul", 16, 16, 16)]
    assert by[("bmm", 9, 9, 9)]["source"] == "regression" and not by[("bmm", 9, 9, 9)]["poisoned"]
    # calls weight the factor: (0.12*2 + 0.24 + 0.48 + 1.20) / (0.10*2 + 0.20 + 0.40 + 0.50)
    assert factors["matmul"]["factor"] == pytest.approx(2.16 / 1.30)
    assert factors["bmm"]["factor"] == pytest.approx((0.06 + 1.3) / (0.05 + 1.0))
