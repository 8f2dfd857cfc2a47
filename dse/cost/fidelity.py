"""Figures of the cost model's fidelity on whole compiled models: how close, how well ranked, which rows lie.

Inputs are measurements made elsewhere (:mod:`dse.deploy.holdout` compiles and times held-out assignments);
this module only computes, so every figure can be checked against a hand calculation.

* Per assignment: relative error ``(predicted - measured) / measured``; overall the share within ±5% and
  ±10%, the mean absolute error and the worst case; each raw and corrected for the host's speed since
  profiling (the prediction times the reference kernel's now/then ratio, :mod:`dse.profiling.reference`).
* Ranking: Kendall's τ-b between predicted and measured latencies (Kendall, "The treatment of ties in ranking
  problems", Biometrika 33, 1945): ``τ_b = (C - D) / sqrt((n0 - n1)(n0 - n2))`` with ``C``/``D`` the concordant
  and discordant pairs, ``n0 = n(n-1)/2`` and ``n1``/``n2`` the pairs tied in the first/second ranking. A search
  needs the order right more than the milliseconds: τ = 1 ranks every pair as measured.
* Per kernel: a kernel's median time inside the compiled model against its profile row of the same shape.
  Their ratio per primitive is the *in-context factor* (the sum over the primitive's kernels, weighted by calls,
  of in-model time over profiled time). A measured row whose own ratio strays by more than ``factor`` either
  way from the usual ratio (the median of the other kernels of its primitive, or of all other kernels when it
  is its primitive's only one) is flagged as *poisoned*: the row, not the model, is off (a moment of load
  caught while profiling, README "The committed CPU profile").
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from dse.cost.model import Call

POISON_FACTOR = 1.5  # a row's in-model/profiled ratio this far from its primitive's factor (either way) is flagged


def kendall_tau(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Kendall's τ-b of two equally long sequences (module docstring); None with fewer than two items or
    when one side is all ties (τ is undefined there)."""
    if len(a) != len(b):
        raise ValueError(f"kendall_tau needs sequences of one length, got {len(a)} and {len(b)}")
    n = len(a)
    concordant = discordant = ties_a = ties_b = 0
    for i in range(n):
        for j in range(i + 1, n):
            da, db = np.sign(a[i] - a[j]), np.sign(b[i] - b[j])
            if da == 0:
                ties_a += 1
            if db == 0:
                ties_b += 1
            if da * db > 0:
                concordant += 1
            elif da * db < 0:
                discordant += 1
    pairs = n * (n - 1) // 2
    denom = math.sqrt((pairs - ties_a) * (pairs - ties_b))
    return (concordant - discordant) / denom if denom > 0 else None


def rel_errors(predicted: Sequence[float], measured: Sequence[float]) -> list[float]:
    return [(p - m) / m for p, m in zip(predicted, measured)]


def error_figures(predicted: Sequence[float], measured: Sequence[float]) -> dict[str, Any]:
    """Share within ±5% and ±10%, mean |error|, the worst (signed) error and Kendall's τ."""
    errors = rel_errors(predicted, measured)
    if not errors:
        return {"count": 0}
    worst = max(errors, key=abs)
    return {"count": len(errors),
            "within_5": sum(abs(e) <= 0.05 for e in errors) / len(errors),
            "within_10": sum(abs(e) <= 0.10 for e in errors) / len(errors),
            "mean_abs_error": float(np.mean(np.abs(errors))), "worst_error": float(worst),
            "kendall_tau": kendall_tau(list(predicted), list(measured))}


