"""dse.cost.validate: the learned regressor's figures next to the law's on held-out shapes, each against a hand
calculation, and its prediction carried by every held-out result."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dse.cost.learned import fit_learned
from dse.cost.validate import HoldoutResult, format_figure, summarize_shapes, validate_shapes
from dse.profiling.store import Profile


def _result(prim: str, backend: str, measured: float, law: float, learned: float | None) -> HoldoutResult:
    return HoldoutResult(prim, backend, 1, 8, 8, 8, measured_ms=measured, predicted_ms=law, law_loo_rmspe=0.1,
                         extrapolated=False, load_1m=None, learned_ms=learned,
                         learned_loo_rmspe=None if learned is None else 0.2)


def test_summary_reports_the_learned_figures_next_to_the_laws():
    rs = [
        _result("matmul", "tvm", 1.0, 1.05, 0.95),  # law +5%, learned -5%
        _result("matmul", "tvm", 1.0, 0.5, 1.12),  # law -50%, learned +12%
        _result("bmm", "tvm", 1.0, 1.02, 1.3),  # law +2%, learned +30%
        _result("bmm", "torch", 2.0, 2.1, None),  # too few rows for the learned regressor
        _result("bmm", "torch", 2.0, 1.9, None),
    ]
    s = summarize_shapes(rs)

    mm = s["tvm/matmul"]
    assert mm["learned_count"] == 2
    assert mm["learned_within_10"] == 0.5 and mm["learned_within_15"] == 1.0
    assert mm["learned_rmspe"] == pytest.approx(math.sqrt((0.05**2 + 0.12**2) / 2))
    assert mm["learned_law_rmspe"] == pytest.approx(math.sqrt((0.05**2 + 0.5**2) / 2)) == pytest.approx(mm["rmspe"])
    assert mm["better"] == "gbt" and mm["learned_loo_rmspe"] == 0.2

    bmm = s["tvm/bmm"]
    assert bmm["learned_rmspe"] == pytest.approx(0.3) and bmm["learned_within_15"] == 0.0
    assert bmm["better"] == "law"

    torch_bmm = s["torch/bmm"]
    assert torch_bmm["count"] == 2 and "learned_rmspe" not in torch_bmm and "better" not in torch_bmm
    assert torch_bmm["learned_loo_rmspe"] is None

    # overall: the learned figures cover its 3 shapes, and the law is compared on those 3, not on all 5
    everything = s["all"]
    assert everything["count"] == 5 and everything["learned_count"] == 3
    assert everything["learned_within_10"] == pytest.approx(1 / 3)
    assert everything["learned_within_15"] == pytest.approx(2 / 3)
    assert everything["learned_rmspe"] == pytest.approx(math.sqrt((0.05**2 + 0.12**2 + 0.3**2) / 3))
    assert everything["learned_law_rmspe"] == pytest.approx(math.sqrt((0.05**2 + 0.5**2 + 0.02**2) / 3))
    assert everything["rmspe"] == pytest.approx(math.sqrt((0.05**2 + 0.5**2 + 0.02**2 + 2 * 0.05**2) / 5))
    assert everything["better"] == "gbt"

    assert format_figure(everything, "learned_") == "3 shapes: 33% within ±10%, 67% within ±15%, RMSPE 18.9%"
    assert format_figure(everything).startswith("5 shapes: ")
    assert rs[0].as_dict()["learned_error"] == pytest.approx(-0.05) and rs[3].as_dict()["learned_error"] is None


def _latency(b: int, m: int, k: int, n: int) -> float:
    return 0.01 + 2e-8 * b * m * k * n


def test_every_held_out_result_carries_the_learned_prediction_from_the_laws_rows(monkeypatch):
    """matmul has 8 profile rows (a learned fit), bmm 2 (none); the learned prediction is the one a fit on
    exactly those rows gives."""
    from dse.profiling.profiler import Measurer, Settings

    rng = np.random.default_rng(0)
    shapes = {"matmul": [(1, *(int(v) for v in rng.integers(16, 256, 3))) for _ in range(8)],
              "bmm": [(4, 65, 32, 65), (4, 65, 65, 32)]}
    rows = [{"primitive": p, "backend": "torch", "batch": s[0], "m": s[1], "k": s[2], "n": s[3],
             "dtype": "float32", "latency_ms": _latency(*s)} for p, ss in shapes.items() for s in ss]

    def measure(self, spec):  # the machine now: the formula itself
        return {"primitive": spec.primitive, "backend": spec.backend, "batch": spec.shape[0], "m": spec.shape[1],
                "k": spec.shape[2], "n": spec.shape[3], "latency_ms": _latency(*spec.shape)}

    monkeypatch.setattr(Measurer, "measure", measure)
    results = validate_shapes(Profile.from_rows(rows, {}), Settings(energy=("model",)), None, count=3,
                              backends=("torch",))
    assert sorted(r.primitive for r in results) == ["bmm"] * 3 + ["matmul"] * 3
    reference = fit_learned("matmul", np.array(shapes["matmul"]), [_latency(*s) for s in shapes["matmul"]])
    for r in results:
        if r.primitive == "bmm":
            assert r.learned_ms is None and r.learned_loo_rmspe is None
        else:
            assert r.learned_ms == pytest.approx(reference.predict(r.b, r.m, r.k, r.n), rel=1e-6)
            assert r.learned_loo_rmspe == pytest.approx(reference.loo_rmspe)