def assignment_summary(rows: Iterable[Mapping[str, Any]], speed_ratio: float | None) -> dict[str, Any]:
    """Overall figures of per-assignment rows (``predicted_ms``, ``measured_ms``, ``spread``): raw and, when
    the host-speed ratio is known, drift-corrected (``corrected_`` keys: against each row's ``at_speed_ms``, its
    measurement brought to the profile's host speed block by block, where the rows have it; else the prediction
    times ``speed_ratio``); plus the largest round-to-round spread of the measurements themselves (an error below
    it cannot be told from noise)."""
    rows = list(rows)
    pred = [float(r["predicted_ms"]) for r in rows]
    meas = [float(r["measured_ms"]) for r in rows]
    out = error_figures(pred, meas)
    out["speed_ratio"] = speed_ratio
    if rows and all(r.get("at_speed_ms") is not None for r in rows):
        corrected = error_figures(pred, [float(r["at_speed_ms"]) for r in rows])
        out.update({f"corrected_{k}": v for k, v in corrected.items() if k != "count"})
    elif speed_ratio is not None and rows:
        corrected = error_figures([p * speed_ratio for p in pred], meas)
        out.update({f"corrected_{k}": v for k, v in corrected.items() if k != "count"})
    spreads = [float(r["spread"]) for r in rows if r.get("spread") is not None]
    out["max_spread"] = max(spreads) if spreads else None
    return out


def compare_kernels(kernels: Iterable[Mapping[str, Any]], table: Any, *, factor: float = POISON_FACTOR,
                    backend: str = "tvm") -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """(per-kernel rows, per-primitive in-context factors) for kernels measured inside compiled models.

    ``kernels``: ``primitive``, ``b``, ``m``, ``k``, ``n``, ``calls`` (per forward) and ``in_model_ms`` (median
    of one call); ``table``: a :class:`dse.cost.model.CostTable`. A shape the profile measured is compared with
    its row; any other with the regression's estimate (``source`` says which; only measured rows can be
    poisoned). Rows get ``ratio`` (in-model / profiled), ``usual_ratio``, ``vs_usual`` (ratio / usual ratio) and
    ``poisoned``."""
    rows = []
    for kern in kernels:
        shape = (int(kern["b"]), int(kern["m"]), int(kern["k"]), int(kern["n"]))
        hit = table.lookup(backend, kern["primitive"], *shape)
        if hit is not None:
            profiled, source = float(hit[0]), "measured"
        else:
            profiled, source = float(table.estimate(backend, Call(kern["primitive"], *shape)).latency_ms), "regression"
        rows.append({**kern, "profile_ms": profiled, "source": source,
                     "ratio": float(kern["in_model_ms"]) / profiled if profiled > 0 else math.nan})
    factors: dict[str, dict[str, Any]] = {}
    for prim in sorted({r["primitive"] for r in rows}):
        mine = [r for r in rows if r["primitive"] == prim and math.isfinite(r["ratio"])]
        in_model = sum(r["in_model_ms"] * r["calls"] for r in mine)
        isolated = sum(r["profile_ms"] * r["calls"] for r in mine)
        factors[prim] = {"kernels": len(mine), "in_model_ms": in_model, "profile_ms": isolated,
                         "factor": in_model / isolated if isolated > 0 else None,
                         "median_ratio": float(np.median([r["ratio"] for r in mine])) if mine else None}
    finite = [r for r in rows if math.isfinite(r["ratio"])]
    for r in rows:
        # the row's yardstick leaves the row out, so a poisoned row cannot hide by pulling it along
        others = [o["ratio"] for o in finite if o is not r and o["primitive"] == r["primitive"]] \
            or [o["ratio"] for o in finite if o is not r]
        usual = float(np.median(others)) if others else None
        r["usual_ratio"] = usual
        r["vs_usual"] = r["ratio"] / usual if usual and math.isfinite(r["ratio"]) else None
        r["poisoned"] = bool(r["source"] == "measured" and r["vs_usual"] is not None
                             and max(r["vs_usual"], 1 / r["vs_usual"]) > factor)
    return rows, factors


__all__ = ["POISON_FACTOR", "assignment_summary", "compare_kernels", "error_figures", "kendall_tau", "rel_errors"]
